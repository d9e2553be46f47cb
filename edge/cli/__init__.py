"""The beamloop command line: closed-loop edge inference for STEM.

Subcommands defined here: ``run`` (the main job on the simulated microscope), ``sim`` (the simulated
microscope), ``serve`` (the edge service), ``find`` (atomic columns in image files), ``replay`` (stream
recorded frames to a service). Other features add their subcommands from their own modules
(:data:`COMMAND_MODULES`): each exposes ``register(subparsers)``, which adds parsers whose ``func``
takes the parsed arguments and returns an exit status. Such modules import heavy optional packages
(torch, brevitas, hls4ml) inside their command functions, never at import time.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import importlib

from beamloop.edge import __version__

COMMAND_MODULES = (
    "beamloop.streams.cli",      # detector streams: receive, record, stream (DECTRIS SIMPLON v1 / Stream V2)
    "beamloop.edge.learn.cli",   # segmentation network: train, export
    "beamloop.quantize.cli",     # trigger models: quantization-aware training, evaluation, export
    "beamloop.fpga.cli",         # trigger logic: hls4ml and open RTL flows, simulation, bitstreams
    "beamloop.bench.cli",        # the benchmark suite
    "beamloop.edge.control.keys",        # key pairs for the CURVE-secured bridge
)
"""Modules that add subcommands (skipped while a module does not exist yet)."""


def parse_shape(text: str) -> tuple[int, int]:
    """argparse type: ``ROWSxCOLS`` (or ``N`` for N x N) as a pair of positive ints; raises
    ``argparse.ArgumentTypeError`` otherwise."""
    try:
        parts = [int(v) for v in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is not ROWSxCOLS (e.g. 256x256)") from None
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"frame size {text!r} is not ROWSxCOLS with positive sizes")
    return parts[0], parts[1]


def parse_positive(text: str) -> float:
    """argparse type: a positive finite number; raises ``argparse.ArgumentTypeError`` otherwise."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return v


def cmd_run(a: argparse.Namespace) -> int:
    """``beamloop run``: the main job (:func:`beamloop.edge.experiments.closed_loop.run`); exit status."""
    from beamloop.edge.experiments import closed_loop

    closed_loop.run(Path(a.out), rounds=a.rounds, shape=a.shape, pixel_size_A=a.pixel_size, dose_e_per_A2=a.dose,
                targets_per_frame=a.targets, seed=a.seed, current_pA=a.current_pA, trigger=a.trigger,
                max_dwell_s=a.max_dwell, quiet=a.quiet)
    return 0


def cmd_sim(a: argparse.Namespace) -> int:
    """``beamloop sim``: the simulated microscope, serving until interrupted or ``--duration``; exit status."""
    from beamloop.edge.control.keys import server_keys_from_args
    from beamloop.edge.control.safety import safety_options
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


