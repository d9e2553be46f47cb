"""4D-STEM reduction kernels (numba, CPU and CUDA): masked sums over runs of detector pixels, centre of
mass, and scattering results into scan images. The reductions that use them are in
:mod:`beamloop.edge.analysis.live4d`.

CUDA kernels compile at their first launch, so importing this module needs no device.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import cuda


@numba.njit(cache=True, nogil=True, fastmath=True)
def virtual_runs(flat, run_det, run_start, run_len, run_weight, out):
    """Sum runs of consecutive pixels with one weight (contiguous: the inner loop vectorises)."""
    n = flat.shape[0]
    for i in range(n):
        f = flat[i]
        for k in range(out.shape[1]):
            out[i, k] = 0.0
        for r in range(run_start.shape[0]):
            a = run_start[r]
            s = 0.0
            for p in range(a, a + run_len[r]):
                s += f[p]
            out[i, run_det[r]] += run_weight[r] * s


@numba.njit(cache=True, nogil=True)
def virtual_runs_int(flat, run_det, run_start, run_len, run_weight, out):
    """As :func:`virtual_runs` for integer counts: exact integer sums per run."""
    n = flat.shape[0]
    for i in range(n):
        f = flat[i]
        for k in range(out.shape[1]):
            out[i, k] = 0.0
        for r in range(run_start.shape[0]):
            a = run_start[r]
            s = np.int64(0)
            for p in range(a, a + run_len[r]):
                s += np.int64(f[p])
            out[i, run_det[r]] += run_weight[r] * s


@numba.njit(cache=True, nogil=True)
def com_sums(flat, cols, pix, cy, cx, out):
    """Per frame of ``flat`` (n, pixels): ``out[i] = [sum, com_row - cy, com_col - cx]`` over the flat pixel
    indices ``pix`` of a detector with ``cols`` columns (0 shifts for an empty frame)."""
    n = flat.shape[0]
    for i in range(n):
        f = flat[i]
        s = 0.0
        sy = 0.0
        sx = 0.0
        for m in range(pix.shape[0]):
            p = pix[m]
            v = f[p]
            if v != 0:
                s += v
                sy += v * (p // cols)
                sx += v * (p % cols)
        out[i, 0] = s
        if s > 0:
            out[i, 1] = sy / s - cy
            out[i, 2] = sx / s - cx
        else:
            out[i, 1] = 0.0
            out[i, 2] = 0.0


@numba.njit(cache=True, nogil=True)
def scatter_rows(ids, values, npos, images, seen):
    """``images[k, ids[i] % npos] = values[i, k]`` and mark the positions ``seen``."""
    for i in range(ids.shape[0]):
        p = ids[i] % npos
        for k in range(values.shape[1]):
            images[k, p] = values[i, k]
        seen[p] = True


@cuda.jit
def virtual_cuda(flat, start, pix, weight, out):  # pragma: no cover - needs a CUDA device
    """CSR-masked sums on the device, one thread per (frame, detector)."""
    i, k = cuda.grid(2)
    if i < flat.shape[0] and k < start.shape[0] - 1:
        acc = 0.0
        for m in range(start[k], start[k + 1]):
            acc += weight[m] * flat[i, pix[m]]
        out[i, k] = acc


@cuda.jit
def com_cuda(flat, cols, pix, cy, cx, out):  # pragma: no cover - needs a CUDA device
    """:func:`com_sums` on the device, one thread per frame."""
    i = cuda.grid(1)
    if i < flat.shape[0]:
        s = 0.0
        sy = 0.0
        sx = 0.0
        for m in range(pix.shape[0]):
            p = pix[m]
            v = flat[i, p]
            s += v
            sy += v * (p // cols)
            sx += v * (p % cols)
        out[i, 0] = s
        out[i, 1] = sy / s - cy if s > 0 else 0.0
        out[i, 2] = sx / s - cx if s > 0 else 0.0
