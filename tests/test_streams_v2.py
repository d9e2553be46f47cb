"""DECTRIS Stream V2: round trips, the CBOR tags byte for byte, an independent decode, and bad messages."""

import datetime as dt
import time

import cbor2
import numpy as np
import pytest
from detector_events import collect, pushed_receiver, sender_link

from beamloop.streams.dectris import codecs, stream_v2
from beamloop.streams.dectris.series import DetectorSeries, FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.errors import MalformedMessage, OversizedMessage

SHAPE = (40, 56)


def frames_of(n, dtype, seed=0):
    return np.random.default_rng(seed).poisson(2.0, (n, *SHAPE)).astype(dtype)


@pytest.mark.parametrize("compression", ["bslz4", "lz4", "none"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_round_trip_two_channels(compression, dtype):
    a, b = frames_of(9, dtype, 1), frames_of(9, dtype, 2)
    with sender_link("stream2", sender_kw={"compression": compression}, stack_size=4) as (tx, rx):
        series = tx.start_series(SHAPE, dtype, 9, channels=("threshold_1", "threshold_2"), count_time=1e-4,
                                 config={"user_data": {"scan": [3, 3]}, "threshold_energy": {"threshold_1": 8e3,
                                                                                             "threshold_2": 1.6e4}})
        for i in range(9):
            tx.send_frame({"threshold_1": a[i], "threshold_2": b[i]}, user_data={"i": i})
        tx.end_series()
        events, errors = collect(rx)
    assert not errors
    start = events[0]
    assert isinstance(start, SeriesStart) and start.series.series_unique_id == series.series_unique_id
    assert start.series.channels == ("threshold_1", "threshold_2") and start.series.shape == SHAPE
    assert start.series.config["user_data"] == {"scan": [3, 3]}
    assert start.series.config["threshold_energy"] == {"threshold_1": 8e3, "threshold_2": 1.6e4}
    stacks = [e for e in events if isinstance(e, FrameStack)]
    ids = np.concatenate([s.image_ids for s in stacks])
    ga = np.concatenate([s.channels["threshold_1"].frames for s in stacks])
    gb = np.concatenate([s.channels["threshold_2"].frames for s in stacks])
    assert np.array_equal(ids, np.arange(9)) and np.array_equal(ga, a) and np.array_equal(gb, b)
    assert isinstance(events[-1], SeriesEnd) and events[-1].frames == 9


def test_tags_are_those_of_the_spec():
    """tag 40 [[rows, cols], tag 69 (tag 56500 ["bslz4", 2, bytes])], arm_date as tag 0, in tag 55799."""
    s = DetectorSeries("stream2", 3, "uid-1", ("threshold_1",), (2, 3), np.dtype("<u2"), 1, 1e-3, 1e-3, {})
    frame = np.arange(6, dtype="<u2").reshape(2, 3)
    blob = codecs.encode(frame, codecs.Codec(codecs.BSLZ4, 2))
    date = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)
    msg = stream_v2.encode_image(s, 0, {"threshold_1": stream_v2.image_array(blob, (2, 3), "<u2", "bslz4")},
                                 series_date=date, times_ns=(0, 1_000_000, 1_000_000))
    assert msg[:3] == b"\xd9\xd9\xf7"  # tag 55799
    # tag 40 (0xd8 0x28), array(2), array(2) 2 3, tag 69 (0xd8 0x45), tag 56500 (0xd9 0xdc 0xb4), array(3), "bslz4", 2
    assert b"\xd8\x28\x82\x82\x02\x03\xd8\x45\xd9\xdc\xb4\x83\x65bslz4\x02" in msg
    assert b"\xc0\x74" + b"2026-11-21T12:00:00Z" in msg  # tag 0, text(20)
    raw = stream_v2.image_array(frame.tobytes(), (2, 3), "<u2", "none")
    assert cbor2.dumps(raw)[:9] == b"\xd8\x28\x82\x82\x02\x03\xd8\x45\x4c"  # 69(bytes(12)), no tag 56500
    u8 = stream_v2.image_array(bytes(6), (2, 3), "u1", "lz4")
    assert cbor2.dumps(u8).startswith(b"\xd8\x28\x82\x82\x02\x03\xd8\x40\xd9\xdc\xb4\x83\x63lz4\x00")
    u32 = stream_v2.image_array(bytes(24), (2, 3), "<u4", "none")
    assert cbor2.dumps(u32).startswith(b"\xd8\x28\x82\x82\x02\x03\xd8\x46")


def test_independent_decode_as_in_the_dectris_example():
    """Decode our message the way DECTRIS' example client does (cbor2 tag hooks + dectris.compression)."""
    from dectris.compression import decompress

    def hook(tag, immutable):
        if tag.tag == 56500:
            alg, elem, data = tag.value
            return decompress(data, alg, elem_size=elem)
        if tag.tag == 69:
            return np.frombuffer(tag.value, "<u2")
        if tag.tag == 40:
            dims, arr = tag.value
            return arr.reshape(dims)
        return tag

    frame = frames_of(1, np.uint16)[0]
    s = DetectorSeries("stream2", 0, "u", ("t",), SHAPE, np.dtype("<u2"), 1)
    blob = codecs.encode(frame, codecs.Codec(codecs.BSLZ4, 2))
    date = dt.datetime.now(dt.UTC)
    msg = cbor2.loads(stream_v2.encode_image(s, 5, {"t": stream_v2.image_array(blob, SHAPE, "<u2", "bslz4")},
                                             series_date=date, times_ns=(1, 2, 1)), tag_hook=hook)
    assert msg["type"] == "image" and msg["image_id"] == 5 and list(msg)[0] == "type"
    assert list(msg["start_time"]) == [1, 1_000_000_000] and msg["series_date"] == date
    assert np.array_equal(msg["data"]["t"], frame)
    start = cbor2.loads(stream_v2.encode_start(s))
    assert list(start)[0] == "type" and start["image_size_x"] == SHAPE[1] and start["image_size_y"] == SHAPE[0]
    assert isinstance(start["arm_date"], dt.datetime)


@pytest.fixture
def raw_link():
    """A receiver bound on a free port and a plain PUSH socket connected to it."""
    with pushed_receiver("stream2", stack_size=8) as (tx, rx):
        yield tx, rx


def test_bad_messages_are_counted_and_nothing_else_is_lost(raw_link):
    tx, rx = raw_link
    s = DetectorSeries("stream2", 1, "uid", ("t",), SHAPE, np.dtype("<u2"), 4)
    frames = frames_of(4, np.uint16)
    date = dt.datetime.now(dt.UTC)
    codec = codecs.Codec(codecs.BSLZ4, 2)

    def image(i, frame=None, **kw):
        blob = codecs.encode(frames[i] if frame is None else frame, codec)
        arr = kw.pop("array", None) or stream_v2.image_array(blob, SHAPE, "<u2", "bslz4")
        return stream_v2.encode_image(kw.pop("series", s), i, {"t": arr}, series_date=date)

    tx.send(stream_v2.encode_start(s))
    tx.send(image(0))
    tx.send(b"\xd9\xd9\xf7\xa1")                                         # malformed: truncated CBOR
    tx.send(cbor2.dumps({"type": "image", "image_id": 1}))              # unexpected: no series fields
    other = DetectorSeries("stream2", 1, "other-uid", ("t",), SHAPE, np.dtype("<u2"), 4)
    tx.send(image(1, series=other))                                     # unexpected: foreign series
    wrong = stream_v2.image_array(codecs.encode(frames[1][:, :-1].copy(), codec), (40, 55), "<u2", "bslz4")
    tx.send(image(1, array=wrong))                                      # mismatch: dimensions
    tag65 = cbor2.CBORTag(40, [[40, 56], cbor2.CBORTag(65, frames[1].astype(">u2").tobytes())])
    tx.send(image(1, array=tag65))                                      # malformed: big-endian tag 65
    bomb = bytearray(codecs.encode(frames[1], codec))
    bomb[:8] = (1 << 40).to_bytes(8, "big")
    tx.send(image(1, array=cbor2.CBORTag(40, [[40, 56], cbor2.CBORTag(69, cbor2.CBORTag(
        56500, ["bslz4", 2, bytes(bomb)]))])))                          # mismatch: claims a terabyte
    tx.send(b"\xd9\xd9\xf7" + bytes(1 << 20))                           # oversized
    tx.send_multipart([image(1), b"extra"])                             # malformed: two parts
    for i in (1, 2, 3):
        tx.send(image(i))
    tx.send(stream_v2.encode_end(s))
    events, errors = collect(rx)
    kinds = sorted(type(e).__name__ for e in errors)
    assert kinds == sorted(["MalformedMessage", "UnexpectedMessage", "UnexpectedMessage", "FrameMismatch",
                            "MalformedMessage", "FrameMismatch", "OversizedMessage", "MalformedMessage"]), \
        [str(e) for e in errors]
    stacks = [e for e in events if isinstance(e, FrameStack)]
    assert np.array_equal(np.concatenate([st.frames for st in stacks]), frames)
    assert rx.counters.frames == 4 and rx.counters.rejected == 8 and events[-1].missing == 0


def test_start_message_checks():
    bad = [
        {"type": "start", "series_id": 1, "series_unique_id": "u", "channels": [], "image_size_x": 4,
         "image_size_y": 4, "image_dtype": "uint16"},
        {"type": "start", "series_id": 1, "series_unique_id": "u", "channels": ["a"], "image_size_x": 0,
         "image_size_y": 4, "image_dtype": "uint16"},
        {"type": "start", "series_id": 1, "series_unique_id": "u", "channels": ["a"], "image_size_x": 4,
         "image_size_y": 4, "image_dtype": "float64"},
        {"type": "start", "series_id": -1, "series_unique_id": "u", "channels": ["a"], "image_size_x": 4,
         "image_size_y": 4, "image_dtype": "uint8"},
    ]
    bad.append({"type": "start", "series_id": 1, "series_unique_id": "u", "channels": ["a"], "image_size_x": 4,
                "image_size_y": 4, "image_dtype": []})  # unhashable: once a TypeError (hypothesis)
    for msg in bad:
        with pytest.raises(MalformedMessage):
            stream_v2.series_from_start(stream_v2.loads(cbor2.dumps(msg)))
    with pytest.raises(MalformedMessage, match="expected a map"):
        stream_v2.loads(cbor2.dumps([1, 2]))


def test_latest_mode_stream2():
    frames = frames_of(10, np.uint16)
    with sender_link("stream2", mode="latest", rcvhwm=100) as (tx, rx):
        tx.start_series(SHAPE, np.uint16, 10)
        assert isinstance(rx.recv(2000), SeriesStart)
        for f in frames:
            tx.send_frame(f)
        time.sleep(0.2)
        ev = rx.recv(2000)
        assert len(ev) == 1 and ev.image_ids[0] == 9 and np.array_equal(ev.frames[0], frames[9])
        assert rx.counters.dropped == 9


@pytest.mark.parametrize("next_shape", [SHAPE, (24, 32)], ids=["same-shape", "other-shape"])
def test_unended_series_keeps_its_frames_and_name(raw_link, next_shape):
    """A series that starts while the stack holds frames of an unended one: those frames are delivered first,
    under the old series' name, and the new series' frames are its own (once relabelled: hypothesis)."""
    tx, rx = raw_link
    date = dt.datetime.now(dt.UTC)
    a = DetectorSeries("stream2", 1, "series-a", ("t",), SHAPE, np.dtype("<u2"), 5)
    b = DetectorSeries("stream2", 1, "series-b", ("t",), next_shape, np.dtype("<u2"), 3)
    fa = frames_of(2, np.uint16, 7)
    fb = (np.arange(3 * next_shape[0] * next_shape[1]).reshape(3, *next_shape) % 977).astype(np.uint16)

    def image(s, i, f):
        return stream_v2.encode_image(s, i, {"t": stream_v2.image_array(f.tobytes(), f.shape, f.dtype, "none")},
                                      series_date=date)

    tx.send(stream_v2.encode_start(a))
    for i in range(2):
        tx.send(image(a, i, fa[i]))
    tx.send(stream_v2.encode_start(b))
    for i in range(3):
        tx.send(image(b, i, fb[i]))
    tx.send(stream_v2.encode_end(b))
    time.sleep(0.1)  # everything queued: the receiver reads on without waiting
    events, errors = collect(rx)
    assert events and isinstance(events[-1], SeriesEnd) and not errors
    names = [(type(e).__name__, e.series.series_unique_id) for e in events]
    assert names[:3] == [("SeriesStart", "series-a"), ("FrameStack", "series-a"), ("SeriesStart", "series-b")]
    assert names[3:] == [("FrameStack", "series-b")] * (len(names) - 4) + [("SeriesEnd", "series-b")]
    assert np.array_equal(events[1].frames, fa) and list(events[1].image_ids) == [0, 1]
    got_b = np.concatenate([e.frames for e in events[3:-1]])
    assert np.array_equal(got_b, fb) and events[-1].missing == 0
    assert rx.counters.unexpected == 1  # series b started while a was open


def test_huge_series_announcement_is_rejected_before_allocation(raw_link):
    """A start message announcing 16384x16384 uint32 frames (1 GiB each, 8 x 8 of them in the ring) is an
    oversized message, counted, allocates nothing, and the next series is received."""
    tx, rx = raw_link
    huge = DetectorSeries("stream2", 1, "huge", ("t",), (1 << 14, 1 << 14), np.dtype("<u4"), 1)
    good = DetectorSeries("stream2", 2, "good", ("t",), SHAPE, np.dtype("<u2"), 0)
    tx.send(stream_v2.encode_start(huge))
    tx.send(stream_v2.encode_start(good))
    with pytest.raises(OversizedMessage, match="max_ring_bytes"):
        rx.recv(2000)
    assert rx.counters.oversized == 1 and rx.series is None and rx.slot_nbytes == 0  # no ring allocated
    ev = rx.recv(2000)
    assert isinstance(ev, SeriesStart) and ev.series.series_unique_id == "good"
