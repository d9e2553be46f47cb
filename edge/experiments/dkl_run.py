"""The offline DKL experiment of ``beamloop dkl``: a simulated frame, candidates on its columns, point
measurements by :class:`beamloop.edge.experiments.dkl.SimulatedPoints`, and what a run leaves behind.

Outputs in the run folder:

``run.h5``
    ``/frame`` (rows, cols) uint16 HAADF counts; ``/candidates_px`` (m, 2) float64 ``(x, y)`` pixels;
    ``/truth`` (m,) float64 the simulator's noise-free property at every candidate; ``/path/order`` (n,)
    int64 candidate indices in the order measured, ``/path/xy_px`` (n, 2), ``/path/values`` (n,) the
    measured scalars; ``/prediction/mean`` and ``/prediction/std`` (m,) after the last measurement;
    ``/snapshots/<N>/mean``, ``.../std`` after the first ``N``; ``/steps/decision_s``, ``/steps/fit_s``,
    ``/steps/measured_before``; ``/baselines/random``, ``/baselines/raster`` (N,) their orders. Root
    attributes: ``settings`` (JSON), ``scalarizer`` (JSON), ``units``, ``material``, ``pixel_size_A``.
``path.png``
    The exploration path over the frame.
``maps.png``
    True property, predicted mean and predicted standard deviation at the candidates.
``encoder.onnx``, ``gp_state.npz``
    The fitted embedding (ONNX) and posterior, for
    :class:`beamloop.edge.experiments.dkl_gp.OnnxPredictor`.
``report.json``
    ``{"dkl": {...}}``: ``top5_found`` (share of the top-5 % candidates measured) of DKL, random and
    raster sampling at the budget, ``ratio_vs_random`` (DKL's share over random's expected share
    ``budget / m``), the reconstruction errors, decision times.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from beamloop.edge.experiments.dkl import (
    DEFAULT_GOAL,
    DKLResult,
    DKLSettings,
    SimulatedPoints,
    baseline_order,
    column_candidates,
    extract_patches,
    fit_predict,
    run_dkl,
    simulated_scene,
)
from beamloop.edge.experiments.dkl_gp import reconstruction_error, top_share_found
from beamloop.edge.sim.frames import SimulatedFrame
from beamloop.edge.sim.lattice import Specimen

TOP_FRACTION = 0.05
"""The share of candidates counted as the sites worth finding (the top 5 % by the true property)."""


@dataclass(frozen=True)
class Scene:
    """What an offline DKL run works on.

    Attributes
    ----------
    frame : SimulatedFrame
    specimen : Specimen
    candidates_px : ndarray, shape (m, 2), float64
    truth : ndarray, shape (m,), float64
        Noise-free property at the candidates (nan where the scalarizer gives none).
    material, scalarizer : str
    """

    frame: SimulatedFrame
    specimen: Specimen
    candidates_px: np.ndarray
    truth: np.ndarray
    material: str
    scalarizer: str

    @property
    def image(self) -> np.ndarray:
        """The HAADF frame the candidates are in, (rows, cols) uint16 counts."""
        return self.frame.counts


class RunScene(Protocol):
    """What :func:`write_run_h5` and :func:`write_plots` read of a scene (a :class:`Scene`, or the frame of a
    run through the bridge, :mod:`beamloop.edge.experiments.dkl_bridge`).

    Attributes
    ----------
    image : ndarray, shape (rows, cols)
        The frame.
    candidates_px : ndarray, shape (m, 2), float64
    truth : ndarray, shape (m,), float64
    material, scalarizer : str
    """

    candidates_px: np.ndarray
    truth: np.ndarray
    material: str
    scalarizer: str

    @property
    def image(self) -> np.ndarray:
        """The frame, (rows, cols)."""
        ...


def make_scene(material: str = "MoS2", scalarizer: str = "eels_onset", *, shape: tuple[int, int] = (256, 256),
               pixel_size_A: float = 0.15, seed: int = 0, defects: float = 1.0, grain_boundary: bool = False,
               patch_px: int = 48) -> Scene:
    """Simulate a frame (:func:`beamloop.edge.experiments.dkl.simulated_scene`), find its columns as
    candidates at least ``patch_px / 2`` from the edge, and the true property there.

    Raises
    ------
    ValueError
        Unknown material or scalarizer, or fewer than 10 candidates.
    """
    frame, spec = simulated_scene(material, shape, pixel_size_A, seed=seed, defects=defects,
                                  grain_boundary=grain_boundary)
    cand = column_candidates(frame.counts, frame.pixel_size_A, material, margin_px=patch_px / 2)
    if len(cand) < 10:
        raise ValueError(f"only {len(cand)} candidate columns in a {shape[0]}x{shape[1]} frame: use a larger frame")
    truth = SimulatedPoints(frame, spec, scalarizer, material=material, seed=seed).truth(cand)
    return Scene(frame, spec, cand, truth, material, scalarizer)


def ranked_truth(truth: np.ndarray, goal: str) -> np.ndarray:
    """``truth`` with nan replaced by the worst value for ``goal`` (``max``: -inf, ``min``: +inf)."""
    t = np.asarray(truth, np.float64)
    return np.where(np.isfinite(t), t, -np.inf if goal == "max" else np.inf)


def score_orders(scene: Scene, orders: dict[str, np.ndarray], budgets: tuple[int, ...], goal: str,
                 fraction: float = TOP_FRACTION) -> dict[str, dict[int, float]]:
    """Share of the top ``fraction`` candidates among the first ``N`` of each order, per budget ``N``."""
    t = ranked_truth(scene.truth, goal)
    return {k: {n: top_share_found(t, o[:n], fraction, maximize=goal == "max") for n in budgets if n <= len(o)}
            for k, o in orders.items()}


def random_expected_share(m: int, n: int) -> float:
    """Expected share of any fixed set of candidates among ``n`` drawn uniformly without replacement from
    ``m``: ``n / m`` (hypergeometric mean)."""
    return min(1.0, n / m)


def offline_experiment(out: str | Path, settings: DKLSettings, *, material: str = "MoS2",
                       scalarizer: str = "eels_onset", shape: tuple[int, int] = (256, 256),
                       pixel_size_A: float = 0.15, defects: float = 1.0, grain_boundary: bool = False,
                       electrons: float | None = None, plots: bool = True,
                       progress: Callable[[str], None] | None = None) -> dict:
    """Run DKL on a simulated frame and write ``run.h5``, plots, the exported model and ``report.json``.

    Parameters
    ----------
    out : str or Path
        Run folder (created).
    settings : DKLSettings
        Its ``goal`` is used as given (see :data:`beamloop.edge.experiments.dkl.DEFAULT_GOAL` for the usual
        direction of each scalarizer).
    material, scalarizer, shape, pixel_size_A, defects, grain_boundary :
        The scene (:func:`make_scene`).
    electrons : float, optional
        Probe electrons per point measurement (default by material).
    plots : bool
        Write ``path.png`` and ``maps.png``.
    progress : callable(str), optional
        Receives one line per step.

    Returns
    -------
    dict
        The report (also in ``report.json``).

    Raises
    ------
    beamloop.edge.experiments.dkl_model.DKLUnavailable
        The ``dkl`` extra is missing.
    ValueError, KeyError
        A bad setting, material or scalarizer.
    OSError
        A file cannot be written.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scene = make_scene(material, scalarizer, shape=shape, pixel_size_A=pixel_size_A, seed=settings.seed,
                       defects=defects, grain_boundary=grain_boundary, patch_px=settings.patch_px)
    m = len(scene.candidates_px)
    if m <= settings.budget:
        raise ValueError(f"{m} candidate columns for a budget of {settings.budget}: use a larger frame")
    measurer = SimulatedPoints(scene.frame, scene.specimen, scalarizer, material=material, electrons=electrons,
                               seed=settings.seed + 1)

    def step(rec, _model) -> None:
        if progress is not None:
            progress(f"measured {rec.measured_before + len(rec.chosen)}/{settings.budget}: "
                     f"{rec.values[0]:.4g} {measurer.units} (decision {rec.decision_s * 1e3:.0f} ms)")

    res = run_dkl(scene.frame.counts, scene.candidates_px, measurer, settings, on_step=step)
    rng = np.random.default_rng(settings.seed + 2)
    baselines = {k: baseline_order(k, scene.candidates_px, settings.budget, rng) for k in ("random", "raster")}
    goal = settings.goal
    shares = score_orders(scene, {"dkl": res.order, **baselines}, (settings.budget,), goal)
    n = settings.budget
    expected_random = random_expected_share(m, n)
    recon = {"dkl": reconstruction_error(res.mean, scene.truth)}
    patches = None
    for k, order in baselines.items():
        vals = measurer.measure(scene.candidates_px[order])
        if patches is None:
            patches = extract_patches(scene.frame.counts, scene.candidates_px, settings.patch_px, settings.patch_bin)
        mu, _ = fit_predict(patches, order, vals, settings.model, goal)
        recon[k] = reconstruction_error(mu, scene.truth)
    assert res.model is not None
    encoder = res.model.export(out / "encoder.onnx")
    assert res.model.state is not None
    res.model.state.save(out / "gp_state.npz")
    dec = res.decision_s
    report: dict[str, dict[str, Any]] = {"dkl": {
        "material": material, "scalarizer": scalarizer, "units": res.units, "goal": goal, "budget": n,
        "acquisition": settings.acquisition, "seed": settings.seed, "candidates": m,
        "top_fraction": TOP_FRACTION, "top_sites": max(1, math.ceil(TOP_FRACTION * m)),
        "top5_found": {k: v[n] for k, v in shares.items()},
        "random_expected": expected_random,
        "ratio_vs_random": shares["dkl"][n] / expected_random,
        "reconstruction_error": recon,
        "decision_s": {"mean": float(dec.mean()) if len(dec) else 0.0,
                       "median": float(np.median(dec)) if len(dec) else 0.0,
                       "max": float(dec.max()) if len(dec) else 0.0, "steps": int(len(dec))},
        "measurements": int(measurer.measured),
        "electrons_per_point": measurer.electrons,
        "wall_s": time.perf_counter() - t0,
        "files": {"run": "run.h5", "encoder": encoder.name, "gp_state": "gp_state.npz"},
        "settings": settings.as_dict(),
    }}
    write_run_h5(out / "run.h5", scene, res, baselines, measurer.scalarizer.describe(), pixel_size_A)
    if plots:
        write_plots(out, scene, res, goal)
        report["dkl"]["files"].update({"path_plot": "path.png", "maps_plot": "maps.png"})
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def write_run_h5(path: Path, scene: RunScene, res: DKLResult, baselines: dict[str, np.ndarray], scalarizer: dict,
                 pixel_size_A: float) -> Path:
    """Write the run file (layout in the module docstring); returns its path."""
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("frame", data=np.asarray(scene.image), compression="gzip")
        f["candidates_px"] = scene.candidates_px
        f["truth"] = scene.truth
        f["path/order"] = res.order
        f["path/xy_px"] = scene.candidates_px[res.order]
        f["path/values"] = res.values
        f["prediction/mean"] = res.mean
        f["prediction/std"] = res.std
        for n, (mu, sd) in res.snapshots.items():
            f[f"snapshots/{n}/mean"] = mu
            f[f"snapshots/{n}/std"] = sd
        f["steps/decision_s"] = res.decision_s
        f["steps/fit_s"] = np.array([s.fit_s for s in res.steps], np.float64)
        f["steps/measured_before"] = np.array([s.measured_before for s in res.steps], np.int64)
        for k, o in baselines.items():
            f[f"baselines/{k}"] = o
        f.attrs["settings"] = json.dumps(res.settings.as_dict())
        f.attrs["scalarizer"] = json.dumps(scalarizer)
        f.attrs["units"] = res.units
        f.attrs["material"] = scene.material
        f.attrs["pixel_size_A"] = pixel_size_A
    return path


