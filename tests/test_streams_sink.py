"""The RingSink contract between DECTRIS protocol adapters and the receiver, and the protocol registry.

Each adapter is driven against a fake sink that records every call and has no other attribute (``__slots__``):
an adapter that reached for anything but the RingSink interface would fail here. The receiver is checked to
implement the whole interface, and a toy protocol registered with ``register_protocol`` is received end to end.
"""

import contextlib
import datetime as dt
import inspect
import itertools
import time

import numpy as np
import pytest
import zmq
from detector_events import collect

from beamloop.streams.counters import StreamCounters
from beamloop.streams.dectris import PROTOCOLS, codecs, register_protocol, simplon, stream_v2, zmqfast
from beamloop.streams.dectris.receiver import DetectorReceiver
from beamloop.streams.dectris.series import DetectorSeries, FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.dectris.sink import FreeSlots, RingSink
from beamloop.streams.errors import FrameMismatch, ProtocolError, UnexpectedMessage

SHAPE = (6, 5)
_ports = itertools.count()


class FakeSink:
    """A RingSink that records its calls and keeps every committed image (id, times, channel -> blob)."""

    __slots__ = ("counters", "calls", "images", "_series", "_slots", "_nbytes", "_codecs", "_free")

    def __init__(self):
        self.counters = StreamCounters()
        self.calls = []
        self.images = []
        self._series = None
        self._slots = {}
        self._nbytes = {}
        self._codecs = {}
        self._free = None

    @property
    def series(self):
        return self._series

    @property
    def slot_nbytes(self):
        return 0 if self._series is None else 2 * self._series.frame_nbytes + 64

    def begin_series(self, series):
        self.calls.append(("begin_series", series.series_id))
        self._series = series
        self._slots = {ch: bytearray(self.slot_nbytes) for ch in series.channels}
        return SeriesStart(series, 0)

    def end_series(self, series_id):
        self.calls.append(("end_series", series_id))
        if self._series is None or series_id != self._series.series_id:
            raise UnexpectedMessage(f"end of series {series_id} that is not open")
        series, self._series = self._series, None
        return SeriesEnd(series, len(self.images), 0, 0)

    def check_image(self, image_id, series_id):
        self.calls.append(("check_image", image_id, series_id))
        if self._series is None or series_id != self._series.series_id:
            raise UnexpectedMessage(f"image {image_id}: no such open series")
        return self._series

    def set_codec(self, channel, codec, what):
        self.calls.append(("set_codec", channel, codec.algorithm))
        self._codecs[channel] = codec

    def slot_view(self, channel):
        self.calls.append(("slot_view", channel))
        return memoryview(self._slots[channel])

    def set_blob_nbytes(self, channel, nbytes):
        self.calls.append(("set_blob_nbytes", channel))
        self._nbytes[channel] = nbytes

    def commit_image(self, image_id, start_ns, stop_ns, real_ns):
        self.calls.append(("commit_image", image_id))
        self.images.append((image_id, (start_ns, stop_ns, real_ns),
                            {ch: bytes(self._slots[ch][:n]) for ch, n in self._nbytes.items()}))

    def free_slots(self, channel):
        self.calls.append(("free_slots", channel))
        room, cap = 8, self.slot_nbytes
        self._free = FreeSlots(np.zeros(room * cap, np.uint8), cap, 0, room, np.zeros(room, np.int64),
                               np.zeros(room, np.int64), np.zeros((room, 3), np.int64),
                               len(self.images), self._series.series_id)
        return self._free

    def commit_run(self, n):
        self.calls.append(("commit_run", n))
        f = self._free
        for k in range(n):
            o = (f.first_slot + k) * f.capacity
            self.images.append((int(f.image_ids[k]), tuple(int(v) for v in f.times[k]),
                                {simplon.CHANNEL: f.arena[o:o + f.lengths[k]].tobytes()}))


@contextlib.contextmanager
def adapter_link(adapter_cls, **kw):
    """``adapter_cls`` reading an inproc PULL socket into a FakeSink; yields (push socket, adapter, sink)."""
    ctx = zmq.Context.instance()
    ep = f"inproc://sink-contract-{next(_ports)}"
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        pull.bind(ep)
        push.connect(ep)
        sink = FakeSink()
        yield push, adapter_cls(pull, sink, max_header_bytes=1 << 16, **kw), sink
    finally:
        push.close(linger=0)
        pull.close(linger=0)


