"""Peak kernels (numba) shared by the classical and the learned finder: local maxima, local background,
greedy non-maximum suppression, sub-pixel refinement.

Plain functions over caller-owned buffers (:class:`PeakBuffers`); nothing here allocates per frame.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from beamloop.edge.kernels.background import window_quantile

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
    the minimum keeps the deepest noise dip from inflating the heights of noise peaks
    (:func:`beamloop.edge.kernels.background.window_quantile` over ``scratch``)."""
    rows, cols = s.shape
    h = int(half)
    step = max((2 * h + 1) // 8, 1)
    for k in range(n):
        i0, i1 = max(ci[k] - h, 0), min(ci[k] + h + 1, rows)
        j0, j1 = max(cj[k] - h, 0), min(cj[k] + h + 1, cols)
        bg[k] = window_quantile(s, i0, i1, j0, j1, step, quantile, scratch)


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


@numba.njit(cache=True, nogil=True)
def _segment_min(s, i0, j0, i1, j1):
    """Lowest value of ``s`` along the segment between pixels (i0, j0) and (i1, j1), bilinear, 1/2 px steps,
    end points left out."""
    n = int(2.0 * math.sqrt(float((i1 - i0) ** 2 + (j1 - j0) ** 2))) + 1
    lo = 1e30
    rows, cols = s.shape
    for t in range(1, n):
        f = t / n
        y = i0 + f * (i1 - i0)
        x = j0 + f * (j1 - j0)
        a = min(max(int(y), 0), rows - 2)
        b = min(max(int(x), 0), cols - 2)
        wy = y - a
        wx = x - b
        v = ((1 - wy) * ((1 - wx) * s[a, b] + wx * s[a, b + 1]) + wy * ((1 - wx) * s[a + 1, b] + wx * s[a + 1, b + 1]))
        if v < lo:
            lo = v
    return lo


@numba.njit(cache=True, nogil=True)
def suppress_dip(s, ci, cj, bg, order, n_order, r_hard, r_soft, dip_abs, dip_rel, head, nxt, cell, keep):
    """Greedy non-maximum suppression with a dip test for close pairs; returns the number kept (``keep``).

    In ``order`` (brightest first) a candidate is dropped when a kept peak lies closer than ``r_hard``, or
    closer than ``r_soft`` without a dip between them: the lowest value of ``s`` on the segment joining them
    must lie below the lower of the two peaks by at least ``max(dip_abs, dip_rel * (lower peak - its
    background))``. Two columns closer than the lattice period (dumbbells, close pairs) thus stay two where
    the image shows the gap between them, and a noisy column split into two maxima stays one.

    ``head`` (grid cells, int64) and ``nxt`` (capacity, int64) are the scratch of a bucket grid of cell side
    ``cell`` pixels (>= ``r_soft``) that finds kept neighbours in constant time.
    """
    rows, cols = s.shape
    gy = (rows + cell - 1) // cell
    gx = (cols + cell - 1) // cell
    for k in range(gy * gx):
        head[k] = -1
    rh2 = r_hard * r_hard
    rs2 = r_soft * r_soft
    nk = 0
    for t in range(n_order):
        k = order[t]
        i, j = ci[k], cj[k]
        ki = i // cell
        kj = j // cell
        ok = True
        for a in range(max(ki - 1, 0), min(ki + 2, gy)):
            if not ok:
                break
            for b in range(max(kj - 1, 0), min(kj + 2, gx)):
                if not ok:
                    break
                p = head[a * gx + b]
                while p >= 0:
                    q = keep[p]
                    d2 = float((ci[q] - i) ** 2 + (cj[q] - j) ** 2)
                    if d2 < rh2:
                        ok = False
                        break
                    if d2 < rs2:
                        lower = min(s[i, j], s[ci[q], cj[q]])
                        need = max(dip_abs, dip_rel * (lower - bg[k]))
                        if lower - _segment_min(s, i, j, ci[q], cj[q]) < need:
                            ok = False
                            break
                    p = nxt[p]
        if ok:
            keep[nk] = k
            c = ki * gx + kj
            nxt[nk] = head[c]
            head[c] = nk
            nk += 1
    return nk


@numba.njit(cache=True, nogil=True)
def fit_gaussian_fixed_width(img, x, y, sigma, radius, bg, iterations):
    """Least-squares fit of ``A exp(-r^2 / 2 sigma^2) + bg`` (fixed width and background) to the pixels of
    ``img`` within ``radius`` of ``(x, y)`` that lie inside the frame (a window clipped at the frame edge);
    Gauss-Newton on ``(x, y, A)``. Returns ``(x, y, A, rms_residual)``; the start values when the fit
    diverges (a step over one sigma, or a non-positive amplitude)."""
    rows, cols = img.shape
    x0, y0 = x, y
    inv = 0.5 / (sigma * sigma)
    r = int(math.ceil(radius))
    amp = 0.0
    for it in range(iterations + 1):
        ic, jc = int(round(y)), int(round(x))
        # normal equations of the linearised model in (dx, dy, dA)
        h00 = h01 = h02 = h11 = h12 = h22 = 0.0
        g0 = g1 = g2 = 0.0
        sgg = 0.0
        sgv = 0.0
        for ii in range(max(ic - r, 0), min(ic + r + 1, rows)):
            for jj in range(max(jc - r, 0), min(jc + r + 1, cols)):
                dx = jj - x
                dy = ii - y
                d2 = dx * dx + dy * dy
                if d2 > radius * radius:
                    continue
                g = math.exp(-d2 * inv)
                v = float(img[ii, jj]) - bg
                sgg += g * g
                sgv += g * v
        if sgg <= 0:
            return x0, y0, 0.0, 0.0
        amp = sgv / sgg
        if amp <= 0 or it == iterations:
            break
        for ii in range(max(ic - r, 0), min(ic + r + 1, rows)):
            for jj in range(max(jc - r, 0), min(jc + r + 1, cols)):
                dx = jj - x
                dy = ii - y
                d2 = dx * dx + dy * dy
                if d2 > radius * radius:
                    continue
                g = math.exp(-d2 * inv)
                res = float(img[ii, jj]) - bg - amp * g
                jx = amp * g * dx * 2.0 * inv
                jy = amp * g * dy * 2.0 * inv
                h00 += jx * jx
                h01 += jx * jy
                h02 += jx * g
                h11 += jy * jy
                h12 += jy * g
                h22 += g * g
                g0 += jx * res
                g1 += jy * res
                g2 += g * res
        # solve the 3x3 system by Cramer's rule
        det = (h00 * (h11 * h22 - h12 * h12) - h01 * (h01 * h22 - h12 * h02) + h02 * (h01 * h12 - h11 * h02))
        if abs(det) < 1e-30:
            break
        sx = (g0 * (h11 * h22 - h12 * h12) - h01 * (g1 * h22 - h12 * g2) + h02 * (g1 * h12 - h11 * g2)) / det
        sy = (h00 * (g1 * h22 - g2 * h12) - g0 * (h01 * h22 - h12 * h02) + h02 * (h01 * g2 - g1 * h02)) / det
        if abs(sx) > sigma or abs(sy) > sigma:
            return x0, y0, amp, 0.0
        x += sx
        y += sy
        if abs(sx) < 1e-3 and abs(sy) < 1e-3:
            break
    if amp <= 0:
        return x0, y0, 0.0, 0.0
    ss = 0.0
    m = 0
    ic, jc = int(round(y)), int(round(x))
    for ii in range(max(ic - r, 0), min(ic + r + 1, rows)):
        for jj in range(max(jc - r, 0), min(jc + r + 1, cols)):
            dx = jj - x
            dy = ii - y
            d2 = dx * dx + dy * dy
            if d2 > radius * radius:
                continue
            res = float(img[ii, jj]) - bg - amp * math.exp(-d2 * inv)
            ss += res * res
            m += 1
    return x, y, amp, math.sqrt(ss / max(m, 1))


@numba.njit(cache=True, nogil=True)
def refine_near_edge(img, xs, ys, bgs, n, sigma, radius, margin, iterations, flags):
    """Refit the columns closer than ``margin`` pixels to the frame edge with
    :func:`fit_gaussian_fixed_width` on the raw frame (``xs, ys`` updated in place) and set ``flags[k] = 1`` for
    them (0 for the others)."""
    rows, cols = img.shape
    for k in range(n):
        x, y = xs[k], ys[k]
        d = min(min(x, y), min(cols - 1 - x, rows - 1 - y))
        if d < margin:
            flags[k] = 1
            nx, ny, a, _ = fit_gaussian_fixed_width(img, x, y, sigma, radius, bgs[k], iterations)
            if a > 0 and -0.5 <= nx <= cols - 0.5 and -0.5 <= ny <= rows - 0.5:
                xs[k] = nx
                ys[k] = ny
        else:
            flags[k] = 0


@numba.njit(cache=True, nogil=True)
def nearest_neighbour_distances(x, y, mask, rows, cols, head, nxt, out):
    """Distance from each point with ``mask[k]`` to its nearest other such point (pixels; ``inf`` when it has
    none within two bucket cells), by a bucket grid of cell side ``sqrt(rows * cols / n)`` (about one
    lattice spacing), coarsened until it fits ``head`` (int64 scratch, ``len(x) + 1`` or more); ``nxt``
    (int64) is as long as ``x``. Returns the number of points used."""
    n = 0
    for k in range(x.shape[0]):
        if mask[k]:
            n += 1
    if n < 2:
        for k in range(x.shape[0]):
            out[k] = np.inf
        return n
    cell = max(math.sqrt(rows * cols / n), 1.0)
    gx = int(cols / cell) + 1
    gy = int(rows / cell) + 1
    while gx * gy > head.shape[0]:
        cell *= 1.2
        gx = int(cols / cell) + 1
        gy = int(rows / cell) + 1
    for c in range(gx * gy):
        head[c] = -1
    for k in range(x.shape[0]):
        if mask[k]:
            c = min(max(int(y[k] / cell), 0), gy - 1) * gx + min(max(int(x[k] / cell), 0), gx - 1)
            nxt[k] = head[c]
            head[c] = k
    for k in range(x.shape[0]):
        out[k] = np.inf
        if not mask[k]:
            continue
        ci = min(max(int(y[k] / cell), 0), gy - 1)
        cj = min(max(int(x[k] / cell), 0), gx - 1)
        best = np.inf
        for a in range(max(ci - 2, 0), min(ci + 3, gy)):
            for b in range(max(cj - 2, 0), min(cj + 3, gx)):
                p = head[a * gx + b]
                while p >= 0:
                    if p != k:
                        d2 = (x[p] - x[k]) ** 2 + (y[p] - y[k]) ** 2
                        if d2 < best:
                            best = d2
                    p = nxt[p]
        out[k] = math.sqrt(best)
    return n


@numba.njit(cache=True, nogil=True)
def nn_distance_stats(x, y, mask, rows, cols, head, nxt, d):
    """Median and median absolute deviation of the nearest-neighbour distances of the masked points
    (:func:`nearest_neighbour_distances`; ``d`` receives the distances); ``(n, median, mad)``, NaN for < 2 points."""
    n = nearest_neighbour_distances(x, y, mask, rows, cols, head, nxt, d)
    m = 0
    for k in range(x.shape[0]):
        if mask[k] and np.isfinite(d[k]):
            nxt[m] = k
            m += 1
    if m < 2:
        return n, np.nan, np.nan
    v = np.empty(m)
    for t in range(m):
        v[t] = d[nxt[t]]
    med = np.median(v)
    for t in range(m):
        v[t] = abs(v[t] - med)
    return n, med, np.median(v)


@numba.njit(cache=True, nogil=True)
def _pair_rss(img, xc, yc, ux, uy, d, shift, s, r, bg, single_cov):
    """Residual sum of squares of the best two-Gaussian (``single_cov`` False: centres ``c + (shift +- d/2) u``,
    round, sigma ``s``) or one elliptical Gaussian (covariance from the window) fit to ``img - bg`` in the disc of
    radius ``r`` around ``(xc, yc)``, amplitudes by linear least squares. Returns ``(rss, a1, a2, m)``."""
    rows, cols = img.shape
    ic, jc = int(round(yc)), int(round(xc))
    ir = int(math.ceil(r))
    x1 = xc + (shift - 0.5 * d) * ux
    y1 = yc + (shift - 0.5 * d) * uy
    x2 = xc + (shift + 0.5 * d) * ux
    y2 = yc + (shift + 0.5 * d) * uy
    inv = 0.5 / (s * s)
    s11 = s12 = s22 = b1 = b2 = vv = 0.0
    m = 0
    for ii in range(max(ic - ir, 0), min(ic + ir + 1, rows)):
        for jj in range(max(jc - ir, 0), min(jc + ir + 1, cols)):
            if (jj - xc) ** 2 + (ii - yc) ** 2 > r * r:
                continue
            v = float(img[ii, jj]) - bg
            g1 = math.exp(-((jj - x1) ** 2 + (ii - y1) ** 2) * inv)
            g2 = math.exp(-((jj - x2) ** 2 + (ii - y2) ** 2) * inv)
            s11 += g1 * g1
            s12 += g1 * g2
            s22 += g2 * g2
            b1 += g1 * v
            b2 += g2 * v
            vv += v * v
            m += 1
    det = s11 * s22 - s12 * s12
    if det <= 1e-12 * max(s11 * s22, 1e-30):
        return vv, 0.0, 0.0, m
    a1 = (b1 * s22 - b2 * s12) / det
    a2 = (b2 * s11 - b1 * s12) / det
    rss = vv - (a1 * b1 + a2 * b2)
    return rss, a1, a2, m


@numba.njit(cache=True, nogil=True)
def split_pairs(img, xs, ys, hs, bgs, n, radius, min_ratio, f_crit, min_sep, sep_sigmas, out_x, out_y, out_h, pair):
    """Two-Gaussian refinement of elongated columns: ``n`` columns in, the number of columns out.

    For each column the second moments of ``img - bg`` (clipped at 0) within ``radius`` give the major axis
    ``u`` and variances ``l1 >= l2``. Where ``l1 / l2 > min_ratio``, a pair of round Gaussians of sigma
    ``sqrt(l2)`` (the pair's minor width is one column's width) separated by ``d`` along ``u`` (a grid around
    ``2 sqrt(l1 - l2)``, the separation two equal Gaussians give, and shifts for unequal ones; at least
    ``max(min_sep, sep_sigmas sqrt(l2))``, below which a pair and an ellipse look alike) is compared
    with one elliptical Gaussian of the measured covariance (by its amplitude fit): the column becomes two
    when the pair fits better by an F statistic above ``f_crit`` (2 extra parameters), both amplitudes are
    positive and the weaker is at least a quarter of the stronger, and ``d >= min_sep``. Outputs
    (``out_x, out_y, out_h``: positions and heights; ``pair[k]`` 1 for both members of a split pair) are
    written in order, a split column's two members one after the other.
    """
    rows, cols = img.shape
    no = 0
    ir = int(math.ceil(radius))
    for k in range(n):
        xc, yc, bg = xs[k], ys[k], bgs[k]
        ic, jc = int(round(yc)), int(round(xc))
        sw = sx = sy = sxx = syy = sxy = 0.0
        for ii in range(max(ic - ir, 0), min(ic + ir + 1, rows)):
            for jj in range(max(jc - ir, 0), min(jc + ir + 1, cols)):
                if (jj - xc) ** 2 + (ii - yc) ** 2 > radius * radius:
                    continue
                w = float(img[ii, jj]) - bg
                if w <= 0:
                    continue
                sw += w
                sx += w * jj
                sy += w * ii
                sxx += w * jj * jj
                syy += w * ii * ii
                sxy += w * jj * ii
        done = False
        if sw > 0:
            mx, my = sx / sw, sy / sw
            cxx = sxx / sw - mx * mx
            cyy = syy / sw - my * my
            cxy = sxy / sw - mx * my
            tr = 0.5 * (cxx + cyy)
            dd = math.sqrt(max(0.25 * (cxx - cyy) ** 2 + cxy * cxy, 0.0))
            l1, l2 = tr + dd, tr - dd
            if l2 > 0.25 and l1 / l2 > min_ratio:
                ang = 0.5 * math.atan2(2.0 * cxy, cxx - cyy)
                ux, uy = math.cos(ang), math.sin(ang)
                s = math.sqrt(l2)
                d0 = 2.0 * math.sqrt(l1 - l2)
                if 1.4 * d0 < max(min_sep, sep_sigmas * s):
                    # no separation on the grid below could be accepted: one column (most columns end here)
                    out_x[no] = xc
                    out_y[no] = yc
                    out_h[no] = hs[k]
                    pair[no] = 0
                    no += 1
                    continue
                # one elliptical Gaussian of the measured covariance, amplitude fitted
                ia = 1.0 / l1
                ib = 1.0 / l2
                sgg = sgv = vv = 0.0
                m1 = 0
                for ii in range(max(ic - ir, 0), min(ic + ir + 1, rows)):
                    for jj in range(max(jc - ir, 0), min(jc + ir + 1, cols)):
                        if (jj - xc) ** 2 + (ii - yc) ** 2 > radius * radius:
                            continue
                        v = float(img[ii, jj]) - bg
                        pu = (jj - xc) * ux + (ii - yc) * uy
                        pv = -(jj - xc) * uy + (ii - yc) * ux
                        g = math.exp(-0.5 * (pu * pu * ia + pv * pv * ib))
                        sgg += g * g
                        sgv += g * v
                        vv += v * v
                        m1 += 1
                rss1 = vv - sgv * sgv / sgg if sgg > 0 else vv
                best = 1e300
                ba1 = ba2 = bd = bsh = 0.0
                for t in range(9):
                    d = d0 * (0.6 + 0.1 * t)
                    for q in range(5):
                        sh = (q - 2) * 0.1 * d
                        rss, a1, a2, m = _pair_rss(img, xc, yc, ux, uy, d, sh, s, radius, bg, False)
                        if rss < best:
                            best, ba1, ba2, bd, bsh = rss, a1, a2, d, sh
                m2 = max(m1 - 5, 1)
                fstat = (rss1 - best) / 2.0 / max(best / m2, 1e-30)
                lo, hi = min(ba1, ba2), max(ba1, ba2)
                if fstat > f_crit and lo > 0.25 * hi and bd >= max(min_sep, sep_sigmas * s):
                    out_x[no] = xc + (bsh - 0.5 * bd) * ux
                    out_y[no] = yc + (bsh - 0.5 * bd) * uy
                    out_h[no] = ba1
                    pair[no] = 1
                    no += 1
                    out_x[no] = xc + (bsh + 0.5 * bd) * ux
                    out_y[no] = yc + (bsh + 0.5 * bd) * uy
                    out_h[no] = ba2
                    pair[no] = 1
                    no += 1
                    done = True
        if not done:
            out_x[no] = xc
            out_y[no] = yc
            out_h[no] = hs[k]
            pair[no] = 0
            no += 1
    return no


@numba.njit(cache=True, nogil=True)
def bh_threshold(height, n, noise_s, noise_scores, density_area, below, null_fit, fdr, t_min, t_max, scratch):
    """The Benjamini-Hochberg score threshold of local maxima (:class:`beamloop.edge.stages.find.PeakFinder`):
    candidate scores ``height[:n] / noise_s`` against the sorted white-noise scores ``noise_scores``; the
    frame's noise-maxima count from its candidates below ``null_fit`` over the noise share ``below`` there
    (at most ``density_area``); tail beyond the noise's 99th percentile continued as ``exp(-(t^2 - t0^2)/2)``.
    Returns the threshold clipped to ``[t_min, t_max]`` (``t_max`` when no candidate qualifies). ``scratch``
    (float64, >= n) receives the scores sorted descending."""
    m = noise_scores.shape[0]
    if n == 0 or m == 0:
        return t_max
    low = 0
    for k in range(n):
        s = height[k] / noise_s
        scratch[k] = -s
        if s < null_fit:
            low += 1
    srt = np.sort(scratch[:n])
    n0 = min(low / max(below, 1e-6), density_area)
    k0 = int(0.99 * m)
    t0 = noise_scores[k0]
    best = -1.0
    for k in range(n):
        t = -srt[k]
        if t > t0:
            sf = (m - k0) / m * math.exp(-0.5 * (t * t - t0 * t0))
        else:
            sf = (m - np.searchsorted(noise_scores, t)) / m
        if n0 * sf <= fdr * (k + 1):
            best = t
    if best < 0:
        return t_max
    return min(t_max, max(t_min, best))
