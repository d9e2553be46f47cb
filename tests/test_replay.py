"""`beamloop replay`: recorded frames streamed to a receiving service, bit-exact."""

import threading

import numpy as np

from beamloop.edge.io.replay import replay
from beamloop.streams.native.receiver import FrameReceiver, ImageEvent, SeriesEnd, SeriesStart


def test_replay_folder_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 4000, (32, 48)).astype(np.uint16) for _ in range(3)]
    for k, f in enumerate(frames):
        np.save(tmp_path / f"f{k}.npy", f)
    with FrameReceiver("tcp://127.0.0.1:0", bind=True) as rx:
        th = threading.Thread(target=replay, args=(tmp_path, rx.endpoint, 200.0), kwargs={"pixel_size_A": 0.2})
        th.start()
        start = rx.recv(5000)
        assert isinstance(start, SeriesStart)
        assert start.series.user_data["pixel_size_A"] == 0.2 and start.series.number_of_images == 3
        got = [rx.recv(5000) for _ in range(3)]
        assert all(isinstance(g, ImageEvent) for g in got)
        for g, f in zip(got, frames):
            assert np.array_equal(g.data["haadf"], f)
        assert isinstance(rx.recv(5000), SeriesEnd)
        th.join()


def test_replay_float_stack_as_float32(tmp_path):
    stack = np.random.default_rng(1).random((2, 16, 16))
    np.save(tmp_path / "stack.npy", stack)
    with FrameReceiver("tcp://127.0.0.1:0", bind=True) as rx:
        th = threading.Thread(target=replay, args=(tmp_path / "stack.npy", rx.endpoint, 0.0),
                              kwargs={"encoding": "lz4"})
        th.start()
        assert rx.recv(5000).series.dtype == np.float32
        for k in range(2):
            assert np.array_equal(rx.recv(5000).data["haadf"], stack[k].astype(np.float32))
        th.join()