def write_plots(out: Path, scene: RunScene, res: DKLResult, goal: str) -> tuple[Path, Path]:
    """``path.png`` (the exploration path over the frame, seed points marked) and ``maps.png`` (true,
    predicted, uncertainty at the candidates; the top 5 % ringed); returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asarray(scene.image, np.float64)
    cand = scene.candidates_px
    xy = cand[res.order]
    n0 = res.settings.initial
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(img, cmap="gray")
    ax.plot(xy[:, 0], xy[:, 1], "-", color="tab:orange", lw=0.8, alpha=0.8)
    sc = ax.scatter(xy[:, 0], xy[:, 1], c=np.arange(len(xy)), cmap="viridis", s=18, zorder=3)
    ax.scatter(xy[:n0, 0], xy[:n0, 1], marker="s", facecolors="none", edgecolors="red", s=50, zorder=4,
               label="seed points")
    fig.colorbar(sc, ax=ax, fraction=0.046, label="measurement order")
    ax.set_title(f"DKL path: {len(xy)} points ({res.settings.acquisition})")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_axis_off()
    p1 = out / "path.png"
    fig.savefig(p1, dpi=110, bbox_inches="tight")
    plt.close(fig)

    t = ranked_truth(scene.truth, goal)
    n_top = max(1, math.ceil(TOP_FRACTION * len(t)))
    top = np.argsort(-t if goal == "max" else t, kind="stable")[:n_top]
    fin = np.isfinite(scene.truth)
    lo, hi = (np.nanpercentile(scene.truth, [1, 99]) if fin.any() else (0.0, 1.0))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, vals, title, cmap, lim in (
            (axes[0], scene.truth, f"true {scene.scalarizer} ({res.units})", "coolwarm", (lo, hi)),
            (axes[1], res.mean, f"predicted after {len(res.order)}", "coolwarm", (lo, hi)),
            (axes[2], res.std, "predicted std", "magma", (None, None))):
        ax.imshow(img, cmap="gray", alpha=0.6)
        s = ax.scatter(cand[:, 0], cand[:, 1], c=vals, cmap=cmap, vmin=lim[0], vmax=lim[1], s=22)
        ax.scatter(cand[top, 0], cand[top, 1], facecolors="none", edgecolors="lime", s=60, lw=1.0)
        fig.colorbar(s, ax=ax, fraction=0.046)
        ax.set_title(title)
        ax.set_axis_off()
    axes[1].scatter(xy[:, 0], xy[:, 1], marker="x", c="k", s=12)
    fig.suptitle(f"{scene.material}: green rings = top {TOP_FRACTION:.0%} ({goal}); x = measured")
    p2 = out / "maps.png"
    fig.savefig(p2, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return p1, p2


def default_goal(scalarizer: str) -> str:
    """The usual direction of ``scalarizer`` (:data:`beamloop.edge.experiments.dkl.DEFAULT_GOAL`; ``max``
    for one not listed)."""
    return DEFAULT_GOAL.get(scalarizer, "max")
