"""Helpers shared by the detector-stream tests: links that close their sockets even when a test fails,
draining a receiver's events, and joining its frame stacks.

Tests import them as ``from detector_events import ...``: tests/ is not a package, and pytest's default
("prepend") import mode puts the folder of the test file being collected on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import zmq

from beamloop.streams.dectris.receiver import DetectorReceiver
from beamloop.streams.dectris.series import FrameStack, SeriesEnd
from beamloop.streams.dectris.simplon import SimplonSender
from beamloop.streams.dectris.stream_v2 import Stream2Sender
from beamloop.streams.errors import ProtocolError

SENDERS = {"simplon1": SimplonSender, "stream2": Stream2Sender}


@contextlib.contextmanager
def sender_link(protocol: str = "simplon1", *, sender_kw: dict | None = None, **receiver_kw):
    """A sender of ``protocol`` bound on a free port and a :class:`DetectorReceiver` connected to it.

    Yields ``(sender, receiver)``; both are closed on exit (without linger), whatever happened.
    """
    with SENDERS[protocol]("tcp://127.0.0.1:0", **(sender_kw or {})) as tx:
        try:
            with DetectorReceiver(tx.endpoint, protocol=protocol, **receiver_kw) as rx:
                time.sleep(0.05)  # let the connection settle before the first message
                yield tx, rx
        finally:
            tx.close(linger_ms=0)


@contextlib.contextmanager
def pushed(receiver):
    """A plain pyzmq PUSH socket connected to ``receiver`` (a bound FrameReceiver or DetectorReceiver), for
    sending hand-made messages. Yields ``(push_socket, receiver)``; both are closed on exit, whatever happened."""
    with receiver:
        tx = zmq.Context.instance().socket(zmq.PUSH)
        try:
            tx.setsockopt(zmq.LINGER, 0)
            tx.connect(receiver.endpoint)
            yield tx, receiver
        finally:
            tx.close(linger=0)


def pushed_receiver(protocol: str = "simplon1", **receiver_kw):
    """:func:`pushed` with a :class:`DetectorReceiver` of ``protocol`` bound on a free port."""
    return pushed(DetectorReceiver("tcp://127.0.0.1:0", protocol=protocol, bind=True, **receiver_kw))


def collect(rx, until_end: bool = True, timeout_ms: int = 2000):
    """All events of ``rx`` until a SeriesEnd (or a ``timeout_ms`` without one); protocol errors are
    collected, not raised. Returns ``(events, errors)``."""
    events, errors = [], []
    while True:
        try:
            ev = rx.recv(timeout_ms)
        except ProtocolError as exc:
            errors.append(exc)
            continue
        if ev is None:
            break
        events.append(ev)
        if until_end and isinstance(ev, SeriesEnd):
            break
    return events, errors


def stacked(events):
    """Frame ids (int64, shape (n,)) and frames (shape (n, rows, cols)) of every FrameStack in ``events``,
    in order; ``(empty, None)`` when there is none."""
    stacks = [e for e in events if isinstance(e, FrameStack)]
    if not stacks:
        return np.empty(0, np.int64), None
    return (np.concatenate([s.image_ids.copy() for s in stacks]),
            np.concatenate([s.frames.copy() for s in stacks]))
