"""The native beamloop frame stream: message layout, encoders and validating decoders.

The layout follows DECTRIS Stream V2 (public spec: github.com/dectris/documentation, ``stream_v2/``):
one ``start`` message per series, one ``image`` message per frame, one ``end`` message, each a CBOR map
wrapped in the self-describe tag 55799 (RFC 8949 section 3.4.6) whose ``type`` field says which it is.
Field names and meanings are Stream V2's (``series_id``, ``series_unique_id``, ``image_id``,
``start_time`` / ``stop_time`` / ``real_time`` as rationals ``[numerator, denominator]`` in seconds,
``user_data``); beamloop's own metadata travels in ``user_data``.

One difference from Stream V2, for speed: pixel data do not sit inside the CBOR map. An ``image``
message is a multipart ZeroMQ message, like DECTRIS SIMPLON stream v1: part 0 is the CBOR map, whose
``data`` field lists one blob descriptor per channel (``encoding``, ``size`` in bytes), and parts 1..k
are the blobs, in the order of the series' ``channels``. A sender can then hand ZeroMQ the frame's own
memory, and a receiver can read a raw blob straight into a preallocated frame buffer
(:meth:`zmq.Socket.recv_into`), with no copy in Python.

Encodings: ``raw`` (the frame's bytes, little-endian, C order) and ``lz4`` (one LZ4 block without a
size prefix, as SIMPLON v1's ``lz4<``; the uncompressed size is fixed by the series' shape and dtype, so
a blob can never decompress to more than one frame).

beamloop ``user_data`` keys (all optional):

- start: ``pixel_size_A`` (float, Angstrom per pixel), ``scan`` (map: ``frame_id`` int, ``shape``
  [rows, cols], ``fov_nm`` [height, width], ``rotation_deg``, ``dwell_us``), ``kind`` (``"frame"`` for
  scanned images, ``"parked"`` for the ADF signal at a parked probe, one row of samples per message),
  ``probe_position`` [x, y] as fractions of the scan frame, ``sample_time_s`` (parked streams).
- spectrum series (``kind`` ``"spectrum"``): every image is one 1-D spectrum per channel, sent as a frame of
  shape (1, channels); ``energy`` (map: ``offset_eV`` the energy of channel 0's centre, ``dispersion_eV`` per
  channel, ``channels`` equal to the series' ``image_size_x``, optional ``resolution_eV``), checked by the
  decoder (:func:`energy_axis`); ``probe_positions`` optional, as ``[x, y]`` fractions per image in the image's
  ``user_data`` ``probe_position``. The energy calibration is that of an EELS spectrometer's dispersion
  (Egerton, *Electron Energy-Loss Spectroscopy in the Electron Microscope*, 3rd ed., 2011, sec. 2.2).
- image: ``sent_ns`` (sender's ``time.monotonic_ns()`` when the message left; on one host it gives the
  transport latency), ``first_sample`` (parked streams: index of the first sample in the message).
"""

from __future__ import annotations

import datetime as _dt
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
import lz4.block
import numpy as np

from beamloop.streams._ids import NS, rational_ns
from beamloop.streams.errors import FrameMismatch, MalformedMessage, TruncatedMessage, UnexpectedMessage

PROTOCOL = "beamloop-stream/1"
"""Value of the ``protocol`` field in every ``start`` message."""

SELF_DESCRIBE_TAG = 55799
"""CBOR self-describe tag (RFC 8949, section 3.4.6); Stream V2 wraps every message in it."""

SELF_DESCRIBE_PREFIX = b"\xd9\xd9\xf7"
"""The three bytes that encode tag 55799 (major type 6, two-byte argument 0xd9f7)."""

DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("u1"),
    "uint16": np.dtype("<u2"),
    "uint32": np.dtype("<u4"),
    "float32": np.dtype("<f4"),
}
"""Pixel types a series may announce (``image_dtype``), little-endian as in Stream V2."""

DEFAULT_CHANNEL = "haadf"
"""Channel name of single-detector series."""

ENCODINGS = ("raw", "lz4")
"""Blob encodings understood by :func:`decode_blob_into`."""


