"""Frame ids and times shared by the stream receivers: FrameIdTracker known answers and the rational_ns rule.

The tracker is checked on its own (known answers for gaps, late and repeated ids, and a far jump that is
one bogus id) and through both receivers; the times rule through rational_ns and the decoders.
"""

import datetime as dt
import json

import cbor2
import numpy as np
import pytest
from detector_events import collect, pushed_receiver, stacked

from beamloop.streams._ids import MAX_NS, NS, FrameIdTracker, rational_ns
from beamloop.streams.counters import StreamCounters
from beamloop.streams.dectris import simplon, stream_v2
from beamloop.streams.dectris.series import DetectorSeries
from beamloop.streams.errors import MalformedMessage
from beamloop.streams.native import protocol


def run(ids, number_of_images=0, **kw):
    """Counters and per-image gaps after a series with ``ids``; the tracker too."""
    c = StreamCounters()
    t = FrameIdTracker(c, **kw)
    t.start()
    gaps = [t.see(i) for i in ids]
    missing = t.end(number_of_images)
    return c, gaps, missing, t


def counts(c):
    return {k: getattr(c, k) for k in ("gaps", "missing_frames", "reordered", "duplicates", "bogus_ids")}


def test_consecutive_ids_count_nothing():
    c, gaps, missing, t = run(range(10), number_of_images=10)
    assert counts(c) == dict(gaps=0, missing_frames=0, reordered=0, duplicates=0, bogus_ids=0)
    assert gaps == [0] * 10 and missing == 0 and t.frames == 10 and t.next_id == 10


def test_gap_late_frame_and_missing_tail():
    """0 1 4 3 5 of 8 announced: one jump over 2 ids (2, 3), 3 comes late, 6 and 7 never come."""
    c, gaps, missing, t = run([0, 1, 4, 3, 5], number_of_images=8)
    assert gaps == [0, 0, 2, 0, 0] and missing == 2
    assert counts(c) == dict(gaps=2, missing_frames=4, reordered=1, duplicates=0, bogus_ids=0)
    assert t.frames == 5


def test_repeated_ids_are_duplicates():
    """0 1 2 2 1 5 3: the second 2 and 1 were received already (duplicates); 3 was skipped, so it is late."""
    c, gaps, _, _ = run([0, 1, 2, 2, 1, 5, 3])
    assert gaps == [0, 0, 0, 0, 0, 2, 0]
    assert counts(c) == dict(gaps=1, missing_frames=2, reordered=3, duplicates=2, bogus_ids=0)


def test_a_late_frame_counts_once_then_its_repeat_is_a_duplicate():
    c, _, _, _ = run([0, 3, 1, 1, 2])
    assert counts(c) == dict(gaps=1, missing_frames=2, reordered=3, duplicates=1, bogus_ids=0)


def test_duplicates_beyond_the_window_count_as_reordered_only():
    c, _, _, _ = run([*range(20), 2], window=8)
    assert c.reordered == 1 and c.duplicates == 0
    c, _, _, _ = run([*range(20), 15], window=8)
    assert c.reordered == 1 and c.duplicates == 1


def test_huge_jump_is_one_bogus_id_not_a_trillion_missing_frames():
    """A single corrupt id 10**12 in a clean stream: one bogus id; no gap, and later ids are not late."""
    c, gaps, missing, t = run([0, 1, 2, 10**12, 3, 4, 5], number_of_images=6)
    assert counts(c) == dict(gaps=0, missing_frames=0, reordered=0, duplicates=0, bogus_ids=1)
    assert gaps == [0] * 7 and missing == 0 and t.next_id == 6 and t.frames == 7


def test_a_far_jump_the_next_id_continues_from_is_real():
    """Frames really lost: 0 1 then 100000 100001 ...: a gap of 99998 frames, counted when 100001 confirms it."""
    c, gaps, _, t = run([0, 1, 100_000, 100_001, 100_002], max_gap=1000)
    assert gaps == [0, 0, 0, 99_998, 0]
    assert counts(c) == dict(gaps=1, missing_frames=99_998, reordered=0, duplicates=0, bogus_ids=0)
    assert t.next_id == 100_003


