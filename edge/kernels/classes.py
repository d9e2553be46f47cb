"""Class kernels (numba): Otsu's threshold over a histogram, and the MoS2 intensity classes in one pass.

Bit-for-bit the numpy forms they replace (:func:`beamloop.edge.stages.classify.classify_mos2`): the same bins
as ``numpy.histogram`` (edges ``i * step + lo`` as ``numpy.linspace`` makes them, the last one ``hi``), the same
order of operations in Otsu's between-class variance, ``numpy.median``'s middle values. The logarithms are taken
by numpy before the call (numpy's vectorised ``log`` and the C library's may differ in the last bit).
"""

from __future__ import annotations

import math

import numba
import numpy as np


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


@numba.njit(cache=True, nogil=True)
def uniform_edges(lo, hi, edges):
    """``numpy.histogram``'s uniform bin edges of ``[lo, hi]`` into ``edges`` (float64, bins + 1): ``lo - 0.5``,
    ``hi + 0.5`` for constant data, then ``numpy.linspace``'s ``i * step + lo`` with the last edge ``hi``."""
    if lo == hi:
        lo = lo - 0.5
        hi = hi + 0.5
    n = edges.shape[0]
    step = (hi - lo) / (n - 1)
    for i in range(n):
        edges[i] = i * step + lo
    edges[n - 1] = hi


@numba.njit(cache=True, nogil=True)
def otsu_split(values, edges, hist):
    """Otsu's threshold of ``values`` (float64, n >= 1) over ``hist.shape[0]`` uniform bins of their range
    (:func:`uniform_edges` into ``edges``, float64, bins + 1; ``hist`` int64 scratch): the upper edge of the last
    bin of the lower class (:func:`otsu_bin`)."""
    lo = values[0]
    hi = values[0]
    for k in range(values.shape[0]):
        lo = min(lo, values[k])
        hi = max(hi, values[k])
    uniform_edges(lo, hi, edges)
    b = otsu_bin(values, edges, hist)
    return 0.5 * (edges[b + 1] + edges[b]) + 0.5 * (edges[1] - edges[0])


@numba.njit(cache=True, nogil=True)
def mos2_classes(logi, cls, edges, hist, s_scratch):
    """MoS2 classes from log column heights: Mo (0) above Otsu's threshold of ``logi`` (float64, n >= 4), S1 (2)
    among the rest below the S median minus ``log(2) / 2``, S2 (1) otherwise; into ``cls`` (int8, n).
    ``edges`` (float64, bins + 1), ``hist`` (int64, bins) and ``s_scratch`` (float64, n) are scratch. Returns the
    threshold."""
    n = logi.shape[0]
    split = otsu_split(logi, edges, hist)
    m = 0
    for k in range(n):
        if logi[k] > split:
            cls[k] = 0
        else:
            cls[k] = 1
            s_scratch[m] = logi[k]
            m += 1
    if m > 0:
        cut = np.median(s_scratch[:m]) - 0.5 * math.log(2.0)
        for k in range(n):
            if cls[k] == 1 and logi[k] < cut:
                cls[k] = 2
    return split
