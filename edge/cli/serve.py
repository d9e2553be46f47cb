"""``beamloop serve``: the edge service on a frame stream, optionally driving an experiment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from beamloop.edge.cli.types import parse_positive


def cmd_serve(a: argparse.Namespace) -> int:
    """``beamloop serve``: the edge service on a frame stream, optionally driving an experiment; exit status."""
    from beamloop.edge.app import ServiceConfig, build_service, warm_up
    from beamloop.edge.control.client import BridgeClient
    from beamloop.edge.cli.options import client_keys_from_args
    from beamloop.edge.experiments.vacancy_line import ExperimentConfig, vacancy_line
    from beamloop.edge.io.runlog import RunLog
    from beamloop.edge.service import frame_image
    from beamloop.streams.native.receiver import FrameReceiver

    if a.experiment == "vacancy-line" and not a.bridge:
        print("beamloop serve: error: --experiment vacancy-line needs --bridge", file=sys.stderr)
        return 2
    cfg = ServiceConfig(a.material, a.method, a.targets if a.experiment == "vacancy-line" else None, a.trigger,
                        a.spacing_px, a.precision, a.device)
    out = Path(a.out)
    with FrameReceiver(a.frames, bind=a.bind) as rx:
        bridge = (BridgeClient(a.bridge, timeout_ms=a.bridge_timeout_ms, keys=client_keys_from_args(a))
                  if a.bridge else None)
        service = build_service(rx, cfg, bridge)
        warm_up(service.path, service.trigger)
        latency = service.latency
        print(f"beamloop serve: frames from {rx.endpoint}" + (f", bridge {a.bridge}" if a.bridge else ""), flush=True)
        with RunLog(out / "serve.h5", vars(a)) as rl:
            if a.experiment == "vacancy-line":
                exp = ExperimentConfig(rounds=a.rounds, targets_per_frame=a.targets)
                for rec in vacancy_line(service, exp, lambda t: print(t, flush=True)):
                    rl.add_frame(rec.image, rec.columns, pixel_size_A=rec.pixel_size_A, scan=rec.scan.as_dict(),
                                 targets=rec.targets)
            else:
                n = 0
                try:
                    while a.max_frames is None or n < a.max_frames:
                        got = service.next_frame(int(a.idle_timeout * 1000))
                        if got is None:
                            print(f"no frame for {a.idle_timeout} s; stopping", flush=True)
                            break
                        ev, res, scan = got
                        rl.add_frame(frame_image(ev), res.columns, pixel_size_A=ev.series.user_data.get("pixel_size_A"),
                                     attrs={"image_id": ev.image_id, "series_id": ev.series.series_id})
                        n += 1
                        if a.verbose:
                            print(f"frame {ev.image_id}: {len(res.columns)} columns", flush=True)
                except KeyboardInterrupt:
                    pass
                print(f"processed {n} frames", flush=True)
            if bridge is not None:
                rl.write_beam_log(bridge.log)
                bridge.close()
            rl.set_attrs(latency=latency.summary(), stream_counters=rx.counters.as_dict())
        print(latency.table())
        c = rx.counters
        print(f"stream: {c.frames} frames, {c.rejected} rejected ({c.last_error or 'no errors'}), "
              f"{c.gaps} gaps / {c.missing_frames} missing frames; wrote {out / 'serve.h5'}")
    return 0


def register(sub) -> None:
    """Add ``serve`` to the ``beamloop`` subcommands."""
    from beamloop.edge.cli.find import add_finder_arguments
    from beamloop.edge.cli.run import TRIGGER_HELP
    from beamloop.edge.trigger import trigger_names
    from beamloop.edge.cli.options import add_client_key_arguments

    v = sub.add_parser("serve", help="the edge service: receive frames, find columns, drive the beam")
    v.add_argument("--frames", default="tcp://127.0.0.1:5555", help="frame stream endpoint")
    v.add_argument("--bind", action="store_true", help="bind the frame endpoint (for senders that connect)")
    v.add_argument("--bridge", default=None, help="scan controller bridge endpoint")
    v.add_argument("--bridge-timeout-ms", type=int, default=2000, help="how long to wait for each bridge reply")
    v.add_argument("--experiment", choices=("none", "vacancy-line"), default="none",
                   help="vacancy-line: write a line of S vacancies atom by atom (needs --bridge)")
    v.add_argument("--rounds", type=int, default=3, help="frames with beam targets (one more verifies)")
    v.add_argument("--targets", type=int, default=4, help="beam targets per frame")
    v.add_argument("--trigger", choices=trigger_names(), default="model", help=TRIGGER_HELP)
    add_finder_arguments(v, default_material="MoS2")
    v.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    v.add_argument("--idle-timeout", type=parse_positive, default=30.0, help="stop after this many seconds without frames")
    v.add_argument("--out", default="out/serve", help="output folder (serve.h5)")
    v.add_argument("--verbose", action="store_true", help="a line per frame")
    add_client_key_arguments(v)
    v.set_defaults(func=cmd_serve)
