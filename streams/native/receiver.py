"""Receiving the native beamloop stream into preallocated frame buffers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from beamloop.streams.native import protocol
from beamloop.streams.counters import StreamCounters
from beamloop.streams.errors import MalformedMessage, OversizedMessage, ProtocolError, TruncatedMessage, UnexpectedMessage


@dataclass
class StreamStart:
    """A series began. ``series`` describes every frame to come; ``recv_ns`` is ``time.monotonic_ns()``."""

    series: protocol.SeriesHeader
    recv_ns: int


@dataclass
class Frame:
    """One received frame.

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
        Image ids skipped immediately before this one (0 when the stream is complete).
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

    @property
    def transport_ns(self) -> int | None:
        """Nanoseconds from the sender's ``sent_ns`` to receipt; meaningful when both share a host clock."""
        sent = self.header.user_data.get("sent_ns")
        return self.recv_ns - sent if isinstance(sent, int) else None


@dataclass
class StreamEnd:
    """A series ended. ``frames`` images were received in it, ``missing`` were announced but never came."""

    header: protocol.EndHeader
    frames: int
    missing: int
    recv_ns: int = field(default=0)


class FrameReceiver:
    """A PULL socket that receives the native beamloop stream into a ring of preallocated frames.

    Every message is validated (:func:`beamloop.streams.native.protocol.decode_header`, :func:`beamloop.streams.native.protocol.check_image`);
    a bad one raises a :class:`beamloop.streams.errors.ProtocolError` naming what was wrong, is counted in
    :attr:`counters`, and its remaining parts are discarded so that the next message reads intact.
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
        The endpoint cannot be bound or connected.
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
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if bind:
            self._sock.bind(endpoint)
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._sock.connect(endpoint)
            self.endpoint = endpoint
        self.ring = ring
        self.counters = StreamCounters()
        self.series: protocol.SeriesHeader | None = None
        self._header_buf = bytearray(max_header_bytes)
        self._header_view = memoryview(self._header_buf)
        self._buffers: dict[str, np.ndarray] = {}
        self._scratch = bytearray(0)
        self._slot = 0
        self._next_id = 0
        self._series_frames = 0
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)

    # lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the socket (pending messages are dropped)."""
        if not self._sock.closed:
            self._sock.close(linger=0)

    def __enter__(self) -> "FrameReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # receiving -----------------------------------------------------------------------------------
    def recv(self, timeout_ms: int | None = None) -> StreamStart | Frame | StreamEnd | None:
        """Receive the next message.

        Parameters
        ----------
        timeout_ms : int or None
            Wait at most this long; ``None`` waits for ever.

        Returns
        -------
        StreamStart, Frame, StreamEnd, or None when the timeout passed with no message.

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
            if n > len(self._header_buf):
                raise OversizedMessage(f"message part 0 of {n} bytes exceeds the {len(self._header_buf)}-byte bound")
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

    def _start(self, series: protocol.SeriesHeader, recv_ns: int) -> StreamStart:
        if self.series is not None:
            self.counters.count_error(
                UnexpectedMessage(f"series {series.series_id} started while series {self.series.series_id} was open")
            )
        need = self.ring * series.frame_nbytes * len(series.channels) + series.max_blob_nbytes
        if need > self.max_ring_bytes:
            raise OversizedMessage(
                f"series {series.series_id} announces {len(series.channels)} channel(s) of {series.shape[0]}x"
                f"{series.shape[1]} {series.dtype} frames: {need} bytes for a ring of {self.ring}, over the "
                f"{self.max_ring_bytes}-byte bound (max_ring_bytes)"
            )
        self._allocate(series)
        self.series = series
        self._next_id = 0
        self._series_frames = 0
        self.counters.series_started += 1
        return StreamStart(series, recv_ns)

    def _end(self, header: protocol.EndHeader, recv_ns: int) -> StreamEnd:
        series = self.series
        if series is None or header.series_unique_id != series.series_unique_id:
            raise UnexpectedMessage(f"end of series {header.series_id} that is not open")
        missing = max(series.number_of_images - self._next_id, 0) if series.number_of_images else 0
        if missing:
            self.counters.gaps += 1
            self.counters.missing_frames += missing
        self.counters.series_ended += 1
        self.series = None
        return StreamEnd(header, self._series_frames, missing, recv_ns)

    def _image(self, header: protocol.ImageHeader, recv_ns: int) -> Frame:
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
        gap = header.image_id - self._next_id
        if gap > 0:
            self.counters.gaps += 1
            self.counters.missing_frames += gap
        elif gap < 0:
            self.counters.reordered += 1
        self._next_id = max(self._next_id, header.image_id + 1)
        self._slot = (slot + 1) % self.ring
        self._series_frames += 1
        self.counters.frames += 1
        return Frame(series, header, data, max(gap, 0), recv_ns, time.monotonic_ns())

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
