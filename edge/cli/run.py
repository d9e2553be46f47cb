"""``beamloop run``: the main job, the closed loop on the simulated microscope with its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from beamloop.edge.cli.types import bounded, parse_count, parse_positive, parse_positive_int, parse_shape

TRIGGER_HELP = ("model: the shipped quantized ejection model (integer, bit-exact with its QONNX graph); "
                "cusum, window: classical baselines")


def cmd_run(a: argparse.Namespace) -> int:
    """``beamloop run``: the main job (:func:`beamloop.edge.experiments.closed_loop.run`, or with ``--experiment
    search`` :func:`beamloop.edge.experiments.search.run`); the exit status of
    :mod:`beamloop.edge.cli` (0 done; 3 no frames; 4 simulator lost; 5 a blank not confirmed; 6 output not
    written; 128 + the signal after SIGINT/SIGTERM or the live view's stop button (``--http``), with the beam
    blanked and the frames so far written)."""
    from beamloop.edge.cli import EXIT_USAGE, StopSignals, outcome_status
    from beamloop.edge.cli.options import drift_correction_options, http_allowed

    if a.http and not http_allowed(a.http, None, "run"):
        return EXIT_USAGE
    if a.experiment == "search":
        from beamloop.edge.cli.search import cmd_search

        return cmd_search(a)
    if a.experiment == "dkl":
        return cmd_run_dkl(a)
    from beamloop.edge.experiments import closed_loop

    with StopSignals() as stop:
        report = closed_loop.run(Path(a.out), rounds=a.rounds, shape=a.shape, pixel_size_A=a.pixel_size,
                                 dose_e_per_A2=a.dose, targets_per_frame=a.targets, seed=a.seed,
                                 current_pA=a.current_pA, trigger=a.trigger, max_dwell_s=a.max_dwell, quiet=a.quiet,
                                 interrupt=stop, trigger_at=a.trigger_at, drift_A_per_s=a.drift_A_per_s,
                                 lock_on=a.lock_on, http=a.http, detector=a.detector, detector_px=a.detector_px,
                                 drift_correction=drift_correction_options(a))
    return outcome_status("run", report, stop, a.out)


def cmd_run_dkl(a: argparse.Namespace) -> int:
    """``beamloop run --experiment dkl``: deep kernel learning against the simulated microscope through the bridge
    (:func:`beamloop.edge.experiments.dkl_bridge.run`); exit status as :func:`cmd_run`, and 2 (usage) with one
    line when the ``dkl`` extra is missing or an option is out of range."""
    from beamloop.edge.cli import EXIT_USAGE, StopSignals, error, outcome_status
    from beamloop.edge.experiments.dkl_model import dkl_missing

    why = dkl_missing()
    if why:
        error("run", why)
        return EXIT_USAGE
    from beamloop.edge.experiments import dkl_bridge

    with StopSignals() as stop:
        try:
            report = dkl_bridge.run(Path(a.out), seed=a.seed, budget=a.budget, scalarizer=a.scalarizer,
                                    acquisition=a.acquisition, quiet=a.quiet, interrupt=stop, shape=a.shape,
                                    pixel_size_A=a.pixel_size, dose_e_per_A2=a.dose, current_pA=a.current_pA,
                                    dwell_us=a.point_dwell_us)
        except (ValueError, KeyError) as exc:
            error("run", str(exc).strip("'\""))
            return EXIT_USAGE
    return outcome_status("run", report, stop, a.out)


EXPERIMENTS = ("vacancy-line", "search", "dkl")
"""What ``run --experiment`` runs: the closed loop writing a line of S vacancies
(:mod:`beamloop.edge.experiments.closed_loop`), the automated search on the large simulated specimen
(:mod:`beamloop.edge.experiments.search`; its options are those of ``beamloop search``), or deep kernel learning
through the bridge (:mod:`beamloop.edge.experiments.dkl_bridge`: ``--scalarizer``, ``--budget``,
``--acquisition``, ``--point-dwell-us``)."""


def register(sub) -> None:
    """Add ``run`` to the ``beamloop`` subcommands."""
    from beamloop.edge.analysis.scalarize import scalarizer_names
    from beamloop.edge.cli.options import (
        add_drift_argument,
        add_drift_correction_arguments,
        add_http_argument,
        add_lock_on_argument,
        add_trigger_at_argument,
    )
    from beamloop.edge.cli.search import add_search_arguments
    from beamloop.edge.experiments.dkl_gp import ACQUISITIONS
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
    add_drift_correction_arguments(r)
    r.add_argument("--max-dwell-s", "--max-dwell", dest="max_dwell", type=parse_positive, default=2.0,
                   help="longest dwell per target, seconds")
    r.add_argument("--detector", choices=("haadf", "sim4d"), default="haadf",
                   help="the service's frames: the simulator's HAADF frames, or its 4D mode (a diffraction pattern "
                        "per probe position, Stream V2; the virtual ADF image of each frame is assembled as the "
                        "patterns arrive)")
    r.add_argument("--detector-px", type=bounded(parse_positive_int, 8, 256), default=32,
                   help="sim4d: detector pixels per side (8-256)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or report")
    add_http_argument(r)
    r.add_argument("--experiment", choices=EXPERIMENTS, default="vacancy-line",
                   help="vacancy-line: the closed loop writing S vacancies; search: montage, few-shot chips, stage "
                        "moves to the rare regions (the options of 'beamloop search' below); dkl: deep kernel "
                        "learning of a point property through the bridge (--scalarizer, --budget, --acquisition)")
    r.add_argument("--scalarizer", choices=scalarizer_names(), default="eels_onset",
                   help="dkl: what each point measurement is reduced to (its kind picks the detector: eels, "
                        "pattern or adf)")
    r.add_argument("--budget", type=bounded(parse_positive_int, 3, 2000), default=50,
                   help="dkl: point measurements (and as many for each of the random and raster baselines)")
    r.add_argument("--acquisition", choices=tuple(ACQUISITIONS), default="ei", help="dkl: acquisition function")
    r.add_argument("--point-dwell-us", type=bounded(parse_positive, 1, 1e6, "us"), default=32000.0,
                   help="dkl: dwell per point measurement, microseconds (32000: 1e7 electrons at 50 pA)")
    add_search_arguments(r)
    r.set_defaults(func=cmd_run)
