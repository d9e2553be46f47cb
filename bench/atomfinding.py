"""Atom finding side by side: beamloop's finders against the peers, on the same frames, in the same run.

Simulated frames (:func:`beamloop.edge.sim.frames.mos2_frame`: MoS2 at 0.15 Angstrom per pixel, with point defects,
scan distortion and Poisson noise) carry ground truth: every method is timed per frame (wall clock, the
frame already in memory, from raw counts to the column positions) and scored with
:func:`beamloop.edge.analysis.scoring.score_frame` (0.5 Angstrom matching radius, 0.5 Angstrom edge margin; found rows
without a class count as columns). The real images of ``../shared/data/real`` have no ground truth:
there every method is timed, and its columns are compared with beamloop's classical ones (agreement).

Methods
-------
- ``beamloop_classical``: the classical frame path (:func:`beamloop.edge.path.frame_path`) (preprocess + find +
  classify; MoS2
  classes and vacancy sites on simulated frames). Its find-only time (preprocess + find) is reported
  beside it, the like-for-like figure against peers that only locate. Defaults, not tuned.
- ``beamloop_unet``: the same pipeline with ``method="unet"`` (the shipped U-Net ensemble), when a model is
  installed.
- ``plm_com``, ``trackpy``, ``atomap_com``, ``atomap_gauss``: :mod:`beamloop.bench.peers`. Their scale parameters
  come from the same physical sizes beamloop uses (column sigma 0.33 Angstrom, minimum distance 0.55 of
  the 1.824 Angstrom Mo-S distance). Each peer's threshold, and for the two built on ``peak_local_max``
  the fraction of that minimum distance they are given (its square-window spacing rule dropped half the
  S2 columns at 6 px here; ../shared/notes/atom-finding.md saw it above 3 px), are calibrated per dose
  on a separate 256 x 256 frame: best F1 over a small grid, then the lower RMS error.

Each method gets a time budget per frame size and dose: frames are processed until it is spent (at
least one), and a method whose single frame is projected (from the smaller size, by pixel count) to
exceed the budget is skipped with that reason.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beamloop.bench import peers
from beamloop.edge.materials import MOS2

log = logging.getLogger("beamloop.bench")

PIXEL_SIZE_A = 0.15
SPACING_A = MOS2.nn_spacing_A
"""Projected Mo-S distance of MoS2 (:data:`beamloop.edge.materials.MOS2`)."""
COLUMN_SIGMA_A = 0.33
"""Blurred column sigma of the simulator's frames (:meth:`beamloop.edge.stages.find.FinderConfig.for_pixel_size`)."""
DOSES = (1e4, 1e5)
SIZES = (256, 1024)

PLAN = {
    False: {"frames": {256: 8, 1024: 3}, "repeats": {256: 5, 1024: 3}, "budget_s": {256: 25.0, 1024: 60.0},
            "skip": {}},
    True: {"frames": {256: 2, 1024: 1}, "repeats": {256: 2, 1024: 1}, "budget_s": {256: 6.0, 1024: 12.0},
           "skip": {"atomap_gauss": "quick mode: atomap's 2-D Gaussian refinement takes 10-30 s per 256x256 frame "
                                    "here; the full run measures it"}},
}
"""Frames per size and dose, timing repeats per frame, time budget per method, size and dose (s), and
methods left out."""

GRIDS = {"plm_com": {"threshold": (0.05, 0.1, 0.15, 0.2, 0.3), "distance_fraction": (0.45, 0.6, 0.9)},
         "trackpy": {"threshold": (0.05, 0.1, 0.2, 0.3, 0.4), "distance_fraction": (1.0,)},
         "atomap_com": {"threshold": (0.05, 0.1, 0.2, 0.3), "distance_fraction": (0.45, 0.6, 0.9)}}
"""Parameter grids tried in calibration: relative threshold, and the fraction of the minimum column distance
given as the peer's own minimum distance (``atomap_gauss`` uses ``atomap_com``'s)."""

COM_RADIUS_FRACTION = 0.65
"""``plm_com``'s centre-of-mass disc radius as a fraction of the minimum column distance (MoS2: 4.4 px of
the 12.2 px Mo-S distance, clear of the neighbour's core): a single-pass centre of mass is pulled towards
its window's centre, less the larger the window (1.5 px: 9.8 pm RMS error, 4.4 px: 8.7 pm here)."""

SEEDS = {"calibration": 70_000, "test": 71_000}


