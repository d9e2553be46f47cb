"""SIMPLON stream v1: bit-exact round trips, flow control, and every kind of bad message."""

import json
import time

import numpy as np
import pytest
from detector_events import collect, pushed_receiver, sender_link, stacked

from beamloop.streams.dectris import codecs, simplon
from beamloop.streams.dectris.series import FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.errors import (
    MalformedMessage,
    UnexpectedMessage,
)

SHAPE = (48, 40)


def make_frames(n, dtype=np.uint16, seed=0):
    return np.random.default_rng(seed).poisson(2.0, (n, *SHAPE)).astype(dtype)


@pytest.fixture
def link():
    with sender_link("simplon1", stack_size=8) as (tx, rx):
        yield tx, rx


@pytest.mark.parametrize("encoding,dtype", [("bslz4", np.uint8), ("bslz4", np.uint16), ("bslz4", np.uint32),
                                            ("lz4<", np.uint16), ("<", np.uint32), (">", np.uint16)])
def test_round_trip_bit_exact(encoding, dtype):
    frames = make_frames(21, dtype)
    with sender_link("simplon1", sender_kw={"encoding": encoding}, stack_size=8) as (tx, rx):
        cfg = tx.start_series(SHAPE, dtype, len(frames), count_time=2e-4)
        for f in frames:
            tx.send_frame(f)
        tx.end_series()
        events, errors = collect(rx)
    assert not errors
    start = events[0]
    assert isinstance(start, SeriesStart) and start.series.shape == SHAPE
    assert start.series.dtype == np.dtype(dtype) and start.series.number_of_images == 21
    assert start.series.count_time == 2e-4 and start.series.config["ntrigger"] == cfg["ntrigger"]
    ids, got = stacked(events)
    assert np.array_equal(ids, np.arange(21)) and np.array_equal(got, frames)
    end = events[-1]
    assert isinstance(end, SeriesEnd) and end.frames == 21 and end.missing == 0
    assert max(len(e) for e in events if isinstance(e, FrameStack)) <= 8
    c = rx.counters
    assert c.frames == c.decoded == 21 and c.rejected == 0 and c.gaps == 0


def test_frame_times_and_hash_are_those_sent():
    frames = make_frames(3)
    msgs = list(simplon.series_messages(frames, series=4, count_time=1e-3))
    with pushed_receiver("simplon1", verify_hash=True) as (tx, rx):
        for m in msgs:
            tx.send_multipart(m)
        events, errors = collect(rx)
    stack = next(e for e in events if isinstance(e, FrameStack))
    assert stack.times_ns.tolist() == [[0, 1_000_000, 1_000_000], [1_000_000, 2_000_000, 1_000_000],
                                       [2_000_000, 3_000_000, 1_000_000]]
    assert not errors and stack.series.series_id == 4


def test_header_and_config_as_separate_messages_like_dectrissim():
    frames = make_frames(4)
    msgs = list(simplon.series_messages(frames, series=9))
    with pushed_receiver("simplon1") as (tx, rx):
        header = msgs[0]
        tx.send(header[0])
        tx.send(header[1])  # the config as its own message
        for m in msgs[1:]:
            tx.send_multipart(m)
        events, errors = collect(rx)
    assert not errors
    ids, got = stacked(events)
    assert np.array_equal(got, frames) and events[0].series.series_id == 9


