"""The Merlin (MIB over TCP) receiver: the MIB format against LiberTEM's reader, the stream against
LiberTEM-live's Merlin simulator (an independent peer), flow control, bad input, and recording."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import numpy as np
import pytest
from detector_events import collect, stacked

from beamloop.streams.dectris.series import FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.errors import FrameMismatch, MalformedMessage, ProtocolError
from beamloop.streams.merlin import mib
from beamloop.streams.merlin.receiver import MerlinReceiver, parse_endpoint

MODES = [("U08", 1), ("U08", 6), ("U16", 12), ("U32", 24), ("R64", 1), ("R64", 6), ("R64", 12), ("R64", 24)]
SHAPE = (16, 128)


def make_frames(n, depth, shape=SHAPE, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.integers(0, 1 << depth, (n, *shape), dtype=np.uint64)
    f[:, 0, 0] = (1 << depth) - 1  # the full counter range
    return f.astype(mib.RAW_DTYPES[depth])


@contextlib.contextmanager
def bound_receiver(**kw):
    """A receiver listening on a free port and a plain TCP socket connected to it (the detector's end)."""
    with MerlinReceiver("tcp://127.0.0.1:0", bind=True, **kw) as rx:
        tx = socket.create_connection(("127.0.0.1", int(rx.endpoint.rsplit(":", 1)[1])))
        try:
            yield tx, rx
        finally:
            tx.close()


# --- the format ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ptype,depth", MODES)
def test_pixels_round_trip_in_every_mode(ptype, depth):
    frames = make_frames(5, depth)
    msgs = mib.frame_messages(frames, ptype, depth)
    hdr = mib.parse_frame_header(msgs[0][mib.PREFIX_BYTES:])
    assert (hdr.height, hdr.width, hdr.pixel_type, hdr.counter_depth, hdr.sequence) == (*SHAPE, ptype, depth, 1)
    assert mib.parse_prefix(msgs[0][:15]) == len(msgs[0]) - 15 == hdr.header_nbytes + hdr.data_nbytes
    data = np.frombuffer(b"".join(m[15 + hdr.header_nbytes:] for m in msgs), np.uint8)
    out = np.zeros((5, *SHAPE), hdr.dtype)
    mib.decode_frames(data, 5, hdr, out)
    assert out.dtype == mib.RAW_DTYPES[depth] and np.array_equal(out, frames)


def test_a_header_as_merlin_writes_it_parses():
    # the field layout of Merlin's frame headers (counting mode, one chip, with the MQ1A extension)
    text = ("MQ1,000042,00384,01,0256,0256,U16,   1x1,01,2024-05-18 16:51:49.971626,0.000555,1,0,0,"
            "1.200000E+2,5.110000E+2," + ",".join(["0.000000E+0"] * 6) + ",3RX," + ",".join(["100"] * 27)
            + ",MQ1A,2024-05-18T14:51:49.971626178Z,555000ns,12,")
    hdr = mib.parse_frame_header(text.encode() + b"\x00" * (384 - len(text)))
    assert (hdr.sequence, hdr.header_nbytes, hdr.chips, hdr.width, hdr.height) == (42, 384, 1, 256, 256)
    assert (hdr.pixel_type, hdr.layout, hdr.counter, hdr.counter_depth, hdr.shutter_ns) == ("U16", "1x1", 1, 12, 555000)
    raw = "MQ1,000001,00384,01,0256,0256,R64,   1x1,01,2020-05-25 17:48:56.475280,0.001000,0,0,0,,MQ1A,x,1000000ns,6,"
    hdr = mib.parse_frame_header(raw.encode().ljust(384, b"\x00"))
    assert hdr.raw and hdr.counter_depth == 6 and hdr.data_nbytes == 256 * 256 and hdr.dtype == np.uint8
    acq = mib.parse_acquisition_header(mib.acquisition_header(1024, counter_depth=12, scan=(32, 32)))
    assert acq["Frames in Acquisition (Number)"] == "1024" and acq["ScanX"] == "32"


@pytest.mark.parametrize("bad,what", [
    (b"MQ2,000001,00384", "not 'MQ1,'"),
    (b"MQ1,000001,00384,01,0256,0256,U24,   1x1,01,t,0.1,0,0,0,MQ1A,t,1ns,12,", "pixel type"),
    (b"MQ1,000001,00384,01,0256,0256,U16,   3x3,01,t,0.1,0,0,0,MQ1A,t,1ns,12,", "sensor layout"),
    (b"MQ1,000001,00384,01,0256,0256,U16,   1x1,01,t,0.1,0,0,0,MQ1A,t,1ns,7,", "counter depth"),
    (b"MQ1,000001,00384,01,0256,0256,U08,   1x1,01,t,0.1,0,0,0,MQ1A,t,1ns,12,", "do not fit"),
    (b"MQ1,000001,00768,04,1024,0256,R64,   Nx1,0F,t,0.1,0,0,0,MQ1A,t,1ns,12,", "4 chips"),
    (b"MQ1,000001,00768,04,0512,0512,R64,   2x2,0F,t,0.1,0,0,0,MQ1A,t,1ns,12,", "expected 1024x256"),
    (b"MQ1,000001,00768,04,1024,0256,R64,  2x2G,0F,t,0.1,0,0,0,MQ1A,t,1ns,24,", "at 1, 6 or 12 bits"),
    (b"MQ1,000001,00384,01,0200,0256,R64,   1x1,01,t,0.1,0,0,0,MQ1A,t,1ns,12,", "multiple of 64"),
    (b"MQ1,00000x,00384,01,0256,0256,U16,   1x1,01,t,0.1,0,0,0,MQ1A,t,1ns,12,", "sequence number"),
    (b"MQ1,000001,99999,01", "declares 99999 bytes"),
])
def test_bad_frame_headers_get_one_line_errors(bad, what):
    with pytest.raises(MalformedMessage, match=what) as exc:
        mib.parse_frame_header(bad.ljust(768, b"\x00") if b"99999" not in bad else bad)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("depth", [1, 6, 12])
def test_quad_raw_frames_are_reassembled_from_the_four_chips(depth):
    frames = make_frames(3, depth, shape=(512, 512), seed=depth)
    msgs = mib.frame_messages(frames, "R64", depth, quad=True)
    hdr = mib.parse_frame_header(msgs[0][mib.PREFIX_BYTES:])
    assert hdr.quad and (hdr.chips, hdr.layout, hdr.height, hdr.width, hdr.header_nbytes) == (4, "2x2", 512, 512, 768)
    out = np.zeros((3, 512, 512), hdr.dtype)
    mib.decode_frames(np.frombuffer(b"".join(m[15 + 768:] for m in msgs), np.uint8), 3, hdr, out)
    assert np.array_equal(out, frames)
    wide = mib.quad_to_raw_rows(frames)  # chip 1 is the last quarter of every raw row; chip 4 comes first, flipped
    assert np.array_equal(wide[:, :, 768:], frames[:, :256, :256])
    assert np.array_equal(wide[:, :, :256], frames[:, :255:-1, :255:-1])


def test_endpoints():
    assert parse_endpoint("tcp://10.0.0.2:6342") == ("10.0.0.2", 6342)
    assert parse_endpoint("tcp://*:0") == ("0.0.0.0", 0)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        parse_endpoint("tcp://host")


@pytest.mark.parametrize("ptype,depth,quad", [("U08", 6, False), ("U16", 12, False), ("U32", 24, False),
                                              ("R64", 6, False), ("R64", 12, False), ("R64", 6, True),
                                              ("R64", 12, True)])
def test_files_are_read_alike_by_libertem(tmp_path, ptype, depth, quad):
    """Our MIB writer against LiberTEM's MIB reader (an independent implementation of the format, the Quad's
    chip reassembly included)."""
    pytest.importorskip("libertem")
    from libertem.api import Context
    from libertem.executor.inline import InlineJobExecutor
    from libertem.udf.sum import SumUDF

    shape = (512, 512) if quad else (64, 128)
    frames = make_frames(6, depth, shape=shape)
    hdr_path, _ = mib.write_mib(tmp_path / "scan", frames, ptype, depth, scan=(2, 3), quad=quad)
    ctx = Context(executor=InlineJobExecutor())
    ds = ctx.load("mib", path=str(hdr_path))
    assert tuple(ds.shape) == (2, 3, *shape)
    for k in (0, 4):  # two frames picked by LiberTEM, one by one
        roi = np.zeros((2, 3), bool)
        roi.flat[k] = True
        got = ctx.run_udf(ds, SumUDF(), roi=roi)["intensity"].data
        assert np.array_equal(got, frames[k]), k


# --- the stream against LiberTEM-live's Merlin simulator ---------------------------------------------------------


@contextlib.contextmanager
def libertem_sim(hdr_path):
    """LiberTEM-live's Merlin simulator serving ``hdr_path``'s acquisition on free ports of 127.0.0.1."""
    sim_mod = pytest.importorskip("libertem_live.detectors.merlin.sim")
    sim = sim_mod.CameraSim(str(hdr_path), nav_shape=(0, 0), host="127.0.0.1", data_port=0, control_port=0,
                            trigger_port=0)
    sim.start()
    try:
        sim.wait_for_listen()
        yield f"tcp://127.0.0.1:{sim.server_t.port}"
    finally:
        sim.stop()


def receive_series(rx, timeout_ms=120_000):
    """The first series' frames from ``rx``: (series, ids, frames, end)."""
    start = end = None
    stacks = []
    while end is None:
        ev = rx.recv(timeout_ms)
        assert ev is not None, rx.counters.as_dict()
        if isinstance(ev, SeriesStart):
            start = ev
        elif isinstance(ev, FrameStack):
            stacks.append((ev.image_ids.copy(), ev.frames.copy()))
        elif isinstance(ev, SeriesEnd):
            end = ev
    return start.series, np.concatenate([s[0] for s in stacks]), np.concatenate([s[1] for s in stacks]), end


def interop(tmp_path, ptype, depth, n=24, shape=(32, 128), quad=False):
    frames = make_frames(n, depth, shape=shape, seed=depth)
    hdr_path, _ = mib.write_mib(tmp_path / f"scan_{ptype}_{depth}", frames, ptype, depth, scan=(4, n // 4),
                                quad=quad)
    with libertem_sim(hdr_path) as endpoint, MerlinReceiver(endpoint, stack_size=7) as rx:
        series, ids, got, end = receive_series(rx)
        counters = rx.counters.as_dict()
    assert series.protocol == "merlin" and series.shape == shape and series.number_of_images == n
    assert series.channels == ("counter_0",) and series.config["ScanX"] == str(n // 4)
    assert np.array_equal(ids, np.arange(n)) and got.dtype == frames.dtype and np.array_equal(got, frames)
    assert end.frames == n and end.missing == 0
    assert counters["rejected"] == 0 and counters["frames"] == n and counters["series_ended"] == 1


def test_libertem_live_simulator_12_bit_counting(tmp_path):
    interop(tmp_path, "U16", 12)


@pytest.mark.slow
@pytest.mark.parametrize("ptype,depth", MODES)
def test_libertem_live_simulator_every_mode(tmp_path, ptype, depth):
    interop(tmp_path, ptype, depth)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 6, 12])
def test_libertem_live_simulator_quad_raw(tmp_path, depth):
    interop(tmp_path, "R64", depth, n=8, shape=(512, 512), quad=True)


# --- flow control, series, bad input -----------------------------------------------------------------------------


def test_two_acquisitions_then_a_closed_connection(tmp_path):
    a, b = make_frames(10, 12, seed=1), make_frames(5, 6, shape=(8, 64), seed=2)
    with bound_receiver(stack_size=4) as (tx, rx):
        tx.sendall(mib.acquisition_stream(a, "U16", 12) + mib.acquisition_stream(b, "R64", 6))
        s1, ids1, got1, end1 = receive_series(rx, 5000)
        s2, ids2, got2, end2 = receive_series(rx, 5000)
        c = mib.acquisition_stream(make_frames(6, 12, seed=3), "U16", 12)
        tx.sendall(c[:len(c) - 1000])  # the last frame cut short by the detector going away
        tx.close()
        events, errors = collect(rx, timeout_ms=5000)
    assert np.array_equal(got1, a) and np.array_equal(got2, b) and s2.dtype == np.uint8 and s2.shape == (8, 64)
    assert (s1.series_id, s2.series_id) == (0, 1) and end1.missing == end2.missing == 0
    ids, frames = stacked(events)
    assert ids.tolist() == list(range(5)) and isinstance(events[-1], SeriesEnd) and events[-1].missing == 1
    assert [type(e).__name__ for e in errors] == ["TruncatedMessage"] and rx.counters.truncated == 1
    assert rx.counters.series_ended == 3 and rx.counters.gaps == 1 and rx.counters.missing_frames == 1


def test_garbage_and_bad_messages_are_counted_and_the_stream_goes_on():
    frames = make_frames(8, 12)
    good = mib.frame_messages(frames, "U16", 12)
    acq = mib.acquisition_header(8, counter_depth=12)
    other = mib.frame_messages(make_frames(1, 12, shape=(8, 64)), "U16", 12, first_seq=3)[0]
    bad_size = good[2][:15 + 16].replace(b"00384", b"00380") + good[2][15 + 16:]
    stream = (mib.mpx_prefix(len(acq)) + acq + good[0] + b"GARBAGE" * 10 + good[1]
              + b"MPX,00000000x9,junk" + bad_size + other + good[2] + b"MPX,0000000009,ABCDEFGH"
              + b"".join(good[3:]))
    with bound_receiver(stack_size=16) as (tx, rx):
        tx.sendall(stream)
        events, errors = collect(rx, timeout_ms=5000)
    ids, got = stacked(events)
    assert ids.tolist() == list(range(8)) and np.array_equal(got, frames)
    kinds = sorted(type(e).__name__ for e in errors)
    assert kinds == ["FrameMismatch", "FrameMismatch", "MalformedMessage", "MalformedMessage", "MalformedMessage"]
    assert all("\n" not in str(e) for e in errors)
    c = rx.counters
    assert c.malformed == 3 and c.mismatch == 2 and c.frames == 8 and c.series_ended == 1


def test_oversized_messages_are_skipped_unread():
    frames = make_frames(3, 12)
    with bound_receiver(max_message_bytes=len(mib.frame_messages(frames, "U16", 12)[0])) as (tx, rx):
        big = mib.acquisition_stream(make_frames(2, 12, shape=(32, 128)), "U16", 12)
        tx.sendall(big + mib.acquisition_stream(frames, "U16", 12))
        events, errors = collect(rx, timeout_ms=5000)
    assert rx.counters.oversized == 2 and all(isinstance(e, ProtocolError) for e in errors)
    ids, got = stacked(events)
    assert ids.tolist() == [0, 1, 2] and np.array_equal(got, frames)


def test_a_frame_before_any_acquisition_header_is_unexpected():
    frames = make_frames(2, 12)
    with bound_receiver() as (tx, rx):
        tx.sendall(b"".join(mib.frame_messages(frames, "U16", 12)) + mib.acquisition_stream(frames, "U16", 12))
        events, errors = collect(rx, timeout_ms=5000)
    assert [type(e).__name__ for e in errors] == ["UnexpectedMessage"] * 2
    assert np.array_equal(stacked(events)[1], frames)


def test_a_series_too_large_for_the_ring_is_refused_before_allocating():
    frames = make_frames(2, 12)
    with bound_receiver(max_ring_bytes=1000) as (tx, rx):
        tx.sendall(mib.acquisition_stream(frames, "U16", 12))
        with pytest.raises(ProtocolError, match="max_ring_bytes"):
            while rx.recv(3000) is not None:
                pass
    assert rx.counters.oversized == 1 and rx.counters.frames == 0


def test_latest_mode_delivers_the_newest_frame():
    frames = make_frames(50, 12)
    with bound_receiver(mode="latest") as (tx, rx):
        tx.sendall(mib.acquisition_stream(frames, "U16", 12))
        time.sleep(0.2)  # everything has arrived before the first recv
        events, errors = collect(rx, timeout_ms=3000)
    stacks = [e for e in events if isinstance(e, FrameStack)]
    assert not errors and len(stacks[-1]) == 1 and stacks[-1].image_ids[0] == 49
    assert np.array_equal(stacks[-1].frames[0], frames[49])
    assert rx.counters.dropped == 50 - len(stacks) and rx.counters.decoded == len(stacks)


def test_frame_of_another_shape_mid_series_is_a_mismatch():
    a = make_frames(4, 12)
    msgs = mib.frame_messages(a, "U16", 12)
    wrong = mib.frame_messages(make_frames(1, 12, shape=(8, 64)), "U16", 12, first_seq=2)[0]
    acq = mib.acquisition_header(4, counter_depth=12)
    with bound_receiver() as (tx, rx):
        tx.sendall(mib.mpx_prefix(len(acq)) + acq + msgs[0] + msgs[1] + wrong + msgs[2] + msgs[3])
        events, errors = collect(rx, timeout_ms=3000)
    assert [type(e) for e in errors] == [FrameMismatch] and "began 16x128" in str(errors[0])
    assert np.array_equal(stacked(events)[1], a)


def test_connecting_receiver_reconnects_to_a_detector_that_comes_later():
    frames = make_frames(6, 24)
    stream = mib.acquisition_stream(frames, "U32", 24)
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()  # nothing listens yet: the receiver retries until the detector is up

    def detector():
        time.sleep(0.3)
        with socket.create_server(("127.0.0.1", port)) as s:
            conn, _ = s.accept()
            with conn:
                conn.sendall(stream)
                time.sleep(0.5)

    t = threading.Thread(target=detector, daemon=True)
    t.start()
    with MerlinReceiver(f"tcp://127.0.0.1:{port}") as rx:
        series, ids, got, end = receive_series(rx, 10_000)
    t.join(5)
    assert series.dtype == np.uint32 and np.array_equal(got, frames) and end.missing == 0


# --- recording -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_a_merlin_stream_recorded_bit_exact(tmp_path, fmt):
    pytest.importorskip("hdf5plugin")
    from beamloop.streams.dectris.recorder import make_recorder, read_channels, record, recording_info

    frames = make_frames(40, 12)
    with bound_receiver(stack_size=8) as (tx, rx):
        tx.sendall(mib.acquisition_stream(frames, "R64", 12, scan=(5, 8)))
        masters = record(rx, lambda s: make_recorder(fmt, tmp_path, "merlin", frames_per_file=16), idle_ms=200)
    got, ids = read_channels(masters[0])
    assert list(got) == ["counter_0"] and np.array_equal(got["counter_0"], frames)
    assert np.array_equal(ids, np.arange(40))
    info = recording_info(masters[0])
    assert info["complete"] and info["config"]["pixel_type"] == "R64" and info["config"]["ScanY"] == "5"


def test_a_stream_that_trickles_in_small_pieces_is_received_intact():
    """Headers and pixels split across many TCP segments (the receive buffer never holds a whole message)."""
    frames = make_frames(6, 12, shape=(8, 64))
    stream = mib.acquisition_stream(frames, "U16", 12)
    with bound_receiver(stack_size=4) as (tx, rx):
        tx.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def trickle():
            for k in range(0, len(stream), 97):
                tx.sendall(stream[k:k + 97])
                time.sleep(0.0005)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        series, ids, got, end = receive_series(rx, 5000)
        t.join(5)
    assert np.array_equal(got, frames) and ids.tolist() == list(range(6)) and rx.counters.rejected == 0


def test_an_unclosed_receiver_warns_and_a_closed_one_refuses_to_connect():
    rx = MerlinReceiver("tcp://127.0.0.1:0", bind=True)
    with pytest.warns(ResourceWarning, match="unclosed MerlinReceiver"):
        rx.__del__()
    assert rx.closed
    with pytest.raises(RuntimeError, match="closed"):
        rx.recv(10)
    with MerlinReceiver("tcp://127.0.0.1:0", bind=True) as a:
        port = a.endpoint.rsplit(":", 1)[1]
        with pytest.raises(OSError, match=f"cannot bind 'tcp://127.0.0.1:{port}'"):
            MerlinReceiver(f"tcp://127.0.0.1:{port}", bind=True)
