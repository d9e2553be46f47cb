"""Quantum Detectors Merlin MIB format: the acquisition header, frame headers and pixel layouts.

As the Merlin EM manual (Quantum Detectors, "Merlin for EM: technical manual", TCP/IP data output and the
MIB file format) describes them, and LiberTEM's MIB reader (``libertem.io.dataset.mib``) reads them:

Messages on the data port (TCP 6342)
    ``MPX,`` + 10 decimal digits + ``,`` then a payload; the number counts the bytes after it, the comma
    included (so the payload is one byte shorter). The payload is an acquisition header or a frame.
Acquisition header
    ``HDR,`` then lines ``Key:<TAB>value`` (``Frames in Acquisition (Number)``, ``Frames per Trigger
    (Number)``, ``Counter Depth (number)``, optionally ``ScanX`` / ``ScanY``...), ending with ``End``.
Frame
    An ASCII header of comma-separated fields padded (with NUL bytes) to its declared size:
    ``MQ1``, sequence number (1-based, 6 digits), header size in bytes (5), chips (2), width (4), height (4),
    pixel type (``U08``, ``U16``, ``U32``: counting mode; ``R64``: raw mode), sensor layout (``1x1``, ``2x2``,
    ``Nx1``, ``2x2G``, ``Nx1G``, right-aligned in 6), chip select (hex), time stamp, shutter time (s),
    counter, colour mode, gain mode, thresholds and DACs, and the extension ``MQ1A``, time stamp (ns),
    shutter time (``<n>ns``), counter depth (1, 6, 12 or 24 bits). The pixels follow.
Pixels
    Counting mode: big-endian ``U08`` / ``U16`` / ``U32`` in raster order. Raw mode (``R64``, the Medipix3
    readout words): 1-bit pixels packed 64 to a big-endian word, least significant bit first; 6-bit pixels one
    byte each and 12-bit pixels one big-endian u16 each, both in 64-bit words whose elements are stored in
    reverse order; 24-bit pixels as two 12-bit frames one after the other, the first holding the high 12 bits
    (and the header's width counts both, twice the frame's). A Merlin Quad (4 chips, ``2x2`` / ``2x2G``) sends
    raw frames as 256 rows of 1024 pixels, each row the four chips' rows in the order 4, 3, 2, 1; the 512x512
    frame has chips 1 and 2 on top as they come, and chips 3 and 4 below, flipped in both directions (as
    LiberTEM's MIB reader assembles them; no gap pixels in raw mode).

Everything here works on whole stacks of frames with numpy (no Python per pixel).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

from beamloop.streams.errors import FrameMismatch, MalformedMessage

PREFIX_BYTES = 15
"""``MPX,`` + 10 digits + ``,``."""

DATA_PORT = 6342
"""Merlin's TCP data port (the control port is 6341)."""

COUNTER_DEPTHS = (1, 6, 12, 24)
"""Counter depths of the Medipix3 (bits per pixel)."""

COUNTING_TYPES = {"U08": np.dtype(">u1"), "U16": np.dtype(">u2"), "U32": np.dtype(">u4")}
"""Counting-mode pixel types -> their big-endian numpy types."""

RAW = "R64"
"""The raw-mode pixel type."""

RAW_DTYPES = {1: np.dtype(np.uint8), 6: np.dtype(np.uint8), 12: np.dtype(np.uint16), 24: np.dtype(np.uint32)}
"""Raw mode: counter depth -> the little-endian type frames are unpacked to."""

LAYOUTS = ("1x1", "2x2", "Nx1", "2x2G", "Nx1G")
"""Sensor layouts a frame header may name."""

QUAD_LAYOUTS = ("2x2", "2x2G")
"""Layouts of a Merlin Quad, whose raw frames are reassembled from the four chips."""

CHIP = 256
"""Pixels per side of a Medipix3 chip."""


def mpx_prefix(payload_nbytes: int) -> bytes:
    """The 15-byte ``MPX,<length>,`` prefix of a payload of ``payload_nbytes`` bytes (length = payload + 1)."""
    return b"MPX,%010d," % (payload_nbytes + 1)


