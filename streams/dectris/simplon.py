"""DECTRIS SIMPLON stream, version 1: JSON headers and binary blobs in multipart ZeroMQ messages.

Layout (DECTRIS SIMPLON API reference manual, "Stream Interface", stream format version 1):

- series header: ``{"htype": "dheader-1.0", "series": N, "header_detail": "basic"|"all"|"none"}``, then
  (unless ``none``) the detector configuration as JSON (``x_pixels_in_detector``, ``y_pixels_in_detector``,
  ``bit_depth_image``, ``nimages``, ``ntrigger``, ``trigger_mode``, ``count_time``, ``frame_time``, ...);
  with ``all``, flatfield, pixel mask and count-rate tables follow as (JSON, blob) pairs. The detector
  sends these as one multipart message; some replay tools (LiberTEM's DectrisSim) send each part as its
  own message: both are accepted.
- each image, 4 parts: ``{"htype": "dimage-1.0", "series": N, "frame": i, "hash": md5hex}``,
  ``{"htype": "dimage_d-1.0", "shape": [x, y], "type": "uint16", "encoding": "bs16-lz4<", "size": bytes}``,
  the blob, ``{"htype": "dconfig-1.0", "start_time": ns, "stop_time": ns, "real_time": ns}``.
- series end: ``{"htype": "dseries_end-1.0", "series": N}``.

``shape`` is ``[x, y]`` = ``[columns, rows]``. Frame ids are 0-based and consecutive; ``hash`` is the md5 of
the blob as sent. LiberTEM's receiver (libertem-dectris) needs non-empty hashes, consecutive ids, the series
number of the header, and an encoding that ends in ``<`` or ``>``; :class:`SimplonSender` always sends that.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import struct
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import zmq

from beamloop.streams._socket import SocketOwner, open_push
from beamloop.streams.dectris import codecs, zmqfast
from beamloop.streams.dectris.series import DetectorSeries, SeriesEnd, SeriesStart
from beamloop.streams.dectris.sink import RingSink
from beamloop.streams.errors import FrameMismatch, MalformedMessage, TruncatedMessage, check_oversize

log = logging.getLogger(__name__)

PROTOCOL = "simplon1"
DEFAULT_PORT = 9999
"""Port a DECTRIS DCU binds its SIMPLON v1 stream on."""

CHANNEL = "data"
"""Name of the single channel of a SIMPLON v1 series."""

PIXEL_TYPES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
"""``type`` values of ``dimage_d`` messages."""

_TIMES = ("start_time", "stop_time", "real_time")
_RCVMORE = int(zmq.RCVMORE)
_getsockopt = zmq.backend.cython._zmq.Socket.get  # the Cython methods, without the sugar layer's enum
_recv_into = zmq.backend.cython._zmq.Socket.recv_into  # conversions (~1 us per call)
_APPENDIX_HTYPES = ("dflatfield-1.0", "dpixelmask-1.0", "dcountrate_table-1.0")


def _dtype_name(dtype) -> str:
    for name, dt in PIXEL_TYPES.items():
        if np.dtype(dtype) == dt:
            return name
    raise ValueError(f"dtype {np.dtype(dtype)} is not a SIMPLON pixel type {sorted(PIXEL_TYPES)}")


def number_of_images(config: Mapping) -> int:
    """Frames a SIMPLON detector configuration will send: ``ntrigger`` for ``exte``/``inte`` trigger modes,
    ``nimages * ntrigger`` for ``exts``/``ints`` (as the DCU counts them); 0 when the fields are absent."""
    nimages, ntrigger = config.get("nimages", 0), config.get("ntrigger", 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (nimages, ntrigger)):
        raise MalformedMessage(f"detector config: nimages {nimages!r} / ntrigger {ntrigger!r} are not counts")
    if config.get("trigger_mode") in ("exte", "inte"):
        return ntrigger
    return nimages * ntrigger


def series_from_config(series_id: int, config: Mapping | None) -> DetectorSeries | None:
    """A :class:`DetectorSeries` from a SIMPLON detector configuration, or ``None`` without one (the frame
    layout is then taken from the first image).

    Raises
    ------
    MalformedMessage
        Missing or invalid ``x_pixels_in_detector``, ``y_pixels_in_detector`` or ``bit_depth_image``.
    """
    if not config:
        return None
    x, y, bits = (config.get(k) for k in ("x_pixels_in_detector", "y_pixels_in_detector", "bit_depth_image"))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (x, y, bits)):
        raise MalformedMessage("detector config lacks integer x_pixels_in_detector, y_pixels_in_detector, "
                               f"bit_depth_image (got {x!r}, {y!r}, {bits!r})")
    if not (0 < x <= 1 << 14 and 0 < y <= 1 << 14) or bits not in (8, 16, 32):
        raise MalformedMessage(f"detector config: frame {x}x{y} at {bits} bits is out of range")
    return DetectorSeries(PROTOCOL, series_id, f"{PROTOCOL}-{series_id}", (CHANNEL,), (y, x),
                          np.dtype(f"<u{bits // 8}"), number_of_images(config),
                          _seconds(config, "count_time"), _seconds(config, "frame_time"), dict(config))


def _seconds(config: Mapping, name: str) -> float:
    """``config[name]`` as seconds (0.0 when absent); ``MalformedMessage`` when it is not a finite number >= 0."""
    v = config.get(name, 0.0)
    if v is None:
        return 0.0
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v < float("inf")):
        raise MalformedMessage(f"detector config: {name} {v!r} is not a number of seconds >= 0")
    return float(v)


def detector_config(shape: tuple[int, int], dtype, nimages: int, *, count_time: float = 1e-4,
                    frame_time: float = 1e-4, extra: Mapping | None = None) -> dict:
    """A minimal SIMPLON detector configuration for a series of ``nimages`` frames of ``shape`` (rows, cols),
    with the fields LiberTEM's receiver needs (``ntrigger``, ``nimages``, ``trigger_mode``, sizes, bit depth)."""
    cfg = {
        "ntrigger": int(nimages), "nimages": 1, "trigger_mode": "exte",
        "x_pixels_in_detector": int(shape[1]), "y_pixels_in_detector": int(shape[0]),
        "bit_depth_image": 8 * np.dtype(dtype).itemsize, "bit_depth_readout": 8 * np.dtype(dtype).itemsize,
        "count_time": float(count_time), "frame_time": float(frame_time),
    }
    cfg.update(extra or {})
    return cfg


