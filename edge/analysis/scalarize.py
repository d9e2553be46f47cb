"""Scalarizers: one measurement at a probe position (a diffraction pattern, an EELS spectrum) -> one number.

An automated experiment that learns where a property is extreme (deep kernel learning,
:mod:`beamloop.edge.experiments.dkl`) needs each measurement reduced to a scalar with a unit. The
reductions here are plugins in a registry, :data:`SCALARIZERS`; :func:`make_scalarizer` binds one to its
settings (detector geometry, spectrometer calibration, edge) and returns a :class:`BoundScalarizer`, a
callable ``array -> float``.

==========================  ===========  ==========================================================================
name                        input        value
==========================  ===========  ==========================================================================
``com_magnitude``           pattern      length of the pattern's centre of mass from the reference centre, detector px
``com_direction``           pattern      its direction, radians counter-clockwise from +x (columns) in (x, y)
``bf_adf_ratio``            pattern      virtual bright field over virtual annular dark field (dimensionless)
``adf_mean``                ADF samples  mean detector counts (counts)
``eels_edge_integral``      spectrum     counts of one edge over a window after power-law background subtraction
``eels_edge_ratio``         spectrum     ratio of two such edge integrals (e.g. S L2,3 / Mo M4,5)
``eels_onset``              spectrum     step-equivalent onset of the background-subtracted edge, eV
``eels_white_line_ratio``   spectrum     L3 / L2 white-line intensity after background and continuum-step
                                         subtraction (dimensionless)
==========================  ===========  ==========================================================================

Inputs: a *pattern* is one diffraction pattern, ``(det_rows, det_cols)``, any real dtype (counts); a
*spectrum* is ``(channels,)`` counts, any real dtype, on the energy axis ``offset_eV + dispersion_eV * k``
(channel centres, eV); *ADF samples* any shape.

EELS background (R. F. Egerton, *Electron Energy-Loss Spectroscopy in the Electron Microscope*, 3rd ed.,
Springer 2011, sec. 4.4.2): the pre-edge background is fitted by the power law ``A E^-r`` over a window
before the edge (:func:`fit_power_law`: least squares on ``log I`` against ``log E`` weighted by the counts,
the Poisson variance of ``log I`` being ``1 / I``) and extrapolated under the edge. The edge integral over
a window ``Delta`` is the signal the ratio method quantifies with (Egerton eq. 4.65,
``N_a / N_b = I_a(beta, Delta) sigma_b(beta, Delta) / (I_b(beta, Delta) sigma_a(beta, Delta))``).
White-line ratios follow R. D. Leapman, L. A. Grunes & P. L. Fejes, Phys. Rev. B 26, 614 (1982) and
D. H. Pearson, C. C. Ahn & B. Fultz, Phys. Rev. B 47, 8471 (1993): the continuum under the L3 and L2 lines
is a double step of heights 2:1 at the two line energies, and the line intensities are the integrals of
what lies above it.

:data:`EDGES` lists the nominal edges of the simulated specimens (MoS2: S L2,3, Mo M4,5; SrTiO3: Ti L2,3,
O K) with the windows used here; the EELS simulator (:mod:`beamloop.edge.sim.eels`) places its edges at the
same energies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# --- edges --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EdgeWindows:
    """Nominal energy and analysis windows of one core-loss edge.

    Attributes
    ----------
    name : str
        ``"<element>_<shell>"``, e.g. ``"S_L2,3"``.
    onset_eV : float
        Nominal onset (of the L3 / M5 component for a spin-orbit doublet), eV.
    background_eV : (float, float)
        Pre-edge window for the power-law fit, eV.
    integral_eV : (float, float)
        Window of the edge integral, eV.
    spin_orbit_eV : float
        L3-L2 (or M5-M4) splitting, eV; 0 for a single edge.
    """

    name: str
    onset_eV: float
    background_eV: tuple[float, float]
    integral_eV: tuple[float, float]
    spin_orbit_eV: float = 0.0


EDGES: dict[str, EdgeWindows] = {
    # MoS2: S L2,3 at 165 eV (L3; L2 1.2 eV above), Mo M4,5 delayed edge at 227 eV (M5; M4 3.1 eV above)
    "S_L2,3": EdgeWindows("S_L2,3", 165.0, (140.0, 160.0), (163.0, 193.0), 1.2),
    "Mo_M4,5": EdgeWindows("Mo_M4,5", 227.0, (200.0, 222.0), (225.0, 255.0), 3.1),
    # SrTiO3: Ti L2,3 white lines at 456 / 462 eV (L3 / L2), O K at 532 eV
    "Ti_L2,3": EdgeWindows("Ti_L2,3", 456.0, (420.0, 450.0), (453.0, 475.0), 5.6),
    "O_K": EdgeWindows("O_K", 532.0, (500.0, 526.0), (529.0, 560.0), 0.0),
}
"""Edges of the simulated specimens by name (see :class:`EdgeWindows`).

