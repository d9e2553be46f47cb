"""Estimating the scale of a lattice image with no calibration: column size and lattice period in pixels.

Method
------
1. Conditioning (:func:`condition`): the image as float64 with its offset removed (median), saturated
   pixels (the top value held by more than 0.1 % of the pixels, as a saturated 16-bit or 8-bit detector
   writes it) replaced by the median of the rest, and isolated outliers clipped at the 0.01 / 99.99 %
   quantiles. Integer counts, 16-bit raw data and float intensities are all taken as they are.
2. A first period from the Fourier transform: the radially averaged power spectrum of the Hann-windowed
   image, divided by a running median over radius (which removes the smooth spectrum of a specimen
   envelope, a support film and noise), has its strongest peak at the lattice's first reflection; among
   peaks within half of the strongest, the one of lowest frequency (largest spacing) is taken.
3. The envelope is removed on a scale of a few periods: the image minus its Gaussian blur of sigma
   :data:`HIGHPASS_PERIODS` times that spacing (a smooth background fit; cf. the rolling-ball background of
   S. R. Sternberg, "Biomedical image processing", Computer 16, 22 (1983), of which this is the linear
   counterpart).
4. The autocorrelation of the high-passed, windowed image (by FFT, radially averaged) has a central peak
   whose width follows the columns' width and rings whose first maximum sits at the lattice period. For
   Gaussian columns of standard deviation ``s`` the central peak is a Gaussian of ``s * sqrt(2)``, which falls
   to half height at ``1.665 s`` (2 sqrt(ln 2) s); the zero-lag value carries the white-noise variance, so
   the half height is measured against the value at one pixel, above the pedestal that an envelope's
   remainder leaves (the lowest value inside the first ring).
5. Confidence: the first ring's contrast, its autocorrelation value above the deepest value inside it,
   relative to the value at one pixel (0: no lattice, about 0.3-0.9 for clean lattices).

A user-given period replaces steps 2 and 4's period (the column sigma is still measured). When the first
ring's contrast is below :data:`MIN_CONFIDENCE` (a lattice in a small part of the field, strong envelope
edges), the Fourier spacing is taken as the period.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, median_filter

HIGHPASS_PERIODS = 1.0
"""Sigma of the Gaussian background fit removed before the autocorrelation, in first-reflection spacings."""

MIN_PERIOD_PX = 3.0
"""Shortest period the estimate accepts, pixels."""

MIN_CONFIDENCE = 0.1
"""Below this ring contrast the autocorrelation's period is not trusted and the Fourier spacing is used."""


@dataclass(frozen=True)
class ScaleEstimate:
    """Column standard deviation and lattice period, pixels.

    Attributes
    ----------
    column_sigma_px : float
        Gaussian-equivalent column standard deviation, pixels.
    period_px : float
        Lattice period (first autocorrelation ring), pixels.
    profile : ndarray
        Radial autocorrelation of the high-passed image (index = radius, pixels), 1 at zero lag.
    confidence : float
        Contrast of the first autocorrelation ring (step 5 of the module docstring), 0..1.
    fourier_spacing_px : float
        Spacing of the first Fourier reflection, pixels (NaN when the spectrum shows none).
    given : bool
        Whether the period was given by the user.
    """

    column_sigma_px: float
    period_px: float
    profile: np.ndarray
    confidence: float = float("nan")
    fourier_spacing_px: float = float("nan")
    given: bool = False


def condition(image: np.ndarray) -> np.ndarray:
    """Float64 copy of a 2-D image with offset, saturated pixels and outliers handled (step 1)."""
    a = np.asarray(image, np.float64)
    top = float(a.max())
    sat = a >= top
    if sat.mean() > 1e-3 and sat.mean() < 0.5:
        a = np.where(sat, np.median(a[~sat]), a)
    lo, hi = np.percentile(a, [0.01, 99.99])
    a = np.clip(a, lo, hi)
    return a - np.median(a)


def _radial_mean(values: np.ndarray, radius: np.ndarray) -> np.ndarray:
    rb = np.rint(radius).astype(np.int64).ravel()
    return np.bincount(rb, values.ravel()) / np.maximum(np.bincount(rb), 1)


