"""The client end of the control bridge (:mod:`beamloop.edge.control.protocol`): what the edge service uses to
move the beam.

Safety: :class:`BridgeClient` validates every beam position before sending it (finite, inside the frame,
frame id current) and never sends one that fails; the server validates again and enforces the rules of
:mod:`beamloop.edge.control.safety` before any handler runs. Security: with keys
(:mod:`beamloop.edge.control.keys`) both ends use CURVE authentication and encryption (CurveZMQ, ZeroMQ RFC 26).
After a timeout the client closes and reopens its socket and may resend the request with the same sequence
number (the "lazy pirate" pattern, P. Hintjens, "ZeroMQ: The Guide", ch. 4), which the server applies once.

Timeouts: ``timeout_ms`` bounds both the send (``ZMQ_SNDTIMEO``: a REQ socket with no connected peer, e.g.
after a server refused this client's CURVE key and dropped the connection, would otherwise block in
``send`` for ever; libzmq API reference, ``zmq_setsockopt``) and the wait for the reply. With keys, a socket
monitor (``zmq_socket_monitor``) notes a refused CURVE handshake so that the timeout says so. A
``peer_gone`` callable (e.g. polling the controller's process) is asked every 100 ms while waiting, so that
a controller that died is reported at once (``unavailable``) instead of after every retry's timeout.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from beamloop.edge.control.keys import ClientKeys, secure_client_socket
from beamloop.edge.control.protocol import (
    BridgeError,
    BridgeTimeout,
    check_track,
    decode_array,
    decode_reply,
    encode_request,
)
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame, check_fraction


@dataclass
class BeamLogEntry:
    """One bridge call as the client saw it.

    ``t_ns`` is ``time.monotonic_ns()`` when the call was made; ``rtt_ns`` its round trip (0 when it was
    refused before sending); ``sent`` whether it left the client; ``error`` the code, empty on success.
    """

    t_ns: int
    call: str
    args: dict
    sent: bool
    ok: bool
    error: str = ""
    message: str = ""
    rtt_ns: int = 0
    result: dict = field(default_factory=dict)


LOG_LIMIT = 20_000
"""Beam-log entries a :class:`BridgeClient` keeps by default (the newest; ~2.5 KiB each with its arguments and
result, so at most ~50 MiB: the last ~2500 frames of the main job)."""


@dataclass
class BridgeCounters:
    """Calls made, refused by the client before sending, refused by the server, timed out, resent after a
    timeout (``retries``), heartbeats sent (not in ``calls`` nor in the log), and log entries dropped
    (the oldest, once the log holds ``log_limit`` entries)."""

    calls: int = 0
    rejected_before_send: int = 0
    errors: int = 0
    timeouts: int = 0
    retries: int = 0
    heartbeats: int = 0
    log_dropped: int = 0


@dataclass
class PointMeasurements:
    """What a point queue measured (:meth:`BridgeClient.measure_points`).

    Attributes
    ----------
    mean_counts : ndarray, shape (k,), float64
        Mean ADF counts per sample at each point.
    signals : dict str -> ndarray
        Per detector beyond ``adf``: ``eels`` (k, channels), ``pattern`` (k, rows, cols), in the detector's dtype.
    dwell_us : float
        Dwell per point as the controller applied it, microseconds.
    samples_per_point : int
        ADF samples per point.
    """

    mean_counts: np.ndarray
    signals: dict[str, np.ndarray]
    dwell_us: float
    samples_per_point: int = 1


class BridgeClient:
    """Client side of the control bridge (a ZeroMQ REQ socket, reconnected after every timeout).

    Parameters
    ----------
    endpoint : str
        The scan controller's endpoint, e.g. ``"tcp://127.0.0.1:5556"``.
    timeout_ms : int
        How long to wait for each reply. After a timeout the socket is closed and reopened (the
        "lazy pirate" pattern of the ZeroMQ guide, ch. 4), so the client can go on.
    context : zmq.Context, optional
    on_round_trip : callable(call, rtt_ns), optional
        Called after every answered call (for latency statistics).
    retries : int
        Times a call that timed out is sent again, with the same sequence number, on the reopened
        socket; the server applies it once (:mod:`beamloop.edge.control.safety`). 0: a timeout raises at once.
    keys : ClientKeys, optional
        CURVE keys (:mod:`beamloop.edge.control.keys`); required by a server that has keys.
    peer_gone : callable() -> str or None, optional
        Asked every 100 ms while waiting: None while the controller can still answer, else why it cannot
        (e.g. ``"simulator exited with status -9"``), which ends the call with ``unavailable``.
    log_limit : int or None
        Most entries :attr:`log` keeps (the oldest go first, counted in ``counters.log_dropped``), so a
        long-running client's memory stays bounded (an entry holds the call's arguments and result, ~1-3 KiB;
        the default keeps the last :data:`LOG_LIMIT`). 0 keeps none (a monitoring client); None keeps all.

    Attributes
    ----------
    frame : ScanFrame or None
        The current scan frame (from the last ``acquire_frame``); positions must refer to it.
    log : collections.deque of BeamLogEntry
        Every call, including those refused before sending (the last ``log_limit``).
    counters : BridgeCounters
    client_id : str
        Random id sent with every request (for the server's sequence numbers and watchdog).
    last_sent : float
        ``time.monotonic()`` of the last request sent (0 before the first).
    """

    def __init__(self, endpoint: str, *, timeout_ms: int = 2000, context: zmq.Context | None = None,
                 on_round_trip: Callable[[str, int], None] | None = None, retries: int = 0,
                 keys: ClientKeys | None = None, peer_gone: Callable[[], str | None] | None = None,
                 log_limit: int | None = LOG_LIMIT) -> None:
        self.endpoint = endpoint
        self.timeout_ms = max(int(timeout_ms), 1)
        self.peer_gone = peer_gone
        self._monitor: zmq.Socket | None = None
        self.handshake_error = ""
        self.retries = max(int(retries), 0)
        self.keys = keys
        self.client_id = uuid.uuid4().hex
        self.last_sent = 0.0
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._seq = 0
        self.frame: ScanFrame | None = None
        self.log: deque[BeamLogEntry] = deque(maxlen=None if log_limit is None else max(int(log_limit), 0))
        self.counters = BridgeCounters()
        self.on_round_trip = on_round_trip
        self._connect()

    def _connect(self) -> None:
        self._close_socket()
        self._sock = self._ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        if self.keys is not None:
            secure_client_socket(self._sock, self.keys)
            try:
                self._monitor = self._sock.get_monitor_socket(
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            except zmq.ZMQError:
                self._monitor = None  # a diagnostic only
        self._sock.connect(self.endpoint)

    def _close_socket(self) -> None:
        if self._monitor is not None:
            try:
                if self._sock is not None:
                    self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        """Close the socket."""
        self._close_socket()

    def _read_monitor(self) -> None:
        """Note a refused CURVE handshake, from the socket monitor's events."""
        if self._monitor is None:
            return
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            try:
                ev = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            if ev.get("event") == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.handshake_error = (f"the bridge refused this client's CURVE key (ZAP status {ev.get('value')}): "
                                        "its public key is not in the bridge's authorized folder")
            elif ev.get("event") in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self.handshake_error = ("the CURVE handshake with the bridge failed (wrong server key, or a bridge "
                                        "without keys)")

    def __enter__(self) -> BridgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # generic call --------------------------------------------------------------------------------
    def call(self, call: str, **args: Any) -> dict:
        """Make one call and return its result map.

        Raises
        ------
        BridgeTimeout
            No reply within ``timeout_ms``, after ``retries`` resends (the socket is reopened; the call
            may or may not have run, and ran at most once).
        BridgeError
            The server refused the call (its error code) or replied with garbage.
        """
        entry = BeamLogEntry(time.monotonic_ns(), call, dict(args), True, False)
        self._log(entry)
        self.counters.calls += 1
        return self._exchange(call, args, entry)

    def heartbeat(self) -> dict:
        """Tell the scan controller's watchdog that this client is alive; returns ``{"watchdog_s", "armed"}``.

        Not written to :attr:`log`; counted in ``counters.heartbeats``. Raises as :meth:`call`.
        """
        self.counters.heartbeats += 1
        return self._exchange("heartbeat", {}, BeamLogEntry(time.monotonic_ns(), "heartbeat", {}, True, False))

    @property
    def socket(self) -> zmq.Socket:
        """The REQ socket (reopened after every timeout).

        Raises
        ------
        BridgeError
            (``unavailable``) the client was closed.
        """
        if self._sock is None:
            raise BridgeError("unavailable", "the bridge client is closed")
        return self._sock

    def _wait_reply(self, call: str, entry: BeamLogEntry) -> bool:
        """Whether a reply arrived within ``timeout_ms``; raises ``unavailable`` once ``peer_gone`` says so."""
        if self.peer_gone is None:
            return bool(self.socket.poll(self.timeout_ms, zmq.POLLIN))
        t_end = time.monotonic() + self.timeout_ms / 1000
        while True:
            left = t_end - time.monotonic()
            if self.socket.poll(max(min(int(left * 1000), 100), 0), zmq.POLLIN):
                return True
            gone = self.peer_gone()
            if gone:
                self._connect()  # a REQ socket that sent and got nothing must not send again
                entry.error, entry.message = "unavailable", gone
                raise BridgeError("unavailable", gone, call)
            if left <= 0:
                return False

    def _exchange(self, call: str, args: dict, entry: BeamLogEntry) -> dict:
        self._seq += 1
        seq = self._seq
        request = encode_request(call, seq, args, self.client_id)
        t0 = time.perf_counter_ns()
        if self.peer_gone is not None and (gone := self.peer_gone()):
            entry.error, entry.message = "unavailable", gone
            raise BridgeError("unavailable", gone, call)
        for attempt in range(self.retries + 1):
            if attempt:
                self.counters.retries += 1
            self.last_sent = time.monotonic()
            try:
                self.socket.send(request)  # ZMQ_SNDTIMEO: no connected peer cannot block it for ever
                sent = True
            except zmq.Again:
                sent = False
            if sent and self._wait_reply(call, entry):
                break
            self.counters.timeouts += 1
            self._read_monitor()
            self._connect()
        else:
            why = f"no reply within {self.timeout_ms} ms"
            if self.handshake_error:
                why += f"; {self.handshake_error}"
            entry.error, entry.message = "timeout", why
            raise BridgeTimeout(call, self.timeout_ms, self.handshake_error)
        buf = self.socket.recv()
        entry.rtt_ns = time.perf_counter_ns() - t0
        try:
            rseq, result = decode_reply(buf, call)
            if rseq != seq:
                raise BridgeError("bad_request", f"reply to request {rseq} received for request {seq}", call)
        except BridgeError as exc:
            self.counters.errors += 1
            entry.error, entry.message = exc.code, exc.message
            raise
        entry.ok, entry.result = True, result
        if self.on_round_trip is not None:
            self.on_round_trip(call, entry.rtt_ns)
        return result

    def _refuse(self, call: str, args: dict, exc: BeamPositionError) -> None:
        self.counters.rejected_before_send += 1
        self._log(BeamLogEntry(time.monotonic_ns(), call, args, False, False, exc.code, str(exc)))

    def _log(self, entry: BeamLogEntry) -> None:
        if self.log.maxlen is not None and len(self.log) == self.log.maxlen:
            self.counters.log_dropped += 1
        self.log.append(entry)

    # calls ---------------------------------------------------------------------------------------
    def get_capabilities(self) -> dict:
        """Calls, channels and limits of the scan controller."""
        return self.call("get_capabilities")

    def get_state(self) -> dict:
        """``frame_id``, ``probe`` (``idle``/``scanning``/``parked``), ``blanked``, ``probe_position``."""
        return self.call("get_state")

    def acquire_frame(self, shape: tuple[int, int], fov_nm: tuple[float, float], dwell_us: float,
                      channels: tuple[str, ...] = ("haadf",), center_nm: tuple[float, float] | None = None
                      ) -> ScanFrame:
        """Scan a frame; it arrives on the frame stream and becomes the frame positions refer to.
        ``center_nm`` (x, y): a subscan centred there on the specimen (default: the full field).

        Returns the :class:`ScanFrame` the controller applied. Raises :class:`BridgeError`
        (``out_of_range`` for a size, field of view or dwell outside the controller's limits).
        """
        extra = {} if center_nm is None else {"center_nm": [float(center_nm[0]), float(center_nm[1])]}
        res = self.call("acquire_frame", shape=[int(shape[0]), int(shape[1])],
                        fov_nm=[float(fov_nm[0]), float(fov_nm[1])], dwell_us=float(dwell_us), channels=list(channels),
                        **extra)
        try:
            self.frame = ScanFrame.from_dict(res["scan"])
        except (KeyError, ValueError) as exc:
            raise BridgeError("bad_request", f"acquire_frame reply lacks a valid scan frame: {exc}",
                              "acquire_frame") from None
        return self.frame

    def check_position(self, x: float, y: float, frame_id: int) -> tuple[float, float]:
        """Validate a beam position without sending it (see :meth:`set_probe`)."""
        fx, fy = check_fraction(x, y)
        if self.frame is None or int(frame_id) != self.frame.frame_id:
            current = None if self.frame is None else self.frame.frame_id
            raise BeamPositionError("stale_frame", f"position refers to frame {frame_id}, current frame is {current}")
        return fx, fy

    def set_probe(self, x: float, y: float, frame_id: int, track: tuple[float, float] | None = None) -> dict:
        """Park the probe at fractions ``(x, y)`` of frame ``frame_id``; with ``track`` (fractions of the frame
        per second, :func:`beamloop.edge.control.protocol.check_track`) the controller moves it on at that
        rate (drift compensation; its reply's ``applied.track`` is None when it cannot).

        Returns the reply, whose ``applied`` map echoes the position and frame the controller used.

        Raises
        ------
        BeamPositionError
            Not finite, outside [0, 1], or not the current frame: refused here, never sent (logged
            and counted in ``counters.rejected_before_send``).
        BridgeError, BridgeTimeout
            Refused by the controller, or no answer.
        """
        try:
            fx, fy = self.check_position(x, y, frame_id)
        except BeamPositionError as exc:
            self._refuse("set_probe", {"x": x, "y": y, "frame_id": frame_id}, exc)
            raise
        if track is None:
            return self.call("set_probe", x=fx, y=fy, frame_id=int(frame_id))
        return self.call("set_probe", x=fx, y=fy, frame_id=int(frame_id), track=list(check_track(track)))

    def blank(self, on: bool) -> dict:
        """Blank (``True``) or unblank (``False``) the beam; returns ``{"blanked": bool}`` (and what else the
        controller reports).

        Raises
        ------
        BridgeError
            As :meth:`call`; also (``internal``) when the reply says the blanker is not in the state asked
            for (a reply must never be taken for a blank that did not happen).
        """
        res = self.call("blank", on=bool(on))
        if res.get("blanked") is not bool(on):
            raise BridgeError("internal", f"blank(on={bool(on)}) was answered with blanked="
                                          f"{res.get('blanked')!r}", "blank")
        return res

    def stop(self) -> dict:
        """End whatever the beam is doing (point queue, parked dwell) and blank it; returns ``{"blanked": True}``.

        Raises as :meth:`blank`.
        """
        res = self.call("stop")
        if res.get("blanked") is not True:
            raise BridgeError("internal", f"stop was answered with blanked={res.get('blanked')!r}", "stop")
        return res

    def queue_points(self, points, dwell_us: float, frame_id: int, signal: str = "haadf",
                     blank_between: bool = True, detectors: list[str] | tuple[str, ...] | None = None) -> dict:
        """Visit ``points`` (fractions ``[[x, y], ...]`` of frame ``frame_id``) for ``dwell_us`` each.

        ``detectors`` (:data:`beamloop.edge.control.protocol.POINT_DETECTORS`) names what to record per point
        besides the mean ADF counts (sent only when given, so older controllers see the request they know).
        Every point is validated first; if any fails, nothing is sent (:class:`BeamPositionError`).
        Returns ``{"queue_id": ...}``.
        """
        checked = []
        try:
            for p in points:
                checked.append(list(self.check_position(p[0], p[1], frame_id)))
            if not (math.isfinite(float(dwell_us)) and dwell_us > 0):
                raise BeamPositionError("out_of_range", f"dwell time {dwell_us} us is not a positive number")
        except BeamPositionError as exc:
            self._refuse("queue_points", {"points": list(points), "frame_id": frame_id}, exc)
            raise
        extra: dict[str, Any] = {} if detectors is None else {"detectors": [str(d) for d in detectors]}
        return self.call("queue_points", points=checked, dwell_us=float(dwell_us), frame_id=int(frame_id),
                         signal=signal, blank_between=bool(blank_between), **extra)

    def measure_points(self, points, dwell_us: float, frame_id: int, detectors: tuple[str, ...] = ("adf",), *,
                       signal: str = "haadf", poll_s: float = 0.005, timeout_s: float = 600.0,
                       interrupt: Callable[[], int] | None = None,
                       sleep: Callable[[float], None] = time.sleep) -> PointMeasurements:
        """Queue ``points``, wait until the queue is done, and return what each point measured.

        Parameters
        ----------
        points : sequence of (x, y)
            Fractions of frame ``frame_id``.
        dwell_us : float
            Dwell per point, microseconds (the controller may round it down to whole samples: see
            :attr:`PointMeasurements.dwell_us`).
        frame_id : int
        detectors : tuple of str
            ``adf``, ``eels``, ``pattern`` (``get_capabilities``' ``point_detectors``).
        signal : str
            The ADF channel.
        poll_s : float
            Pause between ``fetch_points`` polls, seconds (each poll also feeds the controller's watchdog).
        timeout_s : float
            Most polling time: the queue is aborted after it (``timeout``), seconds of ``time.monotonic``.
        interrupt : callable() -> int, optional
            Asked between polls; non-zero aborts the queue (the beam blanked) and raises ``BridgeError``
            (``busy``, "interrupted by signal N").
        sleep : callable(float)
            Waits between polls (tests pass one that moves their clock).

        Returns
        -------
        PointMeasurements

        Raises
        ------
        BeamPositionError
            A point outside the frame (nothing sent).
        BridgeError
            The controller refused the queue (e.g. a detector not fitted: ``out_of_range``), or ended it before
            every point was done (``internal``, naming its state), or a malformed measurement.
        """
        q = self.queue_points(points, dwell_us, frame_id, signal=signal, detectors=list(detectors))
        qid = q["queue_id"]
        t_end = time.monotonic() + timeout_s
        while True:
            r = self.fetch_points(qid, measurements=False)
            if r.get("state") != "running":
                r = self.fetch_points(qid)
                break
            code = interrupt() if interrupt is not None else 0
            if code or time.monotonic() > t_end:
                self.abort_points(qid)
                raise BridgeError("busy" if code else "timeout", f"point queue {qid} aborted: "
                                  + (f"interrupted by signal {code}" if code else f"not done in {timeout_s:g} s"),
                                  "queue_points")
            sleep(poll_s)
        if r["state"] != "done":
            raise BridgeError("internal", f"point queue {qid} ended {r['state']} after {r.get('done')} of "
                                          f"{r.get('total')} points", "queue_points")
        signals = {d: decode_array(a, f"fetch_points {d}") for d, a in (r.get("measurements") or {}).items()}
        return PointMeasurements(np.asarray(r["mean_counts"], np.float64), signals, float(q["dwell_us"]),
                                 int(q.get("samples_per_point", 1)))

    def fetch_points(self, queue_id: int, *, start: int = 0, measurements: bool = True) -> dict:
        """Progress and per-point signal of a point queue (from point ``start``; without the detectors'
        ``measurements`` when false: a cheap poll)."""
        extra: dict[str, Any] = {}
        if start:
            extra["start"] = int(start)
        if not measurements:
            extra["measurements"] = False
        return self.call("fetch_points", queue_id=int(queue_id), **extra)

    def abort_points(self, queue_id: int) -> dict:
        """Stop a point queue and blank the beam."""
        return self.call("abort_points", queue_id=int(queue_id))

    def arm_trigger(self, model: str, threshold: int | None = None, rearm: str = "dwell",
                    expected_rate: float | None = None) -> dict:
        """Deploy an ejection trigger to the scan controller: from the next parked dwell on (or at once, in
        an open one) it decides on every sample next to the beam and blanks the beam itself.

        Served only by a controller whose ``get_capabilities`` names a ``trigger``; arming never unblanks
        the beam (the reply's ``blanked`` says how it is).

        Parameters
        ----------
        model : str
            A model the controller offers (``get_capabilities()["trigger"]["models"]``), by name or by its
            64-hex-digit hash.
        threshold : int, optional
            Integer score threshold; default the model's calibrated one.
        rearm : {"dwell", "once"}
            ``dwell``: decide in every later parked dwell (history and latch cleared at each start);
            ``once``: disarm after the first decision.
        expected_rate : float, optional
            Counts per sample of the intact column: the dwell's history is pre-filled with it, so decisions
            start at the first sample.

        Returns
        -------
        dict
            The trigger's state (:meth:`get_trigger_state`) and ``blanked``.

        Raises
        ------
        BridgeError
            ``unknown_call`` (the controller has no trigger), ``out_of_range`` (unknown model, threshold or
            rate outside its range, unknown rearm policy), ``bad_request`` (a value of the wrong type), or as
            :meth:`call`.
        """
        args: dict[str, Any] = {"model": model, "rearm": rearm}
        if threshold is not None:
            args["threshold"] = threshold
        if expected_rate is not None:
            args["expected_rate"] = expected_rate
        return self.call("arm_trigger", **args)

    def get_trigger_state(self) -> dict:
        """The controller-side trigger: ``armed``, ``running``, ``model``, ``hash``, ``threshold``, ``rearm``,
        ``expected_rate``, ``latency_ns``, ``decisions`` and ``last`` (its last decision: ``decision_sample``,
        ``blank_time_ns`` from the dwell's start, ``blank_t_ns`` on the controller's clock, ``series_id``,
        ``frame_id``; None before any). Raises as :meth:`call` (``unknown_call`` without a trigger)."""
        return self.call("get_trigger_state")

    def move_stage(self, x_um: float, y_um: float) -> dict:
        """Drive the specimen stage to ``(x_um, y_um)`` micrometres (absolute; checked here against nothing but
        finiteness, by the controller against its travel range). The controller blanks the beam first, ends
        the current frame (:attr:`frame` becomes None: positions on it would name another area) and refuses
        beam-on calls as ``busy`` until the stage has settled.

        Returns ``{"applied": {"x_um", "y_um"}, "duration_s", "blanked"}``: ``duration_s`` is travel plus
        settle on the controller's clock. Raises :class:`BridgeError` (``bad_request`` for a target that is
        not finite; ``out_of_range`` outside the travel range; ``unknown_call`` without a stage; ``busy`` while
        a point queue runs).
        """
        for name, v in (("x_um", x_um), ("y_um", y_um)):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise BridgeError("bad_request", f"stage target {name} {v!r} is not a finite number; not sent",
                                  "move_stage")
        res = self.call("move_stage", x_um=float(x_um), y_um=float(y_um))
        self.frame = None
        return res

    def get_stage(self) -> dict:
        """``x_um``, ``y_um`` (the stage's readback), ``moving``, ``settles_in_s``, ``moves``. Raises as
        :meth:`call` (``unknown_call`` without a stage)."""
        return self.call("get_stage")
