"""DECTRIS Stream V2: one CBOR message per event (``start``, ``image``, ``end``) over ZeroMQ PUSH/PULL.

Spec: DECTRIS Stream V2 documentation (github.com/dectris/documentation, ``stream_v2/README.md`` and
``cbor/dectris-compression-tag.md``); CBOR is RFC 8949, its typed and multi-dimensional arrays RFC 8746.
What this module sends and checks:

- Every message is a CBOR map (RFC 8949) whose first key is ``type``, wrapped in the self-describe tag
  55799 (accepted with or without it).
- ``start``: ``series_id``, ``series_unique_id``, ``arm_date`` (tag 0 date/time string), ``channels``,
  ``image_size_x``, ``image_size_y``, ``image_dtype``, ``number_of_images``, ``count_time``,
  ``frame_time``, ``threshold_energy`` (channel -> eV), ``user_data``; other spec fields pass through into
  :attr:`beamloop.streams.dectris.series.DetectorSeries.config`.
- ``image``: ``series_id``, ``series_unique_id``, ``series_date`` (tag 0), ``image_id``, ``start_time`` /
  ``stop_time`` / ``real_time`` as rationals ``[numerator, denominator]`` seconds, ``user_data``, and
  ``data``: channel -> RFC 8746 row-major multi-dimensional array, tag 40 ``[[rows, cols], typed array]``,
  whose typed array is tag 64 (uint8), 69 (uint16, little-endian) or 70 (uint32, little-endian) around a
  byte string, or around tag 56500 ``[algorithm, modifier, bytes]`` (compressed: ``"bslz4"`` with the
  element size in bytes, or ``"lz4"`` with 0; both with the HDF5 framing, see :mod:`beamloop.streams.dectris.codecs`).
- ``end``: ``series_id``, ``series_unique_id``.

DECTRIS detectors push on port 31001.
"""

from __future__ import annotations

import datetime as _dt
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np
import zmq

from beamloop.streams._ids import NS, rational_ns
from beamloop.streams._socket import SocketOwner, open_push
from beamloop.streams.dectris import codecs
from beamloop.streams.dectris.series import DetectorSeries, SeriesEnd, SeriesStart
from beamloop.streams.dectris.sink import RingSink
from beamloop.streams.errors import FrameMismatch, MalformedMessage, UnexpectedMessage, check_oversize

PROTOCOL = "stream2"
DEFAULT_PORT = 31001
"""Port a DECTRIS DCU pushes Stream V2 on."""

SELF_DESCRIBE = 55799
SELF_DESCRIBE_PREFIX = b"\xd9\xd9\xf7"
MULTI_DIM_ARRAY = 40
"""RFC 8746 section 3.1.1: multi-dimensional array, row-major order."""
DECTRIS_COMPRESSION = 56500
"""DECTRIS compressed byte string: ``[algorithm, modifier, bytes]``."""
TYPED_ARRAY_TAGS = {64: np.dtype("u1"), 69: np.dtype("<u2"), 70: np.dtype("<u4")}
"""RFC 8746 section 2 typed-array tags for the pixel types detectors send (uint8, uint16 LE, uint32 LE)."""
TAG_OF_DTYPE = {dt: tag for tag, dt in TYPED_ARRAY_TAGS.items()}
DTYPE_NAMES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
COMPRESSIONS = ("none", codecs.BSLZ4, codecs.LZ4)


@dataclass(frozen=True)
class Compressed:
    """Content of a tag-56500 item: ``algorithm`` ("bslz4", "lz4"), ``modifier`` (element size or 0), ``data``."""

    algorithm: str
    modifier: int
    data: bytes


@dataclass(frozen=True)
class TypedArray:
    """An RFC 8746 typed array: its tag, numpy dtype and payload (bytes or :class:`Compressed`)."""

    tag: int
    dtype: np.dtype | None
    payload: Any