def cmd_serve(a: argparse.Namespace) -> int:
    """``beamloop serve``: the edge service on a frame stream, optionally driving an experiment; exit status."""
    from beamloop.edge.control.bridge import BridgeClient
    from beamloop.edge.experiments.vacancy_line import ExperimentConfig, vacancy_line
    from beamloop.edge.stages.find import FinderConfig
    from beamloop.edge.control.keys import client_keys_from_args
    from beamloop.edge.frame.latency import LatencyRecorder
    from beamloop.edge.path import FramePipeline
    from beamloop.edge.stages.policy import VacancyLinePolicy
    from beamloop.edge.io.runlog import RunLog
    from beamloop.edge.service import EdgeService
    from beamloop.streams.native.receiver import FrameReceiver

    latency = LatencyRecorder()
    fixed = None
    if a.spacing_px:
        fixed = FinderConfig.for_spacing(a.spacing_px)
    policy = VacancyLinePolicy(a.targets) if a.experiment == "vacancy-line" else None
    unet = None
    if a.method == "unet":
        from beamloop.edge.stages.unet import UNetFinder

        unet = UNetFinder(precision=a.precision, device=a.device)
    pipeline = FramePipeline(a.material, policy, latency, fixed, method=a.method, unet=unet)
    out = Path(a.out)
    _warm_up_kernels()
    with FrameReceiver(a.frames, bind=a.bind) as rx:
        bridge = (BridgeClient(a.bridge, timeout_ms=a.bridge_timeout_ms, keys=client_keys_from_args(a))
                  if a.bridge else None)
        service = EdgeService(rx, pipeline, bridge, trigger=a.trigger, latency=latency)
        print(f"beamloop serve: frames from {rx.endpoint}" + (f", bridge {a.bridge}" if a.bridge else ""), flush=True)
        with RunLog(out / "serve.h5", vars(a)) as rl:
            if a.experiment == "vacancy-line":
                if bridge is None:
                    print("error: --experiment vacancy-line needs --bridge", file=sys.stderr)
                    return 2
                cfg = ExperimentConfig(rounds=a.rounds, targets_per_frame=a.targets)
                for rec in vacancy_line(service, cfg, lambda t: print(t, flush=True)):
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
                        rl.add_frame(ev.data[ev.series.channels[0]], res.columns,
                                     pixel_size_A=ev.series.user_data.get("pixel_size_A"),
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


def _warm_up_kernels() -> None:
    """Compile (or load from numba's cache) the finder's kernels for the frame types streams carry, so
    the first real frame is not delayed by it."""
    import numpy as np

    from beamloop.edge.path import FramePipeline
    from beamloop.edge.sim.frames import mos2_frame

    counts = mos2_frame(shape=(96, 96), seed=1).counts
    pipeline = FramePipeline("MoS2")
    for frame in (counts, counts.astype(np.float32), counts.astype(np.uint8), counts.astype(np.uint32)):
        pipeline.process(frame, 0.15)


def cmd_find(a: argparse.Namespace) -> int:
    """``beamloop find``: columns in image files (:func:`beamloop.edge.batch_find.find_files`); exit status 1 if any
    file failed."""
    from beamloop.edge.batch_find import find_files
    from beamloop.edge.io.imageio import image_files

    outcomes = find_files(image_files(a.images), Path(a.out), a.pixel_size, a.method, a.material, a.spacing_px,
                          device=a.device, precision=a.precision)
    bad = 0
    for o in outcomes:
        if o.error:
            bad += 1
            print(f"error: {o.error}", file=sys.stderr)
        else:
            print(f"{o.path}: {len(o.columns)} columns -> {o.csv}, {o.overlay}")
    return 1 if bad else 0


def cmd_replay(a: argparse.Namespace) -> int:
    """``beamloop replay``: stream image files to a running service (:func:`beamloop.edge.io.replay.replay`); exit status."""
    from beamloop.edge.io.replay import replay

    n = replay(a.path, a.to, a.rate, repeat=a.repeat, pixel_size_A=a.pixel_size, encoding=a.encoding, bind=a.bind)
    print(f"sent {n} frames to {a.to}")
    return 0


TRIGGERS = ("cusum", "window", "model")
"""Trigger stages (:func:`beamloop.edge.trigger.classical.make_trigger`)."""
FINDERS = ("classical", "unet")
"""Column finders (:data:`beamloop.edge.path.METHODS`)."""


def _add_unet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "tensorrt"), default="auto",
                   help="ONNX Runtime provider for --method unet (auto: TensorRT, then CUDA, then CPU)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="which shipped U-Net export --method unet runs")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``beamloop`` command."""
    from beamloop.edge.control.keys import add_client_key_arguments, add_server_key_arguments
    from beamloop.edge.control.safety import add_safety_arguments

    p = argparse.ArgumentParser(prog="beamloop", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"beamloop {__version__}")
    p.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING, ERROR)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="the main job: closed loop on the simulated microscope, with report")
    r.add_argument("--out", default="out/run", help="output folder (run.h5, overlay.png, report.json)")
    r.add_argument("--rounds", type=int, default=3, help="frames with beam targets (one more verifies)")
    r.add_argument("--shape", type=parse_shape, default=(256, 256), help="frame size ROWSxCOLS")
    r.add_argument("--pixel-size", type=parse_positive, default=0.15, help="Angstrom per pixel")
    r.add_argument("--dose", type=parse_positive, default=1e5, help="frame dose, electrons per square Angstrom")
    r.add_argument("--targets", type=int, default=4, help="beam targets per frame")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--current-pA", type=parse_positive, default=50.0, help="probe current, picoampere")
    r.add_argument("--trigger", choices=TRIGGERS, default="model",
                   help="model: the shipped quantized ejection model (integer, bit-exact with its QONNX graph)")
    r.add_argument("--max-dwell", type=parse_positive, default=2.0, help="longest dwell per target, seconds")
    r.add_argument("--quiet", action="store_true", help="no progress bar or report")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sim", help="the simulated microscope (scan controller + HAADF detector)")
    s.add_argument("--frames", default="tcp://127.0.0.1:5555", help="frame stream endpoint to bind")
    s.add_argument("--control", default="tcp://127.0.0.1:5556", help="bridge endpoint to bind")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--current-pA", type=parse_positive, default=50.0)
    s.add_argument("--cross-section-barn", type=parse_positive, default=1.0, help="S displacement cross-section")
    s.add_argument("--sample-time-us", type=parse_positive, default=10.0, help="parked-probe sample time")
    s.add_argument("--block-samples", type=int, default=100, help="parked-probe samples per message")
    s.add_argument("--distortion-scale", type=float, default=1.0, help="scale of drift, wobble and jitter")
    s.add_argument("--encoding", choices=("raw", "lz4"), default="raw")
    s.add_argument("--max-park", type=parse_positive, default=10.0, help="blank after this long at one position, s")
    s.add_argument("--duration", type=parse_positive, default=None, help="stop after this many seconds")
    s.add_argument("--announce", action="store_true", help="print the endpoints as one JSON line and serve")
    add_server_key_arguments(s)
    add_safety_arguments(s)
    s.set_defaults(func=cmd_sim)

    v = sub.add_parser("serve", help="the edge service: receive frames, find columns, drive the beam")
    v.add_argument("--frames", default="tcp://127.0.0.1:5555", help="frame stream endpoint")
    v.add_argument("--bind", action="store_true", help="bind the frame endpoint (for senders that connect)")
    v.add_argument("--bridge", default=None, help="scan controller bridge endpoint")
    v.add_argument("--bridge-timeout-ms", type=int, default=2000)
    v.add_argument("--experiment", choices=("none", "vacancy-line"), default="none")
    v.add_argument("--rounds", type=int, default=3)
    v.add_argument("--targets", type=int, default=4)
    v.add_argument("--trigger", choices=TRIGGERS, default="model",
                   help="model: the shipped quantized ejection model; cusum, window: classical baselines")
    v.add_argument("--method", choices=FINDERS, default="classical", help="column finder")
    _add_unet_arguments(v)
    v.add_argument("--material", choices=("MoS2", "generic"), default="MoS2")
    v.add_argument("--spacing-px", type=parse_positive, default=None, help="column spacing in pixels (frames with no "
                   "pixel size)")
    v.add_argument("--max-frames", type=int, default=None)
    v.add_argument("--idle-timeout", type=parse_positive, default=30.0, help="stop after this many seconds without frames")
    v.add_argument("--out", default="out/serve")
    v.add_argument("--verbose", action="store_true")
    add_client_key_arguments(v)
    v.set_defaults(func=cmd_serve)

    f = sub.add_parser("find", help="find atomic columns in image files (.tif .png .npy .hspy .hdf5)")
    f.add_argument("images", nargs="+", help="image files or folders")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--pixel-size", type=parse_positive, default=None, help="Angstrom per pixel (overrides the file)")
    f.add_argument("--method", choices=FINDERS, default="classical",
                   help="classical (numba local maxima) or unet (the shipped U-Net ensemble on ONNX Runtime)")
    _add_unet_arguments(f)
    f.add_argument("--material", choices=("generic", "MoS2"), default="generic")
    f.add_argument("--spacing-px", type=parse_positive, default=None, help="lattice period in pixels (default: estimated)")
    f.set_defaults(func=cmd_find)

    y = sub.add_parser("replay", help="stream recorded frames to a running service")
    y.add_argument("path", help="an image stack file or a folder of images")
    y.add_argument("--to", required=True, help="endpoint of the service's receiver (started with serve --bind)")
    y.add_argument("--rate", type=float, default=10.0, help="frames per second (0: as fast as possible)")
    y.add_argument("--repeat", type=int, default=1)
    y.add_argument("--pixel-size", type=parse_positive, default=None)
    y.add_argument("--encoding", choices=("raw", "lz4"), default="raw")
    y.add_argument("--bind", action="store_true", help="bind instead of connecting")
    y.set_defaults(func=cmd_replay)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # that feature is not part of this installation
            raise
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``beamloop`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"beamloop {args.command}: error: {exc}", file=sys.stderr)
        return 1

