"""The native beamloop stream: bit-exact round trips, gap detection, and every kind of bad message."""

import time

import cbor2
import numpy as np
import pytest
import zmq

from beamloop.streams.errors import (
    FrameMismatch,
    MalformedMessage,
    OversizedMessage,
    TruncatedMessage,
    UnexpectedMessage,
)
from beamloop.streams.native import protocol
from beamloop.streams.native.receiver import FrameReceiver, ImageEvent, SeriesEnd, SeriesStart
from beamloop.streams.native.sender import FrameSender


@pytest.fixture
def link():
    """A sender bound on a free port and a receiver connected to it."""
    tx = FrameSender("tcp://127.0.0.1:0", encoding="raw")
    rx = FrameReceiver(tx.endpoint, ring=4)
    time.sleep(0.05)
    yield tx, rx
    rx.close()
    tx.close(linger_ms=0)


def recv(rx, timeout_ms=2000):
    ev = rx.recv(timeout_ms)
    assert ev is not None, "nothing received"
    return ev


@pytest.mark.parametrize("encoding", ["raw", "lz4"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32])
def test_round_trip_bit_exact(encoding, dtype):
    rng = np.random.default_rng(1)
    frames = [(rng.random((37, 53)) * 200).astype(dtype) for _ in range(3)]
    with FrameSender("tcp://127.0.0.1:0", encoding=encoding) as tx, FrameReceiver(tx.endpoint) as rx:
        time.sleep(0.05)
        tx.start_series(["haadf"], (37, 53), dtype, number_of_images=3, count_time=1e-3,
                        user_data={"pixel_size_A": 0.15, "scan": {"frame_id": 7}})
        for f in frames:
            tx.send_frame(f, user_data={"probe_position": [0.25, 0.5]})
        tx.end_series({"reason": "done"})
        start = recv(rx)
        assert isinstance(start, SeriesStart)
        assert start.series.shape == (37, 53) and start.series.dtype == np.dtype(dtype)
        assert start.series.user_data == {"pixel_size_A": 0.15, "scan": {"frame_id": 7}}
        assert start.series.number_of_images == 3 and start.series.count_time == 1e-3
        for k, f in enumerate(frames):
            ev = recv(rx)
            assert isinstance(ev, ImageEvent) and ev.image_id == k and ev.gap == 0
            assert ev.data["haadf"].dtype == np.dtype(dtype)
            assert ev.data["haadf"].tobytes() == f.tobytes()
            assert ev.header.user_data["probe_position"] == [0.25, 0.5]
            assert ev.transport_ns is not None and ev.transport_ns >= 0
        end = recv(rx)
        assert isinstance(end, SeriesEnd) and end.frames == 3 and end.missing == 0
        assert end.header.user_data == {"reason": "done"}
        c = rx.counters
        assert (c.frames, c.series_started, c.series_ended, c.rejected, c.gaps) == (3, 1, 1, 0, 0)


def test_multichannel_and_times(link):
    tx, rx = link
    tx.start_series(["haadf", "bf"], (8, 8), np.uint16, count_time=2e-3)
    a = np.arange(64, dtype=np.uint16).reshape(8, 8)
    time.sleep(0.005)  # times count from arming; the frame's exposure must fit after it
    tx.send_frame({"haadf": a, "bf": a[::-1].copy()}, exposure_ns=1_500_000)
    assert isinstance(recv(rx), SeriesStart)
    ev = recv(rx)
    assert np.array_equal(ev.data["haadf"], a) and np.array_equal(ev.data["bf"], a[::-1])
    assert ev.header.real_time_ns == 1_500_000
    assert ev.header.stop_time_ns - ev.header.start_time_ns == 1_500_000


def test_receives_into_preallocated_ring(link):
    tx, rx = link
    tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    views = []
    for k in range(6):
        tx.send_frame(np.full((4, 4), k, np.uint16))
        views.append(recv(rx).data["haadf"])
    # a ring of 4: frame 4 reuses the buffer of frame 0, frame 5 that of frame 1
    assert np.shares_memory(views[0], views[4]) and np.shares_memory(views[1], views[5])
    assert not np.shares_memory(views[0], views[1])
    assert views[5][0, 0] == 5 and views[3][0, 0] == 3


def test_gap_and_reorder_detection(link):
    tx, rx = link
    tx.start_series(["haadf"], (4, 4), np.uint16, number_of_images=8)
    f = np.zeros((4, 4), np.uint16)
    for iid in (0, 1, 4, 3, 5):
        tx.send_frame(f, image_id=iid)
    tx.end_series()
    recv(rx)
    gaps = [recv(rx).gap for _ in range(5)]
    assert gaps == [0, 0, 2, 0, 0]
    end = recv(rx)
    assert end.missing == 2  # ids 6 and 7 were announced but never sent
    c = rx.counters
    assert c.gaps == 2 and c.missing_frames == 4 and c.reordered == 1 and c.frames == 5


def _good_frame_after(tx, rx, value=9):
    """After a rejected message the next frame arrives intact (nothing else lost)."""
    tx.send_frame(np.full(tx.series.shape, value, tx.series.dtype))
    ev = recv(rx)
    assert isinstance(ev, ImageEvent) and np.all(ev.data["haadf"] == value)


def _image_header(series, blob_size, encoding="raw", image_id=0):
    return protocol.encode_image_header(series, image_id, [(encoding, blob_size)])