@dataclass(frozen=True)
class MultiDimArray:
    """An RFC 8746 row-major multi-dimensional array (tag 40): ``dims`` and its :class:`TypedArray`."""

    dims: Any
    array: Any


def _tag_hook(a, b):
    tag = a if isinstance(a, cbor2.CBORTag) else b  # cbor2 >= 6 passes (tag, immutable), 5.x (decoder, tag)
    if tag.tag == DECTRIS_COMPRESSION:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and isinstance(v[0], str) and isinstance(v[1], int)
                and isinstance(v[2], bytes)):
            raise MalformedMessage("tag 56500 content is not [algorithm, modifier, byte string]")
        return Compressed(v[0], v[1], v[2])
    if 64 <= tag.tag <= 87:
        return TypedArray(tag.tag, TYPED_ARRAY_TAGS.get(tag.tag), tag.value)
    if tag.tag == MULTI_DIM_ARRAY:
        v = tag.value
        if not (isinstance(v, (list, tuple)) and len(v) == 2):
            raise MalformedMessage("tag 40 content is not [dimensions, array]")
        dims = list(v[0]) if isinstance(v[0], (list, tuple)) else v[0]
        return MultiDimArray(dims, v[1])
    return tag


def loads(buf) -> dict:
    """Decode one Stream V2 message into a dict (tags 40/64-87/56500 as :class:`MultiDimArray`,
    :class:`TypedArray`, :class:`Compressed`; nothing is decompressed).

    Raises
    ------
    MalformedMessage
        Not CBOR, trailing bytes, not a map, or a malformed tag content.
    """
    buf = memoryview(buf)
    if buf[:3] == SELF_DESCRIBE_PREFIX:
        buf = buf[3:]  # decode the map itself, not as the content of a tag (cbor2 would freeze it)
    try:
        msg = cbor2.loads(buf, tag_hook=_tag_hook)
    except MalformedMessage:
        raise
    except Exception as exc:  # cbor2 raises several types for bad input
        raise MalformedMessage(f"message is not valid CBOR ({type(exc).__name__}: {exc})") from None
    if isinstance(msg, cbor2.CBORTag) and msg.tag == SELF_DESCRIBE:
        msg = msg.value
    if not isinstance(msg, dict):
        raise MalformedMessage(f"message holds a CBOR {type(msg).__name__}, expected a map")
    return msg


# --- encoding ----------------------------------------------------------------------------------------------------


def _dumps(msg: dict) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(SELF_DESCRIBE, msg), timezone=_dt.UTC)


def encode_start(series: DetectorSeries, *, arm_date: _dt.datetime | None = None) -> bytes:
    """CBOR bytes of a ``start`` message for ``series`` (``series.config`` supplies further spec fields,
    e.g. ``threshold_energy``, ``beam_center_x``, ``user_data``)."""
    cfg = dict(series.config)
    msg = {
        "type": "start",
        "series_id": int(series.series_id),
        "series_unique_id": series.series_unique_id,
        "arm_date": arm_date or _dt.datetime.now(_dt.UTC),
        "channels": list(series.channels),
        "count_time": float(series.count_time),
        "frame_time": float(series.frame_time),
        "image_size_x": int(series.shape[1]),
        "image_size_y": int(series.shape[0]),
        "image_dtype": next(k for k, v in DTYPE_NAMES.items() if v == np.dtype(series.dtype)),
        "number_of_images": int(series.number_of_images),
        "threshold_energy": cfg.pop("threshold_energy", {ch: 0.0 for ch in series.channels}),
        "user_data": cfg.pop("user_data", {}),
    }
    for k, v in cfg.items():
        msg.setdefault(k, v)
    return _dumps(msg)


