"""Receiving pixelated-detector streams (DECTRIS SIMPLON v1, Stream V2) into preallocated frame stacks.

A detector sends one message per frame, up to ~120k per second (DECTRIS ARINA). Python can afford a few
microseconds per frame, not more, so :class:`DetectorReceiver` keeps the per-frame work down to reading
the message parts and validating their headers: every compressed blob is read straight into a slot of a
preallocated arena (``zmq.Socket.recv_into``, no allocation), and whole stacks of frames are decompressed
by one numba call into a preallocated ``(stack, rows, cols)`` array
(:func:`beamloop.streams.dectris.codecs.decode_stack`).
Consumers (virtual detectors, the recorder, the edge service) get a :class:`FrameStack` per batch.

Message layouts live in :mod:`beamloop.streams.dectris.simplon` and :mod:`beamloop.streams.dectris.stream_v2`;
each provides a *protocol adapter* (registered in :data:`beamloop.streams.dectris.PROTOCOLS`) that reads one
message from the socket and writes what it carries through the receiver's public
:class:`beamloop.streams.dectris.sink.RingSink` interface, which :class:`DetectorReceiver` implements.

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

import numpy as np
import zmq

from beamloop.streams._ids import MAX_ID, FrameIdTracker
from beamloop.streams._series import check_ring_bound, note_unended
from beamloop.streams._socket import SocketOwner, open_pull
from beamloop.streams.counters import StreamCounters
from beamloop.streams.dectris import codecs, get_adapter
from beamloop.streams.dectris.series import ChannelStack, DetectorSeries, FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.dectris.sink import FreeSlots
from beamloop.streams.errors import FrameMismatch, MalformedMessage, ProtocolError, UnexpectedMessage

log = logging.getLogger(__name__)

MODES = ("lossless", "latest")
"""Flow-control modes of :class:`DetectorReceiver`."""

_FULL, _EMPTY = 0, 1  # beamloop.streams.dectris.zmqfast return codes
_MAX_DRAIN = 10_000  # latest mode: messages read per recv() at most before the newest is delivered


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
        """Whether this ring's buffers fit ``series`` as they are (same channels, shape, dtype and layout)."""
        return (self.series.channels == series.channels and self.series.shape == series.shape
                and np.dtype(self.series.dtype) == np.dtype(series.dtype) and self.size == size
                and self.nstacks == nstacks and (self.frames is not None) == decode)

    def slot_view(self, channel: str) -> memoryview:
        """The arena slot the next image of ``channel`` is read into."""
        return self.views[channel][self.stack * self.size + self.wslot]


