"""The trigger contract: what the service's dwell loop needs from an ejection trigger, and the shared state.

A trigger watches the detector counts of a parked probe, one block of samples at a time, and says at
which sample the atom under the probe is gone. :class:`Trigger` is the interface as a
:class:`typing.Protocol` (structural: a class satisfies it by having the members, no subclassing is
needed; ``isinstance(obj, Trigger)`` checks that they exist). :class:`TriggerState` holds the per-dwell
bookkeeping every trigger here shares, and :class:`BaselineTrigger` adds the estimate of the intact
column's rate from the first samples of a dwell that the classical detectors
(:mod:`beamloop.edge.trigger.classical`) need before they can decide.

Counts per sample of a parked probe follow a Poisson law of mean ``baseline_rate`` while the column is
intact; the maximum-likelihood estimate of that mean from ``n`` samples is their average (G. Casella &
R. L. Berger, *Statistical Inference*, 2nd ed., Duxbury (2002), section 7.2.2), which is what
:class:`BaselineTrigger` uses.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Trigger(Protocol):
    """An ejection trigger on the parked-probe ADF samples of one dwell.

    Attributes
    ----------
    name : str
        Registry name (:func:`beamloop.edge.trigger.make_trigger`), e.g. ``"cusum"``.
    trigger_sample : int
        Sample index, counted from the start of the dwell (the first sample after :meth:`start`), at which
        the trigger fired; -1 while it has not.
    baseline_rate : float
        Counts per sample the trigger takes as the intact column's signal: the ``expected_rate`` given to
        :meth:`start`, or the trigger's own estimate; NaN before it is known.
    """

    name: str
    trigger_sample: int
    baseline_rate: float

    def start(self, expected_rate: float | None = None) -> None:
        """Begin a new dwell, forgetting every earlier sample.

        Parameters
        ----------
        expected_rate : float, optional
            Counts per sample of the intact column when known in advance (skips the trigger's own estimate).

        Raises
        ------
        ValueError
            ``expected_rate`` not finite or not positive.
        """
        ...

    def update(self, block: np.ndarray) -> int:
        """Feed the next block of samples of the dwell.

        Parameters
        ----------
        block : ndarray, shape (n,) or (1, n), integer (or non-negative finite float) counts per sample

        Returns
        -------
        int
            Index within ``block`` of the first sample at which the trigger fires, or -1 (also for every
            block after it has fired).

        Raises
        ------
        ValueError
            Negative or non-finite counts.
        """
        ...


def check_expected_rate(expected_rate: float | None) -> float | None:
    """``expected_rate`` as a float, or None.

    Raises
    ------
    ValueError
        Not finite or not positive (counts per sample).
    """
    if expected_rate is None:
        return None
    if not (math.isfinite(expected_rate) and expected_rate > 0):
        raise ValueError(f"expected rate must be a positive number of counts per sample, got {expected_rate}")
    return float(expected_rate)


class TriggerState:
    """Per-dwell bookkeeping shared by the triggers: samples seen, the firing sample, the baseline rate.

    Attributes
    ----------
    samples_seen : int
        Samples fed since :meth:`begin_dwell`.
    trigger_sample : int
        See :class:`Trigger`.
    baseline_rate : float
        See :class:`Trigger`.
    """

    samples_seen: int = 0
    trigger_sample: int = -1
    baseline_rate: float = math.nan

    def begin_dwell(self, expected_rate: float | None) -> float | None:
        """Reset the bookkeeping for a new dwell; returns the checked ``expected_rate`` (or None), which
        becomes :attr:`baseline_rate` (NaN without one).

        Raises
        ------
        ValueError
            As :func:`check_expected_rate`.
        """
        rate = check_expected_rate(expected_rate)
        self.samples_seen = 0
        self.trigger_sample = -1
        self.baseline_rate = math.nan if rate is None else rate
        return rate

    @property
    def triggered(self) -> bool:
        """Whether the trigger has fired in this dwell."""
        return self.trigger_sample >= 0


class BaselineTrigger(TriggerState):
    """A trigger that estimates the baseline rate from the first ``baseline_samples`` of a dwell.

    Subclasses implement the detector through three hooks: ``_reset_detector()`` (clear the detector's
    state at :meth:`start`), ``_arm(baseline_rate)`` (derive its constants once the rate is known) and
    ``_detect(x) -> int`` (advance it over counts ``x``, shape (m,); return the index of the first alarm
    or -1). Samples used for the estimate are not decided on; the estimate is their mean, floored at
    1e-3 counts per sample so that an empty baseline still arms the detector.

    Parameters
    ----------
    baseline_samples : int
        Samples averaged for the baseline when :meth:`start` gets no ``expected_rate``.

    Raises
    ------
    ValueError
        ``baseline_samples < 1``.
    """

    def __init__(self, baseline_samples: int) -> None:
        if baseline_samples < 1:
            raise ValueError(f"baseline_samples must be >= 1, got {baseline_samples}")
        self.baseline_samples = int(baseline_samples)
        self._base_buf = np.zeros(self.baseline_samples, np.float64)
        self.start()

    def start(self, expected_rate: float | None = None) -> None:
        """Begin a new dwell; ``expected_rate`` (counts per sample) skips the baseline estimate.

        Raises
        ------
        ValueError
            ``expected_rate`` not finite or not positive.
        """
        rate = self.begin_dwell(expected_rate)
        self._n_base = 0
        self._reset_detector()
        if rate is not None:
            self._arm(rate)

    def update(self, block: np.ndarray) -> int:
        """Feed a block of counts; return the index within it of the alarm, or -1.

        Parameters
        ----------
        block : ndarray, shape (n,) or (1, n), counts per sample (integer, or float)

        Returns
        -------
        int
            Index in ``block`` of the first alarm, -1 if none (or if the trigger had already fired).

        Raises
        ------
        ValueError
            A float block with negative or non-finite values.
        """
        x = np.asarray(block).reshape(-1)
        if x.dtype.kind == "f" and (not np.all(np.isfinite(x)) or np.any(x < 0)):
            raise ValueError("trigger input has negative or non-finite counts")
        if self.triggered:
            self.samples_seen += len(x)
            return -1
        start = 0
        if math.isnan(self.baseline_rate):
            take = min(self.baseline_samples - self._n_base, len(x))
            self._base_buf[self._n_base:self._n_base + take] = x[:take]
            self._n_base += take
            start = take
            if self._n_base == self.baseline_samples:
                self.baseline_rate = max(float(self._base_buf.mean()), 1e-3)
                self._arm(self.baseline_rate)
        k = -1
        if not math.isnan(self.baseline_rate) and start < len(x):
            k = self._detect(x[start:])
            if k >= 0:
                k += start
                self.trigger_sample = self.samples_seen + k
        self.samples_seen += len(x)
        return k

    def _reset_detector(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _arm(self, baseline_rate: float) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _detect(self, x: np.ndarray) -> int:  # pragma: no cover - overridden
        raise NotImplementedError
