"""Heat-map kernels (numba) of the learned finder: frame normalisation, ensemble statistics, column
intensity and the frame's typical column spacing.

Plain functions over caller-owned buffers; nothing here allocates per frame.
"""

from __future__ import annotations

import math

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def mean_std(frame):
    """Mean and standard deviation (population) of all pixels of ``frame``, float64."""
    n = frame.size
    s = 0.0
    s2 = 0.0
    flat = frame.ravel()
    for k in range(n):
        v = float(flat[k])
        s += v
        s2 += v * v
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0)
    return mean, math.sqrt(var)


@numba.njit(cache=True, nogil=True)
def affine_into(frame, mean, inv, out):
    """``out = (frame - mean) * inv`` as float32, pixel by pixel (``out`` has the frame's shape)."""
    rows, cols = frame.shape
    for i in range(rows):
        for j in range(cols):
            out[i, j] = np.float32((float(frame[i, j]) - mean) * inv)


@numba.njit(cache=True, nogil=True)
def member_stats(heat, mean, std):
    """Per-pixel mean and standard deviation over the ensemble members: heat (M, H, W) -> (H, W) each."""
    m, rows, cols = heat.shape
    for i in range(rows):
        for j in range(cols):
            s = 0.0
            for k in range(m):
                s += float(heat[k, i, j])
            mu = s / m
            s2 = 0.0
            for k in range(m):
                d = float(heat[k, i, j]) - mu
                s2 += d * d
            mean[i, j] = mu
            std[i, j] = math.sqrt(s2 / m)


@numba.njit(cache=True, nogil=True)
def box_mean(frame, ci, cj, keep, nk, out):
    """Mean of the 3x3 pixels of ``frame`` around each kept peak (clipped at the edges)."""
    rows, cols = frame.shape
    for t in range(nk):
        k = keep[t]
        s = 0.0
        c = 0
        for i in range(max(ci[k] - 1, 0), min(ci[k] + 2, rows)):
            for j in range(max(cj[k] - 1, 0), min(cj[k] + 2, cols)):
                s += float(frame[i, j])
                c += 1
        out[t] = s / c


@numba.njit(cache=True, nogil=True)
def median_nn_distance(ci, cj, keep, nk, scratch):
    """Median nearest-neighbour distance (pixels) among the kept peaks ``keep[:nk]`` (integer positions).

    At most ``len(scratch)`` peaks, evenly strided through ``keep``, are probed against all ``nk`` (cost
    ``len(scratch) * nk``); returns 0 for fewer than two peaks."""
    if nk < 2:
        return 0.0
    m = min(nk, scratch.shape[0])
    stride = nk / m
    for p in range(m):
        a = keep[int(p * stride)]
        best = 1e30
        for t in range(nk):
            b = keep[t]
            if b == a:
                continue
            di = float(ci[a] - ci[b])
            dj = float(cj[a] - cj[b])
            d2 = di * di + dj * dj
            if d2 < best:
                best = d2
        scratch[p] = math.sqrt(best)
    return float(np.median(scratch[:m]))
