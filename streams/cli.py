"""``beamloop receive``, ``beamloop record`` and ``beamloop stream``: detector streams from the command line.

- ``beamloop receive tcp://DCU:9999 [--protocol simplon1|stream2] [--mode lossless|latest] [--scan 64x64]
  [--bf R] [--adf RIN ROUT] [--out DIR]``: receive and decode, print live counters once a second, and
  with ``--scan`` assemble virtual BF / ADF / centre-of-mass images (PNG and .npy in ``--out``).
- ``beamloop record tcp://DCU:9999 --out DIR [--prefix NAME] [--frames-per-file N]``: lossless recording to
  HDF5 (DECTRIS layout, bitshuffle-LZ4); prints one JSON line per flush
  (``{"event": "flushed", "frames": N, ...}``): those frames survive any crash of the recorder.
- ``beamloop stream SOURCE --bind tcp://*:9999 [--protocol simplon1|stream2] [--rate HZ]``: act as a
  detector: replay a recording (``*_master.h5``; bitshuffle-LZ4 chunks are sent as they are stored), or
  with ``SOURCE = sim4d`` a simulated 4D-STEM scan of MoS2 (:mod:`beamloop.edge.sim.fourd`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

from beamloop.edge.cli import parse_positive, parse_shape  # the main command's argument types

PROTOCOLS = ("simplon1", "stream2")


def register(subparsers) -> None:
    """Add the ``receive``, ``record`` and ``stream`` subcommands (called by ``beamloop.edge.cli``)."""
    p = subparsers.add_parser("receive", help="receive a DECTRIS detector stream, show live counters and images")
    p.add_argument("endpoint", help="detector endpoint, e.g. tcp://192.168.1.10:9999 (SIMPLON v1) or :31001 (V2)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="simplon1")
    p.add_argument("--bind", action="store_true", help="bind instead of connecting (for senders that connect)")
    p.add_argument("--mode", choices=("lossless", "latest"), default="lossless")
    p.add_argument("--stack", type=int, default=64, help="frames per stack (default 64)")
    p.add_argument("--scan", type=parse_shape, help="scan shape ROWSxCOLS: assemble virtual images")
    p.add_argument("--bf", type=parse_positive, help="virtual BF disk radius, detector pixels (default: disk/1)")
    p.add_argument("--adf", type=parse_positive, nargs=2, metavar=("RIN", "ROUT"), help="virtual ADF radii, pixels")
    p.add_argument("--centre", type=float, nargs=2, metavar=("ROW", "COL"), help="beam centre (default: middle)")
    p.add_argument("--series", type=int, default=1, help="stop after this many series (0: never)")
    p.add_argument("--duration", type=parse_positive, help="stop after this many seconds")
    p.add_argument("--out", type=Path, help="write live images (PNG, .npy) and counters (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no live counter lines")
    p.set_defaults(func=cmd_receive)

    p = subparsers.add_parser("record", help="record a detector stream losslessly to HDF5 (DECTRIS layout)")
    p.add_argument("endpoint")
    p.add_argument("--out", type=Path, required=True, help="directory for <prefix>_master.h5 and data files")
    p.add_argument("--prefix", default="series", help="file name prefix (series number appended after the first)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="simplon1")
    p.add_argument("--bind", action="store_true")
    p.add_argument("--frames-per-file", type=int, default=1000)
    p.add_argument("--max-file-seconds", type=parse_positive, default=1.0,
                   help="close a data file after this long even when not full (bounds loss on a crash)")
    p.add_argument("--series", type=int, default=1, help="stop after this many series (0: never)")
    p.set_defaults(func=cmd_record)

    p = subparsers.add_parser("stream", help="act as a DECTRIS detector: replay a recording or simulate 4D-STEM")
    p.add_argument("source", help="a *_master.h5 recording, or 'sim4d' for a simulated 4D-STEM scan of MoS2")
    p.add_argument("--bind", default=None, help="endpoint to bind (default tcp://*:9999 v1, tcp://*:31001 V2)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="simplon1")
    p.add_argument("--compression", choices=("bslz4", "lz4", "none"), default="bslz4",
                   help="encoding of simulated frames (recordings are sent bitshuffle-LZ4 as stored)")
    p.add_argument("--rate", type=parse_positive, help="frames per second (default: as fast as the receiver takes)")
    p.add_argument("--wait", type=float, default=1.0, help="seconds to wait for receivers before the header")
    p.add_argument("--scan", type=parse_shape, default=(32, 32), help="sim4d: scan shape (default 32x32)")
    p.add_argument("--detector", type=int, default=96, help="sim4d: detector pixels per side (default 96)")
    p.add_argument("--electrons", type=parse_positive, default=5000.0, help="sim4d: electrons per probe position")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_stream)


# --- receive -----------------------------------------------------------------------------------------------------


class _Stop:
    """Set by SIGINT/SIGTERM so loops end cleanly."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, *_):
        self.flag = True

    def __call__(self) -> bool:
        return self.flag


