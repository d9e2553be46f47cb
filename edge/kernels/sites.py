"""Lattice-site kernels (numba): the bond vectors of a projected honeycomb and its empty sites, in one pass.

The vacancy stage (:mod:`beamloop.edge.stages.vacancies`) calls :func:`infer_sites` once per frame over
caller-owned scratch (:class:`SiteScratch`), so the per-frame work is one compiled call with no Python
loop over columns. Neighbour queries bin the columns into square cells of the largest search radius
(a counting sort, no tree), so each query visits the 3 x 3 cells around it.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _bin(x, y, n, x0, y0, cell, ncx, ncy, start, order, cid):
    """Counting sort of points ``(x[k], y[k])``, k < n, into ``ncx * ncy`` cells: ``order[start[c]:start[c+1]]``
    are the points of cell ``c``."""
    nc = ncx * ncy
    for c in range(nc + 1):
        start[c] = 0
    for k in range(n):
        cx = min(max(int((x[k] - x0) / cell), 0), ncx - 1)
        cy = min(max(int((y[k] - y0) / cell), 0), ncy - 1)
        c = cy * ncx + cx
        cid[k] = c
        start[c + 1] += 1
    for c in range(nc):
        start[c + 1] += start[c]
    # fill order with a running cursor per cell (start[c] .. start[c + 1]), stable in k
    for c in range(nc, 0, -1):
        start[c] = start[c - 1]
    start[0] = 0
    for k in range(n):
        c = cid[k]
        order[start[c + 1]] = k
        start[c + 1] += 1


@numba.njit(cache=True, nogil=True)
def _occupied(x, y, order, start, x0, y0, cell, ncx, ncy, qx, qy, r2):
    """True when a binned point lies within ``sqrt(r2)`` of ``(qx, qy)``."""
    cx = int(math.floor((qx - x0) / cell))
    cy = int(math.floor((qy - y0) / cell))
    for gy in range(cy - 1, cy + 2):
        if gy < 0 or gy >= ncy:
            continue
        for gx in range(cx - 1, cx + 2):
            if gx < 0 or gx >= ncx:
                continue
            g = gy * ncx + gx
            for k in range(start[g], start[g + 1]):
                p = order[k]
                if (x[p] - qx) ** 2 + (y[p] - qy) ** 2 <= r2:
                    return True
    return False


@numba.njit(cache=True, nogil=True)
def infer_sites(x, y, cls, metal, chalc1, chalc2, spacing, rows, cols, tol, min_support,
                start, order, cid, lengths, ex, ey, seen, estart, eorder, ecid, bonds, out_x, out_y, out_n):
    """Bond vectors of a projected MX2 honeycomb and its empty sites, from classified columns.

    Parameters
    ----------
    x, y : float32 (n,), pixels
        Column positions (``x`` the column index, ``y`` the row index).
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
    start, order, cid, lengths, ex, ey, seen, estart, eorder, ecid
        Scratch (:class:`SiteScratch`).
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
    gives the orientation, the median pair distance the bond length. Every metal predicts three chalcogen
    sites (``+ bonds``) and every chalcogen three metal sites (``- bonds``). Empty predictions are merged
    greedily in prediction order: the first unmerged one takes every empty prediction within ``tol``.
    """
    n = x.shape[0]
    r = 1.3 * spacing
    cell = r if r > tol else tol
    if n == 0:
        return -1
    x0 = x[0]
    y0 = y[0]
    x1 = x[0]
    y1 = y[0]
    for k in range(n):
        x0 = min(x0, x[k])
        y0 = min(y0, y[k])
        x1 = max(x1, x[k])
        y1 = max(y1, y[k])
    ncx = int((x1 - x0) / cell) + 1
    ncy = int((y1 - y0) / cell) + 1
    if ncx * ncy + 1 > start.shape[0]:
        # a sparse table spread far: coarser cells keep the scratch bounded (queries stay exact)
        cell = max((x1 - x0), (y1 - y0)) / (math.sqrt(start.shape[0] - 1) - 1.0) + 1e-9
        cell = max(cell, r, tol)
        ncx = int((x1 - x0) / cell) + 1
        ncy = int((y1 - y0) / cell) + 1
    _bin(x, y, n, x0, y0, cell, ncx, ncy, start, order, cid)

    # bond vectors: every metal-chalcogen pair closer than r
    r2 = r * r
    s3 = 0.0
    c3 = 0.0
    m = 0
    for p in range(n):
        if cls[p] != metal:
            continue
        qx = x[p]
        qy = y[p]
        cx = int(math.floor((qx - x0) / cell))
        cy = int(math.floor((qy - y0) / cell))
        for gy in range(cy - 1, cy + 2):
            if gy < 0 or gy >= ncy:
                continue
            for gx in range(cx - 1, cx + 2):
                if gx < 0 or gx >= ncx:
                    continue
                g = gy * ncx + gx
                for kk in range(start[g], start[g + 1]):
                    q = order[kk]
                    if cls[q] != chalc1 and cls[q] != chalc2:
                        continue
                    dx = float(x[q]) - float(qx)
                    dy = float(y[q]) - float(qy)
                    d2 = dx * dx + dy * dy
                    if d2 <= r2 and d2 > 0.0:
                        # cos and sin of three times the angle without trigonometry:
                        # cos 3a = 4 c^3 - 3 c, sin 3a = 3 s - 4 s^3 (c, s: the unit vector)
                        d = math.sqrt(d2)
                        c = dx / d
                        s = dy / d
                        c3 += c * (4.0 * c * c - 3.0)
                        s3 += s * (3.0 - 4.0 * s * s)
                        if m < lengths.shape[0]:
                            lengths[m] = d
                        m += 1
    if m < 3:
        return -1
    phi = math.atan2(s3 / m, c3 / m) / 3.0
    length = np.median(lengths[:min(m, lengths.shape[0])])
    for b in range(3):
        a = phi + b * 2.0 * math.pi / 3.0
        bonds[b, 0] = length * math.cos(a)
        bonds[b, 1] = length * math.sin(a)

    # predicted sites that lie inside the frame and have no column within tol
    edge = 0.5 * spacing
    t2 = tol * tol
    ne = 0
    for p in range(n):
        if cls[p] == metal:
            sign = 1.0
        elif cls[p] == chalc1 or cls[p] == chalc2:
            sign = -1.0
        else:
            continue
        for b in range(3):
            px = float(x[p]) + sign * bonds[b, 0]
            py = float(y[p]) + sign * bonds[b, 1]
            if px < edge or px > cols - 1 - edge or py < edge or py > rows - 1 - edge:
                continue
            if _occupied(x, y, order, start, x0, y0, cell, ncx, ncy, px, py, t2):
                continue
            ex[ne] = px
            ey[ne] = py
            ne += 1
    if ne == 0:
        return 0

    # merge empty predictions of one site (greedy, in prediction order)
    ex0 = ex[0]
    ey0 = ey[0]
    ex1 = ex[0]
    ey1 = ey[0]
    for k in range(ne):
        ex0 = min(ex0, ex[k])
        ey0 = min(ey0, ey[k])
        ex1 = max(ex1, ex[k])
        ey1 = max(ey1, ey[k])
    ecell = max(tol, 1e-6)
    encx = int((ex1 - ex0) / ecell) + 1
    ency = int((ey1 - ey0) / ecell) + 1
    if encx * ency + 1 > estart.shape[0]:
        ecell = max((ex1 - ex0), (ey1 - ey0)) / (math.sqrt(estart.shape[0] - 1) - 1.0) + 1e-9
        ecell = max(ecell, tol)
        encx = int((ex1 - ex0) / ecell) + 1
        ency = int((ey1 - ey0) / ecell) + 1
    _bin(ex, ey, ne, ex0, ey0, ecell, encx, ency, estart, eorder, ecid)
    for k in range(ne):
        seen[k] = False
    ns = 0
    for k in range(ne):
        if seen[k]:
            continue
        qx = ex[k]
        qy = ey[k]
        sx = 0.0
        sy = 0.0
        cnt = 0
        cx = int(math.floor((qx - ex0) / ecell))
        cy = int(math.floor((qy - ey0) / ecell))
        for gy in range(cy - 1, cy + 2):
            if gy < 0 or gy >= ency:
                continue
            for gx in range(cx - 1, cx + 2):
                if gx < 0 or gx >= encx:
                    continue
                g = gy * encx + gx
                for kk in range(estart[g], estart[g + 1]):
                    j = eorder[kk]
                    if (ex[j] - qx) ** 2 + (ey[j] - qy) ** 2 <= t2:
                        seen[j] = True
                        sx += ex[j]
                        sy += ey[j]
                        cnt += 1
        if cnt >= min_support:
            out_x[ns] = sx / cnt
            out_y[ns] = sy / cnt
            out_n[ns] = cnt
            ns += 1
    return ns


class SiteScratch:
    """Scratch arrays for :func:`infer_sites`, grown (doubling) to the largest column count seen.

    Parameters
    ----------
    capacity : int
        Columns to size for at first.
    max_cells : int
        Cells of each neighbour grid at most (a bound on memory for tables spread over a large area).
    """

    def __init__(self, capacity: int = 1024, max_cells: int = 1 << 16) -> None:
        self.capacity = 0
        self.max_cells = int(max_cells)
        self.bonds = np.zeros((3, 2), np.float64)
        self.start = np.zeros(self.max_cells + 1, np.int64)
        self.estart = np.zeros(self.max_cells + 1, np.int64)
        self.ensure(capacity)

    def ensure(self, n: int) -> None:
        """Room for ``n`` columns (``3 n`` predictions)."""
        if n <= self.capacity:
            return
        cap = max(int(n), 2 * self.capacity, 64)
        self.capacity = cap
        self.order = np.zeros(cap, np.int64)
        self.cid = np.zeros(cap, np.int64)
        self.lengths = np.zeros(9 * cap, np.float64)  # pair lengths: ~3 per metal; the median uses the first 9n
        self.ex = np.zeros(3 * cap, np.float64)
        self.ey = np.zeros(3 * cap, np.float64)
        self.seen = np.zeros(3 * cap, np.bool_)
        self.eorder = np.zeros(3 * cap, np.int64)
        self.ecid = np.zeros(3 * cap, np.int64)
        self.out_x = np.zeros(3 * cap, np.float64)
        self.out_y = np.zeros(3 * cap, np.float64)
        self.out_n = np.zeros(3 * cap, np.float64)


@numba.njit(cache=True, nogil=True)
def otsu_bin(values, edges, hist):
    """Index of the histogram bin whose upper edge is Otsu's threshold of ``values``.

    ``edges`` (float64, bins + 1, uniform and increasing, as ``numpy.histogram`` makes them) bin ``values``
    (float64, n) exactly as ``numpy.histogram`` does (the last bin closed); ``hist`` (int64, bins) is
    scratch and holds the counts afterwards. The between-class variance ``(m_t w_0 / n - m_0)^2 / (w_0 w_1)``
    of each split after bin k (N. Otsu, IEEE Trans. SMC 9, 62 (1979)) is evaluated in the same order of
    operations as the numpy form; the first maximum wins, splits with an empty side never do.
    """
    bins = hist.shape[0]
    lo = edges[0]
    hi = edges[bins]
    for b in range(bins):
        hist[b] = 0
    for k in range(values.shape[0]):
        v = values[k]
        if v < lo or v > hi:
            continue
        i = int((v - lo) / (hi - lo) * bins)
        if i >= bins:
            i = bins - 1
        if v < edges[i]:
            i -= 1
        elif i != bins - 1 and v >= edges[i + 1]:
            i += 1
        hist[i] += 1
    total = 0.0
    mt = 0.0
    for b in range(bins):
        total += hist[b]
        mt += hist[b] * (0.5 * (edges[b + 1] + edges[b]))
    best = -1.0
    best_b = 0
    w0 = 0.0
    m0 = 0.0
    for b in range(bins):
        w0 += hist[b]
        m0 += hist[b] * (0.5 * (edges[b + 1] + edges[b]))
        w1 = total - w0
        den = w0 * w1
        if den != 0.0:
            between = (mt * w0 / total - m0) ** 2 / den
            if math.isfinite(between) and between > best:
                best = between
                best_b = b
    return best_b
