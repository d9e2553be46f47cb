"""Estimating the scale of a lattice image with no calibration: column size and lattice period in pixels.

The autocorrelation of a lattice image (computed by FFT, with the slow background removed and a Hann
window against edge effects) has a central peak whose width follows the columns' width and rings whose
first maximum sits at the dominant lattice period. For Gaussian columns of standard deviation ``s``
the central peak is a Gaussian of ``s * sqrt(2)``, which falls to half height at ``1.665 s``
(2 sqrt(ln 2) s). The zero-lag value carries the white-noise variance, so the half height is measured
against the value at one pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter


@dataclass(frozen=True)
class ScaleEstimate:
    """Column standard deviation and lattice period, pixels; ``profile`` is the radial autocorrelation."""

    column_sigma_px: float
    period_px: float
    profile: np.ndarray


def radial_autocorrelation(image: np.ndarray) -> np.ndarray:
    """Radially averaged autocorrelation of ``image`` (2-D), normalised to 1 at zero lag; index = radius in px."""
    a = np.asarray(image, float)
    a = a - gaussian_filter(a, max(min(a.shape) / 8, 2.0))
    w = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    spec = np.fft.rfft2(a * w)
    acf = np.fft.fftshift(np.fft.irfft2(np.abs(spec) ** 2, s=a.shape))
    cy, cx = a.shape[0] // 2, a.shape[1] // 2
    yy, xx = np.indices(a.shape)
    rb = np.rint(np.hypot(yy - cy, xx - cx)).astype(int)
    prof = np.bincount(rb.ravel(), acf.ravel()) / np.maximum(np.bincount(rb.ravel()), 1)
    return prof / prof[0] if prof[0] > 0 else prof


def estimate_scale(image: np.ndarray) -> ScaleEstimate:
    """Estimate column size and lattice period of a 2-D lattice image (see the module docstring).

    Raises
    ------
    ValueError
        The image is smaller than 16 x 16 pixels or flat, or its autocorrelation shows no lattice period.
    """
    if image.ndim != 2 or min(image.shape) < 16:
        raise ValueError(f"need a 2-D image of at least 16 x 16 pixels to estimate its scale, got {image.shape}")
    prof = radial_autocorrelation(image)
    rmax = min(image.shape) // 3
    p = prof[: rmax + 1]
    if not np.isfinite(p).all() or p[1] <= 0:
        raise ValueError("image is flat or has no correlated structure; give the pixel size or column spacing")
    half = np.flatnonzero(p[1:] < 0.5 * p[1])
    if len(half) == 0:
        raise ValueError("autocorrelation never falls to half height; give the pixel size or column spacing")
    k = half[0] + 1
    # linear interpolation of the half-height radius between k-1 and k
    r_half = (k - 1) + (p[k - 1] - 0.5 * p[1]) / max(p[k - 1] - p[k], 1e-12)
    sigma = max(r_half, 1.0) / 1.665
    q = np.convolve(p, np.ones(3) / 3, mode="same")
    peaks = [r for r in range(max(k, 2), len(q) - 1) if q[r] >= q[r - 1] and q[r] > q[r + 1] and q[r] > 0]
    if not peaks:
        raise ValueError("no lattice period found in the autocorrelation; give the pixel size or column spacing")
    return ScaleEstimate(float(sigma), float(peaks[0]), prof)
