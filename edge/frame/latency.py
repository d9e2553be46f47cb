"""Latency bookkeeping: per-stage samples in preallocated arrays, percentiles and a printed table."""

from __future__ import annotations

import numpy as np

STAGES = ("receive", "decode", "preprocess", "find", "classify", "policy", "bridge", "trigger", "end_to_end")
"""Stage names of the main job, in the order a frame meets them (see :mod:`beamloop.edge.path`)."""


class LatencyRecorder:
    """Collects durations per stage (nanoseconds) without allocating per sample.

    Parameters
    ----------
    stages : iterable of str
        Stage names, in the order of the printed table; unknown names are added when first recorded.
    capacity : int
        Samples preallocated per stage; the array doubles when full.
    """

    def __init__(self, stages=STAGES, capacity: int = 4096) -> None:
        self._cap = int(capacity)
        self._data: dict[str, np.ndarray] = {}
        self._n: dict[str, int] = {}
        for s in stages:
            self._add_stage(s)

    def _add_stage(self, stage: str) -> None:
        self._data[stage] = np.empty(self._cap, np.int64)
        self._n[stage] = 0

    def add(self, stage: str, ns: int) -> None:
        """Record one duration of ``stage`` in nanoseconds."""
        if stage not in self._data:
            self._add_stage(stage)
        n = self._n[stage]
        buf = self._data[stage]
        if n == len(buf):
            buf = self._data[stage] = np.concatenate([buf, np.empty(len(buf), np.int64)])
        buf[n] = ns
        self._n[stage] = n + 1

    def samples(self, stage: str) -> np.ndarray:
        """Recorded durations of ``stage``, nanoseconds (a view)."""
        return self._data[stage][: self._n.get(stage, 0)] if stage in self._data else np.zeros(0, np.int64)

    def summary(self) -> dict:
        """Per stage: ``n``, ``p50_us``, ``p99_us``, ``p999_us``, ``max_us``, ``mean_us``, ``jitter_us``
        (standard deviation); stages with no samples are left out."""
        out = {}
        for stage in self._data:
            v = self.samples(stage) / 1e3
            if len(v) == 0:
                continue
            p50, p99, p999 = np.percentile(v, [50, 99, 99.9])
            out[stage] = {"n": int(len(v)), "p50_us": float(p50), "p99_us": float(p99), "p999_us": float(p999),
                          "max_us": float(v.max()), "mean_us": float(v.mean()), "jitter_us": float(v.std())}
        return out

    def table(self, title: str = "latency per stage (microseconds)") -> str:
        """The summary as a fixed-width text table."""
        rows = [f"{title}", f"{'stage':<12}{'n':>7}{'p50':>11}{'p99':>11}{'max':>11}"]
        for stage, s in self.summary().items():
            rows.append(f"{stage:<12}{s['n']:>7}{s['p50_us']:>11.1f}{s['p99_us']:>11.1f}{s['max_us']:>11.1f}")
        return "\n".join(rows)
