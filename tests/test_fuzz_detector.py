"""Fuzzing the DECTRIS decoders (beamloop.streams.dectris: simplon, stream_v2, receiver) with hypothesis.

Properties: ``stream_v2.loads`` and ``series_from_start`` raise nothing but :class:`MalformedMessage`; a
:class:`DetectorReceiver`, fed damaged and arbitrary messages of either protocol over a real socket, raises
nothing but :class:`ProtocolError` and afterwards receives a good series bit-exact. Default runs are
short; ``_long`` variants (``-m slow``) run 5,000 examples.
"""

import itertools
import json
import time

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

simplon = pytest.importorskip("beamloop.streams.dectris.simplon",
                              reason="the SIMPLON v1 decoder or its dependency dectris-compression is missing")
stream_v2 = pytest.importorskip("beamloop.streams.dectris.stream_v2",
                                reason="the Stream V2 decoder or its dependencies (cbor2) are not importable")
from detector_events import pushed_receiver  # noqa: E402

from beamloop.streams.dectris.series import DetectorSeries, FrameStack, SeriesEnd  # noqa: E402
from beamloop.streams.errors import MalformedMessage, ProtocolError  # noqa: E402

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=5_000, deadline=None, suppress_health_check=list(HealthCheck))
SHAPE = (8, 6)
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def simplon_series(series: int, frames: np.ndarray) -> list[list[bytes]]:
    return [[bytes(memoryview(p).cast("B")) if not isinstance(p, bytes) else p for p in m]
            for m in simplon.series_messages(frames, series=series)]


def v2_series(uid: str, frames: np.ndarray) -> list[list[bytes]]:
    s = DetectorSeries("stream2", 1, uid, ("threshold_1",), frames.shape[1:], frames.dtype, len(frames))
    date = __import__("datetime").datetime.now(__import__("datetime").timezone.utc)
    msgs = [[stream_v2.encode_start(s)]]
    for i, f in enumerate(frames):
        arr = stream_v2.image_array(f.tobytes(), f.shape, f.dtype, "none")
        msgs.append([stream_v2.encode_image(s, i, {"threshold_1": arr}, series_date=date)])
    msgs.append([stream_v2.encode_end(s)])
    return msgs


FRAMES = (np.arange(2 * 48, dtype=np.uint16).reshape(2, *SHAPE) * 131) % 1000
GOOD = {"simplon1": simplon_series(7, FRAMES), "stream2": v2_series("fuzz-series", FRAMES)}


def _mutate_json(raw: bytes, key, value) -> bytes:
    try:
        msg = json.loads(raw)
    except ValueError:
        return raw
    if isinstance(msg, dict) and msg:
        msg[key if key in msg else sorted(msg)[0]] = value
    return json.dumps(msg).encode()


def _mutate_cbor(raw: bytes, key, value) -> bytes:
    try:
        msg = dict(cbor2.loads(raw[3:]))
    except Exception:  # noqa: BLE001 - not a map: leave it
        return raw
    msg[key if key in msg else sorted(msg)[0]] = value
    return cbor2.dumps(cbor2.CBORTag(55799, msg))


@st.composite
def messages(draw, protocol):
    """A few messages: parts of the good series, damaged, reordered, or arbitrary bytes."""
    good = GOOD[protocol]
    out = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["good", "value", "bytes", "parts", "garbage"]))
        msg = list(draw(st.sampled_from(good)))
        k = draw(st.integers(0, len(msg) - 1))
        if kind == "value":
            value = draw(cbor_values)
            key = draw(st.sampled_from(["htype", "series", "frame", "shape", "type", "encoding", "size", "hash",
                                        "x_pixels_in_detector", "bit_depth_image", "nimages", "image_id", "data",
                                        "channels", "image_size_x", "image_dtype", "series_unique_id", "start_time"]))
            mutate = _mutate_json if protocol == "simplon1" else _mutate_cbor
            try:
                msg[k] = mutate(msg[k], key, value)
            except (TypeError, ValueError):  # a value JSON cannot hold
                pass
        elif kind == "bytes":
            b = bytearray(msg[k])
            for _ in range(draw(st.integers(1, 4))):
                if b:
                    i = draw(st.integers(0, len(b) - 1))
                    b[i] = draw(st.integers(0, 255))
            msg[k] = bytes(b[: draw(st.integers(0, len(b)))]) if draw(st.booleans()) else bytes(b)
        elif kind == "parts":
            msg = msg[: draw(st.integers(1, len(msg)))] + draw(st.lists(st.binary(max_size=32), max_size=2))
        elif kind == "garbage":
            msg = draw(st.lists(st.binary(max_size=80), min_size=1, max_size=4))
        out.append(msg)
    return out


def check_loads(buf):
    try:
        msg = stream_v2.loads(buf)
    except MalformedMessage:
        return
    assert isinstance(msg, dict)
    if msg.get("type") == "start":
        try:
            s = stream_v2.series_from_start(msg)
        except MalformedMessage:
            return
        assert s.shape[0] >= 1 and s.shape[1] >= 1


_v2_bytes = st.one_of(st.binary(max_size=300), messages("stream2").map(lambda ms: ms[0][0]),
                      cbor_values.map(lambda v: cbor2.dumps(cbor2.CBORTag(55799, v))))
test_stream_v2_loads = FAST(given(_v2_bytes)(check_loads))
test_stream_v2_loads_long = pytest.mark.slow(LONG(given(_v2_bytes)(check_loads)))


@pytest.fixture(scope="module", params=["simplon1", "stream2"])
def link(request):
    with pushed_receiver(request.param, stack_size=4) as (tx, rx):
        time.sleep(0.05)
        yield request.param, tx, rx


_example = itertools.count(100)


def check_receiver(link, data):
    """The link is shared by all examples, so each example's good series has its own id: whatever an earlier
    (e.g. failing) example left queued can never pass for this one's frames."""
    protocol, tx, rx = link
    for parts in data.draw(messages(protocol)):
        tx.send_multipart(parts)
    frames = (FRAMES + data.draw(st.integers(0, 500))).astype(np.uint16)
    k = next(_example)
    if protocol == "simplon1":
        good, sid, uid = simplon_series(k, frames), k, f"simplon1-{k}"
    else:
        good, sid, uid = v2_series(f"good-after-fuzz-{k}", frames), 1, f"good-after-fuzz-{k}"
    for parts in good:
        tx.send_multipart(parts)
    got = []
    for _ in range(200):
        try:
            ev = rx.recv(3000)
        except ProtocolError:
            continue
        assert ev is not None, "the good series did not arrive"
        ours = ev.series.series_id == sid and ev.series.series_unique_id == uid
        if isinstance(ev, FrameStack) and ours:
            got.extend(np.array(f) for f in ev.channels[next(iter(ev.channels))].frames)
        if isinstance(ev, SeriesEnd) and ours:
            break
    assert len(got) == len(frames) and all(np.array_equal(a, b) for a, b in zip(got, frames))


test_detector_receiver = FAST(given(data=st.data())(check_receiver))
test_detector_receiver_long = pytest.mark.slow(LONG(given(data=st.data())(check_receiver)))