def image_array(blob, shape: tuple[int, int], dtype, compression: str) -> cbor2.CBORTag:
    """The tag-40 item of one channel: ``40([[rows, cols], 64|69|70(bytes or 56500([alg, mod, bytes])))])``."""
    dtype = np.dtype(dtype)
    data = bytes(memoryview(blob).cast("B")) if not isinstance(blob, bytes) else blob
    if compression == codecs.BSLZ4:
        data = cbor2.CBORTag(DECTRIS_COMPRESSION, ["bslz4", dtype.itemsize, data])
    elif compression == codecs.LZ4:
        data = cbor2.CBORTag(DECTRIS_COMPRESSION, ["lz4", 0, data])
    elif compression != "none":
        raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
    return cbor2.CBORTag(MULTI_DIM_ARRAY, [[int(shape[0]), int(shape[1])], cbor2.CBORTag(TAG_OF_DTYPE[dtype], data)])


def encode_image(series: DetectorSeries, image_id: int, arrays: Mapping[str, cbor2.CBORTag], *,
                 series_date: _dt.datetime, times_ns: tuple[int, int, int] = (0, 0, 0),
                 user_data: Any = None) -> bytes:
    """CBOR bytes of an ``image`` message; ``arrays`` maps every channel to its :func:`image_array`.

    Times are nanoseconds since ``series_date``, sent as rationals with denominator 10^9.
    """
    return _dumps({
        "type": "image",
        "series_id": int(series.series_id),
        "series_unique_id": series.series_unique_id,
        "series_date": series_date,
        "image_id": int(image_id),
        "start_time": [int(times_ns[0]), NS],
        "stop_time": [int(times_ns[1]), NS],
        "real_time": [int(times_ns[2]), NS],
        "user_data": {} if user_data is None else user_data,
        "data": {ch: arrays[ch] for ch in series.channels},
    })


def encode_end(series: DetectorSeries) -> bytes:
    """CBOR bytes of an ``end`` message."""
    return _dumps({"type": "end", "series_id": int(series.series_id), "series_unique_id": series.series_unique_id})


# --- sending ----------------------------------------------------------------------------------------------------


