"""Specimen-drift estimation: a Kalman filter on the specimen's position and velocity.

Frame-to-frame registration (:mod:`beamloop.edge.stages.register`) measures where the specimen is, relative
to the first frame of a run, at each frame's acquisition time. :class:`DriftEstimator` filters those
positions with a constant-velocity model plus a random walk (R. E. Kalman, "A new approach to linear
filtering and prediction problems", J. Basic Eng. 82, 35-45 (1960); the discrete white-noise-acceleration
model of Y. Bar-Shalom, X. R. Li & T. Kirubarajan, *Estimation with Applications to Tracking and Navigation*
(2001), sec. 6.3.2) and predicts how far the specimen moves between a target's acquisition and the moment
the probe gets there, with its uncertainty.

Per axis the state is ``(p, v)`` (A, A/s); between updates ``dt`` apart

    F = [[1, dt], [0, 1]],   Q = q_a [[dt^3/3, dt^2/2], [dt^2/2, dt]] + q_w [[dt, 0], [0, 0]],

``q_a`` the velocity's diffusion (A^2/s^3), ``q_w`` the random walk's (A^2/s); a frame measures ``p`` with
standard deviation ``measurement_sigma_A``. Times are seconds on the clock of the frames' metadata (the
scan controller's); the estimator never reads a clock itself.
"""

from __future__ import annotations

import math

import numpy as np


