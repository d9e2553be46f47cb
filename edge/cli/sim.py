"""``beamloop sim``: the simulated microscope (scan controller and HAADF detector) as a server."""

from __future__ import annotations

import argparse
import json

from beamloop.edge.cli.types import parse_positive


def cmd_sim(a: argparse.Namespace) -> int:
    """``beamloop sim``: the simulated microscope, serving until interrupted or ``--duration``; exit status."""
    from beamloop.edge.cli.options import safety_options, server_keys_from_args
    from beamloop.edge.sim.microscope import MicroscopeConfig, SimulatedMicroscope

    cfg = MicroscopeConfig(frames=a.frames, control=a.control, seed=a.seed, current_pA=a.current_pA,
                           cross_section_barn=a.cross_section_barn, sample_time_us=a.sample_time_us,
                           block_samples=a.block_samples, distortion_scale=a.distortion_scale, encoding=a.encoding,
                           max_park_s=a.max_park, keys=server_keys_from_args(a), **safety_options(a))
    with SimulatedMicroscope(cfg) as mic:
        info = {"frames": mic.frames_endpoint, "control": mic.control_endpoint}
        if a.announce:
            print("BEAMLOOP-SIM " + json.dumps(info), flush=True)
        else:
            print(f"simulated microscope: frames on {info['frames']}, bridge on {info['control']}", flush=True)
        try:
            mic.serve(duration_s=a.duration)
        except KeyboardInterrupt:
            pass
    return 0


def register(sub) -> None:
    """Add ``sim`` to the ``beamloop`` subcommands."""
    from beamloop.edge.cli.options import add_safety_arguments, add_server_key_arguments

    s = sub.add_parser("sim", help="the simulated microscope (scan controller + HAADF detector)")
    s.add_argument("--frames", default="tcp://127.0.0.1:5555", help="frame stream endpoint to bind")
    s.add_argument("--control", default="tcp://127.0.0.1:5556", help="bridge endpoint to bind")
    s.add_argument("--seed", type=int, default=0, help="seed of the specimen, the noise and the ejections")
    s.add_argument("--current-pA", type=parse_positive, default=50.0, help="probe current, picoampere")
    s.add_argument("--cross-section-barn", type=parse_positive, default=1.0, help="S displacement cross-section")
    s.add_argument("--sample-time-us", type=parse_positive, default=10.0, help="parked-probe sample time")
    s.add_argument("--block-samples", type=int, default=100, help="parked-probe samples per message")
    s.add_argument("--distortion-scale", type=float, default=1.0, help="scale of drift, wobble and jitter")
    s.add_argument("--encoding", choices=("raw", "lz4"), default="raw", help="frame stream encoding")
    s.add_argument("--max-park", type=parse_positive, default=10.0, help="blank after this long at one position, s")
    s.add_argument("--duration", type=parse_positive, default=None, help="stop after this many seconds")
    s.add_argument("--announce", action="store_true", help="print the endpoints as one JSON line and serve")
    add_server_key_arguments(s)
    add_safety_arguments(s)
    s.set_defaults(func=cmd_sim)