def parse_prefix(prefix: bytes | memoryview) -> int:
    """The payload length, bytes, of a message whose 15-byte prefix is ``prefix``.

    Raises
    ------
    MalformedMessage
        Not ``MPX,`` + 10 decimal digits + ``,``, or a length of 0.
    """
    p = bytes(prefix)
    if len(p) != PREFIX_BYTES or p[:4] != b"MPX," or p[14:15] != b"," or not p[4:14].isdigit():
        raise MalformedMessage(f"message prefix {p[:PREFIX_BYTES]!r} is not 'MPX,<10 digits>,'")
    n = int(p[4:14])
    if n < 1:
        raise MalformedMessage("message prefix declares a length of 0 (the comma alone is 1)")
    return n - 1


# --- acquisition header ----------------------------------------------------------------------------------------


def parse_acquisition_header(payload: bytes | memoryview) -> dict[str, str]:
    """The ``Key: value`` fields of an acquisition header.

    Parameters
    ----------
    payload : bytes
        The message payload, starting ``HDR,``; Latin-1 text (Merlin writes e.g. ``µ``).

    Returns
    -------
    dict
        Key (without the colon) -> value, both stripped. ``Frames in Acquisition (Number)`` is checked to be a
        non-negative integer (0: continuous, unknown number); lines after ``End`` are ignored.

    Raises
    ------
    MalformedMessage
        No ``HDR,`` start, no ``End`` line, or a missing or invalid ``Frames in Acquisition (Number)``.
    """
    text = bytes(payload).decode("latin-1")
    if not text.startswith("HDR,"):
        raise MalformedMessage(f"acquisition header starts {text[:8]!r}, not 'HDR,'")
    fields: dict[str, str] = {}
    ended = False
    for line in text.split("\n")[1:]:
        if line.strip().rstrip("\x00").strip() == "End" or line.startswith("End\t"):
            ended = True
            break
        key, sep, value = line.partition("\t")
        if sep:
            fields.setdefault(key.strip().rstrip(":").strip(), value.strip())
    if not ended:
        raise MalformedMessage("acquisition header has no 'End' line")
    frames = fields.get("Frames in Acquisition (Number)")
    if frames is None or not frames.isdigit():
        raise MalformedMessage(f"acquisition header: 'Frames in Acquisition (Number)' is {frames!r}, not an integer")
    return fields


def acquisition_header(frames: int, *, frames_per_trigger: int | None = None, counter_depth: int = 12,
                       raw: bool = False, scan: tuple[int, int] | None = None, extra: dict | None = None) -> bytes:
    """An acquisition header payload (``HDR,`` ... ``End``), as Merlin sends it and writes ``.hdr`` files.

    Parameters
    ----------
    frames : int
        ``Frames in Acquisition (Number)``.
    frames_per_trigger : int, optional
        ``Frames per Trigger (Number)`` (default: ``scan[1]`` or ``frames``); LiberTEM takes the scan's
        columns from it when there is no ``ScanX``.
    counter_depth : int
        ``Counter Depth (number)``, bits.
    raw : bool
        Raw mode (``Raw`` in ``Readout System``'s neighbours is not standard; the mode is in the frame headers).
    scan : (rows, cols), optional
        Adds ``ScanX`` and ``ScanY``.
    extra : dict, optional
        More ``key: value`` lines.
    """
    fpt = frames_per_trigger if frames_per_trigger is not None else (scan[1] if scan else max(frames, 1))
    lines = ["HDR,\t",
             f"Time and Date Stamp (day, mnth, yr, hr, min, s):\t{_dt.datetime.now():%d/%m/%Y %H:%M:%S}",
             "Chip ID:\tW000_A0,-,-,-", "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX):\tMedipix 3RX",
             "Assembly Size (NX1, 2X2):\t   1x1", "Chip Mode  (SPM, CSM, CM, CSCM):\tSPM",
             f"Counter Depth (number):\t{counter_depth}", "Gain:\tSLGM", "Active Counters:\tAlternating",
             f"Frames in Acquisition (Number):\t{frames}", f"Frames per Trigger (Number):\t{fpt}",
             f"Readout Mode:\t{'Raw' if raw else 'Counting'}"]
    if scan:
        lines += [f"ScanX:\t{scan[1]}", f"ScanY:\t{scan[0]}"]
    lines += [f"{k}:\t{v}" for k, v in (extra or {}).items()]
    lines.append("End\t")
    return "\n".join(lines).encode("latin-1")