class Stream2Sender(SocketOwner):
    """A PUSH socket that sends DECTRIS Stream V2 series.

    Parameters
    ----------
    endpoint : str
        e.g. ``"tcp://*:31001"`` or ``"tcp://127.0.0.1:0"`` (read :attr:`endpoint`).
    bind : bool
        Bind (as a detector does) rather than connect.
    compression : {"bslz4", "lz4", "none"}
    sndhwm, send_timeout_ms, context
        As :class:`beamloop.streams.dectris.simplon.SimplonSender`.

    Raises
    ------
    ValueError
        Unknown compression.
    zmq.ZMQError
        The endpoint cannot be bound or connected (the message names it).
    """

    def __init__(self, endpoint: str = f"tcp://*:{DEFAULT_PORT}", *, bind: bool = True, compression: str = "bslz4",
                 sndhwm: int = 1000, send_timeout_ms: int | None = None, context: zmq.Context | None = None) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
        self.compression = compression
        SocketOwner.__init__(self, *open_push(endpoint, bind=bind, sndhwm=sndhwm, linger_ms=2000,
                                              send_timeout_ms=send_timeout_ms, context=context))
        self.series: DetectorSeries | None = None
        self._next_series = 0
        self._next = 0
        self._date = _dt.datetime.now(_dt.UTC)
        self._t0 = 0
        self._codec: codecs.Codec | None = None
        self.frames_sent = 0

    def start_series(self, shape: tuple[int, int], dtype, nimages: int, *, channels=("threshold_1",),
                     count_time: float = 1e-4, frame_time: float = 1e-4, series_id: int | None = None,
                     config: Mapping | None = None) -> DetectorSeries:
        """Send a ``start`` message and return the series. ``config`` adds spec fields (``user_data``,
        ``threshold_energy``, ``beam_center_x``...). Raises ``ValueError`` for a dtype other than uint8/16/32."""
        dtype = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
        if dtype not in TAG_OF_DTYPE:
            raise ValueError(f"dtype {dtype} is not uint8, uint16 or uint32")
        sid = self._next_series if series_id is None else int(series_id)
        self.series = DetectorSeries(PROTOCOL, sid, str(uuid.uuid4()), tuple(channels), (int(shape[0]), int(shape[1])),
                                     dtype, int(nimages), float(count_time), float(frame_time), dict(config or {}))
        self._date = _dt.datetime.now(_dt.UTC).replace(microsecond=0)
        self._send(encode_start(self.series, arm_date=self._date))
        self._codec = codecs.Codec(self.compression if self.compression != "none" else codecs.NONE, dtype.itemsize)
        self._next_series = sid + 1
        self._next = 0
        self._t0 = time.monotonic_ns()
        return self.series

    def send_frame(self, frame, *, image_id: int | None = None, user_data: Any = None) -> None:
        """Encode and send one frame: an array (rows, cols) for one-channel series, else channel -> array.

        Raises ``RuntimeError`` with no series, ``ValueError`` for a missing channel, wrong shape or dtype.
        """
        s = self.series
        if s is None:
            raise RuntimeError("send_frame() before start_series()")
        if not isinstance(frame, Mapping):
            if len(s.channels) != 1:
                raise ValueError(f"series has channels {s.channels}; pass a mapping channel -> frame")
            frame = {s.channels[0]: frame}
        blobs = {}
        for ch in s.channels:
            if ch not in frame:
                raise ValueError(f"frame lacks channel {ch!r}")
            a = np.asarray(frame[ch])
            if a.shape != s.shape or a.dtype != s.dtype:
                raise ValueError(f"channel {ch!r}: {a.shape} {a.dtype}, series announced {s.shape} {s.dtype}")
            blobs[ch] = codecs.encode(a, self._codec)
        self.send_blobs(blobs, image_id=image_id, user_data=user_data)

    def send_blobs(self, blobs: Mapping[str, Any], *, image_id: int | None = None,
                   times_ns: tuple[int, int, int] | None = None, user_data: Any = None) -> None:
        """Send already encoded frames (channel -> blob in this sender's compression) without re-encoding."""
        s = self.series
        if s is None:
            raise RuntimeError("send_blobs() before start_series()")
        iid = self._next if image_id is None else int(image_id)
        if times_ns is None:
            stop = time.monotonic_ns() - self._t0
            times_ns = (max(stop - int(s.count_time * NS), 0), stop, int(s.count_time * NS))
        arrays = {ch: image_array(blobs[ch], s.shape, s.dtype, self.compression) for ch in s.channels}
        self._send(encode_image(s, iid, arrays, series_date=self._date, times_ns=times_ns, user_data=user_data))
        self._next = iid + 1
        self.frames_sent += 1

    def end_series(self) -> None:
        """Send the ``end`` message of the current series."""
        if self.series is not None:
            self._send(encode_end(self.series))
            self.series = None

    def send_raw(self, message) -> None:
        """Send one message unchanged (tests of bad input, replays)."""
        self._send(message)

    def _send(self, msg) -> None:
        try:
            self._sock.send(msg, copy=len(msg) < 65536)
        except zmq.Again:
            raise TimeoutError(f"send to {self.endpoint} timed out (receiver gone or too slow)") from None


# --- receiving ----------------------------------------------------------------------------------------------------


def _int(msg: Mapping, name: str, where: str, lo: int = 0) -> int:
    v = msg.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise MalformedMessage(f"{where} message: field {name!r} must be an integer >= {lo}, got {v!r}")
    return v