Onsets: R. F. Egerton, *Electron Energy-Loss Spectroscopy in the Electron Microscope*, 3rd ed., Springer
2011, appendix D (table of edge energies: S L3 165, Mo M5 227, Ti L3 456, O K 532 eV); C. C. Ahn &
O. L. Krivanek, *EELS Atlas* (Gatan / ASU HREM Facility, 1983); spin-orbit splittings from the same
tables (Ti L3-L2 5.6 eV: Leapman, Grunes & Fejes 1982)."""


def energy_axis(channels: int, offset_eV: float, dispersion_eV: float) -> np.ndarray:
    """Channel centres ``offset_eV + dispersion_eV * k``, ``k = 0 .. channels - 1``; float64, eV.

    Raises ``ValueError`` for a non-positive dispersion or channel count.
    """
    if not (channels >= 1 and dispersion_eV > 0 and math.isfinite(dispersion_eV) and math.isfinite(offset_eV)):
        raise ValueError(f"need channels >= 1 and a finite dispersion > 0, got {channels}, {dispersion_eV}")
    return offset_eV + dispersion_eV * np.arange(channels, dtype=np.float64)


# --- background -----------------------------------------------------------------------------------------------


def fit_power_law(energy_eV: np.ndarray, counts: np.ndarray, window_eV: tuple[float, float]) -> tuple[Any, Any]:
    """Fit the pre-edge background ``I(E) = A E^-r`` over ``window_eV`` (Egerton 2011, sec. 4.4.2).

    Weighted least squares of ``log I`` against ``log E``: the variance of ``log I`` of Poisson counts is
    ``1 / I``, so each channel weighs its counts (channels with no counts carry no weight).

    Parameters
    ----------
    energy_eV : ndarray, shape (channels,), float
        Channel centres, eV (positive).
    counts : ndarray, shape (..., channels), real
        One spectrum or a stack (the fit is per spectrum).
    window_eV : (float, float)
        Fit window, eV.

    Returns
    -------
    A, r : float or ndarray, shape (...)
        ``A`` in counts per channel at 1 eV (``I = A E^-r``), ``r`` the exponent (typically 2 to 6).

    Raises
    ------
    ValueError
        Fewer than 3 channels in the window, or a window at non-positive energy.
    """
    e = np.asarray(energy_eV, np.float64)
    lo, hi = window_eV
    sel = (e >= lo) & (e <= hi)
    if sel.sum() < 3 or lo <= 0:
        raise ValueError(f"background window {window_eV} eV holds {int(sel.sum())} channels of the spectrum "
                         f"({e[0]:.1f} .. {e[-1]:.1f} eV); need at least 3 at positive energy")
    x = np.log(e[sel])
    y = np.asarray(counts, np.float64)[..., sel]
    w = np.clip(y, 0.0, None)
    ly = np.log(np.clip(y, 0.5, None))
    sw = w.sum(-1)
    sw = np.where(sw > 0, sw, 1.0)
    xm = (w * x).sum(-1) / sw
    ym = (w * ly).sum(-1) / sw
    sxx = (w * (x - xm[..., None]) ** 2).sum(-1)
    sxy = (w * (x - xm[..., None]) * (ly - ym[..., None])).sum(-1)
    slope = np.where(sxx > 0, sxy / np.where(sxx > 0, sxx, 1.0), 0.0)
    r = -slope
    a = np.exp(ym + r * xm)
    if np.ndim(r) == 0:
        return float(a), float(r)
    return a, r


def subtract_background(energy_eV: np.ndarray, counts: np.ndarray,
                        window_eV: tuple[float, float]) -> np.ndarray:
    """``counts`` minus the power-law background fitted over ``window_eV`` (:func:`fit_power_law`).

    Returns float64 of the shape of ``counts`` (counts per channel).
    """
    a, r = fit_power_law(energy_eV, counts, window_eV)
    e = np.asarray(energy_eV, np.float64)
    return np.asarray(counts, np.float64) - np.asarray(a)[..., None] * e ** (-np.asarray(r)[..., None])


def edge_integral(energy_eV: np.ndarray, counts: np.ndarray, edge: EdgeWindows,
                  window_eV: tuple[float, float] | None = None) -> float:
    """Counts of ``edge`` over its integral window (or ``window_eV``) after background subtraction."""
    lo, hi = edge.integral_eV if window_eV is None else window_eV
    e = np.asarray(energy_eV, np.float64)
    sel = (e >= lo) & (e <= hi)
    if not sel.any():
        raise ValueError(f"integral window {lo:g} .. {hi:g} eV lies outside the spectrum "
                         f"({e[0]:.1f} .. {e[-1]:.1f} eV)")
    return float(subtract_background(e, counts, edge.background_eV)[..., sel].sum(-1))


def edge_onset(energy_eV: np.ndarray, counts: np.ndarray, edge: EdgeWindows, before_eV: float = 8.0,
               after_eV: float = 2.0, plateau_eV: float = 4.0, min_snr: float = 5.0) -> float:
    """Step-equivalent onset of ``edge``: where a sharp step of the edge's near-edge height would start.

    With ``s`` the background-subtracted signal, ``b = E_nominal + after_eV`` and ``h`` the mean of ``s`` over
    ``[b, b + plateau_eV]``, the onset is ``b - (integral of s from E_nominal - before_eV to b) / h``, eV.
    For a step of height ``h`` at ``E0`` this is ``E0`` exactly, also after a symmetric resolution blur
    (which keeps the integral); it sums some 40 channels, so it is far less noisy than a threshold
    crossing. A shift of the edge moves it one for one; near-edge peaks that change height move it too.
    nan when ``h`` is not above ``min_snr`` times its Poisson error (no edge to speak of: e.g. a probe on an
    S di-vacancy).

    Raises
    ------
    ValueError
        The windows fall outside the spectrum.
    """
    e = np.asarray(energy_eV, np.float64)
    s = subtract_background(e, counts, edge.background_eV)
    b = edge.onset_eV + after_eV
    rise = (e >= edge.onset_eV - before_eV) & (e < b)
    plateau = (e >= b) & (e < b + plateau_eV)
    if rise.sum() < 3 or plateau.sum() < 2:
        raise ValueError(f"edge {edge.name} at {edge.onset_eV:g} eV: its windows lie outside the spectrum "
                         f"({e[0]:.1f} .. {e[-1]:.1f} eV)")
    h = float(s[plateau].mean())
    # Poisson error of h (the plateau's counts include the background): no onset of an edge lost in noise
    sigma_h = math.sqrt(max(float(np.asarray(counts, np.float64)[plateau].sum()), 1.0)) / plateau.sum()
    if not h > min_snr * sigma_h:
        return float("nan")
    de = float(e[1] - e[0]) if len(e) > 1 else 1.0
    return float(e[rise][0] - de / 2 + rise.sum() * de - s[rise].sum() * de / h)


def white_line_ratio(energy_eV: np.ndarray, counts: np.ndarray, edge: EdgeWindows, half_width_eV: float = 2.5,
                     continuum_width_eV: float = 1.0, min_snr: float = 5.0) -> float:
    """L3 / L2 white-line ratio after power-law background and double-step continuum subtraction.

    The continuum (Pearson, Ahn & Fultz 1993) is two smoothed steps (width ``continuum_width_eV``) at the L3
    and L2 lines, of heights 2:1, whose total equals the background-subtracted signal averaged 10-15 eV past
    L2. The lines are integrated over ``half_width_eV`` either side of their maxima near the nominal L3
    (``edge.onset_eV + 1.5``) and L2 (``+ spin_orbit_eV``) energies. nan unless the L2 line's intensity
    exceeds ``min_snr`` times its Poisson error (the square root of all counts in its window): a ratio over a
    line lost in the noise would be an outlier of any size.

    Raises
    ------
    ValueError
        The spectrum ends before the continuum window.
    """
    e = np.asarray(energy_eV, np.float64)
    s = subtract_background(e, counts, edge.background_eV)
    l3_nom = edge.onset_eV + 1.5
    l2_nom = l3_nom + edge.spin_orbit_eV
    post = (e >= l2_nom + 10.0) & (e <= l2_nom + 15.0)
    if not post.any():
        raise ValueError(f"spectrum ends before {edge.name}'s continuum at {l2_nom + 10:g} eV")
    h = float(s[post].mean())
    sm = np.convolve(s, np.ones(3) / 3, mode="same")

    def peak_near(e0: float) -> float:
        sel = np.flatnonzero(np.abs(e - e0) <= 1.5)
        return float(e[sel[np.argmax(sm[sel])]])

    e3, e2 = peak_near(l3_nom), peak_near(l2_nom)
    step = h * (2.0 / 3.0 / (1 + np.exp(-(e - e3) / (continuum_width_eV / 4)))
                + 1.0 / 3.0 / (1 + np.exp(-(e - e2) / (continuum_width_eV / 4))))
    lines = s - step
    w3 = np.abs(e - e3) <= half_width_eV
    w2 = np.abs(e - e2) <= half_width_eV
    i3, i2 = float(lines[w3].sum()), float(lines[w2].sum())
    err2 = math.sqrt(max(float(np.asarray(counts, np.float64)[w2].sum()), 1.0))
    return i3 / i2 if i2 > min_snr * err2 else float("nan")


# --- the registry -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scalarizer:
    """A registered reduction: ``fn(array, **settings) -> float``.

    Attributes
    ----------
    name : str
    kind : {"pattern", "spectrum", "adf"}
        What it reads: a diffraction pattern ``(det_rows, det_cols)``, a spectrum ``(channels,)``, or ADF
        counts of any shape.
    units : str
        Unit of the value (``"px"``, ``"rad"``, ``"eV"``, ``"counts"``, ``"1"`` for dimensionless).
    description : str
    fn : callable
        ``fn(array, **settings) -> float``.
    defaults : mapping
        Settings used where :func:`make_scalarizer` is not given them.
    """

    name: str
    kind: str
    units: str
    description: str
    fn: Callable[..., float]
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BoundScalarizer:
    """A :class:`Scalarizer` with its settings: call it on one measurement to get a float.

    Attributes
    ----------
    scalarizer : Scalarizer
    settings : dict
    """

    scalarizer: Scalarizer
    settings: dict

    @property
    def name(self) -> str:
        """The registered name."""
        return self.scalarizer.name

    @property
    def kind(self) -> str:
        """``pattern``, ``spectrum`` or ``adf``."""
        return self.scalarizer.kind

    @property
    def units(self) -> str:
        """Unit of the value."""
        return self.scalarizer.units

    def __call__(self, data: np.ndarray) -> float:
        """The scalar of one measurement (see the module table for shapes)."""
        return float(self.scalarizer.fn(np.asarray(data), **self.settings))

    def many(self, stack: np.ndarray) -> np.ndarray:
        """One scalar per measurement of ``stack`` (first axis), float64."""
        return np.array([self(x) for x in stack], np.float64)

    def describe(self) -> dict:
        """``{"name", "kind", "units", "settings"}`` (JSON-friendly)."""
        return {"name": self.name, "kind": self.kind, "units": self.units,
                "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings.items()}}


SCALARIZERS: dict[str, Scalarizer] = {}
"""Registered scalarizers by name (:func:`register_scalarizer`)."""


def register_scalarizer(name: str, kind: str, units: str, description: str, **defaults: Any
                        ) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Decorator registering ``fn(array, **settings) -> float`` as scalarizer ``name``.

    Raises
    ------
    ValueError
        ``name`` taken, or ``kind`` not one of ``pattern``, ``spectrum``, ``adf``.
    """
    if kind not in ("pattern", "spectrum", "adf"):
        raise ValueError(f"scalarizer kind must be pattern, spectrum or adf, got {kind!r}")

    def add(fn: Callable[..., float]) -> Callable[..., float]:
        if name in SCALARIZERS:
            raise ValueError(f"scalarizer {name!r} is already registered")
        SCALARIZERS[name] = Scalarizer(name, kind, units, description, fn, dict(defaults))
        return fn

    return add


