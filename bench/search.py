"""The automated search against raster and random at equal stage-move budgets, over several specimens.

    python -m beamloop.bench.search [--quick] [--seeds 0 1 2 3 4] [--budget 20]

Each seed is a fresh large simulated specimen (:mod:`beamloop.edge.sim.specimen`: 8 x 8 um, 16 rare regions:
defect clusters and particles); each strategy of :mod:`beamloop.edge.experiments.search` gets the same number
of stage moves (the search's montage moves included). Reported: rare regions found per stage move, summed
over the seeds (``ratio_vs_raster``: the search's rate over raster's; goal >= 3), and the simulated time to the
first rare region (stage travel, settling and frame time; seed figure ~0.1 frames/s stage-limited montaging,
Olszta et al. 2022).

Writes ``bench/results/search.json`` and ``search.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2, 3, 4)
GOAL_RATIO = 3.0


def run(quick: bool = False, seeds=SEEDS, budget: int = 20) -> dict:
    """The benchmark; writes ``search.json`` and ``search.md`` under ``bench/results``."""
    from beamloop.edge.analysis.fewshot import ChipEncoder
    from beamloop.edge.experiments.search import STRATEGIES, SearchConfig, run_strategy, summarize

    seeds = tuple(seeds)[:2] if quick else tuple(seeds)
    cfg = SearchConfig(budget_moves=budget)
    enc = ChipEncoder(threads=2)
    per_seed: dict = {}
    t0 = time.perf_counter()
    for s in seeds:
        per_seed[str(s)] = {st: summarize(run_strategy(st, cfg, seed=s, encoder=enc)) for st in STRATEGIES}
    agg = {}
    for st in STRATEGIES:
        found = sum(v[st]["rare_found"] for v in per_seed.values())
        moves = sum(v[st]["moves_used"] for v in per_seed.values())
        firsts = [v[st]["time_to_first_rare_s"] for v in per_seed.values() if v[st]["time_to_first_rare_s"] is not None]
        agg[st] = {"rare_found": found, "moves": moves, "rare_per_move": found / max(moves, 1),
                   "time_to_first_rare_s_median": float(np.median(firsts)) if firsts else None,
                   "runs_with_a_find": len(firsts), "runs": len(per_seed)}
    res = {"budget_moves": budget, "seeds": list(seeds), "config": {k: (list(v) if isinstance(v, tuple) else v)
                                                                    for k, v in cfg.__dict__.items()},
           "strategies": agg,
           "ratio_vs_raster": agg["search"]["rare_per_move"] / max(agg["raster"]["rare_per_move"], 1e-12),
           "ratio_vs_random": agg["search"]["rare_per_move"] / max(agg["random"]["rare_per_move"], 1e-12),
           "goal_ratio_vs_raster": GOAL_RATIO, "per_seed": per_seed, "wall_s": time.perf_counter() - t0}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(res, indent=2) + "\n")
    lines = ["# Automated search vs raster and random", "",
             f"{len(seeds)} specimens (seeds {', '.join(map(str, seeds))}), {budget} stage moves per strategy.", "",
             "| strategy | rare regions found | moves | per move | median time to first (s, simulated) |",
             "|---|---|---|---|---|"]
    for st, v in agg.items():
        first = "-" if v["time_to_first_rare_s_median"] is None else f"{v['time_to_first_rare_s_median']:.0f}"
        lines.append(f"| {st} | {v['rare_found']} | {v['moves']} | {v['rare_per_move']:.3f} | {first} |")
    lines += ["", f"Search vs raster: {res['ratio_vs_raster']:.2f}x rare regions per move (goal >= {GOAL_RATIO:g}x); "
                  f"vs random {res['ratio_vs_random']:.2f}x.", ""]
    (RESULTS / "search.md").write_text("\n".join(lines))
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m beamloop.bench.search``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two seeds")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--budget", type=int, default=20)
    a = p.parse_args(argv)
    res = run(a.quick, a.seeds, a.budget)
    print(json.dumps({"strategies": res["strategies"], "ratio_vs_raster": res["ratio_vs_raster"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
