"""Benchmark: atom finding on frames of a held-out simulator (abTEM) and on real images, and the OOD alarm.

1. **Held-out simulator**: frames resampled from abTEM PRISM cells with frozen phonons
   (:data:`beamloop.edge.learn.multislice_set.HELD_OUT_CELLS`: MoS2 with a periodic S vacancy, WSe2; never in
   any training set, optics outside the training list) at 0.15 Angstrom per pixel, random rotation, the
   typical scan distortion, Poisson noise at 1e4 / 1e5 / 1e6 e-/A^2 (:func:`abtem_frames`). Scored against
   the cell's column positions moved by the smooth part of the distortion within 0.5 Angstrom, leaving out
   a 4 px border and, beside it, the usual 0.5 Angstrom margin.
2. **Real images** (:data:`REAL_IMAGES`) against a reference made by atomap (M. Nord et al., Adv. Struct.
   Chem. Imaging 3, 9 (2017)): ``get_atom_positions``, centre-of-mass and 2-D Gaussian refinement, with its
   separation from the lattice (a reference, not ground truth); matched within a third of the reference's
   median nearest-neighbour distance. Images whose licence does not allow publishing (GPL: atomap's and
   temul-toolkit's test data) are
   read from the packages' files, and their overlays go to ``out/bench_private`` only
   (:func:`beamloop.bench.atomfinding.may_publish`).
3. **OOD alarm**: its score on in-distribution frames (the training simulator's held-out seeds, 1e4-1e6
   e-/A^2, MoS2 and the trained structures) against out-of-distribution frames (real images, amorphous
   support with no lattice, pure noise, frames with heavy line artefacts), as a ROC (scikit-learn); the
   alarm's calibration (on separate in-distribution seeds) is written beside the stage (classical) and
   the U-Net model (``ood.json``).

Methods: beamloop classical (defaults), beamloop U-Net (the model folder given, default the shipped one),
``plm_com`` (scikit-image ``peak_local_max`` + centre of mass, its threshold calibrated per dose on the
project's simulator, :func:`beamloop.bench.atomfinding.calibrate`: the peer gets its best shot), ``atomap``
(2-D Gaussian refinement; a few frames per cell: seconds per frame).

Writes ``bench/results/atom_finding_real.json`` and ``.md``, overlays ``bench/results/real_*_overlay.png``
(publishable images only). Run: ``python -m beamloop.bench.atomfinding_real [--quick] [--model DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beamloop.bench import atomfinding as af
from beamloop.bench import peers
from beamloop.edge.analysis.scoring import combine, score_frame
from beamloop.edge.frame.stage import FrameError

RESULTS = Path(__file__).resolve().parent / "results"
PRIVATE = Path(__file__).resolve().parents[1] / "out" / "bench_private"
SHARED_REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
DOSES = (1e4, 1e5, 1e6)
PX = 0.15
SEED = 900_000
"""Seeds of the held-out abTEM frames (distinct from every training and calibration seed)."""
OOD_CAL_SEED, OOD_TEST_SEED = 810_000, 820_000


# ------------------------------------------------------------------------------------------------------
# held-out simulator frames
# ------------------------------------------------------------------------------------------------------
@dataclass
class TruthFrame:
    """A frame with true columns: counts, positions (pixels), classes and names, pixel size."""

    counts: np.ndarray
    truth_xy: np.ndarray
    truth_cls: np.ndarray
    class_names: tuple[str, ...]
    pixel_size_A: float
    name: str


def _mos2_class(label: str) -> int:
    return {"Mo1": 0, "S2": 1, "S1": 2}.get(label, 3)


def abtem_frames(name: str, dose: float, n: int, shape: int = 256, seed: int = SEED, distortion_scale: float = 1.0,
                 noise: bool = True) -> list[TruthFrame]:
    """``n`` frames of the held-out abTEM cell ``name`` at ``dose`` e-/A^2 (see the module docstring);
    ``distortion_scale`` 0 and ``noise`` False give the same lattices without scan distortion or shot noise."""
    from beamloop.edge.learn.multislice_set import held_out_cell
    from beamloop.edge.sim.multislice import render_frame

    cell = held_out_cell(name)
    out = []
    for k in range(n):
        rng = np.random.default_rng(seed + 1000 * int(math.log10(dose)) + k + (0 if name == "MoS2" else 50))
        rf = render_frame(cell, (shape, shape), PX, rng, distortion_scale=distortion_scale)
        lam = rf.expected.astype(np.float64) * dose * PX * PX
        counts = rng.poisson(lam).astype(np.uint16) if noise else lam.astype(np.float32)
        if name == "MoS2":
            cls = np.array([_mos2_class(lb) for lb in rf.truth_label], np.int8)
            names = ("Mo", "S2", "S1", "vacancy")
        else:
            cls = np.zeros(len(rf.truth_label), np.int8)
            names = ("column", "vacancy")
        out.append(TruthFrame(counts, rf.truth_xy, cls, names, PX, f"abtem {name}"))
    return out


def _score(xy, cls, f: TruthFrame, border_px: float | None):
    xy = np.asarray(xy, float).reshape(-1, 2)
    cls = -np.ones(len(xy), int) if cls is None else np.asarray(cls)
    if f.class_names[0] != "Mo":
        cls = np.where(cls >= 0, 0, cls)
    margin = 0.5 if border_px is None else border_px * f.pixel_size_A
    return score_frame(xy, cls, f.truth_xy, f.truth_cls, f.class_names, f.pixel_size_A,
                       frame_shape=f.counts.shape, edge_margin_A=margin)


def simulated_methods(material: str, dose: float, model_dir, skip_atomap: bool) -> dict:
    """``name -> fn(counts) -> (xy, cls)`` for one material and dose (plm_com calibrated at that dose)."""
    from beamloop.edge.path import frame_path

    classical = frame_path("classical", material)
    fns = {"classical": lambda im: _cols(classical.run(im, PX, record=False))}
    try:
        from beamloop.edge.stages.unet import UNetFinder

        unet = frame_path("unet", material, unet=UNetFinder(model_dir, device="cpu"))
        fns["unet"] = lambda im: _cols(unet.run(im, PX, record=False))
    except Exception as exc:  # no model: reported as skipped
        fns["unet"] = f"skipped: {type(exc).__name__}: {exc}"
    cal = af.calibrate(dose, {"plm_com": "", "trackpy": "skip", "atomap_com": "skip"})["plm_com"]
    sc = af.scales()
    plm = af.peer_fn("plm_com", sc["sigma_px"], sc["min_distance_px"], cal["threshold"], cal["distance_fraction"])
    fns["plm_com"] = lambda im: (plm(im), None)
    if not skip_atomap and not peers.available("atomap_gauss"):
        # atomap's own calibration on the project's simulator (bench/results/atom_finding.json, per dose;
        # 1e6 takes 1e5's): its relative threshold means something else than plm_com's
        thr, frac = 0.2, 0.6
        prev = RESULTS / "atom_finding.json"
        if prev.is_file():
            c = json.loads(prev.read_text()).get("calibration", {})
            c = c.get(f"{dose:.0e}", c.get("1e+05", {})).get("atomap_com", {})
            thr, frac = c.get("threshold", thr), c.get("distance_fraction", frac)
        am = af.peer_fn("atomap_gauss", sc["sigma_px"], sc["min_distance_px"], thr, frac)
        fns["atomap"] = lambda im: (am(im), None)
    return fns


def _cols(ctx):
    return ctx.columns.xy, ctx.columns.cls


def run_simulated(quick: bool, model_dir) -> dict:
    """Recall, precision, RMS of every method on the held-out abTEM frames (module docstring, part 1)."""
    n = 2 if quick else 4
    out = {}
    for name in ("MoS2", "WSe2"):
        material = "MoS2" if name == "MoS2" else "generic"
        for dose in DOSES:
            frames = abtem_frames(name, dose, n)
            fns = simulated_methods(material, dose, model_dir, skip_atomap=quick)
            cell = {}
            for m, fn in fns.items():
                if isinstance(fn, str):
                    cell[m] = {"skipped": fn}
                    continue
                use = frames[:1] if m == "atomap" else frames
                t0 = time.perf_counter()
                res = [fn(f.counts) for f in use]
                dt = (time.perf_counter() - t0) / len(use)
                row = {"frames": len(use), "s_per_frame": round(dt, 4)}
                for key, border in (("border_4px", 4.0), ("margin_0.5A", None)):
                    s = combine([_score(xy, cls, f, border) for (xy, cls), f in zip(res, use)])
                    row[key] = {"recall": s.recall, "precision": s.precision, "rms_pm": s.rms_pm, "n_true": s.n_true,
                                "n_found": s.n_found}
                cell[m] = row
            out[f"{name}@{dose:.0e}"] = cell
            print(f"abtem {name} {dose:.0e}: " + ", ".join(
                "{} {recall:.3f}/{precision:.3f}/{rms_pm:.1f}".format(m, **v["border_4px"])
                for m, v in cell.items() if "border_4px" in v), flush=True)
    return out


def run_floor(model_dir) -> dict:
    """Where the position error at 1e4 e-/A^2 comes from: RMS (4 px border) of classical and U-Net on the
    held-out abTEM MoS2 frames as they are, without scan distortion, and without distortion or shot noise."""
    out = {}
    fns = simulated_methods("MoS2", 1e4, model_dir, skip_atomap=True)
    for label, kw in (("as_is", {}), ("no_distortion", {"distortion_scale": 0.0}),
                      ("no_distortion_no_noise", {"distortion_scale": 0.0, "noise": False})):
        frames = abtem_frames("MoS2", 1e4, 3, **kw)
        row = {}
        for m in ("classical", "unet"):
            fn = fns[m]
            if isinstance(fn, str):
                continue
            sc = combine([_score(*fn(f.counts), f, 4.0) for f in frames])
            row[m] = {"recall": sc.recall, "precision": sc.precision, "rms_pm": sc.rms_pm}
        out[label] = row
        print(f"floor {label}: " + ", ".join(f"{m} {v['rms_pm']:.1f} pm" for m, v in row.items()), flush=True)
    return out


# ------------------------------------------------------------------------------------------------------
# real images
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealImage:
    """A real image: where it comes from, its licence, how to read it, and what is known of its scale."""

    name: str
    source: str
    licence: str
    publish: bool
    pixel_size_A: float | None
    crop: tuple[slice, slice] | None
    note: str
    ref_separation_px: float
    """atomap's ``separation`` for the reference: about 0.6 of the nearest column distance, from the known
    lattice (Si [110] dumbbell 1.36 A at ~0.098 A/px; MoS2 Mo-S 1.82 A at 0.127 A/px) or, where the pixel size
    is unknown, measured by hand on the image."""
    ref_threshold: float = 0.05
    """atomap's ``threshold_rel`` for the reference (of the image's range above its minimum)."""


def _temul_file(name: str) -> Path | None:
    """A file of temul-toolkit's example data (GPL-3.0): the installed package, else ``out/real``."""
    try:
        import temul  # noqa: F401

        p = Path(temul.__file__).parent / "example_data" / "experimental" / name
        if p.is_file():
            return p
    except ImportError:
        pass
    p = Path(__file__).resolve().parents[1] / "out" / "real" / name
    return p if p.is_file() else None


