"""Receiving a Quantum Detectors Merlin data stream (MIB over TCP) into preallocated frame stacks.

A Merlin listens on its data port (TCP 6342) and sends, per acquisition, an acquisition header and then every
frame as one ``MPX,<length>,`` message (:mod:`beamloop.streams.merlin.mib`; Quantum Detectors' Merlin EM
manual). :class:`MerlinReceiver` connects to it (or, with ``bind``, accepts one connection at a time) and
delivers what :class:`beamloop.streams.dectris.receiver.DetectorReceiver` delivers for DECTRIS streams:
:class:`~beamloop.streams.dectris.series.SeriesStart`, :class:`~beamloop.streams.dectris.series.FrameStack`
batches (one channel, ``counter_0`` or ``counter_1`` after the Medipix counter the frames come from; the
frames always unpacked, the blobs are the unpacked little-endian pixels, codec ``none``), and
:class:`~beamloop.streams.dectris.series.SeriesEnd`, with the same counters, flow-control modes and bounds.

The series of an acquisition starts at its first frame (the frame header tells shape and pixel type); it ends
when its ``Frames in Acquisition (Number)`` frames have come, when the next acquisition header arrives, or
when the connection closes (announced frames never received are counted as missing). Frame ids are the
frame headers' sequence numbers minus one.

Per frame, Python reads the 15-byte prefix and the frame header out of a fixed receive buffer (a frame of the
same shape and type as the previous one is recognised by comparing its fixed fields, without parsing) and
copies, or receives, the pixels straight into the frame's slot of a preallocated arena; a whole stack is
unpacked by numpy at once (:func:`beamloop.streams.merlin.mib.decode_frames`).

Bad input: a prefix that is not ``MPX,<10 digits>,`` is counted as malformed and the receiver resynchronises
on the next ``MPX,`` in the stream; a message over ``max_message_bytes`` is counted as oversized and skipped
the same way, unread; a frame whose header or size is wrong, or that does not match its series, is counted and
its declared bytes skipped; a message that stops for ``message_timeout_s`` or at a closed connection is
counted as truncated. The receive buffer, the arenas and the frame stacks are the only allocations, each
bounded (``max_header_bytes``, ``max_message_bytes``, ``max_ring_bytes``).
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import time
import uuid
import warnings

import numpy as np

from beamloop.streams._ids import FrameIdTracker
from beamloop.streams._series import check_ring_bound, note_unended
from beamloop.streams.counters import StreamCounters
from beamloop.streams.dectris import codecs
from beamloop.streams.dectris.series import ChannelStack, DetectorSeries, FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.errors import (
    FrameMismatch,
    MalformedMessage,
    OversizedMessage,
    ProtocolError,
    TruncatedMessage,
    UnexpectedMessage,
)
from beamloop.streams.merlin import mib

log = logging.getLogger(__name__)

PROTOCOL = "merlin"
"""Protocol name (``beamloop receive --protocol merlin``; the ``protocol`` of the series)."""

MODES = ("lossless", "latest")
_MAX_DRAIN = 10_000
_MARK = b"MPX,"


class _Closed(Exception):
    """The peer closed the connection."""


class _NoData(Exception):
    """Nothing arrived within the wait."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT``, ``HOST:PORT`` or ``:PORT`` as (host, port); ``*`` is every interface.

    Raises
    ------
    ValueError
        Not of that form, or a port outside 0..65535.
    """
    text = endpoint[6:] if endpoint.startswith("tcp://") else endpoint
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"Merlin endpoint {endpoint!r} is not tcp://HOST:PORT")
    host = host.strip("[]")
    return ("0.0.0.0" if host in ("*", "") else host), int(port)


class _Ring:
    """``nstacks`` stacks of ``size`` frames: the received pixel bytes and the unpacked frames."""

    def __init__(self, series: DetectorSeries, hdr: mib.FrameHeader, size: int, nstacks: int) -> None:
        self.series = series
        self.hdr = hdr
        self.size, self.nstacks = size, nstacks
        self.nb = hdr.data_nbytes
        self.arena = np.empty(nstacks * size * self.nb, np.uint8)
        self.frames = np.zeros((nstacks, size, *series.shape), series.dtype)
        self.image_ids = np.zeros((nstacks, size), np.int64)
        self.times = np.zeros((nstacks, size, 3), np.int64)
        self.stack = self.fill = self.wslot = self.held = 0

    @staticmethod
    def nbytes(series: DetectorSeries, hdr: mib.FrameHeader, size: int, nstacks: int) -> int:
        return size * nstacks * (hdr.data_nbytes + series.frame_nbytes)

    def matches(self, hdr: mib.FrameHeader, size: int, nstacks: int) -> bool:
        h = self.hdr
        return ((h.width, h.height, h.pixel_type, h.counter_depth) == (hdr.width, hdr.height, hdr.pixel_type,
                                                                     hdr.counter_depth)
                and self.size == size and self.nstacks == nstacks)

    def slot(self, k: int) -> memoryview:
        o = (self.stack * self.size + k) * self.nb
        return memoryview(self.arena)[o:o + self.nb]


class MerlinReceiver:
    """A TCP connection to a Merlin's data port, received into preallocated frame stacks.

    Parameters
    ----------
    endpoint : str
        ``tcp://HOST:PORT`` of the Merlin's data port (6342), or with ``bind`` the address to listen on
        (``tcp://127.0.0.1:0``: a free port, see :attr:`endpoint`).
    bind : bool
        Listen and accept one connection at a time (for senders that connect) instead of connecting.
    mode : {"lossless", "latest"}
        Flow control, as :class:`beamloop.streams.dectris.receiver.DetectorReceiver`'s: lossless delivers
        every frame (TCP back-pressure slows the detector when we fall behind); latest drains what has arrived
        and delivers only the newest frame (the others counted as ``dropped`` and never unpacked).
    stack_size : int
        Frames per :class:`FrameStack` (lossless); a stack is delivered when full or when nothing more waits.
    stacks : int
        Stacks in the ring (>= 2): a delivered stack stays valid while ``stacks - 1`` more are filled.
    decode : bool
        Accepted for the interface of ``DetectorReceiver``; MIB pixels are always unpacked (raw-mode words
        cannot be recorded as they are).
    max_header_bytes : int
        Bound on an acquisition header and on a frame header, bytes.
    max_message_bytes : int
        Bound on one message (header plus pixels), bytes (default 64 MiB: a 2048x2048 frame of 32-bit pixels
        is 16 MiB).
    max_ring_bytes : int
        Bound on the memory a series may make the receiver allocate (pixel arenas plus unpacked stacks).
    message_timeout_s : float
        How long a message that has begun may stall before it is counted as truncated.
    recv_buffer_bytes : int
        Size of the receive buffer (at least ``max_header_bytes + 15``).

    Attributes
    ----------
    counters : StreamCounters
    connections : int
        Data connections made (or accepted) so far; the receiver reconnects when the detector closes one.
    endpoint : str
        The endpoint connected to, or bound (with the port the system chose for port 0).

    Raises
    ------
    ValueError
        Bad endpoint, mode, ``stacks`` < 2, ``stack_size`` < 1, or bounds that do not fit.
    OSError
        With ``bind``: the address cannot be bound (the message names it).
    """

    def __init__(self, endpoint: str, *, bind: bool = False, mode: str = "lossless", stack_size: int = 64,
                 stacks: int = 4, decode: bool = True, max_header_bytes: int = 1 << 16,
                 max_message_bytes: int = 64 << 20, max_ring_bytes: int = 2 << 30, message_timeout_s: float = 5.0,
                 recv_buffer_bytes: int = 4 << 20, protocol: str = PROTOCOL, verify_hash: bool = False,
                 rcvhwm: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if stacks < 2 or stack_size < 1:
            raise ValueError(f"need stacks >= 2 and stack_size >= 1, got {stacks}, {stack_size}")
        if recv_buffer_bytes < max_header_bytes + mib.PREFIX_BYTES or max_message_bytes < 1 or max_ring_bytes < 1:
            raise ValueError("need recv_buffer_bytes >= max_header_bytes + 15 and positive bounds")
        self.protocol = PROTOCOL
        self.mode = mode
        self.stack_size = 2 if mode == "latest" else int(stack_size)
        self.nstacks = int(stacks)
        self.decode = True
        self.max_header_bytes = int(max_header_bytes)
        self.max_message_bytes = int(max_message_bytes)
        self.max_ring_bytes = int(max_ring_bytes)
        self.message_timeout_s = float(message_timeout_s)
        self.counters = StreamCounters()
        self.connections = 0
        self._host, self._port = parse_endpoint(endpoint)
        self._bind = bool(bind)
        self._listener: socket.socket | None = None
        self._sock: socket.socket | None = None
        self._closed = True  # until set up: a receiver that failed to bind warns of nothing
        if self._bind:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                ls.bind((self._host, self._port))
            except OSError as exc:
                ls.close()
                raise OSError(exc.errno, f"cannot bind {endpoint!r}: {exc.strerror}") from None
            ls.listen(1)
            self._listener = ls
            self._port = ls.getsockname()[1]
        self.endpoint = f"tcp://{self._host}:{self._port}"
        self._buf = bytearray(int(recv_buffer_bytes))
        self._view = memoryview(self._buf)
        self._lo = self._hi = 0
        self._synced = True
        self._acq: dict | None = None  # the acquisition header waiting for its first frame
        self._acq_count = 0
        self._series: DetectorSeries | None = None
        self._first: mib.FrameHeader | None = None
        self._template: list[bytes] = []
        self._counter = b""
        self._ring: _Ring | None = None
        self._pending: collections.deque = collections.deque()
        self._ids = FrameIdTracker(self.counters)
        self._stack_recv_ns = 0
        self._scratch = bytearray(1 << 16)
        self._closed = False

    # lifecycle ---------------------------------------------------------------------------------------------
    @property
    def series(self) -> DetectorSeries | None:
        """The open series; None between series."""
        return self._series

    @property
    def connected(self) -> bool:
        """Whether a data connection is open."""
        return self._sock is not None

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self, linger_ms: int | None = None) -> None:
        """Close the connection (and the listening socket); idempotent. ``linger_ms`` is ignored (nothing is sent)."""
        self._drop_connection()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._closed = True

    def __enter__(self) -> MerlinReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if self.__dict__.get("_closed", True):
            return
        try:
            warnings.warn(f"unclosed {type(self).__name__} on {self.__dict__.get('endpoint')}", ResourceWarning,
                          stacklevel=2, source=self)
        except Exception:  # noqa: BLE001 - the warnings machinery may be gone at interpreter exit
            pass
        self.close()

    def _drop_connection(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._lo = self._hi = 0
        self._synced = True

    def _connect(self, wait_s: float) -> bool:
        """Open the data connection, waiting at most ``wait_s``; False when none could be made."""
        if self._closed:
            raise RuntimeError("receiver is closed")
        if self._listener is not None:
            r, _, _ = select.select([self._listener], [], [], max(wait_s, 0))
            if not r:
                return False
            sock, _ = self._listener.accept()
        else:
            try:
                sock = socket.create_connection((self._host, self._port), timeout=max(wait_s, 0.05))
            except OSError:
                time.sleep(min(max(wait_s, 0), 0.05))
                return False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        except OSError:
            pass
        self._sock = sock
        self._lo = self._hi = 0
        self._synced = True
        self.connections += 1
        return True

    # the receive buffer -------------------------------------------------------------------------------------
    def _recv_some(self, wait_s: float | None, want: int | None = None) -> None:
        """Receive into the buffer's free tail (at most ``want`` bytes), waiting at most ``wait_s`` (None: the
        message timeout)."""
        if self._lo == self._hi:
            self._lo = self._hi = 0
        elif self._hi == len(self._buf):
            n = self._hi - self._lo
            self._buf[:n] = self._view[self._lo:self._hi]
            self._lo, self._hi = 0, n
        self._sock.settimeout(self.message_timeout_s if wait_s is None else max(wait_s, 0.0))
        try:
            end = len(self._buf) if want is None else min(len(self._buf), self._hi + want)
            got = self._sock.recv_into(self._view[self._hi:end])
        except (TimeoutError, BlockingIOError):
            raise _NoData() from None
        except OSError:
            raise _Closed() from None
        if got == 0:
            raise _Closed()
        self._hi += got
        self.counters.bytes += got

    def _need(self, n: int, wait_s: float | None = None) -> memoryview:
        """The next ``n`` buffered bytes (not consumed), receiving more as needed."""
        while self._hi - self._lo < n:
            if self._lo + n > len(self._buf):
                m = self._hi - self._lo
                self._buf[:m] = self._view[self._lo:self._hi]
                self._lo, self._hi = 0, m
            self._recv_some(wait_s, n - (self._hi - self._lo))
            wait_s = None
        return self._view[self._lo:self._lo + n]

    def _waiting(self) -> bool:
        """Whether bytes are buffered or waiting on the socket."""
        if self._hi > self._lo:
            return True
        if self._sock is None:
            return False
        if self._lo == self._hi:
            self._lo = self._hi = 0
        first = self._first
        want = len(self._buf) - self._hi if first is None else mib.PREFIX_BYTES + first.header_nbytes
        try:  # a non-blocking read of the next prefix and header answers the question and saves a later call
            got = self._sock.recv_into(self._view[self._hi:self._hi + want], 0, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # the read that follows finds the connection closed
        if got:
            self._hi += got
            self.counters.bytes += got
        return True  # data, or the end of the stream

    def _read_into(self, dst: memoryview) -> None:
        """Fill ``dst`` from the buffer, then straight from the socket."""
        n = len(dst)
        k = min(n, self._hi - self._lo)
        assert k >= 0, "receive buffer consumed past its end"
        dst[:k] = self._view[self._lo:self._lo + k]
        self._lo += k
        sock = self._sock
        sock.settimeout(self.message_timeout_s)
        while k < n:
            try:
                got = sock.recv_into(dst[k:])
            except TimeoutError:
                raise TruncatedMessage(f"frame pixels stopped after {k} of {n} bytes "
                                       f"(nothing for {self.message_timeout_s} s)") from None
            except OSError:
                got = 0
            if got == 0:
                raise TruncatedMessage(f"connection closed after {k} of {n} bytes of frame pixels")
            k += got
            self.counters.bytes += got

    def _skip(self, n: int) -> None:
        """Consume ``n`` bytes (a rejected message's rest)."""
        k = min(n, self._hi - self._lo)
        self._lo += k
        n -= k
        while n > 0:
            m = min(n, len(self._scratch))
            self._read_into(memoryview(self._scratch)[:m])
            n -= m

    def _resync(self, wait_s: float | None) -> None:
        """Discard bytes up to the next ``MPX,``."""
        while True:
            at = self._buf.find(_MARK, self._lo, self._hi)
            if at >= 0:
                self._lo = at
                self._synced = True
                return
            self._lo = max(self._lo, self._hi - (len(_MARK) - 1))
            self._recv_some(wait_s)
            wait_s = None

    # messages -----------------------------------------------------------------------------------------------
    def _read_message(self, wait_s: float) -> SeriesStart | SeriesEnd | None:
        """Read one message, waiting at most ``wait_s`` for its first bytes; raises _NoData, _Closed,
        ProtocolError. Returns the series event it caused, or None."""
        if not self._synced:
            self._resync(wait_s)
            wait_s = None
        if self._hi == self._lo:
            # in a series, read one frame's prefix and header: its pixels then go straight into their slot
            first = self._first
            self._recv_some(wait_s, None if first is None else mib.PREFIX_BYTES + first.header_nbytes)
        try:
            prefix = self._need(mib.PREFIX_BYTES)
        except _NoData:
            raise TruncatedMessage(f"message prefix stopped after {self._hi - self._lo} bytes") from None
        try:
            n = mib.parse_prefix(prefix)
        except MalformedMessage:
            self._lo += 1
            self._synced = False
            raise
        self.counters.messages += 1
        if n + mib.PREFIX_BYTES > self.max_message_bytes:
            self._lo += 1
            self._synced = False
            raise OversizedMessage(f"message of {n} bytes exceeds the {self.max_message_bytes}-byte bound "
                                   "(max_message_bytes)")
        self._lo += mib.PREFIX_BYTES
        try:
            head = self._need(min(n, 4))
            kind = bytes(head)
            if kind == b"MQ1,":
                return self._frame(n)
            if kind == b"HDR,":
                return self._acquisition(n)
            self._skip(n)
            raise MalformedMessage(f"message of {n} bytes starts {kind!r}, neither 'HDR,' nor 'MQ1,'")
        except _NoData:
            self._synced = False
            raise TruncatedMessage(f"message of {n} bytes stopped (nothing for {self.message_timeout_s} s)") from None

    def _acquisition(self, n: int) -> SeriesEnd | None:
        if n > self.max_header_bytes:
            self._skip(n)
            raise OversizedMessage(f"acquisition header of {n} bytes exceeds the {self.max_header_bytes}-byte "
                                   "bound (max_header_bytes)")
        payload = bytes(self._need(n))
        self._lo += n
        fields = mib.parse_acquisition_header(payload)
        event = self._end(missing_ok=True) if self._series is not None else None
        self._acq = fields
        self._acq_count += 1
        return event

    def _frame(self, n: int) -> SeriesStart | SeriesEnd | None:
        first = self._first
        if first is not None and n == first.header_nbytes + first.data_nbytes:
            head = self._need(first.header_nbytes)  # the whole header is buffered before it is consumed
            parts = bytes(head[:160]).split(b",", 12)  # the fields before the thresholds
            if len(parts) == 13 and parts[2:9] == self._template and parts[11] == self._counter and \
                    parts[1].isdigit():
                self._lo += first.header_nbytes
                return self._pixels(int(parts[1]), first)
        hsize = min(n, self.max_header_bytes)
        try:
            raw = bytes(self._need(hsize))
            depth = self._acq_depth()
            hdr = mib.parse_frame_header(raw, default_depth=depth)
        except ProtocolError:
            self._skip(n)
            raise
        if hdr.header_nbytes + hdr.data_nbytes != n:
            self._skip(n)
            raise FrameMismatch(f"frame {hdr.sequence}: {hdr.header_nbytes}-byte header and "
                                f"{hdr.height}x{hdr.width} {hdr.pixel_type} {hdr.counter_depth}-bit pixels "
                                f"({hdr.data_nbytes} bytes) but the message holds {n} bytes")
        event = None
        if self._series is None:
            if self._acq is None:
                self._skip(n)
                raise UnexpectedMessage(f"frame {hdr.sequence} arrived with no acquisition header before it")
            try:
                event = self._begin(hdr)
            except ProtocolError:
                self._skip(n)
                raise
        else:
            try:
                mib.check_same(hdr, first)
            except FrameMismatch:
                self._skip(n)
                raise
        self._lo += hdr.header_nbytes
        try:
            end = self._pixels(hdr.sequence, hdr)
        except ProtocolError:
            if event is not None:  # the series started: say so before the error
                self._pending.append(event)
            raise
        if event is not None:
            self._template = raw.split(b",", 12)[2:9]
            self._counter = raw.split(b",", 12)[11]
        return event if event is not None else end

    def _acq_depth(self) -> int | None:
        v = (self._acq or {}).get("Counter Depth (number)", "")
        return int(v) if v.isdigit() and int(v) in mib.COUNTER_DEPTHS else None

    def _pixels(self, seq: int, hdr: mib.FrameHeader) -> SeriesEnd | None:
        """Receive the pixels of frame ``seq`` into the current slot and commit it."""
        ring = self._ring
        if seq < 1:
            self._skip(hdr.data_nbytes)
            raise MalformedMessage(f"frame sequence number {seq}: Merlin counts frames from 1")
        self._read_into(ring.slot(ring.wslot))
        image_id = seq - 1
        gap = self._ids.see(image_id)
        if gap:
            log.warning("frame ids jumped to %d: %d frames lost upstream", image_id, gap)
        self.counters.frames += 1
        if ring.fill == 0:
            self._stack_recv_ns = time.monotonic_ns()
        s, w = ring.stack, ring.wslot
        ring.image_ids[s, w] = image_id
        ring.times[s, w] = (0, 0, hdr.shutter_ns)
        if self.mode == "latest":
            if ring.fill:
                self.counters.dropped += 1
            ring.held, ring.wslot, ring.fill = w, w ^ 1, 1
        else:
            ring.fill = ring.wslot = w + 1
        total = self._series.number_of_images
        if total and self._ids.next_id >= total:
            return self._end()
        return None

    # series -------------------------------------------------------------------------------------------------
    def _begin(self, hdr: mib.FrameHeader) -> SeriesStart:
        acq = self._acq
        frames = int(acq["Frames in Acquisition (Number)"])
        config = dict(acq)
        config.update({"pixel_type": hdr.pixel_type, "counter_depth": hdr.counter_depth, "chips": hdr.chips,
                       "layout": hdr.layout, "counter": hdr.counter, "header_bytes": hdr.header_nbytes})
        series = DetectorSeries(PROTOCOL, self._acq_count - 1, f"merlin-{uuid.uuid4()}", (f"counter_{hdr.counter}",),
                                (hdr.height, hdr.width), hdr.dtype, frames, hdr.shutter_ns / 1e9, 0.0, config)
        check_ring_bound(series, _Ring.nbytes(series, hdr, self.stack_size, self.nstacks), self.max_ring_bytes,
                         f"{self.nstacks} stacks of {self.stack_size}")
        note_unended(self.counters, self._series, series)
        ring = self._ring
        if ring is not None and ring.fill:
            self._pending.append(self._finish_stack())
        if ring is None or not ring.matches(hdr, self.stack_size, self.nstacks):
            self._ring = _Ring(series, hdr, self.stack_size, self.nstacks)
        else:
            ring.series, ring.hdr = series, hdr
        self._series = series
        self._first = hdr
        self._acq = None
        self._ids.start()
        self.counters.series_started += 1
        return SeriesStart(series, time.monotonic_ns())

    def _end(self, missing_ok: bool = False) -> SeriesEnd:
        series = self._series
        missing = self._ids.end(series.number_of_images)
        if missing:
            log.warning("series %s ended with %d announced frames missing", series.series_id, missing)
        self.counters.series_ended += 1
        self._series = None
        self._first = None
        self._template = []
        return SeriesEnd(series, self._ids.frames, missing, time.monotonic_ns())

    # receiving ----------------------------------------------------------------------------------------------
    def recv(self, timeout_ms: int | None = None) -> SeriesStart | FrameStack | SeriesEnd | None:
        """Receive the next event.

        Parameters
        ----------
        timeout_ms : int or None
            Wait at most this long for the first message (and for a connection); ``None`` waits for ever.

        Returns
        -------
        SeriesStart, FrameStack, SeriesEnd, or None when the timeout passed with nothing received.

        Raises
        ------
        ProtocolError
            A message was rejected (malformed, truncated, oversized, unexpected, mismatched): it is counted in
            :attr:`counters` and skipped; frames already collected stay in the stack being filled and are
            delivered by a later call.
        """
        if self._pending:
            return self._pending.popleft()
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        latest = self.mode == "latest"
        drained = 0
        while True:
            ring = self._ring
            if ring is not None and ring.fill:
                waiting = self._waiting()
                if not latest and ring.fill == ring.size:
                    if waiting:
                        self.counters.saturated += 1
                    return self._finish_stack()
                if not waiting or (latest and drained >= _MAX_DRAIN):
                    return self._finish_stack()
                wait = 0.0
            else:
                wait = 3600.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
            if self._sock is None:
                if not self._connect(wait):
                    if deadline is not None and time.monotonic() >= deadline:
                        return None
                    continue
            drained += 1
            try:
                event = self._read_message(wait)
            except _NoData:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            except _Closed:
                event = self._lost_connection()
                if event is None:
                    continue
            except ProtocolError as exc:
                self.counters.count_error(exc)
                log.debug("rejected: %s", exc)
                raise
            if event is None:
                continue
            ring = self._ring
            if self._pending:
                self._pending.append(event)
                return self._pending.popleft()
            if ring is not None and ring.fill and not isinstance(event, SeriesStart):
                self._pending.append(event)
                return self._finish_stack()
            return event

    def _lost_connection(self) -> SeriesEnd | None:
        """The peer closed: count a message cut short, end the open series."""
        cut = self._hi - self._lo
        self._drop_connection()
        if cut:
            self.counters.count_error(TruncatedMessage(f"connection closed {cut} bytes into a message"))
        if self._series is not None:
            return self._end()
        return None

    def _finish_stack(self) -> FrameStack:
        ring = self._ring
        s = ring.stack
        sl = slice(ring.held, ring.held + 1) if self.mode == "latest" else slice(0, ring.fill)
        n = sl.stop - sl.start
        base = (s * ring.size + sl.start) * ring.nb
        frames = ring.frames[s, sl]
        mib.decode_frames(ring.arena[base:], n, ring.hdr, frames)
        self.counters.decoded += n
        ids, times = ring.image_ids[s, sl], ring.times[s, sl]
        flat = ring.frames[s].reshape(-1).view(np.uint8)
        fb = ring.series.frame_nbytes
        offsets = np.arange(sl.start, sl.stop, dtype=np.int64) * fb
        lengths = np.full(n, fb, np.int64)
        codec = codecs.Codec(codecs.NONE, np.dtype(ring.series.dtype).itemsize)
        ch = ChannelStack(frames, flat, offsets, lengths, codec)
        stack = FrameStack(ring.series, ids, times, {ring.series.channels[0]: ch}, self._stack_recv_ns,
                           time.monotonic_ns())
        ring.stack = (s + 1) % ring.nstacks
        ring.fill = ring.wslot = ring.held = 0
        return stack