def scalarizer_names() -> tuple[str, ...]:
    """Registered names, sorted."""
    return tuple(sorted(SCALARIZERS))


def make_scalarizer(name: str, **settings: Any) -> BoundScalarizer:
    """Scalarizer ``name`` bound to ``settings`` (over its defaults).

    Raises
    ------
    KeyError
        Unknown name (the message lists the registered ones).
    TypeError
        A setting the scalarizer does not take.
    """
    sc = SCALARIZERS.get(name)
    if sc is None:
        raise KeyError(f"unknown scalarizer {name!r}; registered: {', '.join(scalarizer_names())}")
    unknown = sorted(set(settings) - set(sc.defaults))
    if unknown:
        raise TypeError(f"scalarizer {name!r} takes {sorted(sc.defaults)}, not {unknown}")
    return BoundScalarizer(sc, {**sc.defaults, **settings})


# --- diffraction patterns -----------------------------------------------------------------------------------


def _pattern(data: np.ndarray) -> np.ndarray:
    p = np.asarray(data, np.float64)
    if p.ndim != 2:
        raise ValueError(f"a diffraction pattern is 2-D (det_rows, det_cols), got shape {p.shape}")
    return p


def _centre(p: np.ndarray, centre: tuple[float, float] | None) -> tuple[float, float]:
    return ((p.shape[0] - 1) / 2, (p.shape[1] - 1) / 2) if centre is None else (float(centre[0]), float(centre[1]))


