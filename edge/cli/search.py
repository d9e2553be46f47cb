"""``beamloop search``: the automated search on the large simulated specimen, against raster and random.

    beamloop search --out out/search [--seed 0] [--budget-moves 20] [--strategy search|raster|random]
                    [--no-compare] [--shots 2] [--support FILE] [--handover] [--overview-fov-nm 4000]
                    [--zoom-fov-nm 600] [--chip-px 32] [--quiet]

Montage, few-shot chip classification, ranking, stage moves to the best regions and zoomed frames
(:mod:`beamloop.edge.experiments.search`); the raster and random baselines spend the same stage-move budget.
Writes report.json (its ``search`` section: rare regions per move, ``ratio_vs_raster``), run.h5, report.html
and montage.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from beamloop.edge.cli.types import bounded, parse_count, parse_positive


def cmd_search(a: argparse.Namespace) -> int:
    """``beamloop search``: exit status 0, 1 (bad option or support file), 6 (output not written), 128 + the
    signal after SIGINT/SIGTERM (the beam blanked, what was recorded written), or the exit status of the stop
    reason (:data:`beamloop.edge.cli.STOP_EXIT`)."""
    from beamloop.edge.analysis.fewshot import FewShotError
    from beamloop.edge.cli import StopSignals, error, outcome_status
    from beamloop.edge.experiments import search

    try:
        with StopSignals() as stop:
            report = search.run(Path(a.out), seed=a.seed, budget_moves=a.budget_moves, strategy=a.strategy,
                                quiet=a.quiet, interrupt=stop, compare=not a.no_compare, shots=a.shots,
                                support=a.support, handover=a.handover, overview_fov_nm=a.overview_fov_nm,
                                zoom_fov_nm=a.zoom_fov_nm, chip_px=a.chip_px)
    except (ValueError, FewShotError, OSError) as exc:
        error(a.command, str(exc))
        return 1
    return outcome_status(a.command, report, stop, a.out)


def add_search_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the search experiment (shared with ``run --experiment search``)."""
    from beamloop.edge.experiments.search import STRATEGIES

    p.add_argument("--budget-moves", type=bounded(parse_count, 1, 10000), default=20,
                   help="stage moves per strategy (montage moves count)")
    p.add_argument("--strategy", choices=STRATEGIES, default="search", help="how to spend the stage-move budget")
    p.add_argument("--no-compare", action="store_true", help="run only --strategy, not the baselines")
    p.add_argument("--shots", type=bounded(parse_count, 1, 5), default=2,
                   help="support chips per class picked from the montage (without --support)")
    p.add_argument("--support", type=Path, default=None,
                   help="support set JSON (beamloop fewshot label) instead of picks from the montage")
    p.add_argument("--handover", action="store_true",
                   help="hand the best region to the vacancy-line experiment (out/handover)")
    p.add_argument("--overview-fov-nm", type=parse_positive, default=4000.0, help="montage field of view, nm")
    p.add_argument("--zoom-fov-nm", type=parse_positive, default=600.0, help="zoomed field of view, nm")
    p.add_argument("--chip-px", type=bounded(parse_count, 8, 4096), default=32, help="chip side, montage pixels")


def register(sub) -> None:
    """Add ``search`` to the ``beamloop`` subcommands."""
    p = sub.add_parser("search", help="automated search: montage, few-shot chips, drive to rare regions, zoom in")
    p.add_argument("--out", default="out/search", help="output folder (report.json, run.h5, report.html)")
    p.add_argument("--seed", type=bounded(parse_count, 0, 2**31), default=0, help="specimen seed")
    add_search_arguments(p)
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_search)