def _dtype_name(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    for name, known in DTYPES.items():
        if dtype == known:
            return name
    raise ValueError(f"dtype {dtype} is not one of {sorted(DTYPES)} (little-endian)")


@dataclass(frozen=True)
class SeriesHeader:
    """A decoded ``start`` message: what every frame of the series will look like.

    Attributes
    ----------
    series_id : int
        Series number (increments per series on one sender).
    series_unique_id : str
        Globally unique id of the series (a UUID string).
    channels : tuple of str
        Channel names, e.g. ``("haadf",)``; every image carries one blob per channel, in this order.
    dtype : numpy.dtype
        Pixel type of every channel (one of :data:`DTYPES`).
    shape : tuple (rows, cols)
        Frame shape in pixels; a parked-probe series has ``rows == 1`` and ``cols`` samples per message.
    number_of_images : int
        Images the sender intends to send; 0 when open-ended.
    count_time, frame_time : float
        Seconds per frame spent counting, and between frame starts (Stream V2 meaning).
    user_data : dict
        beamloop metadata (see the module docstring).
    arm_date : datetime.datetime
        When the series was armed (UTC).
    """

    series_id: int
    series_unique_id: str
    channels: tuple[str, ...]
    dtype: np.dtype
    shape: tuple[int, int]
    number_of_images: int = 0
    count_time: float = 0.0
    frame_time: float = 0.0
    user_data: dict = field(default_factory=dict)
    arm_date: _dt.datetime = field(default_factory=lambda: _dt.datetime.now(_dt.UTC))

    @property
    def frame_nbytes(self) -> int:
        """Bytes of one channel of one uncompressed frame."""
        return int(self.shape[0] * self.shape[1] * self.dtype.itemsize)

    @property
    def max_blob_nbytes(self) -> int:
        """Largest blob a valid image of this series can carry (an incompressible LZ4 block)."""
        n = self.frame_nbytes
        return n + n // 255 + 16  # LZ4_COMPRESSBOUND (lz4.h)


@dataclass(frozen=True)
class BlobInfo:
    """One channel's blob descriptor inside an ``image`` message: ``encoding`` and ``size`` in bytes."""

    channel: str
    encoding: str
    size: int


@dataclass(frozen=True)
class ImageHeader:
    """A decoded ``image`` message header (part 0); the blobs follow as further message parts.

    Times are in nanoseconds since the series was armed (Stream V2 rationals converted);
    ``user_data`` holds beamloop's per-image metadata.
    """

    series_id: int
    series_unique_id: str
    image_id: int
    blobs: tuple[BlobInfo, ...]
    start_time_ns: int = 0
    stop_time_ns: int = 0
    real_time_ns: int = 0
    user_data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EndHeader:
    """A decoded ``end`` message."""

    series_id: int
    series_unique_id: str
    user_data: dict = field(default_factory=dict)


def new_series(
    series_id: int,
    channels: tuple[str, ...] | list[str],
    shape: tuple[int, int],
    dtype: Any,
    *,
    number_of_images: int = 0,
    count_time: float = 0.0,
    frame_time: float = 0.0,
    user_data: Mapping | None = None,
) -> SeriesHeader:
    """Build a :class:`SeriesHeader` with a fresh unique id, checking every field.

    Raises
    ------
    ValueError
        Empty or duplicate channel names, a non-positive shape, or a dtype outside :data:`DTYPES`.
    """
    channels = tuple(str(c) for c in channels)
    if not channels or len(set(channels)) != len(channels):
        raise ValueError(f"channels must be non-empty and unique, got {channels}")
    rows, cols = (int(s) for s in shape)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"frame shape must be positive, got {shape}")
    dt = DTYPES[_dtype_name(dtype)]
    return SeriesHeader(
        series_id=int(series_id),
        series_unique_id=str(uuid.uuid4()),
        channels=channels,
        dtype=dt,
        shape=(rows, cols),
        number_of_images=int(number_of_images),
        count_time=float(count_time),
        frame_time=float(frame_time),
        user_data=dict(user_data or {}),
    )