def com_vector(pattern: np.ndarray, centre: tuple[float, float] | None = None) -> tuple[float, float]:
    """Centre of mass ``(d_row, d_col)`` of one pattern relative to ``centre`` (default the detector
    centre), detector pixels; the same first moment as :func:`beamloop.edge.analysis.live4d.com_stack`.
    ``(nan, nan)`` for a pattern without counts."""
    p = _pattern(pattern)
    total = p.sum()
    if not total > 0:
        return float("nan"), float("nan")
    cy, cx = _centre(p, centre)
    rows = np.arange(p.shape[0], dtype=np.float64)
    cols = np.arange(p.shape[1], dtype=np.float64)
    return float((p.sum(1) @ rows) / total - cy), float((p.sum(0) @ cols) / total - cx)


@register_scalarizer("com_magnitude", "pattern", "px", "centre-of-mass shift from the reference centre",
                     centre=None)
def com_magnitude(pattern: np.ndarray, centre: tuple[float, float] | None = None) -> float:
    """``|CoM - centre|`` of one diffraction pattern ``(det_rows, det_cols)``, detector pixels."""
    dr, dc = com_vector(pattern, centre)
    return math.hypot(dr, dc)


@register_scalarizer("com_direction", "pattern", "rad", "direction of the centre-of-mass shift, from +x (columns) "
                     "counter-clockwise in (x, y)", centre=None)
