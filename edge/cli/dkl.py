"""``beamloop dkl``: the offline deep-kernel-learning experiment on the simulated microscope.

    beamloop dkl --out out/dkl [--material MoS2] [--scalarizer eels_onset] [--budget 50]
                 [--acquisition ei|ucb|maxvar] [--seed 0] [--batch-size 1] [--frame 384]

Scans one simulated frame, takes its columns as candidate probe positions, measures a few seed points, then
repeats: fit the DKL model (patches -> embedding -> Gaussian process), choose the next points by the
acquisition function, measure them (:class:`beamloop.edge.experiments.dkl.SimulatedPoints`: EELS spectra,
diffraction patterns or ADF counts with Poisson noise, reduced by the scalarizer). Writes run.h5, path.png,
maps.png, encoder.onnx, gp_state.npz and report.json (:mod:`beamloop.edge.experiments.dkl_run`). Needs
the ``dkl`` extra (torch, gpytorch); without it, one line says so and the exit status is 1.
"""

from __future__ import annotations

import argparse
import sys

from beamloop.edge.cli.types import bounded, parse_count, parse_nonnegative, parse_positive, parse_shape


def cmd_dkl(a: argparse.Namespace) -> int:
    """``beamloop dkl``: run the offline experiment; exit status 0, or 1 (missing extra, bad setting)."""
    from beamloop.edge.experiments.dkl_model import dkl_missing

    why = dkl_missing()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    from beamloop.edge.experiments.dkl import DKLSettings
    from beamloop.edge.experiments.dkl_run import default_goal, offline_experiment

    goal = a.goal or default_goal(a.scalarizer)
    try:
        settings = DKLSettings(budget=a.budget, initial=min(a.initial, a.budget), batch_size=a.batch_size,
                               acquisition=a.acquisition, goal=goal, seed=a.seed,
                               checkpoints=tuple(n for n in (25, 50, 100) if n <= a.budget))
        report = offline_experiment(a.out, settings, material=a.material, scalarizer=a.scalarizer,
                                    shape=a.frame, defects=a.defects, grain_boundary=a.grain_boundary,
                                    electrons=a.electrons, plots=not a.no_plots,
                                    progress=(lambda line: print(line, flush=True)) if a.verbose else None)
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    d = report["dkl"]
    f = d["top5_found"]
    print(f"dkl {a.scalarizer} ({goal}) on {a.material}, {d['budget']} of {d['candidates']} candidates: top-5% found "
          f"{f['dkl']:.2f} (random {f['random']:.2f}, expected {d['random_expected']:.2f}; raster {f['raster']:.2f}); "
          f"ratio vs random {d['ratio_vs_random']:.2f}; reconstruction error {d['reconstruction_error']['dkl']:.2f}; "
          f"decision {d['decision_s']['mean'] * 1e3:.0f} ms per step -> {a.out}/report.json")
    return 0


def register(sub) -> None:
    """Add ``dkl`` to the ``beamloop`` subcommands."""
    from beamloop.edge.analysis.scalarize import scalarizer_names
    from beamloop.edge.experiments.dkl_gp import ACQUISITIONS

    p = sub.add_parser("dkl", help="offline deep kernel learning on the simulator: choose where to measure a property")
    p.add_argument("--out", required=True, help="run folder (run.h5, plots, report.json)")
    p.add_argument("--material", choices=("MoS2", "SrTiO3"), default="MoS2")
    p.add_argument("--scalarizer", choices=scalarizer_names(), default="eels_onset",
                   help="what each point measurement is reduced to (beamloop.edge.analysis.scalarize)")
    p.add_argument("--goal", choices=("max", "min"), default=None,
                   help="look for the largest or smallest values (default: the scalarizer's usual direction)")
    p.add_argument("--budget", type=bounded(parse_count, 3, 2000), default=50, help="points to measure in all")
    p.add_argument("--initial", type=bounded(parse_count, 2, 2000), default=5, help="random seed points")
    p.add_argument("--batch-size", type=bounded(parse_count, 1, 100), default=1, help="points chosen per step")
    p.add_argument("--acquisition", choices=tuple(ACQUISITIONS), default="ei", help="acquisition function")
    p.add_argument("--seed", type=bounded(parse_count, 0, 2**31), default=0, help="scene, noise and model seed")
    p.add_argument("--frame", type=parse_shape, default=(384, 384), help="frame size N or ROWSxCOLS, pixels")
    p.add_argument("--defects", type=parse_nonnegative, default=1.0, help="defect density, times the default")
    p.add_argument("--grain-boundary", action="store_true", help="a tilt grain boundary through the frame")
    p.add_argument("--electrons", type=parse_positive, default=None,
                   help="probe electrons per point measurement (default by material)")
    p.add_argument("--no-plots", action="store_true", help="skip path.png and maps.png")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per step")
    p.set_defaults(func=cmd_dkl)
