"""Frame preprocessing (numba): conversion to float32, a separable Gaussian smoothing, and a noise estimate.

All work happens in buffers allocated once per frame shape (:class:`Preprocessor`); the per-frame path
allocates nothing.
"""

from __future__ import annotations

import math

import numba
import numpy as np


class FrameError(ValueError):
    """A frame that cannot be processed: wrong number of dimensions, empty, or with non-finite pixels."""


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
def _count_nonfinite(src):
    """Number of NaN or infinite pixels of a float frame."""
    bad = 0
    rows, cols = src.shape
    for i in range(rows):
        for j in range(cols):
            if not np.isfinite(src[i, j]):
                bad += 1
    return bad


@numba.njit(cache=True, nogil=True)
def _reflect(i, n):
    # scipy.ndimage "reflect" (d c b a | a b c d | d c b a), valid while the kernel is shorter than the frame
    if i < 0:
        return -i - 1
    if i >= n:
        return 2 * n - i - 1
    return i


@numba.njit(cache=True, nogil=True)
def _smooth(src, k, row, tmp, dst):
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
            row[j] = np.float32(src[i, _reflect(j - r, cols)])
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
        src0 = tmp[_reflect(i - r, rows)]
        for j in range(cols):
            out[j] = w * src0[j]
        for t in range(1, nk):
            w = k[t]
            srct = tmp[_reflect(i - r + t, rows)]
            for j in range(cols):
                out[j] += w * srct[j]


@numba.njit(cache=True, nogil=True)
def noise_sigma(img, step=1):
    """Standard deviation of white noise in ``img`` (2-D, any real dtype), by Immerkaer's method.

    Convolves with the difference of two Laplacians ``[[1,-2,1],[-2,4,-2],[1,-2,1]]``, which cancels
    smooth structure, and scales the mean absolute response: ``sigma = sqrt(pi/2) / (6 (W-2)(H-2)) *
    sum |I * N|``. J. Immerkaer, "Fast noise variance estimation", Computer Vision and Image
    Understanding 64(2), 300-302 (1996). ``step`` > 1 evaluates the sum on every ``step``-th row
    only (an unbiased estimate at a fraction of the cost).
    """
    rows, cols = img.shape
    if rows < 3 or cols < 3:
        return 0.0
    acc = 0.0
    n = 0
    for i in range(1, rows - 1, step):
        a = img[i - 1]
        b = img[i]
        c = img[i + 1]
        for j in range(1, cols - 1):
            v = (float(a[j - 1]) - 2.0 * a[j] + a[j + 1]
                 - 2.0 * b[j - 1] + 4.0 * b[j] - 2.0 * b[j + 1]
                 + c[j - 1] - 2.0 * c[j] + c[j + 1])
            acc += abs(v)
        n += cols - 2
    return math.sqrt(math.pi / 2.0) * acc / (6.0 * n)


class Preprocessor:
    """Smooths frames with a Gaussian and estimates their noise, in preallocated buffers.

    Parameters
    ----------
    sigma_px : float
        Gaussian sigma, pixels. For atomic columns, a matched filter: about the column's own sigma
        (e.g. 0.3 Angstrom / pixel size).
    noise_row_step : int
        Evaluate the noise estimate on every n-th row (see :func:`noise_sigma`).

    Notes
    -----
    Buffers are (re)allocated when the frame shape changes; the array returned by :meth:`run` is
    reused by the next call. Integer frames are read as they are (converted to float32 on the fly).
    """

    def __init__(self, sigma_px: float, noise_row_step: int = 2) -> None:
        self.sigma_px = float(sigma_px)
        self.kernel = gaussian_kernel(sigma_px)
        self.noise_row_step = int(noise_row_step)
        self._shape: tuple[int, int] | None = None

    def _allocate(self, shape: tuple[int, int]) -> None:
        self.smooth = np.empty(shape, np.float32)
        self._tmp = np.empty(shape, np.float32)
        self._row = np.empty(shape[1] + self.kernel.shape[0] - 1, np.float32)
        self._shape = shape

    def run(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """Smooth one frame and estimate its noise.

        Parameters
        ----------
        frame : ndarray, shape (rows, cols), integer or float dtype
            Detector counts or intensities.

        Returns
        -------
        smooth : ndarray (rows, cols) float32
            The Gaussian-smoothed frame (a reused buffer).
        noise : float
            Noise standard deviation of the raw frame (:func:`noise_sigma`).

        Raises
        ------
        FrameError
            Not 2-D, smaller than the smoothing kernel, not a real number type, or containing NaN or
            infinite pixels.
        """
        if frame.ndim != 2:
            raise FrameError(f"frame must be 2-D (rows, cols), got shape {frame.shape}")
        if min(frame.shape) < self.kernel.shape[0] // 2 + 1:
            raise FrameError(f"frame {frame.shape} is smaller than the smoothing kernel ({self.kernel.shape[0]} px)")
        if frame.dtype.kind not in "uif" or frame.dtype.itemsize > 8 or frame.dtype == np.float16:
            raise FrameError(f"frame dtype {frame.dtype} is not supported: use an integer type, float32 or float64")
        if frame.dtype.kind == "f":
            bad = _count_nonfinite(frame)
            if bad:
                raise FrameError(f"frame has {bad} non-finite pixels (NaN or infinity)")
        if self._shape != frame.shape:
            self._allocate(frame.shape)
        _smooth(frame, self.kernel, self._row, self._tmp, self.smooth)
        return self.smooth, float(noise_sigma(frame, self.noise_row_step))