def com_direction(pattern: np.ndarray, centre: tuple[float, float] | None = None) -> float:
    """``atan2(d_row, d_col)`` of the CoM shift of one pattern, radians in (-pi, pi] (x: columns, y: rows)."""
    dr, dc = com_vector(pattern, centre)
    return math.atan2(dr, dc)


@register_scalarizer("bf_adf_ratio", "pattern", "1", "virtual bright field / virtual annular dark field",
                     bf_radius_px=16.0, adf_inner_px=20.0, adf_outer_px=48.0, centre=None)
def bf_adf_ratio(pattern: np.ndarray, bf_radius_px: float = 16.0, adf_inner_px: float = 20.0,
                 adf_outer_px: float = 48.0, centre: tuple[float, float] | None = None) -> float:
    """Counts within ``bf_radius_px`` over counts in the annulus ``(adf_inner_px, adf_outer_px]`` (detector
    pixels from ``centre``), the masks of :func:`beamloop.edge.analysis.live4d.disk_mask` and
    :func:`~beamloop.edge.analysis.live4d.annulus_mask`; inf for an empty annulus.

    Raises ``ValueError`` when the annulus is not outside the disk."""
    if not (adf_outer_px > adf_inner_px >= bf_radius_px > 0):
        raise ValueError(f"need 0 < bf_radius <= adf_inner < adf_outer, got {bf_radius_px}, {adf_inner_px}, "
                         f"{adf_outer_px}")
    p = _pattern(pattern)
    cy, cx = _centre(p, centre)
    yy, xx = np.mgrid[0:p.shape[0], 0:p.shape[1]]
    r = np.hypot(yy - cy, xx - cx)
    bf = float(p[r <= bf_radius_px].sum())
    adf = float(p[(r > adf_inner_px) & (r <= adf_outer_px)].sum())
    return bf / adf if adf > 0 else float("inf")


