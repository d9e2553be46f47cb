"""The merger of a fan-out (:mod:`beamloop.streams.fanout`): partial results of N workers into one live image
per scan frame, what is complete decided by frame ids, dead workers noticed by their heartbeats.

:class:`MergeState` is the bookkeeping alone (no sockets, an injectable clock: what the tests drive);
:class:`FanoutMerger` puts it behind the two sockets the workers connect to.

Rules
    Frame id ``i`` of a series belongs to probe position ``i % (rows * cols)`` of scan frame
    ``i // (rows * cols)`` (raster order, as a detector triggered once per probe position numbers its frames).
    Per-frame results are placed at their probe positions; summed results (``sums``, e.g. the summed
    diffraction pattern) are added over the whole series: LiberTEM's UDF ``merge`` for its ``nav`` and
    ``sig`` kinds of result buffers (LiberTEM, ``libertem/udf/base.py``).

    A scan frame is *closed* (handed out by :meth:`MergeState.pop_closed`), in order, when

    1. every one of its frame ids has arrived (``closed_by="complete"``); or
    2. every live worker's *watermark* (the highest frame id it has sent a result for) has passed its last
       id: each worker receives its share in order and its messages reach the merger in order, so no result
       for this scan frame can come any more (``"watermarks"``); or
    3. the series' ``end`` has been relayed, every live worker is idle (its receiver had nothing waiting)
       and ``settle_s`` have passed since (``"end"``); or
    4. no worker is alive any more (``"no_workers"``); or
    5. results for :data:`MAX_OPEN_FRAMES` newer scan frames are open (``"overflow"``: a worker far behind).

    What did not arrive is counted in :attr:`ScanResult.missing`, never left out silently. A worker whose
    heartbeats stop for ``timeout_s`` (merger clock) is declared dead; the missing frames of a scan frame that
    a dead worker had not yet passed are attributed to it (:attr:`ScanResult.lost_with`), the others count as
    lost upstream (the detector's or the network's doing). A worker that says ``bye`` left on purpose. A
    "dead" worker that beats again is alive again (``revived`` counts it); its later results still merge.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import zmq

from beamloop.streams.dectris.series import DetectorSeries
from beamloop.streams.fanout import WIRE_VERSION, series_from_dict, series_to_dict

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1.0
"""Heartbeat silence after which a worker is declared dead, seconds (5 heartbeats of the default period)."""

DEFAULT_SETTLE_S = 0.5
"""After a relayed ``end`` with every live worker idle, wait this long before closing the last scan frames."""

MAX_OPEN_FRAMES = 8
"""Scan frames accumulated at once at most; a part for a frame beyond them closes the oldest first."""


@dataclass
class WorkerState:
    """What the merger knows of one worker.

    Attributes
    ----------
    name : str
    alive : bool
        Heard from within ``timeout_s`` and not gone.
    left : bool
        Said ``bye``.
    last_heard : float
        Merger clock at its last message, seconds.
    watermark : int
        Highest frame id it has sent a result for (-1: none yet).
    frames : int
        Frames it says it has reduced.
    idle_since : float or None
        Merger clock of the first idle heartbeat of the current run of them; None while it is busy.
    series_id : int or None
        The series it has open.
    died_at : float or None
        When it was declared dead.
    """

    name: str
    alive: bool = True
    left: bool = False
    last_heard: float = 0.0
    watermark: int = -1
    frames: int = 0
    idle_since: float | None = None
    series_id: int | None = None
    died_at: float | None = None


@dataclass
class ScanResult:
    """One closed scan frame.

    Attributes
    ----------
    series_id : int
    index : int
        Scan frame number within the series (frame ids ``index * npos`` to ``(index + 1) * npos - 1``).
    images : dict name -> ndarray (rows, cols), float64
        One image per per-frame result; NaN at probe positions whose frame did not arrive.
    received : int
        Frames whose results arrived.
    expected : int
        Frames this scan frame should have (``rows * cols``, fewer for the last one of a series that announced
        a number of images not a multiple of it).
    closed_by : str
        ``complete``, ``watermarks``, ``end``, ``no_workers`` or ``overflow`` (see the module docstring).
    lost_with : tuple of str
        Dead workers that had not passed this scan frame: the missing frames are theirs.
    first_id_ns : int
        ``time.monotonic_ns()`` (merger host) when its first result arrived; ``closed_ns`` when it closed.
    """

    series_id: int
    index: int
    images: dict
    received: int
    expected: int
    closed_by: str
    lost_with: tuple[str, ...] = ()
    first_id_ns: int = 0
    closed_ns: int = 0

    @property
    def missing(self) -> int:
        """Frames of this scan frame that never arrived."""
        return self.expected - self.received

    @property
    def complete(self) -> bool:
        """Whether every frame arrived."""
        return self.received == self.expected


@dataclass
class MergeCounters:
    """What the merger has seen (see the module docstring for the rules).

    Attributes
    ----------
    messages, parts, frames : int
        Messages read, ``part`` messages merged, frame results placed (duplicates not counted again).
    duplicates : int
        Frame results for a probe position of an open scan frame that already had one (the later one wins).
    late : int
        Frame results for a scan frame already closed (not placed: the frame was handed out).
    stale : int
        Parts of a series older than the current one (dropped).
    bad : int
        Messages that could not be read (bad JSON, wrong buffers, unknown kind); dropped and counted.
    deaths, revived, left : int
        Workers declared dead, dead ones heard from again, workers that said ``bye``.
    closed, complete, missing, missing_dead : int
        Scan frames closed, of them complete; frames missing in closed scan frames, of them attributed to
        dead workers.
    """

    messages: int = 0
    parts: int = 0
    frames: int = 0
    duplicates: int = 0
    late: int = 0
    stale: int = 0
    bad: int = 0
    deaths: int = 0
    revived: int = 0
    left: int = 0
    closed: int = 0
    complete: int = 0
    missing: int = 0
    missing_dead: int = 0

    def as_dict(self) -> dict:
        """Plain dict (for JSON)."""
        return asdict(self)


class _Acc:
    """Results of one open scan frame: (K, npos) values, seen flags, count."""

    __slots__ = ("values", "seen", "count", "first_ns")

    def __init__(self, k: int, npos: int) -> None:
        self.values = np.full((k, npos), np.nan)
        self.seen = np.zeros(npos, bool)
        self.count = 0
        self.first_ns = time.monotonic_ns()


class MergeState:
    """The merger's bookkeeping: feed it the workers' messages (:meth:`handle`) and the time (:meth:`check`),
    take closed scan frames (:meth:`pop_closed`).

    Parameters
    ----------
    scan_shape : (rows, cols)
        Probe positions of one scan frame.
    timeout_s : float
        Heartbeat silence after which a worker is dead, seconds (> 0).
    settle_s : float
        See rule 3 of the module docstring, seconds (>= 0).
    clock : callable
        Monotonic seconds (inject one in tests).

    Attributes
    ----------
    workers : dict name -> WorkerState
    series : DetectorSeries or None
        The current series (armed, relayed, or known only by id from parts: then ``None`` with
        :attr:`series_id` set).
    series_id : int or None
    names : tuple of str
        Per-frame result names (from the first part of the series).
    sums : dict name -> ndarray
        Summed results of the series so far.
    ended : bool
        The current series' ``end`` was relayed.
    counters : MergeCounters

    Raises
    ------
    ValueError
        Non-positive scan shape or timeout, negative settle time.
    """

    def __init__(self, scan_shape: tuple[int, int], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 settle_s: float = DEFAULT_SETTLE_S, clock: Callable[[], float] = time.monotonic) -> None:
        rows, cols = (int(v) for v in scan_shape)
        if rows <= 0 or cols <= 0:
            raise ValueError(f"scan shape must be positive, got {scan_shape}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not settle_s >= 0:
            raise ValueError(f"settle_s must be >= 0, got {settle_s}")
        self.scan_shape = (rows, cols)
        self.npos = rows * cols
        self.timeout_s = float(timeout_s)
        self.settle_s = float(settle_s)
        self.clock = clock
        self.workers: dict[str, WorkerState] = {}
        self.counters = MergeCounters()
        self.series: DetectorSeries | None = None
        self.series_id: int | None = None
        self.names: tuple[str, ...] = ()
        self.sums: dict[str, np.ndarray] = {}
        self.ended = False
        self._end_at = 0.0
        self._open: dict[int, _Acc] = {}
        self._next_close = 0  # scan frames below this one are closed
        self._closed: list[ScanResult] = []

    # --- series -------------------------------------------------------------------------------------------
    def start_series(self, series: DetectorSeries | None, series_id: int | None = None) -> None:
        """Begin a series (armed or relayed, or by id alone); the open scan frames of the previous one close
        first (``closed_by="end"``)."""
        sid = series.series_id if series is not None else series_id
        if sid == self.series_id:
            if series is not None:
                self.series = series
            return
        if self.series_id is not None:
            for f in sorted(self._open):
                self._close(f, "end")
        self.series, self.series_id = series, sid
        self.names, self.sums, self.ended = (), {}, False
        for w in self.workers.values():  # watermarks are frame ids of one series
            w.watermark = -1
        self._open.clear()
        self._next_close = 0

    # --- messages -----------------------------------------------------------------------------------------
    def handle(self, head: dict, buffers: list) -> None:
        """Take one worker message: ``head`` its decoded part 0, ``buffers`` the raw parts after it
        (bytes-like). A message that cannot be read is counted in ``counters.bad`` and dropped.
        """
        self.counters.messages += 1
        now = self.clock()
        kind, name = head.get("kind"), head.get("worker")
        if not isinstance(name, str) or head.get("v") != WIRE_VERSION:
            self._bad(f"message without a worker name or of wire version {head.get('v')!r}")
            return
        w = self.workers.get(name)
        if w is None:
            w = self.workers[name] = WorkerState(name, last_heard=now)
        if not w.alive and not w.left:
            w.alive, w.died_at = True, None
            self.counters.revived += 1
            log.warning("fan-out worker %s is heard from again", name)
        w.last_heard = now
        try:
            if kind == "hello":
                w.left, w.alive = False, True
            elif kind == "beat":
                w.frames = int(head["frames"])
                w.series_id = head.get("series_id")
                if w.series_id is not None and w.series_id == self.series_id:
                    w.watermark = max(w.watermark, int(head["watermark"]))
                if head.get("idle"):
                    w.idle_since = now if w.idle_since is None else w.idle_since
                else:
                    w.idle_since = None
            elif kind == "series":
                self.start_series(series_from_dict(head["series"]))
            elif kind == "end":
                if int(head["series_id"]) == self.series_id:
                    self.ended, self._end_at = True, now
            elif kind == "part":
                w.idle_since = None
                self._part(w, head, buffers)
            elif kind == "bye":
                w.alive, w.left = False, True
                self.counters.left += 1
            else:
                self._bad(f"unknown kind {kind!r:.30}")
        except (KeyError, TypeError, ValueError) as exc:
            self._bad(f"{kind} from {name}: {type(exc).__name__}: {exc}")

    def _bad(self, why: str) -> None:
        self.counters.bad += 1
        log.warning("fan-out merger: message dropped: %s", why)

    def _part(self, w: WorkerState, head: dict, buffers: list) -> None:
        sid, n, names = int(head["series_id"]), int(head["n"]), tuple(head["names"])
        sums_meta = head.get("sums") or {}
        if len(buffers) != 2 + len(sums_meta):
            raise ValueError(f"{len(buffers)} buffers for {2 + len(sums_meta)}")
        ids = np.frombuffer(buffers[0], "<i8")
        vals = np.frombuffer(buffers[1], "<f8")
        if ids.size != n or vals.size != n * len(names):
            raise ValueError(f"buffers of {ids.size} ids and {vals.size} values for {n} frames x {len(names)}")
        if n and ids.min() < 0:
            raise ValueError("negative frame id")
        if self.series_id is None or sid > self.series_id:
            self.start_series(None, sid)
        elif sid < self.series_id:
            self.counters.stale += 1
            return
        if not self.names:
            self.names = names
        elif names != self.names:
            raise ValueError(f"result names {names} differ from the series' {self.names}")
        for (key, shape), buf in zip(sums_meta.items(), buffers[2:]):
            arr = np.frombuffer(buf, "<f8")
            if arr.size != int(np.prod(shape)):
                raise ValueError(f"sum {key!r} of {arr.size} values for shape {shape}")
            acc = self.sums.get(key)
            if acc is None:
                self.sums[key] = arr.reshape(shape).copy()
            else:
                acc += arr.reshape(shape)
        self.counters.parts += 1
        if not n:
            return
        w.watermark = max(w.watermark, int(ids.max()))
        values = vals.reshape(n, len(names))
        frame = ids // self.npos
        for f in np.unique(frame):
            self._place(int(f), ids, values, frame == f)

    def _place(self, f: int, ids: np.ndarray, values: np.ndarray, sel: np.ndarray) -> None:
        if f < self._next_close:
            self.counters.late += int(sel.sum())
            return
        acc = self._open.get(f)
        if acc is None:
            while len(self._open) >= MAX_OPEN_FRAMES:
                self._close(min(self._open), "overflow")
            if f < self._next_close:
                self.counters.late += int(sel.sum())
                return
            acc = self._open[f] = _Acc(len(self.names), self.npos)
        pos = ids[sel] % self.npos
        nfresh = int(np.count_nonzero(~acc.seen[np.unique(pos)]))  # a position twice in one part counts once
        self.counters.duplicates += len(pos) - nfresh
        acc.values[:, pos] = values[sel].T
        acc.seen[pos] = True
        acc.count += nfresh
        self.counters.frames += nfresh

    # --- time ---------------------------------------------------------------------------------------------
    def expected(self, f: int) -> int:
        """Frames scan frame ``f`` should have (fewer for the last one of a series that announced its count)."""
        total = self.series.number_of_images if self.series is not None else 0
        if total > 0:
            return int(max(0, min(self.npos, total - f * self.npos)))
        return self.npos

    def check(self) -> None:
        """Declare silent workers dead, then close every scan frame the rules allow (module docstring)."""
        now = self.clock()
        for w in self.workers.values():
            if w.alive and now - w.last_heard > self.timeout_s:
                w.alive, w.died_at = False, now
                self.counters.deaths += 1
                log.warning("fan-out worker %s is silent for %.2f s: declared dead; its frames count as missing",
                            w.name, now - w.last_heard)
        live = [w for w in self.workers.values() if w.alive]
        settled = (self.ended and all(w.idle_since is not None for w in live)
                   and now - max([self._end_at] + [w.idle_since for w in live if w.idle_since is not None])
                   >= self.settle_s)
        while self._open or (self.ended and self._last_pending()):
            f = self._next_close  # in order; a scan frame none of whose results came is closed empty
            acc = self._open.get(f)
            count = acc.count if acc is not None else 0
            last_id = f * self.npos + self.expected(f) - 1
            if acc is not None and count >= self.expected(f):
                self._close(f, "complete")
            elif live and all(w.watermark >= last_id for w in live):
                self._close(f, "watermarks")
            elif settled:
                self._close(f, "end")
            elif not live and self.workers:
                self._close(f, "no_workers")
            else:
                break

    def _last_pending(self) -> bool:
        """Whether scan frames the series announced were never opened (no result of theirs came)."""
        total = self.series.number_of_images if self.series is not None else 0
        return total > 0 and self._next_close * self.npos < total

    def _close(self, f: int, how: str) -> None:
        acc = self._open.pop(f, None)
        if acc is None:
            acc = _Acc(len(self.names), self.npos)
        expected = self.expected(f) if how != "complete" else acc.count
        last_id = f * self.npos + max(expected, 1) - 1
        lost = tuple(sorted(w.name for w in self.workers.values()
                            if not w.alive and not w.left and w.watermark < last_id))
        rows, cols = self.scan_shape
        images = {name: acc.values[k].reshape(rows, cols) for k, name in enumerate(self.names)}
        res = ScanResult(int(self.series_id if self.series_id is not None else -1), f, images, acc.count,
                         max(expected, acc.count), how, lost, acc.first_ns, time.monotonic_ns())
        self._next_close = max(self._next_close, f + 1)
        c = self.counters
        c.closed += 1
        c.complete += res.complete
        c.missing += res.missing
        if lost:
            c.missing_dead += res.missing
        self._closed.append(res)

    def pop_closed(self) -> list[ScanResult]:
        """The scan frames closed since the last call, in order."""
        out, self._closed = self._closed, []
        return out

    def live_images(self) -> dict[str, np.ndarray]:
        """The newest open scan frame's images so far (views, NaN where nothing arrived); empty when none."""
        if not self._open:
            return {}
        acc = self._open[max(self._open)]
        return {name: acc.values[k].reshape(self.scan_shape) for k, name in enumerate(self.names)}

    def alive(self) -> list[str]:
        """Names of the live workers."""
        return [w.name for w in self.workers.values() if w.alive]


