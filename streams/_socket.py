"""One lifecycle for the ZeroMQ sockets of every stream sender and receiver.

:func:`open_pull` and :func:`open_push` make a socket with its options set before it binds or connects (ZeroMQ
applies high-water marks only to connections made after they are set: ``zmq_setsockopt(3)``), and
raise errors that name the endpoint. :class:`SocketOwner` is the base class of the senders and receivers:
explicit :meth:`~SocketOwner.close` with a linger period, use as a context manager, and a ``ResourceWarning``
when an owner is garbage-collected unclosed, in the manner of pyzmq's own ``zmq.Socket``
(``zmq/sugar/socket.py``: ``__del__``, ``close(linger)``, and ``bind`` errors that name the address).
"""

from __future__ import annotations

import warnings

import zmq


def _attach(sock: zmq.Socket, endpoint: str, bind: bool) -> str:
    """Bind or connect ``sock``; return the endpoint (the one the system chose for port 0 or ``*``).

    On failure the socket is closed, and the ``zmq.ZMQError`` raised says which endpoint and which verb.
    """
    try:
        if bind:
            sock.bind(endpoint)
            return sock.getsockopt_string(zmq.LAST_ENDPOINT)
        sock.connect(endpoint)
        return endpoint
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        verb = "bind" if bind else "connect"
        raise zmq.ZMQError(exc.errno, f"cannot {verb} {endpoint!r}: {zmq.strerror(exc.errno)}") from None


def _open(kind: int, endpoint: str, bind: bool, context: zmq.Context | None, options: dict) -> tuple[zmq.Socket, str]:
    """A socket of ``kind`` with ``options`` set, then bound or connected (:func:`_attach`)."""
    sock = (context or zmq.Context.instance()).socket(kind)
    for option, value in options.items():
        sock.setsockopt(option, value)
    return sock, _attach(sock, endpoint, bind)


def open_pull(endpoint: str, *, bind: bool, rcvhwm: int, linger_ms: int = 0,
              context: zmq.Context | None = None) -> tuple[zmq.Socket, str]:
    """A ZeroMQ PULL socket for a stream receiver, bound or connected.

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint, e.g. ``"tcp://127.0.0.1:9999"`` or, with ``bind``, ``"tcp://127.0.0.1:0"``.
    bind : bool
        Bind (for senders that connect) instead of connecting (to a detector that binds).
    rcvhwm : int
        Receive high-water mark, messages (``ZMQ_RCVHWM``; 0: unbounded).
    linger_ms : int
        ``ZMQ_LINGER``: how long :meth:`SocketOwner.close` waits by default (0: drop what is queued).
    context : zmq.Context, optional
        Defaults to ``zmq.Context.instance()``.

    Returns
    -------
    (zmq.Socket, str)
        The socket and its endpoint (with the port the system chose when binding to port 0).

    Raises
    ------
    zmq.ZMQError
        The endpoint cannot be bound or connected; the message names it.
    """
    return _open(zmq.PULL, endpoint, bind, context, {zmq.RCVHWM: rcvhwm, zmq.LINGER: linger_ms})


def open_push(endpoint: str, *, bind: bool, sndhwm: int, linger_ms: int, send_timeout_ms: int | None = None,
              context: zmq.Context | None = None) -> tuple[zmq.Socket, str]:
    """A ZeroMQ PUSH socket for a frame sender (native, SIMPLON v1 or Stream V2), bound or connected.

    ``endpoint``, ``bind``, ``context``, the result and the errors are those of :func:`open_pull`.

    Parameters
    ----------
    sndhwm : int
        Send high-water mark, messages (``ZMQ_SNDHWM``): sends block beyond it (lossless back-pressure).
    linger_ms : int
        ``ZMQ_LINGER``: how long queued messages get to leave when the socket is closed.
    send_timeout_ms : int or None
        ``ZMQ_SNDTIMEO``: a send that blocks longer raises ``zmq.Again``; ``None`` waits.
    """
    options = {zmq.SNDHWM: sndhwm, zmq.LINGER: linger_ms}
    if send_timeout_ms is not None:
        options[zmq.SNDTIMEO] = send_timeout_ms
    return _open(zmq.PUSH, endpoint, bind, context, options)


class SocketOwner:
    """Base class of the stream senders and receivers: owns one ZeroMQ socket.

    Subclasses open the socket (:func:`open_pull`, :func:`open_push`) and call ``SocketOwner.__init__``.
    Close an owner explicitly (:meth:`close`, or use it in a ``with`` block); one that is garbage-collected
    unclosed emits a ``ResourceWarning`` naming its class and endpoint and closes its socket without linger.

    Parameters
    ----------
    sock : zmq.Socket
        The socket, bound or connected.
    endpoint : str
        Its endpoint.

    Attributes
    ----------
    endpoint : str
        The endpoint bound or connected (with the port the system chose for port 0).
    """

    _sock: zmq.Socket
    endpoint: str

    def __init__(self, sock: zmq.Socket, endpoint: str) -> None:
        self._sock = sock
        self.endpoint = endpoint

    @property
    def socket(self) -> zmq.Socket:
        """The ZeroMQ socket (for adapters and pollers)."""
        return self._sock

    @property
    def closed(self) -> bool:
        """Whether the socket is closed."""
        return self._sock.closed

    def close(self, linger_ms: int | None = None) -> None:
        """Close the socket; idempotent.

        Parameters
        ----------
        linger_ms : int or None
            How long queued outgoing messages get to leave (``zmq.Socket.close(linger)``); ``None``: the
            socket's ``ZMQ_LINGER``, as opened (receivers: 0, messages still queued are dropped).
        """
        if not self._sock.closed:
            self._sock.close(linger=linger_ms)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        sock = self.__dict__.get("_sock")  # absent when a subclass failed before opening its socket
        if sock is None or sock.closed:
            return
        try:
            warnings.warn(f"unclosed {type(self).__name__} on {self.__dict__.get('endpoint')}", ResourceWarning,
                          stacklevel=2, source=self)
        except Exception:  # noqa: BLE001 - the warnings machinery may be gone at interpreter exit
            pass
        sock.close(linger=0)
