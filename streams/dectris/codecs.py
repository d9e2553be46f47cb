"""Frame compression used by DECTRIS detectors: bitshuffle-LZ4 and LZ4, encode and decode.

Framings (DECTRIS SIMPLON API reference manual, stream interface; DECTRIS Stream V2 documentation and its CBOR
tag 56500, github.com/dectris/documentation):

``bslz4``
    The bitshuffle HDF5 filter framing (github.com/kiyo-masui/bitshuffle, ``src/bshuf_h5filter.c``): a 12-byte
    header, u64 big-endian uncompressed size in bytes and u32 big-endian block size in bytes (8192 by
    default), then for each block a u32 big-endian compressed length and the LZ4 block of the bit-shuffled
    elements. SIMPLON v1 calls it ``bs8-lz4<``, ``bs16-lz4<``, ``bs32-lz4<`` (element size in bits);
    Stream V2 ``["bslz4", element size in bytes, ...]``. It is also exactly the chunk format of an HDF5
    dataset with the bitshuffle filter (id 32008, LZ4 mode), so a received blob can be written to a file
    as a chunk unchanged (:mod:`beamloop.streams.dectris.recorder`).
``lz4`` (HDF5 framing)
    The HDF5 LZ4 filter framing (HDF Group, ``LZ4_HDF5_format``): the same 12-byte header, then per block a
    u32 big-endian compressed length and the LZ4 block; a block whose compressed length equals its
    uncompressed length is stored raw. Stream V2's ``["lz4", 0, ...]``.
``lz4-block``
    One bare LZ4 block with no header (SIMPLON v1's ``lz4<``); its size is implied by the frame.
``none``
    The frame's bytes.

Decoding uses DECTRIS' own library (PyPI ``dectris-compression``): its C entry points
``compression_decompress_buffer`` and ``LZ4_decompress_safe`` are called through ctypes, from Python for
one frame and from a numba kernel for a whole stack of frames (:func:`decode_stack`), writing straight
into the caller's preallocated frame buffer. Before anything is decompressed the header's claimed size is
checked against the expected frame size, so a blob can never expand beyond one frame (no decompression
bomb). Encoding uses PyPI ``bitshuffle`` (bit transposition + LZ4) and ``lz4``.
"""

from __future__ import annotations

import ctypes
import re
import struct
from dataclasses import dataclass

import lz4.block
import numba
import numpy as np

from beamloop.streams.errors import FrameMismatch, MalformedMessage, OversizedMessage, TruncatedMessage

NONE, BSLZ4, LZ4, LZ4_BLOCK = "none", "bslz4", "lz4", "lz4-block"
ALGORITHMS = (NONE, BSLZ4, LZ4, LZ4_BLOCK)
"""Compression algorithms understood here."""

HEADER_BYTES = 12
"""Length of the bitshuffle / HDF5-LZ4 header: u64 BE uncompressed size, u32 BE block size."""

DEFAULT_BLOCK_BYTES = 8192
"""Block size DECTRIS detectors and the bitshuffle filter use by default, bytes (BSHUF_TARGET_BLOCK_SIZE_B)."""

# error codes of the numba stack decoder (see _decode_stack_kernel)
_OK, _E_SHORT, _E_SIZE, _E_BLOCK, _E_DATA, _E_LEN = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class Codec:
    """How one frame is encoded.

    Attributes
    ----------
    algorithm : {"none", "bslz4", "lz4", "lz4-block"}
    elem_size : int
        Bytes per pixel (1, 2 or 4); the bitshuffle element size for ``bslz4``.
    big_endian : bool
        Pixels are big-endian (SIMPLON v1 ``>`` suffix); decoders byte-swap into the little-endian frame.
    """

    algorithm: str
    elem_size: int
    big_endian: bool = False

    def max_blob_nbytes(self, frame_nbytes: int) -> int:
        """Largest valid encoded size of a ``frame_nbytes`` frame (LZ4 worst case per block plus headers)."""
        if self.algorithm == NONE:
            return frame_nbytes
        bound = frame_nbytes + frame_nbytes // 255 + 16  # LZ4_COMPRESSBOUND (lz4.h)
        if self.algorithm == LZ4_BLOCK:
            return bound
        nblocks = frame_nbytes // 128 + 1  # smallest bitshuffle block is 128 elements
        return bound + HEADER_BYTES + 4 * nblocks + 16 * nblocks


