"""The out-of-distribution stage: is this frame like the frames the finder was made and checked on?

Per frame a few statistics are computed from what the finder wrote (:func:`frame_features`):

``nn_cv``
    Spread of the found columns' nearest-neighbour distances (median absolute deviation over the median):
    a lattice gives a narrow distribution; noise, amorphous material or a finder that splits or merges
    columns a wide one.
``density``
    Columns per square of the median nearest-neighbour distance, against the lattice's expectation (the
    material's, from the calibration frames): too few or too many columns for the lattice the frame shows.
``weak_fraction``
    Share of columns within a factor 1.5 of the frame's detection threshold (classical) or with a heat
    below 0.6 (U-Net): columns the finder could barely call.
``spread`` (U-Net)
    Median per-column uncertainty of the ensemble (members that disagree; B. Lakshminarayanan, A. Pritzel
    & C. Blundell, "Simple and scalable predictive uncertainty estimation using deep ensembles", NeurIPS 2017).
``heat_std`` (U-Net)
    Mean per-pixel ensemble standard deviation of the heat map.

Each statistic is turned into a z-score against its median and median absolute deviation on
in-distribution frames (:func:`calibrate`: the training simulator's held-out seeds over the trained dose
range), one-sided (larger is worse) except ``density`` (both sides). The frame's score is the largest
z-score; the alarm fires above the calibration frames' 99th percentile of that score. The stage writes
``extras["ood"]`` (score, alarm, features) and ``extras["column_uncertainty"]`` (per row of ``columns``:
the U-Net's per-column uncertainty, or, classical, the frame's threshold over the column's score), which the
policy stage reads to leave uncertain columns and alarmed frames untargeted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from beamloop.edge.frame.stage import StageBase
from beamloop.edge.kernels.peaks import nn_distance_stats

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta

FEATURES = {"classical": ("nn_cv", "density", "weak_fraction"),
            "unet": ("nn_cv", "density", "weak_fraction", "spread", "heat_std")}
"""Statistics used per finder."""

TWO_SIDED = ("density",)

MAD_FLOOR = {"nn_cv": 0.005, "density": 0.01, "weak_fraction": 0.02, "spread": 0.01, "heat_std": 0.002}
"""Smallest spread of each statistic used for its z-score (a share of 2 % of the columns, half a percent of
the spacing): calibration frames that agree better than this would otherwise make any change an alarm."""

CLASSICAL_CALIBRATION: dict = {}
"""Calibration of the classical finder's statistics (:func:`calibrate` on in-distribution frames), by material
group (``"MoS2"``, ``"generic"``): per feature ``median`` and ``mad``, and the alarm ``threshold``. Filled from
``edge/models/unet/ood_classical.json`` (package data beside the U-Net's own ``ood.json``; written by
``python -m beamloop.bench.atomfinding_real --parts ood --write-ood-calibration``)."""

_CAL_FILE = Path(__file__).resolve().parents[1] / "models" / "unet" / "ood_classical.json"


def _load_classical() -> dict:
    if not CLASSICAL_CALIBRATION and _CAL_FILE.is_file():
        CLASSICAL_CALIBRATION.update(json.loads(_CAL_FILE.read_text()))
    return CLASSICAL_CALIBRATION


def frame_features(ctx: FrameContext, method: str) -> dict[str, float]:
    """The statistics of the module docstring for the frame in ``ctx`` (NaN where undefined)."""
    cols = ctx.columns
    names = cols.class_names
    real = np.ones(len(cols), bool)
    if "vacancy" in names:
        real &= cols.cls != names.index("vacancy")
    inner = real & ~np.asarray(cols.near_edge, bool)
    out = {k: math.nan for k in FEATURES[method]}
    rows, cc = ctx.image.shape
    if inner.sum() >= 8:
        n = len(cols)
        _, med, mad = nn_distance_stats(cols.x, cols.y, inner, rows, cc, np.empty(n + 1, np.int64),
                                        np.empty(n, np.int64), np.empty(n, np.float64))
        ok = math.isfinite(med)
        out["nn_cv"] = float(mad / max(med, 1e-9)) if ok else 1.0
        out["density"] = float(np.count_nonzero(real) * med * med / (rows * cc)) if ok else 0.0
    else:
        out["nn_cv"] = 1.0
        out["density"] = 0.0
    if method == "classical":
        t = float(ctx.extras.get("threshold_snr", math.nan))
        sc = cols.score[real]
        ok = bool(len(sc)) and math.isfinite(t)
        out["weak_fraction"] = float(np.count_nonzero(sc < 1.5 * t)) / len(sc) if ok else 1.0
    else:
        seg = ctx.extras.get("segment")
        if seg is not None and len(seg.columns):
            out["weak_fraction"] = float(np.mean(seg.columns.score < 0.6))
            out["spread"] = float(np.median(seg.uncertainty))
            out["heat_std"] = float(np.mean(seg.heat_map_std))
        else:
            out.update(weak_fraction=1.0, spread=1.0, heat_std=1.0)
    return out


def ood_score(features: dict[str, float], cal: dict) -> tuple[float, dict[str, float]]:
    """Largest z-score of ``features`` against calibration ``cal`` (``{feature: {"median", "mad"}}``) and
    the z-scores themselves; NaN features count as 0."""
    z = {}
    for k, v in features.items():
        c = cal.get(k)
        if c is None or not math.isfinite(v):
            z[k] = 0.0
            continue
        s = (v - c["median"]) / max(1.4826 * c["mad"], 1e-6)
        z[k] = abs(s) if k in TWO_SIDED else max(s, 0.0)
    return (max(z.values()) if z else 0.0), z


def calibrate(feature_rows: list[dict[str, float]], quantile: float = 0.99) -> dict:
    """Calibration from the statistics of in-distribution frames: per feature ``median`` and ``mad``, and the
    alarm ``threshold`` at ``quantile`` of the frames' own scores; ``n_frames`` beside them."""
    cal: dict = {"n_frames": len(feature_rows)}
    keys = feature_rows[0].keys() if feature_rows else ()
    for k in keys:
        v = np.array([r[k] for r in feature_rows], float)
        v = v[np.isfinite(v)]
        if len(v):
            med = float(np.median(v))
            mad = max(float(np.median(np.abs(v - med))), 0.01 * abs(med), MAD_FLOOR.get(k, 1e-3))
            cal[k] = {"median": med, "mad": mad}
    scores = [ood_score(r, cal)[0] for r in feature_rows]
    cal["threshold"] = float(np.quantile(scores, quantile)) if scores else math.inf
    return cal