REAL_IMAGES = (
    RealImage("si110_haadf_atomsegnet.png", "xinhuolin/AtomSegNet test_img (shared/data/real)", "MIT", True, None,
              None, "Si [110] dumbbells, 8-bit, contrast-stretched", 8.5),
    RealImage("au_grain_boundary_atomsegnet.png", "xinhuolin/AtomSegNet test_img (shared/data/real)", "MIT", True,
              None, None, "Au grain boundary, 8-bit", 11.0),
    RealImage("perovskite_adf_atomap.hdf5", "atomap tests/datasets/test_ADF_cropped.hdf5", "GPL-3.0", False, None,
              None, "perovskite ADF, float", 12.0),
    RealImage("example_Au_nanoparticle.emd", "temul-toolkit example_data/experimental", "GPL-3.0", False, None,
              (slice(600, 1100), slice(1250, 1750)),
              "Au nanoparticle, raw 16-bit counts 15,000-19,000 with a strong envelope; 500 x 500 crop around the "
              "particle with visible columns; pixel size withheld", 16.0, 0.4),
    RealImage("example_Se_implanted_MoS2.dm3", "temul-toolkit example_data/experimental", "GPL-3.0", False, 0.1270,
              (slice(0, 512), slice(0, 512)), "Se-implanted MoS2, 32-bit counts with an offset of ~3e6; 512 x 512 crop",
              8.6, 0.02),
)
"""The real images of part 2."""


