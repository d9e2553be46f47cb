"""Receiving pixelated-detector streams (DECTRIS SIMPLON v1, Stream V2) into preallocated frame stacks.

A detector sends one message per frame, up to ~120k per second (DECTRIS ARINA). Python can afford a few
microseconds per frame, not more, so :class:`DetectorReceiver` keeps the per-frame work down to reading
the message parts and validating their headers: every compressed blob is read straight into a slot of a
preallocated arena (``zmq.Socket.recv_into``, no allocation), and whole stacks of frames are decompressed
by one numba call into a preallocated ``(stack, rows, cols)`` array (:func:`beamloop.streams.dectris.codecs.decode_stack`).
Consumers (virtual detectors, the recorder, the edge service) get a :class:`FrameStack` per batch.

Message layouts live in :mod:`beamloop.streams.dectris.simplon` and :mod:`beamloop.streams.dectris.stream_v2`; each provides a *protocol
adapter* that reads one message from the socket and says what it was.

Flow control (``mode``):

``"lossless"`` (recording)
    Every frame is delivered, none is ever dropped. When the consumer is slower than the detector the
    ZeroMQ queues fill and the sender blocks (back-pressure). A stack that fills up while messages keep
    waiting is counted in ``counters.saturated`` (we are behind); frames a detector lost because it could
    not wait show up as gaps in the frame ids (``counters.gaps``, ``missing_frames``) and are logged.
``"latest"`` (control loops)
    Each :meth:`DetectorReceiver.recv` drains everything that has arrived and delivers only the newest
    frame (a stack of one); older ones are counted in ``counters.dropped`` and never decoded. The receive
    queue is kept short so no stale frame waits in it.

Bounds: every header part is read into a fixed buffer (``max_header_bytes``) and every blob into a slot
of ``codec.max_blob_nbytes(frame_nbytes)`` bytes; larger parts are rejected as oversized. Every claimed
uncompressed size is checked against the frame size before anything is decompressed.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from beamloop.streams.dectris import codecs
from beamloop.streams.counters import StreamCounters
from beamloop.streams.errors import MalformedMessage, OversizedMessage, ProtocolError, UnexpectedMessage

log = logging.getLogger(__name__)

MODES = ("lossless", "latest")
"""Flow-control modes of :class:`DetectorReceiver`."""

NS = 1_000_000_000
_FULL, _EMPTY = 0, 1  # beamloop.streams.dectris.zmqfast return codes
_MAX_DRAIN = 10_000  # latest mode: messages read per recv() at most before the newest is delivered


@dataclass(frozen=True)
class DetectorSeries:
    """What every frame of a series looks like, as announced by the detector.

    Attributes
    ----------
    protocol : {"simplon1", "stream2"}
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


@dataclass
class SeriesStart:
    """A series was armed. ``recv_ns`` is ``time.monotonic_ns()`` at receipt."""

    series: DetectorSeries
    recv_ns: int


@dataclass
class SeriesEnd:
    """A series ended: ``frames`` were received in it; ``missing`` were announced or skipped but never came."""

    series: DetectorSeries
    frames: int
    missing: int
    recv_ns: int


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


class _Ring:
    """``nstacks`` preallocated stacks of ``size`` frames for every channel of a series."""

    def __init__(self, series: DetectorSeries, size: int, nstacks: int, decode: bool) -> None:
        self.series = series
        self.size = size
        self.nstacks = nstacks
        itemsize = np.dtype(series.dtype).itemsize
        self.capacity = self.slot_bytes(series)
        slots = size * nstacks
        self.arenas = {ch: np.empty(slots * self.capacity, np.uint8) for ch in series.channels}
        self.views = {ch: [memoryview(a)[k * self.capacity:(k + 1) * self.capacity] for k in range(slots)]
                      for ch, a in self.arenas.items()}
        self.offsets = (np.arange(slots, dtype=np.int64) * self.capacity).reshape(nstacks, size)
        self.lengths = {ch: np.zeros((nstacks, size), np.int64) for ch in series.channels}
        self.frames = ({ch: np.zeros((nstacks, size, *series.shape), series.dtype) for ch in series.channels}
                       if decode else None)
        self.image_ids = np.zeros((nstacks, size), np.int64)
        self.times = np.zeros((nstacks, size, 3), np.int64)
        self.status = np.zeros(size, np.int8)
        self.codecs: dict[str, codecs.Codec] = {}
        self.stack = 0  # stack being filled
        self.fill = 0  # frames kept in it
        self.wslot = 0  # slot the next image is read into (== fill, except in latest mode)
        self.held = 0  # latest mode: slot of the newest complete frame
        if decode:  # compile the stack decoder for these array types now, not on the first stack
            ch = series.channels[0]
            codecs.decode_stack(self.arenas[ch], self.offsets[0, :0], self.lengths[ch][0, :0],
                                codecs.Codec(codecs.BSLZ4, itemsize), self.frames[ch][0, :0], self.status)

    @staticmethod
    def slot_bytes(series: DetectorSeries) -> int:
        """Arena bytes per frame and channel: the largest blob any codec may produce for one frame."""
        itemsize = np.dtype(series.dtype).itemsize
        return max(codecs.Codec(a, itemsize).max_blob_nbytes(series.frame_nbytes) for a in codecs.ALGORITHMS)

    @classmethod
    def nbytes(cls, series: DetectorSeries, size: int, nstacks: int, decode: bool) -> int:
        """Bytes a ring for ``series`` allocates (arenas, plus decoded stacks when ``decode``)."""
        per_frame = cls.slot_bytes(series) + (series.frame_nbytes if decode else 0)
        return size * nstacks * len(series.channels) * per_frame

    def matches(self, series: DetectorSeries, size: int, nstacks: int, decode: bool) -> bool:
        return (self.series.channels == series.channels and self.series.shape == series.shape
                and np.dtype(self.series.dtype) == np.dtype(series.dtype) and self.size == size
                and self.nstacks == nstacks and (self.frames is not None) == decode)

    def slot_view(self, channel: str) -> memoryview:
        return self.views[channel][self.stack * self.size + self.wslot]