@register_scalarizer("adf_mean", "adf", "counts", "mean ADF detector counts")
def adf_mean(samples: np.ndarray) -> float:
    """Mean of ADF detector counts of any shape (counts per sample)."""
    s = np.asarray(samples, np.float64)
    if s.size == 0:
        raise ValueError("no ADF samples")
    return float(s.mean())


# --- EELS spectra ---------------------------------------------------------------------------------------------


def _spectrum(data: np.ndarray, offset_eV: float, dispersion_eV: float) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(data, np.float64)
    if s.ndim != 1:
        raise ValueError(f"a spectrum is 1-D (channels,), got shape {s.shape}")
    return energy_axis(len(s), offset_eV, dispersion_eV), s


def _edge(name: str) -> EdgeWindows:
    if name not in EDGES:
        raise KeyError(f"unknown edge {name!r}; known: {', '.join(sorted(EDGES))}")
    return EDGES[name]


@register_scalarizer("eels_edge_integral", "spectrum", "counts", "edge counts after power-law background subtraction",
                     edge="S_L2,3", offset_eV=130.0, dispersion_eV=0.25)
def eels_edge_integral(spectrum: np.ndarray, edge: str = "S_L2,3", offset_eV: float = 130.0,
                       dispersion_eV: float = 0.25) -> float:
    """Background-subtracted counts of ``edge`` (:data:`EDGES`) over its integral window; the spectrum is
    ``(channels,)`` counts with channel ``k`` at ``offset_eV + dispersion_eV * k`` eV."""
    e, s = _spectrum(spectrum, offset_eV, dispersion_eV)
    return edge_integral(e, s, _edge(edge))


@register_scalarizer("eels_edge_ratio", "spectrum", "1", "ratio of two background-subtracted edge integrals",
                     numerator="S_L2,3", denominator="Mo_M4,5", offset_eV=130.0, dispersion_eV=0.25)
def eels_edge_ratio(spectrum: np.ndarray, numerator: str = "S_L2,3", denominator: str = "Mo_M4,5",
                    offset_eV: float = 130.0, dispersion_eV: float = 0.25) -> float:
    """``I_numerator / I_denominator`` of two edges (Egerton 2011, eq. 4.65 without the cross-sections, which
    are constant for one specimen and setting); nan unless the denominator exceeds ``min_snr`` (5) times its
    Poisson error (the square root of all counts in its window), e.g. at a column without that element."""
    e, s = _spectrum(spectrum, offset_eV, dispersion_eV)
    d = _edge(denominator)
    den = edge_integral(e, s, d)
    lo, hi = d.integral_eV
    err = math.sqrt(max(float(s[(e >= lo) & (e <= hi)].sum()), 1.0))
    return edge_integral(e, s, _edge(numerator)) / den if den > 5.0 * err else float("nan")


@register_scalarizer("eels_onset", "spectrum", "eV", "step-equivalent onset of the edge (its chemical shift)",
                     edge="S_L2,3", offset_eV=130.0, dispersion_eV=0.25)
def eels_onset(spectrum: np.ndarray, edge: str = "S_L2,3", offset_eV: float = 130.0,
               dispersion_eV: float = 0.25) -> float:
    """Onset energy of ``edge`` (:func:`edge_onset`), eV."""
    e, s = _spectrum(spectrum, offset_eV, dispersion_eV)
    return edge_onset(e, s, _edge(edge))


@register_scalarizer("eels_white_line_ratio", "spectrum", "1", "L3/L2 white-line ratio (Pearson et al. 1993)",
                     edge="Ti_L2,3", offset_eV=400.0, dispersion_eV=0.25)
def eels_white_line_ratio(spectrum: np.ndarray, edge: str = "Ti_L2,3", offset_eV: float = 400.0,
                          dispersion_eV: float = 0.25) -> float:
    """L3 / L2 ratio of ``edge`` (:func:`white_line_ratio`), dimensionless."""
    e, s = _spectrum(spectrum, offset_eV, dispersion_eV)
    return white_line_ratio(e, s, _edge(edge))