def series_from_start(msg: Mapping) -> DetectorSeries:
    """A :class:`DetectorSeries` from a decoded ``start`` message.

    Raises
    ------
    MalformedMessage
        Missing or invalid ``series_id``, ``series_unique_id``, ``channels``, image size or ``image_dtype``.
    """
    w = "start"
    channels = msg.get("channels")
    if (not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels)
            or len(set(channels)) != len(channels)):
        raise MalformedMessage(f"start message: channels must be a non-empty list of unique names, got {channels!r}")
    x, y = _int(msg, "image_size_x", w, 1), _int(msg, "image_size_y", w, 1)
    if x > 1 << 14 or y > 1 << 14:
        raise MalformedMessage(f"start message: image size {x}x{y} out of range")
    name = msg.get("image_dtype")
    dtype = DTYPE_NAMES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise MalformedMessage(f"start message: image_dtype {msg.get('image_dtype')!r} is not one of "
                               f"{sorted(DTYPE_NAMES)}")
    uid = msg.get("series_unique_id")
    if not isinstance(uid, str):
        raise MalformedMessage(f"start message: series_unique_id {uid!r} is not a string")
    config = {k: v for k, v in msg.items() if k not in ("type", "flatfield", "pixel_mask",
                                                        "countrate_correction_lookup_table")}
    number = msg.get("number_of_images", 0)
    ct, ft = msg.get("count_time", 0.0), msg.get("frame_time", 0.0)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (number, ct, ft)) or number < 0:
        raise MalformedMessage("start message: number_of_images, count_time, frame_time must be numbers")
    return DetectorSeries(PROTOCOL, _int(msg, "series_id", w), uid, tuple(channels), (y, x), dtype, int(number),
                          float(ct), float(ft), config)


