"""Fuzzing the native frame stream (beamloop.streams.native: protocol, receiver) with hypothesis.

Properties: ``decode_header`` raises nothing but :class:`MalformedMessage`; the receiver, fed any
sequence of multipart messages over a real socket, raises nothing but :class:`ProtocolError`, counts
every message and every rejection, and afterwards receives a good series bit-exact; the service goes on
and processes the next good frame. The default runs are short (a few hundred examples); the ``_long``
variants (``-m slow``) run 20,000.
"""

import time

import cbor2
import lz4.block
import numpy as np
import pytest
from detector_events import pushed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beamloop.streams.errors import MalformedMessage, OversizedMessage, ProtocolError
from beamloop.streams.native import protocol
from beamloop.streams.native.receiver import FrameReceiver, ImageEvent, SeriesEnd, SeriesStart

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))
RING = 4
MAX_RING_BYTES = 64 << 20
"""Start messages announcing more than this (ring x frame) are kept out of the end-to-end runs: see
test_huge_frame_announcement_is_a_protocol_error."""

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)

SERIES = protocol.new_series(3, ["haadf"], (4, 6), np.uint16, number_of_images=2, user_data={"kind": "frame"})
SERIES2 = protocol.new_series(4, ["haadf", "bf"], (2, 3), np.uint8)


def _as_map(buf: bytes) -> dict:
    return dict(cbor2.loads(buf[3:]))


def valid_maps():
    """Decoded maps of good start / image / end messages of SERIES and SERIES2."""
    out = []
    for s in (SERIES, SERIES2):
        out.append(_as_map(protocol.encode_start(s)))
        out.append(_as_map(protocol.encode_image_header(s, 1, [("raw", s.frame_nbytes)] * len(s.channels),
                                                      user_data={"sent_ns": 5})))
        out.append(_as_map(protocol.encode_image_header(s, 0, [("lz4", 9)] * len(s.channels))))
        out.append(_as_map(protocol.encode_end(s)))
    return out


@st.composite
def mutated_map(draw):
    """A good message map with fields removed, replaced or added."""
    msg = dict(draw(st.sampled_from(valid_maps())))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["drop", "set", "add", "nested"]))
        keys = sorted(msg)
        if op == "drop" and keys:
            msg.pop(draw(st.sampled_from(keys)))
        elif op == "set" and keys:
            msg[draw(st.sampled_from(keys))] = draw(cbor_values)
        elif op == "add":
            msg[draw(st.text(max_size=8))] = draw(cbor_values)
        elif op == "nested" and isinstance(msg.get("data"), dict) and msg["data"]:
            ch = draw(st.sampled_from(sorted(msg["data"])))
            msg["data"] = {**msg["data"], ch: draw(cbor_values | st.fixed_dictionaries(
                {"encoding": st.sampled_from(["raw", "lz4", "bslz4", ""]), "size": cbor_values}))}
    return msg


