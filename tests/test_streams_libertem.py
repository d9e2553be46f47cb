"""Interoperability with an independent implementation of SIMPLON stream v1: LiberTEM's libertem-dectris.

Both ways, bit-exact: beamloop's sender received by LiberTEM's Rust receiver, and LiberTEM's simulator
(DectrisSim, replaying a dump file) received by beamloop's receiver.
"""

import multiprocessing as mp
import threading
import time

import numpy as np
import pytest

from beamloop.streams.dectris.receiver import DetectorReceiver
from beamloop.streams.dectris.series import FrameStack, SeriesEnd, SeriesStart
from beamloop.streams.dectris.simplon import SimplonSender, series_messages, write_dump

ld = pytest.importorskip("libertem_dectris", reason="libertem-dectris not installed (pip install '.[detector]')")


def run_dectrissim(dump: str, q, go) -> None:
    """Child process: replay ``dump`` with LiberTEM's DectrisSim on a free port (reported through ``q``)."""
    import libertem_dectris

    sim = libertem_dectris.DectrisSim("tcp://127.0.0.1", dump, None, True)
    q.put(sim.get_uri())
    go.wait(30)
    sim.send_headers()
    sim.send_frames()
    sim.send_footer()
    time.sleep(0.5)


def diffraction_frames(n, shape, dtype=np.uint16, seed=0):
    """Realistic-looking frames: a bright disk and a Poisson tail (so bitshuffle-LZ4 has work to do)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    r = np.hypot(yy - shape[0] / 2, xx - shape[1] / 2)
    lam = np.where(r < shape[0] / 6, 40.0, 2.0 / (1 + (r / 10) ** 2))
    return rng.poisson(lam, (n, *shape)).astype(dtype)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("encoding,dtype", [("bslz4", np.uint16), pytest.param("bslz4", np.uint32, marks=SLOW),
                                            pytest.param("lz4<", np.uint16, marks=SLOW),
                                            pytest.param("bslz4", np.uint8, marks=SLOW)])
def test_libertem_receives_beamloop_sender_bit_exact(tmp_path, encoding, dtype):
    shape, n = (64, 64), 150
    frames = diffraction_frames(n, shape, dtype)
    tx = SimplonSender("tcp://127.0.0.1:0", encoding=encoding)
    conn = ld.DectrisConnection(uri=tx.endpoint, frame_stack_size=32, handle_path=str(tmp_path / "shm.sock"),
                                num_slots=1000, bytes_per_frame=frames[0].nbytes, huge=False)
    cam = ld.CamClient(conn.get_socket_path())
    try:
        conn.start_passive(5000)

        def send():
            time.sleep(0.2)
            tx.start_series(shape, dtype, n)
            for f in frames:
                tx.send_frame(f)
            tx.end_series()

        th = threading.Thread(target=send)
        th.start()
        armed = conn.wait_for_arm(10.0)
        assert armed is not None, "LiberTEM never saw the series header"
        config, series = armed
        assert config.get_num_frames() == n and series == tx.series
        got = []
        while sum(len(g) for g in got) < n:
            stack = conn.get_next_stack(32)
            assert stack is not None, "LiberTEM's receiver stopped early"
            buf = np.zeros((len(stack), *shape), dtype)
            cam.decode_range_into_buffer(stack, buf, 0, len(stack))
            got.append(buf)
            cam.done(stack)
        th.join()
        assert np.array_equal(np.concatenate(got), frames)
    finally:
        conn.close()
        cam.close()
        tx.close(linger_ms=0)


@pytest.mark.parametrize("dtype", [np.uint16, pytest.param(np.uint32, marks=SLOW)])
def test_beamloop_receives_dectrissim_bit_exact(tmp_path, dtype):
    shape, n = (96, 96), 300
    frames = diffraction_frames(n, shape, dtype, seed=3)
    dump = tmp_path / "series.dump"
    write_dump(dump, series_messages(frames, series=42))
    # DectrisSim takes the GIL for every frame it sends: give it a process of its own
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=run_dectrissim, args=(str(dump), q, go), daemon=True)
    proc.start()
    uri = q.get(timeout=30)
    with DetectorReceiver(uri, stack_size=64) as rx:
        time.sleep(0.1)
        go.set()
        events = []
        while True:
            ev = rx.recv(10_000)
            assert ev is not None, "timed out waiting for DectrisSim"
            if isinstance(ev, FrameStack):  # stacks are views into the receiver's ring: keep copies
                ev = (ev.image_ids.copy(), ev.frames.copy())
            events.append(ev)
            if isinstance(ev, SeriesEnd):
                break
        proc.join(10)
    start = events[0]
    assert isinstance(start, SeriesStart) and start.series.series_id == 42 and start.series.number_of_images == n
    stacks = [e for e in events if isinstance(e, tuple)]
    assert np.array_equal(np.concatenate([ids for ids, _ in stacks]), np.arange(n))
    assert np.array_equal(np.concatenate([f for _, f in stacks]), frames)
    assert rx.counters.rejected == 0 and events[-1].missing == 0
