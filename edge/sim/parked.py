"""Physics of a parked probe: knock-on ejection rate of the atoms under it and the ADF counts it gives.

One place for the model that the simulated microscope (:mod:`beamloop.edge.sim.microscope`, parked-probe
series) and the trigger-training data (:mod:`beamloop.quantize.data`) share.

**Knock-on displacement.** An atom under an electron flux ``j`` (electrons per unit area per second) is
displaced at the rate ``sigma * j``, ``sigma`` its displacement cross-section (R. F. Egerton, "Radiation
damage to organic and inorganic specimens in the TEM", Micron 119, 72-87 (2019); T. Susi,
J. C. Meyer & J. Kotakoski, "Quantifying transmission electron microscopy irradiation effects using
two-dimensional materials", Nat. Rev. Phys. 1, 397-405 (2019)). Each displacement is an independent
event, so the waiting time to the next one is exponential with that rate (a Poisson process). For a
parked probe of current ``I`` whose electrons are spread as an isotropic Gaussian of standard deviation
``s`` about the probe position, the flux at distance ``d`` is ``(I / e) * g(d)`` with

    g(d) = exp(-d^2 / (2 s^2)) / (2 pi s^2)        (per square Angstrom),

hence, per atom,

    rate(d) = sigma * (I / e) * g(d)               (per second).

The cross-section is a model parameter (the simulator's default is 1 barn for S in MoS2), not a measured
value.

**Detector counts.** Each probe electron reaches the annular dark-field detector independently with
probability ``f`` (the expected HAADF fraction at the probe, :class:`beamloop.edge.sim.render.ColumnRenderer`)
plus a constant background fraction ``b``, so the counts of one sample are Poisson-distributed with mean
``(f + b) * N``, ``N`` the electrons per sample (``I / e`` times the sample time).

Units: Angstrom, seconds, barn (:data:`BARN_A2`), electrons.
"""

from __future__ import annotations

import numpy as np

BARN_A2 = 1e-8
"""One barn in square Angstrom: 1 b = 1e-28 m^2 = 1e-24 cm^2 = 1e-8 A^2 (BIPM, *The International System of
Units (SI)*, 8th ed. (2006), table 8)."""


def probe_density(dist2_A2: np.ndarray | float, probe_sigma_A: float) -> np.ndarray | float:
    """Areal density of the probe's electrons at squared distance ``d^2`` from its centre,
    ``g(d) = exp(-d^2 / (2 s^2)) / (2 pi s^2)`` (see the module docstring).

    Parameters
    ----------
    dist2_A2 : float or ndarray, any shape, float64
        Squared distances from the probe position, square Angstrom.
    probe_sigma_A : float
        Standard deviation ``s`` of the probe's current density, Angstrom (> 0).

    Returns
    -------
    float or ndarray, shape of ``dist2_A2``, float64
        Fraction of the probe's electrons per square Angstrom.
    """
    return np.exp(-dist2_A2 / (2 * probe_sigma_A**2)) / (2 * np.pi * probe_sigma_A**2)


def knockon_rate(dist2_A2: np.ndarray | float, electrons_per_s: float, cross_section_barn: float,
                 probe_sigma_A: float) -> np.ndarray | float:
    """Knock-on displacement rate of one atom at squared distance ``d^2`` from a parked probe,
    ``sigma * (I / e) * g(d)`` (see the module docstring).

    Parameters
    ----------
    dist2_A2 : float or ndarray, any shape, float64
        Squared atom-to-probe distances, square Angstrom.
    electrons_per_s : float
        Probe electrons per second, ``I / e`` (:func:`beamloop.edge.sim.frames.electrons_per_second`).
    cross_section_barn : float
        Displacement cross-section ``sigma`` of the atom, barn.
    probe_sigma_A : float
        Standard deviation of the probe's current density, Angstrom.

    Returns
    -------
    float or ndarray, shape of ``dist2_A2``, float64
        Displacements per second per atom.
    """
    return cross_section_barn * BARN_A2 * electrons_per_s * probe_density(dist2_A2, probe_sigma_A)


