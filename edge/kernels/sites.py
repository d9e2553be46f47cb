"""Lattice-site kernels (numba): the bond vectors of a projected honeycomb and its empty sites, in one pass.

The vacancy stage (:mod:`beamloop.edge.stages.vacancies`) calls :func:`infer_sites` once per frame (outputs in
a reused :class:`SiteScratch`), so the per-frame work is one compiled call with no Python loop over columns.
Neighbour queries use the uniform grid of :mod:`beamloop.edge.kernels.neighbours` (cells of the largest search
radius; each query visits the 3 x 3 cells around it).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from beamloop.edge.kernels.neighbours import _cells, _nearest, _within


@numba.njit(cache=True, nogil=True)
def _grid(xy, cell):
    """Bin points ``xy`` (n, 2) into square cells of side ``cell`` (:func:`beamloop.edge.kernels.neighbours._cells`);
    returns ``(order, start, x0, y0, ncx, ncy)``."""
    x0 = xy[:, 0].min()
    y0 = xy[:, 1].min()
    ncx = int((xy[:, 0].max() - x0) / cell) + 1
    ncy = int((xy[:, 1].max() - y0) / cell) + 1
    order, start = _cells(xy, x0, y0, cell, ncx, ncy)
    return order, start, x0, y0, ncx, ncy


@numba.njit(cache=True, nogil=True)
def _pairs(xy, order, start, x0, y0, cell, ncx, ncy, q, r):
    """All (query, point) index pairs closer than ``r`` (:func:`beamloop.edge.kernels.neighbours._within`)."""
    e = np.empty(0, np.int64)
    m = _within(xy, order, start, x0, y0, cell, ncx, ncy, q, r, True, e, e)
    qi = np.empty(m, np.int64)
    pi = np.empty(m, np.int64)
    _within(xy, order, start, x0, y0, cell, ncx, ncy, q, r, False, qi, pi)
    return qi, pi


@numba.njit(cache=True, nogil=True)
def infer_sites(xy, cls, metal, chalc1, chalc2, spacing, rows, cols, tol, min_support, bonds, out_x, out_y, out_n):
    """Bond vectors of a projected MX2 honeycomb and its empty sites, from classified columns.

    Parameters
    ----------
    xy : float64 (n, 2), pixels
        Column positions ``(x, y)`` (``x`` the column index, ``y`` the row index).
    cls : int8 (n,)
        Class per column; ``metal`` is the metal class, ``chalc1`` and ``chalc2`` the chalcogen classes
        (other classes only occupy sites).
    spacing : float
        Projected metal-chalcogen distance, pixels.
    rows, cols : int
        Frame shape; predicted sites closer than ``spacing / 2`` to its edge are left out.
    tol : float
        A predicted site with a column within ``tol`` pixels is occupied; empty predictions within ``tol``
        of each other are one site.
    min_support : int
        Predictions (neighbours) needed for an empty site.
    bonds : float64 (3, 2), out
        The three metal-to-chalcogen bond vectors, pixels.
    out_x, out_y, out_n : float64 (3n,), out
        Empty sites (mean of the predictions merged into each) and their support.

    Returns
    -------
    int
        Number of empty sites written, or -1 when fewer than 3 metal-chalcogen bonds were found (``bonds``
        then undefined).

    Notes
    -----
    Bond directions of a honeycomb are 120 degrees apart, so three times their angle is the same for all
    three: the circular mean of ``3 * angle`` over all metal-chalcogen pairs closer than 1.3 spacings
    gives the orientation (``cos 3a = 4c^3 - 3c``, ``sin 3a = 3s - 4s^3`` of the unit vector ``(c, s)``: no
    trigonometry per pair), the median pair distance the bond length. Every metal predicts three chalcogen
    sites (``+ bonds``) and every chalcogen three metal sites (``- bonds``). Empty predictions are merged
    greedily in prediction order: the first unmerged one takes every empty prediction within ``tol``.
    Neighbour queries run on the uniform grid of :mod:`beamloop.edge.kernels.neighbours`.
    """
    n = xy.shape[0]
    if n == 0:
        return -1
    r = 1.3 * spacing
    cell = max(r, tol)
    order, start, x0, y0, ncx, ncy = _grid(xy, cell)

    # bond vectors: every metal-chalcogen pair closer than r
    nm = 0
    for p in range(n):
        if cls[p] == metal:
            nm += 1
    mq = np.empty((nm, 2), np.float64)
    k = 0
    for p in range(n):
        if cls[p] == metal:
            mq[k, 0] = xy[p, 0]
            mq[k, 1] = xy[p, 1]
            k += 1
    qi, pi = _pairs(xy, order, start, x0, y0, cell, ncx, ncy, mq, r)
    lengths = np.empty(qi.shape[0], np.float64)
    s3 = 0.0
    c3 = 0.0
    m = 0
    for t in range(qi.shape[0]):
        q = pi[t]
        if cls[q] != chalc1 and cls[q] != chalc2:
            continue
        dx = xy[q, 0] - mq[qi[t], 0]
        dy = xy[q, 1] - mq[qi[t], 1]
        d = math.sqrt(dx * dx + dy * dy)
        if d == 0.0:
            continue
        c = dx / d
        s = dy / d
        c3 += c * (4.0 * c * c - 3.0)
        s3 += s * (3.0 - 4.0 * s * s)
        lengths[m] = d
        m += 1
    if m < 3:
        return -1
    phi = math.atan2(s3 / m, c3 / m) / 3.0
    length = np.median(lengths[:m])
    for b in range(3):
        a = phi + b * 2.0 * math.pi / 3.0
        bonds[b, 0] = length * math.cos(a)
        bonds[b, 1] = length * math.sin(a)

    # predicted sites inside the frame
    edge = 0.5 * spacing
    pred = np.empty((3 * n, 2), np.float64)
    npred = 0
    for p in range(n):
        if cls[p] == metal:
            sign = 1.0
        elif cls[p] == chalc1 or cls[p] == chalc2:
            sign = -1.0
        else:
            continue
        for b in range(3):
            px = xy[p, 0] + sign * bonds[b, 0]
            py = xy[p, 1] + sign * bonds[b, 1]
            if px < edge or px > cols - 1 - edge or py < edge or py > rows - 1 - edge:
                continue
            pred[npred, 0] = px
            pred[npred, 1] = py
            npred += 1
    # those with no column within tol are empty
    idx = np.empty(npred, np.int64)
    dist = np.empty(npred, np.float64)
    _nearest(xy, order, start, x0, y0, cell, ncx, ncy, pred[:npred], tol, idx, dist)
    ne = 0
    for t in range(npred):
        if idx[t] < 0:
            pred[ne, 0] = pred[t, 0]
            pred[ne, 1] = pred[t, 1]
            ne += 1
    if ne == 0:
        return 0
    empty = pred[:ne]

    # merge empty predictions of one site (greedy, in prediction order)
    eorder, estart, ex0, ey0, encx, ency = _grid(empty, max(tol, 1e-6))
    gi, gj = _pairs(empty, eorder, estart, ex0, ey0, max(tol, 1e-6), encx, ency, empty, tol)
    first = np.zeros(ne + 1, np.int64)  # the pairs come grouped by query, in query order
    for t in range(gi.shape[0]):
        first[gi[t] + 1] += 1
    for k in range(ne):
        first[k + 1] += first[k]
    seen = np.zeros(ne, np.bool_)
    ns = 0
    for k in range(ne):
        if seen[k]:
            continue
        sx = 0.0
        sy = 0.0
        cnt = 0
        for t in range(first[k], first[k + 1]):
            j = gj[t]
            seen[j] = True
            sx += empty[j, 0]
            sy += empty[j, 1]
            cnt += 1
        if cnt >= min_support:
            out_x[ns] = sx / cnt
            out_y[ns] = sy / cnt
            out_n[ns] = cnt
            ns += 1
    return ns


class SiteScratch:
    """Output arrays of :func:`infer_sites`, grown (doubling) to the largest column count seen.

    Parameters
    ----------
    capacity : int
        Columns to size for at first.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = 0
        self.bonds = np.zeros((3, 2), np.float64)
        self.ensure(capacity)

    def ensure(self, n: int) -> None:
        """Room for the sites of ``n`` columns (``3 n``)."""
        if n <= self.capacity:
            return
        cap = max(int(n), 2 * self.capacity, 64)
        self.capacity = cap
        self.out_x = np.zeros(3 * cap, np.float64)
        self.out_y = np.zeros(3 * cap, np.float64)
        self.out_n = np.zeros(3 * cap, np.float64)
