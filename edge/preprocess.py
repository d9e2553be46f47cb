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
def _to_float(src, dst):
    """Copy ``src`` into float32 ``dst``; return the number of non-finite pixels."""
    bad = 0
    rows, cols = src.shape
    for i in range(rows):
        for j in range(cols):
            v = np.float32(src[i, j])
            if not np.isfinite(v):
                bad += 1
                v = np.float32(0.0)
            dst[i, j] = v
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
def _smooth(src, k, tmp, dst):
    """Separable convolution of ``src`` with kernel ``k`` along rows then columns (reflect borders)."""
    rows, cols = src.shape
    r = (k.shape[0] - 1) // 2
    for i in range(rows):
        for j in range(cols):
            acc = np.float32(0.0)
            if j >= r and j < cols - r:
                for t in range(-r, r + 1):
                    acc += k[t + r] * src[i, j + t]
            else:
                for t in range(-r, r + 1):
                    acc += k[t + r] * src[i, _reflect(j + t, cols)]
            tmp[i, j] = acc
    for i in range(rows):
        if i >= r and i < rows - r:
            for j in range(cols):
                dst[i, j] = np.float32(0.0)
            for t in range(-r, r + 1):
                w = k[t + r]
                for j in range(cols):
                    dst[i, j] += w * tmp[i + t, j]
        else:
            for j in range(cols):
                acc = np.float32(0.0)
                for t in range(-r, r + 1):
                    acc += k[t + r] * tmp[_reflect(i + t, rows), j]
                dst[i, j] = acc


@numba.njit(cache=True, nogil=True)
def noise_sigma(img):
    """Standard deviation of white noise in ``img`` (float32, 2-D), by Immerkaer's method.

    Convolves with the difference of two Laplacians ``[[1,-2,1],[-2,4,-2],[1,-2,1]]``, which cancels
    smooth structure, and scales the mean absolute response: ``sigma = sqrt(pi/2) / (6 (W-2)(H-2)) *
    sum |I * N|``. J. Immerkaer, "Fast noise variance estimation", Computer Vision and Image
    Understanding 64(2), 300-302 (1996).
    """
    rows, cols = img.shape
    if rows < 3 or cols < 3:
        return 0.0
    acc = 0.0
    for i in range(1, rows - 1):
        for j in range(1, cols - 1):
            v = (img[i - 1, j - 1] - 2 * img[i - 1, j] + img[i - 1, j + 1]
                 - 2 * img[i, j - 1] + 4 * img[i, j] - 2 * img[i, j + 1]
                 + img[i + 1, j - 1] - 2 * img[i + 1, j] + img[i + 1, j + 1])
            acc += abs(v)
    return math.sqrt(math.pi / 2.0) * acc / (6.0 * (cols - 2) * (rows - 2))


class Preprocessor:
    """Converts frames to float32 and smooths them with a Gaussian, in preallocated buffers.

    Parameters
    ----------
    sigma_px : float
        Gaussian sigma, pixels. For atomic columns, a matched filter: about the column's own sigma
        (e.g. 0.3 Angstrom / pixel size).

    Notes
    -----
    Buffers are (re)allocated when the frame shape changes; the arrays returned by :meth:`run` are
    reused by the next call.
    """

    def __init__(self, sigma_px: float) -> None:
        self.sigma_px = float(sigma_px)
        self.kernel = gaussian_kernel(sigma_px)
        self._shape: tuple[int, int] | None = None

    def _allocate(self, shape: tuple[int, int]) -> None:
        self.image = np.empty(shape, np.float32)
        self.smooth = np.empty(shape, np.float32)
        self._tmp = np.empty(shape, np.float32)
        self._shape = shape

    def run(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Convert and smooth one frame.

        Parameters
        ----------
        frame : ndarray, shape (rows, cols), any integer or float dtype
            Detector counts or intensities.

        Returns
        -------
        image : ndarray (rows, cols) float32
            The frame as float32 (a reused buffer).
        smooth : ndarray (rows, cols) float32
            The Gaussian-smoothed frame (a reused buffer).
        noise : float
            Noise standard deviation of ``image`` (:func:`noise_sigma`).

        Raises
        ------
        FrameError
            Not 2-D, smaller than the smoothing kernel, or containing NaN or infinite pixels.
        """
        if frame.ndim != 2:
            raise FrameError(f"frame must be 2-D (rows, cols), got shape {frame.shape}")
        if min(frame.shape) < self.kernel.shape[0] // 2 + 1:
            raise FrameError(f"frame {frame.shape} is smaller than the smoothing kernel ({self.kernel.shape[0]} px)")
        if frame.dtype.kind not in "uif" or frame.dtype.itemsize > 8:
            raise FrameError(f"frame dtype {frame.dtype} is not a real number type")
        if self._shape != frame.shape:
            self._allocate(frame.shape)
        bad = _to_float(frame, self.image)
        if bad:
            raise FrameError(f"frame has {bad} non-finite pixels (NaN or infinity)")
        _smooth(self.image, self.kernel, self._tmp, self.smooth)
        return self.image, self.smooth, float(noise_sigma(self.image))
