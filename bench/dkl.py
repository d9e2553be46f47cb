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
from dataclasses import replace
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
             acquisitions: tuple[str, ...] = ("ei",), frame: int = 384) -> dict:
    """DKL (one run per acquisition function), random and raster on one scene: per budget the top-5 % share
    found and the reconstruction error; DKL's decision times."""
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
    base = DKLSettings(budget=n_max, goal=goal, seed=seed, checkpoints=budgets)
    scene = make_scene(material, scalarizer, shape=(frame, frame), seed=seed, patch_px=base.patch_px)
    m = len(scene.candidates_px)
    t = ranked_truth(scene.truth, goal)
    top = dict(maximize=goal == "max")
    out: dict = {"seed": seed, "candidates": m, "top_sites": max(1, math.ceil(0.05 * m)), "dkl": {},
                 "baselines": {}}
    for acq in acquisitions:
        measurer = SimulatedPoints(scene.frame, scene.specimen, scalarizer, material=material, seed=seed + 1)
        t0 = time.perf_counter()
        res = run_dkl(scene.frame.counts, scene.candidates_px, measurer, replace(base, acquisition=acq))
        out["dkl"][acq] = {"wall_s": time.perf_counter() - t0, "decision_s": res.decision_s.tolist(),
                           "fit_s": [st.fit_s for st in res.steps],
                           "found": {n: top_share_found(t, res.order[:n], **top) for n in budgets},
                           "recon": {n: reconstruction_error(res.snapshots[n][0], scene.truth) for n in budgets}}
    patches = extract_patches(scene.frame.counts, scene.candidates_px, base.patch_px, base.patch_bin)
    rng = np.random.default_rng(seed + 2)
    measurer = SimulatedPoints(scene.frame, scene.specimen, scalarizer, material=material, seed=seed + 3)
    random_order = baseline_order("random", scene.candidates_px, n_max, rng)
    for kind in ("random", "raster"):
        found, recon = {}, {}
        for n in budgets:
            order = random_order[:n] if kind == "random" else baseline_order("raster", scene.candidates_px, n, rng)
            vals = measurer.measure(scene.candidates_px[order])
            mu, _ = fit_predict(patches, order, vals, base.model, goal)
            found[n] = top_share_found(t, order, **top)
            recon[n] = reconstruction_error(mu, scene.truth)
        out["baselines"][kind] = {"found": found, "recon": recon}
    out["random_expected"] = {n: random_expected_share(m, n) for n in budgets}
    return out


def summarize(per_seed: list[dict], budgets: tuple[int, ...], acquisitions: tuple[str, ...]) -> dict:
    """Means and standard deviations over seeds, ratios against random, decision times, goals (for the first
    acquisition function, the default)."""
    table: dict = {}
    for n in budgets:
        expected = float(np.mean([s["random_expected"][n] for s in per_seed]))
        found = {k: _stats([s["baselines"][k]["found"][n] for s in per_seed]) for k in ("random", "raster")}
        recon = {k: _stats([s["baselines"][k]["recon"][n] for s in per_seed]) for k in ("random", "raster")}
        row: dict = {"random_expected": expected, "baselines": {"top5_found": found, "reconstruction_error": recon},
                     "dkl": {}}
        for acq in acquisitions:
            f = _stats([s["dkl"][acq]["found"][n] for s in per_seed])
            row["dkl"][acq] = {
                "top5_found": f, "reconstruction_error": _stats([s["dkl"][acq]["recon"][n] for s in per_seed]),
                "ratio_vs_random": f["mean"] / expected,
                "ratio_vs_random_per_seed": [s["dkl"][acq]["found"][n] / s["random_expected"][n] for s in per_seed],
                "ratio_vs_random_draws": f["mean"] / found["random"]["mean"] if found["random"]["mean"] > 0
                else math.inf,
                "ratio_vs_raster": f["mean"] / found["raster"]["mean"] if found["raster"]["mean"] > 0 else math.inf}
        table[n] = row
    decision = {}
    for acq in acquisitions:
        dec = np.concatenate([np.asarray(s["dkl"][acq]["decision_s"]) for s in per_seed])
        fit = np.concatenate([np.asarray(s["dkl"][acq]["fit_s"]) for s in per_seed])
        decision[acq] = {"mean_s": float(dec.mean()), "median_s": float(np.median(dec)),
                         "p90_s": float(np.percentile(dec, 90)), "max_s": float(dec.max()),
                         "fit_mean_s": float(fit.mean()), "steps": int(len(dec))}
    main = acquisitions[0]
    goals = {"decision_le_1s": {"goal_s": GOAL_DECISION_S, "acquisition": main,
                                "median_s": decision[main]["median_s"], "p90_s": decision[main]["p90_s"],
                                "met": decision[main]["median_s"] <= GOAL_DECISION_S}}
    if 50 in table:
        r = table[50]["dkl"][main]["ratio_vs_random"]
        goals["top5_ge_2x_random_at_50"] = {"goal": GOAL_RATIO_N50, "acquisition": main, "ratio": r,
                                            "met": r >= GOAL_RATIO_N50}
    return {"budgets": table, "decision": decision, "goals": goals}


