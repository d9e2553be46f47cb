"""Latency bookkeeping: per-stage samples in bounded preallocated arrays, fixed-bucket histograms, percentiles
and a printed table.

A long-running service records a few durations per frame and per bridge call for as long as it runs, so
nothing here grows without bound: each stage keeps its most recent :data:`WINDOW` samples exactly (a ring,
grown by doubling up to that size) and counts every sample in a fixed log-linear histogram
(:func:`bucket_of`) whose counts a monitor reads at its own rate (:meth:`LatencyRecorder.histogram`).
Up to :data:`WINDOW` samples per stage (every benchmark run so far) the summary is exactly what it was
before the cap.
"""

from __future__ import annotations

import numpy as np

STAGES = ("receive", "decode", "preprocess", "find", "classify", "policy", "bridge", "trigger", "end_to_end")
"""Stage names of the main job, in the order a frame meets them (see :mod:`beamloop.edge.path`)."""

WINDOW = 1 << 18
"""Most recent samples a :class:`LatencyRecorder` keeps per stage by default (2 MiB of int64 at most)."""

SUB_BITS = 3
"""Binary digits kept after the leading one in the histogram: 2**SUB_BITS buckets per octave, so a bucket is
at most 1/8 of its lower edge wide (the log-linear bucket layout of HdrHistogram, G. Tene,
https://hdrhistogram.github.io/HdrHistogram/)."""

LINEAR = 1 << (SUB_BITS + 1)
"""Durations below this many nanoseconds (16) get one bucket per nanosecond."""

MAX_OCTAVE = 40
"""Durations from 2**MAX_OCTAVE ns (about 18 minutes) on share the last bucket."""

N_BUCKETS = LINEAR + (MAX_OCTAVE - SUB_BITS - 1) * (1 << SUB_BITS) + 1
"""Histogram buckets per stage (the last one is the overflow bucket)."""


def bucket_of(ns: int) -> int:
    """The histogram bucket of a duration.

    Durations below :data:`LINEAR` ns have a bucket each; above, every octave ``[2**k, 2**(k+1))`` is split
    into ``2**SUB_BITS`` equal buckets; from ``2**MAX_OCTAVE`` ns on, the last bucket. Negative durations
    count in bucket 0.

    Parameters
    ----------
    ns : int
        Duration, nanoseconds.

    Returns
    -------
    int
        Index in ``[0, N_BUCKETS)``.
    """
    if ns < LINEAR:
        return ns if ns > 0 else 0
    e = ns.bit_length() - SUB_BITS - 1  # >= 1
    i = LINEAR + (e - 1) * (1 << SUB_BITS) + (ns >> e) - (1 << SUB_BITS)
    return i if i < N_BUCKETS else N_BUCKETS - 1


def bucket_edges() -> np.ndarray:
    """Lower edges of the histogram buckets, nanoseconds.

    Returns
    -------
    ndarray, shape (N_BUCKETS + 1,), int64
        ``edges[i] <= ns < edges[i + 1]`` for a duration counted in bucket ``i``; the last edge is the
        overflow bucket's nominal end (``2**(MAX_OCTAVE + 1)``).
    """
    edges = np.empty(N_BUCKETS + 1, np.int64)
    edges[:LINEAR] = np.arange(LINEAR)
    i = np.arange(LINEAR, N_BUCKETS - 1)
    e = (i - LINEAR) // (1 << SUB_BITS) + 1
    m = (i - LINEAR) % (1 << SUB_BITS) + (1 << SUB_BITS)
    edges[LINEAR:N_BUCKETS - 1] = m << e
    edges[N_BUCKETS - 1] = 1 << MAX_OCTAVE
    edges[N_BUCKETS] = 1 << (MAX_OCTAVE + 1)
    return edges


