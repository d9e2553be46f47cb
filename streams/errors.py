"""Errors raised by stream decoders and receivers.

Every error names what was wrong with the message. A receiver counts each one
(:class:`beamloop.streams.counters.StreamCounters`) and discards only the offending message, so the next
message is read intact.
"""


class ProtocolError(ValueError):
    """A message that does not follow the stream protocol.

    ``kind`` is the name of the counter the receiver increments for it (``malformed``,
    ``truncated``, ``oversized``, ``unexpected``, ``mismatch``).
    """

    kind = "malformed"


class MalformedMessage(ProtocolError):
    """The message could not be decoded (not CBOR, wrong types, missing fields, unknown values)."""

    kind = "malformed"


class TruncatedMessage(ProtocolError):
    """A blob is shorter than its header declares, or message parts are missing."""

    kind = "truncated"


class OversizedMessage(ProtocolError):
    """A message part is larger than the receiver's bound (header or blob); it was discarded unread."""

    kind = "oversized"


def check_oversize(n: int, capacity: int, what: str) -> None:
    """Raise :class:`OversizedMessage` when a message part of ``n`` bytes overran its ``capacity``-byte buffer.

    ``zmq.Socket.recv_into`` returns the part's full length even when it truncates the copy to the buffer
    (pyzmq documentation of ``Socket.recv_into``), so ``n > capacity`` is how an oversized part shows.

    Parameters
    ----------
    n : int
        Bytes of the part, as ``recv_into`` returned.
    capacity : int
        Bytes of the buffer it was read into.
    what : str
        Names the part in the error message.

    Raises
    ------
    OversizedMessage
        ``n > capacity``.
    """
    if n > capacity:
        raise OversizedMessage(f"{what} of {n} bytes exceeds the {capacity}-byte bound")


class UnexpectedMessage(ProtocolError):
    """A well-formed message that does not fit the stream state (an image before ``start``, a foreign series)."""

    kind = "unexpected"


class FrameMismatch(ProtocolError):
    """An image whose shape, dtype or channel set differs from what its series' ``start`` announced."""

    kind = "mismatch"