# --- frame header --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameHeader:
    """The fields of a frame header that say what its pixels are.

    Attributes
    ----------
    sequence : int
        Frame number, 1-based within the acquisition.
    header_nbytes : int
        Size of the header, bytes (the pixels start there).
    chips : int
    width, height : int
        The frame's pixels (for 24-bit raw frames, ``width`` is the frame's, half the header's field).
    pixel_type : str
        ``U08``, ``U16``, ``U32`` or ``R64``.
    layout : str
        Sensor layout (``1x1``...).
    counter : int
        The counter (0 or 1) the frame was read from.
    counter_depth : int
        Bits per pixel (1, 6, 12, 24).
    shutter_ns : int
        Shutter (exposure) time, nanoseconds.
    """

    sequence: int
    header_nbytes: int
    chips: int
    width: int
    height: int
    pixel_type: str
    layout: str
    counter: int
    counter_depth: int
    shutter_ns: int

    @property
    def raw(self) -> bool:
        """Raw mode (``R64``)."""
        return self.pixel_type == RAW

    @property
    def quad(self) -> bool:
        """A raw frame of a 2x2 quad (reassembled from the four chips' rows)."""
        return self.raw and self.chips == 4

    @property
    def dtype(self) -> np.dtype:
        """The little-endian type of the unpacked frames (uint8, uint16 or uint32)."""
        if self.raw:
            return RAW_DTYPES[self.counter_depth]
        return COUNTING_TYPES[self.pixel_type].newbyteorder("<")

    @property
    def data_nbytes(self) -> int:
        """Bytes of the pixels that follow the header."""
        return pixels_nbytes(self.height, self.width, self.pixel_type, self.counter_depth)


