"""Test helpers shared by the detector-stream tests: drain a receiver's events, join its frame stacks."""

import numpy as np

from beamloop.streams.dectris.receiver import FrameStack, SeriesEnd
from beamloop.streams.errors import ProtocolError


def collect(rx, until_end=True, timeout_ms=2000):
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