def _status_line(c: dict, rate: float) -> str:
    return (f"frames {c['frames']:>9d}  {rate:9.0f}/s  decoded {c['decoded']:>9d}  gaps {c['gaps']} "
            f"(missing {c['missing_frames']})  dropped {c['dropped']}  rejected {c['rejected']}  "
            f"saturated {c['saturated']}")


def cmd_receive(a: argparse.Namespace) -> int:
    """``beamloop receive``: receive a detector stream, print live counters, assemble virtual images; exit status."""
    from beamloop.streams.dectris.receiver import DetectorReceiver, FrameStack, SeriesEnd, SeriesStart
    from beamloop.streams.errors import ProtocolError

    stop = _Stop()
    t_end = time.monotonic() + a.duration if a.duration else None
    imager = None
    ended = 0
    with DetectorReceiver(a.endpoint, protocol=a.protocol, bind=a.bind, mode=a.mode, stack_size=a.stack) as rx:
        print(f"receiving {a.protocol} from {rx.endpoint} ({a.mode})", file=sys.stderr, flush=True)
        last_t, last_n = time.monotonic(), 0
        while not stop() and (t_end is None or time.monotonic() < t_end):
            try:
                ev = rx.recv(200)
            except ProtocolError as exc:
                print(f"rejected: {exc}", file=sys.stderr, flush=True)
                continue
            if isinstance(ev, SeriesStart):
                s = ev.series
                print(f"series {s.series_id}: {s.number_of_images} frames of {s.shape[0]}x{s.shape[1]} {s.dtype}",
                      file=sys.stderr, flush=True)
                if a.scan:
                    imager = _imager(a, s.shape)
            elif isinstance(ev, FrameStack) and imager is not None:
                imager.update_stack(ev)
            elif isinstance(ev, SeriesEnd):
                print(f"series {ev.series.series_id} ended: {ev.frames} frames, {ev.missing} missing",
                      file=sys.stderr, flush=True)
                ended += 1
                if a.series and ended >= a.series:
                    break
            now = time.monotonic()
            if not a.quiet and now - last_t >= 1.0:
                c = rx.counters.as_dict()
                print(_status_line(c, (c["frames"] - last_n) / (now - last_t)), file=sys.stderr, flush=True)
                last_t, last_n = now, c["frames"]
        counters = rx.counters.as_dict()
    print(json.dumps(counters))
    if a.out is not None:
        _write_outputs(a.out, counters, imager)
    return 0


def _imager(a: argparse.Namespace, det_shape: tuple[int, int]):
    from beamloop.edge.analysis import live4d

    centre = tuple(a.centre) if a.centre else ((det_shape[0] - 1) / 2, (det_shape[1] - 1) / 2)
    half = min(det_shape) / 2
    bf = a.bf or half / 3
    rin, rout = a.adf if a.adf else (bf * 1.25, half)
    masks = {"bf": live4d.disk_mask(det_shape, bf, centre), "adf": live4d.annulus_mask(det_shape, rin, rout, centre)}
    return live4d.LiveImager(a.scan, masks, com_centre=centre, com_radius=bf * 1.5)


def _write_outputs(out: Path, counters: dict, imager) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "counters.json").write_text(json.dumps(counters, indent=1))
    if imager is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = imager.images
    fig, axes = plt.subplots(1, len(imgs), figsize=(3 * len(imgs), 3.2))
    for ax, (name, img) in zip(np.atleast_1d(axes), imgs.items()):
        np.save(out / f"{name}.npy", img)
        ax.imshow(img, cmap="gray")
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "virtual_images.png", dpi=100)
    plt.close(fig)


# --- record ------------------------------------------------------------------------------------------------------