# --- message encoding -----------------------------------------------------------------------------------------


def _j(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def header_parts(series: int, config: Mapping, header_detail: str = "basic") -> list[bytes]:
    """Parts of a series header message: ``dheader-1.0`` and the configuration JSON."""
    return [_j({"htype": "dheader-1.0", "series": int(series), "header_detail": header_detail}), _j(dict(config))]


def image_parts(series: int, frame: int, blob, shape: tuple[int, int], dtype, encoding: str,
                times_ns: tuple[int, int, int] = (0, 0, 0)) -> list:
    """The four parts of an image message (blob sent as given, without copying).

    ``shape`` is (rows, cols); the header carries ``[cols, rows]`` as SIMPLON does.
    """
    mv = memoryview(blob).cast("B")
    return [
        _j({"htype": "dimage-1.0", "series": int(series), "frame": int(frame), "hash": hashlib.md5(mv).hexdigest()}),
        _j({"htype": "dimage_d-1.0", "shape": [int(shape[1]), int(shape[0])], "type": _dtype_name(dtype),
            "encoding": encoding, "size": mv.nbytes}),
        blob,
        _j({"htype": "dconfig-1.0", "start_time": int(times_ns[0]), "stop_time": int(times_ns[1]),
            "real_time": int(times_ns[2])}),
    ]


def end_parts(series: int) -> list[bytes]:
    """The one part of a series end message."""
    return [_j({"htype": "dseries_end-1.0", "series": int(series)})]


# --- sending --------------------------------------------------------------------------------------------------


class SimplonSender(SocketOwner):
    """A PUSH socket that sends SIMPLON stream v1 series, as a DECTRIS DCU does.

    Parameters
    ----------
    endpoint : str
        e.g. ``"tcp://*:9999"`` or ``"tcp://127.0.0.1:0"`` (a free port; read :attr:`endpoint`).
    bind : bool
        Bind (as a detector does) rather than connect.
    encoding : str
        SIMPLON encoding of every frame: ``"bs16-lz4<"`` (bs8/bs32 for 8/32-bit pixels; ``"bslz4"`` picks
        the one matching the dtype), ``"lz4<"`` or ``"<"`` (uncompressed).
    sndhwm : int
        Send high-water mark in messages; when reached, sends block (back-pressure) or time out.
    send_timeout_ms : int or None
        Give up a blocked send after this long (``TimeoutError``).
    context : zmq.Context, optional

    Raises
    ------
    zmq.ZMQError
        The endpoint cannot be bound or connected (the message names it).
    """

    def __init__(self, endpoint: str = f"tcp://*:{DEFAULT_PORT}", *, bind: bool = True, encoding: str = "bslz4",
                 sndhwm: int = 1000, send_timeout_ms: int | None = None, context: zmq.Context | None = None) -> None:
        self.encoding = encoding
        SocketOwner.__init__(self, *open_push(endpoint, bind=bind, sndhwm=sndhwm, linger_ms=2000,
                                              send_timeout_ms=send_timeout_ms, context=context))
        self.series = 0
        self.shape: tuple[int, int] | None = None
        self.dtype: np.dtype | None = None
        self.codec: codecs.Codec | None = None
        self._next = 0
        self._t0 = 0
        self.frames_sent = 0

    def start_series(self, shape: tuple[int, int], dtype, nimages: int, *, series: int | None = None,
                     count_time: float = 1e-4, frame_time: float = 1e-4, config: Mapping | None = None) -> dict:
        """Send the series header (``dheader-1.0`` + configuration) and return the configuration sent.

        Raises ``ValueError`` for a dtype that is not uint8/16/32 or an encoding that does not fit it.
        """
        dtype = np.dtype(dtype)
        name = _dtype_name(dtype)
        enc = f"bs{8 * dtype.itemsize}-lz4<" if self.encoding == "bslz4" else self.encoding
        try:
            self.codec = codecs.parse_simplon_encoding(enc, dtype)
        except MalformedMessage as exc:
            raise ValueError(str(exc)) from None
        self.encoding_text = enc
        self.series = self.series + 1 if series is None else int(series)
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), PIXEL_TYPES[name]
        cfg = detector_config(self.shape, dtype, nimages, count_time=count_time, frame_time=frame_time, extra=config)
        self._send(header_parts(self.series, cfg))
        self._next = 0
        self._t0 = time.monotonic_ns()
        return cfg

    def send_frame(self, frame: np.ndarray, *, frame_id: int | None = None) -> None:
        """Encode and send one frame (rows, cols) of the series' dtype.

        Raises ``RuntimeError`` with no series started, ``ValueError`` for a wrong shape or dtype,
        ``TimeoutError`` when the send times out.
        """
        if self.codec is None:
            raise RuntimeError("send_frame() before start_series()")
        frame = np.asarray(frame)
        if frame.shape != self.shape or frame.dtype != self.dtype:
            raise ValueError(f"frame {frame.shape} {frame.dtype}, series announced {self.shape} {self.dtype}")
        self.send_blob(codecs.encode(frame, self.codec), frame_id=frame_id)

    def send_blob(self, blob, *, frame_id: int | None = None, times_ns: tuple[int, int, int] | None = None) -> None:
        """Send an already encoded frame (e.g. a chunk read from a recording) without re-encoding it."""
        if self.codec is None:
            raise RuntimeError("send_blob() before start_series()")
        fid = self._next if frame_id is None else int(frame_id)
        if times_ns is None:
            stop = time.monotonic_ns() - self._t0
            times_ns = (stop, stop, 0)
        self._send(image_parts(self.series, fid, blob, self.shape, self.dtype, self.encoding_text, times_ns))
        self._next = fid + 1
        self.frames_sent += 1

    def end_series(self) -> None:
        """Send ``dseries_end-1.0``."""
        self._send(end_parts(self.series))
        self.codec = None

    def send_raw(self, parts: list) -> None:
        """Send arbitrary message parts unchanged (tests of bad input, replay of captures)."""
        self._send(list(parts))

    def _send(self, parts: list) -> None:
        try:
            self._sock.send_multipart(parts, copy=len(parts) < 3)
        except zmq.Again:
            raise TimeoutError(f"send to {self.endpoint} timed out (receiver gone or too slow)") from None


