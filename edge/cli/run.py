"""``beamloop run``: the main job, the closed loop on the simulated microscope with its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from beamloop.edge.cli.types import parse_count, parse_positive, parse_shape

TRIGGER_HELP = ("model: the shipped quantized ejection model (integer, bit-exact with its QONNX graph); "
                "cusum, window: classical baselines")


def cmd_run(a: argparse.Namespace) -> int:
    """``beamloop run``: the main job (:func:`beamloop.edge.experiments.closed_loop.run`); the exit status of
    :mod:`beamloop.edge.cli` (0 done; 3 no frames; 4 simulator lost; 5 a blank not confirmed; 6 output not
    written; 128 + the signal after SIGINT/SIGTERM or the live view's stop button (``--http``), with the beam
    blanked and the frames so far written)."""
    from beamloop.edge.cli import EXIT_OUTPUT, EXIT_USAGE, STOP_EXIT, StopSignals, error, worst_status
    from beamloop.edge.cli.options import http_allowed
    from beamloop.edge.experiments import closed_loop

    if a.http and not http_allowed(a.http, None, "run"):
        return EXIT_USAGE
    with StopSignals() as stop:
        report = closed_loop.run(Path(a.out), rounds=a.rounds, shape=a.shape, pixel_size_A=a.pixel_size,
                                 dose_e_per_A2=a.dose, targets_per_frame=a.targets, seed=a.seed,
                                 current_pA=a.current_pA, trigger=a.trigger, max_dwell_s=a.max_dwell, quiet=a.quiet,
                                 interrupt=stop, trigger_at=a.trigger_at, drift_A_per_s=a.drift_A_per_s,
                                 lock_on=a.lock_on, http=a.http)
    outcome = report["outcome"]
    codes = [EXIT_OUTPUT if outcome["output_errors"] else 0]
    if outcome["reason"] == "interrupted":
        codes.append(128 + (outcome["signum"] or stop.signum or 2))
    elif outcome["reason"]:
        codes.append(STOP_EXIT.get(outcome["reason"], 1))
    if outcome["reason"]:
        error("run", f"stopped ({outcome['reason']}): {outcome['message']}; what was recorded is in {a.out}")
    for text in outcome["output_errors"]:
        if text != outcome["message"]:
            error("run", text)
    return worst_status(*codes)


def register(sub) -> None:
    """Add ``run`` to the ``beamloop`` subcommands."""
    from beamloop.edge.cli.options import (
        add_drift_argument,
        add_http_argument,
        add_lock_on_argument,
        add_trigger_at_argument,
    )
    from beamloop.edge.trigger import trigger_names

    r = sub.add_parser("run", help="the main job: closed loop on the simulated microscope, with report")
    r.add_argument("--out", default="out/run", help="output folder (run.h5, overlay.png, report.json)")
    r.add_argument("--rounds", type=parse_count, default=3, help="frames with beam targets (one more verifies)")
    r.add_argument("--shape", type=parse_shape, default=(256, 256), help="frame size ROWSxCOLS (16 .. 2048)")
    r.add_argument("--pixel-size", type=parse_positive, default=0.15, help="Angstrom per pixel")
    r.add_argument("--dose", type=parse_positive, default=1e5, help="frame dose, electrons per square Angstrom")
    r.add_argument("--targets", type=parse_count, default=4, help="beam targets per frame")
    r.add_argument("--seed", type=int, default=0, help="simulator seed")
    r.add_argument("--current-pA", type=parse_positive, default=50.0, help="probe current, picoampere")
    r.add_argument("--trigger", choices=trigger_names(), default="model", help=TRIGGER_HELP)
    add_trigger_at_argument(r)
    add_drift_argument(r)
    add_lock_on_argument(r, None, "predict with --drift-A-per-s above 0, none at 0 (the simulator then puts the "
                              "probe on the column the frame showed)")
    r.add_argument("--max-dwell", type=parse_positive, default=2.0, help="longest dwell per target, seconds")
    r.add_argument("--quiet", action="store_true", help="no progress bar or report")
    add_http_argument(r)
    r.set_defaults(func=cmd_run)