def fourier_spacing(a: np.ndarray) -> float:
    """Spacing (pixels) of the first lattice reflection of a conditioned image (step 2); NaN when none stands out."""
    n = min(a.shape)
    w = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    spec = np.abs(np.fft.fftshift(np.fft.fft2((a - a.mean()) * w))) ** 2
    # radius in units of the smaller axis' frequency step, so that the index k means a spacing of n / k
    fy = (np.arange(a.shape[0]) - a.shape[0] // 2) / a.shape[0] * n
    fx = (np.arange(a.shape[1]) - a.shape[1] // 2) / a.shape[1] * n
    r = np.hypot(fy[:, None], fx[None, :])
    prof = _radial_mean(spec, r)[: n // 2]
    kmin = max(int(n / (min(a.shape) / 2.5)), 2)  # at least 2.5 periods in the frame
    kmax = int(n / MIN_PERIOD_PX)
    if kmax <= kmin + 3:
        return float("nan")
    logp = np.log(np.maximum(prof, 1e-300))
    trend = median_filter(logp, size=max(int(0.3 * kmax) | 1, 5), mode="nearest")
    excess = logp - trend
    cand = [k for k in range(kmin, min(kmax, len(prof) - 1))
            if excess[k] >= excess[k - 1] and excess[k] >= excess[k + 1] and excess[k] > 1.0]
    if not cand:
        return float("nan")
    best = max(excess[k] for k in cand)
    k = min(k for k in cand if excess[k] >= 0.5 * best)
    # parabolic refinement of the peak radius
    d = excess[k - 1] - 2 * excess[k] + excess[k + 1]
    kk = k + (0.5 * (excess[k - 1] - excess[k + 1]) / d if d < 0 else 0.0)
    return float(n / kk)


def radial_autocorrelation(image: np.ndarray, highpass_px: float | None = None) -> np.ndarray:
    """Radially averaged autocorrelation of ``image`` (2-D), normalised to 1 at zero lag; index = radius in px.

    ``highpass_px``: sigma of the Gaussian background fit removed first (default: an eighth of the smaller side).
    """
    a = np.asarray(image, float)
    a = a - gaussian_filter(a, highpass_px if highpass_px else max(min(a.shape) / 8, 2.0))
    w = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    spec = np.fft.rfft2(a * w)
    acf = np.fft.fftshift(np.fft.irfft2(np.abs(spec) ** 2, s=a.shape))
    cy, cx = a.shape[0] // 2, a.shape[1] // 2
    yy, xx = np.indices(a.shape)
    prof = _radial_mean(acf, np.hypot(yy - cy, xx - cx))
    return prof / prof[0] if prof[0] > 0 else prof


def estimate_scale(image: np.ndarray, period_px: float | None = None) -> ScaleEstimate:
    """Estimate column size and lattice period of a 2-D lattice image (see the module docstring).

    Parameters
    ----------
    image : ndarray (rows, cols)
        Counts (any integer type, with any offset) or intensities.
    period_px : float, optional
        The lattice period if known (pixels): then only the column sigma is estimated.

    Returns
    -------
    ScaleEstimate

    Raises
    ------
    ValueError
        The image is smaller than 16 x 16 pixels or flat, or its autocorrelation shows no lattice period
        (and none was given).
    """
    if image.ndim != 2 or min(image.shape) < 16:
        raise ValueError(f"need a 2-D image of at least 16 x 16 pixels to estimate its scale, got {image.shape}")
    a = condition(image)
    if not np.any(a):
        raise ValueError("image is flat; give the pixel size or column spacing")
    d0 = float(period_px) if period_px else fourier_spacing(a)
    hp = HIGHPASS_PERIODS * d0 if np.isfinite(d0) else None
    prof = radial_autocorrelation(a, hp)
    rmax = min(image.shape) // 3
    p = prof[: rmax + 1]
    if not np.isfinite(p).all() or p[1] <= 0:
        raise ValueError("image is flat or has no correlated structure; give the pixel size or column spacing")
    q = np.convolve(p, np.ones(3) / 3, mode="same")
    # the central peak's half height above the pedestal left by the envelope and the support: the lowest
    # value inside the first ring (the expected ring at the Fourier spacing, or the given period)
    ring = float(period_px) if period_px else (d0 if np.isfinite(d0) else np.nan)
    base = float(min(q[2:int(ring) + 1].min(), 0.5 * p[1])) if np.isfinite(ring) and int(ring) > 3 else 0.0
    base = max(base, 0.0)
    level = base + 0.5 * (p[1] - base)
    half = np.flatnonzero(p[1:] < level)
    if len(half) == 0:
        raise ValueError("autocorrelation never falls to half height; give the pixel size or column spacing")
    k = half[0] + 1
    # linear interpolation of the half-height radius between k-1 and k
    r_half = (k - 1) + (p[k - 1] - level) / max(p[k - 1] - p[k], 1e-12)
    sigma = max(r_half, 1.0) / 1.665
    peaks = [r for r in range(max(k, 2), len(q) - 1) if q[r] >= q[r - 1] and q[r] > q[r + 1] and q[r] > 0]
    if period_px:
        r0 = int(round(period_px))
        conf = float((q[min(r0, len(q) - 1)] - q[k:max(r0, k + 1)].min()) / p[1]) if r0 > k else float("nan")
        return ScaleEstimate(float(sigma), float(period_px), prof, conf, d0, True)
    if not peaks:
        raise ValueError("no lattice period found in the autocorrelation; give the pixel size or column spacing")
    r0 = peaks[0]
    conf = float((q[r0] - q[k:r0 + 1].min()) / p[1])
    c = q[r0 - 1] - 2 * q[r0] + q[r0 + 1]
    period = r0 + (0.5 * (q[r0 - 1] - q[r0 + 1]) / c if c < 0 else 0.0)
    if conf < MIN_CONFIDENCE and np.isfinite(d0):
        # the autocorrelation shows no clear ring (lattice in a small part of the field, strong envelope
        # edges): the Fourier reflection's spacing is the period, and the column sigma at most its 1/5.5
        return ScaleEstimate(float(min(sigma, d0 / 5.5)), float(d0), prof, conf, d0, False)
    return ScaleEstimate(float(sigma), float(period), prof, conf, d0, False)