def cmd_record(a: argparse.Namespace) -> int:
    """``beamloop record``: record a detector stream losslessly to HDF5 (DECTRIS layout); exit status."""
    from beamloop.streams.dectris.receiver import DetectorReceiver
    from beamloop.streams.dectris.recorder import Recorder, record

    if a.frames_per_file < 1:
        print("--frames-per-file must be >= 1", file=sys.stderr)
        return 2
    stop = _Stop()
    count = [0]

    def emit(event: str, **kw) -> None:
        print(json.dumps({"event": event, **kw}), flush=True)

    with DetectorReceiver(a.endpoint, protocol=a.protocol, bind=a.bind, mode="lossless", decode=False) as rx:
        def factory(series):
            count[0] += 1
            prefix = a.prefix if count[0] == 1 else f"{a.prefix}_{count[0]:03d}"
            emit("series", series_id=series.series_id, prefix=prefix, nimages=series.number_of_images,
                 shape=list(series.shape), dtype=str(series.dtype))
            return Recorder(a.out, prefix, frames_per_file=a.frames_per_file, max_file_seconds=a.max_file_seconds,
                            on_flush=lambda n, info: emit("flushed", frames=n, **info), counters=rx.counters.as_dict)

        emit("listening", endpoint=rx.endpoint, protocol=a.protocol)
        masters = record(rx, factory, stop=stop, series_limit=a.series or None)
        emit("done", masters=[str(m) for m in masters], counters=rx.counters.as_dict())
    return 0


# --- stream -------------------------------------------------------------------------------------------------------


def cmd_stream(a: argparse.Namespace) -> int:
    """``beamloop stream``: send a recording, or a simulated 4D-STEM scan, as SIMPLON v1 or Stream V2;
    exit status (2: missing recording)."""
    from beamloop.streams.dectris import codecs
    from beamloop.streams.dectris.simplon import SimplonSender
    from beamloop.streams.dectris.stream_v2 import Stream2Sender

    v1 = a.protocol == "simplon1"
    endpoint = a.bind or ("tcp://*:9999" if v1 else "tcp://*:31001")
    if a.source == "sim4d":
        frames = _sim4d(a)
        shape, dtype, ct = frames.shape[1:], frames.dtype, 1e-4
        compression = a.compression
        blobs = None
    else:
        from beamloop.streams.dectris.recorder import iter_chunks, recording_info

        try:
            info = recording_info(a.source)
        except (OSError, KeyError) as exc:
            print(f"cannot read recording {a.source}: {exc}", file=sys.stderr)
            return 2
        shape, dtype, ct = info["shape"], info["dtype"], info["count_time"] or 1e-4
        compression = codecs.BSLZ4
        blobs = iter_chunks(a.source)
        frames = None
    n = len(frames) if frames is not None else recording_info(a.source)["frames_recorded"]
    if v1:
        tx = SimplonSender(endpoint, encoding={"bslz4": "bslz4", "lz4": "lz4<", "none": "<"}[compression])
    else:
        tx = Stream2Sender(endpoint, compression=compression)
    with tx:
        print(f"streaming {n} frames of {shape[0]}x{shape[1]} {dtype} as {a.protocol} on {tx.endpoint}",
              file=sys.stderr, flush=True)
        time.sleep(a.wait)
        tx.start_series(tuple(shape), dtype, n, count_time=ct, frame_time=ct)
        period = 1.0 / a.rate if a.rate else 0.0
        t0 = time.monotonic()
        for i in range(n):
            if frames is not None:
                tx.send_frame(frames[i])
            else:
                _, blob = next(blobs)
                if v1:
                    tx.send_blob(blob)
                else:
                    tx.send_blobs({tx.series.channels[0]: blob})
            if period:
                delay = t0 + (i + 1) * period - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        tx.end_series()
        rate = n / max(time.monotonic() - t0, 1e-9)
        print(f"sent {n} frames ({rate:.0f}/s)", file=sys.stderr, flush=True)
    return 0


def _sim4d(a: argparse.Namespace) -> np.ndarray:
    from beamloop.edge.frame.scanframe import ScanFrame
    from beamloop.edge.sim import lattice
    from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope

    rng = np.random.default_rng(a.seed)
    rows, cols = a.scan
    step_A = 0.2
    spec = lattice.mos2((-rows * step_A, rows * step_A, -cols * step_A, cols * step_A))
    lattice.add_point_defects(spec, rng)
    cfg = FourDConfig(detector_shape=(a.detector, a.detector), disk_radius_px=a.detector / 6,
                      df_width_px=a.detector / 4)
    scan = ScanFrame(0, (rows, cols), (rows * step_A / 10, cols * step_A / 10))
    return FourDMicroscope(spec, cfg).scan(scan, a.electrons, rng).reshape(rows * cols, a.detector, a.detector)
