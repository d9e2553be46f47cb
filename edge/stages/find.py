"""Finding atomic columns in a smoothed frame (numba): local maxima, minimum separation, sub-pixel refinement.

Method
------
1. Candidates are the local maxima (3x3) of the Gaussian-smoothed frame (a matched filter for the
   column's blurred profile).
2. Each candidate's local background is a low quantile (``background_quantile``, 5 %) of the smoothed
   frame in a square window of half-width ``background_px`` (about one column spacing): the level of the
   valleys between columns; its height above that background is its intensity, and that height divided
   by the noise of the smoothed frame is its score. (The window minimum would let the deepest noise dip
   inflate every noise peak: on pure noise, half of all local maxima then stood 3.6 sigma high.)
3. Candidates whose score is below ``threshold_snr``, or whose height is below ``relative_threshold``
   times the 95th percentile of heights, are dropped.
4. A greedy non-maximum suppression keeps the highest candidates at least ``min_distance_px`` apart.
5. Each kept peak is refined to sub-pixel precision, either by a parabola fitted to the logarithm of
   the 3x3 neighbourhood (exact for a Gaussian peak; ``refine="gauss"``) or by a Gaussian-weighted
   centre of mass within ``window_px``, iterated about the sub-pixel estimate (``refine="com"``).

The noise of the smoothed frame is the raw noise (Immerkaer's estimate) times the smoothing kernel's
noise gain ``sqrt(sum k^2)`` per axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.stages.preprocess import Preprocessor

REFINE_METHODS = {"none": 0, "com": 1, "gauss": 2}


@dataclass(frozen=True)
class FinderConfig:
    """Parameters of the classical column finder, in pixels.

    Attributes
    ----------
    sigma_px : float
        Gaussian smoothing sigma (matched to the column's blurred width).
    min_distance_px : float
        Minimum distance between two columns.
    background_px : float
        Half-width of the window in which the local background is measured.
    background_quantile : float
        Quantile of the window's values taken as the background.
    threshold_snr : float
        Minimum height above background, in units of the smoothed frame's noise. The default 5.5 lets
        about one column per 256 x 256 frame of pure noise through (0.2 % of its local maxima).
    relative_threshold : float
        Minimum height as a fraction of the 95th percentile of candidate heights.
    refine : {"gauss", "com", "none"}
        Sub-pixel refinement.
    window_px : float
        Radius of the centre-of-mass window (``refine="com"``).
    border_px : int
        Peaks closer than this to the frame edge are ignored.
    """

    sigma_px: float
    min_distance_px: float
    background_px: float
    threshold_snr: float = 5.5
    background_quantile: float = 0.05
    relative_threshold: float = 0.08
    refine: str = "gauss"
    window_px: float = 3.0
    border_px: int = 2

    @classmethod
    def for_spacing(cls, spacing_px: float, column_sigma_px: float | None = None, **kw) -> "FinderConfig":
        """Parameters for columns ``spacing_px`` apart (nearest neighbours), of blurred sigma
        ``column_sigma_px`` (default: spacing / 5.5).

        Raises ``ValueError`` when the spacing is below 3 pixels (columns cannot be separated).
        """
        if not (math.isfinite(spacing_px) and spacing_px >= 3):
            raise ValueError(f"column spacing of {spacing_px} px is too small to separate columns (need >= 3 px)")
        sig = column_sigma_px if column_sigma_px else spacing_px / 5.5
        sig = min(max(sig, 0.7), spacing_px / 3.0)
        return cls(
            sigma_px=sig,
            min_distance_px=0.55 * spacing_px,
            background_px=max(0.9 * spacing_px, 2.0),
            window_px=max(0.3 * spacing_px, 1.5),
            border_px=max(int(round(0.2 * spacing_px)), 1),
            **kw,
        )

    @classmethod
    def for_lattice(cls, period_px: float, column_sigma_px: float, **kw) -> "FinderConfig":
        """Parameters for an uncalibrated image, from its lattice period and column sigma in pixels
        (:func:`beamloop.edge.analysis.spacing.estimate_scale`): columns may stand closer than the period (honeycombs,
        dumbbells, mixed sublattices), so the minimum distance is the larger of 2 column sigmas and 0.4
        periods.

        Raises ``ValueError`` for a period below 3 pixels or a non-positive sigma.
        """
        if not (math.isfinite(period_px) and period_px >= 3 and column_sigma_px > 0):
            raise ValueError(f"need a lattice period >= 3 px and a positive column sigma, got {period_px}, "
                             f"{column_sigma_px}")
        sig = min(max(column_sigma_px, 0.7), period_px / 3.0)
        return cls(
            sigma_px=sig,
            min_distance_px=max(2.0 * sig, 0.4 * period_px),
            background_px=max(0.5 * period_px, 2.0),
            window_px=max(sig, 1.5),
            border_px=max(int(round(sig)), 1),
            **kw,
        )

    @classmethod
    def for_pixel_size(cls, pixel_size_A: float, spacing_A: float = 1.82, column_sigma_A: float = 0.33,
                       **kw) -> "FinderConfig":
        """Parameters from physical sizes: nearest-neighbour column distance ``spacing_A`` (MoS2: 1.82 Angstrom)
        and blurred column sigma ``column_sigma_A`` (0.33 Angstrom: FWHM 0.77 Angstrom of the simulator's
        blurred profiles), at ``pixel_size_A`` Angstrom per pixel.

        Raises ``ValueError`` for a non-positive pixel size.
        """
        if not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
            raise ValueError(f"pixel size must be a positive number of Angstrom, got {pixel_size_A}")
        return cls.for_spacing(spacing_A / pixel_size_A, column_sigma_A / pixel_size_A, **kw)


@numba.njit(cache=True, nogil=True)
def _candidates(s, border, rmax, ci, cj, cv):
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
def _background(s, ci, cj, n, half, quantile, scratch, bg):
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
def _suppress(ci, cj, order, n_keep, min_dist, mask, keep):
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
def _refine(s, ci, cj, bg, keep, nk, method, window, out_x, out_y, out_h):
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


class ColumnFinder:
    """The classical atomic-column finder (see the module docstring for the method).

    Parameters
    ----------
    config : FinderConfig

    Notes
    -----
    Buffers are allocated per frame shape and reused; :meth:`find` returns a fresh
    :class:`~beamloop.edge.frame.columns.ColumnTable` (a copy of its rows), which the caller may keep.
    """

    def __init__(self, config: FinderConfig) -> None:
        if config.refine not in REFINE_METHODS:
            raise ValueError(f"refine must be one of {sorted(REFINE_METHODS)}, got {config.refine!r}")
        self.config = config
        self.preprocessor = Preprocessor(config.sigma_px)
        k = self.preprocessor.kernel.astype(np.float64)
        # white noise of sigma n becomes n * sqrt(sum K^2) after a 2-D kernel K = k (x) k, i.e. n * sum k^2
        self.noise_gain = float(np.sum(k * k))
        self._shape: tuple[int, int] | None = None

    def _allocate(self, shape: tuple[int, int]) -> None:
        cap = shape[0] * shape[1] // 4 + 16
        self._ci = np.empty(cap, np.int64)
        self._cj = np.empty(cap, np.int64)
        self._cv = np.empty(cap, np.float32)
        self._bg = np.empty(cap, np.float32)
        self._keep = np.empty(cap, np.int64)
        self._x = np.empty(cap, np.float64)
        self._y = np.empty(cap, np.float64)
        self._h = np.empty(cap, np.float64)
        self._mask = np.zeros(shape, np.uint8)
        self._rmax = np.empty(shape, np.float32)
        h = int(self.config.background_px)
        self._scratch = np.empty((h + 1) ** 2 + 4, np.float32)
        self._shape = shape

    def find(self, frame: np.ndarray) -> ColumnTable:
        """Preprocess ``frame`` and find its columns (unclassified: ``cls = -1``).

        Parameters
        ----------
        frame : ndarray (rows, cols), integer or float

        Raises
        ------
        beamloop.edge.stages.preprocess.FrameError
            Bad frame (see :meth:`beamloop.edge.stages.preprocess.Preprocessor.run`).
        """
        smooth, noise = self.preprocessor.run(frame)
        return self.find_smoothed(smooth, noise)

    def find_smoothed(self, smooth: np.ndarray, noise: float) -> ColumnTable:
        """Find columns in an already smoothed frame whose raw noise sigma is ``noise``."""
        cfg = self.config
        if self._shape != smooth.shape:
            self._allocate(smooth.shape)
        n = _candidates(smooth, cfg.border_px, self._rmax, self._ci, self._cj, self._cv)
        n = min(n, self._ci.shape[0])
        _background(smooth, self._ci, self._cj, n, cfg.background_px, cfg.background_quantile, self._scratch, self._bg)
        height = self._cv[:n] - self._bg[:n]
        noise_s = max(noise * self.noise_gain, 1e-12)
        if n == 0:
            return ColumnTable.empty()
        floor = max(cfg.threshold_snr * noise_s, cfg.relative_threshold * float(np.percentile(height, 95)))
        good = np.flatnonzero(height > floor)
        order = good[np.argsort(-self._cv[good], kind="stable")]
        nk = _suppress(self._ci, self._cj, order, len(order), cfg.min_distance_px, self._mask, self._keep)
        _refine(smooth, self._ci, self._cj, self._bg, self._keep, nk, REFINE_METHODS[cfg.refine], cfg.window_px,
                self._x, self._y, self._h)
        h = self._h[:nk].astype(np.float32)
        return ColumnTable(
            x=self._x[:nk].astype(np.float32),
            y=self._y[:nk].astype(np.float32),
            intensity=h,
            score=(h / noise_s).astype(np.float32),
            cls=np.full(nk, -1, np.int8),
        )
