"""The monitor board: what the service publishes for the live view, and what the web thread reads.

The service's thread (the frame path and the dwells) calls the ``publish_*`` / ``dwell_*`` methods; they never
block, never allocate per frame, and never encode anything:

- :meth:`MonitorBoard.publish_frame` counts the frame and, at most every ``min_interval_s`` (a clock the
  caller can inject), copies the frame's image into a buffer preallocated per image shape and keeps
  references to the frame's results (its :class:`~beamloop.edge.frame.columns.ColumnTable`, targets, the
  out-of-distribution verdict and per-column uncertainty, all new objects per frame). When the web thread
  holds the board's lock at that moment, the frame is skipped rather than waited for.
- :meth:`MonitorBoard.dwell_started`, :meth:`~MonitorBoard.dwell_block`, :meth:`~MonitorBoard.dwell_ended`
  keep the probe position, the parked-probe signal (a fixed ring of the last ``trace_samples`` samples) and
  the last dwells' decisions (a bounded deque).

The web thread (:mod:`beamloop.edge.monitor.web`) calls :meth:`MonitorBoard.frame_copy` and
:meth:`MonitorBoard.state`, which copy what they need under the lock, and reads the sources given to the board
(counters, the latency recorder, live 4D-STEM images) when it is asked, at its own rate.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from beamloop.edge.frame.latency import LatencyRecorder, bucket_edges, histogram_quantile

COUNTER_NAMES = {
    "frames": "frames through the frame path",
    "frames_received": "frames the receiver took off the stream",
    "rejected": "frames rejected (bad messages, refused series, frames the path refused)",
    "dropped": "frames lost on the way (dropped by the receiver, or missing frame ids)",
    "watchdog_trips": "watchdog blanks at the scan controller",
    "refused_positions": "beam positions refused (by the client before sending, or by the controller)",
    "dwells": "dwells ended",
    "triggers": "dwells ended by the ejection trigger",
    "bridge_calls": "calls made on the control bridge",
    "bridge_errors": "bridge calls that failed or timed out",
    "blank_failures": "blanks that were not confirmed",
}
"""The counters of the live view and of ``/metrics`` (name: meaning); a counter source returns a subset."""

DWELLS_KEPT = 32
"""Dwells the board remembers for the live view."""


@dataclass(frozen=True)
class FrameView:
    """A copy of the latest published frame, for the web thread.

    Attributes
    ----------
    seq : int
        Publication number (1 for the first frame published; increases by one per publication).
    image_id : int
        The frame's image id in its series.
    frame_id : int or None
        The scan frame's id (None without a scan frame).
    image : ndarray, shape (rows, cols)
        The frame's image (its own copy), the stream's dtype.
    pixel_size_A : float or None
        Angstrom per pixel.
    x_px, y_px : ndarray, shape (n,), float64
        Column positions, pixels (column, row).
    cls : ndarray, shape (n,), int64
        Column classes, indices into ``class_names``.
    class_names : tuple of str
    uncertainty : ndarray, shape (n,), float64 or None
        Per-column uncertainty (the ``ood`` stage's ``column_uncertainty``; NaN where it has none).
    targets : list of (x_px, y_px)
        Beam targets the policy chose.
    ood : dict or None
        ``score``, ``alarm``, ``threshold`` of the out-of-distribution stage.
    t_s : float
        Board clock at publication, seconds.
    """

    seq: int
    image_id: int
    frame_id: int | None
    image: np.ndarray
    pixel_size_A: float | None
    x_px: np.ndarray
    y_px: np.ndarray
    cls: np.ndarray
    class_names: tuple[str, ...]
    uncertainty: np.ndarray | None
    targets: list
    ood: dict | None
    t_s: float


def _finite(v) -> float | None:
    """``v`` as a float, or None when it is not finite (JSON has no NaN)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class MonitorBoard:
    """Latest frame, dwells and counters of a running service, for the live view and ``/metrics``.

    Parameters
    ----------
    min_interval_s : float
        Shortest time between two frames copied for the view, seconds (0.2: at most 5 per second); frames in
        between are only counted.
    clock : callable() -> float
        Monotonic seconds (default :func:`time.monotonic`); tests move it by hand.
    trace_samples : int
        Parked-probe samples kept for the view (a ring; the view shows the latest dwell's).
    latency : LatencyRecorder, optional
        The service's recorder; its histograms are read when the view or ``/metrics`` asks.
    counters : callable() -> dict, optional
        Returns the service's counters (names of :data:`COUNTER_NAMES`); called from the web thread.
    images : callable() -> dict, optional
        Returns live images by name (2-D float arrays, NaN where not yet scanned), e.g.
        :attr:`beamloop.edge.analysis.live4d.LiveImager.images`; called from the web thread.
    controller : callable() -> dict or None, optional
        Returns the scan controller's state (``get_state``) read on a connection of the web thread's own.

    Raises
    ------
    ValueError
        ``min_interval_s`` negative or not finite, ``trace_samples`` below 1.
    """

    def __init__(self, *, min_interval_s: float = 0.2, clock: Callable[[], float] = time.monotonic,
                 trace_samples: int = 1 << 16, latency: LatencyRecorder | None = None,
                 counters: Callable[[], dict] | None = None, images: Callable[[], dict] | None = None,
                 controller: Callable[[], dict | None] | None = None) -> None:
        if not (math.isfinite(min_interval_s) and min_interval_s >= 0):
            raise ValueError(f"min_interval_s {min_interval_s!r} must be a finite number >= 0")
        if int(trace_samples) < 1:
            raise ValueError(f"trace_samples {trace_samples!r} must be at least 1")
        self.min_interval_s = float(min_interval_s)
        self.clock = clock
        self.latency = latency
        self.counters = counters
        self.images = images
        self.controller = controller
        self._lock = threading.Lock()
        self.frames = 0
        self.frames_copied = 0
        self.frames_skipped_busy = 0
        self._last_copy = -math.inf
        self._seq = 0
        self._image: np.ndarray | None = None
        self._frame: dict | None = None
        self._trace = np.zeros(int(trace_samples), np.float32)
        self._trace_n = 0
        self._dwell_start_n = 0
        self._decision_n = -1
        self._probe: dict | None = None
        self._dwells: deque = deque(maxlen=DWELLS_KEPT)
        self.reasons: Counter = Counter()
        self._stop = threading.Event()
        self.stop_note = ""

    # the service's side ------------------------------------------------------------------------------------
    def publish_frame(self, image: np.ndarray, ctx, scan=None, image_id: int = 0) -> bool:
        """A frame went through the frame path: count it, and keep it for the view when it is due.

        Parameters
        ----------
        image : ndarray, shape (rows, cols)
            The frame's image (copied when kept: the caller may reuse its memory).
        ctx : FrameContext
            The path's context after the frame (``columns``, ``targets``, ``extras``, ``meta`` are read; the
            objects are kept by reference, the context itself is not).
        scan : ScanFrame, optional
        image_id : int

        Returns
        -------
        bool
            Whether the frame was kept (due, and the web thread was not copying at that moment).
        """
        self.frames += 1
        now = self.clock()
        if now - self._last_copy < self.min_interval_s:
            return False
        if not self._lock.acquire(blocking=False):
            self.frames_skipped_busy += 1
            return False
        try:
            buf = self._image
            if buf is None or buf.shape != image.shape or buf.dtype != image.dtype:
                buf = self._image = np.empty(image.shape, image.dtype)  # once per series shape
            np.copyto(buf, image)
            extras = ctx.extras
            ood = extras.get("ood")
            meta = ctx.meta
            self._seq += 1
            self._frame = {"seq": self._seq, "image_id": int(image_id), "t_s": now,
                           "frame_id": None if scan is None else scan.frame_id,
                           "pixel_size_A": None if meta is None else meta.pixel_size_A,
                           "columns": ctx.columns, "targets": ctx.targets,
                           "uncertainty": extras.get("column_uncertainty"),
                           "ood": None if ood is None else (ood.get("score"), ood.get("alarm"), ood.get("threshold"))}
            self._last_copy = now
            self.frames_copied += 1
        finally:
            self._lock.release()
        return True

    def dwell_started(self, target, fx: float, fy: float, frame_id: int | None = None) -> None:
        """The probe was parked for ``target`` (a :class:`~beamloop.edge.stages.policy.Target`, at pixel
        ``(x_px, y_px)`` of its frame) at fractions ``(fx, fy)`` of scan frame ``frame_id`` (default the
        target's; another one after a lock-on rescan, or shifted by the drift prediction) and the beam is about
        to go on."""
        self._dwell_start_n = self._trace_n
        self._decision_n = -1
        self._probe = {"x_px": float(target.x_px), "y_px": float(target.y_px), "fx": float(fx), "fy": float(fy),
                       "frame_id": int(target.frame_id if frame_id is None else frame_id), "active": True}

    def dwell_block(self, block: np.ndarray, decision: int = -1) -> None:
        """A block of parked-probe samples (1-D, counts) arrived; ``decision`` is the trigger's decision sample
        within the dwell (>= 0 when it fired on this block). Written into the trace ring without allocating."""
        n = len(block)
        size = len(self._trace)
        if n >= size:
            self._trace[:] = block[n - size:]
        else:
            k = self._trace_n % size
            first = min(n, size - k)
            self._trace[k:k + first] = block[:first]
            self._trace[:n - first] = block[first:]
        if decision >= 0 and self._decision_n < 0:
            self._decision_n = self._dwell_start_n + int(decision)
        self._trace_n += n

    def dwell_ended(self, result) -> None:
        """A dwell ended (a :class:`~beamloop.edge.service.DwellResult`): keep its decision for the view."""
        self.reasons[result.reason] += 1
        if result.trigger_sample >= 0 and self._decision_n < 0:
            self._decision_n = self._dwell_start_n + int(result.trigger_sample)
        if self._probe is not None:
            self._probe = {**self._probe, "active": False}
        self._dwells.append({"reason": result.reason, "trigger_at": result.trigger_at,
                             "trigger_sample": int(result.trigger_sample), "samples": int(result.samples),
                             "x_px": float(result.target.x_px), "y_px": float(result.target.y_px),
                             "frame_id": int(result.target.frame_id), "t_s": self.clock()})

    # the operator's stop -------------------------------------------------------------------------------------
    def request_stop(self, note: str = "stop button") -> None:
        """The operator asked to stop: :meth:`interrupt` says so from now on (the service blanks the beam and
        stops at its next check, :class:`beamloop.edge.service.Interrupted`)."""
        self.stop_note = note
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called."""
        return self._stop.is_set()

    def interrupt(self) -> int:
        """An ``interrupt`` callable for :class:`beamloop.edge.service.EdgeService`: ``SIGINT`` (2) once a stop
        was requested (the same path as Ctrl-C: blank, write what was recorded, exit 130), else 0."""
        return int(signal.SIGINT) if self._stop.is_set() else 0

    # the web thread's side -----------------------------------------------------------------------------------
    def frame_copy(self) -> FrameView | None:
        """A copy of the latest kept frame (None before the first), taken under the lock."""
        with self._lock:
            f = self._frame
            if f is None or self._image is None:
                return None
            image = self._image.copy()
        cols = f["columns"]
        unc = f["uncertainty"]
        targets = [(float(t.x_px), float(t.y_px)) for t in (f["targets"] or [])]
        ood = None if f["ood"] is None else {"score": _finite(f["ood"][0]), "alarm": bool(f["ood"][1]),
                                             "threshold": _finite(f["ood"][2])}
        return FrameView(seq=f["seq"], image_id=f["image_id"], frame_id=f["frame_id"], image=image,
                         pixel_size_A=f["pixel_size_A"], x_px=np.asarray(cols.x, np.float64),
                         y_px=np.asarray(cols.y, np.float64), cls=np.asarray(cols.cls, np.int64),
                         class_names=tuple(cols.class_names),
                         uncertainty=None if unc is None else np.asarray(unc, np.float64), targets=targets, ood=ood,
                         t_s=f["t_s"])

    @property
    def seq(self) -> int:
        """Publication number of the latest kept frame (0 before the first)."""
        return self._seq

    def counter_values(self) -> dict[str, int]:
        """The counters (:data:`COUNTER_NAMES`): the board's own (``frames``, ``dwells``, ``triggers``) and the
        counter source's, read now."""
        out = {"frames": self.frames, "dwells": sum(self.reasons.values()), "triggers": self.reasons.get("trigger", 0)}
        if self.counters is not None:
            out.update({k: int(v) for k, v in self.counters().items() if k in COUNTER_NAMES})
        return out

    def trace(self) -> tuple[np.ndarray, int]:
        """The parked-probe samples of the latest dwell held (its last ``trace_samples`` at most), oldest first
        (float32, a copy), and the index in it of that dwell's trigger decision (-1 when none is held)."""
        size = len(self._trace)
        n = self._trace_n
        first = max(self._dwell_start_n, n - size)
        k0, k1 = first % size, n % size
        if n - first == size:
            out = np.concatenate([self._trace[k1:], self._trace[:k1]])
        elif k0 <= k1:
            out = self._trace[k0:k1].copy()
        else:
            out = np.concatenate([self._trace[k0:], self._trace[:k1]])
        d = self._decision_n
        return out, (d - first if first <= d < n else -1)

    def latency_view(self, octave_from: int = 10, octave_to: int = 34) -> dict:
        """Per stage with samples: ``n``, ``p50_us``, ``p99_us`` (from the histogram of every sample, within
        1/8 of the value) and the counts per octave from ``2**octave_from`` to ``2**octave_to`` ns
        (``edges_us``: the octaves' lower edges; the first bin also holds faster, the last slower samples)."""
        if self.latency is None:
            return {}
        edges = bucket_edges()
        lows = [1 << k for k in range(octave_from, octave_to)]
        idx = np.searchsorted(edges[:-1], lows)
        out = {}
        for stage in self.latency.stages:
            h = self.latency.histogram(stage)
            n = int(h.sum())
            if n == 0:
                continue
            per = np.add.reduceat(h, idx)
            per[0] += h[:idx[0]].sum()
            out[stage] = {"n": n, "p50_us": _finite(histogram_quantile(h, 0.5) / 1e3),
                          "p99_us": _finite(histogram_quantile(h, 0.99) / 1e3),
                          "edges_us": [v / 1e3 for v in lows], "counts": per.tolist()}
        return out

    def state(self, fv: FrameView | None = None) -> dict:
        """Everything the page shows but the images, as JSON-ready values: ``seq``, ``frame`` (without its image;
        columns, targets, ``ood``), ``probe``, ``dwells``, ``trace``, ``counters``, ``latency``, ``images``
        (names), ``controller``, ``stopped``; ``frame`` is ``fv`` when given (the frame whose image the caller
        encodes), else :meth:`frame_copy`."""
        fv = fv if fv is not None else self.frame_copy()
        frame = None
        if fv is not None:
            unc = None if fv.uncertainty is None else [_finite(u) for u in fv.uncertainty]
            frame = {"seq": fv.seq, "image_id": fv.image_id, "frame_id": fv.frame_id,
                     "shape": list(fv.image.shape), "pixel_size_A": fv.pixel_size_A,
                     "columns": {"x": np.round(fv.x_px, 2).tolist(), "y": np.round(fv.y_px, 2).tolist(),
                                 "cls": fv.cls.tolist(), "class_names": list(fv.class_names), "uncertainty": unc},
                     "n_columns": len(fv.x_px), "targets": [list(t) for t in fv.targets], "ood": fv.ood}
        samples, decision = self.trace()
        step = max(1, len(samples) // 1024)
        images = {}
        if self.images is not None:
            images = {k: list(np.shape(v)) for k, v in self.images().items()}
        ctl = None
        if self.controller is not None:
            try:
                ctl = self.controller()
            except Exception as exc:  # noqa: BLE001 - the view shows the error, the service goes on
                ctl = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        return {"seq": self._seq, "frame": frame, "probe": self._probe, "dwells": list(self._dwells),
                "trace": {"samples": samples[::step].tolist(), "step": step,
                          "decision": decision // step if decision >= 0 else -1},
                "counters": self.counter_values(), "latency": self.latency_view(), "images": images,
                "controller": ctl, "stopped": self.stop_requested, "stop_note": self.stop_note,
                "view": {"frames_copied": self.frames_copied, "min_interval_s": self.min_interval_s}}
