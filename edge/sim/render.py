"""Rendering HAADF signals from projected columns with the linear incoherent model (numba).

For every probe position the expected signal is the sum, over columns within the profile's reach, of
each column's atoms times their element's blurred radial response (:mod:`beamloop.edge.sim.profiles`). Columns
are binned into square cells of the reach's size (:class:`beamloop.edge.kernels.neighbours.GridIndex`) so that each
probe position only visits the 3x3 cells around it.
"""

from __future__ import annotations

import numba
import numpy as np

from beamloop.edge.kernels.neighbours import GridIndex
from beamloop.edge.sim.lattice import Specimen
from beamloop.edge.sim.profiles import ProfileTable


@numba.njit(cache=True, nogil=True)
def _render_kernel(px, py, col_xy, coef, cell_start, cell_cols, x0, y0, cell, ncx, ncy, table, dr, out):
    rows, cols = px.shape
    n_el = table.shape[0]
    nr = table.shape[1]
    r_max = (nr - 1) * dr
    for i in range(rows):
        for j in range(cols):
            x = px[i, j]
            y = py[i, j]
            cx = int(np.floor((x - x0) / cell))
            cy = int(np.floor((y - y0) / cell))
            acc = 0.0
            for gy in range(cy - 1, cy + 2):
                if gy < 0 or gy >= ncy:
                    continue
                for gx in range(cx - 1, cx + 2):
                    if gx < 0 or gx >= ncx:
                        continue
                    g = gy * ncx + gx
                    for k in range(cell_start[g], cell_start[g + 1]):
                        c = cell_cols[k]
                        d = np.hypot(x - col_xy[c, 0], y - col_xy[c, 1])
                        if d >= r_max:
                            continue
                        t = d / dr
                        m = int(t)
                        f = t - m
                        for e in range(n_el):
                            w = coef[c, e]
                            if w != 0.0:
                                acc += w * (table[e, m] * (1.0 - f) + table[e, m + 1] * f)
            out[i, j] = acc


class ColumnRenderer:
    """Expected HAADF signal of a specimen at arbitrary probe positions.

    Parameters
    ----------
    specimen : Specimen
        Its ``counts`` are read at every call, so ejected atoms show at once.
    profiles : ProfileTable
        Must contain every element of ``specimen.elements``.

    Raises
    ------
    KeyError
        An element of the specimen is missing from ``profiles``.
    """

    def __init__(self, specimen: Specimen, profiles: ProfileTable) -> None:
        self.specimen = specimen
        self.profiles = profiles
        rows = [profiles.index(el) for el in specimen.elements]
        self._table = np.ascontiguousarray(profiles.table[rows])
        self._grid = GridIndex(specimen.xy, profiles.r_max)

    def expected(self, x_A: np.ndarray, y_A: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Fraction of probe electrons reaching the HAADF detector at each probe position.

        Parameters
        ----------
        x_A, y_A : ndarray, shape (rows, cols), float64
            Probe positions in specimen coordinates, Angstrom.
        out : ndarray, shape (rows, cols), float64, optional

        Returns
        -------
        ndarray, shape (rows, cols), float64
        """
        x_A = np.ascontiguousarray(x_A, dtype=np.float64)
        y_A = np.ascontiguousarray(y_A, dtype=np.float64)
        if x_A.ndim == 1:
            x_A, y_A = x_A[None, :], y_A[None, :]
        if out is None:
            out = np.empty(x_A.shape, np.float64)
        coef = self.specimen.counts.astype(np.float64)
        g = self._grid
        _render_kernel(x_A, y_A, g.xy, coef, g.start, g.order, g.x0, g.y0, g.cell, g.ncx, g.ncy, self._table,
                       self.profiles.dr, out)
        return out


def poisson_counts(expected_fraction: np.ndarray, electrons_per_pixel: float, rng: np.random.Generator,
                   background_fraction: float = 0.0, dtype=np.uint16) -> np.ndarray:
    """Detector counts per pixel: Poisson(fraction x electrons per pixel).

    Parameters
    ----------
    expected_fraction : ndarray (rows, cols)
        Fraction of probe electrons reaching the detector (:meth:`ColumnRenderer.expected`).
    electrons_per_pixel : float
        Beam electrons per pixel = dose (e-/Angstrom^2) x pixel area (Angstrom^2).
    background_fraction : float
        Constant extra fraction (support film, contamination).
    dtype : numpy integer dtype
        Output type; counts are clipped to its maximum.

    Returns
    -------
    ndarray, same shape, ``dtype``
    """
    lam = (expected_fraction + background_fraction) * electrons_per_pixel
    counts = rng.poisson(np.maximum(lam, 0.0))
    return np.minimum(counts, np.iinfo(dtype).max).astype(dtype)