_V1_ENCODING = re.compile(r"^(?:bs(8|16|32)-)?(lz4)?([<>])$")


def parse_simplon_encoding(encoding: str, dtype: np.dtype) -> Codec:
    """The codec named by a SIMPLON stream v1 ``encoding`` field.

    ``"<"``/``">"``: uncompressed; ``"lz4<"``: one bare LZ4 block; ``"bs16-lz4<"`` (and bs8, bs32):
    bitshuffle-LZ4 whose element size (bits) must equal the pixel type's.

    Raises
    ------
    MalformedMessage
        Unknown encoding text, or a bitshuffle element size that differs from ``dtype``'s.
    """
    m = _V1_ENCODING.match(encoding) if isinstance(encoding, str) else None
    if m is None:
        raise MalformedMessage(f"unknown SIMPLON encoding {encoding!r} (expected e.g. 'bs16-lz4<', 'lz4<', '<')")
    bits, has_lz4, order = m.groups()
    itemsize = np.dtype(dtype).itemsize
    if bits is not None and int(bits) != 8 * itemsize:
        raise MalformedMessage(f"encoding {encoding!r} shuffles {bits}-bit elements but pixels are {8 * itemsize}-bit")
    if bits is not None and not has_lz4:
        raise MalformedMessage(f"encoding {encoding!r}: bitshuffle without lz4 is not a DECTRIS encoding")
    algorithm = BSLZ4 if bits else (LZ4_BLOCK if has_lz4 else NONE)
    return Codec(algorithm, itemsize, order == ">")


def simplon_encoding(codec: Codec) -> str:
    """The SIMPLON v1 ``encoding`` text of ``codec`` (inverse of :func:`parse_simplon_encoding`).

    Raises ``ValueError`` for the HDF5-framed ``lz4``, which SIMPLON v1 does not carry.
    """
    order = ">" if codec.big_endian else "<"
    if codec.algorithm == BSLZ4:
        return f"bs{8 * codec.elem_size}-lz4{order}"
    if codec.algorithm == LZ4_BLOCK:
        return "lz4" + order
    if codec.algorithm == NONE:
        return order
    raise ValueError(f"SIMPLON stream v1 has no encoding for {codec.algorithm!r}")


# --- encoding ------------------------------------------------------------------------------------------------


def _header(nbytes: int, block_bytes: int) -> bytes:
    return struct.pack(">QI", nbytes, block_bytes)


