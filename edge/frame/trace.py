"""Per-frame traces: when each frame was sent, received, decoded, and when each stage started and ended.

A :class:`FrameTrace` keeps the most recent frames' timestamps in a fixed-size structured array (a ring:
no growth in a long-running service) so that the slowest frames can be taken apart afterwards: which
stage made them slow, whether the thread waited for a core (wall time well above its CPU time), whether a
garbage collection ran meanwhile (:class:`GcWatch`). The run file stores it as ``/trace``
(:meth:`beamloop.edge.io.runlog.RunLog.write_trace`).

All timestamps are ``time.monotonic_ns()`` (CLOCK_MONOTONIC on Linux), the clock of the receivers'
``recv_ns``; ``sent_ns`` is the sender's and compares with them only when both run on one host.
"""

from __future__ import annotations

import gc
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext

MISSING = -1
"""Value of a timestamp or duration that was not measured."""


def trace_dtype(stages: tuple[str, ...]) -> np.dtype:
    """The record of one frame: ids, the transport's timestamps, then per stage ``<name>_start_ns``,
    ``<name>_end_ns`` and ``<name>_cpu_ns`` (all int64 nanoseconds, :data:`MISSING` where not measured),
    and ``gc_ns`` (garbage collection time that overlapped the frame path)."""
    fields = [("image_id", "i8"), ("frame_id", "i8"), ("sent_ns", "i8"), ("recv_ns", "i8"), ("decoded_ns", "i8")]
    for s in stages:
        fields += [(f"{s}_start_ns", "i8"), (f"{s}_end_ns", "i8"), (f"{s}_cpu_ns", "i8")]
    fields.append(("gc_ns", "i8"))
    return np.dtype(fields)