@dataclass
class Method:
    """One finder under test: ``fn(image) -> (xy, cls, timings_ns or None)``, its display name, and why it
    cannot run here (``skip``, empty when it can)."""

    name: str
    fn: object = None
    skip: str = ""


def scales(pixel_size_A: float = PIXEL_SIZE_A) -> dict:
    """Pixel scales shared by every method on MoS2: ``sigma_px`` (column sigma), ``min_distance_px``."""
    return {"sigma_px": COLUMN_SIGMA_A / pixel_size_A, "min_distance_px": 0.55 * SPACING_A / pixel_size_A}


def peer_fn(name: str, sigma_px: float, min_distance_px: float, threshold: float, distance_fraction: float = 1.0):
    """The peer finder ``name`` with its parameters bound (minimum distance ``distance_fraction *
    min_distance_px``): ``fn(image) -> (n, 2) xy``.

    Raises ``KeyError`` for an unknown name."""
    com_radius_px = COM_RADIUS_FRACTION * min_distance_px
    min_distance_px = distance_fraction * min_distance_px
    if name == "plm_com":
        return lambda im: peers.plm_com(im, sigma_px, min_distance_px, threshold, com_radius_px)
    if name == "trackpy":
        return lambda im: peers.trackpy_locate(im, sigma_px, min_distance_px, threshold)
    if name in ("atomap_com", "atomap_gauss"):
        refine = name.split("_")[1]
        return lambda im: peers.atomap_find(im, min_distance_px, threshold, refine)
    raise KeyError(f"unknown peer {name!r}")


def score(xy: np.ndarray, cls, frame) -> object:
    """:func:`beamloop.edge.analysis.scoring.score_frame` of positions ``xy`` ((n, 2) pixels) and classes ``cls`` ((n,)
    int or
    None for unclassified) against a :class:`~beamloop.edge.sim.frames.SimulatedFrame`."""
    from beamloop.edge.analysis.scoring import score_frame

    xy = np.asarray(xy, float).reshape(-1, 2)
    cls = -np.ones(len(xy), int) if cls is None else np.asarray(cls)
    return score_frame(xy, cls, frame.truth_xy, frame.truth_cls, frame.class_names, frame.pixel_size_A,
                       frame_shape=frame.counts.shape)


def f1(s) -> float:
    """Harmonic mean of a score's recall and precision (0 when both are 0)."""
    return 2 * s.recall * s.precision / (s.recall + s.precision) if (s.recall + s.precision) > 0 else 0.0


def calibrate(dose: float, available: dict) -> dict:
    """Choose each peer's parameters (:data:`GRIDS`) on a 256 x 256 calibration frame of ``dose`` (best F1,
    then lowest RMS).

    Parameters
    ----------
    dose : float
        e-/A^2.
    available : dict
        Peer name -> skip reason ("" when it can run); skipped peers are not calibrated.

    Returns
    -------
    dict: peer -> ``{"threshold", "distance_fraction", "f1", "recall", "precision", "rms_pm", "grid"}``.
    """
    from beamloop.edge.sim.frames import mos2_frame

    frame = mos2_frame((256, 256), PIXEL_SIZE_A, dose, seed=SEEDS["calibration"] + int(math.log10(dose)))
    sc = scales()
    out = {}
    for name, grid in GRIDS.items():
        if available.get(name):
            continue
        trials = []
        for frac in grid["distance_fraction"]:
            for thr in grid["threshold"]:
                s = score(peer_fn(name, sc["sigma_px"], sc["min_distance_px"], thr, frac)(frame.counts), None, frame)
                trials.append((f1(s), -(s.rms_pm if math.isfinite(s.rms_pm) else 1e9), thr, frac, s))
        best = max(trials, key=lambda t: (round(t[0], 4), t[1]))
        s = best[4]
        out[name] = {"threshold": best[2], "distance_fraction": best[3], "f1": best[0], "recall": s.recall,
                     "precision": s.precision, "rms_pm": s.rms_pm, "grid": grid}
    if "atomap_com" in out:
        out["atomap_gauss"] = dict(out["atomap_com"], note="threshold of atomap_com")
    return out