@st.composite
def header_bytes(draw):
    """Part 0 of a message: arbitrary bytes, CBOR after the tag, or a mutated good message."""
    kind = draw(st.sampled_from(["bytes", "tagged bytes", "tagged value", "mutated", "untagged", "truncated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "tagged bytes":
        return protocol.SELF_DESCRIBE_PREFIX + draw(st.binary(max_size=300))
    if kind == "tagged value":
        return cbor2.dumps(cbor2.CBORTag(protocol.SELF_DESCRIBE_TAG, draw(cbor_values)))
    buf = cbor2.dumps(cbor2.CBORTag(protocol.SELF_DESCRIBE_TAG, draw(mutated_map())))
    if kind == "untagged":
        return buf[3:]
    if kind == "truncated":
        return buf[: draw(st.integers(0, max(len(buf) - 1, 0)))]
    return buf


def check_decode_header(buf):
    try:
        h = protocol.decode_header(buf)
    except MalformedMessage as exc:
        assert str(exc)  # names what was wrong
        return
    assert isinstance(h, (protocol.SeriesHeader, protocol.ImageHeader, protocol.EndHeader))
    if isinstance(h, protocol.SeriesHeader):
        assert 0 < h.shape[0] <= 1 << 16 and 0 < h.shape[1] <= 1 << 20 and h.dtype in protocol.DTYPES.values()
    if isinstance(h, protocol.ImageHeader):
        assert h.image_id >= 0 and all(b.size >= 0 and b.encoding in protocol.ENCODINGS for b in h.blobs)


test_decode_header = FAST(given(header_bytes())(check_decode_header))
test_decode_header_long = pytest.mark.slow(LONG(given(header_bytes())(check_decode_header)))


# the receiver, end to end over a socket --------------------------------------------------------------------
@st.composite
def message(draw):
    """One multipart message: a header (good, mutated or garbage) and 0-3 further parts."""
    kind = draw(st.sampled_from(["garbage", "start", "image", "image", "end"]))
    s = draw(st.sampled_from([SERIES, SERIES2]))
    if kind == "start":
        parts = [protocol.encode_start(s)]
    elif kind == "end":
        parts = [protocol.encode_end(s)]
    elif kind == "image":
        enc = draw(st.sampled_from(["raw", "lz4"]))
        blobs = []
        for _ in s.channels:
            px = draw(st.binary(min_size=s.frame_nbytes, max_size=s.frame_nbytes))
            blob = px if enc == "raw" else lz4.block.compress(px, store_size=False)
            if draw(st.booleans()):  # damage it
                blob = draw(st.sampled_from([blob[:-1], blob + b"\0", b"", blob[::-1], draw(st.binary(max_size=64))]))
            blobs.append(blob)
        sizes = [(enc, len(b)) for b in blobs]
        if draw(st.booleans()):
            sizes = [(enc, draw(st.integers(0, 200))) for _ in sizes]
        parts = [protocol.encode_image_header(s, draw(st.integers(0, 5)), sizes), *blobs]
        if draw(st.integers(0, 3)) == 0:
            parts = parts[: draw(st.integers(1, len(parts)))]
    else:
        parts = [draw(header_bytes())]
    if kind == "garbage" or draw(st.integers(0, 4)) == 0:  # parts nobody announced
        parts += draw(st.lists(st.binary(max_size=64), max_size=2))
    return parts


def too_big(part0: bytes) -> bool:
    try:
        h = protocol.decode_header(part0)
    except MalformedMessage:
        return False
    return isinstance(h, protocol.SeriesHeader) and RING * h.max_blob_nbytes * len(h.channels) > MAX_RING_BYTES


@pytest.fixture(scope="module")
def link():
    with pushed(FrameReceiver("tcp://127.0.0.1:0", bind=True, ring=RING)) as (tx, rx):
        time.sleep(0.05)
        yield tx, rx


def good_series(tx, rng):
    """Send a good series (start, one frame, end) and return the frame sent."""
    s = protocol.new_series(9, ["haadf"], (5, 7), np.uint16)
    frame = rng.integers(0, 65535, (5, 7), dtype=np.uint16)
    tx.send(protocol.encode_start(s))
    tx.send_multipart([protocol.encode_image_header(s, 0, [("raw", frame.nbytes)]), frame])
    tx.send(protocol.encode_end(s))
    return frame


def expect_good_series(rx, frame):
    assert isinstance(rx.recv(3000), SeriesStart)
    ev = rx.recv(3000)
    assert isinstance(ev, ImageEvent) and ev.data["haadf"].tobytes() == frame.tobytes()
    assert isinstance(rx.recv(3000), SeriesEnd)


def check_receiver(link, messages):
    tx, rx = link
    messages = [m for m in messages if not too_big(m[0])]
    c = rx.counters
    before_msgs, before_rejected = c.messages, c.rejected
    raised = 0
    for parts in messages:
        tx.send_multipart(parts)
        try:
            ev = rx.recv(3000)
        except ProtocolError as exc:
            raised += 1
            assert c.last_error.endswith(str(exc))
            continue
        assert ev is not None, "a message was lost"
    assert c.messages - before_msgs == len(messages)
    assert c.rejected - before_rejected >= raised
    # nothing else was lost: a good series right after arrives intact
    expect_good_series(rx, good_series(tx, np.random.default_rng(len(messages))))


_messages = st.lists(message(), min_size=1, max_size=8)
test_receiver_end_to_end = FAST(given(messages=_messages)(check_receiver))
test_receiver_end_to_end_long = pytest.mark.slow(LONG(given(messages=_messages)(check_receiver)))


def test_fuzzed_receiver_counts_add_up(link):
    """After the fuzz runs above, the counters still describe a consistent stream."""
    tx, rx = link
    c = rx.counters
    assert c.messages >= c.frames + c.series_started + c.series_ended
    assert c.rejected == c.malformed + c.truncated + c.oversized + c.unexpected + c.mismatch


@pytest.mark.parametrize("cols, rows", [(1 << 20, 1 << 16), (8192, 8192)], ids=["2TiB-frames", "2GiB-ring"])
def test_huge_frame_announcement_is_a_protocol_error(cols, rows):
    """A 201-byte start message announcing huge uint32 frames once made the receiver allocate them (MemoryError,
    uncounted, ending the service); now the ring bound rejects it as oversized, and the next series arrives."""
    msg = _as_map(protocol.encode_start(SERIES))
    msg.update(image_size_x=cols, image_size_y=rows, image_dtype="uint32")
    with pushed(FrameReceiver("tcp://127.0.0.1:0", bind=True)) as (tx, rx):
        tx.send(cbor2.dumps(cbor2.CBORTag(protocol.SELF_DESCRIBE_TAG, msg)))
        tx.send(protocol.encode_start(SERIES))
        with pytest.raises(OversizedMessage, match="max_ring_bytes"):
            rx.recv(3000)
        assert rx.counters.oversized == 1 and rx.counters.rejected == 1 and rx.series is None
        ev = rx.recv(3000)
        assert ev.series == SERIES and rx.counters.series_started == 1


def test_ring_bound_is_exact():
    """A series needing exactly ``max_ring_bytes`` is accepted, one byte less of bound rejects it."""
    need = 4 * SERIES.frame_nbytes * len(SERIES.channels) + SERIES.max_blob_nbytes
    for bound, ok in ((need, True), (need - 1, False)):
        with pushed(FrameReceiver("tcp://127.0.0.1:0", bind=True, ring=4, max_ring_bytes=bound)) as (tx, rx):
            tx.send(protocol.encode_start(SERIES))
            if ok:
                assert rx.recv(3000).series == SERIES
            else:
                with pytest.raises(OversizedMessage):
                    rx.recv(3000)


# the service keeps running -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def service():
    from beamloop.edge.path import frame_path
    from beamloop.edge.service import EdgeService

    with pushed(FrameReceiver("tcp://127.0.0.1:0", bind=True, ring=RING)) as (tx, rx):
        time.sleep(0.05)
        yield tx, EdgeService(rx, frame_path("classical", "generic"))


@settings(FAST, max_examples=40)
@given(messages=st.lists(message(), min_size=1, max_size=6))
def test_service_goes_on_after_bad_messages(service, messages):
    from beamloop.edge.sim.frames import mos2_frame

    tx, svc = service
    for parts in messages:
        if not too_big(parts[0]):
            tx.send_multipart(parts)
    image = mos2_frame(shape=(48, 48), seed=2).counts.astype(np.uint16)
    s = protocol.new_series(1, ["haadf"], image.shape, np.uint16, user_data={"kind": "frame", "pixel_size_A": 0.15})
    tx.send(protocol.encode_start(s))
    tx.send_multipart([protocol.encode_image_header(s, 0, [("raw", image.nbytes)]), image])
    rejected = svc.receiver.counters.rejected
    for _ in range(len(messages) + 1):  # fuzzed frames of other series may come first (processed or rejected)
        got = svc.next_frame(5000)
        assert got is not None, "the good frame did not come through"
        if got[0].series.series_unique_id == s.series_unique_id:
            break
    ev, result, _ = got
    assert ev.series.series_unique_id == s.series_unique_id and ev.data["haadf"].tobytes() == image.tobytes()
    assert len(result.columns) > 0
    assert svc.stats.protocol_errors <= svc.receiver.counters.rejected
    assert svc.receiver.counters.rejected >= rejected