SPECTRUM_KIND = "spectrum"
"""``user_data`` ``kind`` of a series of 1-D spectra."""


@dataclass(frozen=True)
class EnergyAxis:
    """The energy calibration of a spectrum series (the ``energy`` map of its ``user_data``).

    Attributes
    ----------
    offset_eV : float
        Energy of channel 0's centre, eV (finite).
    dispersion_eV : float
        eV per channel (finite, > 0).
    channels : int
        Channels per spectrum (1 .. 2**20).
    resolution_eV : float or None
        Energy resolution (zero-loss peak FWHM), eV; None: not stated.

    Raises
    ------
    ValueError
        A field outside its range.
    """

    offset_eV: float
    dispersion_eV: float
    channels: int
    resolution_eV: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.offset_eV, (int, float)) and math.isfinite(self.offset_eV)):
            raise ValueError(f"energy offset_eV must be a finite number, got {self.offset_eV!r}")
        if not (isinstance(self.dispersion_eV, (int, float)) and math.isfinite(self.dispersion_eV)
                and self.dispersion_eV > 0):
            raise ValueError(f"energy dispersion_eV must be a finite number > 0, got {self.dispersion_eV!r}")
        if not (isinstance(self.channels, int) and not isinstance(self.channels, bool)
                and 0 < self.channels <= 1 << 20):
            raise ValueError(f"energy channels must be a whole number in [1, {1 << 20}], got {self.channels!r}")
        if self.resolution_eV is not None and not (isinstance(self.resolution_eV, (int, float))
                                                   and math.isfinite(self.resolution_eV) and self.resolution_eV > 0):
            raise ValueError(f"energy resolution_eV must be a finite number > 0 or absent, got {self.resolution_eV!r}")

    @property
    def energy_eV(self) -> np.ndarray:
        """Channel centres, (channels,) float64, eV."""
        return self.offset_eV + self.dispersion_eV * np.arange(self.channels, dtype=np.float64)

    def as_dict(self) -> dict:
        """The ``energy`` map of the series' ``user_data``."""
        d: dict = {"offset_eV": float(self.offset_eV), "dispersion_eV": float(self.dispersion_eV),
                   "channels": int(self.channels)}
        if self.resolution_eV is not None:
            d["resolution_eV"] = float(self.resolution_eV)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> EnergyAxis:
        """The inverse of :meth:`as_dict`; ``ValueError`` when a field is missing or out of range."""
        if not isinstance(d, Mapping):
            raise ValueError(f"energy calibration must be a map, got {type(d).__name__}")
        try:
            return cls(d["offset_eV"], d["dispersion_eV"], d["channels"], d.get("resolution_eV"))
        except KeyError as exc:
            raise ValueError(f"energy calibration lacks {exc.args[0]!r}") from None


def spectrum_series(series_id: int, channels: tuple[str, ...] | list[str], energy: EnergyAxis, dtype: Any, *,
                    number_of_images: int = 0, count_time: float = 0.0, frame_time: float = 0.0,
                    user_data: Mapping | None = None) -> SeriesHeader:
    """A :class:`SeriesHeader` of 1-D spectra: frames of shape (1, ``energy.channels``), ``kind`` ``"spectrum"``
    and the calibration in ``user_data["energy"]`` (module docstring).

    Raises
    ------
    ValueError
        As :func:`new_series`.
    """
    ud = {**dict(user_data or {}), "kind": SPECTRUM_KIND, "energy": energy.as_dict()}
    return new_series(series_id, channels, (1, energy.channels), dtype, number_of_images=number_of_images,
                      count_time=count_time, frame_time=frame_time, user_data=ud)


