"""Detector stream protocols over ZeroMQ: encoders, decoders, senders, receivers and recorders.

The native beamloop stream (:mod:`streams.native`) is modelled on DECTRIS Stream V2: CBOR ``start`` /
``image`` / ``end`` messages, with beamloop's metadata in ``user_data``. :class:`streams.sender.FrameSender`
and :class:`streams.receiver.FrameReceiver` move it over ZeroMQ PUSH/PULL sockets without copying pixel
data.
"""

from streams.counters import StreamCounters
from streams.errors import (
    ProtocolError,
    MalformedMessage,
    TruncatedMessage,
    OversizedMessage,
    UnexpectedMessage,
    FrameMismatch,
)

__all__ = [
    "StreamCounters",
    "ProtocolError",
    "MalformedMessage",
    "TruncatedMessage",
    "OversizedMessage",
    "UnexpectedMessage",
    "FrameMismatch",
]