def test_bad_messages_are_counted_and_nothing_else_is_lost(link):
    tx, rx = link
    frames = make_frames(6)
    tx.start_series(SHAPE, np.uint16, 6)
    enc = tx.encoding_text
    good = [simplon.image_parts(tx.series, i, codecs.encode(f, tx.codec), SHAPE, np.uint16, enc) for i, f in
            enumerate(frames)]
    tx.send_raw(good[0])
    tx.send_raw([b"{not json"])                                   # malformed
    tx.send_raw(good[1][:2])                                      # truncated: blob and dconfig missing
    tx.send_raw(good[1])
    tx.send_raw(good[2])
    bad = list(good[3])
    bad[1] = bad[1].replace(b'"shape":[40,48]', b'"shape":[41,48]')  # mismatch
    tx.send_raw(bad)
    tx.send_raw([b"x" * (1 << 17)])                               # oversized part 0
    big = list(good[3])
    big[2] = bytes(SHAPE[0] * SHAPE[1] * 4)                       # oversized blob
    tx.send_raw(big)
    size_lie = list(good[3])
    size_lie[1] = json.dumps({**json.loads(good[3][1]), "size": 5}).encode()   # truncated blob (size lie)
    tx.send_raw(size_lie)
    foreign = list(good[3])
    foreign[0] = foreign[0].replace(f'"series":{tx.series}'.encode(), b'"series":999')  # unexpected
    tx.send_raw(foreign)
    tx.send_raw([json.dumps({"htype": "dimage-1.0", "series": tx.series, "frame": 3, "hash": "0"}).encode(),
                 good[3][1], good[3][2], b'{"htype":"dconfig-1.0","start_time":"soon"}'])  # malformed dconfig
    tx.send_raw(good[3] + [b"extra"])                             # too many parts
    for g in good[3:]:
        tx.send_raw(g)
    tx.end_series()
    events, errors = collect(rx)
    kinds = sorted(type(e).__name__ for e in errors)
    assert kinds == sorted(["MalformedMessage", "TruncatedMessage", "FrameMismatch", "OversizedMessage",
                            "OversizedMessage", "TruncatedMessage", "UnexpectedMessage", "MalformedMessage",
                            "MalformedMessage"])
    ids, got = stacked(events)
    assert np.array_equal(ids, np.arange(6)) and np.array_equal(got, frames)
    c = rx.counters
    assert (c.malformed, c.truncated, c.mismatch, c.oversized, c.unexpected) == (3, 2, 1, 2, 1)
    assert c.frames == 6 and c.gaps == 0 and "frame" in c.last_error


def test_pixel_type_that_is_not_text_is_a_counted_mismatch(link):
    """Found by fuzzing: a dimage_d part with ``"type": []`` raised an uncounted TypeError."""
    tx, rx = link
    frames = make_frames(2)
    tx.start_series(SHAPE, np.uint16, 2)
    good = [simplon.image_parts(tx.series, i, codecs.encode(f, tx.codec), SHAPE, np.uint16, tx.encoding_text)
            for i, f in enumerate(frames)]
    bad = list(good[0])
    bad[1] = json.dumps({**json.loads(good[0][1]), "type": []}).encode()
    tx.send_raw(bad)
    for g in good:
        tx.send_raw(g)
    tx.end_series()
    events, errors = collect(rx)
    assert [type(e).__name__ for e in errors] == ["FrameMismatch"] and rx.counters.mismatch == 1
    ids, got = stacked(events)
    assert np.array_equal(ids, np.arange(2)) and np.array_equal(got, frames)


def test_corrupt_compressed_frame_is_dropped_from_its_stack(link):
    tx, rx = link
    frames = make_frames(5)
    tx.start_series(SHAPE, np.uint16, 5)
    for i, f in enumerate(frames):
        blob = bytearray(codecs.encode(f, tx.codec))
        if i == 2:
            blob[12:16] = b"\x7f\xff\xff\x00"  # a block longer than the blob
        tx.send_blob(bytes(blob))
    tx.end_series()
    events, _ = collect(rx)
    ids, got = stacked(events)
    assert ids.tolist() == [0, 1, 3, 4] and np.array_equal(got, frames[[0, 1, 3, 4]])
    assert rx.counters.malformed == 1 and rx.counters.frames == 4 and rx.counters.decoded == 4


def test_a_dropped_frame_leaves_the_ring_layout_intact():
    """Found by fuzzing: dropping a corrupt frame compacted the ring's fixed slot offsets in place, so when the
    ring came round to that stack again, the frame in the first slot was decoded from the second slot's blob
    (two equal frames). Stacks of 2 in a ring of 2: the corrupt frame 0 shares stack 0 with frame 4."""
    frames = make_frames(8)
    with pushed_receiver("simplon1", stack_size=2, stacks=2) as (tx, rx):
        codec = codecs.Codec(codecs.BSLZ4, 2)
        msgs = list(simplon.series_messages(frames, series=2))
        bad = list(msgs[1])
        blob = bytearray(codecs.encode(frames[0], codec))
        blob[12:16] = b"\x7f\xff\xff\x00"  # a block longer than the blob
        bad[2] = bytes(blob)
        bad[0] = json.dumps({**json.loads(bad[0]), "hash": "0"}).encode()
        for m in [msgs[0], bad, *msgs[2:]]:
            tx.send_multipart(m)
        time.sleep(0.1)  # all queued: every stack fills before it is delivered
        ids, got = [], []
        while not isinstance(ev := rx.recv(2000), SeriesEnd):  # copy each stack before the ring reuses it
            if isinstance(ev, FrameStack):
                ids += ev.image_ids.tolist()
                got += list(ev.frames.copy())
    assert rx.counters.malformed == 1 and rx.counters.rejected == 1
    assert ids == list(range(1, 8)) and np.array_equal(got, frames[1:])