class DetectorReceiver:
    """A PULL socket receiving a DECTRIS detector stream into preallocated frame stacks.

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint of the detector (it binds: DCU port 9999 for SIMPLON v1, 31001 for Stream V2).
    protocol : {"simplon1", "stream2"}
    bind : bool
        Bind instead of connect (for senders that connect).
    mode : {"lossless", "latest"}
        Flow control, see the module docstring.
    stack_size : int
        Frames per :class:`FrameStack` (lossless mode); a stack is delivered as soon as it is full or the
        socket has nothing more waiting, so batching never adds latency when the stream is slow.
    stacks : int
        Stacks in the ring (>= 2): a delivered stack stays valid while ``stacks - 1`` more are filled.
    decode : bool
        Decompress frames (``False``: deliver only the compressed blobs, e.g. for the recorder).
    verify_hash : bool
        SIMPLON v1: check each frame's md5 ``hash`` against its blob (costs ~1 us per 10 kB).
    max_header_bytes : int
        Bound on every JSON/CBOR header part (Stream V2: on a message minus the frame's blob bound).
    max_ring_bytes : int
        Bound on the memory a series announcement may make the receiver allocate (compressed-blob arenas
        plus decoded stacks, all channels, ``stacks * stack_size`` frames); a series announcing more is
        rejected as :class:`beamloop.streams.errors.OversizedMessage` before anything is allocated. Default 2 GiB:
        e.g. 256 frames of 1024x1024 uint32 pixels; lower ``stack_size`` for larger frames.
    rcvhwm : int, optional
        ZeroMQ receive high-water mark in messages (default 1000 lossless, 4 latest).
    context : zmq.Context, optional

    Raises
    ------
    ValueError
        Unknown protocol or mode, ``stacks`` < 2, ``stack_size`` < 1 or ``max_ring_bytes`` < 1.
    zmq.ZMQError
        The endpoint cannot be connected or bound.
    """

    def __init__(self, endpoint: str, *, protocol: str = "simplon1", bind: bool = False, mode: str = "lossless",
                 stack_size: int = 64, stacks: int = 4, decode: bool = True, verify_hash: bool = False,
                 max_header_bytes: int = 1 << 16, max_ring_bytes: int = 2 << 30, rcvhwm: int | None = None,
                 context: zmq.Context | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if stacks < 2 or stack_size < 1:
            raise ValueError(f"need stacks >= 2 and stack_size >= 1, got {stacks}, {stack_size}")
        if max_ring_bytes < 1:
            raise ValueError(f"max_ring_bytes must be positive, got {max_ring_bytes}")
        self.max_ring_bytes = int(max_ring_bytes)
        from beamloop.streams.dectris import simplon
        from beamloop.streams.dectris import stream_v2

        adapters = {"simplon1": simplon.SimplonAdapter, "stream2": stream_v2.Stream2Adapter}
        if protocol not in adapters:
            raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(adapters)}")
        self.protocol = protocol
        self.mode = mode
        self.stack_size = 2 if mode == "latest" else int(stack_size)
        self.nstacks = int(stacks)
        self.decode = bool(decode)
        self.counters = StreamCounters()
        self.series: DetectorSeries | None = None
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm if rcvhwm is not None else (1000 if mode == "lossless" else 4))
        self._sock.setsockopt(zmq.LINGER, 0)
        if bind:
            self._sock.bind(endpoint)
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._sock.connect(endpoint)
            self.endpoint = endpoint
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._adapter = adapters[protocol](self, max_header_bytes=max_header_bytes, verify_hash=verify_hash)
        self._ring: _Ring | None = None
        self._pending: collections.deque = collections.deque()
        self._next_id = 0
        self._series_frames = 0
        self._stack_recv_ns = 0

    # lifecycle ---------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the socket (messages still queued are dropped)."""
        if not self._sock.closed:
            self._sock.close(linger=0)

    def __enter__(self) -> "DetectorReceiver":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def socket(self) -> zmq.Socket:
        """The PULL socket (for adapters and pollers)."""
        return self._sock

    # receiving ---------------------------------------------------------------------------------------------
    def recv(self, timeout_ms: int | None = None) -> SeriesStart | FrameStack | SeriesEnd | None:
        """Receive the next event.

        Parameters
        ----------
        timeout_ms : int or None
            Wait at most this long for the first message; ``None`` waits for ever.

        Returns
        -------
        SeriesStart, FrameStack, SeriesEnd, or None when the timeout passed with nothing received.

        Raises
        ------
        ProtocolError
            A message was rejected (malformed, truncated, oversized, unexpected, mismatched): it is counted
            in :attr:`counters` and its remaining parts discarded; frames already collected stay in the
            stack being filled and are delivered by a later call, so nothing else is lost.
        """
        if self._pending:
            return self._pending.popleft()
        latest = self.mode == "latest"
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        flags = 0
        drained = 0
        read = self._adapter.read
        fast = getattr(self._adapter, "fast_read", None) if not latest else None
        while True:
            ring = self._ring
            if ring is not None and ring.fill:
                if ring.fill == ring.size and not latest:
                    if self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        self.counters.saturated += 1
                    return self._finish_stack()
                if latest and drained >= _MAX_DRAIN:
                    return self._finish_stack()
                flags = zmq.NOBLOCK
            if not flags:  # nothing collected yet: wait for the first message
                if deadline is None:
                    wait = None
                else:
                    wait = max(0, int((deadline - time.monotonic()) * 1000))
                if not self._poller.poll(wait):
                    return None
                flags = zmq.NOBLOCK
            drained += 1
            try:
                code = None
                if fast is not None and ring is not None and self.series is not None:
                    code = fast(ring)  # many images at once, compiled (beamloop.streams.dectris.zmqfast)
                    if code == _FULL:
                        continue
                    if code == _EMPTY:
                        raise zmq.Again()
                event = read(flags)  # one message, or the rest of the one the compiled loop stopped at
            except zmq.Again:  # nothing more waiting: deliver what has been collected
                if ring is not None and ring.fill:
                    return self._finish_stack()
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                flags = 0  # e.g. a header whose next part comes as its own message: wait on
                continue
            except ProtocolError as exc:
                self.counters.messages += 1
                self._adapter.discard_rest()
                self.counters.count_error(exc)
                raise
            self.counters.messages += 1
            if event is None:  # an image went into the stack, or a part of a header arrived
                continue
            ring = self._ring
            if ring is not None and ring.fill:  # frames before this event go first
                self._pending.append(event)
                return self._finish_stack()
            if self._pending:  # e.g. the last stack of the previous series, finished by _begin_series
                self._pending.append(event)
                return self._pending.popleft()
            return event

    # called by adapters ------------------------------------------------------------------------------------
    def _begin_series(self, series: DetectorSeries) -> SeriesStart:
        need = _Ring.nbytes(series, self.stack_size, self.nstacks, self.decode)
        if need > self.max_ring_bytes:
            raise OversizedMessage(
                f"series {series.series_id} announces {len(series.channels)} channel(s) of {series.shape[0]}x"
                f"{series.shape[1]} {np.dtype(series.dtype)} frames: {need} bytes for {self.nstacks} stacks of "
                f"{self.stack_size}, over the {self.max_ring_bytes}-byte bound (max_ring_bytes)")
        if self.series is not None:
            self.counters.count_error(UnexpectedMessage(
                f"series {series.series_id} started while series {self.series.series_id} was open"))
        ring = self._ring
        if ring is not None and ring.fill:  # frames of the previous series leave under its name, first
            self._pending.append(self._finish_stack())
        if ring is None or not ring.matches(series, self.stack_size, self.nstacks, self.decode):
            self._ring = _Ring(series, self.stack_size, self.nstacks, self.decode)
        else:
            self._ring.series = series
        self.series = series
        self._next_id = 0
        self._series_frames = 0
        self.counters.series_started += 1
        return SeriesStart(series, time.monotonic_ns())

    def _end_series(self, series_id: int) -> SeriesEnd:
        series = self.series
        if series is None or series.series_id != series_id:
            raise UnexpectedMessage(f"end of series {series_id} that is not open")
        missing = max(series.number_of_images - self._next_id, 0) if series.number_of_images else 0
        if missing:
            self.counters.gaps += 1
            self.counters.missing_frames += missing
            log.warning("series %s ended with %d announced frames missing", series.series_id, missing)
        self.counters.series_ended += 1
        self.series = None
        return SeriesEnd(series, self._series_frames, missing, time.monotonic_ns())

    def _check_image(self, image_id: int, series_id: int) -> _Ring:
        """The ring to receive image ``image_id`` into; raises when no series is open or it is foreign."""
        if self.series is None:
            raise UnexpectedMessage(f"image {image_id} arrived with no open series (no header message)")
        if series_id != self.series.series_id:
            raise UnexpectedMessage(f"image {image_id} belongs to series {series_id}, "
                                    f"not the open series {self.series.series_id}")
        return self._ring

    def _commit_image(self, ring: _Ring, image_id: int, start_ns: int, stop_ns: int, real_ns: int) -> None:
        """Account for an image whose blobs are in the current slot, and advance the slot."""
        gap = image_id - self._next_id
        if gap > 0:
            self.counters.gaps += 1
            self.counters.missing_frames += gap
            log.warning("frame ids jumped from %d to %d: %d frames lost upstream (detector outran us?)",
                        self._next_id - 1, image_id, gap)
        elif gap < 0:
            self.counters.reordered += 1
        if image_id >= self._next_id:
            self._next_id = image_id + 1
        self._series_frames += 1
        self.counters.frames += 1
        if ring.fill == 0:
            self._stack_recv_ns = time.monotonic_ns()
        s, w = ring.stack, ring.wslot
        ring.image_ids[s, w] = image_id
        t = ring.times[s, w]
        t[0] = start_ns
        t[1] = stop_ns
        t[2] = real_ns
        if self.mode == "latest":
            if ring.fill:  # the frame held so far is stale now
                self.counters.dropped += 1
            ring.held = w
            ring.wslot = w ^ 1
            ring.fill = 1
        else:
            ring.fill = w + 1
            ring.wslot = w + 1

    def _finish_stack(self) -> FrameStack:
        ring = self._ring
        s = ring.stack
        sl = slice(ring.held, ring.held + 1) if self.mode == "latest" else slice(0, ring.fill)
        n = sl.stop - sl.start
        ids, times = ring.image_ids[s, sl], ring.times[s, sl]
        offs = ring.offsets[s, sl]
        lens = {ch: ring.lengths[ch][s, sl] for ch in ring.series.channels}
        frames = {ch: (ring.frames[ch][s, sl] if ring.frames is not None else None) for ch in ring.series.channels}
        if ring.frames is not None:
            bad = np.zeros(n, bool)
            for ch in ring.series.channels:
                if codecs.decode_stack(ring.arenas[ch], offs, lens[ch], ring.codecs[ch], frames[ch], ring.status):
                    bad |= self._count_decode_errors(ring.status[:n], ids, ch)
            if bad.any():  # keep the good frames, in order, at the front of the stack
                keep = np.flatnonzero(~bad)
                n = len(keep)
                for arr in (ids, times, offs, *lens.values(), *frames.values()):
                    arr[:n] = arr[keep]
                ids, times, offs = ids[:n], times[:n], offs[:n]
                lens = {ch: v[:n] for ch, v in lens.items()}
                frames = {ch: v[:n] for ch, v in frames.items()}
            self.counters.decoded += n
        chans = {ch: ChannelStack(frames[ch], ring.arenas[ch], offs, lens[ch], ring.codecs[ch])
                 for ch in ring.series.channels}
        stack = FrameStack(ring.series, ids, times, chans, self._stack_recv_ns, time.monotonic_ns())
        ring.stack = (s + 1) % ring.nstacks
        ring.fill = ring.wslot = ring.held = 0
        return stack

    def _count_decode_errors(self, status: np.ndarray, ids: np.ndarray, ch: str) -> np.ndarray:
        bad = status != 0
        for i in np.flatnonzero(bad):
            exc = codecs.status_error(status[i], f"frame {ids[i]} channel {ch!r}:")
            self.counters.count_error(exc)
            self.counters.frames -= 1
            log.warning("%s", exc)
        return bad


def rational_ns(value: Any, what: str) -> int:
    """Nanoseconds of a Stream V2 rational ``[numerator, denominator]`` (seconds).

    Raises ``MalformedMessage`` for anything but two non-negative integers with a positive denominator.
    """
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) or value[1] == 0):
        raise MalformedMessage(f"{what} must be a rational [numerator, denominator > 0], got {value!r}")
    return value[0] * NS // value[1]


def check_oversize(n: int, capacity: int, what: str) -> None:
    """Raise ``OversizedMessage`` when a part of ``n`` bytes exceeded its ``capacity``-byte buffer."""
    if n > capacity:
        raise OversizedMessage(f"{what} of {n} bytes exceeds the {capacity}-byte bound")
