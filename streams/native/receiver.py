"""Receiving the native beamloop stream into preallocated frame buffers.

:class:`FrameReceiver` returns the series events every stream receiver returns (:class:`SeriesStart`,
:class:`SeriesEnd`, from :mod:`beamloop.streams.events`) and one :class:`ImageEvent` per image.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np
import zmq

from beamloop.streams._ids import FrameIdTracker
from beamloop.streams._series import check_ring_bound, note_unended
from beamloop.streams._socket import SocketOwner, open_pull
from beamloop.streams.counters import StreamCounters
from beamloop.streams.errors import (
    MalformedMessage,
    OversizedMessage,
    ProtocolError,
    TruncatedMessage,
    UnexpectedMessage,
    check_oversize,
)
from beamloop.streams.events import SeriesEnd, SeriesStart
from beamloop.streams.native import protocol

__all__ = ["FrameReceiver", "ImageEvent", "SeriesStart", "SeriesEnd"]


@dataclass
class ImageEvent:
    """One received image (a frame of a scan, or a block of parked-probe samples).

    Attributes
    ----------
    series : SeriesHeader
        The series it belongs to.
    header : ImageHeader
        Its header (``image_id``, times, ``user_data``).
    data : dict channel -> ndarray, shape (rows, cols), the series' dtype
        Views into the receiver's ring of preallocated buffers: valid until ``ring`` more frames have
        been received. Copy what you need to keep longer.
    gap : int
        Image ids lost immediately before this one (0 when the stream is complete; see
        :meth:`beamloop.streams._ids.FrameIdTracker.see`).
    recv_ns, decoded_ns : int
        ``time.monotonic_ns()`` when the message's first part was read and when all blobs were decoded.
    """

    series: protocol.SeriesHeader
    header: protocol.ImageHeader
    data: dict
    gap: int
    recv_ns: int
    decoded_ns: int

    @property
    def image_id(self) -> int:
        """The frame's id within its series."""
        return self.header.image_id

    def spectrum(self, channel: str | None = None) -> np.ndarray:
        """The spectrum of ``channel`` (default: the series' first) of an image of a spectrum series: a 1-D
        view (channels,) into the ring; its energies are ``protocol.energy_axis(self.series).energy_eV``.

        Raises
        ------
        ValueError
            The series is not a spectrum series, or has no such channel.
        """
        if self.series.user_data.get("kind") != protocol.SPECTRUM_KIND:
            raise ValueError(f"series {self.series.series_id} is not a spectrum series "
                             f"(kind {self.series.user_data.get('kind')!r})")
        ch = self.series.channels[0] if channel is None else channel
        if ch not in self.data:
            raise ValueError(f"series {self.series.series_id} has no channel {ch!r}; it has {self.series.channels}")
        return self.data[ch][0]

    @property
    def transport_ns(self) -> int | None:
        """Nanoseconds from the sender's ``sent_ns`` to receipt; meaningful when both share a host clock."""
        sent = self.header.user_data.get("sent_ns")
        return self.recv_ns - sent if isinstance(sent, int) else None


_RENAMED = {"Frame": ImageEvent, "StreamStart": SeriesStart, "StreamEnd": SeriesEnd}