def energy_axis(series: SeriesHeader) -> EnergyAxis | None:
    """The energy calibration of a spectrum series; None for a series of another ``kind``.

    Raises
    ------
    MalformedMessage
        A spectrum series without a valid ``energy`` map, with frames of more than one row, or whose
        ``channels`` differ from its frame width.
    """
    if series.user_data.get("kind") != SPECTRUM_KIND:
        return None
    try:
        axis = EnergyAxis.from_dict(series.user_data.get("energy"))
    except ValueError as exc:
        raise MalformedMessage(f"start message: spectrum series: {exc}") from None
    if series.shape != (1, axis.channels):
        raise MalformedMessage(f"start message: spectrum series of {axis.channels} channels needs frames of shape "
                               f"(1, {axis.channels}), got {series.shape}")
    return axis


def _dumps(msg: dict) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(SELF_DESCRIBE_TAG, msg), timezone=_dt.UTC)


def encode_start(series: SeriesHeader) -> bytes:
    """CBOR bytes of the ``start`` message for ``series``."""
    return _dumps(
        {
            "type": "start",
            "protocol": PROTOCOL,
            "series_id": series.series_id,
            "series_unique_id": series.series_unique_id,
            "arm_date": series.arm_date,
            "channels": list(series.channels),
            "image_dtype": _dtype_name(series.dtype),
            "image_size_x": series.shape[1],
            "image_size_y": series.shape[0],
            "number_of_images": series.number_of_images,
            "count_time": series.count_time,
            "frame_time": series.frame_time,
            "user_data": series.user_data,
        }
    )


def encode_image_header(
    series: SeriesHeader,
    image_id: int,
    blobs: list[tuple[str, int]],
    *,
    start_time_ns: int = 0,
    stop_time_ns: int = 0,
    real_time_ns: int = 0,
    user_data: Mapping | None = None,
) -> bytes:
    """CBOR bytes of an ``image`` message's part 0.

    Parameters
    ----------
    blobs : list of (encoding, size)
        One entry per channel of ``series``, in channel order; ``size`` is the blob's length in bytes.
    start_time_ns, stop_time_ns, real_time_ns : int
        Nanoseconds since the series was armed (``real_time``: the exposure); sent as Stream V2 rationals
        ``[ns, 1e9]``. Never negative (:func:`beamloop.streams._ids.rational_ns` rejects negative times).

    Raises
    ------
    ValueError
        Not one blob per channel, or a negative time.
    """
    if len(blobs) != len(series.channels):
        raise ValueError(f"{len(blobs)} blobs for {len(series.channels)} channels")
    if min(start_time_ns, stop_time_ns, real_time_ns) < 0:
        raise ValueError(f"image times must be >= 0 ns, got {start_time_ns}, {stop_time_ns}, {real_time_ns}")
    return _dumps(
        {
            "type": "image",
            "series_id": series.series_id,
            "series_unique_id": series.series_unique_id,
            "image_id": int(image_id),
            "start_time": [int(start_time_ns), NS],
            "stop_time": [int(stop_time_ns), NS],
            "real_time": [int(real_time_ns), NS],
            "user_data": dict(user_data or {}),
            "data": {ch: {"encoding": enc, "size": int(size)} for ch, (enc, size) in zip(series.channels, blobs)},
        }
    )


def encode_end(series: SeriesHeader, user_data: Mapping | None = None) -> bytes:
    """CBOR bytes of the ``end`` message for ``series``."""
    return _dumps(
        {
            "type": "end",
            "series_id": series.series_id,
            "series_unique_id": series.series_unique_id,
            "user_data": dict(user_data or {}),
        }
    )


