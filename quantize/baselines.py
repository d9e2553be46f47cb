"""Per-sample decision statistics of the classical triggers, for threshold sweeps on whole streams.

:class:`beamloop.edge.trigger.classical.CusumTrigger` and :class:`beamloop.edge.trigger.classical.WindowTrigger`
return only the first alarm for one threshold. To draw ROC and delay-versus-false-alarm curves the statistic
at every sample is needed; these kernels compute exactly the quantity each trigger compares with its
threshold (same baseline from the first ``baseline_samples`` samples, same recurrences), so that the first
sample whose statistic exceeds ``h`` is the sample the trigger fires on (tests/test_quantize_eval.py checks
this).
"""

from __future__ import annotations

import math

import numba
import numpy as np

NO_DECISION = -np.inf
"""Statistic of samples on which a trigger does not decide yet (baseline)."""


@numba.njit(cache=True, nogil=True)
def _cusum_stat(x, baseline_rate, log_rho, drift, start, out):
    """CUSUM sum after every sample of ``x`` (m,) float64 into ``out`` (m,) float64; ``-inf`` before ``start``.

    ``log_rho`` and ``drift`` as in :func:`beamloop.edge.trigger.classical._cusum_drop` (``baseline_rate`` is
    already folded into ``drift``)."""
    s = 0.0
    for k in range(x.shape[0]):
        if k < start:
            out[k] = -np.inf
            continue
        s += x[k] * log_rho + drift
        if s < 0.0:
            s = 0.0
        out[k] = s


@numba.njit(cache=True, nogil=True)
def _window_stat(x, baseline_rate, window, start, out):
    """``1 - window sum / (window * baseline_rate)`` after every sample of ``x`` (m,) float64 into ``out`` (m,)
    float64; ``-inf`` before ``start`` and until the window (started at ``start``) is full."""
    s = 0.0
    for k in range(x.shape[0]):
        if k < start:
            out[k] = -np.inf
            continue
        s += x[k]
        if k - start >= window:
            s -= x[k - window]
        if k - start + 1 < window:
            out[k] = -np.inf
        else:
            out[k] = 1.0 - s / (window * baseline_rate)


def _baseline(x: np.ndarray, n: int) -> float:
    """The triggers' baseline rate: mean of the first ``n`` counts, floored at 1e-3 counts per sample
    (:class:`beamloop.edge.trigger.base.BaselineTrigger`); raises ``ValueError`` for a shorter stream."""
    if len(x) < n:
        raise ValueError(f"stream of {len(x)} samples is shorter than the baseline of {n}")
    return max(float(np.mean(x[:n])), 1e-3)


def cusum_statistic(counts: np.ndarray, drop_ratio: float = 0.5, baseline_samples: int = 128) -> np.ndarray:
    """Page's CUSUM for a Poisson rate drop (as :class:`beamloop.edge.trigger.classical.CusumTrigger`) at every sample.

    Parameters
    ----------
    counts : ndarray, shape (n,), integer counts
    drop_ratio : float
        Rate after the event over the rate before.
    baseline_samples : int
        Samples used to estimate the rate before the event.

    Returns
    -------
    ndarray, shape (n,), float64, nats; :data:`NO_DECISION` during the baseline. The trigger with
    threshold ``h`` fires at the first sample whose statistic is ``> h``.

    Raises
    ------
    ValueError
        Stream shorter than the baseline.
    """
    x = np.ascontiguousarray(counts, np.float64)
    rate = _baseline(x, baseline_samples)
    out = np.empty(len(x))
    _cusum_stat(x, rate, math.log(drop_ratio), rate * (1 - drop_ratio), baseline_samples, out)
    return out


def window_statistic(counts: np.ndarray, window: int = 16, baseline_samples: int = 128) -> np.ndarray:
    """``1 - (sum of the last window samples) / (window * baseline_rate)`` at every sample (as
    :class:`beamloop.edge.trigger.classical.WindowTrigger`, whose window fills after the baseline); the trigger
    with ``fraction`` fires at the first sample whose statistic is ``> 1 - fraction``.

    Parameters
    ----------
    counts : ndarray, shape (n,), integer counts
    window : int
        Samples summed.
    baseline_samples : int
        Samples used to estimate the baseline rate.

    Returns
    -------
    ndarray, shape (n,), float64, dimensionless; :data:`NO_DECISION` until the window is full.

    Raises
    ------
    ValueError
        Stream shorter than the baseline.
    """
    x = np.ascontiguousarray(counts, np.float64)
    rate = _baseline(x, baseline_samples)
    out = np.empty(len(x))
    _window_stat(x, rate, window, baseline_samples, out)
    return out