def read_real(img: RealImage) -> np.ndarray | None:
    """The image's data (cropped), or None when its file is not available here."""
    if img.name.endswith(".emd") or img.name.endswith(".dm3"):
        p = _temul_file(img.name)
        if p is None:
            return None
        if img.name.endswith(".emd"):
            from rsciio.emd import file_reader
        else:
            from rsciio.digitalmicrograph import file_reader
        data = np.asarray(file_reader(str(p))[0]["data"])
    else:
        from beamloop.edge.io.imageio import read_image

        p = SHARED_REAL / img.name
        if not p.is_file():
            return None
        data = np.asarray(read_image(p).frames[0])
    if img.crop is not None:
        data = np.ascontiguousarray(data[img.crop])
    return data


def atomap_reference(data: np.ndarray, separation_px: float, threshold: float = 0.05) -> np.ndarray:
    """atomap positions (on the image minus its minimum, so that the relative threshold means a fraction of
    the image's range) refined by centre of mass and 2-D Gaussians (the reference of part 2)."""
    d = np.asarray(data, np.float32)
    return peers.atomap_find(d - d.min(), separation_px, threshold, "gauss")


def run_real(model_dir, plots: bool, only: tuple[str, ...] = ()) -> dict:
    """Every method against the atomap reference on each real image (module docstring, part 2)."""
    from beamloop.bench.plots import real_overlay
    from beamloop.edge.analysis.spacing import estimate_scale
    from beamloop.edge.batch_find import find_columns
    from beamloop.edge.path import frame_path
    from beamloop.edge.stages.find import FinderConfig
    from beamloop.edge.stages.unet import UNetFinder

    out = {}
    unet = None
    try:
        unet = frame_path("unet", "generic", unet=UNetFinder(model_dir, device="cpu"))
    except Exception as exc:
        out["unet_skipped"] = f"{type(exc).__name__}: {exc}"
    for img in REAL_IMAGES:
        if only and not any(o in img.name for o in only):
            continue
        data = read_real(img)
        if data is None:
            out[img.name] = {"skipped": "file not available here"}
            continue
        row = {"source": img.source, "licence": img.licence, "shape": list(data.shape), "dtype": str(data.dtype),
               "range": [float(data.min()), float(data.max())], "pixel_size_A": img.pixel_size_A, "note": img.note}
        t0 = time.perf_counter()
        est = estimate_scale(data)
        row["scale"] = {"period_px": est.period_px, "column_sigma_px": est.column_sigma_px,
                        "confidence": est.confidence, "fourier_spacing_px": est.fourier_spacing_px,
                        "seconds": round(time.perf_counter() - t0, 3)}
        cfg = FinderConfig.for_lattice(est.period_px, est.column_sigma_px)
        found = {}
        t0 = time.perf_counter()
        cols, ctx = find_columns(data, img.pixel_size_A if img.name.endswith(".dm3") else None,
                                 "MoS2" if img.name.endswith(".dm3") else "generic")
        row["classical_s"] = round(time.perf_counter() - t0, 3)
        row["classical_ood"] = _ood_row(ctx)
        found["classical"] = cols.xy
        row["near_edge"] = int(cols.near_edge.sum())
        if unet is not None:
            t0 = time.perf_counter()
            c2, ctx2 = find_columns(data, None, "generic", path=unet)
            row["unet_s"] = round(time.perf_counter() - t0, 3)
            row["unet_ood"] = _ood_row(ctx2)
            found["unet"] = c2.xy
        found["plm_com"] = peers.plm_com(data, cfg.sigma_px, cfg.min_distance_px, 0.15)
        t0 = time.perf_counter()
        ref = atomap_reference(data, img.ref_separation_px, img.ref_threshold)
        row["atomap_s"] = round(time.perf_counter() - t0, 2)
        found["atomap (reference)"] = ref
        from scipy.spatial import cKDTree

        # a third of the reference's own median nearest-neighbour distance (dumbbell partners stay apart)
        r = float(np.median(cKDTree(ref).query(ref, k=2)[0][:, 1])) / 3.0 if len(ref) > 2 else 0.25 * est.period_px
        row["match_radius_px"] = r
        row["methods"] = {k: af.agreement(v, ref, r) for k, v in found.items() if not k.startswith("atomap")}
        for v in row["methods"].values():
            v["recall"], v["precision"] = v.pop("of_ref"), v.pop("of_own")
        if plots:
            dest = (RESULTS if img.publish else PRIVATE) / f"real_{Path(img.name).stem}_overlay.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            real_overlay(dest, data, found, f"{img.name}: columns by method; atomap 2-D Gaussian fit = reference")
            row["overlay"] = str(dest.relative_to(dest.parents[1])) if img.publish else str(dest)
        out[img.name] = row
        print(f"real {img.name}: period {est.period_px:.1f} px, " + ", ".join(
            f"{k} {v['recall']:.3f}/{v['precision']:.3f}" for k, v in row["methods"].items()), flush=True)
    return out


