"""The vacancies stage: empty MoS2 lattice sites inferred from the found columns, and the bond vectors.

S di-vacancies and Mo vacancies leave no atom to find. The three Mo-S bond vectors are estimated from the
found columns (:func:`vacancy_sites`); every found Mo predicts three S sites and every found S column
three Mo sites, and a predicted site that lies inside the frame, has no found column near it and is
predicted by at least ``min_support`` neighbours becomes a ``vacancy`` row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from scipy.spatial import cKDTree

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.stage import StageBase
from beamloop.edge.kernels.sites import SiteScratch, infer_sites
from beamloop.edge.materials import MOS2

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext, FrameMeta

VACANCY = MOS2.class_names.index("vacancy")
MO, S2, S1 = (MOS2.class_names.index(c) for c in ("Mo", "S2", "S1"))


def vacancy_sites(cols: ColumnTable, values: np.ndarray, spacing_px: float, min_support: int = 2,
                  match_tolerance: float = 0.4,
                  scratch: SiteScratch | None = None) -> tuple[ColumnTable, np.ndarray | None]:
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
    scratch : SiteScratch, optional
        Reused scratch (the stage keeps one); a new one otherwise.

    Returns
    -------
    vacancies : ColumnTable
        Rows of class ``vacancy``, ``score`` = the number of neighbours that predicted the site.
    bonds : ndarray (3, 2) float64, pixels, or None when fewer than 3 Mo-S bonds were found.

    Notes
    -----
    One compiled pass (:func:`beamloop.edge.kernels.sites.infer_sites`): bond vectors from the circular
    mean of three times the Mo-S pair angles, three predicted sites per found column, occupancy within
    ``match_tolerance * spacing_px``, and the merge of empty predictions of one site.
    """
    empty_table = ColumnTable.empty(MOS2.class_names)
    n = len(cols)
    sc = scratch if scratch is not None else SiteScratch(n)
    sc.ensure(n)
    rows, ncols = values.shape
    ns = infer_sites(cols.xy, np.ascontiguousarray(cols.cls, np.int8), MO, S2, S1, float(spacing_px), rows, ncols,
                     float(match_tolerance * spacing_px), int(min_support), sc.bonds, sc.out_x, sc.out_y, sc.out_n)
    if ns < 0:
        return empty_table, None
    bonds = sc.bonds.copy()
    if ns == 0:
        return empty_table, bonds
    sx, sy = sc.out_x[:ns], sc.out_y[:ns]
    ii = np.clip(np.rint(sy).astype(np.intp), 0, rows - 1)
    jj = np.clip(np.rint(sx).astype(np.intp), 0, ncols - 1)
    return ColumnTable(sx.astype(np.float32), sy.astype(np.float32), values[ii, jj].astype(np.float32),
                       sc.out_n[:ns].astype(np.float32), np.full(ns, VACANCY, np.int8), MOS2.class_names), bonds


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
        self._scratch = SiteScratch()

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
                                       self.match_tolerance, self._scratch)
        if len(vac):
            ctx.columns = cols.concat(vac)