def encode(frame: np.ndarray, codec: Codec, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> bytes | np.ndarray:
    """Encode one frame.

    Parameters
    ----------
    frame : ndarray (rows, cols), uint8/uint16/uint32, C-contiguous, native little-endian
    codec : Codec
    block_bytes : int
        Bitshuffle / HDF5-LZ4 block size in bytes (a multiple of ``8 * elem_size``).

    Returns
    -------
    bytes, or the frame itself for ``none`` (sent without copying).

    Raises
    ------
    ValueError
        Element size differing from the frame's, an unknown algorithm, or a bad block size.
    """
    frame = np.ascontiguousarray(frame)
    if frame.dtype.itemsize != codec.elem_size:
        raise ValueError(f"codec element size {codec.elem_size} but frame dtype {frame.dtype}")
    if codec.big_endian:
        frame = frame.byteswap()
    if codec.algorithm == NONE:
        return frame
    if codec.algorithm == LZ4_BLOCK:
        return lz4.block.compress(frame, store_size=False)
    if block_bytes <= 0 or block_bytes % (8 * codec.elem_size):
        raise ValueError(f"block size {block_bytes} bytes is not a positive multiple of {8 * codec.elem_size}")
    if codec.algorithm == BSLZ4:
        import bitshuffle  # encoder only; receiving never needs it

        body = bitshuffle.compress_lz4(frame.reshape(-1), block_bytes // codec.elem_size)
        return _header(frame.nbytes, block_bytes) + body.tobytes()
    if codec.algorithm == LZ4:
        raw = frame.reshape(-1).view(np.uint8)
        parts = [_header(raw.nbytes, block_bytes)]
        for start in range(0, raw.nbytes, block_bytes):
            block = raw[start:start + block_bytes]
            comp = lz4.block.compress(block, store_size=False)
            if len(comp) >= block.nbytes:
                comp = block.tobytes()  # stored raw, as the HDF5 LZ4 filter does
            parts.append(struct.pack(">I", len(comp)))
            parts.append(comp)
        return b"".join(parts)
    raise ValueError(f"unknown algorithm {codec.algorithm!r}; expected one of {ALGORITHMS}")


# --- decoding -----------------------------------------------------------------------------------------------


def _load_dectris():
    from dectris import compression as dc

    lib = ctypes.CDLL(dc.__file__)
    dec = lib.compression_decompress_buffer
    dec.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                    ctypes.c_size_t]
    dec.restype = ctypes.c_size_t
    lz4s = lib.LZ4_decompress_safe
    lz4s.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lz4s.restype = ctypes.c_int
    return dec, lz4s


_dectris_decompress, _lz4_decompress_safe = _load_dectris()
_ALG_CODE = {BSLZ4: 0, LZ4: 1}  # CompressionAlgorithm enum of dectris/compression src/compression.h
_CODE = {NONE: 0, BSLZ4: 1, LZ4: 2, LZ4_BLOCK: 3}
_SIZE_MAX = (1 << 64) - 1


def check_header(blob, frame_nbytes: int) -> None:
    """Check a ``bslz4`` / ``lz4`` blob's 12-byte header against the expected frame size.

    Raises
    ------
    TruncatedMessage
        Shorter than the header.
    FrameMismatch
        The claimed uncompressed size differs from ``frame_nbytes`` (a decompression bomb or a frame of
        another shape), or the block size is zero or not a multiple of 8 bytes.
    """
    if len(blob) < HEADER_BYTES:
        raise TruncatedMessage(f"compressed blob of {len(blob)} bytes is shorter than its 12-byte header")
    size, block = struct.unpack_from(">QI", blob, 0)
    if size != frame_nbytes:
        raise FrameMismatch(f"compressed blob claims {size} uncompressed bytes, the frame has {frame_nbytes}")
    if block == 0 or block % 8:
        raise FrameMismatch(f"compressed blob has invalid block size {block} bytes")


def decode_into(blob, codec: Codec, out: np.ndarray) -> None:
    """Decode one blob into the preallocated frame ``out`` (no intermediate copy).

    Parameters
    ----------
    blob : bytes-like
        The encoded frame.
    codec : Codec
    out : ndarray (rows, cols), C-contiguous, dtype of ``codec.elem_size`` bytes
        Receives the little-endian pixels.

    Raises
    ------
    OversizedMessage
        The blob is larger than any valid encoding of one frame.
    TruncatedMessage, FrameMismatch
        See :func:`check_header`; an uncompressed blob of the wrong length.
    MalformedMessage
        Corrupt compressed data, or data that decode to fewer bytes than one frame.
    """
    if not out.flags.c_contiguous or out.dtype.itemsize != codec.elem_size:
        raise ValueError(f"out must be C-contiguous with {codec.elem_size}-byte elements")
    mv = memoryview(blob).cast("B")
    n, nbytes = mv.nbytes, out.nbytes
    if n > codec.max_blob_nbytes(nbytes):
        raise OversizedMessage(f"{codec.algorithm} blob of {n} bytes exceeds the bound for one {nbytes}-byte frame")
    dst = out.ctypes.data
    src = np.frombuffer(mv, np.uint8)
    if codec.algorithm == NONE:
        if n != nbytes:
            raise TruncatedMessage(f"uncompressed blob of {n} bytes, frame has {nbytes}")
        out.reshape(-1).view(np.uint8)[:] = src
    elif codec.algorithm == LZ4_BLOCK:
        got = _lz4_decompress_safe(src.ctypes.data, dst, n, nbytes)
        if got != nbytes:
            raise MalformedMessage(f"lz4 block is corrupt or does not decode to one {nbytes}-byte frame (got {got})")
    elif codec.algorithm in _ALG_CODE:
        check_header(mv, nbytes)
        got = _dectris_decompress(_ALG_CODE[codec.algorithm], dst, nbytes, src.ctypes.data, n, codec.elem_size)
        if got != nbytes:
            raise MalformedMessage(f"{codec.algorithm} data are corrupt (decoder returned {got}, expected {nbytes})")
    else:
        raise MalformedMessage(f"unknown algorithm {codec.algorithm!r}")
    if codec.big_endian:
        out.byteswap(inplace=True)


@numba.njit(cache=False, nogil=True)
def _be_u64(a, o):
    v = 0
    for k in range(8):
        v = (v << 8) | a[o + k]
    return v


@numba.njit(cache=False, nogil=True)
def _be_u32(a, o):
    return (a[o] << 24) | (a[o + 1] << 16) | (a[o + 2] << 8) | a[o + 3]


@numba.njit(cache=False, nogil=True)
def _decode_one(arena, o, ln, algo, elem_size, frame):
    """Decode the blob ``arena[o:o + ln]`` into ``frame`` (a flat row of the output); returns a status code."""
    fb = frame.shape[0] * frame.itemsize
    if algo == 0:
        if ln != fb:
            return _E_LEN
        view = frame.view(np.uint8)
        for k in range(fb):
            view[k] = arena[o + k]
        return _OK
    if algo == 3:
        got = _lz4_decompress_safe(arena[o:].ctypes.data, frame.ctypes.data, ln, fb)
        return _OK if got == fb else _E_DATA
    if ln < 12:
        return _E_SHORT
    if _be_u64(arena, o) != fb:
        return _E_SIZE
    blk = _be_u32(arena, o + 8)
    if blk == 0 or blk % 8 != 0:
        return _E_BLOCK
    got = _dectris_decompress(algo - 1, frame.ctypes.data, fb, arena[o:].ctypes.data, ln, elem_size)
    return _OK if got == fb else _E_DATA


@numba.njit(cache=False, nogil=True)
def _decode_stack_kernel(arena, offsets, lengths, algo, elem_size, out, status):
    """Decode ``n`` blobs laid out in ``arena`` into ``out[0:n]``; per-frame error codes into ``status``."""
    flat = out.reshape(out.shape[0], out.shape[1] * out.shape[2])
    nerr = 0
    for i in range(offsets.shape[0]):
        status[i] = _decode_one(arena, offsets[i], lengths[i], algo, elem_size, flat[i])
        if status[i] != _OK:
            nerr += 1
    return nerr


_STATUS_TEXT = {
    _E_SHORT: (TruncatedMessage, "shorter than its 12-byte header"),
    _E_SIZE: (FrameMismatch, "claims an uncompressed size other than the frame size"),
    _E_BLOCK: (FrameMismatch, "has an invalid block size"),
    _E_DATA: (MalformedMessage, "is corrupt compressed data"),
    _E_LEN: (TruncatedMessage, "is an uncompressed blob of the wrong length"),
}


def status_error(code: int, what: str) -> Exception:
    """The :class:`beamloop.streams.errors.ProtocolError` for a :func:`decode_stack` status code about ``what``."""
    cls, text = _STATUS_TEXT[int(code)]
    return cls(f"{what} {text}")


def decode_stack(arena: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, codec: Codec, out: np.ndarray,
                 status: np.ndarray) -> int:
    """Decode a stack of blobs in one call, without Python per frame.

    Parameters
    ----------
    arena : ndarray (nbytes,), uint8
        The blobs, blob ``i`` at ``arena[offsets[i]:offsets[i] + lengths[i]]``.
    offsets, lengths : ndarray (n,), int64
        Every blob must already be within ``codec.max_blob_nbytes`` (receivers bound it on arrival).
    codec : Codec
    out : ndarray (>= n, rows, cols), C-contiguous, ``codec.elem_size``-byte pixels
        Frame ``i`` is decoded into ``out[i]``.
    status : ndarray (>= n,), int8
        Set to 0 for a decoded frame, or an error code (:func:`status_error` turns one into an exception).

    Returns
    -------
    int
        Number of blobs that failed (their frames in ``out`` are undefined). An empty stack (``n = 0``)
        decodes nothing and compiles the kernel for these array types, ahead of the first frames.
    """
    n = len(offsets)
    if n == 0:  # an empty stack compiles the kernel for these array types (receivers do it on arming)
        _decode_stack_kernel(arena, offsets[:0], lengths[:0], _CODE[codec.algorithm], codec.elem_size, out[:0],
                             status[:0])
        return 0
    nerr = _decode_stack_kernel(arena, offsets[:n], lengths[:n], _CODE[codec.algorithm], codec.elem_size,
                                out[:n], status[:n])
    if codec.big_endian:
        out[:n].byteswap(inplace=True)
    return int(nerr)
