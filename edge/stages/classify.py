"""Classifying found columns: Mo / S2 / S1 / vacancy site for MoS2, a generic "column" otherwise.

MoS2 (viewed along [001]) by intensity: the HAADF signal of a column grows with its atoms' Z to a power
of about 1.78 (Mo/S peak ratio 5.6 in the abTEM profiles; cf. Krivanek et al., Nature 464, 571 (2010)),
so Mo : S2 : S1 heights stand near 2.8 : 2 : 1 after smoothing. The brightest mode of the
log-height histogram is Mo, split from the S columns by Otsu's threshold; among the S columns, those
below the S2 median divided by sqrt(2) (the geometric midpoint between S2 and S1 = S2/2) are S1.

Vacancy sites (S di-vacancies and Mo vacancies: no atom left to find) are inferred from the lattice: the
three Mo-S bond vectors are estimated from the found columns, every found Mo predicts three S sites and
every found S column three Mo sites, and a predicted site that lies inside the frame, has no found column
near it and is predicted by at least ``min_support`` neighbours becomes a ``vacancy`` row.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.kernels.neighbours import GridIndex

MOS2_CLASSES = ("Mo", "S2", "S1", "vacancy")
GENERIC_CLASSES = ("column",)


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of 1-D ``values`` (maximises the between-class variance of a two-class split).

    N. Otsu, "A threshold selection method from gray-level histograms", IEEE Trans. SMC 9, 62 (1979).
    Raises ``ValueError`` for fewer than two values.
    """
    v = np.asarray(values, float)
    if v.size < 2:
        raise ValueError("Otsu's threshold needs at least two values")
    hist, edges = np.histogram(v, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    return float(centres[int(np.argmax(between))] + 0.5 * (edges[1] - edges[0]))


def bond_vectors(metal_xy: np.ndarray, chalcogen_xy: np.ndarray, spacing_px: float) -> np.ndarray | None:
    """The three metal-to-chalcogen bond vectors of a projected honeycomb, from found columns.

    Parameters
    ----------
    metal_xy, chalcogen_xy : ndarray (n, 2), pixels
    spacing_px : float
        Expected nearest-neighbour distance, pixels.

    Returns
    -------
    ndarray, shape (3, 2), or None when fewer than 3 bonds were found.

    Notes
    -----
    Bond directions are 120 degrees apart, so three times their angle is the same for all three; the
    circular mean of ``3 * angle`` gives the orientation and the median bond length the size.
    """
    if len(metal_xy) == 0 or len(chalcogen_xy) == 0:
        return None
    r = 1.3 * spacing_px
    mi, ci = GridIndex(chalcogen_xy, r).pairs_within(metal_xy, r)
    if len(mi) < 3:
        return None
    vec = chalcogen_xy[ci] - metal_xy[mi]
    ang = np.arctan2(vec[:, 1], vec[:, 0])
    phi = math.atan2(np.sin(3 * ang).mean(), np.cos(3 * ang).mean()) / 3
    length = float(np.median(np.hypot(vec[:, 0], vec[:, 1])))
    a = phi + np.arange(3) * 2 * math.pi / 3
    return np.stack([length * np.cos(a), length * np.sin(a)], axis=1)


class GenericClassifier:
    """Labels every found column ``column`` (for materials without an intensity model)."""

    class_names = GENERIC_CLASSES

    def classify(self, cols: ColumnTable, smooth: np.ndarray | None = None) -> ColumnTable:
        """Return ``cols`` with ``cls = 0`` and ``class_names = ("column",)``."""
        out = cols.select(slice(None))
        out.cls = np.zeros(len(cols), np.int8)
        out.class_names = GENERIC_CLASSES
        return out


class MoS2Classifier:
    """Classifies MoS2 columns by intensity and infers vacancy sites from the lattice.

    Parameters
    ----------
    spacing_px : float
        Projected Mo-S distance in pixels (1.82 Angstrom / pixel size).
    min_support : int
        Found neighbours that must predict a site before it is called a vacancy (1 to 3).
    match_tolerance : float
        A predicted site within this fraction of ``spacing_px`` of a found column is occupied.
    """

    class_names = MOS2_CLASSES

    def __init__(self, spacing_px: float, min_support: int = 2, match_tolerance: float = 0.4) -> None:
        if not (spacing_px > 0 and 1 <= min_support <= 3):
            raise ValueError(f"need spacing_px > 0 and 1 <= min_support <= 3, got {spacing_px}, {min_support}")
        self.spacing_px = float(spacing_px)
        self.min_support = int(min_support)
        self.match_tolerance = float(match_tolerance)
        self.last_bonds: np.ndarray | None = None

    def classify(self, cols: ColumnTable, smooth: np.ndarray | None = None) -> ColumnTable:
        """Classify ``cols`` and append inferred vacancy sites.

        Parameters
        ----------
        cols : ColumnTable
            Found columns (heights in ``intensity``).
        smooth : ndarray (rows, cols) float32, optional
            The smoothed frame: sets the frame's extent for vacancy inference and gives vacancy rows
            their intensity. Without it no vacancy sites are inferred.

        Returns
        -------
        ColumnTable with ``class_names = ("Mo", "S2", "S1", "vacancy")``.
        """
        n = len(cols)
        cls = np.full(n, 1, np.int8)
        if n >= 4:
            logi = np.log(np.maximum(cols.intensity.astype(float), 1e-12))
            split = otsu_threshold(logi)
            cls[logi > split] = 0
            s_sel = logi <= split
            if s_sel.any():
                s2_level = float(np.median(logi[s_sel]))
                cls[s_sel & (logi < s2_level - 0.5 * math.log(2.0))] = 2
        out = ColumnTable(cols.x, cols.y, cols.intensity, cols.score, cls, MOS2_CLASSES)
        if smooth is None or n < 4:
            return out
        return out.concat(self._vacancy_sites(out, smooth))

    def _vacancy_sites(self, cols: ColumnTable, smooth: np.ndarray) -> ColumnTable:
        xy = cols.xy
        metal = xy[cols.cls == 0]
        chalc = xy[(cols.cls == 1) | (cols.cls == 2)]
        bonds = bond_vectors(metal, chalc, self.spacing_px)
        self.last_bonds = bonds
        if bonds is None:
            return ColumnTable.empty(MOS2_CLASSES)
        pred = np.concatenate([(metal[:, None, :] + bonds[None]).reshape(-1, 2),
                               (chalc[:, None, :] - bonds[None]).reshape(-1, 2)])
        rows, ncols = smooth.shape
        m = 0.5 * self.spacing_px
        inside = (pred[:, 0] >= m) & (pred[:, 0] <= ncols - 1 - m) & (pred[:, 1] >= m) & (pred[:, 1] <= rows - 1 - m)
        pred = pred[inside]
        tol = self.match_tolerance * self.spacing_px
        if len(pred) == 0:
            return ColumnTable.empty(MOS2_CLASSES)
        _, d = GridIndex(xy, tol).nearest(pred, tol)
        empty = pred[~np.isfinite(d)]
        if len(empty) == 0:
            return ColumnTable.empty(MOS2_CLASSES)
        # merge predictions of the same site and count how many neighbours predicted it
        groups = cKDTree(empty).query_ball_point(empty, tol)
        seen = np.zeros(len(empty), bool)
        sites, support = [], []
        for k, g in enumerate(groups):
            if seen[k]:
                continue
            seen[g] = True
            sites.append(empty[g].mean(axis=0))
            support.append(len(g))
        sites = np.asarray(sites)
        support = np.asarray(support)
        keep = support >= self.min_support
        sites, support = sites[keep], support[keep]
        ii = np.clip(np.rint(sites[:, 1]).astype(int), 0, rows - 1)
        jj = np.clip(np.rint(sites[:, 0]).astype(int), 0, ncols - 1)
        k = len(sites)
        return ColumnTable(sites[:, 0].astype(np.float32), sites[:, 1].astype(np.float32),
                           smooth[ii, jj].astype(np.float32), support.astype(np.float32),
                           np.full(k, 3, np.int8), MOS2_CLASSES)