class FanoutMerger:
    """The merger's sockets around a :class:`MergeState`: PULL for the workers' results and heartbeats, PUB for
    arming and stopping them.

    Parameters
    ----------
    scan_shape : (rows, cols)
    results, control : str
        Endpoints to bind (port 0: the system picks; see :attr:`results_endpoint`, :attr:`control_endpoint`).
        ``tcp://*:PORT`` serves workers on other machines.
    timeout_s, settle_s, clock
        As :class:`MergeState`.
    context : zmq.Context, optional

    Raises
    ------
    ValueError
        As :class:`MergeState`.
    zmq.ZMQError
        An endpoint cannot be bound (the message names it).
    """

    def __init__(self, scan_shape: tuple[int, int], *, results: str = "tcp://127.0.0.1:0",
                 control: str = "tcp://127.0.0.1:0", timeout_s: float = DEFAULT_TIMEOUT_S,
                 settle_s: float = DEFAULT_SETTLE_S, clock: Callable[[], float] = time.monotonic,
                 context: zmq.Context | None = None) -> None:
        self.state = MergeState(scan_shape, timeout_s=timeout_s, settle_s=settle_s, clock=clock)
        ctx = context or zmq.Context.instance()
        self._pull = ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 100_000)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pub = ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        eps = []
        for sock, ep in ((self._pull, results), (self._pub, control)):
            try:
                sock.bind(ep)
            except zmq.ZMQError as exc:
                self.close()
                raise zmq.ZMQError(exc.errno, f"cannot bind {ep!r}: {zmq.strerror(exc.errno or 0)}") from None
            eps.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self.results_endpoint, self.control_endpoint = eps
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        self._armed_uid: str | None = None

    def poll(self, timeout_ms: int = 100, max_messages: int = 10_000) -> list[ScanResult]:
        """Read what the workers sent (waiting up to ``timeout_ms`` for the first message), apply the rules,
        and return the scan frames closed."""
        st = self.state
        if self._poller.poll(timeout_ms):
            for _ in range(max_messages):
                try:
                    parts = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    head = json.loads(parts[0].bytes)
                    if not isinstance(head, dict):
                        raise ValueError("part 0 is not a JSON object")
                except ValueError as exc:
                    st.counters.messages += 1
                    st._bad(str(exc))
                    continue
                st.handle(head, [p.buffer for p in parts[1:]])
                if head.get("kind") == "series" and st.series is not None and (
                        st.series.series_unique_id != self._armed_uid):
                    self.arm(st.series)  # a start relayed by one worker: the others open it too
        st.check()
        return st.pop_closed()

    def arm(self, series: DetectorSeries) -> None:
        """Open ``series`` here and tell every worker to open it in its receiver (before the detector starts)."""
        self.state.start_series(series)
        self._armed_uid = series.series_unique_id
        self._pub.send(json.dumps({"kind": "arm", "series": series_to_dict(series)}).encode())

    def wait_workers(self, n: int, timeout_s: float, series_id: int | None = None) -> bool:
        """Poll until ``n`` workers are alive (and, with ``series_id``, have acknowledged that armed series:
        re-arming every poll, since a PUB message sent before a worker's SUB joined is lost to it). True when
        they are, False after ``timeout_s`` (wall clock)."""
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            self.poll(50)
            ws = [w for w in self.state.workers.values() if w.alive]
            if series_id is not None:
                ws = [w for w in ws if w.series_id == series_id]
                if len(ws) < n and self.state.series is not None:
                    self._pub.send(json.dumps({"kind": "arm", "series": series_to_dict(self.state.series)}).encode())
            if len(ws) >= n:
                return True
        return False

    def stop_workers(self) -> None:
        """Ask every worker to leave (they say ``bye``)."""
        self._pub.send(json.dumps({"kind": "stop"}).encode())

    def close(self) -> None:
        """Close both sockets."""
        for sock in (getattr(self, "_pull", None), getattr(self, "_pub", None)):
            if sock is not None and not sock.closed:
                sock.close()

    def __enter__(self) -> FanoutMerger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["FanoutMerger", "MergeCounters", "MergeState", "ScanResult", "WorkerState"]