def make_methods(material: str, pixel_size_A: float | None, thresholds: dict, finder_config=None,
                 sigma_px: float | None = None, min_distance_px: float | None = None,
                 skip: dict | None = None) -> list[Method]:
    """Every method, bound to one kind of frame.

    ``material``/``pixel_size_A``/``finder_config`` configure beamloop (:func:`beamloop.edge.path.frame_path`);
    ``sigma_px``/``min_distance_px`` (default: :func:`scales` of the pixel size) and ``thresholds``
    (peer -> parameters, from :func:`calibrate`) configure the peers; ``skip`` (name -> reason) leaves
    methods out on purpose."""
    skip = skip or {}
    from beamloop.edge.path import frame_path

    if sigma_px is None or min_distance_px is None:
        sc = scales(pixel_size_A or PIXEL_SIZE_A)
        sigma_px, min_distance_px = sc["sigma_px"], sc["min_distance_px"]
    classical = frame_path("classical", material, config=finder_config)

    def run_classical(im):
        ctx = classical.run(im, pixel_size_A, record=False)
        return ctx.columns.xy, ctx.columns.cls, dict(ctx.timings_ns)

    methods = [Method("beamloop_classical", run_classical)]
    try:
        unet = frame_path("unet", material)

        def run_unet(im):
            ctx = unet.run(im, pixel_size_A, record=False)
            return ctx.columns.xy, ctx.columns.cls, dict(ctx.timings_ns)

        methods.append(Method("beamloop_unet", run_unet))
    except Exception as exc:  # no model shipped, or no onnxruntime session: skip with the reason
        methods.append(Method("beamloop_unet", skip=f"U-Net not available: {type(exc).__name__}: {exc}"))
    for name in peers.PEER_PACKAGES:
        why = peers.available(name)
        if why:
            methods.append(Method(name, skip=why))
            continue
        if name in skip:
            methods.append(Method(name, skip=skip[name]))
            continue
        par = thresholds.get(name, {})
        fn = peer_fn(name, sigma_px, min_distance_px, par.get("threshold", 0.15), par.get("distance_fraction", 1.0))
        methods.append(Method(name, lambda im, fn=fn: (fn(im), None, None)))
    return methods


SLOW_CALL_S = 1.0
"""A method whose first call takes longer than this (seconds) is timed once per frame, not ``repeats`` times:
its frame-to-frame figures are steady enough, and the budget is better spent on more frames."""


def time_method(method: Method, images: list, repeats: int, budget_s: float) -> dict:
    """Time ``method`` on ``images`` (each ``repeats`` times, once when the first call took more than
    :data:`SLOW_CALL_S`; warm it up first, :func:`warm`) until ``budget_s`` is spent (at least one call).

    Returns ``{"times_s": [...], "outputs": [(xy, cls) per image processed], "timings_ns": [...]}``.
    """
    times, outputs, stage_ns = [], [], []
    t_start = time.perf_counter()
    for im in images:
        for r in range(repeats):
            if r and times[0] > SLOW_CALL_S:
                break
            t0 = time.perf_counter()
            xy, cls, tns = method.fn(im)
            times.append(time.perf_counter() - t0)
            if tns:
                stage_ns.append(tns)
            if r == 0:
                outputs.append((xy, cls))
            if time.perf_counter() - t_start > budget_s:
                return {"times_s": times, "outputs": outputs, "timings_ns": stage_ns}
    return {"times_s": times, "outputs": outputs, "timings_ns": stage_ns}


def time_figures(times_s, timings_ns=None) -> dict:
    """Per-frame time figures in milliseconds: ``n``, ``p50_ms``, ``p99_ms``, ``mean_ms``, ``min_ms``; with
    beamloop's stage timings also ``find_only_p50_ms`` (preprocess + find) and ``stages_p50_ms``."""
    t = np.asarray(times_s, float) * 1e3
    out = {"n": int(len(t)), "p50_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
           "mean_ms": float(t.mean()), "min_ms": float(t.min())}
    if timings_ns:
        st = {k: float(np.median([d[k] for d in timings_ns])) / 1e6 for k in timings_ns[0]}
        out["stages_p50_ms"] = st
        out["find_only_p50_ms"] = float(np.median([(d["preprocess"] + d["find"]) / 1e6 for d in timings_ns]))
    return out


def warm(methods: list[Method], image: np.ndarray) -> None:
    """One untimed call of every runnable method on ``image`` (numba compilation, imports, ONNX Runtime
    arenas); ``atomap_gauss`` is left out (nothing to compile that ``atomap_com`` has not loaded, and
    seconds per call)."""
    for m in methods:
        if not m.skip and m.name != "atomap_gauss":
            m.fn(image)


