"""Smoothing kernels (numba): a separable Gaussian with reflected borders, a noise estimate, a finiteness count.

Plain functions over caller-owned buffers: nothing here allocates per frame.
"""

from __future__ import annotations

import math

import numba
import numpy as np


def gaussian_kernel(sigma_px: float) -> np.ndarray:
    """Normalised 1-D Gaussian of standard deviation ``sigma_px`` pixels, truncated at 4 sigma (float32).

    Raises ``ValueError`` for a non-positive or non-finite sigma.
    """
    if not (math.isfinite(sigma_px) and sigma_px > 0):
        raise ValueError(f"smoothing sigma must be a positive number of pixels, got {sigma_px}")
    r = max(int(math.ceil(4.0 * sigma_px)), 1)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma_px) ** 2)
    return (k / k.sum()).astype(np.float32)


@numba.njit(cache=True, nogil=True)
def count_nonfinite(src):
    """Number of NaN or infinite pixels of a 2-D float frame (int)."""
    bad = 0
    rows, cols = src.shape
    for i in range(rows):
        for j in range(cols):
            if not np.isfinite(src[i, j]):
                bad += 1
    return bad


@numba.njit(cache=True, nogil=True)
def reflect(i, n):
    """Index ``i`` folded into ``[0, n)`` as scipy.ndimage's ``"reflect"`` mode does (d c b a | a b c d | d c b a);
    valid for ``-n <= i < 2n`` (kernels shorter than the frame)."""
    if i < 0:
        return -i - 1
    if i >= n:
        return 2 * n - i - 1
    return i


@numba.njit(cache=True, nogil=True)
def smooth_separable(src, k, row, tmp, dst):
    """Separable convolution of ``src`` (any real dtype) with kernel ``k`` along rows, then columns, with
    reflected borders, into float32 ``dst``. ``row`` (cols + len(k) - 1) and ``tmp`` (rows, cols) are scratch.

    Both passes run their innermost loop along contiguous memory (the tap loop outside), so that the
    compiler vectorises them."""
    rows, cols = src.shape
    nk = k.shape[0]
    r = (nk - 1) // 2
    for i in range(rows):
        # padded copy of the row, converted to float32 once
        for j in range(cols + 2 * r):
            row[j] = np.float32(src[i, reflect(j - r, cols)])
        out = tmp[i]
        w = k[0]
        for j in range(cols):
            out[j] = w * row[j]
        for t in range(1, nk):
            w = k[t]
            for j in range(cols):
                out[j] += w * row[j + t]
    for i in range(rows):
        out = dst[i]
        w = k[0]
        src0 = tmp[reflect(i - r, rows)]
        for j in range(cols):
            out[j] = w * src0[j]
        for t in range(1, nk):
            w = k[t]
            srct = tmp[reflect(i - r + t, rows)]
            for j in range(cols):
                out[j] += w * srct[j]


@numba.njit(cache=True, nogil=True)
def _second_difference(src, out):
    """``out[j] = src[j - 1] - 2 src[j] + src[j + 1]`` for 1 <= j < len - 1, in float64 (exact for integer counts)."""
    n = src.shape[0]
    for j in range(1, n - 1):
        out[j] = float(src[j - 1]) - 2.0 * float(src[j]) + float(src[j + 1])


@numba.njit(cache=True, nogil=True)
def noise_sigma(img, step=1, scratch=None):
    """Standard deviation of white noise in ``img`` (2-D, any real dtype), by Immerkaer's method.

    Convolves with the difference of two Laplacians ``[[1,-2,1],[-2,4,-2],[1,-2,1]]``, which cancels
    smooth structure, and scales the mean absolute response: ``sigma = sqrt(pi/2) / (6 (W-2)(H-2)) *
    sum |I * N|``. J. Immerkaer, "Fast noise variance estimation", Computer Vision and Image
    Understanding 64(2), 300-302 (1996). ``step`` > 1 evaluates the sum on every ``step``-th row
    only (an unbiased estimate at a fraction of the cost).

    The mask is separable (``[1,-2,1]`` along rows, then along columns), so each row's second difference is
    computed once, in float64, into ``scratch`` (float64, shape (3, cols); allocated when None) and the
    loops run over contiguous memory. Integer frames give the exact sum (integers below 2**53).
    """
    rows, cols = img.shape
    if rows < 3 or cols < 3:
        return 0.0
    h = np.empty((3, cols), np.float64) if scratch is None else scratch
    held = np.full(3, -1, np.int64)  # which row's second difference each slot holds
    acc = 0.0
    n = 0
    for i in range(1, rows - 1, step):
        for r in range(i - 1, i + 2):
            slot = r % 3
            if held[slot] != r:
                _second_difference(img[r], h[slot])
                held[slot] = r
        a = h[(i - 1) % 3]
        b = h[i % 3]
        c = h[(i + 1) % 3]
        for j in range(1, cols - 1):
            acc += abs(a[j] - 2.0 * b[j] + c[j])
        n += cols - 2
    return math.sqrt(math.pi / 2.0) * acc / (6.0 * n)