class OODAlarm(StageBase):
    """Frame stage ``ood``: writes ``extras["ood"]`` and ``extras["column_uncertainty"]`` (module docstring).

    Parameters
    ----------
    method : {"classical", "unet"}
        Which finder's statistics and calibration.
    model_dir : path, optional
        The U-Net's model folder (its ``ood.json`` holds the calibration).
    calibration : dict, optional
        A calibration to use instead (``{group: calibrate(...)}``); without one for the series' material
        the stage reports the features and never alarms.
    """

    name = "ood"
    reads = ("columns", "extras")
    writes = ("extras",)

    def __init__(self, method: str = "classical", model_dir: str | Path | None = None,
                 calibration: dict | None = None) -> None:
        if method not in FEATURES:
            raise ValueError(f"method must be one of {tuple(FEATURES)}, got {method!r}")
        self.method = method
        if calibration is None:
            if method == "classical":
                calibration = _load_classical()
            else:
                p = Path(model_dir) / "ood.json" if model_dir else None
                calibration = json.loads(p.read_text()) if p is not None and p.is_file() else {}
        self.calibration = calibration
        self._cal: dict = {}

    def prepare(self, meta: FrameMeta) -> None:
        """Pick the calibration of the series' material group."""
        group = "MoS2" if meta.material.name == "MoS2" else "generic"
        self._cal = self.calibration.get(group, {})

    def process(self, ctx: FrameContext) -> None:
        """Features, score and alarm of this frame; per-column uncertainty."""
        f = frame_features(ctx, self.method)
        score, z = ood_score(f, self._cal) if self._cal else (math.nan, {})
        thr = float(self._cal.get("threshold", math.inf)) if self._cal else math.inf
        ctx.extras["ood"] = {"score": score, "alarm": bool(math.isfinite(score) and score > thr),
                             "threshold": thr, "features": f, "z": z}
        cols = ctx.columns
        unc = np.full(len(cols), np.nan, np.float32)
        if self.method == "classical":
            t = float(ctx.extras.get("threshold_snr", math.nan))
            unc[:] = t / np.maximum(cols.score, 1e-6)
        else:
            seg = ctx.extras.get("segment")
            if seg is not None:
                m = min(len(seg.uncertainty), len(cols))
                unc[:m] = seg.uncertainty[:m]
        if "vacancy" in cols.class_names:
            unc[cols.cls == cols.class_names.index("vacancy")] = np.nan
        ctx.extras["column_uncertainty"] = unc