def pixels_nbytes(height: int, width: int, pixel_type: str, counter_depth: int) -> int:
    """Bytes of one frame's pixels (see the module docstring)."""
    n = height * width
    if pixel_type != RAW:
        return n * COUNTING_TYPES[pixel_type].itemsize
    return {1: n // 8, 6: n, 12: 2 * n, 24: 4 * n}[counter_depth]


def _int(text: str, what: str, base: int = 10) -> int:
    t = text.strip()
    try:
        v = int(t, base)
    except ValueError:
        raise MalformedMessage(f"frame header: {what} {text!r} is not an integer") from None
    if v < 0:
        raise MalformedMessage(f"frame header: {what} {v} is negative")
    return v


def parse_frame_header(header: bytes | memoryview, *, default_depth: int | None = None) -> FrameHeader:
    """Parse a frame header (``MQ1,...``, up to its declared size).

    Parameters
    ----------
    header : bytes
        The header bytes (at least its declared size; more is ignored).
    default_depth : int, optional
        Counter depth when the header has no ``MQ1A`` extension (the acquisition header's
        ``Counter Depth (number)``); counting-mode frames fall back on their type's (8, 12 or 24 bits... as
        U08 / U16 / U32 hold 1-6, 12 and 24-bit counters).

    Raises
    ------
    MalformedMessage
        Not ``MQ1``; a field missing or not a number; an unknown pixel type, layout or counter depth; a raw
        frame without a known counter depth, of several chips (the quad's chip-interleaved raw readout is
        not unpacked here), or whose width is not a multiple of 64 pixels.
    """
    raw = bytes(header)
    if raw[:4] != b"MQ1,":
        raise MalformedMessage(f"frame header starts {raw[:8]!r}, not 'MQ1,'")
    parts = raw.split(b",", 3)
    if len(parts) < 4:
        raise MalformedMessage("frame header ends before its header-size field")
    size = _int(parts[2].decode("latin-1"), "header size")
    if size < 16 or size > len(raw):
        raise MalformedMessage(f"frame header declares {size} bytes, but {len(raw)} bytes were given")
    text = raw[:size].decode("latin-1").rstrip("\x00 \r\n")
    f = text.split(",")
    if len(f) < 14:
        raise MalformedMessage(f"frame header has {len(f)} fields, expected at least 14")
    seq = _int(f[1], "sequence number")
    chips = _int(f[3], "chip count")
    width, height = _int(f[4], "width"), _int(f[5], "height")
    ptype = f[6].strip()
    layout = f[7].strip()
    if ptype != RAW and ptype not in COUNTING_TYPES:
        raise MalformedMessage(f"frame header: pixel type {ptype!r} is not one of U08, U16, U32, R64")
    if layout not in LAYOUTS:
        raise MalformedMessage(f"frame header: sensor layout {layout!r} is not one of {LAYOUTS}")
    counter = _int(f[11], "counter")
    depth, shutter_ns = None, 0
    if "MQ1A" in f:
        k = f.index("MQ1A")
        if len(f) < k + 4:
            raise MalformedMessage("frame header: MQ1A extension is incomplete")
        ns = f[k + 2].strip()
        shutter_ns = _int(ns[:-2] if ns.endswith("ns") else ns, "MQ1A shutter time")
        depth = _int(f[k + 3], "MQ1A counter depth")
    if depth is None:
        depth = default_depth if default_depth is not None else {"U08": 6, "U16": 12, "U32": 24}.get(ptype)
    if depth not in COUNTER_DEPTHS:
        raise MalformedMessage(f"frame header: counter depth {depth!r} is not one of {COUNTER_DEPTHS}")
    if not shutter_ns:
        try:
            seconds = float(f[10])
        except ValueError:
            seconds = -1.0
        if not 0 <= seconds < 1e9:  # NaN and infinities fail too
            raise MalformedMessage(f"frame header: shutter time {f[10]!r} is not a number of seconds")
        shutter_ns = int(round(seconds * 1e9))
    if width < 1 or height < 1:
        raise MalformedMessage(f"frame header: frame of {width}x{height} pixels")
    if ptype == RAW:
        if chips == 4 and layout in QUAD_LAYOUTS:
            if (width, height) != (4 * CHIP, CHIP) or depth == 24:
                raise MalformedMessage(f"frame header: quad raw frame of {width}x{height} pixels, {depth}-bit; "
                                       f"expected {4 * CHIP}x{CHIP} at 1, 6 or 12 bits")
            return FrameHeader(seq, size, chips, 2 * CHIP, 2 * CHIP, ptype, layout, counter, depth, shutter_ns)
        if chips != 1:
            raise MalformedMessage(f"frame header: raw frames of {chips} chips ({layout}) are not supported, "
                                   "only single-chip and 2x2 quad raw readout")
        if depth == 24:
            if width % 2:
                raise MalformedMessage(f"frame header: 24-bit raw frame of odd width {width}")
            width //= 2
        if width % 64:
            raise MalformedMessage(f"frame header: raw frame width {width} is not a multiple of 64 pixels")
    elif COUNTING_TYPES[ptype].itemsize * 8 < depth:
        raise MalformedMessage(f"frame header: {depth}-bit counters do not fit pixel type {ptype}")
    return FrameHeader(seq, size, chips, width, height, ptype, layout, counter, depth, shutter_ns)


def frame_header(seq: int, shape: tuple[int, int], pixel_type: str, counter_depth: int, *, header_nbytes: int = 384,
                 counter: int = 0, shutter_s: float = 1e-3, when: _dt.datetime | None = None,
                 quad: bool = False) -> bytes:
    """A frame header as Merlin writes it (single chip, ``1x1``; with ``quad`` a 2x2 Quad's, 4 chips, whose raw
    frames are announced as 1024x256), NUL-padded to ``header_nbytes``.

    Raises
    ------
    ValueError
        It does not fit in ``header_nbytes``.
    """
    rows, cols = shape
    width = 2 * cols if pixel_type == RAW and counter_depth == 24 else cols
    chips, layout, select = (4, "2x2", "0F") if quad else (1, "1x1", "01")
    if quad and pixel_type == RAW:
        rows, width = CHIP, 4 * CHIP
    when = when or _dt.datetime(2026, 1, 1, 12, 0, 0)
    thresholds = "" if pixel_type == RAW else ",".join(["1.000000E+1", "5.110000E+2"] + ["0.000000E+0"] * 6)
    dacs = "" if pixel_type == RAW else ",3RX," + ",".join(["100"] * 27)
    text = (f"MQ1,{seq:06d},{header_nbytes:05d},{chips:02d},{width:04d},{rows:04d},{pixel_type},{layout:>6},{select},"
            f"{when:%Y-%m-%d %H:%M:%S.%f},{shutter_s:.6f},{counter},0,0,{thresholds}{dacs},MQ1A,"
            f"{when:%Y-%m-%dT%H:%M:%S.%f}000Z,{round(shutter_s * 1e9)}ns,{counter_depth},")
    b = text.encode("ascii")
    if len(b) > header_nbytes:
        raise ValueError(f"frame header of {len(b)} bytes does not fit in {header_nbytes}")
    return b + b"\x00" * (header_nbytes - len(b))


# --- pixels ------------------------------------------------------------------------------------------------------


def decode_frames(data: np.ndarray, n: int, hdr: FrameHeader, out: np.ndarray) -> None:
    """Unpack ``n`` frames' pixels into ``out[:n]``.

    Parameters
    ----------
    data : ndarray (>= n * hdr.data_nbytes,), uint8
        The frames' pixel bytes, one after the other.
    n : int
    hdr : FrameHeader
        What every frame is (shape, type, counter depth).
    out : ndarray (>= n, height, width), ``hdr.dtype``
        Receives the little-endian pixels.
    """
    if n == 0:
        return
    if hdr.quad:  # unpack as one chip-row-interleaved 256x1024 frame, then place the chips
        wide = np.empty((n, CHIP, 4 * CHIP), hdr.dtype)
        decode_frames(data, n, _as_single(hdr), wide)
        seg = wide.reshape(n, CHIP, 4, CHIP)
        o = out[:n]
        o[:, :CHIP, :CHIP] = seg[:, :, 3]
        o[:, :CHIP, CHIP:] = seg[:, :, 2]
        o[:, CHIP:, :CHIP] = seg[:, ::-1, 1, ::-1]
        o[:, CHIP:, CHIP:] = seg[:, ::-1, 0, ::-1]
        return
    nb = hdr.data_nbytes
    src = data[:n * nb]
    h, w = hdr.height, hdr.width
    dst = out[:n].reshape(n, h * w)
    if not hdr.raw:
        np.copyto(dst, src.view(COUNTING_TYPES[hdr.pixel_type]).reshape(n, h * w), casting="unsafe")
        return
    d = hdr.counter_depth
    if d == 1:  # 64 pixels per word, the word's bytes reversed, each byte least significant bit first
        words = src.reshape(n, -1, 8)[:, :, ::-1]
        np.copyto(dst, np.unpackbits(words, axis=-1, bitorder="little").reshape(n, h * w))
    elif d == 6:
        np.copyto(dst, src.reshape(n, -1, 8)[:, :, ::-1].reshape(n, h * w))
    elif d == 12:
        np.copyto(dst, src.view(">u2").reshape(n, -1, 4)[:, :, ::-1].reshape(n, h * w), casting="unsafe")
    else:  # 24: high 12 bits, then low 12 bits, each a 12-bit raw frame
        halves = src.view(">u2").reshape(n, 2, -1, 4)[:, :, :, ::-1].reshape(n, 2, h * w)
        np.left_shift(halves[:, 0], 12, out=dst, dtype=np.uint32, casting="unsafe")
        dst |= halves[:, 1]


def _as_single(hdr: FrameHeader) -> FrameHeader:
    """A quad raw header as the single-chip 256x1024 raw frame its bytes are."""
    return FrameHeader(hdr.sequence, hdr.header_nbytes, 1, 4 * CHIP, CHIP, hdr.pixel_type, "1x1", hdr.counter,
                       hdr.counter_depth, hdr.shutter_ns)


def quad_to_raw_rows(frames: np.ndarray) -> np.ndarray:
    """512x512 quad frames (n, 512, 512) as the 256x1024 chip-row order a Quad reads them out in (see the module
    docstring); the inverse of the reassembly in :func:`decode_frames`."""
    f = np.asarray(frames)
    n = f.shape[0]
    wide = np.empty((n, CHIP, 4, CHIP), f.dtype)
    wide[:, :, 3] = f[:, :CHIP, :CHIP]
    wide[:, :, 2] = f[:, :CHIP, CHIP:]
    wide[:, :, 1] = f[:, CHIP:, :CHIP][:, ::-1, ::-1]
    wide[:, :, 0] = f[:, CHIP:, CHIP:][:, ::-1, ::-1]
    return wide.reshape(n, CHIP, 4 * CHIP)


def encode_frames(frames: np.ndarray, pixel_type: str, counter_depth: int) -> np.ndarray:
    """Pack frames as Merlin sends them (the inverse of :func:`decode_frames`).

    Parameters
    ----------
    frames : ndarray (n, rows, cols), unsigned integers below ``2**counter_depth``
    pixel_type : {"U08", "U16", "U32", "R64"}
    counter_depth : {1, 6, 12, 24}

    Returns
    -------
    ndarray (n, nbytes), uint8
        Each frame's pixel bytes.

    Raises
    ------
    ValueError
        A pixel exceeds the counter depth, an unknown type, or a raw frame width that is not a multiple of 64.
    """
    f = np.asarray(frames)
    n = f.shape[0]
    if f.size and int(f.max()) >= 1 << counter_depth:
        raise ValueError(f"pixel value {int(f.max())} exceeds a {counter_depth}-bit counter")
    if pixel_type in COUNTING_TYPES:
        return np.ascontiguousarray(f.astype(COUNTING_TYPES[pixel_type])).view(np.uint8).reshape(n, -1)
    if pixel_type != RAW:
        raise ValueError(f"unknown pixel type {pixel_type!r}")
    if f.shape[2] % 64:
        raise ValueError(f"raw frames need a width that is a multiple of 64, got {f.shape[2]}")
    if counter_depth == 1:
        bits = f.astype(np.uint8).reshape(n, -1, 8, 8)
        return np.packbits(bits, axis=-1, bitorder="little").reshape(n, -1, 8)[:, :, ::-1].reshape(n, -1).copy()
    if counter_depth == 6:
        return f.astype(np.uint8).reshape(n, -1, 8)[:, :, ::-1].reshape(n, -1).copy()
    if counter_depth == 12:
        words = f.astype(">u2").reshape(n, -1, 4)[:, :, ::-1]
        return np.ascontiguousarray(words).view(np.uint8).reshape(n, -1)
    v = f.astype(np.uint32)
    halves = np.stack([v >> 12, v & 0xFFF], axis=1).astype(">u2").reshape(n, 2, -1, 4)[:, :, :, ::-1]
    return np.ascontiguousarray(halves).view(np.uint8).reshape(n, -1)


def frame_messages(frames: np.ndarray, pixel_type: str, counter_depth: int, *, first_seq: int = 1,
                   header_nbytes: int = 384, with_prefix: bool = True, quad: bool = False) -> list[bytes]:
    """Every frame as one message (``MPX,`` prefix, header, pixels), or as a MIB file record without the prefix.

    With ``quad``, ``frames`` are 512x512 frames of a 2x2 Quad (raw ones sent in its chip-row order) and the
    headers are 768 bytes unless ``header_nbytes`` says otherwise.
    """
    if quad and header_nbytes == 384:
        header_nbytes = 768
    packed = quad_to_raw_rows(frames) if quad and pixel_type == RAW else frames
    data = encode_frames(packed, pixel_type, counter_depth)
    out = []
    for i in range(len(frames)):
        body = frame_header(first_seq + i, frames.shape[1:], pixel_type, counter_depth,
                            header_nbytes=header_nbytes, quad=quad) + data[i].tobytes()
        out.append(mpx_prefix(len(body)) + body if with_prefix else body)
    return out


def acquisition_stream(frames: np.ndarray, pixel_type: str, counter_depth: int, *, scan=None,
                       quad: bool = False) -> bytes:
    """The bytes a Merlin sends on its data port for one acquisition of ``frames``: header, then every frame."""
    hdr = acquisition_header(len(frames), counter_depth=counter_depth, raw=pixel_type == RAW, scan=scan)
    return mpx_prefix(len(hdr)) + hdr + b"".join(frame_messages(frames, pixel_type, counter_depth, quad=quad))


def write_mib(path_stem, frames: np.ndarray, pixel_type: str, counter_depth: int, *, scan=None, quad: bool = False):
    """Write ``<stem>.hdr`` (the acquisition header) and ``<stem>.mib`` (the frames), as Merlin saves them.

    Returns
    -------
    (Path, Path)
        The header and data files.
    """
    from pathlib import Path

    stem = Path(path_stem)
    hdr_path, mib_path = stem.with_suffix(".hdr"), stem.with_suffix(".mib")
    hdr_path.write_bytes(acquisition_header(len(frames), counter_depth=counter_depth, raw=pixel_type == RAW,
                                            scan=scan))
    mib_path.write_bytes(b"".join(frame_messages(frames, pixel_type, counter_depth, with_prefix=False, quad=quad)))
    return hdr_path, mib_path


def check_same(hdr: FrameHeader, first: FrameHeader) -> None:
    """Raise :class:`FrameMismatch` when frame ``hdr`` differs in shape, type or depth from its series' ``first``."""
    if (hdr.width, hdr.height, hdr.pixel_type, hdr.counter_depth, hdr.counter) != (
            first.width, first.height, first.pixel_type, first.counter_depth, first.counter):
        raise FrameMismatch(f"frame {hdr.sequence} is {hdr.height}x{hdr.width} {hdr.pixel_type} "
                            f"{hdr.counter_depth}-bit counter {hdr.counter}; its series began "
                            f"{first.height}x{first.width} {first.pixel_type} {first.counter_depth}-bit "
                            f"counter {first.counter}")