class Stream2Adapter:
    """Reads Stream V2 messages into a :class:`beamloop.streams.dectris.sink.RingSink` (the protocol adapter of
    ``DetectorReceiver(protocol="stream2")``; not used directly).

    The whole message is read into one preallocated buffer bounded by ``max_header_bytes`` plus the blob
    bound of every channel; the CBOR is decoded (tags kept as :class:`MultiDimArray` etc.), checked against
    the series, and each channel's blob copied into its slot of the sink's arena.

    Parameters
    ----------
    socket, sink
        The PULL socket it reads and the sink it writes (:class:`beamloop.streams.dectris.sink.ProtocolAdapter`).
    max_header_bytes : int
        Bound on a message minus the blob bound of its channels.
    verify_hash : bool
        Unused (Stream V2 messages carry no hash).
    """

    def __init__(self, socket: zmq.Socket, sink: RingSink, *, max_header_bytes: int, verify_hash: bool) -> None:
        self.sink = sink
        self.sock = socket
        self.max_header_bytes = max_header_bytes
        self._buf = bytearray(max_header_bytes)
        self._view = memoryview(self._buf)

    def discard_rest(self) -> None:
        """Drop further parts of the current message (Stream V2 messages have one)."""
        while self.sock.get(zmq.RCVMORE):
            self.sink.counters.bytes += self.sock.recv_into(self._view)

    def _bound(self, series: DetectorSeries) -> None:
        """Grow the message buffer to hold a message of ``series`` (header bound plus every channel's blob)."""
        need = self.max_header_bytes + self.sink.slot_nbytes * len(series.channels)
        if len(self._buf) < need:
            self._buf = bytearray(need)
            self._view = memoryview(self._buf)

    def read(self, flags: int = 0) -> SeriesStart | SeriesEnd | None:
        """Read one message; returns a SeriesStart/SeriesEnd event, or None for an image (into the stack).

        ``flags=zmq.NOBLOCK`` raises ``zmq.Again`` when no message waits (nothing is consumed then).

        Raises
        ------
        ProtocolError
            The message is malformed, oversized, unexpected or does not match its series.
        """
        n = self.sock.recv_into(self._view, flags=flags)
        self.sink.counters.bytes += n
        check_oversize(n, len(self._buf), "Stream V2 message")
        if self.sock.get(zmq.RCVMORE):
            raise MalformedMessage("Stream V2 message has more than one part")
        msg = loads(self._view[:n])
        kind = msg.get("type")
        if kind == "image":
            return self._image(msg)
        if kind == "start":
            ev = self.sink.begin_series(series_from_start(msg))
            self._bound(ev.series)
            return ev
        if kind == "end":
            series = self.sink.series
            sid = _int(msg, "series_id", "end")
            if series is not None and msg.get("series_unique_id") != series.series_unique_id:
                raise UnexpectedMessage(f"end of series {msg.get('series_unique_id')!r}, "
                                        f"open series is {series.series_unique_id!r}")
            return self.sink.end_series(sid)
        raise MalformedMessage(f"unknown message type {kind!r} (expected start, image or end)")

    def _image(self, msg: dict) -> None:
        sink = self.sink
        image_id = _int(msg, "image_id", "image")
        s = sink.check_image(image_id, msg.get("series_id"))
        if msg.get("series_unique_id") != s.series_unique_id:
            raise UnexpectedMessage(f"image {image_id} belongs to series {msg.get('series_unique_id')!r}, "
                                    f"not the open series {s.series_unique_id!r}")
        data = msg.get("data")
        if not isinstance(data, dict) or tuple(data) != s.channels:
            got = tuple(data) if isinstance(data, dict) else type(data).__name__
            raise FrameMismatch(f"image {image_id} carries channels {got}, series announced {s.channels}")
        times = [rational_ns(msg.get(k, [0, 1]), f"image {image_id} {k}")
                 for k in ("start_time", "stop_time", "real_time")]
        for ch, item in data.items():
            codec, payload = self._check_array(item, s, image_id, ch)
            sink.set_codec(ch, codec, f"image {image_id} channel {ch!r}: compression")
            view = sink.slot_view(ch)
            nb = len(payload)
            check_oversize(nb, len(view), f"image {image_id} channel {ch!r} blob")
            view[:nb] = payload
            sink.set_blob_nbytes(ch, nb)
        sink.commit_image(image_id, *times)

    @staticmethod
    def _check_array(item, s: DetectorSeries, image_id: int, ch: str) -> tuple[codecs.Codec, bytes]:
        what = f"image {image_id} channel {ch!r}"
        if not isinstance(item, MultiDimArray):
            raise MalformedMessage(f"{what}: data is not a tag-40 multi-dimensional array")
        if item.dims != [s.shape[0], s.shape[1]]:
            raise FrameMismatch(f"{what}: dimensions {item.dims}, series announced {list(s.shape)}")
        arr = item.array
        if not isinstance(arr, TypedArray):
            raise MalformedMessage(f"{what}: tag-40 content is not a typed array")
        if arr.dtype is None:
            raise MalformedMessage(f"{what}: typed-array tag {arr.tag} is not uint8 (64), uint16 LE (69) or "
                                   "uint32 LE (70)")
        if arr.dtype != np.dtype(s.dtype):
            raise FrameMismatch(f"{what}: typed-array tag {arr.tag} ({arr.dtype}), series announced {s.dtype}")
        p = arr.payload
        if isinstance(p, bytes):
            if len(p) != s.frame_nbytes:
                raise FrameMismatch(f"{what}: {len(p)} bytes, frame has {s.frame_nbytes}")
            return codecs.Codec(codecs.NONE, arr.dtype.itemsize), p
        if not isinstance(p, Compressed):
            raise MalformedMessage(f"{what}: typed array holds neither a byte string nor tag 56500")
        if p.algorithm == "bslz4":
            if p.modifier != arr.dtype.itemsize:
                raise FrameMismatch(f"{what}: bslz4 element size {p.modifier}, pixels have {arr.dtype.itemsize}")
        elif p.algorithm != "lz4":
            raise MalformedMessage(f"{what}: unknown compression {p.algorithm!r} (expected bslz4 or lz4)")
        codecs.check_header(p.data, s.frame_nbytes)
        return codecs.Codec(p.algorithm, arr.dtype.itemsize), p.data