def test_a_far_jump_at_the_end_of_a_series_is_bogus():
    c, _, missing, _ = run([0, 1, 2, 1 << 40], number_of_images=3)
    assert counts(c) == dict(gaps=0, missing_frames=0, reordered=0, duplicates=0, bogus_ids=1) and missing == 0


def test_two_far_ids_in_a_row_that_do_not_continue_are_two_bogus_ids():
    c, _, _, t = run([0, 1 << 40, 1 << 50, 1])
    assert c.bogus_ids == 2 and c.gaps == 0 and t.next_id == 2


def test_jumps_up_to_max_gap_count_at_once():
    c, gaps, _, _ = run([0, 1000], max_gap=1000)
    assert gaps == [0, 999] and c.gaps == 1 and c.missing_frames == 999 and c.bogus_ids == 0


def test_advance_is_a_run_of_consecutive_ids_and_settles_a_pending_far_jump():
    c = StreamCounters()
    t = FrameIdTracker(c)
    t.start()
    t.see(0)
    t.see(1 << 40)  # far ahead: waits for the next id
    t.advance(5)  # ids 1..5 from a compiled loop: the far id was bogus
    assert t.next_id == 6 and t.frames == 7 and c.bogus_ids == 1 and c.gaps == 0


def test_a_new_series_starts_from_zero():
    c = StreamCounters()
    t = FrameIdTracker(c)
    t.start()
    for i in (0, 1, 2):
        t.see(i)
    t.start()
    assert t.see(0) == 0 and t.frames == 1 and c.reordered == 0


def test_tracker_rejects_a_bad_configuration():
    with pytest.raises(ValueError, match="max_gap"):
        FrameIdTracker(StreamCounters(), max_gap=0)


def test_a_bogus_id_through_the_detector_receiver():
    """Both paths of the SIMPLON v1 receiver (the compiled loop takes consecutive ids only) count the far id
    as one bogus id and deliver every frame."""
    frames = (np.arange(6 * 12).reshape(6, 3, 4) % 251).astype(np.uint16)
    msgs = list(simplon.series_messages(frames, series=2))
    bogus = [p.replace(b'"frame":3', b'"frame":999999999') if i == 0 else p for i, p in enumerate(msgs[4])]
    with pushed_receiver("simplon1", stack_size=16) as (tx, rx):
        for m in [*msgs[:4], bogus, *msgs[5:]]:  # ids 0 1 2 999999999 4 5
            tx.send_multipart(m)
        events, errors = collect(rx)
    ids, got = stacked(events)
    assert not errors and ids.tolist() == [0, 1, 2, 999_999_999, 4, 5] and np.array_equal(got, frames)
    c = rx.counters
    assert (c.bogus_ids, c.gaps, c.missing_frames, c.reordered) == (1, 1, 1, 0)  # 3 never came
    assert events[-1].missing == 0


# rational_ns -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, ns", [([0, 1], 0), ([3, 2], 1_500_000_000), ([1, 3], 333_333_333),
                                       ((5, NS), 5), ([MAX_NS, NS], MAX_NS)])
def test_rational_ns_known_answers(value, ns):
    assert rational_ns(value, "t") == ns


@pytest.mark.parametrize("value", [[-1, 1], [1, 0], [1, -1], [True, 1], [1.0, 1], [1], [1, 2, 3], "1/2", None,
                                   [MAX_NS + 1, NS]])
def test_rational_ns_rejects(value):
    """Times since an epoch and durations are never negative; the denominator is positive; the result fits
    the int64 nanoseconds the receivers store."""
    with pytest.raises(MalformedMessage, match="t"):
        rational_ns(value, "t")


def _image_with(series, **fields):
    """A native image header message with some fields replaced."""
    msg = dict(cbor2.loads(protocol.encode_image_header(series, 0, [("raw", series.frame_nbytes)])[3:]))
    msg.update(fields)
    return cbor2.dumps(cbor2.CBORTag(55799, msg))