def read_all(adapter):
    """Every event the adapter reads until nothing waits; protocol errors are returned alongside."""
    events, errors = [], []
    while True:
        try:
            events.append(adapter.read(zmq.NOBLOCK))
        except zmq.Again:
            return events, errors
        except ProtocolError as exc:
            adapter.discard_rest()
            errors.append(exc)


def frames_of(n, seed=0):
    return np.random.default_rng(seed).poisson(3.0, (n, *SHAPE)).astype(np.uint16)


def test_simplon_adapter_writes_only_through_the_sink():
    frames = frames_of(3)
    msgs = list(simplon.series_messages(frames, series=5, count_time=1e-3))
    with adapter_link(simplon.SimplonAdapter, verify_hash=True) as (tx, adapter, sink):
        for m in msgs:
            tx.send_multipart(m)
        time.sleep(0.05)
        events, errors = read_all(adapter)
    assert not errors
    assert [type(e).__name__ for e in events] == ["SeriesStart", "NoneType", "NoneType", "NoneType", "SeriesEnd"]

    def image(i, first=False):  # after the first image the dimage_d text is the same: its codec stays set
        return [("check_image", i, 5), *([("set_codec", "data", "bslz4")] if first else []), ("slot_view", "data"),
                ("set_blob_nbytes", "data"), ("commit_image", i)]

    assert sink.calls == [("begin_series", 5), *image(0, first=True), *image(1), *image(2), ("end_series", 5)]
    codec = codecs.parse_simplon_encoding("bs16-lz4<", np.uint16)
    for i, (iid, times, blobs) in enumerate(sink.images):
        assert iid == i and times == (i * 1_000_000, (i + 1) * 1_000_000, 1_000_000)
        assert blobs["data"] == codecs.encode(frames[i], codec)
    assert sink.counters.bytes == sum(len(memoryview(p).cast("B")) for m in msgs for p in m)


def test_simplon_adapter_commits_nothing_of_a_rejected_image():
    frames = frames_of(2)
    msgs = list(simplon.series_messages(frames, series=1))
    bad = list(msgs[1])
    bad[1] = bad[1].replace(b'"shape":[5,6]', b'"shape":[5,7]')
    with adapter_link(simplon.SimplonAdapter, verify_hash=True) as (tx, adapter, sink):
        for m in [msgs[0], bad, msgs[1], msgs[2]]:
            tx.send_multipart(m)
        time.sleep(0.05)
        _, errors = read_all(adapter)
    assert [type(e) for e in errors] == [FrameMismatch]
    assert [c for c in sink.calls if c[0] == "commit_image"] == [("commit_image", 0), ("commit_image", 1)]


@pytest.mark.skipif(not zmqfast.available(), reason="libzmq not found: no compiled receive loop")
def test_simplon_compiled_loop_writes_through_free_slots_and_commit_run():
    frames = frames_of(6)
    msgs = list(simplon.series_messages(frames, series=3))
    with adapter_link(simplon.SimplonAdapter, verify_hash=False) as (tx, adapter, sink):
        for m in msgs[:2]:  # start and image 0: the Python path learns the templates
            tx.send_multipart(m)
        time.sleep(0.05)
        read_all(adapter)
        for m in msgs[2:-1]:
            tx.send_multipart(m)
        time.sleep(0.05)
        assert adapter.fast_read() == zmqfast.EMPTY
    assert sink.calls[-2:] == [("free_slots", "data"), ("commit_run", 5)]
    codec = codecs.parse_simplon_encoding("bs16-lz4<", np.uint16)
    assert [i for i, _, _ in sink.images] == [0, 1, 2, 3, 4, 5]
    assert all(b["data"] == codecs.encode(frames[i], codec) for i, _, b in sink.images)
    assert sink.counters.messages == 5


