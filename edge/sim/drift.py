"""Specimen drift and scan-coil response of the simulated microscope, on the simulator's clock.

**Specimen drift.** The specimen moves in the laboratory (scan) frame as

    D(t) = v (t - t0) + sum_i a tau (1 - exp(-(t - t_i) / tau)) u + W(t),

a constant velocity ``v`` (speed ``speed_A_per_s`` in the direction ``u``), an exponentially settling extra
velocity ``a`` after every field-of-view (or stage) change at ``t_i`` (time constant ``tau``), and a random
walk ``W`` (Brownian motion of ``walk_A_per_sqrt_s`` per square-root second and axis, sampled at knots
``knot_s`` apart and linearly interpolated). It is one process on the simulator's clock, continuous across
frames and parked dwells: a column at rest position ``s`` is at ``s + D(t)`` at time ``t``.

Defaults: drift after settling on aberration-corrected STEMs is 0.1-1 nm/min (0.017-0.17 A/s) and larger
after a stage move; frame series are registered and drift-corrected for it (L. Jones & P. D. Nellist,
"Identifying and correcting scan noise and drift in the scanning transmission electron microscope",
Microsc. Microanal. 19, 1050-1060 (2013); C. Ophus, J. Ciston & C. T. Nelson, "Correcting nonlinear drift
distortion of scanning probe and scanning transmission electron microscopies from image pairs with
orthogonal scan directions", Ultramicroscopy 162, 1-9 (2016)). Closed-loop atom-by-atom work re-finds the
atom between scans to keep the beam on it (K. M. Roccapriore et al., Adv. Sci. (2025): sub-20 pm beam
positioning). The random-walk and settling defaults are model parameters, not measurements.

**Scan-coil response.** After ``set_probe`` the deflection follows a second-order step response of time
constant ``settle_us`` and fractional ``overshoot`` (0: critically damped); 0 us: instantaneous (the default).

**Scan-coil hysteresis.** Magnetised scan-coil yokes lag the current that drives them, so where the probe
lands depends on where it came from. :func:`hysteresis_offset` models it in its simplest form: the probe lands
``h`` short of the commanded position along the direction of the last coil move (``-h u``, ``u`` the unit
vector from the previous commanded position to this one; a move of zero length keeps the previous error). It
is the large-move limit of a two-dimensional play (backlash) operator, the elementary hysteron of the
Preisach model (I. D. Mayergoyz, *Mathematical Models of Hysteresis*, Springer (1991), ch. 1). ``h`` is a
free parameter of the simulator: no published magnitude for STEM scan coils is used.

Units: Angstrom, seconds (``settle_us``: microseconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

POST_SETTLING_A_PER_S = (0.017, 0.17)
"""Typical post-settling drift of an aberration-corrected STEM, A/s (0.1-1 nm/min; module docstring)."""


@dataclass(frozen=True)
class DriftConfig:
    """Parameters of :class:`SpecimenDrift`.

    Attributes
    ----------
    speed_A_per_s : float
        Constant drift speed, A/s (0 with ``settle_A_per_s`` 0: no drift at all).
    direction_deg : float or None
        Its direction from the +x axis, degrees; random (from ``seed``) when None.
    walk_A_per_sqrt_s : float
        Random-walk amplitude per axis, A per square-root second (only with drift on).
    settle_A_per_s : float
        Extra speed right after a field-of-view change, A/s, decaying with ``settle_tau_s``.
    settle_tau_s : float
        Settling time constant, seconds.
    knot_s : float
        Spacing of the random walk's knots, seconds.
    seed : int
        Seed of the direction and the random walk (a generator of its own: the specimen's is not touched).

    Raises
    ------
    ValueError
        A parameter that is negative, not finite, or (``settle_tau_s``, ``knot_s``) not positive.
    """

    speed_A_per_s: float = 0.0
    direction_deg: float | None = None
    walk_A_per_sqrt_s: float = 0.005
    settle_A_per_s: float = 0.0
    settle_tau_s: float = 30.0
    knot_s: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("speed_A_per_s", "walk_A_per_sqrt_s", "settle_A_per_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 1e3):
                raise ValueError(f"{name} must be a finite number in [0, 1000] A/s, got {v!r}")
        for name in ("settle_tau_s", "knot_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")

    @property
    def enabled(self) -> bool:
        """Whether the specimen drifts at all."""
        return self.speed_A_per_s > 0 or self.settle_A_per_s > 0


class SpecimenDrift:
    """The specimen's displacement ``D(t)`` (module docstring), Angstrom, lab frame.

    Parameters
    ----------
    config : DriftConfig
    t0 : float
        Clock time the drift starts from, seconds (``D(t0) = 0``).

    Attributes
    ----------
    velocity_A_per_s : ndarray, shape (2,), float64
        The constant velocity ``v``.
    """

    def __init__(self, config: DriftConfig, t0: float) -> None:
        self.config = cfg = config
        self.t0 = float(t0)
        self._rng = np.random.default_rng([cfg.seed, 0xD21F7])
        ang = math.radians(cfg.direction_deg) if cfg.direction_deg is not None else self._rng.uniform(0, 2 * math.pi)
        self.direction = np.array([math.cos(ang), math.sin(ang)])
        self.velocity_A_per_s = cfg.speed_A_per_s * self.direction
        self._moves: list[float] = []
        self._knots = np.zeros((1, 2))  # walk at t0 + k knot_s

    def fov_changed(self, t: float) -> None:
        """A field-of-view or stage change at clock time ``t``: settling starts (when ``settle_A_per_s`` > 0)."""
        if self.config.settle_A_per_s > 0:
            self._moves.append(float(t))

    def _walk(self, t: np.ndarray) -> np.ndarray:
        cfg = self.config
        k = (t - self.t0) / cfg.knot_s
        need = int(math.ceil(float(np.max(k, initial=0.0)))) + 2
        if need > len(self._knots):  # extend in order: the same knots whatever the queries
            more = max(need - len(self._knots), len(self._knots))
            steps = self._rng.normal(0.0, cfg.walk_A_per_sqrt_s * math.sqrt(cfg.knot_s), (more, 2))
            self._knots = np.concatenate([self._knots, self._knots[-1] + np.cumsum(steps, axis=0)])
        k = np.clip(k, 0.0, None)
        i = np.minimum(k.astype(np.int64), len(self._knots) - 2)
        w = (k - i)[..., None]
        return self._knots[i] * (1 - w) + self._knots[i + 1] * w

    def displacement(self, t) -> tuple[np.ndarray, np.ndarray]:
        """``D(t)``.

        Parameters
        ----------
        t : float or ndarray, any shape
            Clock times, seconds (times before ``t0`` give the value at ``t0`` plus the linear part).

        Returns
        -------
        dx, dy : ndarray, shape of ``t``, float64
            Angstrom.
        """
        cfg = self.config
        t = np.asarray(t, np.float64)
        dt = t - self.t0
        d = dt[..., None] * self.velocity_A_per_s
        for tm in self._moves:
            s = np.clip(t - tm, 0.0, None)
            amp = cfg.settle_A_per_s * cfg.settle_tau_s * -np.expm1(-s / cfg.settle_tau_s)
            d = d + amp[..., None] * self.direction
        if cfg.walk_A_per_sqrt_s > 0:
            d = d + self._walk(t)
        return d[..., 0], d[..., 1]

    def velocity(self, t: float) -> tuple[float, float]:
        """The deterministic part of ``dD/dt`` at ``t`` (constant plus settling; not the walk), A/s."""
        cfg = self.config
        extra = sum(cfg.settle_A_per_s * math.exp(-(t - tm) / cfg.settle_tau_s) for tm in self._moves if t >= tm)
        v = self.velocity_A_per_s + extra * self.direction
        return float(v[0]), float(v[1])


def coil_response(s_us, settle_us: float, overshoot: float):
    """Fraction of a probe move still to go ``s_us`` after it was commanded: the step response of a
    second-order system, ``1`` at 0 and decaying to 0.

    Parameters
    ----------
    s_us : float or ndarray
        Time since the move, microseconds (negative: before it, 1).
    settle_us : float
        Time constant ``1 / (zeta omega_n)``, microseconds; 0: instantaneous (returns 0).
    overshoot : float
        Peak overshoot as a fraction of the move, in [0, 1); 0: critically damped.

    Returns
    -------
    float or ndarray, shape of ``s_us``
        ``r(s)``: the probe is at ``target + r(s) (previous - target)``.

    Raises
    ------
    ValueError
        ``overshoot`` outside [0, 1) or ``settle_us`` negative.
    """
    if not (0 <= overshoot < 1) or settle_us < 0:
        raise ValueError(f"coil overshoot {overshoot!r} must be in [0, 1) and settle {settle_us!r} us >= 0")
    s = np.asarray(s_us, np.float64)
    if settle_us == 0:
        return np.zeros_like(s)
    x = np.clip(s, 0.0, None) / settle_us
    if overshoot == 0:
        r = (1 + x) * np.exp(-x)
    else:
        lo = math.log(overshoot)
        zeta = -lo / math.sqrt(math.pi**2 + lo**2)
        wd = math.sqrt(1 - zeta**2) / zeta  # damped frequency times the time constant
        r = np.exp(-x) * (np.cos(wd * x) + zeta / math.sqrt(1 - zeta**2) * np.sin(wd * x))
    return np.where(s < 0, 1.0, r)


def hysteresis_offset(previous, target, h_A: float, last) -> np.ndarray:
    """Landing error of a scan-coil move from ``previous`` to ``target`` under hysteresis ``h_A`` (module
    docstring): ``-h_A u``, ``u`` the unit vector of the move.

    Parameters
    ----------
    previous : ndarray, shape (2,), float64, or None
        The position last commanded, lab frame, A (None: the first move, no error yet).
    target : ndarray, shape (2,), float64
        The position commanded now, A.
    h_A : float
        The hysteresis, A (>= 0).
    last : ndarray, shape (2,), float64
        The previous move's landing error, A: kept when the move has zero length.

    Returns
    -------
    ndarray, shape (2,), float64
        The error to add to ``target``, A.

    Raises
    ------
    ValueError
        ``h_A`` negative or not finite.
    """
    if not (math.isfinite(h_A) and h_A >= 0):
        raise ValueError(f"coil hysteresis {h_A!r} A must be a finite number >= 0")
    if previous is None:
        return np.zeros(2)
    d = np.asarray(target, np.float64) - np.asarray(previous, np.float64)
    n = math.hypot(float(d[0]), float(d[1]))
    if n == 0.0:
        return np.array(last, np.float64)
    return -h_A * d / n