def _ood_row(ctx) -> dict:
    o = ctx.extras.get("ood", {})
    return {"score": o.get("score"), "alarm": o.get("alarm"), "threshold": o.get("threshold")}


# ------------------------------------------------------------------------------------------------------
# OOD alarm
# ------------------------------------------------------------------------------------------------------
def in_distribution_frames(seed: int, n: int) -> list[tuple[np.ndarray, float | None, str]]:
    """``(counts, pixel size, material)`` frames of the training distribution: MoS2 (own simulator) at 1e4-1e6
    e-/A^2 and, for the generic group, trained structures (:func:`beamloop.edge.learn.evaluate.structure_frames`)."""
    from beamloop.edge.learn.evaluate import structure_frames
    from beamloop.edge.sim.frames import mos2_frame

    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        dose = float(10 ** rng.uniform(4, 6))
        out.append((mos2_frame((256, 256), PX, dose, seed + k).counts, PX, "MoS2"))
    for k, name in enumerate(("WS2", "SrTiO3[001]", "Si[110]", "Au[110]", "graphene", "MoSe2") * max(n // 6, 1)):
        dose = float(10 ** rng.uniform(4, 6))
        f = structure_frames(name, dose, 1, seed=seed + 100 + k)[0]
        out.append((f.counts, None, "generic"))
    return out


def out_of_distribution_frames(seed: int) -> list[tuple[np.ndarray, float | None, str, str]]:
    """``(counts, pixel size, material, kind)``: real-image crops, amorphous support, pure noise, line artefacts."""
    from scipy.ndimage import gaussian_filter

    from beamloop.edge.sim.frames import mos2_frame

    rng = np.random.default_rng(seed)
    out = []
    for img in REAL_IMAGES:
        data = read_real(img)
        if data is None:
            continue
        for (a, b) in ((0, 0), (1, 1)):
            c = data[a * (data.shape[0] - 256):a * (data.shape[0] - 256) + 256,
                     b * (data.shape[1] - 256):b * (data.shape[1] - 256) + 256]
            if c.shape == (256, 256):
                out.append((np.ascontiguousarray(c), None, "generic", f"real {img.name}"))
    for k in range(6):
        field = gaussian_filter(rng.normal(size=(256, 256)), rng.uniform(1.5, 4))
        lam = 20 * (1 + 0.5 * field / field.std())
        out.append((rng.poisson(np.maximum(lam, 0)).astype(np.uint16), PX, "MoS2", "amorphous support"))
        out.append((rng.poisson(rng.uniform(0.5, 50), (256, 256)).astype(np.uint16), PX, "MoS2", "pure noise"))
        f = mos2_frame((256, 256), PX, 1e5, seed + 50 + k).counts.astype(np.float64)
        rows = rng.choice(256, 60, replace=False)
        f[rows] = f[rows] * rng.uniform(0, 3, (60, 1)) + rng.uniform(0, 40, (60, 1))
        out.append((np.clip(f, 0, 65535).astype(np.uint16), PX, "MoS2", "line artefacts"))
    return out


def _features(path, counts, px) -> dict:
    from beamloop.edge.frame.context import FrameMeta

    meta = FrameMeta.of(counts, px, path.material)
    path.prepare(meta, counts)
    ctx = path.run(counts, meta=meta, record=False)
    return dict(ctx.extras["ood"]["features"]), ctx


def run_ood(model_dir, write_calibration: bool, quick: bool) -> dict:
    """Calibrate the alarm on in-distribution frames, then its ROC on held-out in- vs out-of-distribution frames."""
    from sklearn.metrics import roc_auc_score

    from beamloop.edge.path import frame_path
    from beamloop.edge.stages import ood as ood_mod
    from beamloop.edge.stages.unet import UNetFinder

    n = 6 if quick else 30
    methods = {"classical": lambda m: frame_path("classical", m, ood=True)}
    try:
        finder = UNetFinder(model_dir, device="cpu")
        methods["unet"] = lambda m: frame_path("unet", m, unet=finder)
    except Exception as exc:
        finder = None
        print(f"ood: no U-Net ({exc})")
    cal_frames = in_distribution_frames(OOD_CAL_SEED, n)
    test_in = in_distribution_frames(OOD_TEST_SEED, n)
    test_out = out_of_distribution_frames(OOD_TEST_SEED + 5000)
    report = {}
    for name, make in methods.items():
        paths = {m: make(m) for m in ("MoS2", "generic")}
        rows: dict = {"MoS2": [], "generic": []}
        rejected = 0
        for counts, px, m in cal_frames:
            try:
                rows[m].append(_features(paths[m], counts, px)[0])
            except FrameError:
                rejected += 1
        cal = {g: ood_mod.calibrate(r) for g, r in rows.items() if r}
        for p in paths.values():
            st = [s for s in p.stages if s.name == "ood"][0]
            st.calibration = cal
        scores_in = [_ood_score(paths[m], c, px) for c, px, m in test_in]
        scores_out = [(_ood_score(paths[m], c, px), kind) for c, px, m, kind in test_out]
        y = [0] * len(scores_in) + [1] * len(scores_out)
        s = [v[0] for v in scores_in] + [v[0][0] for v in scores_out]
        s = [min(v, 1e9) for v in s]  # rejected frames (infinite score) rank above every other
        auc = float(roc_auc_score(y, s))
        corrupt = [k for k, (_, kind) in enumerate(scores_out) if not kind.startswith("real")]
        y2 = [0] * len(scores_in) + [1] * len(corrupt)
        s2 = [min(v[0], 1e9) for v in scores_in] + [min(scores_out[k][0][0], 1e9) for k in corrupt]
        auc_corrupt = float(roc_auc_score(y2, s2))
        alarm_in = float(np.mean([v[1] for v in scores_in]))
        kinds = {}
        for (_, al), kind in scores_out:
            kinds.setdefault(kind, []).append(al)
        report[name] = {"auc": auc, "auc_no_lattice_or_corrupt": auc_corrupt,
                        "false_alarm_rate_in_distribution": alarm_in,
                        "calibration_frames_rejected": rejected,
                        "alarm_rate_by_kind": {k: float(np.mean(v)) for k, v in kinds.items()},
                        "n_in": len(scores_in), "n_out": len(scores_out), "calibration": cal}
        # the held-out simulator: valid frames of a shifted distribution
        ab = []
        for dose in DOSES:
            for f in abtem_frames("MoS2", dose, 1, seed=SEED + 77):
                ab.append(_ood_score(paths["MoS2"], f.counts, PX)[1])
        report[name]["alarm_rate_abtem_mos2"] = float(np.mean(ab))
        print(f"ood {name}: AUC {auc:.3f} (no lattice / corrupt only {auc_corrupt:.3f}), false alarms "
              f"{alarm_in:.3f}, by kind {report[name]['alarm_rate_by_kind']}",
              flush=True)
        if write_calibration:
            if name == "classical":
                ood_mod._CAL_FILE.write_text(json.dumps(cal, indent=1))
            elif finder is not None:
                (Path(finder.model_dir) / "ood.json").write_text(json.dumps(cal, indent=1))
    return report


def _ood_score(path, counts, px) -> tuple[float, bool]:
    """The frame's OOD score and alarm; a frame the path rejects (no estimable scale) scores infinity."""
    try:
        _, ctx = _features(path, counts, px)
    except FrameError:
        return math.inf, True
    o = ctx.extras["ood"]
    return float(o["score"]), bool(o["alarm"])


# ------------------------------------------------------------------------------------------------------
def stage_costs() -> dict:
    """Median cost (microseconds) of the background and ood stages and the whole classical path at 256^2 and
    1024^2, with the background stage off and on."""
    from beamloop.edge.path import frame_path
    from beamloop.edge.sim.frames import mos2_frame

    out = {}
    for n in (256, 1024):
        frames = [mos2_frame((n, n), PX, 1e5, seed=5 + k).counts for k in range(3)]
        for mode in ("auto", "on"):
            p = frame_path("classical", "MoS2", background=mode)
            for f in frames:
                p.run(f, PX, record=False)
            t: dict = {}
            for r in range(40 if n == 256 else 8):
                ctx = p.run(frames[r % 3], PX, record=False)
                for k, v in ctx.timings_ns.items():
                    t.setdefault(k, []).append(v / 1e3)
            out[f"{n}x{n} background={mode}"] = {k: round(float(np.median(v)), 1) for k, v in t.items()}
    return out


def markdown(res: dict) -> str:
    """The report's tables."""
    lines = ["# Atom finding on a held-out simulator and on real images", "",
             "Generated by `python -m beamloop.bench.atomfinding_real` (bench/atomfinding_real.py); numbers in "
             "atom_finding_real.json.", "",
             "## Held-out simulator: abTEM PRISM + frozen phonons (recall / precision / RMS pm)", "",
             "4 px border left out; in brackets the usual 0.5 A edge margin.", "",
             "| frames | method | recall | precision | RMS pm | (0.5 A margin: recall / precision) | s/frame |",
             "|---|---|---|---|---|---|---|"]
    for key, cell in res.get("simulated", {}).items():
        for m, v in cell.items():
            if "skipped" in v:
                lines.append(f"| {key} | {m} | skipped: {v['skipped'][:60]} | | | | |")
                continue
            a, b = v["border_4px"], v["margin_0.5A"]
            lines.append(f"| {key} | {m} | {a['recall']:.4f} | {a['precision']:.4f} | {a['rms_pm']:.1f} | "
                         f"{b['recall']:.4f} / {b['precision']:.4f} | {v['s_per_frame']:.3f} |")
    lines += ["", "## Real images against an atomap 2-D Gaussian fit (reference, not ground truth)", "",
              "| image | licence | pixel size | period px (conf.) | method | recall | precision | RMS px |",
              "|---|---|---|---|---|---|---|---|"]
    for name, row in res.get("real", {}).items():
        if not isinstance(row, dict) or "methods" not in row:
            continue
        sc = row["scale"]
        for m, v in row["methods"].items():
            lines.append(f"| {name} | {row['licence']} | {row['pixel_size_A'] or 'none given'} | "
                         f"{sc['period_px']:.1f} ({sc['confidence']:.2f}) | {m} | {v['recall']:.3f} | "
                         f"{v['precision']:.3f} | {v['rms_px']:.2f} |")
    lines += ["", "## OOD alarm", "", "In distribution: the training simulator's held-out seeds (MoS2 and trained "
              "structures, 1e4-1e6 e-/A^2). Out: 256 x 256 crops of the real images, amorphous support without a "
              "lattice, pure noise, frames with heavy line artefacts.", "",
              "| finder | ROC AUC, all out | ROC AUC, no lattice / corrupt | false alarms in-dist. "
              "| alarm rate by kind "
              "| alarm rate, abTEM MoS2 |", "|---|---|---|---|---|---|"]
    for m, v in res.get("ood", {}).items():
        kinds = ", ".join(f"{k}: {a:.2f}" for k, a in v["alarm_rate_by_kind"].items())
        lines.append(f"| {m} | {v['auc']:.3f} | {v.get('auc_no_lattice_or_corrupt', float('nan')):.3f} | "
                     f"{v['false_alarm_rate_in_distribution']:.3f} | {kinds} | {v['alarm_rate_abtem_mos2']:.2f} |")
    if "position_floor_1e4" in res:
        lines += ["", "## Position error at 1e4 e-/A^2: where it comes from (abTEM MoS2, 4 px border, RMS pm)", "",
                  "| frames | classical | U-Net |", "|---|---|---|"]
        for k, v in res["position_floor_1e4"].items():
            lines.append(f"| {k.replace('_', ' ')} | {v.get('classical', {}).get('rms_pm', float('nan')):.1f} | "
                         f"{v.get('unet', {}).get('rms_pm', float('nan')):.1f} |")
    if "stage_costs_us" in res:
        lines += ["", "## Stage costs (median microseconds, classical path, MoS2 1e5)", ""]
        for k, v in res["stage_costs_us"].items():
            lines.append(f"- {k}: " + ", ".join(f"{a} {b:.0f}" for a, b in v.items()))
    if res.get("notes"):
        lines += ["", "## Goals and notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the parts asked for and write the JSON and the Markdown report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None, help="U-Net model folder (default: the shipped one)")
    p.add_argument("--parts", default="simulated,real,ood,floor,costs")
    p.add_argument("--images", default="", help="comma-separated parts of real-image names (default: all)")
    p.add_argument("--write-ood-calibration", action="store_true",
                   help="write the alarm's calibration beside the ood stage and into the model folder")
    p.add_argument("--out", default=str(RESULTS / "atom_finding_real.json"))
    a = p.parse_args(argv)
    parts = a.parts.split(",")
    res: dict = {"method": __doc__.strip(), "date": time.strftime("%Y-%m-%d")}
    outp = Path(a.out)
    if outp.is_file():
        res.update({k: v for k, v in json.loads(outp.read_text()).items() if k not in ("method", "date")})
    t0 = time.perf_counter()
    if "ood" in parts:
        res["ood"] = run_ood(a.model, a.write_ood_calibration, a.quick)
    if "simulated" in parts:
        res["simulated"] = run_simulated(a.quick, a.model)
    if "real" in parts:
        real = run_real(a.model, plots=True, only=tuple(x for x in a.images.split(",") if x))
        res["real"] = {**res.get("real", {}), **real} if a.images else real
    if "floor" in parts:
        res["position_floor_1e4"] = run_floor(a.model)
    if "costs" in parts:
        res["stage_costs_us"] = stage_costs()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    outp.write_text(json.dumps(res, indent=1, default=float))
    outp.with_suffix(".md").write_text(markdown(res))
    print(f"wrote {outp} and {outp.with_suffix('.md')}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
