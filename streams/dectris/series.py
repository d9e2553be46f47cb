"""What a DECTRIS detector series is and what the receiver delivers of it.

:class:`DetectorSeries` describes a series as its ``start`` message (Stream V2) or its ``dheader`` and
detector configuration (SIMPLON v1) announce it. :class:`beamloop.streams.dectris.receiver.DetectorReceiver`
delivers :class:`SeriesStart`, then :class:`FrameStack` batches of images (one :class:`ChannelStack` per
channel), then :class:`SeriesEnd`; the two series events are those of every stream receiver
(:mod:`beamloop.streams.events`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from beamloop.streams.events import SeriesEnd, SeriesStart

__all__ = ["DetectorSeries", "SeriesStart", "SeriesEnd", "ChannelStack", "FrameStack"]


@dataclass(frozen=True)
class DetectorSeries:
    """What every frame of a series looks like, as announced by the detector.

    Attributes
    ----------
    protocol : str
        The stream protocol (a name registered in :data:`beamloop.streams.dectris.PROTOCOLS`:
        ``"simplon1"``, ``"stream2"``).
    series_id : int
    series_unique_id : str
        Stream V2's unique id; SIMPLON v1 has none and gets ``"simplon1-<series>"``.
    channels : tuple of str
        Channel (threshold) names; SIMPLON v1 has one, ``"data"``.
    shape : (rows, cols)
        Frame shape in detector pixels (rows = ``image_size_y`` / ``y_pixels_in_detector``).
    dtype : numpy.dtype
        Little-endian pixel type (uint8, uint16 or uint32).
    number_of_images : int
        Frames announced (0 when unknown).
    count_time, frame_time : float
        Seconds of exposure per frame, and between frame starts.
    config : dict
        The detector configuration as sent (SIMPLON v1 config part; Stream V2 start-message fields other
        than the image data), for recorders and users.
    """

    protocol: str
    series_id: int
    series_unique_id: str
    channels: tuple[str, ...]
    shape: tuple[int, int]
    dtype: np.dtype
    number_of_images: int = 0
    count_time: float = 0.0
    frame_time: float = 0.0
    config: dict = field(default_factory=dict)

    @property
    def frame_nbytes(self) -> int:
        """Bytes of one uncompressed frame of one channel."""
        return int(self.shape[0] * self.shape[1] * np.dtype(self.dtype).itemsize)


class ChannelStack:
    """One channel's part of a :class:`FrameStack`.

    Attributes
    ----------
    frames : ndarray (n, rows, cols) or None
        Decoded frames (views into the receiver's preallocated stacks); ``None`` when the receiver does
        not decode (``decode=False``).
    arena : ndarray (slots * capacity,), uint8
        The received blobs; blob ``i`` is ``arena[offsets[i]:offsets[i] + lengths[i]]``.
    offsets, lengths : ndarray (n,), int64
        Byte offsets and lengths of the blobs in ``arena``.
    codec : beamloop.streams.dectris.codecs.Codec
        How the blobs are encoded.
    """

    __slots__ = ("frames", "arena", "offsets", "lengths", "codec")

    def __init__(self, frames, arena, offsets, lengths, codec):
        self.frames = frames
        self.arena = arena
        self.offsets = offsets
        self.lengths = lengths
        self.codec = codec

    def blob(self, i: int) -> memoryview:
        """The encoded bytes of frame ``i`` (a view, valid as long as the stack)."""
        o = int(self.offsets[i])
        return memoryview(self.arena)[o:o + int(self.lengths[i])]


@dataclass
class FrameStack:
    """A batch of consecutive frames of one series.

    Everything is a view into the receiver's preallocated ring of stacks: valid until ``stacks - 1``
    further stacks have been received (``DetectorReceiver(stacks=...)``). Copy what you keep longer.

    Attributes
    ----------
    series : DetectorSeries
    image_ids : ndarray (n,), int64
        Frame ids within the series (0-based).
    times_ns : ndarray (n, 3), int64
        ``start_time``, ``stop_time``, ``real_time`` of each frame, nanoseconds (detector clock).
    channels : dict name -> ChannelStack
    recv_ns, decoded_ns : int
        ``time.monotonic_ns()`` when the first frame of the stack arrived and when decoding finished.
    """

    series: DetectorSeries
    image_ids: np.ndarray
    times_ns: np.ndarray
    channels: dict
    recv_ns: int
    decoded_ns: int

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def frames(self) -> np.ndarray | None:
        """Decoded frames of the first channel, shape (n, rows, cols)."""
        return self.channels[self.series.channels[0]].frames