class DetectorReceiver(SocketOwner):
    """A PULL socket receiving a DECTRIS detector stream into preallocated frame stacks.

    It implements :class:`beamloop.streams.dectris.sink.RingSink`, the interface its protocol adapter
    writes series and images through.

    Parameters
    ----------
    endpoint : str
        ZeroMQ endpoint of the detector (it binds: DCU port 9999 for SIMPLON v1, 31001 for Stream V2).
    protocol : str
        A protocol registered in :data:`beamloop.streams.dectris.PROTOCOLS` (``"simplon1"``, ``"stream2"``).
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
        The endpoint cannot be connected or bound (the message names it).
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
        adapter = get_adapter(protocol)
        self.max_ring_bytes = int(max_ring_bytes)
        self.protocol = protocol
        self.mode = mode
        self.stack_size = 2 if mode == "latest" else int(stack_size)
        self.nstacks = int(stacks)
        self.decode = bool(decode)
        self.counters = StreamCounters()
        self._series: DetectorSeries | None = None
        sock, ep = open_pull(endpoint, bind=bind, rcvhwm=rcvhwm if rcvhwm is not None else
                             (1000 if mode == "lossless" else 4), context=context)
        SocketOwner.__init__(self, sock, ep)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._ring: _Ring | None = None
        self._pending: collections.deque = collections.deque()
        self._ids = FrameIdTracker(self.counters)
        self._stack_recv_ns = 0
        self._adapter = adapter(sock, self, max_header_bytes=max_header_bytes, verify_hash=verify_hash)

    @property
    def series(self) -> DetectorSeries | None:
        """The open series; None between series."""
        return self._series

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
        sock = self._sock
        while True:
            ring = self._ring
            if ring is not None and ring.fill:
                if ring.fill == ring.size and not latest:
                    if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
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
                if fast is not None and ring is not None and self._series is not None:
                    code = fast()  # many images at once, compiled (beamloop.streams.dectris.zmqfast)
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
            if self._pending:  # e.g. the last stack of the previous series, finished by begin_series
                self._pending.append(event)
                return self._pending.popleft()
            return event

    # the RingSink interface (beamloop.streams.dectris.sink), for the protocol adapter -----------------------
    @property
    def slot_nbytes(self) -> int:
        """Bytes of one channel's slot in the ring (the blob bound); 0 before the first series."""
        return self._ring.capacity if self._ring is not None else 0

    def begin_series(self, series: DetectorSeries) -> SeriesStart:
        """Open ``series``: :meth:`beamloop.streams.dectris.sink.RingSink.begin_series`."""
        check_ring_bound(series, _Ring.nbytes(series, self.stack_size, self.nstacks, self.decode),
                         self.max_ring_bytes, f"{self.nstacks} stacks of {self.stack_size}")
        note_unended(self.counters, self._series, series)
        ring = self._ring
        if ring is not None and ring.fill:  # frames of the previous series leave under its name, first
            self._pending.append(self._finish_stack())
        if ring is None or not ring.matches(series, self.stack_size, self.nstacks, self.decode):
            self._ring = _Ring(series, self.stack_size, self.nstacks, self.decode)
        else:
            self._ring.series = series
        self._series = series
        self._ids.start()
        self.counters.series_started += 1
        return SeriesStart(series, time.monotonic_ns())

    def end_series(self, series_id: int) -> SeriesEnd:
        """Close the open series: :meth:`beamloop.streams.dectris.sink.RingSink.end_series`."""
        series = self._series
        if series is None or series.series_id != series_id:
            raise UnexpectedMessage(f"end of series {series_id} that is not open")
        missing = self._ids.end(series.number_of_images)
        if missing:
            log.warning("series %s ended with %d announced frames missing", series.series_id, missing)
        self.counters.series_ended += 1
        self._series = None
        return SeriesEnd(series, self._ids.frames, missing, time.monotonic_ns())

    def check_image(self, image_id: int, series_id: object) -> DetectorSeries:
        """The open series, which image ``image_id`` must match:
        :meth:`beamloop.streams.dectris.sink.RingSink.check_image`."""
        if image_id > MAX_ID:
            raise MalformedMessage(f"image id {image_id} is beyond the int64 range")
        series = self._series
        if series is None:
            raise UnexpectedMessage(f"image {image_id} arrived with no open series (no header message)")
        if series_id != series.series_id:
            raise UnexpectedMessage(f"image {image_id} belongs to series {series_id}, "
                                    f"not the open series {series.series_id}")
        return series

    def set_codec(self, channel: str, codec: codecs.Codec, what: str) -> None:
        """Record the codec of ``channel``'s blob: :meth:`beamloop.streams.dectris.sink.RingSink.set_codec`."""
        ring = self._ring
        held = ring.codecs.get(channel)
        if ring.fill and held is not None and held != codec:
            raise FrameMismatch(f"{what} differs from the frames before it")
        ring.codecs[channel] = codec

    def slot_view(self, channel: str) -> memoryview:
        """The current slot of ``channel``: :meth:`beamloop.streams.dectris.sink.RingSink.slot_view`."""
        return self._ring.slot_view(channel)

    def set_blob_nbytes(self, channel: str, nbytes: int) -> None:
        """The length of ``channel``'s blob: :meth:`beamloop.streams.dectris.sink.RingSink.set_blob_nbytes`."""
        ring = self._ring
        ring.lengths[channel][ring.stack, ring.wslot] = nbytes

    def commit_image(self, image_id: int, start_ns: int, stop_ns: int, real_ns: int) -> None:
        """Account for the image in the current slot and advance the slot (in latest mode, the newest image
        replaces the one held): :meth:`beamloop.streams.dectris.sink.RingSink.commit_image`."""
        gap = self._ids.see(image_id)
        if gap:
            log.warning("frame ids jumped to %d: %d frames lost upstream (detector outran us?)", image_id, gap)
        self.counters.frames += 1
        ring = self._ring
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

    def free_slots(self, channel: str) -> FreeSlots:
        """The free slots of the stack being filled: :meth:`beamloop.streams.dectris.sink.RingSink.free_slots`."""
        ring = self._ring
        s, a = ring.stack, ring.fill
        if a == 0:
            self._stack_recv_ns = time.monotonic_ns()
        return FreeSlots(ring.arenas[channel], ring.capacity, s * ring.size + a, ring.size - a,
                         ring.lengths[channel][s, a:], ring.image_ids[s, a:], ring.times[s, a:],
                         self._ids.next_id, self._series.series_id)

    def commit_run(self, n: int) -> None:
        """Commit ``n`` images of the last :meth:`free_slots`:
        :meth:`beamloop.streams.dectris.sink.RingSink.commit_run`."""
        ring = self._ring
        ring.fill = ring.wslot = ring.fill + n
        self._ids.advance(n)
        self.counters.frames += n

    # delivering --------------------------------------------------------------------------------------------
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
                for arr in (ids, times, *lens.values(), *frames.values()):
                    arr[:n] = arr[keep]
                # the slot offsets are the ring's fixed layout: never compact them in place (a copy, errors only)
                ids, times, offs = ids[:n], times[:n], offs[keep]
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