def atoms_near_probe(xy_A: np.ndarray, x_A: float, y_A: float, probe_sigma_A: float,
                     reach_sigma: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Sites within ``reach_sigma`` probe standard deviations of the probe, and their squared distances.

    Beyond 4 standard deviations ``g`` has fallen to ``exp(-8)`` (3e-4) of its peak, so farther atoms are
    left out of the rate.

    Parameters
    ----------
    xy_A : ndarray, shape (n, 2), float64
        Site positions ``(x, y)``, Angstrom.
    x_A, y_A : float
        Probe position, Angstrom.
    probe_sigma_A : float
        Probe standard deviation, Angstrom.
    reach_sigma : float
        Cut-off distance in probe standard deviations.

    Returns
    -------
    index : ndarray, shape (m,), int64
        Indices into ``xy_A`` of the sites within reach, ascending.
    dist2_A2 : ndarray, shape (m,), float64
        Their squared distances from the probe, square Angstrom.
    """
    index = np.flatnonzero(np.hypot(xy_A[:, 0] - x_A, xy_A[:, 1] - y_A) < reach_sigma * probe_sigma_A)
    dist2 = (xy_A[index, 0] - x_A) ** 2 + (xy_A[index, 1] - y_A) ** 2
    return index, dist2


def samples_to_next_ejection(rng: np.random.Generator, rate_per_s: float, sample_time_s: float) -> int:
    """Whole samples until the next displacement of a Poisson process of rate ``rate_per_s``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Draws one exponential waiting time of mean ``1 / rate_per_s``.
    rate_per_s : float
        Total displacement rate, per second (> 0).
    sample_time_s : float
        Duration of one sample, seconds.

    Returns
    -------
    int
        ``floor(t / sample_time_s)`` for the waiting time ``t``: the event falls in that sample counted
        from the current one.
    """
    return int(rng.exponential(1.0 / rate_per_s) / sample_time_s)


def expected_counts(fraction: np.ndarray | float, background_fraction: float, electrons_per_s: float,
                    sample_time_s: float) -> np.ndarray | float:
    """Mean ADF detector counts per sample at a parked probe, ``(f + b) * (I / e) * dt`` (see the module
    docstring).

    Parameters
    ----------
    fraction : float or ndarray, float64
        Expected HAADF fraction ``f`` of the probe's electrons at the probe position (one per sample).
    background_fraction : float
        Constant extra fraction ``b`` (support film, contamination).
    electrons_per_s : float
        Probe electrons per second, ``I / e``.
    sample_time_s : float
        Duration ``dt`` of one sample, seconds.

    Returns
    -------
    float or ndarray, shape of ``fraction``, float64
        The Poisson mean of each sample's counts (evaluated left to right, as written above).
    """
    return (fraction + background_fraction) * electrons_per_s * sample_time_s


def blank_time_ns(decision_sample: int, sample_time_us: float, latency_ns: float) -> float:
    """When a trigger next to the beam blanks it, from the start of the dwell.

    Sample ``k`` is integrated over ``[k dt, (k + 1) dt)`` and enters the trigger's logic at its end; the
    logic's blank output follows ``latency_ns`` later (its pipeline's cycles at its clock).

    Parameters
    ----------
    decision_sample : int
        Index of the sample the trigger fired on, counted from the dwell's start.
    sample_time_us : float
        Duration ``dt`` of one sample, microseconds.
    latency_ns : float
        Sample in to blank out of the logic, nanoseconds (>= 0).

    Returns
    -------
    float
        ``(k + 1) dt + latency``, nanoseconds.
    """
    return (decision_sample + 1) * sample_time_us * 1e3 + latency_ns


def happens_before(sample: int, fraction: float, time_ns: float, sample_time_us: float) -> bool:
    """Whether an event at ``fraction`` of sample ``sample`` (e.g. an ejection) happens before ``time_ns``.

    Parameters
    ----------
    sample : int
        Sample index of the event, counted from the dwell's start.
    fraction : float
        Where in that sample it happens, in ``[0, 1)``.
    time_ns : float
        A time from the dwell's start (e.g. :func:`blank_time_ns`), nanoseconds.
    sample_time_us : float
        Duration of one sample, microseconds.

    Returns
    -------
    bool
        ``(sample + fraction) * dt < time_ns``.
    """
    return (sample + fraction) * sample_time_us * 1e3 < time_ns
