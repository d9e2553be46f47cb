"""Background kernels (numba): a smooth background surface from block quantiles, subtracted in one pass.

The background of a HAADF frame (a support film, a nanoparticle's projected-thickness envelope, a
thickness gradient) varies on scales of several lattice periods; the columns stand on it. A low quantile
of the frame in blocks about one period wide sits in the valleys between columns; those block values,
smoothed across neighbouring blocks and interpolated bilinearly, are a smooth fit of the background (the
linear, block-wise counterpart of the rolling ball of S. R. Sternberg, "Biomedical image processing",
Computer 16, 22 (1983); scikit-image's ``restoration.rolling_ball`` costs about 100 times more here).

Plain functions over caller-owned buffers: nothing here allocates per frame.
"""

from __future__ import annotations

import numba
import numpy as np


def grid_shape(shape: tuple[int, int], block: int) -> tuple[int, int]:
    """Blocks per axis for a frame of ``shape`` cut into ``block``-pixel squares (the last one may be partial)."""
    return (-(-int(shape[0]) // block), -(-int(shape[1]) // block))


@numba.njit(cache=True, nogil=True)
def window_quantile(img, i0, i1, j0, j1, step, quantile, scratch):
    """The ``quantile`` (0..1, nearest rank) of the samples ``img[i0:i1:step, j0:j1:step]`` (a non-empty
    window of a 2-D real array), as float32: the q-th smallest is kept by insertion into a sorted list of
    the q + 1 smallest (``scratch``, float32, long enough for them), so no sort and no allocation."""
    m = ((i1 - i0 + step - 1) // step) * ((j1 - j0 + step - 1) // step)
    q = min(int(quantile * (m - 1) + 0.5), m - 1)
    filled = 0
    for i in range(i0, i1, step):
        for j in range(j0, j1, step):
            v = np.float32(img[i, j])
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
    return scratch[q]


@numba.njit(cache=True, nogil=True)
def block_quantiles(img, block, quantile, scratch, grid):
    """A low quantile of ``img`` (2-D, any real dtype) in each ``block`` x ``block`` square, into ``grid``
    (float32, :func:`grid_shape`), from about 8 x 8 evenly strided samples per block; the q-th smallest
    is kept by insertion into a sorted list (``scratch``, float32, at least 257 long)."""
    rows, cols = img.shape
    gy, gx = grid.shape
    step = max(block // 8, 1)
    for bi in range(gy):
        i0 = bi * block
        i1 = min(i0 + block, rows)
        for bj in range(gx):
            j0 = bj * block
            j1 = min(j0 + block, cols)
            grid[bi, bj] = window_quantile(img, i0, i1, j0, j1, step, quantile, scratch)


@numba.njit(cache=True, nogil=True)
def smooth_grid(grid, tmp, passes):
    """``passes`` times a 3 x 3 mean of ``grid`` (edge blocks average their existing neighbours), in place;
    ``tmp`` has the grid's shape."""
    gy, gx = grid.shape
    for _ in range(passes):
        for i in range(gy):
            for j in range(gx):
                s = 0.0
                c = 0
                for a in range(max(i - 1, 0), min(i + 2, gy)):
                    for b in range(max(j - 1, 0), min(j + 2, gx)):
                        s += grid[a, b]
                        c += 1
                tmp[i, j] = s / c
        for i in range(gy):
            for j in range(gx):
                grid[i, j] = tmp[i, j]


def column_weights(cols: int, block: int, gx: int) -> tuple[np.ndarray, np.ndarray]:
    """Left block index (int64) and weight of the right one (float32) of every frame column for the bilinear
    surface of :func:`subtract_surface` (block centres at ``(k + 0.5) * block``, clamped at the outermost)."""
    f = np.clip((np.arange(cols) + 0.5) / block - 0.5, 0.0, max(gx - 1, 0))
    b = np.minimum(np.floor(f).astype(np.int64), max(gx - 2, 0))
    w = (f - b).astype(np.float32) if gx > 1 else np.zeros(cols, np.float32)
    return b, w


@numba.njit(cache=True, nogil=True)
def subtract_surface(img, grid, block, jb, jw, rowbuf, out):
    """``out = img - surface`` (float32), the surface interpolated bilinearly between block centres (clamped
    beyond the outermost centres): per row the grid is interpolated along y into ``rowbuf`` (block-grid
    width + 1), then along x with the per-column indices ``jb`` and weights ``jw`` of :func:`column_weights`."""
    rows, cols = img.shape
    gy, gx = grid.shape
    inv = 1.0 / block
    for i in range(rows):
        fy = (i + 0.5) * inv - 0.5
        if fy < 0.0:
            fy = 0.0
        if fy > gy - 1:
            fy = gy - 1.0
        a = min(int(fy), gy - 2) if gy > 1 else 0
        wy = fy - a if gy > 1 else 0.0
        a1 = min(a + 1, gy - 1)
        for g in range(gx):
            rowbuf[g] = (1.0 - wy) * grid[a, g] + wy * grid[a1, g]
        rowbuf[gx] = rowbuf[gx - 1]
        r = img[i]
        o = out[i]
        for j in range(cols):
            b = jb[j]
            w = jw[j]
            o[j] = np.float32(r[j]) - ((1.0 - w) * rowbuf[b] + w * rowbuf[b + 1])
