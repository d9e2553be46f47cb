"""CUDA kernels (numba.cuda) of the preprocess stage: the separable Gaussian with reflected borders and
Immerkaer's noise sum reduced in shared memory, the device twins of :mod:`beamloop.edge.kernels.smooth`.

Compiled at their first launch, so importing this module needs no CUDA device; they also run under
numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``). Module-level functions: numba's CUDA simulator swaps
the ``cuda`` global of a kernel, not a closure's.
"""

from __future__ import annotations

from numba import cuda, float32, float64

THREADS_2D = (16, 16)
"""Threads per block of the smoothing kernels."""
THREADS_1D = 256
"""Threads per block of the noise reduction (a power of two)."""




@cuda.jit(device=True)
def reflect(i, n):
    """scipy.ndimage's ``"reflect"`` index fold on the device (as :func:`beamloop.edge.kernels.smooth.reflect`)."""
    if i < 0:
        return -i - 1
    if i >= n:
        return 2 * n - i - 1
    return i


@cuda.jit
def smooth_rows(src, k, tmp):
    """Row pass of the separable Gaussian: ``tmp[i, j] = sum_t k[t] src[i, reflect(j - r + t)]`` (one thread a
    pixel)."""
    i, j = cuda.grid(2)
    rows, cols = src.shape
    if i < rows and j < cols:
        r = (k.shape[0] - 1) // 2
        acc = k[0] * float32(src[i, reflect(j - r, cols)])
        for t in range(1, k.shape[0]):
            acc += k[t] * float32(src[i, reflect(j - r + t, cols)])
        tmp[i, j] = acc


@cuda.jit
def smooth_cols(tmp, k, dst):
    """Column pass of the separable Gaussian into float32 ``dst`` (one thread a pixel)."""
    i, j = cuda.grid(2)
    rows, cols = tmp.shape
    if i < rows and j < cols:
        r = (k.shape[0] - 1) // 2
        acc = k[0] * tmp[reflect(i - r, rows), j]
        for t in range(1, k.shape[0]):
            acc += k[t] * tmp[reflect(i - r + t, rows), j]
        dst[i, j] = acc


@cuda.jit
def noise_sum(img, step, acc):
    """Adds the sum of |Immerkaer operator| (J. Immerkaer, CVIU 64, 300 (1996)) over the frame to ``acc[0]``."""
    # sum of |Immerkaer operator| over rows 1, 1 + step, ... < rows - 1 and columns 1 .. cols - 2; each
    # thread sums a strided share, the block reduces in shared memory, one atomic add per block
    rows, cols = img.shape
    nr = (rows - 2 + step - 1) // step
    total = nr * (cols - 2)
    part = cuda.shared.array(THREADS_1D, dtype=float64)
    tid = cuda.threadIdx.x
    s = 0.0
    idx = cuda.grid(1)
    stride = cuda.gridsize(1)
    while idx < total:
        i = 1 + (idx // (cols - 2)) * step
        j = 1 + idx % (cols - 2)
        v = (float64(img[i - 1, j - 1]) - 2.0 * img[i - 1, j] + img[i - 1, j + 1]
             - 2.0 * img[i, j - 1] + 4.0 * img[i, j] - 2.0 * img[i, j + 1]
             + img[i + 1, j - 1] - 2.0 * img[i + 1, j] + img[i + 1, j + 1])
        s += abs(v)
        idx += stride
    part[tid] = s
    cuda.syncthreads()
    half = THREADS_1D // 2
    while half > 0:
        if tid < half:
            part[tid] += part[tid + half]
        cuda.syncthreads()
        half //= 2
    if tid == 0:
        cuda.atomic.add(acc, 0, part[0])
