"""Tail statistics of latency samples, on top of :class:`beamloop.edge.frame.latency.LatencyRecorder`.

The recorder's summary gives, per stage, ``n``, ``p50_us``, ``p99_us``, ``p999_us``, ``max_us``,
``mean_us`` and ``jitter_us`` (the standard deviation). :func:`stage_summary` adds the figures a latency
budget is planned with:

- ``spread_us``: p99 - p50, the jitter a control loop must absorb (robust to the one outlier that
  dominates a standard deviation);
- ``beyond_p999``: how many samples lie beyond the 99.9th percentile (n / 1000), and ``tail_ok``:
  whether that is at least one (n >= :data:`TAIL_SAMPLES`); with fewer samples the p99.9 is only an
  interpolation towards the maximum;
- ``per_s``: sustainable rate of the stage alone at its p50 (1 / p50).
"""

from __future__ import annotations

import math

import numpy as np

from beamloop.edge.frame.latency import LatencyRecorder

TAIL_SAMPLES = 1000
"""Samples needed for one to lie beyond the 99.9th percentile."""


def recorder_of(samples_ns: dict) -> LatencyRecorder:
    """A :class:`LatencyRecorder` holding ``samples_ns`` (stage -> iterable of nanoseconds), in that order."""
    rec = LatencyRecorder(stages=tuple(samples_ns), capacity=max([len(v) for v in samples_ns.values()] + [16]))
    for stage, values in samples_ns.items():
        for v in np.asarray(values, np.int64).ravel():
            rec.add(stage, int(v))
    return rec


def stage_summary(recorder: LatencyRecorder) -> dict:
    """Per stage with samples: the recorder's summary (microseconds) plus ``spread_us``, ``beyond_p999``,
    ``tail_ok`` and ``per_s`` (see the module docstring). Stages without samples are left out."""
    out = recorder.summary()
    for s in out.values():
        s["spread_us"] = s["p99_us"] - s["p50_us"]
        s["beyond_p999"] = s["n"] // 1000
        s["tail_ok"] = s["n"] >= TAIL_SAMPLES
        s["per_s"] = 1e6 / s["p50_us"] if s["p50_us"] > 0 else math.inf
    return out


def cdf(samples_us: np.ndarray, points: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Empirical distribution of ``samples_us`` (1-D) thinned to at most ``points`` steps: sorted values and
    the fraction of samples at or below each (both float64, same length; empty input gives empty arrays)."""
    v = np.sort(np.asarray(samples_us, np.float64).ravel())
    n = len(v)
    if n == 0:
        return v, v
    idx = np.unique(np.linspace(0, n - 1, min(points, n)).round().astype(np.int64))
    return v[idx], (idx + 1) / n