def test_gaps_reordering_and_missing_frames(link):
    tx, rx = link
    frames = make_frames(8)
    tx.start_series(SHAPE, np.uint16, 8)
    for i in (0, 1, 4, 3, 5):  # 2 lost upstream, 3 late
        tx.send_frame(frames[i], frame_id=i)
    tx.end_series()
    events, errors = collect(rx)
    ids, got = stacked(events)
    assert ids.tolist() == [0, 1, 4, 3, 5] and np.array_equal(got, frames[[0, 1, 4, 3, 5]])
    end = events[-1]
    assert end.missing == 2  # 6 and 7 never came
    c = rx.counters
    assert c.reordered == 1 and c.gaps == 2 and c.missing_frames == 2 + 2


def test_image_before_header_and_unknown_end(link):
    tx, rx = link
    f = make_frames(1)[0]
    parts = simplon.image_parts(3, 0, codecs.encode(f, codecs.Codec(codecs.BSLZ4, 2)), SHAPE, np.uint16, "bs16-lz4<")
    tx.send_raw(parts)
    tx.send_raw(simplon.end_parts(3))
    with pytest.raises(UnexpectedMessage, match="no open series"):
        rx.recv(2000)
    with pytest.raises(UnexpectedMessage, match="not open"):
        rx.recv(2000)
    assert rx.counters.unexpected == 2


def test_bad_headers():
    with pushed_receiver("simplon1") as (tx, rx):
        tx.send_multipart([b'{"htype":"dheader-1.0","series":1}', b'{"x_pixels_in_detector":"big"}'])
        tx.send_multipart([b'{"htype":"dheader-1.0","series":1,"header_detail":"none"}'])
        tx.send_multipart([b'{"htype":"nonsense"}'])
        errors = [pytest.raises(MalformedMessage, rx.recv, 2000) for _ in range(3)]
    assert "x_pixels_in_detector" in str(errors[0].value) and "none" in str(errors[1].value)
    assert rx.counters.malformed == 3


def test_latest_mode_delivers_only_the_newest_frame():
    frames = make_frames(30)
    with sender_link("simplon1", mode="latest", rcvhwm=1000) as (tx, rx):
        tx.start_series(SHAPE, np.uint16, 30)
        assert isinstance(rx.recv(2000), SeriesStart)
        for f in frames:
            tx.send_frame(f)
        time.sleep(0.3)  # all 30 are queued by now
        ev = rx.recv(2000)
        assert isinstance(ev, FrameStack) and len(ev) == 1
        assert ev.image_ids[0] == 29 and np.array_equal(ev.frames[0], frames[29])
        assert rx.counters.dropped == 29 and rx.counters.decoded == 1
        tx.send_frame(frames[0])
        ev = rx.recv(2000)
        assert ev.image_ids[0] == 30 and np.array_equal(ev.frames[0], frames[0])


@pytest.mark.slow
def test_lossless_back_pressure_blocks_the_sender_and_loses_nothing():
    shape = (128, 128)  # incompressible noise: 32 kB per frame, more than the socket buffers hold
    frames = np.random.default_rng(5).integers(0, 2 ** 16, (400, *shape), dtype=np.uint16)
    with sender_link("simplon1", sender_kw={"sndhwm": 4, "send_timeout_ms": 50}, stack_size=16, rcvhwm=4) as (tx, rx):
        tx.start_series(shape, np.uint16, len(frames))
        blocked, i = 0, 0
        while i < len(frames):  # nobody reads yet: the queues fill and the sender must wait
            try:
                tx.send_frame(frames[i])
                i += 1
            except TimeoutError:
                blocked += 1
                break
        assert blocked == 1 and i < len(frames)
        got = []
        while i < len(frames) or len(got) < len(frames):
            if i < len(frames):
                try:
                    tx.send_frame(frames[i])
                    i += 1
                except TimeoutError:
                    pass
            ev = rx.recv(10)
            if isinstance(ev, FrameStack):
                got.append(ev.frames.copy())
                got = [np.concatenate(got)] if len(got) > 1 else got
                if len(got[0]) == len(frames):
                    break
    assert np.array_equal(got[0], frames)
    assert rx.counters.dropped == 0 and rx.counters.gaps == 0


def test_sender_rejects_wrong_frames(link):
    tx, _ = link
    with pytest.raises(RuntimeError):
        tx.send_frame(np.zeros(SHAPE, np.uint16))
    tx.start_series(SHAPE, np.uint16, 1)
    with pytest.raises(ValueError):
        tx.send_frame(np.zeros(SHAPE, np.uint8))
    with pytest.raises(ValueError):
        tx.start_series(SHAPE, np.float32, 1)