# --- receiving -----------------------------------------------------------------------------------------------

class _Template:
    """Fast exact re-validation of per-frame JSON parts that differ from a validated one only in some values.

    A SIMPLON detector sends the same JSON text for every frame except a few numbers (frame id, blob size,
    times) and the hash. After one part has been fully parsed and validated, :meth:`learn` turns its text
    into a regular expression with the variable values as groups; a later part that matches it byte for byte
    elsewhere is the same JSON object with new values, so it needs no JSON parser (~0.5 us instead of ~3 us).
    Anything that does not match is parsed in full.
    """

    __slots__ = ("regex", "order", "tpl", "holes", "index")

    _INT = rb"(0|[1-9][0-9]*)"
    _HEX = rb"([0-9a-fA-F]*)"  # a hole holds the digits only; the quotes around them are template text

    def __init__(self) -> None:
        self.regex = None
        self.order: tuple = ()

    def learn(self, raw: bytes, fields: tuple[str, ...], hex_fields: tuple[str, ...] = ()) -> None:
        """Build the pattern from a validated part ``raw`` whose ``fields`` hold ints (``hex_fields``: hex strings)."""
        import re

        spans = []
        for name in fields + hex_fields:
            key = b'"' + name.encode() + b'"'
            if raw.count(key) != 1:
                self.regex = None
                return
            m = re.compile(re.escape(key) + rb"\s*:\s*").search(raw)
            start = m.end()
            hexed = name in hex_fields
            vm = re.compile(rb'"[0-9a-fA-F]*"' if hexed else rb"-?[0-9]+").match(raw, start)
            if vm is None:
                self.regex = None
                return
            spans.append((start + 1, vm.end() - 1, name) if hexed else (start, vm.end(), name))
        spans.sort()
        pattern, pos = b"", 0
        for start, end, name in spans:
            pattern += re.escape(raw[pos:start]) + (self._HEX if name in hex_fields else self._INT)
            pos = end
        pattern += re.escape(raw[pos:])
        self.regex = re.compile(pattern, re.DOTALL)
        pos_of = {name: k for k, (_, _, name) in enumerate(spans)}
        self.order = tuple((pos_of[name], name in hex_fields) for name in fields + hex_fields)
        self.tpl = np.frombuffer(raw, np.uint8).copy()
        self.holes = np.array([(a, 1 if name in hex_fields else 0, b) for a, b, name in spans], np.int64)
        self.index = pos_of

    def match(self, raw: bytes) -> tuple | None:
        """The variable values of ``raw`` (ints, or bytes for hex fields) in the order of the ``fields`` then
        ``hex_fields`` given to :meth:`learn`, or None when ``raw`` is not the learnt text."""
        if self.regex is None:
            return None
        m = self.regex.fullmatch(raw)
        if m is None:
            return None
        g = m.groups()
        return tuple(g[i] if h else int(g[i]) for i, h in self.order)


