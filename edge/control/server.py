"""The server end of the control bridge (:mod:`beamloop.edge.control.protocol`): a REP socket in front of a scan
controller's handlers, guarded by :class:`beamloop.edge.control.safety.BeamSafety`.

Bounds: the socket reads at most ``max_message_bytes`` per message (``ZMQ_MAXMSGSIZE``: libzmq drops the
connection of a peer that sends more, before the message is read whole; libzmq API reference,
``zmq_setsockopt``) and the server decodes at most ``max_request_bytes``
(:func:`beamloop.edge.control.protocol.decode_envelope`), outside the lock that serialises the handlers, so
that no request can hold up the watchdog for long.

Threads: the serve loop (:meth:`BridgeServer.handle_one`) owns the socket. Decoding runs without the lock;
the guard and the handlers run under :attr:`BridgeServer.lock`, which a scan controller shares with its own
work (:class:`beamloop.edge.control.controller.ScanController`). A backstop timer on a thread of its own
(:meth:`BridgeServer.start_backstop`) acts for the watchdog when the serve loop itself is held up (a handler
that hangs in the hardware, a long render): it needs no request to arrive and no handler to return.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import zmq

from beamloop.edge.control.keys import Authenticator, ServerKeys, check_bind, secure_server_socket
from beamloop.edge.control.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    BridgeError,
    Request,
    decode_envelope,
    encode_reply,
)
from beamloop.edge.control.safety import UNCACHED_CALLS, BeamSafety
from beamloop.edge.frame.scanframe import BeamPositionError

ErrorHook = Callable[[str, BaseException], str]
"""Called under the lock when a handler raised (the call's name, the exception); returns a note for the
error reply (e.g. that the beam was blanked), or an empty string."""

NOT_REMEMBERED = ("stale_seq", "rate_limited")

DRAIN_BEFORE_TRIP = 256
"""Requests the serve loop serves, as long as they wait, before its watchdog acts: the owner's heartbeat may be
queued behind other clients' requests (the REP socket takes one message per connection in turn)."""
"""Error replies not kept for a retry: the request was not applied, so its retry may run."""


class BridgeServer:
    """Server side of the control bridge: a REP socket dispatching calls to handler functions.

    Every request passes :class:`beamloop.edge.control.safety.BeamSafety` first (positions, dwell and dose limits,
    rate limit per client, sequence numbers); a retried request gets its first reply again without running
    twice. Every call of :meth:`handle_one` also runs the watchdog and the parked-beam time limit.

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
        CURVE keys; clients must present a public key from ``keys.authorized_dir`` (re-read by
        :meth:`reload_keys`).
    max_request_bytes : int
        Largest request decoded (:data:`~beamloop.edge.control.protocol.MAX_REQUEST_BYTES`).
    max_message_bytes : int
        ``ZMQ_MAXMSGSIZE`` of the socket (:data:`~beamloop.edge.control.protocol.MAX_MESSAGE_BYTES`).
    lock : threading.RLock, optional
        Serialises the guard and the handlers with the owner's other work (default: a lock of its own).
    on_error : callable(call, exc) -> str, optional
        See :data:`ErrorHook`. Without it, an unexpected error in a call that can turn the beam on blanks
        it through the guard.

    Raises
    ------
    beamloop.edge.control.keys.InsecureBindError
        A network-reachable endpoint without keys.
    zmq.ZMQError
        The endpoint cannot be bound.
    """

    def __init__(self, endpoint: str, handlers: Mapping[str, Callable[[dict], dict]],
                 context: zmq.Context | None = None, *, safety: BeamSafety | None = None,
                 keys: ServerKeys | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, lock: threading.RLock | None = None,
                 on_error: ErrorHook | None = None) -> None:
        check_bind(endpoint, keys)
        self._own_ctx = keys is not None
        self._ctx = zmq.Context() if keys is not None else (context or zmq.Context.instance())
        self._auth = Authenticator(self._ctx, keys) if keys is not None else None
        self.socket = self._ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, int(max_message_bytes))
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
        self.max_request_bytes = int(max_request_bytes)
        self.lock = lock if lock is not None else threading.RLock()
        self.on_error = on_error
        self.requests = 0
        self.errors = 0
        self.last_error = ""
        self._loop_polled = time.monotonic()  # real time: the backstop asks whether the loop itself is held up
        self._backstop: tuple[threading.Thread, threading.Event] | None = None

    def close(self) -> None:
        """Stop the backstop timer, close the socket (and the authenticator and context of a secured server);
        closing twice is harmless."""
        self.stop_backstop()
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

    def reload_keys(self) -> bool:
        """Read the folder of authorized client keys again (a key removed from it is refused from the next
        connection on); returns whether the server has keys."""
        if self._auth is None:
            return False
        self._auth.reload()
        return True

    # serving ------------------------------------------------------------------------------------------
    def handle_one(self, timeout_ms: int = 0) -> bool:
        """Serve one request if one arrives within ``timeout_ms``; return whether one was served.

        The watchdog and the parked-beam time limit run after that, whether a request came or not. The
        requests that were waiting (up to :data:`DRAIN_BEFORE_TRIP`, each bounded in size) are served before
        the watchdog acts: a heartbeat that arrived while the controller was busy elsewhere (rendering a
        frame, or starved of CPU), or queued behind other clients' requests, proves the client alive, and
        must not let the watchdog blank the beam under a working service.
        """
        served = self._serve(timeout_ms)
        if self.safety.overdue():  # before the watchdog acts, serve what waits: the owner's heartbeat may be there
            for _ in range(DRAIN_BEFORE_TRIP):
                if not self.safety.overdue() or not self._serve(0):
                    break
        with self.lock:
            self.safety.poll()
            self._loop_polled = time.monotonic()
        return served

    def _serve(self, timeout_ms: int) -> bool:
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return False
        buf = self.socket.recv()
        self.requests += 1
        try:
            req = decode_envelope(buf, self.max_request_bytes)  # outside the lock: the watchdog may act meanwhile
        except BridgeError as exc:
            reply = self._error(None, exc)
        except Exception as exc:  # noqa: BLE001 - no request may end the serve loop
            reply = self._error(None, BridgeError("bad_request", f"request not understood ({type(exc).__name__})"))
        else:
            with self.lock:
                try:
                    reply = self._process(req)
                except Exception as exc:  # noqa: BLE001 - a bug in the guard must not end the serve loop
                    reply = self._error(None, BridgeError("internal", f"{type(exc).__name__}: {exc}", req.call))
        self.socket.send(reply)
        return True

    def _process(self, req: Request) -> bytes:
        try:
            reply = self.safety.admit(req.client, req.seq, req.call, req.args, req.digest, req.safer)
            if reply is None:
                handler = self.handlers.get(req.call)
                if handler is None:
                    raise BridgeError("unknown_call", f"no call named {req.call[:64]!r}; known: "
                                                      f"{sorted(self.handlers)}", req.call)
                try:
                    result = handler(req.args)
                except Exception as exc:  # a handler bug must not take the scan controller down
                    raise self._failed(req.call, exc) from None
                if req.notes:
                    result = {**result, "notes": list(req.notes)}
                reply = encode_reply(req.seq, result)
                self.safety.applied(req.client, req.call, req.args, result)
                if req.call not in UNCACHED_CALLS:
                    self.safety.remember(req.client, req.seq, reply, req.digest)
        except BridgeError as exc:
            reply = self._error(req, exc)
        except BeamPositionError as exc:
            reply = self._error(req, BridgeError(exc.code, str(exc)))
        return reply

    def _failed(self, call: str, exc: Exception) -> BridgeError:
        """The error reply of a handler that raised, after the owner's hook (or the guard) made the beam safe."""
        if isinstance(exc, BridgeError):
            err = exc
        elif isinstance(exc, BeamPositionError):
            err = BridgeError(exc.code, str(exc), call)
        else:
            err = BridgeError("internal", f"{type(exc).__name__}: {exc}", call)
        if self.on_error is not None:
            note = self.on_error(call, exc)
        elif err.code == "internal" and call in ("set_probe", "blank", "queue_points"):
            note = self.safety.blank_now(f"error in {call}")
            self.safety.counters.error_blanks += 1
        else:
            note = ""
        return BridgeError(err.code, f"{err.message}; {note}" if note else err.message, call)

    def _error(self, req: Request | None, exc: BridgeError) -> bytes:
        self.errors += 1
        self.last_error = str(exc)
        reply = encode_reply(-1 if req is None else req.seq, error=exc)
        reused = exc.code == "bad_request" and "reuses the sequence number" in exc.message
        if req is not None and exc.code not in NOT_REMEMBERED and not reused and req.call not in UNCACHED_CALLS:
            self.safety.remember(req.client, req.seq, reply, req.digest)
        return reply

    # the backstop timer -----------------------------------------------------------------------------------
    def start_backstop(self, grace_s: float | None = None, emergency: Callable[[str], None] | None = None, *,
                       tick_s: float | None = None, lock_wait_s: float | None = None) -> None:
        """Start the watchdog's backstop: a thread that acts when the owner of the beam is silent past the
        watchdog period and the serve loop has not run the watchdog itself for ``grace_s``.

        Parameters
        ----------
        grace_s : float, optional
            How long the serve loop may go without running the watchdog before the backstop acts, real
            seconds (default: half the watchdog period, at most 1 s). Time in which the backstop's own
            thread was not scheduled either (the whole process starved of CPU) does not count: after such a
            gap the serve loop gets ``grace_s`` to serve the requests that waited.
        emergency : callable(reason), optional
            Blanks the beam without the lock, when the lock is not free within ``lock_wait_s`` (a handler
            hangs): it must be safe to call from another thread. The guard then blanks again, properly,
            once the lock is free.
        tick_s : float, optional
            Real seconds between checks (default: a twentieth of the watchdog period, 2 to 20 ms).
        lock_wait_s : float, optional
            Real seconds to wait for the lock (default ``grace_s``).

        Notes
        -----
        Does nothing without a watchdog period, or when already started.
        """
        w = self.safety.limits.watchdog_s
        if w is None or self._backstop is not None:
            return
        grace = float(grace_s) if grace_s is not None else min(w / 2, 1.0)
        tick = float(tick_s) if tick_s is not None else min(max(w / 20, 0.002), 0.02)
        wait = float(lock_wait_s) if lock_wait_s is not None else grace
        stop = threading.Event()
        th = threading.Thread(target=self._run_backstop, args=(stop, grace, tick, wait, emergency),
                              name="bridge-watchdog-backstop", daemon=True)
        self._backstop = (th, stop)
        th.start()

    def stop_backstop(self) -> None:
        """Stop the backstop timer thread (if running) and wait for it."""
        if self._backstop is None:
            return
        th, stop = self._backstop
        self._backstop = None
        stop.set()
        if th is not threading.current_thread():
            th.join()

    def _run_backstop(self, stop: threading.Event, grace: float, tick: float, wait: float,
                      emergency: Callable[[str], None] | None) -> None:
        safety = self.safety
        t_prev = resumed = time.monotonic()
        while not stop.wait(tick):
            now = time.monotonic()
            if now - t_prev > tick + max(grace / 2, 0.05):
                resumed = now  # this thread was not scheduled: the process was starved, not the loop held up
            t_prev = now
            # lock-free reads of a few attributes: the serve loop runs the watchdog itself when it can
            if not safety.overdue() or now - max(self._loop_polled, resumed) <= grace:
                continue
            if self.lock.acquire(timeout=wait):
                try:
                    if safety.overdue():
                        safety.counters.backstop_trips += 1
                        safety.poll()
                finally:
                    self.lock.release()
            elif emergency is not None:
                safety.counters.backstop_trips += 1
                emergency("watchdog backstop")
                time.sleep(max(wait, tick))  # once per lock wait, not at every tick
