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

    python -m beamloop.bench.dkl --bridge [--seeds 0 1 2 3 4] [--budget 50]

runs the closed-loop form instead (:func:`beamloop.edge.experiments.dkl_bridge.run`: the simulated microscope in
its own process, the HAADF frame through the service, every point an EELS point queue through the control
bridge) and adds its ``bridge`` entry to ``dkl.json`` and its section to the end of ``dkl.md``.
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


BRIDGE_HEADER = "## Deep kernel learning through the control bridge"


def run_bridge(seeds: tuple[int, ...] = TUNE_SEEDS, budget: int = 50, scalarizer: str = "eels_onset",
               out: Path = RESULTS, acquisition: str = "ei") -> dict:
    """The closed-loop DKL experiment (:func:`beamloop.edge.experiments.dkl_bridge.run`, 384 px frames) on each
    seed: top-5 % found relative to random at ``budget``, decision time, measurement time per point. Adds
    ``bridge`` to ``out/dkl.json`` and replaces the bridge section at the end of ``out/dkl.md``; returns it."""
    import tempfile

    from beamloop.edge.experiments.dkl_bridge import run as bridge_run

    per_seed = []
    t0 = time.perf_counter()
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            rep = bridge_run(Path(tmp), seed=seed, budget=budget, scalarizer=scalarizer, acquisition=acquisition,
                             quiet=True, plots=False)
        d = rep["dkl"]
        per_seed.append({"seed": seed, "outcome": rep["outcome"], "candidates": d.get("candidates"),
                         "top5_found": d.get("top5_found"), "ratio_vs_random": d.get("ratio_vs_random"),
                         "reconstruction_error": d.get("reconstruction_error"), "decision_s": d.get("decision_s"),
                         "measure_s_per_point": d.get("measure_s_per_point"), "wall_s": d.get("wall_s")})
    ok = [s for s in per_seed if s["ratio_vs_random"] is not None]
    n = str(budget)
    found = {k: _stats([s["top5_found"][k][n] for s in ok]) for k in ("dkl", "random", "raster")}
    recon = {k: _stats([s["reconstruction_error"][k][n] for s in ok]) for k in ("dkl", "random", "raster")}
    expected = float(np.mean([budget / s["candidates"] for s in ok])) if ok else math.nan
    res = {"scalarizer": scalarizer, "acquisition": acquisition, "budget": budget, "seeds": list(seeds),
           "frame_px": 384, "top5_found": found, "reconstruction_error": recon, "random_expected": expected,
           "ratio_vs_random": found["dkl"]["mean"] / expected if ok else math.nan,
           "ratio_vs_random_per_seed": [s["ratio_vs_random"] for s in ok],
           "decision_p50_s": _stats([s["decision_s"]["p50"] for s in ok]),
           "decision_p90_s": _stats([s["decision_s"]["p90"] for s in ok]),
           "measure_s_per_point": _stats([s["measure_s_per_point"] for s in ok]),
           "machine": {"cpu_count": os.cpu_count(), "load_average_1_5_15": list(os.getloadavg())},
           "per_seed": per_seed, "wall_s": time.perf_counter() - t0}
    res["goals"] = {"top5_ge_2x_random_at_50": {"goal": GOAL_RATIO_N50, "ratio": res["ratio_vs_random"],
                                                "met": budget == 50 and res["ratio_vs_random"] >= GOAL_RATIO_N50},
                    "decision_le_1s": {"goal_s": GOAL_DECISION_S, "p50_s": res["decision_p50_s"]["mean"],
                                       "met": res["decision_p50_s"]["mean"] <= GOAL_DECISION_S}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    js = out / "dkl.json"
    whole = json.loads(js.read_text()) if js.exists() else {}
    whole["bridge"] = res
    js.write_text(json.dumps(whole, indent=1, default=float))
    md = out / "dkl.md"
    text = md.read_text() if md.exists() else ""
    text = text.split(BRIDGE_HEADER)[0].rstrip() + "\n\n" + bridge_summary_md(res)
    md.write_text(text.lstrip())
    return res


def bridge_summary_md(res: dict) -> str:
    """The bridge run as a Markdown section (starts with :data:`BRIDGE_HEADER`)."""
    fmt = lambda s: f"{s['mean']:.3f} ({s['sd']:.3f})"  # noqa: E731
    n = res["budget"]
    per = np.asarray(res["ratio_vs_random_per_seed"], np.float64)
    lines = [f"{BRIDGE_HEADER}: {res['scalarizer']} ({res['acquisition']}), N = {n}", "",
             f"`python -m beamloop.bench.dkl --bridge`: the simulated microscope in its own process (seeds "
             f"{res['seeds']}, each its own specimen), a {res['frame_px']} px HAADF frame through the service's "
             "frame path, candidates on the found columns, every point an EELS point queue on the bridge (32 ms, "
             "1e7 electrons), the true map from the simulator's `sim_point_truth`. Random and raster measured "
             "through the bridge too, at the same dose. Mean (sd) over seeds.", "",
             "| | DKL | random | raster |", "|---|---|---|---|",
             f"| top-5 % found at N={n} | {fmt(res['top5_found']['dkl'])} | {fmt(res['top5_found']['random'])} | "
             f"{fmt(res['top5_found']['raster'])} |",
             f"| reconstruction error | {fmt(res['reconstruction_error']['dkl'])} | "
             f"{fmt(res['reconstruction_error']['random'])} | {fmt(res['reconstruction_error']['raster'])} |", "",
             f"- DKL / random (expected N/m = {res['random_expected']:.3f}): **{res['ratio_vs_random']:.2f}**; per "
             f"seed {[round(r, 2) for r in res['ratio_vs_random_per_seed']]} (mean {np.mean(per):.2f}, standard "
             f"error {np.std(per, ddof=1) / np.sqrt(len(per)) if len(per) > 1 else math.nan:.2f}; "
             f"{sum(r >= GOAL_RATIO_N50 for r in per)} of {len(per)} seeds at >= {GOAL_RATIO_N50:g}x)",
             f"- decision time per step: p50 {res['decision_p50_s']['mean'] * 1e3:.0f} ms, p90 "
             f"{res['decision_p90_s']['mean'] * 1e3:.0f} ms (mean over seeds; {res['machine']['cpu_count']} cores "
             f"shared, load {res['machine']['load_average_1_5_15'][0]:.1f})",
             f"- measurement through the bridge: {res['measure_s_per_point']['mean'] * 1e3:.1f} ms per point "
             "(32 ms dwell, paced by the controller's clock, plus the queue round trips)", ""]
    for name, g in res["goals"].items():
        lines.append(f"- goal {name}: {'met' if g['met'] else 'missed'} ({json.dumps(g, default=float)})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m beamloop.bench.dkl``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--scalarizer", default="eels_onset")
    p.add_argument("--acquisition", nargs="+", default=["ei"], choices=("ei", "ucb", "maxvar"),
                   help="acquisition functions (the first is judged against the goals)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--bridge", action="store_true", help="the closed-loop form through the control bridge")
    p.add_argument("--budget", type=int, default=50, help="points per run of --bridge")
    p.add_argument("--markdown-only", action="store_true",
                   help="with --bridge: rewrite the bridge section of dkl.md from dkl.json, running nothing")
    a = p.parse_args(argv)
    if a.bridge and a.markdown_only:
        br = json.loads((a.out / "dkl.json").read_text())["bridge"]
        md = a.out / "dkl.md"
        md.write_text(md.read_text().split(BRIDGE_HEADER)[0].rstrip() + "\n\n" + bridge_summary_md(br))
        print(bridge_summary_md(br))
        return 0
    if a.bridge:
        br = run_bridge(tuple(a.seeds) if a.seeds else TUNE_SEEDS, a.budget, a.scalarizer, a.out, a.acquisition[0])
        print(bridge_summary_md(br))
        return 0
    res = run(a.quick, tuple(a.seeds) if a.seeds else None, a.scalarizer, a.out, tuple(a.acquisition))
    print(bench_summary_md(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