class SimplonAdapter:
    """Reads SIMPLON v1 messages into a :class:`beamloop.streams.dectris.sink.RingSink` (the protocol adapter
    of ``DetectorReceiver(protocol="simplon1")``; not used directly).

    Images go straight into the sink's preallocated stack: header parts into a fixed buffer, the blob
    into its slot of the arena. Every part is validated against the series; a bad message raises a
    :class:`beamloop.streams.errors.ProtocolError` and the receiver discards its remaining parts.

    Parameters
    ----------
    socket, sink
        The PULL socket it reads and the sink it writes (:class:`beamloop.streams.dectris.sink.ProtocolAdapter`).
    max_header_bytes : int
        Bound on every JSON part (its buffer's size).
    verify_hash : bool
        Check each blob's md5 against its ``hash`` (and stay on the Python path).
    """

    def __init__(self, socket: zmq.Socket, sink: RingSink, *, max_header_bytes: int, verify_hash: bool) -> None:
        self.sink = sink
        self.sock = socket
        self.verify_hash = verify_hash
        self._hbuf = bytearray(max_header_bytes)
        self._hview = memoryview(self._hbuf)
        self._awaiting_config: int | None = None  # series id of a dheader whose config comes separately
        self._pre: collections.deque = collections.deque()  # parts the compiled loop read of a deviating message
        self._fast = None
        self._reset_templates()
        if not verify_hash:
            zmqfast.warm_up()  # compile before the first series, not while its frames arrive

    def _reset_templates(self) -> None:
        self._t_image, self._t_imaged, self._t_config = _Template(), _Template(), _Template()
        self._fast = None

    # --- part sources: the socket, or parts the compiled loop has read already ------------------------------
    def _recv_header(self, what: str, flags: int = 0) -> bytes:
        if self._pre:
            n, data = self._pre.popleft()
        else:
            n = _recv_into(self.sock, self._hview, flags=flags)
            data = None
        self.sink.counters.bytes += n
        check_oversize(n, len(self._hbuf), what)
        return data[:n] if data is not None else self._hview[:n].tobytes()

    def _recv_blob(self, view: memoryview) -> int:
        if self._pre:
            n, _ = self._pre.popleft()  # already in this slot of the arena
        else:
            n = _recv_into(self.sock, view)
        self.sink.counters.bytes += n
        return n

    def _has_more(self) -> bool:
        return bool(self._pre) or bool(_getsockopt(self.sock, _RCVMORE))

    # --- the compiled path (beamloop.streams.dectris.zmqfast) ---------------------------------------------------
    def _fast_state(self):
        """Arrays for :func:`beamloop.streams.dectris.zmqfast.recv_images` once all three templates are learnt;
        else None."""
        if self._fast is not None:
            return self._fast
        ts = (self._t_image, self._t_imaged, self._t_config)
        if self.verify_hash or not zmqfast.available() or any(t.regex is None for t in ts):
            return None
        if "series" not in ts[0].index or "size" not in ts[1].index:
            return None
        cap = len(self._hbuf)
        idx = np.array([ts[0].index["frame"], ts[0].index["series"], ts[1].index["size"],
                        *(ts[2].index[k] for k in _TIMES)], np.int64)
        self._fast = {
            "hbuf": np.zeros((4, cap), np.uint8), "cap": cap, "idx": idx,
            "state": np.zeros(2, np.int64), "lens": np.zeros(4, np.int64),
            "optval": np.zeros(1, np.int32), "optlen": np.zeros(1, np.uint64),
        }
        return self._fast

    def fast_read(self) -> int | None:
        """Receive images with the compiled loop into the sink's free slots (:meth:`RingSink.free_slots`).

        Only images with the next expected id pass the compiled loop; any other id deviates to :meth:`read`.

        Returns
        -------
        int or None
            ``zmqfast.FULL`` / ``EMPTY`` / ``DEVIATE`` (then :meth:`read` finishes the deviating message
            from the parts already read), or None when the compiled path is not ready (templates not learnt).

        Raises
        ------
        OSError
            ``zmq_recv`` failed.
        TruncatedMessage
            A part of the deviating message could not be read.
        """
        f = self._fast_state()
        if f is None:
            return None
        slots = self.sink.free_slots(CHANNEL)
        if slots.room == 0:
            return zmqfast.FULL
        state = f["state"]
        state[0] = 0
        t = (self._t_image, self._t_imaged, self._t_config)
        code, k = zmqfast.recv_images(
            self.sock.underlying, f["hbuf"], f["cap"], t[0].tpl, t[0].holes, t[1].tpl, t[1].holes, t[2].tpl,
            t[2].holes, f["idx"], slots.series_id, slots.next_id, slots.arena, slots.capacity, slots.first_slot,
            slots.room, slots.lengths, slots.image_ids, slots.times, state, f["lens"], f["optval"], f["optlen"])
        self.sink.commit_run(k)
        c = self.sink.counters
        c.bytes += int(state[0])
        c.messages += k
        if code == zmqfast.ERROR:
            raise OSError(f"zmq_recv failed with errno {int(f['lens'][0])}")
        if code == zmqfast.DEVIATE:
            lens, hbuf = f["lens"], f["hbuf"]
            for part in range(min(int(state[1]), 4)):
                n = int(lens[part])
                if n < 0:
                    raise TruncatedMessage(f"zmq_recv failed on part {part} of an image message")
                self._pre.append((n, None if part == 2 else hbuf[part, :min(n, f["cap"])].tobytes()))
        return code

    @staticmethod
    def _json(raw: bytes, what: str) -> dict:
        try:
            msg = json.loads(raw)
        except ValueError as exc:
            raise MalformedMessage(f"{what} is not JSON ({exc})") from None
        if not isinstance(msg, dict):
            raise MalformedMessage(f"{what} is a JSON {type(msg).__name__}, expected an object")
        return msg

    def _more(self, what: str) -> None:
        if not self._has_more():
            raise TruncatedMessage(f"message ended before its {what}")

    def _no_more(self, what: str) -> None:
        if self._has_more():
            raise MalformedMessage(f"{what} message has more parts than expected")

    def discard_rest(self) -> None:
        """Read and drop the remaining parts of the current message."""
        self._pre.clear()
        while _getsockopt(self.sock, _RCVMORE):
            self.sink.counters.bytes += self.sock.recv_into(self._hview)

    def read(self, flags: int = 0) -> SeriesStart | SeriesEnd | None:
        """Read one message; returns a SeriesStart/SeriesEnd event, or None for an image or a header part.

        ``flags=zmq.NOBLOCK`` raises ``zmq.Again`` when no message waits (nothing is consumed then).

        Raises
        ------
        ProtocolError
            The message is malformed, truncated, oversized, unexpected or does not match its series.
        """
        raw = self._recv_header("message part 0", flags)
        vals = self._t_image.match(raw)
        if vals is not None:
            return self._image(vals[0], vals[1], vals[2])
        msg = self._json(raw, "message part 0")
        htype = msg.get("htype")
        if htype == "dimage-1.0":
            frame, series, digest = msg.get("frame"), msg.get("series"), msg.get("hash")
            if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
                raise MalformedMessage(f"dimage: frame {frame!r} is not a non-negative integer")
            if not isinstance(digest, str):
                raise MalformedMessage(f"dimage {frame}: hash {digest!r} is not a string")
            self._t_image.learn(raw, ("frame", "series"), ("hash",))
            return self._image(frame, series, digest)
        if self._awaiting_config is not None and htype is None:
            series = self._awaiting_config
            self._awaiting_config = None
            self._no_more("detector config")
            return self._begin(series, msg)
        if htype == "dheader-1.0":
            return self._header(msg)
        if htype == "dseries_end-1.0":
            self._no_more("dseries_end")
            return self.sink.end_series(msg.get("series"))
        if htype in _APPENDIX_HTYPES:
            self.discard_rest()
            return None
        raise MalformedMessage(f"unknown message htype {htype!r}")

    def _begin(self, series: int, config: dict):
        s = series_from_config(series, config)
        if s is None:
            raise MalformedMessage("detector config is empty")
        self._reset_templates()
        return self.sink.begin_series(s)

    def _header(self, msg: dict):
        series = msg.get("series")
        if not isinstance(series, int) or isinstance(series, bool) or series < 0:
            raise MalformedMessage(f"dheader: series {series!r} is not a non-negative integer")
        detail = msg.get("header_detail", "basic")
        if detail not in ("basic", "all", "none"):
            raise MalformedMessage(f"dheader: unknown header_detail {detail!r}")
        if detail == "none":
            self._no_more("dheader")
            raise MalformedMessage("dheader with header_detail 'none' carries no frame layout; "
                                   "configure the stream with header_detail 'basic' or 'all'")
        if not _getsockopt(self.sock, _RCVMORE):
            self._awaiting_config = series  # config follows as its own message (DectrisSim does this)
            return None
        config = self._json(self._recv_header("detector config"), "detector config")
        self.discard_rest()  # 'all': flatfield, pixel mask, count-rate tables (not used here)
        return self._begin(series, config)

    def _image(self, frame: int, series, digest) -> None:
        sink = self.sink
        s = sink.check_image(frame, series)
        self._more(f"frame {frame}: dimage_d part")
        size = self._image_d(self._recv_header("dimage_d part"), s, frame)
        self._more(f"frame {frame}: blob part")
        view = sink.slot_view(CHANNEL)
        n = self._recv_blob(view)
        check_oversize(n, len(view), f"frame {frame} blob")
        if size is not None and n != size:
            raise TruncatedMessage(f"frame {frame}: blob of {n} bytes, dimage_d declares {size}")
        if self.verify_hash and hashlib.md5(view[:n]).hexdigest() != (
                digest.decode() if isinstance(digest, bytes) else digest):
            raise MalformedMessage(f"frame {frame}: md5 of the blob differs from the hash {digest!r}")
        self._more(f"frame {frame}: dconfig part")
        raw = self._recv_header("dconfig part")
        t = self._t_config.match(raw)
        if t is None:
            t = self._dconfig(raw, frame)
        self._no_more(f"frame {frame}")
        sink.set_blob_nbytes(CHANNEL, n)
        sink.commit_image(frame, t[0], t[1], t[2])

    def _dconfig(self, raw: bytes, frame: int) -> tuple:
        cfg = self._json(raw, "dconfig part")
        if cfg.get("htype") != "dconfig-1.0":
            raise MalformedMessage(f"frame {frame}: part 3 has htype {cfg.get('htype')!r}, expected dconfig-1.0")
        t = tuple(cfg.get(k, 0) for k in _TIMES)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in t):
            raise MalformedMessage(f"frame {frame}: dconfig times must be integers (ns), got {t}")
        if all(f'"{k}"'.encode() in raw for k in _TIMES):
            self._t_config.learn(raw, _TIMES)
        return t

    def _image_d(self, raw: bytes, s: DetectorSeries, frame: int) -> int | None:
        """Validate a dimage_d part against the series; set the channel's codec; return the declared size."""
        vals = self._t_imaged.match(raw)
        if vals is not None:
            return vals[0]
        d = self._json(raw, f"frame {frame}: dimage_d")
        if d.get("htype") != "dimage_d-1.0":
            raise MalformedMessage(f"frame {frame}: part 1 is not a dimage_d-1.0 object")
        size = d.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise MalformedMessage(f"frame {frame}: dimage_d size {size!r} is not a byte count")
        shape, ptype = d.get("shape"), d.get("type")
        if shape != [s.shape[1], s.shape[0]]:
            raise FrameMismatch(f"frame {frame}: shape {shape} (x, y), series announced [{s.shape[1]}, {s.shape[0]}]")
        if not isinstance(ptype, str) or PIXEL_TYPES.get(ptype) != np.dtype(s.dtype):
            raise FrameMismatch(f"frame {frame}: pixel type {ptype!r}, series announced {np.dtype(s.dtype)}")
        codec = codecs.parse_simplon_encoding(d.get("encoding"), s.dtype)
        self.sink.set_codec(CHANNEL, codec, f"frame {frame}: encoding {d.get('encoding')!r}")
        if size is not None:
            self._t_imaged.learn(raw, ("size",))
        return size


