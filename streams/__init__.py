"""Detector stream protocols over ZeroMQ: encoders, decoders, senders, receivers and recorders.

The native beamloop stream (:mod:`beamloop.streams.native.protocol`) is modelled on DECTRIS Stream V2: CBOR
``start`` / ``image`` / ``end`` messages, with beamloop's metadata in ``user_data``.
:class:`beamloop.streams.native.sender.FrameSender` and :class:`beamloop.streams.native.receiver.FrameReceiver` move it
over ZeroMQ PUSH/PULL sockets without copying pixel data. DECTRIS detector streams (SIMPLON v1, Stream V2) are received
by :class:`beamloop.streams.dectris.receiver.DetectorReceiver`, Quantum Detectors Merlin's MIB stream over TCP by
:class:`beamloop.streams.merlin.receiver.MerlinReceiver`; :func:`beamloop.streams.receivers.open_receiver` opens
either by protocol name. Every receiver returns the series events of :mod:`beamloop.streams.events`.

This package never imports :mod:`beamloop.edge`.
"""

from beamloop.streams.counters import StreamCounters
from beamloop.streams.errors import (
    FrameMismatch,
    MalformedMessage,
    OversizedMessage,
    ProtocolError,
    TruncatedMessage,
    UnexpectedMessage,
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
