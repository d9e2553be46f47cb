"""Scan distortions: where the probe really was for each pixel, and where columns appear in the frame.

Modelled effects (magnitudes from ../shared/notes/atom-finding.md): slow specimen drift (linear in
time, ~0.5 Angstrom across a frame), a mains-frequency wobble of the probe along the fast scan axis, and
per-line jitter (~0.08 Angstrom along the fast axis, ~0.03 Angstrom along the slow axis). Drift and
wobble are smooth functions of time; jitter is not. Ground truth for scoring is the column positions
moved by the smooth part only (:func:`apparent_positions`): scoring against undistorted positions
measures the drift, not the finder.

A specimen that moves on the simulator's clock (:mod:`beamloop.edge.sim.drift`) enters as ``motion``: a
callable giving the specimen's displacement (A, lab frame) at times since the frame started; a column at rest
position ``s`` is then under the probe where ``nominal + d(t) = s + motion(t)``. Without it (None) the
functions compute exactly what they did before drift was modelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from beamloop.edge.frame.scanframe import ScanFrame

Motion = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Specimen displacement ``(dx, dy)`` (A, arrays of the shape of ``t``) at times ``t`` since the frame started (s)."""


@dataclass(frozen=True)
class ScanDistortion:
    """Parameters of one frame's scan distortion.

    Attributes
    ----------
    drift_A_per_s : (vx, vy)
        Specimen drift velocity in specimen coordinates, Angstrom per second.
    wobble_A : float
        Amplitude of the sinusoidal probe wobble along the fast scan axis, Angstrom.
    wobble_hz : float
        Its frequency (mains: 50 or 60 Hz).
    wobble_phase : float
        Its phase at the start of the frame, radians.
    jitter_fast_A, jitter_slow_A : float
        Standard deviation of the per-line offset along the fast and slow scan axes, Angstrom.
    flyback_us : float
        Time between the end of one line and the start of the next, microseconds.
    """

    drift_A_per_s: tuple[float, float] = (0.0, 0.0)
    wobble_A: float = 0.0
    wobble_hz: float = 50.0
    wobble_phase: float = 0.0
    jitter_fast_A: float = 0.0
    jitter_slow_A: float = 0.0
    flyback_us: float = 20.0

    @classmethod
    def typical(cls, rng: np.random.Generator, frame_time_s: float, scale: float = 1.0) -> ScanDistortion:
        """Random distortion of typical size: drift ~0.5 Angstrom per frame in a random direction, a
        0.1 Angstrom 50 Hz wobble with random phase, jitter 0.08 / 0.03 Angstrom; all times ``scale``."""
        ang = rng.uniform(0, 2 * math.pi)
        v = 0.5 * scale / max(frame_time_s, 1e-9)
        return cls(
            drift_A_per_s=(v * math.cos(ang), v * math.sin(ang)),
            wobble_A=0.1 * scale,
            wobble_hz=50.0,
            wobble_phase=float(rng.uniform(0, 2 * math.pi)),
            jitter_fast_A=0.08 * scale,
            jitter_slow_A=0.03 * scale,
        )


def line_time_s(scan: ScanFrame, distortion: ScanDistortion) -> float:
    """Seconds from the start of one scan line to the start of the next."""
    return (scan.shape[1] * scan.dwell_us + distortion.flyback_us) * 1e-6


def _scan_axes(scan: ScanFrame) -> tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(math.radians(scan.rotation_deg)), math.sin(math.radians(scan.rotation_deg))
    return np.array([c, s]), np.array([-s, c])


def _smooth_displacement(scan: ScanFrame, d: ScanDistortion, t: np.ndarray, motion: Motion | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Drift plus wobble at times ``t`` (seconds since the frame started), Angstrom (dx, dy), less the
    specimen's own ``motion`` (the probe's position relative to the moving specimen)."""
    fast, _ = _scan_axes(scan)
    w = d.wobble_A * np.sin(2 * math.pi * d.wobble_hz * t + d.wobble_phase)
    dx, dy = d.drift_A_per_s[0] * t + w * fast[0], d.drift_A_per_s[1] * t + w * fast[1]
    if motion is not None:
        mx, my = motion(t)
        dx, dy = dx - mx, dy - my
    return dx, dy


def probe_positions(scan: ScanFrame, distortion: ScanDistortion, rng: np.random.Generator,
                    motion: Motion | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where the probe was, in specimen coordinates, while each pixel was acquired (relative to the specimen
    moved by ``motion``, module docstring).

    Returns
    -------
    x_A, y_A : ndarray, shape (rows, cols), float64
        Probe positions in Angstrom: the nominal raster plus drift, wobble and line jitter.
    """
    rows, cols = scan.shape
    jj, ii = np.meshgrid(np.arange(cols, dtype=float), np.arange(rows, dtype=float))
    x, y = scan.specimen_of_fraction((jj + 0.5) / cols, (ii + 0.5) / rows)
    t = ii * line_time_s(scan, distortion) + jj * scan.dwell_us * 1e-6
    dx, dy = _smooth_displacement(scan, distortion, t, motion)
    fast, slow = _scan_axes(scan)
    jf = rng.normal(0.0, distortion.jitter_fast_A, rows)[:, None] if distortion.jitter_fast_A > 0 else 0.0
    js = rng.normal(0.0, distortion.jitter_slow_A, rows)[:, None] if distortion.jitter_slow_A > 0 else 0.0
    return x + dx + jf * fast[0] + js * slow[0], y + dy + jf * fast[1] + js * slow[1]


def apparent_positions(scan: ScanFrame, distortion: ScanDistortion, xy_A: np.ndarray, iterations: int = 6,
                       motion: Motion | None = None) -> np.ndarray:
    """Pixel coordinates at which specimen points appear in the distorted frame (smooth part only).

    Solves ``nominal(p) + d(t(p)) = s`` for the pixel coordinate ``p`` of each specimen point ``s`` by
    fixed-point iteration (``d`` is drift plus wobble, ``t(p)`` the time at which the probe passed ``p``).

    Parameters
    ----------
    xy_A : ndarray, shape (n, 2)
        Specimen coordinates, Angstrom (rest positions when ``motion`` is given).
    motion : callable, optional
        The specimen's displacement (module docstring).

    Returns
    -------
    ndarray, shape (n, 2), float64
        ``(x_px, y_px)``: column index and row index, sub-pixel.
    """
    lt = line_time_s(scan, distortion)
    dwell = scan.dwell_us * 1e-6
    sx, sy = xy_A[:, 0], xy_A[:, 1]
    dx = dy = np.zeros(len(xy_A))
    for _ in range(iterations):
        fx, fy = scan.fraction_of_specimen(sx - dx, sy - dy)
        px, py = scan.pixel_of_fraction(fx, fy)
        dx, dy = _smooth_displacement(scan, distortion, py * lt + px * dwell, motion)
    return np.stack([px, py], axis=1)


def specimen_of_pixel(scan: ScanFrame, distortion: ScanDistortion, x_px, y_px) -> tuple[np.ndarray, np.ndarray]:
    """Specimen coordinates (Angstrom) under pixel coordinates, with the smooth distortion of that moment."""
    x_px, y_px = np.asarray(x_px, float), np.asarray(y_px, float)
    fx, fy = scan.fraction_of_pixel(x_px, y_px)
    x, y = scan.specimen_of_fraction(fx, fy)
    dx, dy = _smooth_displacement(scan, distortion, y_px * line_time_s(scan, distortion) + x_px * scan.dwell_us * 1e-6)
    return x + dx, y + dy
