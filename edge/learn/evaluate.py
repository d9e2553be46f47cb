"""Held-out evaluation of column finders on simulated frames with ground truth (no torch).

Held-out means: other seeds than training (seeds from 100 000 on), doses fixed at 1e3 / 1e4 / 1e5 / 1e6 e-/A^2
(training draws them continuously), and besides MoS2 two structures never trained on
(:data:`beamloop.edge.learn.dataset.HELD_OUT_STRUCTURES`). MoS2 frames come from
:func:`beamloop.edge.sim.frames.mos2_frame`
(256 x 256, 0.15 A/px, the frames of the classical finder's published figures) and are scored with
:func:`beamloop.edge.analysis.scoring.score_frame` (0.5 A matching, 0.5 A edge margin). Frames of other structures are
scored on
the columns visible at their dose (:func:`beamloop.edge.learn.dataset.column_snr` >= ``SNR_VISIBLE``); found columns on
fainter ones are left out of the count, as the training loss leaves them out.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from beamloop.edge.analysis.scoring import Score, combine, match, score_frame
from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.learn.dataset import SNR_IGNORE, SNR_VISIBLE, column_snr, render_tile, sample_tile_config
from beamloop.edge.sim.frames import mos2_frame

DOSES = (1e3, 1e4, 1e5, 1e6)
"""Held-out doses, e-/Angstrom^2."""

SEED0 = 100_000
"""First seed of held-out frames (training and its validation use seeds below 20 000)."""


@dataclass
class EvalFrame:
    """A held-out frame: counts, truth (pixels, classes), and which truth rows are to be found."""

    counts: np.ndarray
    pixel_size_A: float
    truth_xy: np.ndarray
    truth_cls: np.ndarray
    class_names: tuple[str, ...]
    dose: float
    structure: str
    ignore_xy: np.ndarray


def mos2_frames(dose: float, n: int = 4, shape: tuple[int, int] = (256, 256), pixel_size_A: float = 0.15,
                seed: int = SEED0) -> list[EvalFrame]:
    """``n`` held-out MoS2 frames at ``dose`` (:func:`mos2_frame` with seeds from ``seed``)."""
    out = []
    for k in range(n):
        f = mos2_frame(shape, pixel_size_A, dose, seed + k)
        out.append(EvalFrame(f.counts, f.pixel_size_A, f.truth_xy, f.truth_cls, f.class_names, dose, "MoS2",
                             np.zeros((0, 2))))
    return out


def structure_frames(structure: str, dose: float, n: int = 2, shape: tuple[int, int] = (256, 256),
                     seed: int = SEED0 + 500) -> list[EvalFrame]:
    """``n`` held-out frames of ``structure`` (random pixel size, rotation, blur, distortion, defects) at ``dose``."""
    out = []
    rng = np.random.default_rng(seed + zlib.crc32(structure.encode()) % 1000)
    for _ in range(n):
        cfg = sample_tile_config(rng, {structure: 1.0})
        expected, cols = render_tile(cfg, shape)
        ne = dose * cfg.pixel_size_A ** 2
        counts = rng.poisson(expected.astype(np.float64) * ne).astype(np.uint16)
        snr = column_snr(cols, ne)
        real = cols[:, 2] >= 0
        vis = real & (snr >= SNR_VISIBLE)
        ign = real & (snr >= SNR_IGNORE) & ~vis
        out.append(EvalFrame(counts, cfg.pixel_size_A, cols[vis, :2].astype(float), np.zeros(int(vis.sum()), np.int8),
                             ("column", "vacancy"), dose, structure, cols[ign, :2].astype(float)))
    return out


def score(frames: list[EvalFrame], find) -> Score:
    """Pool the scores of ``find(frame) -> ColumnTable`` over ``frames``.

    Found columns within the matching radius of an ignored (too faint to ask for) column, and not of a
    target, are dropped before scoring.
    """
    scores = []
    for f in frames:
        cols = find(f)
        xy, cls = cols.xy, np.asarray(cols.cls)
        if f.class_names != cols.class_names:
            cls = np.zeros(len(cols), np.int8)  # generic scoring: every found row is a column
        if len(f.ignore_xy):
            r = 0.5 / f.pixel_size_A
            ft, _, _ = match(xy, f.truth_xy, r)
            rest = np.setdiff1d(np.arange(len(xy)), ft)
            fi, _, _ = match(xy[rest], f.ignore_xy, r)
            keep = np.ones(len(xy), bool)
            keep[rest[fi]] = False
            xy, cls = xy[keep], cls[keep]
        scores.append(score_frame(xy, cls, f.truth_xy, f.truth_cls, f.class_names, f.pixel_size_A,
                                  frame_shape=f.counts.shape))
    return combine(scores)


def summary(s: Score) -> dict:
    """Recall, precision, RMS (pm) and counts of a score, rounded for JSON."""
    return {"recall": round(s.recall, 4), "precision": round(s.precision, 4), "rms_pm": round(s.rms_pm, 2),
            "n_true": s.n_true, "n_found": s.n_found}


def held_out_sets(quick: bool = False) -> dict[str, list[EvalFrame]]:
    """The held-out sets by name: ``MoS2@1e4`` etc. and ``<structure>@1e5`` for the other structures."""
    n_mos2 = 2 if quick else 4
    sets = {f"MoS2@{d:.0e}": mos2_frames(d, n_mos2) for d in DOSES}
    from beamloop.edge.learn.dataset import HELD_OUT_STRUCTURES

    others = HELD_OUT_STRUCTURES + (() if quick else ("WS2", "SrTiO3[001]", "Si[110]", "Au[110]", "graphene"))
    for name in others:
        sets[f"{name}@1e+05"] = structure_frames(name, 1e5, 2 if quick else 3)
    for name in HELD_OUT_STRUCTURES:
        sets[f"{name}@1e+04"] = structure_frames(name, 1e4, 2 if quick else 3)
    return sets


def unet_find(finder):
    """A ``find(EvalFrame)`` for :func:`score` from a :class:`beamloop.edge.stages.unet.UNetFinder`."""
    def find(f: EvalFrame):
        return finder.find(f.counts, "MoS2" if f.structure == "MoS2" else "generic").columns
    return find


def classical_find():
    """A ``find(EvalFrame)`` for :func:`score` with the classical pipeline (MoS2 scale, or estimated)."""
    from beamloop.edge.batch_find import find_columns

    def find(f: EvalFrame):
        if f.structure == "MoS2":
            cols, _ = find_columns(f.counts, f.pixel_size_A, "MoS2")
            return cols.select(cols.cls < 3)  # vacancy sites are not found columns
        try:
            cols, _ = find_columns(f.counts, None, "generic")
        except ValueError:  # no lattice period found: nothing found
            return ColumnTable.empty()
        return cols
    return find


def evaluate(find, sets: dict[str, list[EvalFrame]]) -> dict[str, dict]:
    """:func:`summary` of :func:`score` per held-out set."""
    return {name: summary(score(frames, find)) for name, frames in sets.items()}


def cramer_rao_rms_px(expected: np.ndarray, truth_xy: np.ndarray, radius_px: int = 5) -> np.ndarray:
    """Cramer-Rao lower bound on each column's 2-D position error under Poisson noise, pixels.

    For Poisson counts of mean ``lambda`` the Fisher information on a shift along x is
    ``sum (d lambda / dx)^2 / lambda`` over the pixels that see the column (here the square of half-width
    ``radius_px`` around it, small enough to leave the neighbours out on lattices of >= 2 radius spacing);
    the bound on the RMS error is ``sqrt(1 / I_xx + 1 / I_yy)``. Amplitude and background taken as known,
    so a true lower bound (see e.g. A. J. den Dekker et al., Ultramicroscopy 104, 83 (2005) for STEM
    column positions).

    Parameters
    ----------
    expected : ndarray (rows, cols), float
        Mean counts per pixel at the dose of interest (noise-free, or a frame at a dose so high that its
        own noise is negligible, scaled to that dose).
    truth_xy : ndarray (n, 2), pixels
        Column centres (x, y).
    radius_px : int

    Returns
    -------
    ndarray (n,) float64, pixels; ``inf`` where a column sees no signal.
    """
    lam = np.maximum(np.asarray(expected, np.float64), 1e-12)
    gy, gx = np.gradient(lam)
    ix, iy = gx * gx / lam, gy * gy / lam
    rows, cols = lam.shape
    out = np.empty(len(truth_xy))
    for k, (x, y) in enumerate(np.asarray(truth_xy, float)):
        i, j = int(round(y)), int(round(x))
        sl = (slice(max(i - radius_px, 0), min(i + radius_px + 1, rows)),
              slice(max(j - radius_px, 0), min(j + radius_px + 1, cols)))
        fx, fy = ix[sl].sum(), iy[sl].sum()
        out[k] = math.sqrt(1.0 / fx + 1.0 / fy) if fx > 0 and fy > 0 else math.inf
    return out


def position_error_floor(dose: float, n: int = 2, seed: int = 200_000, floor_dose: float = 1e7) -> dict:
    """What any per-column finder can reach on held-out MoS2 frames (256 x 256, 0.15 A/px) at ``dose``.

    - ``cramer_rao_pm``: RMS over the frames' columns of :func:`cramer_rao_rms_px` (photon noise alone);
      the mean counts come from the same frames (same seeds: same lattice, defects and scan distortion)
      simulated at ``floor_dose``, scaled to ``dose``.
    - ``distortion_floor_pm``: RMS error of the classical finder on those ``floor_dose`` frames: the part of
      the error that photon noise does not explain: the truth follows the smooth drift and wobble at each
      column's centre (:func:`beamloop.edge.sim.distortion.apparent_positions`), while the column's image is also moved
      by per-line jitter and by the 50 Hz wobble changing across its lines (about 3.8 pm each on the typical
      distortion; bench/unet_diagnose.py).
    - ``bound_pm``: ``sqrt(cramer_rao_pm^2 + distortion_floor_pm^2)``.

    Returns a dict of floats, picometres.
    """
    from beamloop.edge.stages.find import ColumnFinder, FinderConfig

    crlb, floors = [], []
    for k in range(n):
        f = mos2_frame(dose_e_per_A2=floor_dose, seed=seed + k)
        sel = (f.truth_cls < 3) & _inside_margin(f)
        crlb.append(cramer_rao_rms_px(f.counts * (dose / floor_dose), f.truth_xy[sel]) * f.pixel_size_A * 100)
        cols = ColumnFinder(FinderConfig.for_pixel_size(f.pixel_size_A)).find(f.counts)
        floors.append(score_frame(cols.xy, np.zeros(len(cols), np.int8), f.truth_xy[sel],
                                  np.zeros(int(sel.sum()), np.int8), ("column",), f.pixel_size_A,
                                  frame_shape=f.counts.shape))
    c = float(np.sqrt(np.mean(np.concatenate(crlb) ** 2)))
    fl = combine(floors).rms_pm
    return {"cramer_rao_pm": c, "distortion_floor_pm": fl, "bound_pm": math.hypot(c, fl)}


def _inside_margin(f, margin_A: float = 0.5) -> np.ndarray:
    m = margin_A / f.pixel_size_A
    rows, cols = f.counts.shape
    x, y = f.truth_xy[:, 0], f.truth_xy[:, 1]
    return (x >= m - 0.5) & (x <= cols - 0.5 - m) & (y >= m - 0.5) & (y <= rows - 0.5 - m)