class GcWatch:
    """Records the garbage collector's pauses (``gc.callbacks``) in a ring of the last ``capacity``.

    Use as a context manager or call :meth:`start` / :meth:`stop`; :meth:`overlap_ns` is the collection time
    inside an interval. Python's documentation: the ``gc.callbacks`` list, phases ``"start"`` and ``"stop"``.
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._t = np.zeros((int(capacity), 2), np.int64)
        self._n = 0
        self._t0 = 0
        self._on = False

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.monotonic_ns()
        elif self._t0:
            k = self._n % len(self._t)
            self._t[k, 0] = self._t0
            self._t[k, 1] = time.monotonic_ns()
            self._n += 1
            self._t0 = 0

    def start(self) -> GcWatch:
        """Begin recording (idempotent)."""
        if not self._on:
            gc.callbacks.append(self._callback)
            self._on = True
        return self

    def stop(self) -> None:
        """Stop recording (idempotent)."""
        if self._on:
            gc.callbacks.remove(self._callback)
            self._on = False

    def __enter__(self) -> GcWatch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def count(self) -> int:
        """Collections recorded so far (all, including those the ring no longer holds)."""
        return self._n

    def overlap_ns(self, t0: int, t1: int) -> int:
        """Nanoseconds of recorded collections within ``[t0, t1]`` (newest first, stopping at the first that ended
        before ``t0``: cheap for the recent interval of a frame)."""
        cap = len(self._t)
        total = 0
        k = self._n - 1
        while k >= 0 and k > self._n - 1 - cap:
            a, b = int(self._t[k % cap, 0]), int(self._t[k % cap, 1])
            if b < t0:
                break
            lo, hi = max(a, t0), min(b, t1)
            if hi > lo:
                total += hi - lo
            k -= 1
        return total


class FrameTrace:
    """The last ``capacity`` frames' timestamps (see the module docstring).

    Parameters
    ----------
    stages : tuple of str
        The frame path's stage names, in order (:attr:`beamloop.edge.path.FramePath.names`).
    capacity : int
        Frames kept; older ones are overwritten (:attr:`dropped` counts them).
    gc_watch : GcWatch, optional
        Collections to attribute to frames (``gc_ns``).

    Raises
    ------
    ValueError
        A capacity below 1.
    """

    def __init__(self, stages: tuple[str, ...], capacity: int = 100_000, gc_watch: GcWatch | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"trace capacity must be at least 1, got {capacity}")
        self.stages = tuple(stages)
        self.dtype = trace_dtype(self.stages)
        # one int64 row per frame (every field is int64, so a row views as one record)
        self._rows = np.full((int(capacity), len(self.dtype.names or ())), MISSING, np.int64)
        self._n = 0
        self.gc_watch = gc_watch

    def __len__(self) -> int:
        return min(self._n, len(self._rows))

    @property
    def dropped(self) -> int:
        """Frames overwritten because the ring was full."""
        return max(self._n - len(self._rows), 0)

    def add(self, ctx: FrameContext, *, image_id: int = MISSING, frame_id: int = MISSING, sent_ns: int | None = None,
            recv_ns: int | None = None, decoded_ns: int | None = None) -> None:
        """Record one frame from the context the frame path just filled (its ``started_ns``, ``timings_ns`` and
        ``cpu_ns``) and the transport's timestamps (ns; None: not known). One row write, no allocation of
        arrays (a few microseconds)."""
        row = [image_id, frame_id, MISSING if sent_ns is None else sent_ns, MISSING if recv_ns is None else recv_ns,
               MISSING if decoded_ns is None else decoded_ns]
        started, took, cpu = ctx.started_ns, ctx.timings_ns, ctx.cpu_ns
        first = last = None
        for name in self.stages:
            t0 = started.get(name)
            if t0 is None:
                row += (MISSING, MISSING, MISSING)
                continue
            t1 = t0 + took.get(name, 0)
            row += (t0, t1, cpu.get(name, MISSING))
            if first is None:
                first = t0
            last = t1
        gw = self.gc_watch
        row.append(gw.overlap_ns(first, last) if gw is not None and first is not None and last is not None else 0)
        self._rows[self._n % len(self._rows)] = row
        self._n += 1

    def records(self) -> np.ndarray:
        """The frames kept, oldest first (a copy): structured array of :func:`trace_dtype`."""
        n, cap = self._n, len(self._rows)
        rows = self._rows[:n] if n <= cap else np.concatenate([self._rows[n % cap:], self._rows[:n % cap]])
        return np.ascontiguousarray(rows).view(self.dtype).reshape(-1).copy()


def frame_total_ns(rec: np.ndarray, stages: tuple[str, ...]) -> np.ndarray:
    """Per frame, receipt (or the first stage's start where the receipt is unknown) to the last stage's end, ns
    (int64, :data:`MISSING` where the frame has no stage times)."""
    end = rec[f"{stages[-1]}_end_ns"]
    start = np.where(rec["recv_ns"] != MISSING, rec["recv_ns"], rec[f"{stages[0]}_start_ns"])
    return np.where((end != MISSING) & (start != MISSING), end - start, MISSING)


def slowest(rec: np.ndarray, stages: tuple[str, ...], fraction: float = 0.01) -> dict:
    """The slowest ``fraction`` of the frames by :func:`frame_total_ns`, taken apart.

    Returns
    -------
    dict
        ``n_frames``, ``n_slow``, ``threshold_us`` (the slowest frames' lower bound); per stage ``stage_us``
        medians (all frames / slow frames), ``excess_us`` (slow minus all: where the extra time went),
        ``waited_us`` (slow frames' wall minus CPU time, where measured: time without a core); the slow frames'
        share with a garbage collection inside (``gc_share``), their median ``gap_us`` (time not in any stage:
        receipt to the first stage and between stages) and ``image_ids``.

    Raises
    ------
    ValueError
        No frame with stage times, or ``fraction`` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    tot = frame_total_ns(rec, stages)
    ok = tot != MISSING
    if not ok.any():
        raise ValueError("no frame in the trace has stage times")
    rec, tot = rec[ok], tot[ok]
    n_slow = max(int(np.ceil(fraction * len(rec))), 1)
    order = np.argsort(tot)[::-1][:n_slow]
    slow = rec[order]
    out: dict = {"n_frames": int(len(rec)), "n_slow": n_slow, "threshold_us": float(tot[order[-1]]) / 1e3,
                 "total_us": {"all_p50": float(np.median(tot)) / 1e3, "slow_p50": float(np.median(tot[order])) / 1e3},
                 "stage_us": {}, "excess_us": {}, "waited_us": {}}
    in_stages_all = np.zeros(len(rec), np.int64)
    for s in stages:
        d_all = rec[f"{s}_end_ns"] - rec[f"{s}_start_ns"]
        d_slow = slow[f"{s}_end_ns"] - slow[f"{s}_start_ns"]
        in_stages_all += d_all
        a, b = float(np.median(d_all)) / 1e3, float(np.median(d_slow)) / 1e3
        out["stage_us"][s] = {"all_p50": a, "slow_p50": b}
        out["excess_us"][s] = b - a
        cpu = slow[f"{s}_cpu_ns"]
        if (cpu != MISSING).all():
            out["waited_us"][s] = float(np.median(d_slow - cpu)) / 1e3
    gap = tot - in_stages_all
    out["gap_us"] = {"all_p50": float(np.median(gap)) / 1e3, "slow_p50": float(np.median(gap[order])) / 1e3}
    out["gc_share"] = float(np.mean(slow["gc_ns"] > 0))
    out["image_ids"] = [int(v) for v in slow["image_id"]]
    return out
