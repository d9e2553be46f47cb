"""The vacancies stage: empty MoS2 lattice sites inferred from the found columns, and the bond vectors.

S di-vacancies and Mo vacancies leave no atom to find. The three Mo-S bond vectors are estimated from the
found columns (:func:`bond_vectors`); every found Mo predicts three S sites and every found S column
three Mo sites, and a predicted site that lies inside the frame, has no found column near it and is
predicted by at least ``min_support`` neighbours becomes a ``vacancy`` row.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial import cKDTree

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.stage import StageBase
from beamloop.edge.kernels.neighbours import GridIndex
from beamloop.edge.materials import MOS2

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta

VACANCY = MOS2.class_names.index("vacancy")


def bond_vectors(metal_xy: np.ndarray, chalcogen_xy: np.ndarray, spacing_px: float) -> np.ndarray | None:
    """The three metal-to-chalcogen bond vectors of a projected honeycomb, from found columns.

    Parameters
    ----------
    metal_xy, chalcogen_xy : ndarray (n, 2), pixels
    spacing_px : float
        Expected nearest-neighbour distance, pixels.

    Returns
    -------
    ndarray, shape (3, 2) float64, pixels, or None when fewer than 3 bonds were found.

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


def vacancy_sites(cols: ColumnTable, values: np.ndarray, spacing_px: float, min_support: int = 2,
                  match_tolerance: float = 0.4) -> tuple[ColumnTable, np.ndarray | None]:
    """Vacancy rows for classified MoS2 columns, and the bond vectors they were predicted with.

    Parameters
    ----------
    cols : ColumnTable
        Classified columns (MoS2 classes).
    values : ndarray (rows, cols)
        Sets the frame's extent and gives vacancy rows their ``intensity`` (the smoothed or raw frame).
    spacing_px : float
        Projected Mo-S distance, pixels.
    min_support : int
        Found neighbours that must predict a site (1 to 3).
    match_tolerance : float
        A predicted site within this fraction of ``spacing_px`` of a found column is occupied.

    Returns
    -------
    vacancies : ColumnTable
        Rows of class ``vacancy``, ``score`` = the number of neighbours that predicted the site.
    bonds : ndarray (3, 2) or None
    """
    empty_table = ColumnTable.empty(MOS2.class_names)
    xy = cols.xy
    metal = xy[cols.cls == 0]
    chalc = xy[(cols.cls == 1) | (cols.cls == 2)]
    bonds = bond_vectors(metal, chalc, spacing_px)
    if bonds is None:
        return empty_table, None
    pred = np.concatenate([(metal[:, None, :] + bonds[None]).reshape(-1, 2),
                           (chalc[:, None, :] - bonds[None]).reshape(-1, 2)])
    rows, ncols = values.shape
    m = 0.5 * spacing_px
    inside = (pred[:, 0] >= m) & (pred[:, 0] <= ncols - 1 - m) & (pred[:, 1] >= m) & (pred[:, 1] <= rows - 1 - m)
    pred = pred[inside]
    tol = match_tolerance * spacing_px
    if len(pred) == 0:
        return empty_table, bonds
    _, d = GridIndex(xy, tol).nearest(pred, tol)
    empty = pred[~np.isfinite(d)]
    if len(empty) == 0:
        return empty_table, bonds
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
    sites_a = np.asarray(sites)
    support_a = np.asarray(support)
    keep = support_a >= min_support
    sites_a, support_a = sites_a[keep], support_a[keep]
    ii = np.clip(np.rint(sites_a[:, 1]).astype(int), 0, rows - 1)
    jj = np.clip(np.rint(sites_a[:, 0]).astype(int), 0, ncols - 1)
    k = len(sites_a)
    return ColumnTable(sites_a[:, 0].astype(np.float32), sites_a[:, 1].astype(np.float32),
                       values[ii, jj].astype(np.float32), support_a.astype(np.float32),
                       np.full(k, VACANCY, np.int8), MOS2.class_names), bonds


def median_neighbour_px(xy: np.ndarray) -> float:
    """Median nearest-neighbour distance of points (n >= 2, shape (n, 2)), pixels."""
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


class InferVacancySites(StageBase):
    """Frame stage ``vacancies`` (MoS2): appends inferred vacancy rows to ``columns`` and writes ``bonds``.

    ``bonds`` is written on every frame: None when the frame has fewer than 4 columns or too few bonds
    (never the bonds of an earlier frame).

    Parameters
    ----------
    source : {"smooth", "image"}
        Slot that gives vacancy rows their intensity: the smoothed frame (classical path) or the raw frame
        (U-Net path, which has no smoothed frame).
    min_support, match_tolerance
        See :func:`vacancy_sites`.
    """

    name = "vacancies"
    writes = ("columns", "bonds")

    def __init__(self, source: str = "smooth", min_support: int = 2, match_tolerance: float = 0.4) -> None:
        if source not in ("smooth", "image"):
            raise ValueError(f"source must be 'smooth' or 'image', got {source!r}")
        if not 1 <= min_support <= 3:
            raise ValueError(f"min_support must be 1, 2 or 3, got {min_support}")
        self.source = source
        self.reads = ("columns", source)
        self.min_support = int(min_support)
        self.match_tolerance = float(match_tolerance)
        self._spacing: float | None = None

    def prepare(self, meta: FrameMeta) -> None:
        """The Mo-S distance in pixels from the pixel size; else measured on each frame."""
        self._spacing = meta.nn_spacing_px

    def process(self, ctx: FrameContext) -> None:
        """Append vacancy rows (class ``vacancy``) and set ``ctx.bonds`` (or None)."""
        cols = ctx.columns
        ctx.bonds = None
        if len(cols) < 4 or cols.class_names != MOS2.class_names:
            return
        spacing = self._spacing or median_neighbour_px(cols.xy)
        vac, ctx.bonds = vacancy_sites(cols, getattr(ctx, self.source), spacing, self.min_support,
                                       self.match_tolerance)
        if len(vac):
            ctx.columns = cols.concat(vac)