def _get(msg: Mapping, name: str, types: type | tuple, where: str) -> Any:
    if name not in msg:
        raise MalformedMessage(f"{where} message: missing field {name!r}")
    value = msg[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise MalformedMessage(f"{where} message: field {name!r} has type {type(value).__name__}")
    return value


def _user_data(msg: Mapping, where: str) -> dict:
    ud = msg.get("user_data", {})
    if not isinstance(ud, dict):
        raise MalformedMessage(f"{where} message: user_data must be a map, got {type(ud).__name__}")
    return ud


def decode_header(buf: bytes | memoryview) -> SeriesHeader | ImageHeader | EndHeader:
    """Decode and validate part 0 of a native stream message.

    Parameters
    ----------
    buf : bytes-like
        The CBOR bytes of the message's first part.

    Returns
    -------
    SeriesHeader, ImageHeader or EndHeader

    Raises
    ------
    MalformedMessage
        Not CBOR, not wrapped in tag 55799, not a map, an unknown ``type``, a missing field or one of
        the wrong type or range (a negative time among them), an unknown dtype or encoding.
    """
    buf = memoryview(buf)
    if bytes(buf[:3]) != SELF_DESCRIBE_PREFIX:
        raise MalformedMessage("message part 0 does not start with the CBOR self-describe tag 55799")
    try:
        msg = cbor2.loads(buf[3:], max_depth=16, allow_duplicate_keys=False, strict_hashable_types=True)
    except Exception as exc:  # cbor2 raises several types for bad input
        raise MalformedMessage(f"message part 0 is not valid CBOR ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, dict):
        raise MalformedMessage(f"message part 0 holds a {type(msg).__name__}, expected a map")
    kind = msg.get("type")
    if kind == "image":
        return _decode_image(msg)
    if kind == "start":
        return _decode_start(msg)
    if kind == "end":
        return EndHeader(
            series_id=_get(msg, "series_id", int, "end"),
            series_unique_id=_get(msg, "series_unique_id", str, "end"),
            user_data=_user_data(msg, "end"),
        )
    raise MalformedMessage(f"unknown message type {kind!r} (expected start, image or end)")


def _decode_start(msg: dict) -> SeriesHeader:
    w = "start"
    if msg.get("protocol") != PROTOCOL:
        raise MalformedMessage(f"start message: protocol {msg.get('protocol')!r} is not {PROTOCOL!r}")
    channels = _get(msg, "channels", list, w)
    if not channels or not all(isinstance(c, str) for c in channels) or len(set(channels)) != len(channels):
        raise MalformedMessage(f"start message: channels must be unique strings, got {channels!r}")
    dtype_name = _get(msg, "image_dtype", str, w)
    if dtype_name not in DTYPES:
        raise MalformedMessage(f"start message: image_dtype {dtype_name!r} is not one of {sorted(DTYPES)}")
    cols = _get(msg, "image_size_x", int, w)
    rows = _get(msg, "image_size_y", int, w)
    if not (0 < rows <= 1 << 16 and 0 < cols <= 1 << 20):
        raise MalformedMessage(f"start message: frame size {rows}x{cols} out of range")
    arm = msg.get("arm_date")
    if not isinstance(arm, _dt.datetime):
        arm = _dt.datetime.now(_dt.UTC)
    nimg = _get(msg, "number_of_images", int, w)
    if nimg < 0:
        raise MalformedMessage(f"start message: number_of_images {nimg} is negative")
    header = SeriesHeader(
        series_id=_get(msg, "series_id", int, w),
        series_unique_id=_get(msg, "series_unique_id", str, w),
        channels=tuple(channels),
        dtype=DTYPES[dtype_name],
        shape=(rows, cols),
        number_of_images=nimg,
        count_time=float(_get(msg, "count_time", (int, float), w)),
        frame_time=float(_get(msg, "frame_time", (int, float), w)),
        user_data=_user_data(msg, w),
        arm_date=arm,
    )
    energy_axis(header)  # a spectrum series must carry a usable calibration
    return header


def _time_ns(msg: Mapping, name: str) -> int:
    """An image time field (Stream V2 rational seconds, default 0) in nanoseconds."""
    return rational_ns(msg.get(name, [0, NS]), f"image message: field {name!r}")


def _decode_image(msg: dict) -> ImageHeader:
    w = "image"
    data = _get(msg, "data", dict, w)
    blobs = []
    for ch, desc in data.items():
        if not isinstance(ch, str) or not isinstance(desc, dict):
            raise MalformedMessage("image message: data must map channel names to blob descriptors")
        enc = desc.get("encoding")
        size = desc.get("size")
        if enc not in ENCODINGS:
            raise MalformedMessage(f"image message: channel {ch!r} has unknown encoding {enc!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MalformedMessage(f"image message: channel {ch!r} has invalid blob size {size!r}")
        blobs.append(BlobInfo(ch, enc, size))
    image_id = _get(msg, "image_id", int, w)
    if image_id < 0:
        raise MalformedMessage(f"image message: image_id {image_id} is negative")
    return ImageHeader(
        series_id=_get(msg, "series_id", int, w),
        series_unique_id=_get(msg, "series_unique_id", str, w),
        image_id=image_id,
        blobs=tuple(blobs),
        start_time_ns=_time_ns(msg, "start_time"),
        stop_time_ns=_time_ns(msg, "stop_time"),
        real_time_ns=_time_ns(msg, "real_time"),
        user_data=_user_data(msg, w),
    )


def check_image(series: SeriesHeader | None, image: ImageHeader) -> None:
    """Check that ``image`` belongs to ``series`` and carries what its ``start`` announced.

    Raises
    ------
    UnexpectedMessage
        No series is open, or the image belongs to another series.
    FrameMismatch
        Channels differ from the series' channels, or a raw blob's size differs from the frame size,
        or an LZ4 blob is larger than the LZ4 bound of one frame.
    """
    if series is None:
        raise UnexpectedMessage(f"image {image.image_id} arrived with no open series (no start message)")
    if image.series_unique_id != series.series_unique_id:
        raise UnexpectedMessage(
            f"image {image.image_id} belongs to series {image.series_id} ({image.series_unique_id}), "
            f"not the open series {series.series_id} ({series.series_unique_id})"
        )
    names = tuple(b.channel for b in image.blobs)
    if names != series.channels:
        raise FrameMismatch(f"image {image.image_id} carries channels {names}, series announced {series.channels}")
    for b in image.blobs:
        if b.encoding == "raw" and b.size != series.frame_nbytes:
            raise FrameMismatch(
                f"image {image.image_id} channel {b.channel!r}: raw blob of {b.size} bytes, "
                f"expected {series.frame_nbytes} ({series.shape[0]}x{series.shape[1]} {series.dtype})"
            )
        if b.encoding == "lz4" and b.size > series.max_blob_nbytes:
            raise FrameMismatch(
                f"image {image.image_id} channel {b.channel!r}: lz4 blob of {b.size} bytes exceeds the bound "
                f"{series.max_blob_nbytes} for one {series.frame_nbytes}-byte frame"
            )


def encode_blob(frame: np.ndarray, encoding: str) -> Any:
    """The bytes to send for one channel of one frame.

    Parameters
    ----------
    frame : ndarray, shape (rows, cols)
        C-contiguous, in the series' little-endian dtype.
    encoding : {"raw", "lz4"}

    Returns
    -------
    buffer
        ``raw``: the array itself (sent without copying); ``lz4``: the compressed bytes.
    """
    if encoding == "raw":
        return frame
    if encoding == "lz4":
        return lz4.block.compress(frame, store_size=False)
    raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def decode_blob_into(blob: memoryview | bytes, encoding: str, out: np.ndarray) -> None:
    """Decode one received blob into the frame buffer ``out`` (shape and dtype of the series).

    ``raw`` blobs are normally read straight into ``out`` by the receiver and never pass here.

    Raises
    ------
    TruncatedMessage
        A raw blob shorter than the frame.
    MalformedMessage
        LZ4 data that is corrupt or does not decompress to exactly one frame.
    """
    nbytes = out.nbytes
    if encoding == "raw":
        if len(blob) != nbytes:
            raise TruncatedMessage(f"raw blob of {len(blob)} bytes, expected {nbytes}")
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(blob, np.uint8)
        return
    if encoding == "lz4":
        try:
            raw = lz4.block.decompress(blob, uncompressed_size=nbytes)
        except Exception as exc:  # lz4 raises LZ4BlockError for corrupt or oversized data
            raise MalformedMessage(f"lz4 blob does not decode to one {nbytes}-byte frame: {exc}") from None
        if len(raw) != nbytes:
            raise TruncatedMessage(f"lz4 blob decoded to {len(raw)} bytes, expected {nbytes}")
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, np.uint8)
        return
    raise MalformedMessage(f"unknown encoding {encoding!r}")