class DriftEstimator:
    """Kalman filter on the specimen's lab-frame displacement and velocity (module docstring).

    Parameters
    ----------
    velocity_prior_A_per_s : float
        Standard deviation of the velocity before the second frame, A/s (drift after settling:
        0.017-0.17 A/s, faster after a stage move).
    measurement_sigma_A : float
        Standard deviation of one frame's registered position, A (the scan's mains wobble and line jitter
        limit it: ~0.05-0.1 A in the simulated microscope).
    accel_A2_per_s3 : float
        ``q_a``: how fast the velocity may change.
    walk_A2_per_s : float
        ``q_w``: random-walk diffusion of the position.

    Attributes
    ----------
    x : ndarray, shape (4,), float64
        ``(px, py, vx, vy)``: displacement (A) and velocity (A/s), as of :attr:`t`.
    P : ndarray, shape (4, 4), float64
        Its covariance.
    t : float
        Time of the last update, seconds (NaN before the first).
    updates : int
        Frames taken.

    Raises
    ------
    ValueError
        A parameter that is not a finite positive number (``accel_A2_per_s3``, ``walk_A2_per_s``: >= 0).
    """

    def __init__(self, velocity_prior_A_per_s: float = 0.3, measurement_sigma_A: float = 0.05,
                 accel_A2_per_s3: float = 1e-4, walk_A2_per_s: float = 2.5e-4) -> None:
        for name, v, lo in (("velocity_prior_A_per_s", velocity_prior_A_per_s, 0.0),
                            ("measurement_sigma_A", measurement_sigma_A, 0.0)):
            if not (math.isfinite(v) and v > lo):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name, v in (("accel_A2_per_s3", accel_A2_per_s3), ("walk_A2_per_s", walk_A2_per_s)):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        self.velocity_prior = float(velocity_prior_A_per_s)
        self.r = float(measurement_sigma_A) ** 2
        self.qa = float(accel_A2_per_s3)
        self.qw = float(walk_A2_per_s)
        self.reset()

    def reset(self) -> None:
        """Forget every measurement."""
        self.x = np.zeros(4)
        self.P = np.diag([self.r, self.r, self.velocity_prior**2, self.velocity_prior**2])
        self.t = math.nan
        self.updates = 0

    @property
    def ready(self) -> bool:
        """Whether a frame has been taken (a position to predict from)."""
        return self.updates > 0

    def _fq(self, dt: float) -> tuple[np.ndarray, np.ndarray]:
        f = np.eye(4)
        f[0, 2] = f[1, 3] = dt
        q1 = self.qa * np.array([[dt**3 / 3, dt**2 / 2], [dt**2 / 2, dt]]) + self.qw * np.array([[dt, 0], [0, 0]])
        q = np.zeros((4, 4))
        q[np.ix_([0, 2], [0, 2])] = q1
        q[np.ix_([1, 3], [1, 3])] = q1
        return f, q

    def _propagated(self, t: float) -> tuple[np.ndarray, np.ndarray]:
        dt = max(float(t) - self.t, 0.0)
        f, q = self._fq(dt)
        return f @ self.x, f @ self.P @ f.T + q

    def update(self, t: float, z_A, sigma_A: float | None = None, gate_sigmas: float | None = None) -> bool:
        """Take one measured position: a frame's registered displacement, or (lock-on ``rescan``) where a
        re-centring subscan found a column, converted to the specimen's displacement.

        Parameters
        ----------
        t : float
            Its acquisition time (a frame's middle, a subscan's column line), seconds.
        z_A : (float, float)
            Its displacement from the reference frame, A (lab frame).
        sigma_A : float, optional
            Its standard deviation, A (default ``measurement_sigma_A``: a frame's).
        gate_sigmas : float, optional
            Reject (return False, nothing changed) a measurement farther from the prediction than this many
            standard deviations of the innovation (larger axis); None: take every measurement.

        Returns
        -------
        bool
            Whether the measurement was taken.

        Raises
        ------
        ValueError
            A non-finite time or position, or a ``sigma_A`` that is not a positive number.
        """
        z = np.asarray(z_A, np.float64).reshape(2)
        if not (math.isfinite(t) and np.isfinite(z).all()):
            raise ValueError(f"drift measurement at t={t!r} of {z.tolist()!r} is not finite")
        if sigma_A is not None and not (math.isfinite(sigma_A) and sigma_A > 0):
            raise ValueError(f"drift measurement sigma_A must be a positive number, got {sigma_A!r}")
        r = self.r if sigma_A is None else float(sigma_A) ** 2
        if self.updates == 0:
            self.x[:2] = z
            self.P[0, 0] = self.P[1, 1] = r
            self.t = float(t)
            self.updates = 1
            return True
        x, p = self._propagated(t)
        h = np.zeros((2, 4))
        h[0, 0] = h[1, 1] = 1.0
        s = h @ p @ h.T + r * np.eye(2)
        innov = z - h @ x
        if gate_sigmas is not None and np.any(np.abs(innov) > gate_sigmas * np.sqrt(np.diag(s))):
            return False
        k = p @ h.T @ np.linalg.inv(s)
        self.x = x + k @ innov
        self.P = (np.eye(4) - k @ h) @ p
        self.t = max(float(t), self.t)
        self.updates += 1
        return True

    def position(self, t: float) -> tuple[float, float]:
        """The predicted displacement at time ``t`` (seconds), A: ``p + v (t - t_last)`` (zeros before the
        first update)."""
        if not self.ready:
            return 0.0, 0.0
        dt = float(t) - self.t
        return float(self.x[0] + self.x[2] * dt), float(self.x[1] + self.x[3] * dt)

    @property
    def velocity_A_per_s(self) -> tuple[float, float]:
        """The estimated velocity, A/s."""
        return float(self.x[2]), float(self.x[3])

    @property
    def velocity_sigma_A_per_s(self) -> float:
        """Standard deviation of the velocity estimate (larger axis), A/s."""
        return float(math.sqrt(max(self.P[2, 2], self.P[3, 3])))

    def shift(self, t_from: float, t_to: float) -> tuple[tuple[float, float], float]:
        """The predicted displacement of the specimen from ``t_from`` to ``t_to``, and its uncertainty.

        Parameters
        ----------
        t_from, t_to : float
            Seconds: e.g. the time a target's scan line was acquired, and now.

        Returns
        -------
        (dx, dy) : tuple of float
            ``v (t_to - t_from)``, A.
        sigma_A : float
            Standard deviation of that displacement (larger axis): the velocity's uncertainty over the
            interval, the random walk since the last update and one frame's measurement error, A. Infinite
            before the first update.
        """
        if not self.ready:
            return (0.0, 0.0), math.inf
        _, p = self._propagated(t_to)
        dt = float(t_to) - float(t_from)
        var_v = max(p[2, 2], p[3, 3])
        var = dt * dt * var_v + self.qw * max(float(t_to) - self.t, 0.0) + self.r
        return (float(self.x[2] * dt), float(self.x[3] * dt)), float(math.sqrt(var))

    def as_dict(self) -> dict:
        """The estimate for a report: ``velocity_A_per_s``, ``velocity_sigma_A_per_s``, ``speed_A_per_s``,
        ``displacement_A``, ``updates``."""
        vx, vy = self.velocity_A_per_s
        return {"velocity_A_per_s": [vx, vy], "speed_A_per_s": math.hypot(vx, vy),
                "velocity_sigma_A_per_s": self.velocity_sigma_A_per_s if self.ready else None,
                "displacement_A": [float(self.x[0]), float(self.x[1])], "updates": self.updates}
