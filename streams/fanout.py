"""Fan-out of one detector stream over several worker processes (or machines): the worker's side.

A pixelated detector at 10-100 kHz outruns one process. DECTRIS SIMPLON v1, Stream V2 and the native stream
send with a ZeroMQ PUSH socket, which deals its messages out in turn to the connected PULL sockets (the
round-robin of ZMQ_PUSH in ``zmq_socket(3)``), so N workers that each connect a receiver to the detector each
get about one N-th of the frames. Every worker
reduces its frames (virtual detectors, centre of mass: a *reducer* it is given) and sends partial results
to one merger (:mod:`beamloop.streams.merge`), which assembles them into one live image per scan frame in
the manner of LiberTEM's UDF ``merge`` (per-frame results are placed at their probe positions, summed
results are added; LiberTEM, ``libertem/udf/base.py``, ``UDF.merge``).

What PUSH round-robin means for a series
    The ``start`` and ``end`` messages are messages like any other: each reaches exactly one worker. The
    merger therefore *arms* the workers first (:meth:`beamloop.streams.merge.FanoutMerger.arm`, the series'
    layout as the control software that armed the detector knows it: SIMPLON's ``arm`` command returns the
    series id), and every worker opens that series in its receiver (:meth:`DetectorReceiver.begin_series`)
    before the detector's first frame can reach it. The worker that gets the detector's own ``start``
    relays it to the merger (its receiver counts it as ``unexpected``: a series started while the armed one
    was open), the one that gets the ``end`` relays that. Each worker's receiver sees every N-th frame id,
    so its ``gaps`` / ``missing_frames`` counters are not losses: the merger, which sees all ids, is what
    tells complete from incomplete. Stream V2 also names a series by its ``series_unique_id``, which only the
    detector's ``start`` carries: arm with it when the control software knows it; otherwise the merger re-arms
    every worker as soon as one relays the start, and images that reach a worker before that are rejected by
    its receiver (counted there) and missing at the merger. SIMPLON v1 needs only the series number.

Wire (worker -> merger, PUSH -> PULL; merger -> workers, PUB -> SUB)
    Every message is multipart: part 0 a JSON object with ``kind`` and ``worker``, then raw little-endian
    buffers. Kinds: ``hello`` (a worker started), ``beat`` (heartbeat: worker clock ``t``, ``watermark`` =
    highest frame id whose result was sent, ``frames`` reduced, ``idle``: nothing was waiting), ``series``
    (a relayed start: :func:`series_to_dict`), ``end`` (a relayed end), ``part`` (``series_id``, ``n``,
    ``names``, ``sums``: then the int64 ids, the float64 (n, K) values, and one float64 buffer per summed
    result), ``bye`` (a worker leaves cleanly). Control: ``arm`` (a series to open), ``stop``.

Messages of one worker reach the merger in the order it sent them (one ZeroMQ pipe), which is what lets the
merger decide completeness from watermarks (:class:`beamloop.streams.merge.MergeState`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import zmq

from beamloop.streams.dectris.series import DetectorSeries, FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.errors import ProtocolError

log = logging.getLogger(__name__)

WIRE_VERSION = 1
"""Version of the worker/merger messages (part 0's ``v``)."""

KINDS = ("hello", "beat", "series", "end", "part", "bye")
"""Message kinds a worker sends."""

DEFAULT_HEARTBEAT_S = 0.2
"""Worker heartbeat period, seconds."""


def series_to_dict(series: DetectorSeries) -> dict:
    """The fields of a series that cross the wire (its ``config`` stays behind), as JSON-able values."""
    return {"protocol": series.protocol, "series_id": int(series.series_id),
            "series_unique_id": str(series.series_unique_id), "channels": list(series.channels),
            "shape": [int(v) for v in series.shape], "dtype": np.dtype(series.dtype).str,
            "number_of_images": int(series.number_of_images), "count_time": float(series.count_time),
            "frame_time": float(series.frame_time)}


def series_from_dict(d: dict) -> DetectorSeries:
    """Inverse of :func:`series_to_dict`.

    Raises
    ------
    ValueError
        A field is missing or of the wrong type (the message names it).
    """
    try:
        dims = [int(v) for v in d["shape"]]
        if len(dims) != 2 or min(dims) <= 0:
            raise ValueError(f"shape {d['shape']!r}")
        shape = (dims[0], dims[1])
        return DetectorSeries(protocol=str(d["protocol"]), series_id=int(d["series_id"]),
                              series_unique_id=str(d["series_unique_id"]),
                              channels=tuple(str(c) for c in d["channels"]), shape=shape,
                              dtype=np.dtype(d["dtype"]), number_of_images=int(d["number_of_images"]),
                              count_time=float(d.get("count_time", 0.0)), frame_time=float(d.get("frame_time", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad series description: {type(exc).__name__}: {exc}") from None


class Reducer(Protocol):
    """What a worker runs on each frame stack (the edge's :class:`beamloop.edge.fanout_worker.FourDReducer`)."""

    def names(self, series: DetectorSeries) -> tuple[str, ...]:
        """The ``K`` per-frame results for frames of ``series`` (e.g. ``("bf", "adf", "com_row", "com_col")``);
        called when a series opens, before any :meth:`reduce` of it."""

    def reduce(self, stack: FrameStack) -> np.ndarray:
        """Per-frame results of ``stack`` (its first channel): float64 (n, K), valid until the next call."""

    def sums(self) -> dict[str, np.ndarray]:
        """Results summed over the frames reduced since the last call (e.g. the summed diffraction pattern,
        float64 (det_rows, det_cols)), then reset; an empty dict when there are none."""


@dataclass
class WorkerStats:
    """What one worker did.

    Attributes
    ----------
    frames : int
        Frames reduced and sent.
    parts : int
        ``part`` messages sent.
    rejected : int
        Messages its receiver rejected (:class:`beamloop.streams.errors.ProtocolError`).
    relayed : int
        Series ``start`` and ``end`` messages it relayed to the merger.
    armed : int
        Series the merger armed it with.
    reduce_s : float
        Wall-clock seconds spent in the reducer.
    """

    frames: int = 0
    parts: int = 0
    rejected: int = 0
    relayed: int = 0
    armed: int = 0
    reduce_s: float = 0.0


class WorkerLink:
    """A worker's two sockets towards the merger: PUSH for results and heartbeats, SUB for control.

    Parameters
    ----------
    results : str
        The merger's results endpoint (it binds a PULL socket there), e.g. ``tcp://10.0.0.2:5701``.
    control : str
        The merger's control endpoint (it binds a PUB socket there).
    worker : str
        This worker's name (unique among the merger's workers); default ``<host pid>``.
    context : zmq.Context, optional

    Raises
    ------
    zmq.ZMQError
        An endpoint cannot be connected (the message names it).
    """

    def __init__(self, results: str, control: str, worker: str | None = None, *,
                 context: zmq.Context | None = None) -> None:
        ctx = context or zmq.Context.instance()
        self.worker = worker or f"{os.uname().nodename}-{os.getpid()}"
        self._push = ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.SNDHWM, 10_000)
        self._push.setsockopt(zmq.LINGER, 2000)
        self._sub = ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        for sock, ep in ((self._push, results), (self._sub, control)):
            try:
                sock.connect(ep)
            except zmq.ZMQError as exc:
                self.close()
                raise zmq.ZMQError(exc.errno, f"cannot connect {ep!r}: {zmq.strerror(exc.errno or 0)}") from None

    def _send(self, kind: str, buffers: tuple = (), **fields) -> None:
        head = json.dumps({"v": WIRE_VERSION, "kind": kind, "worker": self.worker, **fields}).encode()
        self._push.send_multipart([head, *buffers], copy=False)

    def hello(self) -> None:
        """Announce this worker (the merger starts watching its heartbeats)."""
        self._send("hello", pid=os.getpid())

    def beat(self, t: float, watermark: int, frames: int, idle: bool, series_id: int | None) -> None:
        """A heartbeat: worker clock ``t`` (s), highest frame id sent (-1: none), frames reduced, whether the
        receiver had nothing waiting, and the series it has open."""
        self._send("beat", t=float(t), watermark=int(watermark), frames=int(frames), idle=bool(idle),
                   series_id=series_id)

    def relay_series(self, series: DetectorSeries) -> None:
        """Forward a ``start`` this worker received."""
        self._send("series", series=series_to_dict(series))

    def relay_end(self, series_id: int, frames: int) -> None:
        """Forward an ``end`` this worker received (``frames``: what its receiver counted)."""
        self._send("end", series_id=int(series_id), frames=int(frames))

    def send_part(self, series_id: int, image_ids: np.ndarray, values: np.ndarray, names: tuple[str, ...],
                  sums: dict[str, np.ndarray] | None = None) -> None:
        """Send the results of ``len(image_ids)`` frames: ids int64 (n,), values float64 (n, K), summed
        results float64 arrays (sent in the order of ``sums``)."""
        ids = np.ascontiguousarray(image_ids, "<i8")
        vals = np.ascontiguousarray(values, "<f8")
        sums = sums or {}
        meta = {k: list(v.shape) for k, v in sums.items()}
        self._send("part", (ids, vals, *(np.ascontiguousarray(v, "<f8") for v in sums.values())),
                   series_id=int(series_id), n=len(ids), names=list(names), sums=meta)

    def bye(self) -> None:
        """Tell the merger this worker leaves on purpose (not a death)."""
        self._send("bye")

    def control(self) -> Iterator[dict]:
        """Control messages waiting (never blocks): ``{"kind": "arm", "series": {...}}``, ``{"kind": "stop"}``."""
        while True:
            try:
                raw = self._sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = json.loads(raw)
            except ValueError:
                log.warning("fan-out worker %s: unreadable control message ignored", self.worker)
                continue
            if isinstance(msg, dict):
                yield msg

    def close(self) -> None:
        """Close both sockets (queued results are sent for up to 2 s)."""
        for sock in (getattr(self, "_push", None), getattr(self, "_sub", None)):
            if sock is not None and not sock.closed:
                sock.close()

    def __enter__(self) -> WorkerLink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Open:
    series: DetectorSeries | None = None
    names: tuple[str, ...] = ()
    watermark: int = -1


def _open(reducer: Reducer, state: _Open, series: DetectorSeries) -> None:
    state.series = series
    state.names = tuple(reducer.names(series))


def run_worker(receiver, reducer: Reducer, link: WorkerLink, *, clock: Callable[[], float] = time.monotonic,
               heartbeat_s: float = DEFAULT_HEARTBEAT_S, stop: Callable[[], bool] = lambda: False,
               recv_timeout_ms: int = 50, stats: WorkerStats | None = None) -> WorkerStats:
    """The worker loop: receive frame stacks, reduce them, send the results, beat; until told to stop.

    Parameters
    ----------
    receiver : DetectorReceiver or any receiver of :mod:`beamloop.streams.receivers`
        Connected to the detector (several workers connect to one PUSH endpoint). To be armed it needs
        ``begin_series(series)`` (:class:`beamloop.streams.dectris.receiver.DetectorReceiver` has it).
    reducer : Reducer
        Turns each stack into per-frame results.
    link : WorkerLink
        Towards the merger.
    clock : callable
        Monotonic seconds; heartbeats are due every ``heartbeat_s`` on it (inject one in tests).
    heartbeat_s : float
        Heartbeat period, seconds (> 0); the merger declares a worker dead after several missed ones.
    stop : callable
        Asked once per loop; True ends the loop (a ``stop`` control message ends it too).
    recv_timeout_ms : int
        Longest wait for the receiver per loop (also the idle heartbeat period).
    stats : WorkerStats, optional
        Updated in place (a caller's view of progress); a new one by default.

    Returns
    -------
    WorkerStats

    Raises
    ------
    ValueError
        ``heartbeat_s`` not positive.
    """
    if not heartbeat_s > 0:
        raise ValueError(f"heartbeat_s must be positive, got {heartbeat_s}")
    stats = stats if stats is not None else WorkerStats()
    state = _Open()
    link.hello()
    next_beat = clock()
    while not stop():
        for msg in link.control():
            if msg.get("kind") == "stop":
                link.beat(clock(), state.watermark, stats.frames, True, _sid(state))
                link.bye()
                return stats
            if msg.get("kind") == "arm":
                try:
                    series = series_from_dict(msg.get("series", {}))
                except ValueError as exc:
                    log.warning("fan-out worker %s: arm refused: %s", link.worker, exc)
                    continue
                if state.series is None or (state.series.series_id, state.series.series_unique_id) != (
                        series.series_id, series.series_unique_id):
                    receiver.begin_series(series)
                    _open(reducer, state, series)
                    stats.armed += 1
                link.beat(clock(), state.watermark, stats.frames, True, series.series_id)  # acknowledges the arm
        try:
            ev = receiver.recv(recv_timeout_ms)
        except ProtocolError as exc:
            stats.rejected += 1
            log.warning("fan-out worker %s: %s", link.worker, exc)
            continue
        idle = ev is None
        if isinstance(ev, SeriesStart):
            started = cast(DetectorSeries, ev.series)  # a DECTRIS receiver's series description
            stats.relayed += 1
            link.relay_series(started)
            if state.series is None or state.series.series_id != started.series_id:
                _open(reducer, state, started)
        elif isinstance(ev, FrameStack) and len(ev):
            if state.series is None or state.series.series_id != ev.series.series_id:
                _open(reducer, state, ev.series)
            t0 = time.perf_counter()
            values = reducer.reduce(ev)
            sums = reducer.sums()
            stats.reduce_s += time.perf_counter() - t0
            link.send_part(ev.series.series_id, ev.image_ids, values, state.names, sums)
            stats.frames += len(ev)
            stats.parts += 1
            state.watermark = max(state.watermark, int(ev.image_ids.max()))
        elif isinstance(ev, SeriesEnd):
            stats.relayed += 1
            link.relay_end(ev.series.series_id, ev.frames)
        now = clock()
        if idle or now >= next_beat:
            link.beat(now, state.watermark, stats.frames, idle, _sid(state))
            next_beat = now + heartbeat_s
    link.beat(clock(), state.watermark, stats.frames, True, _sid(state))
    link.bye()
    return stats


def _sid(state: _Open) -> int | None:
    return None if state.series is None else int(state.series.series_id)
