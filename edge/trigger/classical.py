"""Classical ejection triggers on the parked-probe ADF signal: decide, sample by sample, that the atom is gone.

With the probe parked on a column, the HAADF detector counts per sample follow a Poisson law whose rate
drops when an atom leaves the column (S2 -> S1 halves it). Two detectors, both
:class:`~beamloop.edge.trigger.base.Trigger` implementations:

- :class:`CusumTrigger`: Page's cumulative sum for a drop of a Poisson rate from ``lam0`` (the
  :attr:`~beamloop.edge.trigger.base.Trigger.baseline_rate`) to ``rho * lam0``. Each count ``x`` adds
  its log-likelihood ratio ``x ln(rho) + lam0 (1 - rho)``; the sum is floored at zero and an alarm is
  raised when it exceeds ``h``. E. S. Page, "Continuous inspection schemes", Biometrika 41, 100-115
  (1954); for Poisson data, M. R. Reynolds Jr. & Z. G. Stoumbos, J. Quality Technology 31, 87-108
  (1999). The mean delay is about ``h / KL`` samples with ``KL = lam0 (1 - rho + rho ln rho)`` the
  Kullback-Leibler divergence per sample after the drop (A. Wald, *Sequential Analysis*, Wiley (1947));
  the false-alarm interval grows like ``exp(h)``.
- :class:`WindowTrigger`: the sum of the last ``window`` samples falls below ``fraction`` of what the
  baseline rate predicts.

Both estimate the baseline rate from the first ``baseline_samples`` of a dwell unless it is given
(:class:`~beamloop.edge.trigger.base.BaselineTrigger`), keep their state between blocks, and process a
block of samples in one numba call. The defaults (h = 14 with 128 baseline samples; a 16-sample window
at fraction 0.57) keep the false-trigger rate under 0.05 per second of dwell on the main job's
simulated stream of 7.5 counts per sample (``beamloop quantize eval``); CHANGELOG.md records how they
were chosen.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np

from beamloop.edge.trigger.base import BaselineTrigger


@numba.njit(cache=True, nogil=True)
def _cusum_drop(x, state, log_rho, drift, h):
    """Advance the CUSUM over counts ``x`` (Page 1954; see the module docstring).

    Parameters
    ----------
    x : ndarray, shape (m,), integer or float counts per sample
    state : ndarray, shape (1,), float64
        The sum so far (nats); updated in place, left at the alarm sample's value.
    log_rho, drift : float
        ``ln(rho)`` and ``baseline_rate * (1 - rho)``: the log-likelihood ratio of a count ``x`` is
        ``x * log_rho + drift``.
    h : float
        Alarm threshold, nats.

    Returns
    -------
    int
        Index in ``x`` of the first sample with the sum above ``h``, or -1.
    """
    s = state[0]
    for k in range(x.shape[0]):
        s += x[k] * log_rho + drift
        if s < 0.0:
            s = 0.0
        if s > h:
            state[0] = s
            return k
    state[0] = s
    return -1


@numba.njit(cache=True, nogil=True)
def _window_drop(x, ring, state, window, limit):
    """Advance the moving-window sum over counts ``x``.

    Parameters
    ----------
    x : ndarray, shape (m,), integer or float counts per sample
    ring : ndarray, shape (window,), float64
        The last ``window`` samples (circular buffer); updated in place.
    state : ndarray, shape (3,), float64
        ``[sum of the ring, samples in the ring, next ring position]``; updated in place.
    window : int
    limit : float
        Alarm when a full window sums strictly below it (counts).

    Returns
    -------
    int
        Index in ``x`` of the first alarm, or -1.
    """
    s = state[0]
    filled = int(state[1])
    pos = int(state[2])
    for k in range(x.shape[0]):
        v = float(x[k])
        if filled == window:
            s -= ring[pos]
        else:
            filled += 1
        ring[pos] = v
        s += v
        pos = (pos + 1) % window
        if filled == window and s < limit:
            state[0], state[1], state[2] = s, filled, pos
            return k
    state[0], state[1], state[2] = s, filled, pos
    return -1


class CusumTrigger(BaselineTrigger):
    """Page's CUSUM for a drop of a Poisson rate by the factor ``drop_ratio`` (see the module docstring).

    The alarm is raised at the first sample at which the sum is strictly above ``h``.

    Parameters
    ----------
    drop_ratio : float
        Expected rate after the event over the rate before (0 < rho < 1; S2 -> S1: 0.5).
    h : float
        Alarm threshold on the log-likelihood-ratio sum (nats).
    baseline_samples : int
        Samples used to estimate the rate before the event when none is given to :meth:`start`.

    Raises
    ------
    ValueError
        ``drop_ratio`` outside (0, 1), ``h <= 0`` or ``baseline_samples < 1``.
    """

    name = "cusum"

    def __init__(self, drop_ratio: float = 0.5, h: float = 14.0, baseline_samples: int = 128) -> None:
        if not (0 < drop_ratio < 1) or not (h > 0):
            raise ValueError(f"need 0 < drop_ratio < 1 and h > 0, got {drop_ratio}, {h}")
        self.drop_ratio = float(drop_ratio)
        self.h = float(h)
        self._state = np.zeros(1, np.float64)
        super().__init__(baseline_samples)

    def _reset_detector(self) -> None:
        self._state[0] = 0.0

    def _arm(self, baseline_rate: float) -> None:
        self._log_rho = math.log(self.drop_ratio)
        self._drift = baseline_rate * (1.0 - self.drop_ratio)

    def _detect(self, x: np.ndarray) -> int:
        return _cusum_drop(x, self._state, self._log_rho, self._drift, self.h)

    def expected_delay(self, baseline_rate: float) -> float:
        """Approximate mean detection delay in samples after a drop from ``baseline_rate`` (counts per sample):
        ``h / KL`` with ``KL = lam0 (1 - rho + rho ln rho)``, Wald's approximation ignoring the overshoot of
        ``h`` (A. Wald, *Sequential Analysis*, Wiley (1947); Reynolds & Stoumbos 1999)."""
        rho = self.drop_ratio
        return self.h / (baseline_rate * (1 - rho + rho * math.log(rho)))


class WindowTrigger(BaselineTrigger):
    """Moving-window threshold: alarm when the last ``window`` samples sum below
    ``fraction * window * baseline_rate``.

    Parameters
    ----------
    window : int
        Samples summed.
    fraction : float
        Alarm when the sum falls below this fraction of what the baseline predicts (0 < fraction < 1).
    baseline_samples : int
        Samples used to estimate the baseline rate when none is given to :meth:`start`.

    Raises
    ------
    ValueError
        ``window < 1``, ``fraction`` outside (0, 1) or ``baseline_samples < 1``.
    """

    name = "window"

    def __init__(self, window: int = 16, fraction: float = 0.57, baseline_samples: int = 128) -> None:
        if window < 1 or not (0 < fraction < 1):
            raise ValueError(f"need window >= 1 and 0 < fraction < 1, got {window}, {fraction}")
        self.window = int(window)
        self.fraction = float(fraction)
        self._ring = np.zeros(self.window, np.float64)
        self._state = np.zeros(3, np.float64)
        super().__init__(baseline_samples)

    def _reset_detector(self) -> None:
        self._state[:] = 0.0

    def _arm(self, baseline_rate: float) -> None:
        self._limit = self.fraction * self.window * baseline_rate

    def _detect(self, x: np.ndarray) -> int:
        return _window_drop(x, self._ring, self._state, self.window, self._limit)


def __getattr__(name: str):
    """``make_trigger`` moved to :mod:`beamloop.edge.trigger`; this name stays for one release."""
    if name == "make_trigger":
        warnings.warn("beamloop.edge.trigger.classical.make_trigger moved to beamloop.edge.trigger.make_trigger",
                      DeprecationWarning, stacklevel=2)
        from beamloop.edge.trigger import make_trigger

        return make_trigger
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
