"""Peak kernels (numba) shared by the classical and the learned finder: local maxima, local background,
greedy non-maximum suppression, sub-pixel refinement.

Plain functions over caller-owned buffers (:class:`PeakBuffers`); nothing here allocates per frame.
"""

from __future__ import annotations

import math

import numba
import numpy as np

REFINE_METHODS = {"none": 0, "com": 1, "gauss": 2}
"""Sub-pixel refinements of :func:`refine` by name."""


class PeakBuffers:
    """Candidate and result buffers of the peak kernels for frames of one shape.

    Parameters
    ----------
    shape : (rows, cols)
    background_px : float
        Half-width of the background window (sizes the quantile scratch of :func:`local_background`).
    members : int
        Rows of the position/height outputs (1, or ensemble members + 1 for the learned finder).

    Attributes
    ----------
    ci, cj : ndarray (cap,) int64
        Row and column of each candidate (capacity: a quarter of the pixels, the most 3x3 maxima a frame has).
    cv, bg : ndarray (cap,) float32
        Candidate value and local background.
    keep : ndarray (cap,) int64
        Indices of the kept candidates.
    x, y, h : ndarray (members, cap) float64
        Refined positions (pixels) and heights.
    mask : ndarray (rows, cols) uint8
        Suppression mask; ``rmax`` (rows, cols) float32 the row-maximum scratch of :func:`local_maxima`.
    """

    def __init__(self, shape: tuple[int, ...], background_px: float = 0.0, members: int = 1) -> None:
        cap = shape[0] * shape[1] // 4 + 16
        self.shape = tuple(shape)
        self.ci = np.empty(cap, np.int64)
        self.cj = np.empty(cap, np.int64)
        self.cv = np.empty(cap, np.float32)
        self.bg = np.zeros(cap, np.float32)
        self.keep = np.empty(cap, np.int64)
        self.x = np.empty((members, cap), np.float64)
        self.y = np.empty((members, cap), np.float64)
        self.h = np.empty((members, cap), np.float64)
        self.mask = np.zeros(shape, np.uint8)
        self.rmax = np.empty(shape, np.float32)
        h = int(background_px)
        self.scratch = np.empty((h + 1) ** 2 + 4, np.float32)

    @property
    def capacity(self) -> int:
        """Most candidates the buffers hold."""
        return len(self.ci)


@numba.njit(cache=True, nogil=True)
def local_maxima(s, border, rmax, ci, cj, cv):
    """Local maxima of ``s`` (3x3; ties broken in raster order: strictly above the four neighbours before
    the pixel, at least the four after it); returns their number.

    ``rmax`` (float32, shape of ``s``) is scratch: it first receives each pixel's 3-wide row maximum, a
    branch-free pass the compiler vectorises; a pixel can only be a maximum where it is at least the row
    maxima above, at and below it, which rejects almost every pixel with three comparisons, and only the
    survivors get the tie rule. Same maxima, same order as the plain 8-neighbour test, ~4x faster.
    """
    rows, cols = s.shape
    for i in range(rows):
        r = s[i]
        o = rmax[i]
        o[0] = max(r[0], r[1])
        o[cols - 1] = max(r[cols - 2], r[cols - 1])
        for j in range(1, cols - 1):
            o[j] = max(max(r[j - 1], r[j]), r[j + 1])
    n = 0
    cap = ci.shape[0]
    for i in range(max(border, 1), min(rows - border, rows - 1)):
        a = s[i - 1]
        b = s[i]
        ra = rmax[i - 1]
        rb = rmax[i]
        rc = rmax[i + 1]
        for j in range(max(border, 1), min(cols - border, cols - 1)):
            v = b[j]
            if v >= rb[j] and v >= ra[j] and v >= rc[j]:
                if v > a[j - 1] and v > a[j] and v > a[j + 1] and v > b[j - 1]:
                    if n < cap:
                        ci[n] = i
                        cj[n] = j
                        cv[n] = v
                    n += 1
    return n