def __getattr__(name: str):
    """The former event names ``Frame``, ``StreamStart``, ``StreamEnd``, with a ``DeprecationWarning``."""
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"beamloop.streams.native.receiver.{name} is now {new.__module__}.{new.__name__}",
                      DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FrameReceiver(SocketOwner):
    """A PULL socket that receives the native beamloop stream into a ring of preallocated frames.

    Every message is validated (:func:`beamloop.streams.native.protocol.decode_header`,
    :func:`beamloop.streams.native.protocol.check_image`); a bad one raises a
    :class:`beamloop.streams.errors.ProtocolError` naming what was wrong, is counted in :attr:`counters`, and its
    remaining parts are discarded so that the next message reads intact.
    Raw blobs are read directly into the ring (no copy in Python); LZ4 blobs are read into one
    preallocated scratch buffer and decompressed into the ring.

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint to connect to (a detector or simulator that binds) or to bind (``bind=True``).
    bind : bool
        Bind instead of connect (for senders that connect, e.g. ``beamloop replay``).
    ring : int
        Frames kept per channel before buffers are reused (>= 2).
    max_header_bytes : int
        Bound on part 0 of any message; larger ones are rejected as oversized.
    max_ring_bytes : int
        Bound on the memory a ``start`` message may make the receiver allocate: the ring (``ring`` frames
        of every channel) plus the LZ4 scratch buffer. A series announcing more is rejected as
        :class:`beamloop.streams.errors.OversizedMessage` before anything is allocated (default 1 GiB, e.g. 8 frames
        of 4096x4096 float32 pixels per channel).
    rcvhwm : int
        ZeroMQ receive high-water mark in messages.
    context : zmq.Context, optional

    Raises
    ------
    ValueError
        ``ring`` below 2, or ``max_ring_bytes`` below 1.
    zmq.ZMQError
        The endpoint cannot be bound or connected (the message names it).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = False,
        ring: int = 8,
        max_header_bytes: int = 1 << 16,
        max_ring_bytes: int = 1 << 30,
        rcvhwm: int = 1000,
        context: zmq.Context | None = None,
    ) -> None:
        if ring < 2:
            raise ValueError(f"ring must hold at least 2 frames, got {ring}")
        if max_ring_bytes < 1:
            raise ValueError(f"max_ring_bytes must be positive, got {max_ring_bytes}")
        self.max_ring_bytes = int(max_ring_bytes)
        SocketOwner.__init__(self, *open_pull(endpoint, bind=bind, rcvhwm=rcvhwm, context=context))
        self.ring = ring
        self.counters = StreamCounters()
        self.series: protocol.SeriesHeader | None = None
        self._header_buf = bytearray(max_header_bytes)
        self._header_view = memoryview(self._header_buf)
        self._buffers: dict[str, np.ndarray] = {}
        self._scratch = bytearray(0)
        self._slot = 0
        self._ids = FrameIdTracker(self.counters)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    # receiving -----------------------------------------------------------------------------------
    def recv(self, timeout_ms: int | None = None) -> SeriesStart | ImageEvent | SeriesEnd | None:
        """Receive the next message.

        Parameters
        ----------
        timeout_ms : int or None
            Wait at most this long; ``None`` waits for ever.

        Returns
        -------
        SeriesStart, ImageEvent, SeriesEnd, or None when the timeout passed with no message.

        Raises
        ------
        ProtocolError
            The message was rejected (malformed, truncated, oversized, unexpected, mismatched); it is
            counted in :attr:`counters` and nothing else is lost.
        """
        if timeout_ms is not None and not self._poller.poll(timeout_ms):
            return None
        n = self._sock.recv_into(self._header_view)
        recv_ns = time.monotonic_ns()
        self.counters.messages += 1
        self.counters.bytes += n
        try:
            check_oversize(n, len(self._header_buf), "message part 0")
            header = protocol.decode_header(self._header_view[:n])
            if isinstance(header, protocol.ImageHeader):
                return self._image(header, recv_ns)
            self._expect_no_more_parts(type(header).__name__)
            if isinstance(header, protocol.SeriesHeader):
                return self._start(header, recv_ns)
            return self._end(header, recv_ns)
        except ProtocolError as exc:
            self._discard_rest()
            self.counters.count_error(exc)
            raise

    def _start(self, series: protocol.SeriesHeader, recv_ns: int) -> SeriesStart:
        note_unended(self.counters, self.series, series)
        check_ring_bound(series, self.ring * series.frame_nbytes * len(series.channels) + series.max_blob_nbytes,
                         self.max_ring_bytes, f"a ring of {self.ring}")
        self._allocate(series)
        self.series = series
        self._ids.start()
        self.counters.series_started += 1
        return SeriesStart(series, recv_ns)

    def _end(self, header: protocol.EndHeader, recv_ns: int) -> SeriesEnd:
        series = self.series
        if series is None or header.series_unique_id != series.series_unique_id:
            raise UnexpectedMessage(f"end of series {header.series_id} that is not open")
        missing = self._ids.end(series.number_of_images)
        self.counters.series_ended += 1
        self.series = None
        return SeriesEnd(series, self._ids.frames, missing, recv_ns, header)

    def _image(self, header: protocol.ImageHeader, recv_ns: int) -> ImageEvent:
        series = self.series
        protocol.check_image(series, header)
        slot = self._slot
        data = {}
        for k, blob in enumerate(header.blobs):
            if not self._sock.rcvmore:
                raise TruncatedMessage(
                    f"image {header.image_id}: message ended after {k} of {len(header.blobs)} blob parts"
                )
            out = self._buffers[blob.channel][slot]
            if blob.encoding == "raw":
                got = self._sock.recv_into(out.reshape(-1).view(np.uint8))
                self.counters.bytes += got
                self._check_blob_size(header, blob, got, out.nbytes)
            else:
                got = self._sock.recv_into(self._scratch)
                self.counters.bytes += got
                self._check_blob_size(header, blob, got, len(self._scratch))
                protocol.decode_blob_into(memoryview(self._scratch)[:got], "lz4", out)
            data[blob.channel] = out
        self._expect_no_more_parts(f"image {header.image_id}")
        gap = self._ids.see(header.image_id)
        self._slot = (slot + 1) % self.ring
        self.counters.frames += 1
        return ImageEvent(series, header, data, gap, recv_ns, time.monotonic_ns())

    @staticmethod
    def _check_blob_size(header: protocol.ImageHeader, blob: protocol.BlobInfo, got: int, capacity: int) -> None:
        if got > capacity:
            raise OversizedMessage(
                f"image {header.image_id} channel {blob.channel!r}: blob of {got} bytes exceeds the "
                f"{capacity}-byte buffer"
            )
        if got != blob.size:
            raise TruncatedMessage(
                f"image {header.image_id} channel {blob.channel!r}: blob of {got} bytes, header declares {blob.size}"
            )

    def _expect_no_more_parts(self, what: str) -> None:
        if self._sock.rcvmore:
            raise MalformedMessage(f"{what} message has more parts than its header describes")

    def _discard_rest(self) -> None:
        while self._sock.rcvmore:
            n = self._sock.recv_into(bytearray())
            self.counters.bytes += n

    def _allocate(self, series: protocol.SeriesHeader) -> None:
        """(Re)allocate the ring and the LZ4 scratch buffer when the frame layout changes."""
        shape = (self.ring, *series.shape)
        if (
            set(self._buffers) != set(series.channels)
            or any(b.shape != shape or b.dtype != series.dtype for b in self._buffers.values())
        ):
            self._buffers = {ch: np.zeros(shape, series.dtype) for ch in series.channels}
            self._slot = 0
        if len(self._scratch) < series.max_blob_nbytes:
            self._scratch = bytearray(series.max_blob_nbytes)