# --- dump files (LiberTEM's DectrisSim format) ---------------------------------------------------------------


def write_dump(path: str | Path, messages: Iterable[list]) -> int:
    """Write ZeroMQ messages as a "zeromq dump file": each *part* as a little-endian i64 length and its bytes.

    This is the format LiberTEM's ``DectrisSim`` replays (it sends the dheader and the config as two
    single-part messages and each image as four parts). Returns the number of parts written.
    """
    n = 0
    with open(path, "wb") as f:
        for parts in messages:
            for p in parts:
                b = memoryview(p).cast("B") if not isinstance(p, bytes) else p
                f.write(struct.pack("<q", len(b)))
                f.write(b)
                n += 1
    return n


def series_messages(frames: np.ndarray, *, series: int = 1, encoding: str = "bslz4",
                    count_time: float = 1e-4) -> Iterable[list]:
    """Messages (lists of parts) of a whole SIMPLON v1 series of ``frames`` (n, rows, cols), for dumps and tests.

    Frame ``i`` gets ``start_time = i * count_time`` and ``stop_time`` one count time later (ns).
    """
    n, rows, cols = frames.shape
    enc = f"bs{8 * frames.dtype.itemsize}-lz4<" if encoding == "bslz4" else encoding
    codec = codecs.parse_simplon_encoding(enc, frames.dtype)
    yield header_parts(series, detector_config((rows, cols), frames.dtype, n, count_time=count_time,
                                               frame_time=count_time))
    ct = int(count_time * 1e9)
    for i in range(n):
        blob = codecs.encode(frames[i], codec)
        blob = blob.tobytes() if isinstance(blob, np.ndarray) else blob
        yield image_parts(series, i, blob, (rows, cols), frames.dtype, enc, (i * ct, (i + 1) * ct, ct))
    yield end_parts(series)
