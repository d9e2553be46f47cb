"""Deep kernel learning on the simulator, where the true property map is known: the share of the top-5 %
sites found and the reconstruction error after N = 25, 50, 100 point measurements, against random and
raster sampling at the same dose (the same number of point measurements of the same electrons each), and
the decision time per step.

    python -m beamloop.bench.dkl [--quick] [--seeds 100 101 ...] [--scalarizer eels_onset]

Scene: :func:`beamloop.edge.experiments.dkl_run.make_scene` (MoS2, 384 x 384 pixels at 0.15 Angstrom, point
defects at the default density, candidates on the found columns at least half a patch from the edge); the
property is the S L2,3 onset from the simulated EELS (:mod:`beamloop.edge.sim.eels`), to be minimised (a
lower onset near vacancies). Evaluation seeds 100 and up; the settings (patch size, embedding width,
acquisition, the GP's bounds) were chosen on seeds 0-4 only.

Anchor: gpax's variational DKL (``gpax.viDKL``, M. Ziatdinov et al.) takes 4-40 s per decision on 2 CPUs;
goals: decision time <= 1 s per step on 2 cores, top-5 % found >= 2x random at N = 50.

Writes ``bench/results/dkl.json``, ``dkl.md`` and ``dkl.png``; :func:`run` is the suite's entry point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (25, 50, 100)
EVAL_SEEDS = (100, 101, 102, 103)
TUNE_SEEDS = (0, 1, 2, 3, 4)
GOAL_RATIO_N50 = 2.0
GOAL_DECISION_S = 1.0
ANCHOR = "gpax viDKL: 4-40 s per decision on 2 CPUs"


def _stats(v) -> dict:
    a = np.asarray(v, np.float64)
    a = a[np.isfinite(a)]
    if not len(a):
        return {"mean": math.nan, "sd": math.nan, "n": 0}
    return {"mean": float(a.mean()), "sd": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def one_seed(seed: int, budgets: tuple[int, ...], scalarizer: str = "eels_onset", material: str = "MoS2",
             acquisition: str = "ei", frame: int = 384) -> dict:
    """DKL, random and raster on one scene: per budget the top-5 % share found and the reconstruction error;
    DKL's decision times."""
    from beamloop.edge.experiments.dkl import (
        DKLSettings,
        SimulatedPoints,
        baseline_order,
        extract_patches,
        fit_predict,
        run_dkl,
    )
    from beamloop.edge.experiments.dkl_gp import reconstruction_error, top_share_found
    from beamloop.edge.experiments.dkl_run import default_goal, make_scene, random_expected_share, ranked_truth

    goal = default_goal(scalarizer)
    n_max = max(budgets)
    settings = DKLSettings(budget=n_max, acquisition=acquisition, goal=goal, seed=seed, checkpoints=budgets)
    scene = make_scene(material, scalarizer, shape=(frame, frame), seed=seed, patch_px=settings.patch_px)
    m = len(scene.candidates_px)
    t = ranked_truth(scene.truth, goal)
    top = dict(maximize=goal == "max")
    measurer = SimulatedPoints(scene.frame, scene.specimen, scalarizer, material=material, seed=seed + 1)
    t0 = time.perf_counter()
    res = run_dkl(scene.frame.counts, scene.candidates_px, measurer, settings)
    wall = time.perf_counter() - t0
    patches = extract_patches(scene.frame.counts, scene.candidates_px, settings.patch_px, settings.patch_bin)
    rng = np.random.default_rng(seed + 2)
    out: dict = {"seed": seed, "candidates": m, "top_sites": max(1, math.ceil(0.05 * m)), "dkl_wall_s": wall,
                 "decision_s": res.decision_s.tolist(), "fit_s": [s.fit_s for s in res.steps], "per_budget": {}}
    random_order = baseline_order("random", scene.candidates_px, n_max, rng)
    for n in budgets:
        row = {"random_expected": random_expected_share(m, n)}
        row["dkl_found"] = top_share_found(t, res.order[:n], **top)
        row["dkl_recon"] = reconstruction_error(res.snapshots[n][0], scene.truth)
        for kind in ("random", "raster"):
            order = random_order[:n] if kind == "random" else baseline_order("raster", scene.candidates_px, n, rng)
            vals = measurer.measure(scene.candidates_px[order])
            mu, _ = fit_predict(patches, order, vals, settings.model, goal)
            row[f"{kind}_found"] = top_share_found(t, order, **top)
            row[f"{kind}_recon"] = reconstruction_error(mu, scene.truth)
        out["per_budget"][n] = row
    return out