def test_stream2_adapter_writes_only_through_the_sink():
    s = DetectorSeries("stream2", 4, "uid-4", ("a", "b"), SHAPE, np.dtype("<u2"), 2)
    fa, fb = frames_of(2, 1), frames_of(2, 2)
    date = dt.datetime.now(dt.UTC)
    codec = codecs.Codec(codecs.BSLZ4, 2)

    def image(i):
        arrays = {ch: stream_v2.image_array(codecs.encode(f[i], codec), SHAPE, "<u2", "bslz4")
                  for ch, f in (("a", fa), ("b", fb))}
        return stream_v2.encode_image(s, i, arrays, series_date=date, times_ns=(i, i + 1, 1))

    with adapter_link(stream_v2.Stream2Adapter, verify_hash=False) as (tx, adapter, sink):
        for m in (stream_v2.encode_start(s), image(0), image(1), stream_v2.encode_end(s)):
            tx.send(m)
        time.sleep(0.05)
        events, errors = read_all(adapter)
    assert not errors and isinstance(events[0], SeriesStart) and isinstance(events[-1], SeriesEnd)
    per_image = lambda i: [("check_image", i, 4),  # noqa: E731
                           *[c for ch in "ab" for c in (("set_codec", ch, "bslz4"), ("slot_view", ch),
                                                       ("set_blob_nbytes", ch))],
                           ("commit_image", i)]
    assert sink.calls == [("begin_series", 4), *per_image(0), *per_image(1), ("end_series", 4)]
    for i, (iid, times, blobs) in enumerate(sink.images):
        assert iid == i and times == (i, i + 1, 1)
        assert blobs == {"a": codecs.encode(fa[i], codec), "b": codecs.encode(fb[i], codec)}


def _members(proto) -> dict:
    names = [n for n in vars(proto) if not n.startswith("_")] + list(proto.__annotations__)
    return {n: getattr(proto, n, None) for n in names}


def test_detector_receiver_implements_the_whole_ring_sink():
    members = _members(RingSink)
    assert set(members) >= {"counters", "series", "slot_nbytes", "begin_series", "end_series", "check_image",
                            "set_codec", "slot_view", "set_blob_nbytes", "commit_image", "free_slots", "commit_run"}
    for name, proto_member in members.items():
        impl = getattr(DetectorReceiver, name, None)
        if name == "counters":
            continue  # an instance attribute
        assert impl is not None, f"DetectorReceiver lacks RingSink.{name}"
        if callable(proto_member):
            assert list(inspect.signature(impl).parameters) == list(inspect.signature(proto_member).parameters), name
    with DetectorReceiver("inproc://sink-members", bind=True) as rx:
        assert isinstance(rx.counters, StreamCounters) and rx.series is None and rx.slot_nbytes == 0


# the registry ---------------------------------------------------------------------------------------------
class ToyAdapter:
    """A made-up protocol: b"start", then one message per 2x2 uint8 image (id byte + 4 pixel bytes), b"end"."""

    SERIES = DetectorSeries("toy", 0, "toy-0", ("data",), (2, 2), np.dtype("u1"), 3)

    def __init__(self, socket, sink, *, max_header_bytes, verify_hash):
        self.sock, self.sink = socket, sink

    def read(self, flags=0):
        msg = self.sock.recv(flags)
        self.sink.counters.bytes += len(msg)
        if msg == b"start":
            return self.sink.begin_series(self.SERIES)
        if msg == b"end":
            return self.sink.end_series(0)
        self.sink.check_image(msg[0], 0)
        self.sink.set_codec("data", codecs.Codec(codecs.NONE, 1), f"image {msg[0]}: encoding")
        self.sink.slot_view("data")[:4] = msg[1:5]
        self.sink.set_blob_nbytes("data", 4)
        self.sink.commit_image(msg[0], 0, 0, 0)
        return None

    def discard_rest(self):
        while self.sock.get(zmq.RCVMORE):
            self.sock.recv()


@pytest.fixture
def toy_protocol():
    register_protocol("toy", ToyAdapter)
    yield "toy"
    PROTOCOLS.pop("toy")


def test_a_registered_protocol_is_received_end_to_end(toy_protocol):
    with DetectorReceiver("tcp://127.0.0.1:0", protocol=toy_protocol, bind=True) as rx:
        tx = zmq.Context.instance().socket(zmq.PUSH)
        try:
            tx.connect(rx.endpoint)
            for m in (b"start", b"\x00abcd", b"\x01efgh", b"\x02ijkl", b"end"):
                tx.send(m)
            events, errors = collect(rx)
        finally:
            tx.close(linger=0)
    assert not errors and [type(e) for e in events] == [SeriesStart, FrameStack, SeriesEnd]
    assert events[1].frames.tobytes() == b"abcdefghijkl" and events[-1].missing == 0


def test_registry_refuses_a_second_adapter_of_one_name_and_unknown_names():
    with pytest.raises(ValueError, match="registered already"):
        register_protocol("simplon1", ToyAdapter)
    with pytest.raises(ValueError, match="unknown protocol 'nope'.*simplon1.*stream2"):
        DetectorReceiver("inproc://nope", protocol="nope")
    assert PROTOCOLS == {"simplon1": simplon.SimplonAdapter, "stream2": stream_v2.Stream2Adapter}
