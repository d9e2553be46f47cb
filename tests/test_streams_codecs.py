"""Detector frame codecs: bit-exact round trips, the DECTRIS framings byte by byte, and every bad blob."""

import struct

import lz4.block
import numpy as np
import pytest

from beamloop.streams.dectris import codecs
from beamloop.streams.dectris.codecs import BSLZ4, LZ4, LZ4_BLOCK, NONE, Codec
from beamloop.streams.errors import FrameMismatch, MalformedMessage, OversizedMessage, TruncatedMessage

DTYPES = [np.dtype("u1"), np.dtype("<u2"), np.dtype("<u4")]


def frames_of(dtype, n=5, shape=(96, 80), seed=0):
    rng = np.random.default_rng(seed)
    f = rng.poisson(3.0, (n, *shape)).astype(dtype)
    f[0, :3, :3] = np.iinfo(dtype).max  # saturated pixels survive
    return f


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm,big", [(BSLZ4, False), (BSLZ4, True), (LZ4, False), (LZ4_BLOCK, False),
                                           (LZ4_BLOCK, True), (NONE, False), (NONE, True)])
def test_round_trip_single_and_stack(dtype, algorithm, big):
    frames = frames_of(dtype)
    codec = Codec(algorithm, dtype.itemsize, big)
    blobs = [bytes(memoryview(codecs.encode(f, codec)).cast("B")) for f in frames]
    out = np.zeros_like(frames)
    for b, o in zip(blobs, out):
        codecs.decode_into(b, codec, o)
    assert np.array_equal(out, frames)
    arena = np.frombuffer(b"".join(blobs), np.uint8).copy()
    lengths = np.array([len(b) for b in blobs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out2, status = np.zeros_like(frames), np.full(len(frames), 9, np.int8)
    assert codecs.decode_stack(arena, offsets, lengths, codec, out2, status) == 0
    assert np.array_equal(out2, frames) and not status.any()


def test_bslz4_framing_is_the_bitshuffle_hdf5_layout():
    frame = frames_of(np.dtype("<u2"), 1)[0]
    blob = codecs.encode(frame, Codec(BSLZ4, 2))
    size, block = struct.unpack(">QI", blob[:12])
    assert size == frame.nbytes and block == 8192
    # the maintained decoder reads it as DECTRIS' own streams
    from dectris.compression import decompress

    assert decompress(blob, "bslz4", elem_size=2) == frame.tobytes()


def test_lz4_hdf5_framing_stores_incompressible_blocks_raw():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 2 ** 16, (64, 64), dtype=np.uint16)  # noise: LZ4 cannot shrink it
    blob = codecs.encode(frame, Codec(LZ4, 2), block_bytes=4096)
    assert struct.unpack(">QI", blob[:12]) == (frame.nbytes, 4096)
    first = struct.unpack(">I", blob[12:16])[0]
    assert first == 4096 and blob[16:16 + 4096] == frame.tobytes()[:4096]
    from dectris.compression import decompress

    assert decompress(blob, "lz4") == frame.tobytes()


def test_simplon_encoding_names():
    assert codecs.parse_simplon_encoding("bs16-lz4<", np.uint16) == Codec(BSLZ4, 2)
    assert codecs.parse_simplon_encoding("bs32-lz4<", np.uint32) == Codec(BSLZ4, 4)
    assert codecs.parse_simplon_encoding("lz4<", np.uint8) == Codec(LZ4_BLOCK, 1)
    assert codecs.parse_simplon_encoding(">", np.uint16) == Codec(NONE, 2, True)
    for c in (Codec(BSLZ4, 2), Codec(LZ4_BLOCK, 4), Codec(NONE, 1, True)):
        assert codecs.parse_simplon_encoding(codecs.simplon_encoding(c), np.dtype(f"u{c.elem_size}")) == c
    for bad in ("bs16-lz4", "bs16-lz4<", "gzip<", "", None, "bs12-lz4<"):
        dtype = np.uint32 if bad == "bs16-lz4<" else np.uint16
        with pytest.raises(MalformedMessage):
            codecs.parse_simplon_encoding(bad, dtype)


def test_decompression_bomb_is_refused_before_decoding():
    frame = np.zeros((96, 96), np.uint16)
    blob = bytearray(codecs.encode(frame, Codec(BSLZ4, 2)))
    blob[:8] = struct.pack(">Q", 1 << 40)  # claims a terabyte
    out = np.full_like(frame, 7)
    with pytest.raises(FrameMismatch, match="claims 1099511627776"):
        codecs.decode_into(bytes(blob), Codec(BSLZ4, 2), out)
    assert (out == 7).all()  # nothing written


@pytest.mark.parametrize("damage,exc", [
    ("short", TruncatedMessage), ("size", FrameMismatch), ("block", FrameMismatch), ("corrupt", MalformedMessage),
    ("oversized", OversizedMessage)])
def test_bad_bslz4_blobs(damage, exc):
    frame = frames_of(np.dtype("<u2"), 1)[0]
    codec = Codec(BSLZ4, 2)
    blob = bytearray(codecs.encode(frame, codec))
    if damage == "short":
        blob = blob[:10]
    elif damage == "size":
        blob[7] ^= 1
    elif damage == "block":
        blob[8:12] = struct.pack(">I", 0)
    elif damage == "corrupt":
        blob[16:40] = b"\xff" * 24
    else:
        blob = blob + bytes(codec.max_blob_nbytes(frame.nbytes))
    with pytest.raises(exc):
        codecs.decode_into(bytes(blob), codec, np.zeros_like(frame))


def test_stack_decoder_flags_each_bad_frame_and_decodes_the_rest():
    frames = frames_of(np.dtype("<u2"), 4)
    codec = Codec(BSLZ4, 2)
    blobs = [bytearray(codecs.encode(f, codec)) for f in frames]
    blobs[1][:8] = struct.pack(">Q", 123)  # wrong claimed size
    blobs[2][20:60] = b"\x00" * 40  # corrupt data
    arena = np.frombuffer(b"".join(bytes(b) for b in blobs), np.uint8).copy()
    lengths = np.array([len(b) for b in blobs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    out, status = np.zeros_like(frames), np.zeros(4, np.int8)
    assert codecs.decode_stack(arena, offsets, lengths, codec, out, status) == 2
    assert status[0] == 0 and status[3] == 0 and status[1] != 0 and status[2] != 0
    assert np.array_equal(out[0], frames[0]) and np.array_equal(out[3], frames[3])
    assert isinstance(codecs.status_error(status[1], "frame 1"), FrameMismatch)


def test_lz4_block_wrong_frame_size():
    small = np.arange(100, dtype=np.uint16)
    blob = lz4.block.compress(small.tobytes(), store_size=False)
    with pytest.raises(MalformedMessage, match="does not decode"):
        codecs.decode_into(blob, Codec(LZ4_BLOCK, 2), np.zeros((10, 20), np.uint16))


def test_encode_rejects_mismatched_element_size():
    with pytest.raises(ValueError, match="element size"):
        codecs.encode(np.zeros((4, 4), np.uint16), Codec(BSLZ4, 4))