def summarize(per_seed: list[dict], budgets: tuple[int, ...]) -> dict:
    """Means and standard deviations over seeds, ratios against random, goals."""
    table = {}
    for n in budgets:
        rows = [s["per_budget"][n] for s in per_seed if n in s["per_budget"]]
        found = {k: _stats([r[f"{k}_found"] for r in rows]) for k in ("dkl", "random", "raster")}
        recon = {k: _stats([r[f"{k}_recon"] for r in rows]) for k in ("dkl", "random", "raster")}
        expected = float(np.mean([r["random_expected"] for r in rows]))
        table[n] = {"top5_found": found, "reconstruction_error": recon, "random_expected": expected,
                    "ratio_vs_random": found["dkl"]["mean"] / expected,
                    "ratio_vs_random_per_seed": [r["dkl_found"] / r["random_expected"] for r in rows],
                    "ratio_vs_random_draws": (found["dkl"]["mean"] / found["random"]["mean"]
                                              if found["random"]["mean"] > 0 else math.inf),
                    "ratio_vs_raster": (found["dkl"]["mean"] / found["raster"]["mean"]
                                        if found["raster"]["mean"] > 0 else math.inf)}
    dec = np.concatenate([np.asarray(s["decision_s"]) for s in per_seed])
    fit = np.concatenate([np.asarray(s["fit_s"]) for s in per_seed])
    decision = {"mean_s": float(dec.mean()), "median_s": float(np.median(dec)),
                "p90_s": float(np.percentile(dec, 90)), "max_s": float(dec.max()), "fit_mean_s": float(fit.mean()),
                "steps": int(len(dec))}
    n50 = table.get(50)
    goals = {"decision_le_1s": {"goal_s": GOAL_DECISION_S, "median_s": decision["median_s"],
                                "met": decision["median_s"] <= GOAL_DECISION_S}}
    if n50 is not None:
        goals["top5_ge_2x_random_at_50"] = {"goal": GOAL_RATIO_N50, "ratio": n50["ratio_vs_random"],
                                            "met": n50["ratio_vs_random"] >= GOAL_RATIO_N50}
    return {"budgets": table, "decision": decision, "goals": goals}


def run(quick: bool = False, seeds: tuple[int, ...] | None = None, scalarizer: str = "eels_onset",
        out: Path = RESULTS, acquisition: str = "ei") -> dict:
    """The benchmark (the suite's entry point): writes ``dkl.json``, ``dkl.md`` and ``dkl.png`` in ``out``
    (``dkl_quick.*`` for a quick run: two seeds, N up to 50) and returns the result.

    Raises ``beamloop.edge.experiments.dkl_model.DKLUnavailable`` without the ``dkl`` extra."""
    from beamloop.edge.experiments.dkl_model import DKLConfig, require_dkl

    require_dkl()
    budgets = (25, 50) if quick else BUDGETS
    seeds = tuple(seeds) if seeds else (EVAL_SEEDS[:2] if quick else EVAL_SEEDS)
    t0 = time.perf_counter()
    per_seed = [one_seed(s, budgets, scalarizer, acquisition=acquisition) for s in seeds]
    res = {"scalarizer": scalarizer, "material": "MoS2", "frame_px": 384, "acquisition": acquisition,
           "eval_seeds": list(seeds), "tune_seeds": list(TUNE_SEEDS), "anchor": ANCHOR, "quick": quick,
           "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in DKLConfig().__dict__.items()},
           "machine": {"cpu_count": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg()),
                       "torch_threads": DKLConfig().threads},
           **summarize(per_seed, budgets), "per_seed": per_seed, "wall_s": time.perf_counter() - t0}
    stem = "dkl_quick" if quick else "dkl"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float))
    (out / f"{stem}.md").write_text(bench_summary_md(res))
    plot(res, out / f"{stem}.png")
    return res