def run_simulated(quick: bool, thresholds: dict, progress=None) -> dict:
    """Time and score every method on simulated frames of every size and dose.

    Returns ``{"<size>@<dose>": {method: {"time": ..., "accuracy": ... | "skipped": reason}}}`` and, per
    cell, ``"speed_ratio_vs_classical"`` (method p50 / classical p50; > 1: slower than beamloop).
    """
    from beamloop.edge.analysis.scoring import combine
    from beamloop.edge.sim.frames import mos2_frame

    plan = PLAN[bool(quick)]
    out = {}
    per_call_s: dict[tuple, float] = {}
    for dose in DOSES:
        methods = make_methods("MoS2", PIXEL_SIZE_A, thresholds[dose], skip=plan["skip"])
        warm(methods, mos2_frame((96, 96), PIXEL_SIZE_A, dose, seed=1).counts)
        for size in SIZES:
            frames = [mos2_frame((size, size), PIXEL_SIZE_A, dose, seed=SEEDS["test"] + 100 * size + k)
                      for k in range(plan["frames"][size])]
            cell = {}
            for m in methods:
                if m.skip:
                    cell[m.name] = {"skipped": m.skip}
                    continue
                prev = [(s, v) for (name, d, s), v in per_call_s.items() if name == m.name and d == dose and s < size]
                if prev:
                    s0, v0 = max(prev)
                    projected = v0 * (size / s0) ** 2
                    if projected > plan["budget_s"][size]:
                        cell[m.name] = {"skipped": f"projected {projected:.0f} s per frame (from {v0:.2f} s at "
                                                   f"{s0}x{s0}, by pixel count) exceeds the "
                                                   f"{plan['budget_s'][size]:.0f} s budget of this cell",
                                        "projected_s_per_frame": projected}
                        continue
                res = time_method(m, [f.counts for f in frames], plan["repeats"][size], plan["budget_s"][size])
                per_call_s[(m.name, dose, size)] = float(np.median(res["times_s"]))
                scores = [score(xy, cls, f) for (xy, cls), f in zip(res["outputs"], frames)]
                acc = combine(scores)
                cell[m.name] = {"time": time_figures(res["times_s"], res["timings_ns"]),
                                "accuracy": {"frames": len(scores), "recall": acc.recall, "precision": acc.precision,
                                             "rms_pm": acc.rms_pm, "f1": f1(acc), "n_true": acc.n_true,
                                             "n_found": acc.n_found}}
                if progress:
                    progress(f"{m.name} {size}x{size} @ {dose:.0e}")
            base = cell.get("beamloop_classical", {}).get("time")
            if base:
                cell["speed_ratio_vs_classical"] = {
                    k: v["time"]["p50_ms"] / base["p50_ms"]
                    for k, v in cell.items() if isinstance(v, dict) and "time" in v}
                cell["speed_ratio_vs_classical_find_only"] = {
                    k: v["time"]["p50_ms"] / base["find_only_p50_ms"] for k, v in cell.items()
                    if isinstance(v, dict) and "time" in v and k != "beamloop_classical"}
            out[f"{size}x{size}@{dose:.0e}"] = cell
    return out