@numba.njit(cache=True, nogil=True)
def local_background(s, ci, cj, n, half, quantile, scratch, bg):
    """A low quantile of ``s`` in the square window of half-width ``half`` around each candidate, sampled on
    an 8 x 8 grid spanning the window: the level of the valleys between columns. A quantile rather than
    the minimum keeps the deepest noise dip from inflating the heights of noise peaks. The q-th smallest
    sample is found by insertion into a sorted list of the q + 1 smallest (``scratch``)."""
    rows, cols = s.shape
    h = int(half)
    step = max((2 * h + 1) // 8, 1)
    for k in range(n):
        i0, i1 = max(ci[k] - h, 0), min(ci[k] + h + 1, rows)
        j0, j1 = max(cj[k] - h, 0), min(cj[k] + h + 1, cols)
        m = ((i1 - i0 + step - 1) // step) * ((j1 - j0 + step - 1) // step)
        q = min(int(quantile * (m - 1) + 0.5), m - 1)
        filled = 0
        for i in range(i0, i1, step):
            for j in range(j0, j1, step):
                v = s[i, j]
                if filled <= q:
                    p = filled
                    filled += 1
                elif v < scratch[q]:
                    p = q
                else:
                    continue
                while p > 0 and scratch[p - 1] > v:
                    scratch[p] = scratch[p - 1]
                    p -= 1
                scratch[p] = v
        bg[k] = scratch[q]


@numba.njit(cache=True, nogil=True)
def suppress(ci, cj, order, n_keep, min_dist, mask, keep):
    """Greedy non-maximum suppression in ``order``; returns the number kept (indices in ``keep``)."""
    rows, cols = mask.shape
    r = int(math.ceil(min_dist))
    r2 = min_dist * min_dist
    mask[:, :] = 0
    nk = 0
    for t in range(n_keep):
        k = order[t]
        i, j = ci[k], cj[k]
        if mask[i, j]:
            continue
        keep[nk] = k
        nk += 1
        for di in range(-r, r + 1):
            ii = i + di
            if ii < 0 or ii >= rows:
                continue
            for dj in range(-r, r + 1):
                jj = j + dj
                if jj < 0 or jj >= cols:
                    continue
                if di * di + dj * dj < r2:
                    mask[ii, jj] = 1
    return nk


@numba.njit(cache=True, nogil=True)
def refine(s, ci, cj, bg, keep, nk, method, window, out_x, out_y, out_h):
    """Sub-pixel positions and heights of the ``nk`` kept peaks (indices ``keep`` into ``ci, cj, bg``).

    ``method`` 2 (``"gauss"``): a parabola through the logarithm of the 3x3 neighbourhood above the
    background, exact for a Gaussian peak; 1 (``"com"``): a Gaussian-weighted centre of mass within
    ``window`` pixels, iterated about the sub-pixel estimate; 0: the pixel itself. Writes ``out_x``
    (columns), ``out_y`` (rows), pixels, and ``out_h`` (height above background, frame units).
    """
    rows, cols = s.shape
    rw = int(math.ceil(window))
    w2 = window * window
    for t in range(nk):
        k = keep[t]
        i, j = ci[k], cj[k]
        b = bg[k]
        x = float(j)
        y = float(i)
        if method == 2 and 0 < i < rows - 1 and 0 < j < cols - 1:
            eps = 1e-6
            c0 = math.log(max(s[i, j] - b, eps))
            xm = math.log(max(s[i, j - 1] - b, eps))
            xp = math.log(max(s[i, j + 1] - b, eps))
            ym = math.log(max(s[i - 1, j] - b, eps))
            yp = math.log(max(s[i + 1, j] - b, eps))
            dx2 = xm - 2.0 * c0 + xp
            dy2 = ym - 2.0 * c0 + yp
            if dx2 < 0.0:
                x += min(max(0.5 * (xm - xp) / dx2, -1.0), 1.0)
            if dy2 < 0.0:
                y += min(max(0.5 * (ym - yp) / dy2, -1.0), 1.0)
        elif method == 1:
            # Gaussian-weighted centroid, re-centred on the sub-pixel estimate: for a symmetric peak its
            # fixed point is the peak's centre (the weight removes the truncation bias of a plain
            # window); each step shrinks the error by sigma_peak^2 / (sigma_peak^2 + sigma_w^2).
            sw2 = 2.0 * (0.5 * window) ** 2
            for _ in range(12):
                ic, jc = int(round(y)), int(round(x))
                sw = 0.0
                sx = 0.0
                sy = 0.0
                for di in range(-rw, rw + 1):
                    ii = ic + di
                    if ii < 0 or ii >= rows:
                        continue
                    for dj in range(-rw, rw + 1):
                        jj = jc + dj
                        if jj < 0 or jj >= cols or di * di + dj * dj > w2:
                            continue
                        v = s[ii, jj] - b
                        if v > 0:
                            g = v * math.exp(-((jj - x) ** 2 + (ii - y) ** 2) / sw2)
                            sw += g
                            sx += g * jj
                            sy += g * ii
                if sw <= 0:
                    break
                nx = sx / sw
                ny = sy / sw
                done = abs(nx - x) < 1e-3 and abs(ny - y) < 1e-3
                x = nx
                y = ny
                if done:
                    break
        out_x[t] = x
        out_y[t] = y
        out_h[t] = s[i, j] - b