def bench_summary_md(res: dict) -> str:
    """The result as a Markdown section."""
    lines = [f"## Deep kernel learning: {res['scalarizer']} on simulated {res['material']} "
             f"({res['frame_px']} px frames, acquisition {res['acquisition']})", "",
             f"Evaluation seeds {res['eval_seeds']} (settings chosen on seeds {res['tune_seeds']}); mean (sd) over "
             "seeds. Top-5 % found: share of the candidates with the 5 % best true values among those measured. "
             "Reconstruction error: RMS error of the predicted map over the candidates / the true map's sd "
             "(1 = no better than its mean). Random and raster: the same number of point measurements, the map "
             "fitted by the same DKL model once.", "",
             "| N | DKL top-5% | random | random (expected N/m) | raster | DKL / random | DKL recon | random recon "
             "| raster recon |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda s: f"{s['mean']:.3f} ({s['sd']:.3f})"  # noqa: E731
    for n, row in res["budgets"].items():
        f, r = row["top5_found"], row["reconstruction_error"]
        lines.append(f"| {n} | {fmt(f['dkl'])} | {fmt(f['random'])} | {row['random_expected']:.3f} | "
                     f"{fmt(f['raster'])} | {row['ratio_vs_random']:.2f} | {fmt(r['dkl'])} | {fmt(r['random'])} | "
                     f"{fmt(r['raster'])} |")
    d = res["decision"]
    lines += ["", f"Decision time per step (fit + prediction + acquisition, {d['steps']} steps, torch "
              f"{res['machine']['torch_threads']} thread, {res['machine']['cpu_count']} cores shared, load "
              f"{res['machine']['load_average_1_5_15'][0]:.1f}): median {d['median_s'] * 1e3:.0f} ms, mean "
              f"{d['mean_s'] * 1e3:.0f} ms, p90 {d['p90_s'] * 1e3:.0f} ms, max {d['max_s'] * 1e3:.0f} ms "
              f"(anchor: {res['anchor']}).", ""]
    for name, g in res["goals"].items():
        lines.append(f"- goal {name}: {'met' if g['met'] else 'missed'} ({json.dumps(g)})")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> Path:
    """Top-5 % found and reconstruction error against N, DKL vs random vs raster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [int(n) for n in res["budgets"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, c in (("dkl", "tab:red"), ("random", "tab:gray"), ("raster", "tab:blue")):
        for ax, key in ((axes[0], "top5_found"), (axes[1], "reconstruction_error")):
            m = [res["budgets"][n][key][kind]["mean"] for n in res["budgets"]]
            s = [res["budgets"][n][key][kind]["sd"] for n in res["budgets"]]
            ax.errorbar(ns, m, yerr=s, marker="o", color=c, label=kind, capsize=3)
    axes[0].plot(ns, [res["budgets"][n]["random_expected"] for n in res["budgets"]], "k:", label="random, expected")
    axes[0].set(xlabel="measurements N", ylabel="share of top-5 % sites found", title="finding the extremes")
    axes[1].set(xlabel="measurements N", ylabel="RMS error / sd of the true map", title="reconstruction")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m beamloop.bench.dkl``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--scalarizer", default="eels_onset")
    p.add_argument("--acquisition", default="ei", choices=("ei", "ucb", "maxvar"))
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    res = run(a.quick, tuple(a.seeds) if a.seeds else None, a.scalarizer, a.out, a.acquisition)
    print(bench_summary_md(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
