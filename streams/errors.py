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


class UnexpectedMessage(ProtocolError):
    """A well-formed message that does not fit the stream state (an image before ``start``, a foreign series)."""

    kind = "unexpected"


class FrameMismatch(ProtocolError):
    """An image whose shape, dtype or channel set differs from what its series' ``start`` announced."""

    kind = "mismatch"