@pytest.mark.parametrize(
    "parts, error, text",
    [
        ([b"\x00\x01garbage"], MalformedMessage, "self-describe tag"),
        ([protocol.SELF_DESCRIBE_PREFIX + b"\xff\xfe"], MalformedMessage, "not valid CBOR"),
        ([cbor2.dumps(cbor2.CBORTag(55799, [1, 2]))], MalformedMessage, "expected a map"),
        ([cbor2.dumps(cbor2.CBORTag(55799, {"type": "picture"}))], MalformedMessage, "unknown message type"),
        ([cbor2.dumps(cbor2.CBORTag(55799, {"type": "image", "series_id": 0}))], MalformedMessage, "missing field"),
    ],
)
def test_malformed_headers_are_rejected_and_counted(link, parts, error, text):
    tx, rx = link
    tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    tx.send_raw(parts)
    with pytest.raises(error, match=text):
        recv(rx)
    assert rx.counters.rejected == 1 and text in rx.counters.last_error
    _good_frame_after(tx, rx)


def test_truncated_blob(link):
    tx, rx = link
    series = tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    tx.send_raw([_image_header(series, 32), b"\x00" * 20])
    with pytest.raises(TruncatedMessage, match="20 bytes, header declares 32"):
        recv(rx)
    assert rx.counters.truncated == 1
    _good_frame_after(tx, rx)


def test_missing_blob_part(link):
    tx, rx = link
    series = tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    tx.send_raw([_image_header(series, 32)])
    with pytest.raises(TruncatedMessage, match="ended after 0 of 1 blob parts"):
        recv(rx)
    _good_frame_after(tx, rx)


def test_extra_parts(link):
    tx, rx = link
    series = tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    tx.send_raw([_image_header(series, 32), b"\x01" * 32, b"surplus"])
    with pytest.raises(MalformedMessage, match="more parts"):
        recv(rx)
    _good_frame_after(tx, rx)


def test_wrong_shape_or_dtype_is_a_mismatch(link):
    tx, rx = link
    series = tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    tx.send_raw([_image_header(series, 64), b"\x00" * 64])  # a 4x4 float32 or uint32 frame
    with pytest.raises(FrameMismatch, match="raw blob of 64 bytes, expected 32"):
        recv(rx)
    assert rx.counters.mismatch == 1
    _good_frame_after(tx, rx)


def test_sender_refuses_wrong_shape_and_dtype(link):
    tx, _ = link
    tx.start_series(["haadf"], (4, 4), np.uint16)
    with pytest.raises(ValueError, match="shape"):
        tx.send_frame(np.zeros((4, 5), np.uint16))
    with pytest.raises(ValueError, match="dtype"):
        tx.send_frame(np.zeros((4, 4), np.float64))


def test_oversized_header_is_discarded():
    with FrameSender("tcp://127.0.0.1:0") as tx, FrameReceiver(tx.endpoint, max_header_bytes=512) as rx:
        time.sleep(0.05)
        tx.start_series(["haadf"], (4, 4), np.uint16, user_data={"note": "x" * 1000})
        with pytest.raises(OversizedMessage, match="exceeds the 512-byte bound"):
            recv(rx)
        tx.end_series()  # the end of a series whose start was discarded does not fit the stream state
        with pytest.raises(UnexpectedMessage, match="not open"):
            recv(rx)
        tx.start_series(["haadf"], (4, 4), np.uint16)
        assert isinstance(recv(rx), SeriesStart)
        _good_frame_after(tx, rx)


def test_oversized_lz4_blob_rejected_before_decompression(link):
    tx, rx = link
    series = tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    tx.send_raw([_image_header(series, series.max_blob_nbytes + 100, "lz4"), b"\x00" * (series.max_blob_nbytes + 100)])
    with pytest.raises(FrameMismatch, match="exceeds the bound"):
        recv(rx)
    _good_frame_after(tx, rx)


def test_corrupt_lz4_blob(link):
    tx, rx = link
    series = tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    tx.send_raw([_image_header(series, 10, "lz4"), b"\xff" * 10])
    with pytest.raises(MalformedMessage, match="lz4 blob"):
        recv(rx)
    _good_frame_after(tx, rx)


def test_image_before_start_and_foreign_series(link):
    tx, rx = link
    orphan = protocol.new_series(5, ["haadf"], (4, 4), np.uint16)
    tx.send_raw([_image_header(orphan, 32), b"\x00" * 32])
    with pytest.raises(UnexpectedMessage, match="no open series"):
        recv(rx)
    tx.start_series(["haadf"], (4, 4), np.uint16)
    recv(rx)
    tx.send_raw([_image_header(orphan, 32), b"\x00" * 32])
    with pytest.raises(UnexpectedMessage, match="not the open series"):
        recv(rx)
    assert rx.counters.unexpected == 2
    _good_frame_after(tx, rx)


def test_timeout_returns_none(link):
    _, rx = link
    assert rx.recv(20) is None


def test_decode_header_rejects_bool_for_int():
    msg = cbor2.dumps(cbor2.CBORTag(55799, {"type": "end", "series_id": True, "series_unique_id": "u"}))
    with pytest.raises(MalformedMessage, match="series_id"):
        protocol.decode_header(msg)


def test_receiver_ring_must_hold_two_frames():
    with pytest.raises(ValueError, match="ring"):
        FrameReceiver("tcp://127.0.0.1:1", ring=1)


def test_send_timeout_without_peer():
    with FrameSender("tcp://127.0.0.1:0", sndhwm=1, send_timeout_ms=50) as tx:
        tx.socket.setsockopt(zmq.SNDTIMEO, 50)
        with pytest.raises(TimeoutError, match="timed out"):
            tx.start_series(["haadf"], (4, 4), np.uint16)