def default_real_dir() -> Path:
    """``../shared/data/real`` beside the repository (where the project keeps its real images)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


REAL_SUFFIXES = (".png", ".tif", ".tiff", ".hdf5", ".hspy", ".npy")

PRIVATE_DIR = Path(__file__).resolve().parents[1] / "out" / "bench_private"
"""Where figures drawn from images that may not go into the repository are written (``out/`` is ignored by git)."""

_COPYLEFT = ("GNU GENERAL PUBLIC LICENSE", "GPL", "GNU AFFERO", "SHARE-ALIKE", "SHAREALIKE")


def may_publish(image: Path) -> bool:
    """Whether figures drawn from ``image`` may be written into the repository's results (``bench/results``).

    True only when a ``LICENSE*`` file beside the image names the image's file name and is not a copyleft
    licence (GPL, AGPL, share-alike): e.g. the AtomSegNet images (MIT) may, the atomap perovskite
    (GPL-3.0, which must never be copied into the product) may not, and neither may an image with no
    licence notice beside it."""
    image = Path(image)
    for lic in sorted(image.parent.glob("LICENSE*")):
        try:
            text = lic.read_text(errors="replace")
        except OSError:
            continue
        if image.name in text:
            up = text.upper()
            return not any(word in up for word in _COPYLEFT)
    return False


def agreement(xy: np.ndarray, ref_xy: np.ndarray, radius_px: float) -> dict:
    """How well positions ``xy`` agree with reference positions ``ref_xy`` (both (n, 2) pixels) matched
    one-to-one within ``radius_px`` (:func:`beamloop.edge.analysis.scoring.match`): ``n``, ``n_ref``, ``matched``,
    ``of_ref`` (matched / n_ref), ``of_own`` (matched / n), ``rms_px`` of the matched pairs."""
    from beamloop.edge.analysis.scoring import match

    _, _, d = match(xy, ref_xy, radius_px)
    n, nr = len(np.asarray(xy).reshape(-1, 2)), len(np.asarray(ref_xy).reshape(-1, 2))
    return {"n": n, "n_ref": nr, "matched": int(len(d)), "of_ref": len(d) / nr if nr else float("nan"),
            "of_own": len(d) / n if n else float("nan"),
            "rms_px": float(np.sqrt(np.mean(d**2))) if len(d) else float("nan")}


def run_real(quick: bool, thresholds: dict, real_dir: Path | None = None, plots_dir: Path | None = None,
             gauss_s_per_column: float | None = None) -> dict:
    """Time every method on the real images in ``real_dir`` (default :func:`default_real_dir`) and compare
    their columns with beamloop's classical ones. Images are read in place, never copied.

    The scale (lattice period, column sigma) of each image is estimated once from the image
    (:meth:`beamloop.edge.stages.find.FinderConfig.for_image`) and given to every method; peers use the thresholds
    calibrated at 1e5 e-/A^2 (relative thresholds, see :mod:`beamloop.bench.peers`). ``atomap_gauss`` is skipped
    where ``gauss_s_per_column`` (measured on simulated frames) times the columns ``atomap_com`` found
    exceeds the time budget.

    Returns ``{"dir": ..., "images": {name: {...}}}`` or ``{"skipped": reason}`` when the folder is absent.
    """
    from beamloop.edge.io.imageio import ImageReadError, read_image
    from beamloop.edge.stages.find import FinderConfig

    real_dir = Path(real_dir) if real_dir else default_real_dir()
    if not real_dir.is_dir():
        return {"skipped": f"no real images: {real_dir} does not exist"}
    files = sorted(p for p in real_dir.iterdir() if p.suffix.lower() in REAL_SUFFIXES)
    if not files:
        return {"skipped": f"no images ({', '.join(REAL_SUFFIXES)}) in {real_dir}"}
    plan = PLAN[bool(quick)]
    out = {"dir": str(real_dir), "images": {}}
    for path in files:
        try:
            img = read_image(path)
            data = np.asarray(img.frames[0], np.float32)
            cfg = FinderConfig.for_image(data)
        except (ImageReadError, ValueError, OSError) as exc:
            out["images"][path.name] = {"skipped": f"{type(exc).__name__}: {exc}"}
            continue
        methods = make_methods("generic", None, thresholds, finder_config=cfg, sigma_px=cfg.sigma_px,
                               min_distance_px=cfg.min_distance_px, skip=plan["skip"])
        warm(methods, data[:128, :128])
        row = {"shape": list(data.shape), "finder_config": {"sigma_px": cfg.sigma_px,
                                                            "min_distance_px": cfg.min_distance_px},
               "methods": {}}
        found = {}
        for m in methods:
            if m.skip:
                row["methods"][m.name] = {"skipped": m.skip}
                continue
            if m.name == "atomap_gauss" and gauss_s_per_column and "atomap_com" in found:
                projected = gauss_s_per_column * len(found["atomap_com"])
                if projected > plan["budget_s"][256]:
                    row["methods"][m.name] = {"skipped": f"projected {projected:.0f} s ({gauss_s_per_column * 1e3:.0f}"
                                                         f" ms per column on simulated frames) exceeds the "
                                                         f"{plan['budget_s'][256]:.0f} s budget"}
                    continue
            res = time_method(m, [data], plan["repeats"][256], plan["budget_s"][256])
            xy = np.asarray(res["outputs"][0][0], float).reshape(-1, 2)
            found[m.name] = xy
            row["methods"][m.name] = {"time": time_figures(res["times_s"], res["timings_ns"]), "n_found": len(xy)}
        ref = found.get("beamloop_classical")
        if ref is not None:
            r = 0.5 * cfg.min_distance_px
            row["agreement_radius_px"] = r
            for name, xy in found.items():
                if name != "beamloop_classical":
                    row["methods"][name]["agreement_with_classical"] = agreement(xy, ref, r)
            base = row["methods"]["beamloop_classical"]["time"]["p50_ms"]
            row["speed_ratio_vs_classical"] = {k: v["time"]["p50_ms"] / base for k, v in row["methods"].items()
                                               if "time" in v}
        if plots_dir is not None:
            from beamloop.bench.plots import real_overlay

            public = may_publish(path)
            dest = (Path(plots_dir) if public else PRIVATE_DIR) / f"real_{path.stem}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            fig = real_overlay(dest, data, found, f"{path.name}: columns found by each method")
            row["overlay" if public else "overlay_private"] = fig
            if not public:
                row["overlay_note"] = ("no redistributable (non-copyleft) licence beside this image: its overlay "
                                       f"stays outside the repository, in {PRIVATE_DIR}")
        out["images"][path.name] = row
    return out


TOLERANCE = {"recall": 0.001, "precision": 0.001, "rms_pm": 0.5}
"""Differences counted as equal accuracy in :func:`goal`: 0.1 % of the columns (about 5 of a 1024 x 1024
frame's 5,300, within the frame-to-frame scatter), and 0.5 pm of RMS error."""


def goal(simulated: dict, size: str = "1024x1024", dose: float = 1e5) -> dict:
    """The issue's goal: beamloop's classical finder at least 5x faster than ``plm_com`` at equal or better
    accuracy (recall, precision and RMS error), on ``size`` frames at ``dose``.

    Accuracy is "equal or better" within :data:`TOLERANCE`; the strict comparison is reported beside it.
    Returns the figures, both speed ratios (whole pipeline, and find only) and ``met`` (bool), or
    ``{"skipped": reason}`` when the cell or a method is missing."""
    cell = simulated.get(f"{size}@{dose:.0e}")
    if not cell or "time" not in cell.get("beamloop_classical", {}) or "time" not in cell.get("plm_com", {}):
        return {"skipped": f"no classical and plm_com results at {size} @ {dose:.0e}"}
    b, p = cell["beamloop_classical"], cell["plm_com"]
    ratio = p["time"]["p50_ms"] / b["time"]["p50_ms"]
    ratio_find = p["time"]["p50_ms"] / b["time"]["find_only_p50_ms"]
    ba, pa = b["accuracy"], p["accuracy"]
    strict = ba["recall"] >= pa["recall"] and ba["precision"] >= pa["precision"] and ba["rms_pm"] <= pa["rms_pm"]
    tol = (ba["recall"] >= pa["recall"] - TOLERANCE["recall"]
           and ba["precision"] >= pa["precision"] - TOLERANCE["precision"]
           and ba["rms_pm"] <= pa["rms_pm"] + TOLERANCE["rms_pm"])
    return {"size": size, "dose_e_per_A2": dose, "classical_ms": b["time"]["p50_ms"],
            "classical_find_only_ms": b["time"]["find_only_p50_ms"], "plm_com_ms": p["time"]["p50_ms"],
            "speed_ratio": ratio, "speed_ratio_find_only": ratio_find, "accuracy_classical": ba,
            "accuracy_plm_com": pa, "accuracy_equal_or_better_strict": bool(strict),
            "accuracy_equal_or_better": bool(tol), "tolerance": TOLERANCE, "met": bool(tol and ratio >= 5.0)}


def run(quick: bool = False, real_dir: Path | None = None, plots_dir: Path | None = None, progress=None) -> dict:
    """The whole atom-finding comparison: calibration, simulated frames, real images, the goal.

    Returns a dict with ``method`` (this module's description), ``calibration``, ``simulated``, ``real``,
    ``goal``, ``plan`` and ``wall_s``."""
    t0 = time.perf_counter()
    skips = {name: peers.available(name) or "" for name in peers.PEER_PACKAGES}
    thresholds = {dose: calibrate(dose, skips) for dose in DOSES}
    sim = run_simulated(quick, thresholds, progress)
    g = sim.get("256x256@1e+05", {}).get("atomap_gauss", {})
    per_col = (g["time"]["p50_ms"] / 1e3 / (g["accuracy"]["n_found"] / g["accuracy"]["frames"])
               if "time" in g and g["accuracy"]["n_found"] else None)
    real = run_real(quick, thresholds[1e5], real_dir, plots_dir, per_col)
    return {"method": __doc__.strip(), "plan": PLAN[bool(quick)], "pixel_size_A": PIXEL_SIZE_A,
            "calibration": {f"{d:.0e}": v for d, v in thresholds.items()}, "simulated": sim, "real": real,
            "goal": goal(sim), "wall_s": time.perf_counter() - t0}