def histogram_quantile(counts: np.ndarray, q: float) -> float:
    """A quantile of a histogram of :func:`bucket_of` buckets, interpolated linearly inside its bucket.

    Parameters
    ----------
    counts : ndarray, shape (N_BUCKETS,)
        Counts per bucket.
    q : float
        Quantile in [0, 1].

    Returns
    -------
    float
        Nanoseconds (within one bucket's width, at most 1/8 of the value, of the exact quantile); NaN for an
        empty histogram.

    Raises
    ------
    ValueError
        ``q`` outside [0, 1], or ``counts`` of another length than :data:`N_BUCKETS`.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q!r} is outside [0, 1]")
    counts = np.asarray(counts)
    if counts.shape != (N_BUCKETS,):
        raise ValueError(f"histogram of shape {counts.shape}; expected ({N_BUCKETS},)")
    total = int(counts.sum())
    if total == 0:
        return float("nan")
    cum = np.cumsum(counts)
    rank = q * total
    i = int(np.searchsorted(cum, max(rank, 1e-12), side="left"))
    i = min(i, N_BUCKETS - 1)
    edges = bucket_edges()
    below = cum[i - 1] if i > 0 else 0
    frac = (rank - below) / counts[i] if counts[i] else 0.0
    return float(edges[i] + min(max(frac, 0.0), 1.0) * (edges[i + 1] - edges[i]))


class _Stage:
    """One stage's samples: the ring ``buf`` (int64, grown by doubling up to the window), ``n`` recorded ever,
    their ``sum`` and ``max`` (ns), and the histogram ``hist`` (a list of :data:`N_BUCKETS` ints: incrementing
    a list item is cheaper than a numpy element, and a copy of it is consistent under the GIL)."""

    __slots__ = ("buf", "n", "sum", "max", "hist")

    def __init__(self, capacity: int) -> None:
        self.buf = np.empty(capacity, np.int64)
        self.n = self.sum = self.max = 0
        self.hist = [0] * N_BUCKETS

    def grow(self, window: int) -> np.ndarray:
        """Double ``buf`` (at most to ``window`` samples); the new array."""
        self.buf = np.concatenate([self.buf, np.empty(min(len(self.buf), window - len(self.buf)), np.int64)])
        return self.buf


class LatencyRecorder:
    """Collects durations per stage (nanoseconds) without allocating per sample, in bounded memory.

    Each stage keeps its most recent ``window`` samples (an array grown by doubling from ``capacity`` up
    to ``window``, then overwritten as a ring), the count, sum and maximum of every sample, and a histogram
    of every sample in :data:`N_BUCKETS` fixed buckets (:func:`bucket_of`). Memory per stage is therefore
    at most ``8 * window + 8 * N_BUCKETS`` bytes however long the service runs.

    Parameters
    ----------
    stages : iterable of str
        Stage names, in the order of the printed table; unknown names are added when first recorded.
    capacity : int
        Samples preallocated per stage (at least 1); the array doubles when full, up to ``window``.
    window : int
        Most recent samples kept per stage (default :data:`WINDOW`; at least ``capacity``).

    Raises
    ------
    ValueError
        ``capacity`` below 1.
    """

    def __init__(self, stages=STAGES, capacity: int = 4096, window: int = WINDOW) -> None:
        if int(capacity) < 1:
            raise ValueError(f"latency recorder capacity {capacity!r} must be at least 1")
        self._cap = int(capacity)
        self.window = max(int(window), self._cap)
        self._st: dict[str, _Stage] = {}
        for s in stages:
            self._add_stage(s)

    def _add_stage(self, stage: str) -> _Stage:
        st = self._st[stage] = _Stage(min(self._cap, self.window))
        return st

    def add(self, stage: str, ns: int) -> None:
        """Record one duration of ``stage`` in nanoseconds (an integer; the hot path's cost: a few integer
        operations, one array store and one list increment)."""
        st = self._st.get(stage) or self._add_stage(stage)
        if type(ns) is not int:
            ns = int(ns)
        n = st.n
        k = n % self.window
        buf = st.buf
        if k >= len(buf):
            buf = st.grow(self.window)
        buf[k] = ns
        st.n = n + 1
        st.sum += ns
        if ns > st.max:
            st.max = ns
        if ns < LINEAR:  # bucket_of, inlined: LINEAR + (e - 1) * 2**SUB_BITS + (ns >> e) - 2**SUB_BITS
            b = ns if ns > 0 else 0
        else:
            e = ns.bit_length() - SUB_BITS - 1
            b = (e << SUB_BITS) + (ns >> e)
            if b >= N_BUCKETS:
                b = N_BUCKETS - 1
        st.hist[b] += 1

    @property
    def stages(self) -> tuple[str, ...]:
        """Stage names known, in table order."""
        return tuple(self._st)

    def count(self, stage: str) -> int:
        """Samples ever recorded for ``stage`` (0 for an unknown stage)."""
        st = self._st.get(stage)
        return 0 if st is None else st.n

    def samples(self, stage: str) -> np.ndarray:
        """The most recent durations of ``stage`` (at most ``window``), oldest first, nanoseconds.

        Returns
        -------
        ndarray, shape (min(count, window),), int64
            A view while fewer than ``window`` samples were recorded, else a copy of the ring in order.
        """
        st = self._st.get(stage)
        if st is None:
            return np.zeros(0, np.int64)
        n, buf = st.n, st.buf
        if n <= self.window:
            return buf[:n]
        k = n % self.window
        return np.concatenate([buf[k:], buf[:k]])

    def since(self, stage: str, mark: int) -> np.ndarray:
        """Durations of ``stage`` recorded after the first ``mark`` ones (a :meth:`count` taken earlier), those
        still held (the most recent ``window``), oldest first, nanoseconds (int64)."""
        n = self.count(stage)
        held = self.samples(stage)
        return held[len(held) - min(max(n - int(mark), 0), len(held)):]

    def histogram(self, stage: str) -> np.ndarray:
        """Counts of every duration of ``stage`` per bucket (:func:`bucket_edges`), a copy.

        Returns
        -------
        ndarray, shape (N_BUCKETS,), int64
        """
        st = self._st.get(stage)
        return np.zeros(N_BUCKETS, np.int64) if st is None else np.array(st.hist, np.int64)

    def totals(self, stage: str) -> tuple[int, int, int]:
        """``(count, sum_ns, max_ns)`` of every duration of ``stage`` recorded."""
        st = self._st.get(stage)
        return (0, 0, 0) if st is None else (st.n, st.sum, st.max)

    def summary(self) -> dict:
        """Per stage: ``n``, ``p50_us``, ``p99_us``, ``p999_us``, ``max_us``, ``mean_us``, ``jitter_us``
        (standard deviation); stages with no samples are left out.

        ``n``, ``max_us`` and ``mean_us`` cover every sample; the percentiles and the jitter the most recent
        ``window`` samples (all of them in a run shorter than that)."""
        out = {}
        for stage in list(self._st):
            v = self.samples(stage) / 1e3
            if len(v) == 0:
                continue
            n, total, mx = self.totals(stage)
            p50, p99, p999 = np.percentile(v, [50, 99, 99.9])
            out[stage] = {"n": int(n), "p50_us": float(p50), "p99_us": float(p99), "p999_us": float(p999),
                          "max_us": float(max(mx / 1e3, v.max())), "mean_us": float(total / n / 1e3)
                          if n > len(v) else float(v.mean()), "jitter_us": float(v.std())}
        return out

    def table(self, title: str = "latency per stage (microseconds)") -> str:
        """The summary as a fixed-width text table."""
        rows = [f"{title}", f"{'stage':<12}{'n':>7}{'p50':>11}{'p99':>11}{'max':>11}"]
        for stage, s in self.summary().items():
            rows.append(f"{stage:<12}{s['n']:>7}{s['p50_us']:>11.1f}{s['p99_us']:>11.1f}{s['max_us']:>11.1f}")
        return "\n".join(rows)
