"""The control bridge: a request/reply protocol over ZeroMQ that moves the beam of a scan controller.

Calls (../shared/notes/scan-control.md, the common denominator of Nion Swift, Thermo Fisher AutoScript,
Gatan DigiScan, JEOL PyJEM and the Open Beam Interface):

=====================  ==========================================================================
``get_capabilities``   calls, channels, limits of the scan controller
``get_state``          current frame id, probe state (``idle``, ``scanning``, ``parked``), blanking
``acquire_frame``      ``shape [rows, cols]``, ``fov_nm [h, w]``, ``dwell_us``, ``channels``: scan a
                       frame; its id names the frame that later positions refer to
``set_probe``          ``x``, ``y`` (fractions of the frame), ``frame_id``: park the probe there
``blank``              ``on``: blank (true) or unblank (false) the beam
``heartbeat``          no arguments: the client is alive (feeds the controller's watchdog)
``queue_points``       ``points [[x, y], ...]``, ``dwell_us``, ``signal``, ``blank_between``: visit
                       points one after another; ``fetch_points`` / ``abort_points`` by ``queue_id``
=====================  ==========================================================================

Wire format: every request is one ZeroMQ message holding the CBOR map ``{"call": name, "seq": n,
"args": {...}, "client": id}`` (``client``, optional, is the client's random id: with ``seq`` it lets the
server apply a retried request once); every reply is ``{"seq": n, "ok": true, "result": {...}}`` or ``{"seq": n, "ok":
false, "error": code, "message": text}``. Replies echo what was applied (e.g. the position the probe was
actually parked at). Error codes: ``out_of_range`` (a position or parameter outside its limits),
``stale_frame`` (a position refers to a frame that is no longer current), ``busy`` (the controller is
doing something that this call would disturb), ``bad_request`` (malformed), ``unknown_call``,
``internal``, ``rate_limited`` (too many requests per second), ``stale_seq`` (a sequence number older
than one already applied); the client adds ``timeout``.

Safety: :class:`BridgeClient` validates every beam position before sending it (finite, inside the
frame, frame id current) and never sends one that fails; the server validates again, and enforces the
rules of :mod:`beamloop.edge.control.safety` (dwell and dose limits, rate limit, sequence numbers, watchdog) before any
handler runs. Security: with keys (:mod:`beamloop.edge.control.keys`) both ends use CURVE authentication and
encryption; a server without keys binds only to loopback or host-local endpoints.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping
import uuid

import cbor2
import zmq

from beamloop.edge.control.keys import Authenticator, ClientKeys, ServerKeys, check_bind, secure_client_socket, secure_server_socket
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame, check_fraction

if TYPE_CHECKING:
    from beamloop.edge.control.safety import BeamSafety

ERROR_CODES = ("out_of_range", "stale_frame", "busy", "bad_request", "unknown_call", "internal", "rate_limited",
               "stale_seq", "timeout")

MAX_CLIENT_ID = 64
"""Longest client id (characters) a request may carry."""


class BridgeError(RuntimeError):
    """A call that the scan controller refused, or that could not be made.

    Attributes
    ----------
    code : str
        One of :data:`ERROR_CODES`.
    call : str
        The call that failed.
    """

    def __init__(self, code: str, message: str, call: str = "") -> None:
        super().__init__(f"{call + ': ' if call else ''}{code}: {message}")
        self.code = code
        self.call = call
        self.message = message


class BridgeTimeout(BridgeError):
    """The scan controller did not answer in time; the client reconnected and the call may not have run."""

    def __init__(self, call: str, timeout_ms: int) -> None:
        super().__init__("timeout", f"no reply within {timeout_ms} ms", call)


def encode_request(call: str, seq: int, args: Mapping, client: str | None = None) -> bytes:
    """CBOR bytes of a request (``client``: the sender's id, see the module docstring)."""
    msg = {"call": call, "seq": int(seq), "args": dict(args)}
    if client is not None:
        msg["client"] = str(client)
    return cbor2.dumps(msg)


@dataclass(frozen=True)
class Request:
    """A decoded request: ``call`` name, sequence number ``seq``, ``args`` map, sender id ``client``
    (None when the request carries none)."""

    call: str
    seq: int
    args: dict
    client: str | None = None


def decode_envelope(buf: bytes) -> Request:
    """Decode a request with every field.

    Raises
    ------
    BridgeError
        (``bad_request``) not CBOR, not a map, ``call`` / ``seq`` / ``args`` missing or mistyped, or a
        ``client`` that is not text of at most :data:`MAX_CLIENT_ID` characters.
    """
    try:
        msg = cbor2.loads(buf, max_depth=16, allow_duplicate_keys=False)
    except Exception as exc:
        raise BridgeError("bad_request", f"request is not valid CBOR ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, dict):
        raise BridgeError("bad_request", f"request is a {type(msg).__name__}, expected a map")
    call, seq, args, client = msg.get("call"), msg.get("seq"), msg.get("args", {}), msg.get("client")
    if not isinstance(call, str) or not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(args, dict):
        raise BridgeError("bad_request", "request needs call (text), seq (integer) and args (map)")
    if client is not None and not (isinstance(client, str) and 0 < len(client) <= MAX_CLIENT_ID):
        raise BridgeError("bad_request", f"request client id must be text of 1 to {MAX_CLIENT_ID} characters")
    return Request(call, seq, args, client)


def decode_request(buf: bytes) -> tuple[str, int, dict]:
    """Decode a request into ``(call, seq, args)`` (:func:`decode_envelope` without the client id).

    Raises
    ------
    BridgeError
        (``bad_request``) as :func:`decode_envelope`.
    """
    req = decode_envelope(buf)
    return req.call, req.seq, req.args


def encode_reply(seq: int, result: Mapping | None = None, error: BridgeError | None = None) -> bytes:
    """CBOR bytes of a reply: a result, or an error."""
    if error is not None:
        return cbor2.dumps({"seq": seq, "ok": False, "error": error.code, "message": error.message})
    return cbor2.dumps({"seq": seq, "ok": True, "result": dict(result or {})})


def decode_reply(buf: bytes, call: str) -> tuple[int, dict]:
    """Decode a reply into ``(seq, result)``.

    Raises
    ------
    BridgeError
        The reply carries an error (its code), or is malformed (``bad_request``).
    """
    try:
        msg = cbor2.loads(buf, max_depth=16)
    except Exception as exc:
        raise BridgeError("bad_request", f"reply is not valid CBOR ({type(exc).__name__}: {exc})", call) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("seq"), int) or not isinstance(msg.get("ok"), bool):
        raise BridgeError("bad_request", "reply needs seq (integer) and ok (boolean)", call)
    if not msg["ok"]:
        code = msg.get("error") if msg.get("error") in ERROR_CODES else "internal"
        raise BridgeError(code, str(msg.get("message", "")), call)
    result = msg.get("result", {})
    if not isinstance(result, dict):
        raise BridgeError("bad_request", "reply result is not a map", call)
    return msg["seq"], result


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


@dataclass
class BridgeCounters:
    """Calls made, refused by the client before sending, refused by the server, timed out, resent after a
    timeout (``retries``), and heartbeats sent (not in ``calls`` nor in the log)."""

    calls: int = 0
    rejected_before_send: int = 0
    errors: int = 0
    timeouts: int = 0
    retries: int = 0
    heartbeats: int = 0


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

    Attributes
    ----------
    frame : ScanFrame or None
        The current scan frame (from the last ``acquire_frame``); positions must refer to it.
    log : list of BeamLogEntry
        Every call, including those refused before sending.
    counters : BridgeCounters
    client_id : str
        Random id sent with every request (for the server's sequence numbers and watchdog).
    last_sent : float
        ``time.monotonic()`` of the last request sent (0 before the first).
    """

    def __init__(self, endpoint: str, *, timeout_ms: int = 2000, context: zmq.Context | None = None,
                 on_round_trip: Callable[[str, int], None] | None = None, retries: int = 0,
                 keys: ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_ms)
        self.retries = max(int(retries), 0)
        self.keys = keys
        self.client_id = uuid.uuid4().hex
        self.last_sent = 0.0
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._seq = 0
        self.frame: ScanFrame | None = None
        self.log: list[BeamLogEntry] = []
        self.counters = BridgeCounters()
        self.on_round_trip = on_round_trip
        self._connect()

    def _connect(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = self._ctx.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            secure_client_socket(self._sock, self.keys)
        self._sock.connect(self.endpoint)

    def close(self) -> None:
        """Close the socket."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> "BridgeClient":
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
        self.log.append(entry)
        self.counters.calls += 1
        return self._exchange(call, args, entry)

    def heartbeat(self) -> dict:
        """Tell the scan controller's watchdog that this client is alive; returns ``{"watchdog_s", "armed"}``.

        Not written to :attr:`log`; counted in ``counters.heartbeats``. Raises as :meth:`call`.
        """
        self.counters.heartbeats += 1
        return self._exchange("heartbeat", {}, BeamLogEntry(time.monotonic_ns(), "heartbeat", {}, True, False))

    def _exchange(self, call: str, args: dict, entry: BeamLogEntry) -> dict:
        self._seq += 1
        seq = self._seq
        request = encode_request(call, seq, args, self.client_id)
        t0 = time.perf_counter_ns()
        for attempt in range(self.retries + 1):
            if attempt:
                self.counters.retries += 1
            self.last_sent = time.monotonic()
            self._sock.send(request)
            if self._sock.poll(self.timeout_ms, zmq.POLLIN):
                break
            self.counters.timeouts += 1
            self._connect()
        else:
            entry.error, entry.message = "timeout", f"no reply within {self.timeout_ms} ms"
            raise BridgeTimeout(call, self.timeout_ms)
        buf = self._sock.recv()
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
        self.log.append(BeamLogEntry(time.monotonic_ns(), call, args, False, False, exc.code, str(exc)))

    # calls ---------------------------------------------------------------------------------------
    def get_capabilities(self) -> dict:
        """Calls, channels and limits of the scan controller."""
        return self.call("get_capabilities")

    def get_state(self) -> dict:
        """``frame_id``, ``probe`` (``idle``/``scanning``/``parked``), ``blanked``, ``probe_position``."""
        return self.call("get_state")

    def acquire_frame(self, shape: tuple[int, int], fov_nm: tuple[float, float], dwell_us: float,
                      channels: tuple[str, ...] = ("haadf",)) -> ScanFrame:
        """Scan a frame; it arrives on the frame stream and becomes the frame positions refer to.

        Returns the :class:`ScanFrame` the controller applied. Raises :class:`BridgeError`
        (``out_of_range`` for a size, field of view or dwell outside the controller's limits).
        """
        res = self.call("acquire_frame", shape=[int(shape[0]), int(shape[1])],
                        fov_nm=[float(fov_nm[0]), float(fov_nm[1])], dwell_us=float(dwell_us), channels=list(channels))
        try:
            self.frame = ScanFrame.from_dict(res["scan"])
        except (KeyError, ValueError) as exc:
            raise BridgeError("bad_request", f"acquire_frame reply lacks a valid scan frame: {exc}", "acquire_frame")
        return self.frame

    def check_position(self, x: float, y: float, frame_id: int) -> tuple[float, float]:
        """Validate a beam position without sending it (see :meth:`set_probe`)."""
        fx, fy = check_fraction(x, y)
        if self.frame is None or int(frame_id) != self.frame.frame_id:
            current = None if self.frame is None else self.frame.frame_id
            raise BeamPositionError("stale_frame", f"position refers to frame {frame_id}, current frame is {current}")
        return fx, fy

    def set_probe(self, x: float, y: float, frame_id: int) -> dict:
        """Park the probe at fractions ``(x, y)`` of frame ``frame_id``.

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
        return self.call("set_probe", x=fx, y=fy, frame_id=int(frame_id))

    def blank(self, on: bool) -> dict:
        """Blank (``True``) or unblank (``False``) the beam; returns ``{"blanked": bool}`` (and what else the
        controller reports)."""
        return self.call("blank", on=bool(on))

    def queue_points(self, points, dwell_us: float, frame_id: int, signal: str = "haadf",
                     blank_between: bool = True) -> dict:
        """Visit ``points`` (fractions ``[[x, y], ...]`` of frame ``frame_id``) for ``dwell_us`` each.

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
        return self.call("queue_points", points=checked, dwell_us=float(dwell_us), frame_id=int(frame_id),
                         signal=signal, blank_between=bool(blank_between))

    def fetch_points(self, queue_id: int) -> dict:
        """Progress and per-point signal of a point queue."""
        return self.call("fetch_points", queue_id=int(queue_id))

    def abort_points(self, queue_id: int) -> dict:
        """Stop a point queue and blank the beam."""
        return self.call("abort_points", queue_id=int(queue_id))


class BridgeServer:
    """Server side of the control bridge: a REP socket dispatching calls to handler functions.

    Every request passes :class:`beamloop.edge.control.safety.BeamSafety` first (positions, dwell and dose limits, rate
    limit, sequence numbers); a retried request gets its first reply again without running twice.
    Every call of :meth:`handle_one` also runs the watchdog and the parked-beam time limit.

    Parameters
    ----------
    endpoint : str
        Endpoint to bind. Without ``keys`` only local endpoints are allowed (:func:`beamloop.edge.control.keys.check_bind`).
    handlers : mapping call name -> callable(args: dict) -> dict
        A handler returns the result map or raises :class:`BridgeError` (or
        :class:`~beamloop.edge.frame.scanframe.BeamPositionError`, mapped to its code); any other exception becomes
        an ``internal`` error reply and the server goes on. ``heartbeat`` is added when absent.
    context : zmq.Context, optional
        Ignored with ``keys``: a secured server has a context of its own (one authenticator per context).
    safety : BeamSafety, optional
        The controller's safety rules; by default :class:`~beamloop.edge.control.safety.BeamSafety` with default limits
        and no way to blank (so no watchdog action): controllers pass their own.
    keys : ServerKeys, optional
        CURVE keys; clients must present a public key from ``keys.authorized_dir``.

    Raises
    ------
    beamloop.edge.control.keys.InsecureBindError
        A network-reachable endpoint without keys.
    zmq.ZMQError
        The endpoint cannot be bound.
    """

    def __init__(self, endpoint: str, handlers: Mapping[str, Callable[[dict], dict]],
                 context: zmq.Context | None = None, *, safety: "BeamSafety | None" = None,
                 keys: ServerKeys | None = None) -> None:
        from beamloop.edge.control.safety import BeamSafety

        check_bind(endpoint, keys)
        self._own_ctx = keys is not None
        self._ctx = zmq.Context() if keys is not None else (context or zmq.Context.instance())
        self._auth = Authenticator(self._ctx, keys) if keys is not None else None
        self.socket = self._ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            secure_server_socket(self.socket, keys)
        self.socket.bind(endpoint)
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.keys = keys
        self.safety = safety or BeamSafety()
        self.handlers = dict(handlers)
        self.handlers.setdefault("heartbeat", self.safety.heartbeat)
        self.requests = 0
        self.errors = 0
        self.last_error = ""

    def close(self) -> None:
        """Close the socket (and the authenticator and context of a secured server)."""
        self.socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._own_ctx:
            self._ctx.term()
            self._own_ctx = False

    def handle_one(self, timeout_ms: int = 0) -> bool:
        """Serve one request if one arrives within ``timeout_ms``; return whether one was served.

        The watchdog and the parked-beam time limit run after that, whether a request came or not. A
        request that was waiting is served before the watchdog judges the silence: a heartbeat that
        arrived while the controller was busy elsewhere (rendering a frame, or starved of CPU) proves the
        client alive, and must not let the watchdog blank the beam under a working service.
        """
        served = self._serve(timeout_ms)
        self.safety.poll()
        return served

    def _serve(self, timeout_ms: int) -> bool:
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return False
        buf = self.socket.recv()
        self.requests += 1
        req = None
        try:
            req = decode_envelope(buf)
            reply = self.safety.admit(req.client, req.seq, req.call, req.args)
            if reply is None:
                handler = self.handlers.get(req.call)
                if handler is None:
                    raise BridgeError("unknown_call", f"no call named {req.call!r}; known: {sorted(self.handlers)}",
                                      req.call)
                result = handler(req.args)
                reply = encode_reply(req.seq, result)
                self.safety.applied(req.client, req.call, req.args, result)
                self.safety.remember(req.client, req.seq, reply)
        except BridgeError as exc:
            reply = self._error(req, exc)
        except BeamPositionError as exc:
            reply = self._error(req, BridgeError(exc.code, str(exc)))
        except Exception as exc:  # a handler bug must not take the scan controller down
            reply = self._error(req, BridgeError("internal", f"{type(exc).__name__}: {exc}"))
        self.socket.send(reply)
        return True

    def _error(self, req: Request | None, exc: BridgeError) -> bytes:
        self.errors += 1
        self.last_error = str(exc)
        reply = encode_reply(-1 if req is None else req.seq, error=exc)
        if req is not None and exc.code != "stale_seq":
            self.safety.remember(req.client, req.seq, reply)
        return reply
