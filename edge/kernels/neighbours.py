"""Neighbour searches among 2-D points on a uniform grid of cells (numba).

Atomic columns are spread almost uniformly, so binning them into square cells of about the search
radius gives constant-time queries: a query visits the 3 x 3 cells around it. Faster here than a
k-d tree for the thousands of queries per frame the classifier makes.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _cells(xy, x0, y0, cell, ncx, ncy):
    n = xy.shape[0]
    cid = np.empty(n, np.int64)
    for k in range(n):
        cx = min(max(int((xy[k, 0] - x0) / cell), 0), ncx - 1)
        cy = min(max(int((xy[k, 1] - y0) / cell), 0), ncy - 1)
        cid[k] = cy * ncx + cx
    order = np.argsort(cid, kind="mergesort")
    start = np.zeros(ncx * ncy + 1, np.int64)
    for k in range(n):
        start[cid[k] + 1] += 1
    for c in range(ncx * ncy):
        start[c + 1] += start[c]
    return order, start


@numba.njit(cache=True, nogil=True)
def _nearest(xy, order, start, x0, y0, cell, ncx, ncy, q, rmax, out_idx, out_d):
    r2max = rmax * rmax
    for t in range(q.shape[0]):
        qx, qy = q[t, 0], q[t, 1]
        cx = int(np.floor((qx - x0) / cell))
        cy = int(np.floor((qy - y0) / cell))
        best = r2max
        bi = -1
        for gy in range(cy - 1, cy + 2):
            if gy < 0 or gy >= ncy:
                continue
            for gx in range(cx - 1, cx + 2):
                if gx < 0 or gx >= ncx:
                    continue
                g = gy * ncx + gx
                for k in range(start[g], start[g + 1]):
                    p = order[k]
                    d2 = (xy[p, 0] - qx) ** 2 + (xy[p, 1] - qy) ** 2
                    if d2 <= best:
                        best = d2
                        bi = p
        out_idx[t] = bi
        out_d[t] = np.sqrt(best) if bi >= 0 else np.inf


@numba.njit(cache=True, nogil=True)
def _within(xy, order, start, x0, y0, cell, ncx, ncy, q, rmax, count_only, qi, pi):
    r2max = rmax * rmax
    m = 0
    for t in range(q.shape[0]):
        qx, qy = q[t, 0], q[t, 1]
        cx = int(np.floor((qx - x0) / cell))
        cy = int(np.floor((qy - y0) / cell))
        for gy in range(cy - 1, cy + 2):
            if gy < 0 or gy >= ncy:
                continue
            for gx in range(cx - 1, cx + 2):
                if gx < 0 or gx >= ncx:
                    continue
                g = gy * ncx + gx
                for k in range(start[g], start[g + 1]):
                    p = order[k]
                    if (xy[p, 0] - qx) ** 2 + (xy[p, 1] - qy) ** 2 <= r2max:
                        if not count_only:
                            qi[m] = t
                            pi[m] = p
                        m += 1
    return m


class GridIndex:
    """Points ``xy`` (n, 2) binned into square cells of side ``cell`` (same units, e.g. pixels).

    Queries find points within ``rmax <= cell`` of a query point.

    Raises
    ------
    ValueError
        ``cell`` not positive, or ``xy`` not of shape (n, 2).
    """

    def __init__(self, xy: np.ndarray, cell: float) -> None:
        xy = np.ascontiguousarray(xy, np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"points must have shape (n, 2), got {xy.shape}")
        if not cell > 0:
            raise ValueError(f"cell size must be positive, got {cell}")
        self.xy = xy
        self.cell = float(cell)
        lo = xy.min(axis=0) if len(xy) else np.zeros(2)
        hi = xy.max(axis=0) if len(xy) else np.zeros(2)
        self.x0, self.y0 = float(lo[0]), float(lo[1])
        self.ncx = int((hi[0] - lo[0]) / cell) + 1
        self.ncy = int((hi[1] - lo[1]) / cell) + 1
        self.order, self.start = _cells(xy, self.x0, self.y0, self.cell, self.ncx, self.ncy)

    def _args(self):
        return self.xy, self.order, self.start, self.x0, self.y0, self.cell, self.ncx, self.ncy

    def nearest(self, q: np.ndarray, rmax: float) -> tuple[np.ndarray, np.ndarray]:
        """Index of the nearest point within ``rmax`` of each query (-1 and inf where none)."""
        if rmax > self.cell:
            raise ValueError(f"rmax {rmax} exceeds the cell size {self.cell}")
        q = np.ascontiguousarray(q, np.float64).reshape(-1, 2)
        idx = np.empty(len(q), np.int64)
        d = np.empty(len(q), np.float64)
        _nearest(*self._args(), q, float(rmax), idx, d)
        return idx, d

    def pairs_within(self, q: np.ndarray, rmax: float) -> tuple[np.ndarray, np.ndarray]:
        """All (query index, point index) pairs closer than ``rmax``."""
        if rmax > self.cell:
            raise ValueError(f"rmax {rmax} exceeds the cell size {self.cell}")
        q = np.ascontiguousarray(q, np.float64).reshape(-1, 2)
        e = np.empty(0, np.int64)
        m = _within(*self._args(), q, float(rmax), True, e, e)
        qi = np.empty(m, np.int64)
        pi = np.empty(m, np.int64)
        _within(*self._args(), q, float(rmax), False, qi, pi)
        return qi, pi