def test_native_decoder_rejects_negative_times():
    """Changed behaviour: the native decoder once accepted a negative numerator; it follows the one rule now."""
    s = protocol.new_series(0, ["haadf"], (2, 2), np.uint16)
    assert protocol.decode_header(_image_with(s, start_time=[7, NS])).start_time_ns == 7
    with pytest.raises(MalformedMessage, match="start_time"):
        protocol.decode_header(_image_with(s, start_time=[-7, NS]))


def test_native_encoder_refuses_negative_times():
    s = protocol.new_series(0, ["haadf"], (2, 2), np.uint16)
    with pytest.raises(ValueError, match=">= 0"):
        protocol.encode_image_header(s, 0, [("raw", 8)], real_time_ns=-1)


def test_stream2_time_beyond_int64_is_a_counted_rejection():
    """Found while merging the two rules: a Stream V2 time of 2**64 s once raised an uncounted OverflowError
    out of DetectorReceiver.recv (it did not fit the int64 time array); it is a MalformedMessage now."""
    s = DetectorSeries("stream2", 1, "u", ("t",), (2, 3), np.dtype("<u2"), 1)
    good = stream_v2.encode_image(s, 0, {"t": stream_v2.image_array(bytes(12), (2, 3), "<u2", "none")},
                                  series_date=dt.datetime.now(dt.UTC))
    msg = dict(cbor2.loads(good[3:]))
    msg["start_time"] = [1 << 64, 1]
    with pushed_receiver("stream2") as (tx, rx):
        tx.send(stream_v2.encode_start(s))
        tx.send(cbor2.dumps(cbor2.CBORTag(55799, msg), timezone=dt.UTC))
        tx.send(good)
        tx.send(stream_v2.encode_end(s))
        events, errors = collect(rx)
    assert [type(e).__name__ for e in errors] == ["MalformedMessage"] and rx.counters.malformed == 1
    assert stacked(events)[0].tolist() == [0]


@pytest.mark.parametrize("protocol", ["simplon1", "stream2"])
def test_image_id_beyond_int64_is_a_counted_rejection(protocol):
    """Found while moving the id bookkeeping: an image id of 2**66 once raised an uncounted OverflowError out
    of DetectorReceiver.recv (the ring holds int64 ids); it is a MalformedMessage now, and the series goes on."""
    frames = (np.arange(2 * 48).reshape(2, 8, 6) % 97).astype(np.uint16)
    if protocol == "simplon1":
        msgs = list(simplon.series_messages(frames, series=3))
        bad = list(msgs[1])
        bad[0] = json.dumps({**json.loads(bad[0]), "frame": 2**66}).encode()
        order = [msgs[0], bad, msgs[1], msgs[2], msgs[3]]
    else:
        s = DetectorSeries("stream2", 1, "u", ("t",), (8, 6), np.dtype("<u2"), 2)
        date = dt.datetime.now(dt.UTC)
        imgs = [stream_v2.encode_image(s, i, {"t": stream_v2.image_array(f.tobytes(), f.shape, f.dtype, "none")},
                                       series_date=date) for i, f in enumerate(frames)]
        msg = dict(cbor2.loads(imgs[0][3:]))
        msg["image_id"] = 2**66
        bad = cbor2.dumps(cbor2.CBORTag(55799, msg), timezone=dt.UTC)
        order = [[stream_v2.encode_start(s)], [bad], [imgs[0]], [imgs[1]], [stream_v2.encode_end(s)]]
    with pushed_receiver(protocol, verify_hash=True) as (tx, rx):
        for m in order:
            tx.send_multipart(m)
        events, errors = collect(rx)
    ids, got = stacked(events)
    assert [type(e).__name__ for e in errors] == ["MalformedMessage"] and "int64" in str(errors[0])
    assert ids.tolist() == [0, 1] and np.array_equal(got, frames) and rx.counters.frames == 2
    assert rx.counters.bogus_ids == 0 and rx.counters.malformed == 1
