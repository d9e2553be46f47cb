"""The server end of the control bridge (:mod:`beamloop.edge.control.protocol`): a REP socket in front of a scan
controller's handlers, guarded by :class:`beamloop.edge.control.safety.BeamSafety`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import zmq

from beamloop.edge.control.keys import Authenticator, ServerKeys, check_bind, secure_server_socket
from beamloop.edge.control.protocol import BridgeError, Request, decode_envelope, encode_reply
from beamloop.edge.control.safety import BeamSafety
from beamloop.edge.frame.scanframe import BeamPositionError


class BridgeServer:
    """Server side of the control bridge: a REP socket dispatching calls to handler functions.

    Every request passes :class:`beamloop.edge.control.safety.BeamSafety` first (positions, dwell and dose limits, rate
    limit, sequence numbers); a retried request gets its first reply again without running twice.
    Every call of :meth:`handle_one` also runs the watchdog and the parked-beam time limit.

    Parameters
    ----------
    endpoint : str
        Endpoint to bind. Without ``keys`` only local endpoints are allowed
        (:func:`beamloop.edge.control.keys.check_bind`).
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
                 context: zmq.Context | None = None, *, safety: BeamSafety | None = None,
                 keys: ServerKeys | None = None) -> None:
        check_bind(endpoint, keys)
        self._own_ctx = keys is not None
        self._ctx = zmq.Context() if keys is not None else (context or zmq.Context.instance())
        self._auth = Authenticator(self._ctx, keys) if keys is not None else None
        self.socket = self._ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            if keys is not None:
                secure_server_socket(self.socket, keys)
            self.socket.bind(endpoint)
        except BaseException:
            self._release()
            raise
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.keys = keys
        self.safety = safety or BeamSafety()
        self.handlers = dict(handlers)
        self.handlers.setdefault("heartbeat", self.safety.heartbeat)
        self.requests = 0
        self.errors = 0
        self.last_error = ""

    def close(self) -> None:
        """Close the socket (and the authenticator and context of a secured server); closing twice is harmless."""
        self._release()

    def __enter__(self) -> BridgeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release(self) -> None:
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
