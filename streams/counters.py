"""Counters kept by every stream receiver."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StreamCounters:
    """What a receiver has seen since it was opened.

    Attributes
    ----------
    messages : int
        ZeroMQ messages read (all types, good or bad).
    frames : int
        Images received and decoded into a frame buffer.
    bytes : int
        Bytes read from the socket (headers and blobs).
    series_started, series_ended : int
        ``start`` and ``end`` messages accepted.
    gaps : int
        Times an image id jumped forward past the next expected id.
    missing_frames : int
        Image ids skipped over by those jumps (frames lost upstream).
    reordered : int
        Images whose id was below the next expected id (late or duplicated); they are still delivered.
    duplicates : int
        Those of the ``reordered`` images whose id had been received before in the series (recognised
        within the last 1024 ids; see :class:`beamloop.streams._ids.FrameIdTracker`).
    bogus_ids : int
        Images whose id jumped far ahead (more than 65536 ids) without the next image continuing from it:
        a corrupt or foreign id, counted here once instead of as a gap (the image is still delivered).
    malformed, truncated, oversized, unexpected, mismatch : int
        Messages rejected, by :attr:`beamloop.streams.errors.ProtocolError.kind`.
    dropped : int
        Frames the receiver discarded on purpose (latest-frame mode).
    decoded : int
        Frames decompressed into a frame buffer (detector receivers; a receiver that only stores the
        compressed blobs, such as the recorder's, leaves it at 0).
    saturated : int
        Frame stacks that filled up without the socket ever running empty: the receiver was behind the
        sender for that whole stack (lossless mode applies back-pressure then; a real detector that
        cannot wait loses frames, which show up as ``gaps``).
    last_error : str
        Text of the most recent rejection, empty when none.
    """

    messages: int = 0
    frames: int = 0
    bytes: int = 0
    series_started: int = 0
    series_ended: int = 0
    gaps: int = 0
    missing_frames: int = 0
    reordered: int = 0
    duplicates: int = 0
    bogus_ids: int = 0
    malformed: int = 0
    truncated: int = 0
    oversized: int = 0
    unexpected: int = 0
    mismatch: int = 0
    dropped: int = 0
    decoded: int = 0
    saturated: int = 0
    last_error: str = field(default="")

    @property
    def rejected(self) -> int:
        """Messages rejected for any protocol error."""
        return self.malformed + self.truncated + self.oversized + self.unexpected + self.mismatch

    def count_error(self, exc: Exception) -> None:
        """Increment the counter named by ``exc.kind`` (``malformed`` when absent) and keep its text."""
        kind = getattr(exc, "kind", "malformed")
        setattr(self, kind, getattr(self, kind) + 1)
        self.last_error = f"{type(exc).__name__}: {exc}"

    def as_dict(self) -> dict:
        """All counters, ``rejected`` included, as a plain dict (for JSON and HDF5 attributes)."""
        d = asdict(self)
        d["rejected"] = self.rejected
        return d
