"""``beamloop serve4d``: the edge service on a pixelated detector's 4D-STEM stream.

``beamloop serve4d --detector tcp://DCU:9999 --protocol simplon1|stream2|merlin --scan 64x64 --fov-nm 2``
assembles each scan frame's virtual annular dark-field image (``--signal idpc``: the centre of mass integrated
to an iDPC image) from the diffraction patterns as they arrive (:class:`beamloop.edge.fourd_source.FourDFrameSource`)
and hands it to the same frame path, policy and dwells as ``beamloop serve`` (whose loop and run file it
uses); the latency report adds the 4D stages ``reduce4d`` and ``assemble4d``. Exit status as ``serve``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, cast

from beamloop.edge.cli.types import bounded, parse_count, parse_nonnegative, parse_positive, parse_shape

if TYPE_CHECKING:
    from beamloop.streams.native.receiver import FrameReceiver


def cmd_serve4d(a: argparse.Namespace) -> int:
    """``beamloop serve4d``: see the module docstring; returns the exit status."""
    import numpy as np

    from beamloop.edge.app import build_path, build_service, receiver_ring_bytes, warm_up
    from beamloop.edge.cli import EXIT_USAGE, StopSignals, error, worst_status
    from beamloop.edge.cli.options import client_keys_from_args
    from beamloop.edge.cli.serve import _stream_summary, serve_until_done, service_config
    from beamloop.edge.control.client import BridgeClient
    from beamloop.edge.fanout_worker import HAADF_GEOMETRY, DetectorGeometry
    from beamloop.edge.fourd_source import STAGES_4D, FourDFrameSource
    from beamloop.edge.frame.latency import LatencyRecorder
    from beamloop.edge.frame.scanframe import ScanFrame
    from beamloop.edge.io.runlog import RunLog, RunLogError
    from beamloop.edge.service import latency_keys
    from beamloop.streams.receivers import open_receiver

    if a.experiment == "vacancy-line" and not a.bridge:
        error("serve4d", "--experiment vacancy-line needs --bridge")
        return EXIT_USAGE
    try:
        scan = ScanFrame(a.frame_id, tuple(a.scan), (a.fov_nm * a.scan[0] / a.scan[1], a.fov_nm),
                         dwell_us=a.dwell_us)
        geometry = DetectorGeometry(a.bf, tuple(a.adf) if a.adf else None, tuple(a.centre) if a.centre else None,
                                    adf_inner_bf=HAADF_GEOMETRY.adf_inner_bf)
    except ValueError as exc:
        error("serve4d", str(exc))
        return EXIT_USAGE
    cfg = service_config(a)
    out = Path(a.out)
    codes: list[int] = []
    latency = LatencyRecorder(latency_keys(build_path(cfg)) + STAGES_4D)
    rl = RunLog(out / "serve.h5", {k: v for k, v in vars(a).items() if k != "func"})
    try:
        with StopSignals() as stop, open_receiver(a.detector, protocol=a.protocol, bind=a.bind, mode="lossless",
                                                  stack_size=a.stack,
                                                  max_ring_bytes=receiver_ring_bytes(cfg)) as det:
            source = FourDFrameSource(det, scan, signal=a.signal, geometry=geometry,
                                      max_missing_fraction=a.max_missing_fraction, latency=latency)
            bridge = (BridgeClient(a.bridge, timeout_ms=a.bridge_timeout_ms, keys=client_keys_from_args(a))
                      if a.bridge else None)
            service = build_service(cast("FrameReceiver", source), cfg, bridge, latency=latency)  # duck-typed
            service.interrupt = stop

            def start() -> str:
                warm_up(service.path, service.trigger, dtypes=(np.float32,))
                source.warm_up()
                print(f"beamloop serve4d: {a.protocol} 4D-STEM stream from {det.endpoint}, {a.signal} images of "
                      f"{a.scan[0]}x{a.scan[1]} probe positions" + (f", bridge {a.bridge}" if a.bridge else ""),
                      flush=True)
                return ""

            serve_until_done("serve4d", a, service, bridge, source, rl, codes, start)
            print(service.latency.table())
            st = source.stats
            print(f"4D: {st.patterns} patterns in {st.stacks} stacks, {st.frames} scan frames "
                  f"({st.dropped} dropped, {st.filled_positions} probe positions filled); "
                  + _stream_summary(source, service.stats) + f"; wrote {out / 'serve.h5'}", flush=True)
    finally:
        try:
            rl.close(stopped="the service did not start")
        except RunLogError:
            pass
    return worst_status(*codes)


def register(sub) -> None:
    """Add ``serve4d`` to the ``beamloop`` subcommands."""
    from beamloop.edge.cli.options import add_client_key_arguments
    from beamloop.edge.cli.serve import add_service_arguments
    from beamloop.edge.fourd_source import SIGNALS
    from beamloop.edge.path import DEFAULT_MEMORY_BUDGET
    from beamloop.streams.receivers import PROTOCOL_NAMES

    v = sub.add_parser("serve4d", help="the edge service on a 4D-STEM detector stream (virtual ADF or iDPC frames)")
    v.add_argument("--detector", required=True, help="detector endpoint, e.g. tcp://DCU:9999 (SIMPLON v1), "
                                                     ":31001 (Stream V2), :6342 (Merlin)")
    v.add_argument("--protocol", choices=PROTOCOL_NAMES, default="stream2")
    v.add_argument("--bind", action="store_true", help="bind the detector endpoint (for senders that connect)")
    v.add_argument("--stack", type=parse_count, default=64, help="patterns per receive stack")
    v.add_argument("--scan", type=parse_shape, required=True, help="probe positions per scan frame ROWSxCOLS")
    v.add_argument("--fov-nm", type=parse_positive, required=True, help="field of view along the fast axis, nm")
    v.add_argument("--dwell-us", type=parse_positive, default=10.0, help="dwell time per probe position, us")
    v.add_argument("--frame-id", type=parse_count, default=0, help="scan frame id of the first frame")
    v.add_argument("--signal", choices=SIGNALS, default="adf", help="adf: virtual annular dark field; idpc: "
                                                                   "integrated centre of mass")
    v.add_argument("--bf", type=parse_positive, help="BF disk radius, detector pixels (default: a sixth of the side)")
    v.add_argument("--adf", type=parse_positive, nargs=2, metavar=("RIN", "ROUT"),
                   help="ADF radii, detector pixels (default: twice the BF radius to the detector edge)")
    v.add_argument("--centre", type=float, nargs=2, metavar=("ROW", "COL"), help="beam centre, detector pixels")
    v.add_argument("--max-missing-fraction", type=bounded(parse_nonnegative, 0, 1), default=0.01,
                   help="hand over a scan frame with at most this fraction of probe positions missing (filled)")
    add_service_arguments(v)
    v.add_argument("--max-frames", type=parse_count, default=None, help="stop after this many scan frames")
    v.add_argument("--idle-timeout-s", "--idle-timeout", dest="idle_timeout",
                   type=parse_positive, default=30.0, help="stop after this many seconds without "
                                                                             "a scan frame")
    v.add_argument("--memory-budget-mib", type=parse_positive, default=DEFAULT_MEMORY_BUDGET / 2**20,
                   help="working memory the frame path and the receive ring may each need, MiB")
    v.add_argument("--out", default="out/serve4d", help="output folder (serve.h5)")
    v.add_argument("--verbose", action="store_true", help="a line per frame")
    add_client_key_arguments(v)
    v.set_defaults(func=cmd_serve4d)
