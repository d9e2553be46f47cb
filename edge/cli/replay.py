"""``beamloop replay``: stream recorded frames to a running service."""

from __future__ import annotations

import argparse

from beamloop.edge.cli.types import frame_compression, parse_positive


def cmd_replay(a: argparse.Namespace) -> int:
    """``beamloop replay``: stream image files to a running service (:func:`beamloop.edge.io.replay.replay`)."""
    from beamloop.edge.io.replay import replay

    n = replay(a.path, a.to, a.rate, repeat=a.repeat, pixel_size_A=a.pixel_size, encoding=a.encoding, bind=a.bind)
    print(f"sent {n} frames to {a.to}")
    return 0


def register(sub) -> None:
    """Add ``replay`` to the ``beamloop`` subcommands."""
    y = sub.add_parser("replay", help="stream recorded frames to a running service")
    y.add_argument("path", help="an image stack file or a folder of images")
    y.add_argument("--to", required=True, help="endpoint of the service's receiver (started with serve --bind)")
    y.add_argument("--rate", type=float, default=10.0, help="frames per second (0: as fast as possible)")
    y.add_argument("--repeat", type=int, default=1, help="send the frames this many times")
    y.add_argument("--pixel-size", type=parse_positive, default=None, help="Angstrom per pixel sent with the frames")
    y.add_argument("--compression", "--encoding", dest="encoding", type=frame_compression, choices=("raw", "lz4"),
                   default="raw", help="frame stream compression: none (raw) or lz4")
    y.add_argument("--bind", action="store_true", help="bind instead of connecting")
    y.set_defaults(func=cmd_replay)