def run(quick: bool = False, seeds: tuple[int, ...] | None = None, scalarizer: str = "eels_onset",
        out: Path = RESULTS, acquisitions: tuple[str, ...] = ("ei",)) -> dict:
    """The benchmark (the suite's entry point): writes ``dkl.json``, ``dkl.md`` and ``dkl.png`` in ``out``
    (``dkl_quick.*`` for a quick run: two seeds, N up to 50) and returns the result. The first of
    ``acquisitions`` is the one the goals are judged on.

    Raises ``beamloop.edge.experiments.dkl_model.DKLUnavailable`` without the ``dkl`` extra."""
    from beamloop.edge.experiments.dkl_model import DKLConfig, require_dkl

    require_dkl()
    budgets = (25, 50) if quick else BUDGETS
    seeds = tuple(seeds) if seeds else (EVAL_SEEDS[:2] if quick else EVAL_SEEDS)
    t0 = time.perf_counter()
    per_seed = [one_seed(s, budgets, scalarizer, acquisitions=acquisitions) for s in seeds]
    cfg = DKLConfig()
    res = {"scalarizer": scalarizer, "material": "MoS2", "frame_px": 384, "acquisitions": list(acquisitions),
           "eval_seeds": list(seeds), "tune_seeds": list(TUNE_SEEDS), "anchor": ANCHOR, "quick": quick,
           "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
           "machine": {"cpu_count": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg()),
                       "torch_threads": cfg.threads},
           **summarize(per_seed, budgets, acquisitions), "per_seed": per_seed, "wall_s": time.perf_counter() - t0}
    stem = "dkl_quick" if quick else "dkl"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=float))
    (out / f"{stem}.md").write_text(bench_summary_md(res))
    plot(res, out / f"{stem}.png")
    return res


def bench_summary_md(res: dict) -> str:
    """The result as a Markdown section."""
    acqs = res["acquisitions"]
    lines = [f"## Deep kernel learning: {res['scalarizer']} on simulated {res['material']} "
             f"({res['frame_px']} px frames)", "",
             f"Evaluation seeds {res['eval_seeds']} (settings chosen on seeds {res['tune_seeds']}); mean (sd) over "
             "seeds. Top-5 % found: share of the candidates with the 5 % best true values among those measured. "
             "Reconstruction error: RMS error of the predicted map over the candidates / the true map's sd "
             "(1 = no better than its mean). Random and raster: the same number of point measurements of the "
             "same dose each, the map fitted once by the same DKL model. DKL / random: DKL's share over random's "
             "expected share N/m.", "",
             "| N | " + " | ".join(f"DKL {a} top-5%" for a in acqs) + " | random | random expected | raster | "
             + " | ".join(f"DKL {a} / random" for a in acqs) + " | " + " | ".join(f"DKL {a} recon" for a in acqs)
             + " | random recon | raster recon |",
             "|---" * (6 + 3 * len(acqs)) + "|"]
    fmt = lambda s: f"{s['mean']:.3f} ({s['sd']:.3f})"  # noqa: E731
    for n, row in res["budgets"].items():
        d, b = row["dkl"], row["baselines"]
        lines.append(f"| {n} | " + " | ".join(fmt(d[a]["top5_found"]) for a in acqs)
                     + f" | {fmt(b['top5_found']['random'])} | {row['random_expected']:.3f} | "
                     f"{fmt(b['top5_found']['raster'])} | "
                     + " | ".join(f"{d[a]['ratio_vs_random']:.2f}" for a in acqs) + " | "
                     + " | ".join(fmt(d[a]["reconstruction_error"]) for a in acqs)
                     + f" | {fmt(b['reconstruction_error']['random'])} | {fmt(b['reconstruction_error']['raster'])} |")
    lines += ["", f"Decision time per step (fit + prediction + acquisition; torch {res['machine']['torch_threads']} "
              f"thread, {res['machine']['cpu_count']} cores shared with other jobs, load "
              f"{res['machine']['load_average_1_5_15'][0]:.1f}; anchor: {res['anchor']}):", ""]
    for a in acqs:
        d = res["decision"][a]
        lines.append(f"- {a}: median {d['median_s'] * 1e3:.0f} ms, mean {d['mean_s'] * 1e3:.0f} ms, p90 "
                     f"{d['p90_s'] * 1e3:.0f} ms, max {d['max_s'] * 1e3:.0f} ms over {d['steps']} steps "
                     f"(fit {d['fit_mean_s'] * 1e3:.0f} ms)")
    lines.append("")
    for name, g in res["goals"].items():
        lines.append(f"- goal {name}: {'met' if g['met'] else 'missed'} ({json.dumps(g)})")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> Path:
    """Top-5 % found and reconstruction error against N, DKL vs random vs raster."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(res["budgets"])
    ns = [int(n) for n in keys]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = [(f"DKL {a}", lambda r, q, a=a: r["dkl"][a][q]) for a in res["acquisitions"]]
    series += [(k, lambda r, q, k=k: r["baselines"][q][k]) for k in ("random", "raster")]
    for label, get in series:
        for ax, q in ((axes[0], "top5_found"), (axes[1], "reconstruction_error")):
            st = [get(res["budgets"][n], q) for n in keys]
            ax.errorbar(ns, [s["mean"] for s in st], yerr=[s["sd"] for s in st], marker="o", label=label, capsize=3)
    axes[0].plot(ns, [res["budgets"][n]["random_expected"] for n in keys], "k:", label="random, expected")
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
    p.add_argument("--acquisition", nargs="+", default=["ei"], choices=("ei", "ucb", "maxvar"),
                   help="acquisition functions (the first is judged against the goals)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    res = run(a.quick, tuple(a.seeds) if a.seeds else None, a.scalarizer, a.out, tuple(a.acquisition))
    print(bench_summary_md(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
