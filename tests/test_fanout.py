"""Fan-out of a detector stream over workers: the merger's rules (frame-id completeness, dead workers by
heartbeat on an injected clock) and a real stream dealt out over two workers, merged bit for bit."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest

from beamloop.edge.fanout_worker import DetectorGeometry, FourDReducer, worker_main
from beamloop.streams.dectris.series import DetectorSeries
from beamloop.streams.fanout import WIRE_VERSION, series_from_dict, series_to_dict
from beamloop.streams.merge import FanoutMerger, MergeState

SCAN = (2, 3)  # 6 probe positions per scan frame


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def head(kind: str, worker: str, **kw) -> dict:
    return {"v": WIRE_VERSION, "kind": kind, "worker": worker, **kw}


def part(state: MergeState, worker: str, ids, values, series_id: int = 1, names=("a", "b"), sums=None) -> None:
    ids = np.asarray(ids, "<i8")
    values = np.asarray(values, "<f8").reshape(len(ids), len(names))
    sums = sums or {}
    state.handle(head("part", worker, series_id=series_id, n=len(ids), names=list(names),
                      sums={k: list(v.shape) for k, v in sums.items()}),
                 [ids.tobytes(), values.tobytes(), *(np.asarray(v, "<f8").tobytes() for v in sums.values())])


def beat(state: MergeState, worker: str, watermark: int, idle: bool = False, series_id: int = 1) -> None:
    state.handle(head("beat", worker, t=0.0, watermark=watermark, frames=0, idle=idle, series_id=series_id), [])


def armed(nimages: int = 12) -> DetectorSeries:
    return DetectorSeries("simplon1", 1, "simplon1-1", ("data",), (4, 4), np.dtype("<u2"), nimages)


def test_series_round_trip_and_bad_description():
    s = armed()
    assert series_from_dict(json.loads(json.dumps(series_to_dict(s)))) == DetectorSeries(
        s.protocol, s.series_id, s.series_unique_id, s.channels, s.shape, s.dtype, s.number_of_images,
        s.count_time, s.frame_time)
    with pytest.raises(ValueError, match="bad series description.*shape"):
        series_from_dict({**series_to_dict(s), "shape": [0, 4]})


def test_complete_scan_frames_merge_results_of_two_workers():
    st = MergeState(SCAN, clock=Clock())
    st.start_series(armed())
    for w in ("w0", "w1"):
        st.handle(head("hello", w), [])
    # the PUSH socket deals ids out round-robin: w0 the even ones, w1 the odd ones
    part(st, "w0", [0, 2, 4], [[0, 10], [2, 12], [4, 14]], sums={"p": np.ones((2, 2))})
    part(st, "w1", [1, 3, 5, 7], [[1, 11], [3, 13], [5, 15], [7, 17]], sums={"p": 2 * np.ones((2, 2))})
    st.check()
    (res,) = st.pop_closed()
    assert (res.index, res.closed_by, res.received, res.missing, res.lost_with) == (0, "complete", 6, 0, ())
    assert np.array_equal(res.images["a"], np.arange(6.0).reshape(SCAN))
    assert np.array_equal(res.images["b"], 10 + np.arange(6.0).reshape(SCAN))
    assert np.array_equal(st.sums["p"], 3 * np.ones((2, 2)))
    live = st.live_images()["a"].ravel()  # scan frame 1 so far: only id 7 (position 1)
    assert live[1] == 7 and np.isnan(live[[0, 2, 3, 4, 5]]).all()


def test_watermarks_close_a_frame_with_missing_ids_counted_not_lost():
    st = MergeState(SCAN, clock=Clock())
    st.start_series(armed())
    part(st, "w0", [0, 2, 6], np.zeros((3, 2)))  # id 4 lost upstream: w0 went on to 6
    part(st, "w1", [1, 3], np.zeros((2, 2)))
    st.check()
    assert st.pop_closed() == []  # w1 (watermark 3) may still send ids up to 5
    part(st, "w1", [5, 7], np.zeros((2, 2)))
    st.check()
    (res,) = st.pop_closed()
    # closed as soon as both watermarks (6 and 7) reached the frame's last id (5)
    assert (res.closed_by, res.received, res.missing, res.lost_with) == ("watermarks", 5, 1, ())
    assert np.isnan(res.images["a"].ravel()[4]) and not np.isnan(res.images["a"].ravel()[[0, 1, 2, 3, 5]]).any()
    assert st.counters.missing == 1 and st.counters.missing_dead == 0


def test_dead_worker_is_noticed_and_its_share_counted_missing():
    clock = Clock()
    st = MergeState(SCAN, timeout_s=1.0, clock=clock)
    st.start_series(armed())
    part(st, "w0", [0, 2, 4], np.zeros((3, 2)))
    part(st, "w1", [1], np.zeros((1, 2)))  # w1 dies after id 1: ids 3 and 5 never come
    clock.t += 0.6
    beat(st, "w0", 4)
    st.check()
    assert st.pop_closed() == [] and st.alive() == ["w0", "w1"]
    clock.t += 0.6  # w1 silent for 1.2 s > timeout, w0 heard 0.6 s ago
    part(st, "w0", [6, 8], np.zeros((2, 2)))
    st.check()
    assert st.alive() == ["w0"] and st.counters.deaths == 1
    (res,) = st.pop_closed()
    assert (res.closed_by, res.received, res.missing, res.lost_with) == ("watermarks", 4, 2, ("w1",))
    assert st.counters.missing_dead == 2
    beat(st, "w1", 1)  # heard again: alive again, counted
    assert st.counters.revived == 1 and sorted(st.alive()) == ["w0", "w1"]


def test_end_closes_the_last_frames_after_the_workers_settle():
    clock = Clock()
    st = MergeState(SCAN, settle_s=0.5, clock=clock)
    st.start_series(armed(nimages=10))  # frames 6-9 make a last scan frame of 4
    part(st, "w0", [0, 2, 4, 6, 8], np.zeros((5, 2)))
    part(st, "w1", [1, 3, 5, 7], np.zeros((4, 2)))  # id 9 lost
    st.check()
    (first,) = st.pop_closed()
    assert first.complete and first.index == 0
    st.handle(head("end", "w1", series_id=1, frames=4), [])
    beat(st, "w0", 8, idle=True)
    beat(st, "w1", 7, idle=True)
    st.check()
    assert st.pop_closed() == []  # not settled yet
    clock.t += 0.6
    st.check()
    (last,) = st.pop_closed()
    assert (last.index, last.expected, last.received, last.closed_by) == (1, 4, 3, "end")


def test_duplicates_late_stale_and_bad_messages_are_counted():
    st = MergeState(SCAN, clock=Clock())
    st.start_series(DetectorSeries("simplon1", 2, "simplon1-2", ("data",), (4, 4), np.dtype("<u2"), 0))
    part(st, "w0", [0, 1, 2, 3, 4, 5], np.arange(12.0), series_id=2)
    part(st, "w0", [1], [[9.0, 9.0]], series_id=1)  # an older series
    st.check()
    st.pop_closed()
    part(st, "w0", [2], [[1.0, 1.0]], series_id=2)  # its scan frame is closed already
    part(st, "w1", [6, 6], [[1.0, 1.0], [2.0, 2.0]], series_id=2)
    st.handle(head("part", "w1", series_id=2, n=3, names=["a", "b"], sums={}), [b"\0" * 8, b"\0" * 16])
    st.handle({"kind": "beat", "worker": "w1"}, [])  # no wire version
    c = st.counters
    assert (c.stale, c.late, c.duplicates, c.bad) == (1, 1, 1, 2)
    assert st.live_images()["a"].ravel()[0] == 2.0  # the later of the duplicates


def test_bad_state_arguments():
    with pytest.raises(ValueError, match="scan shape"):
        MergeState((0, 4))
    with pytest.raises(ValueError, match="timeout_s"):
        MergeState(SCAN, timeout_s=0)


def test_stream_dealt_out_over_two_workers_merges_bit_exact(caplog):
    """A SIMPLON v1 stream PUSHed to two worker threads: every frame reduced once, images equal to one
    reducer over all frames, the summed pattern equal to the frames' sum."""
    from beamloop.streams.dectris.simplon import SimplonSender

    caplog.set_level(logging.ERROR, "beamloop.streams.dectris.receiver")  # each worker sees every other id
    rng = np.random.default_rng(3)
    scan, det, n = (8, 8), (24, 24), 3 * 64
    frames = rng.poisson(4.0, (n, *det)).astype(np.uint16)
    geometry = DetectorGeometry(bf_radius=4.0, adf_radii=(6.0, 11.0))
    with SimplonSender("tcp://127.0.0.1:0") as tx, FanoutMerger(scan, timeout_s=30.0) as m:
        threads = [threading.Thread(target=worker_main, args=(tx.endpoint, "simplon1", m.results_endpoint,
                                                              m.control_endpoint, f"w{k}"),
                                    kwargs={"geometry": geometry, "stack_size": 16, "heartbeat_s": 0.05},
                                    daemon=True) for k in range(2)]
        for t in threads:
            t.start()
        series = DetectorSeries("simplon1", 7, "simplon1-7", ("data",), det, np.dtype("<u2"), n)
        m.arm(series)
        assert m.wait_workers(2, 60.0, series_id=7)
        time.sleep(0.2)  # both PULL sockets connected to the sender (round-robin needs both)
        tx.start_series(det, np.uint16, n, series=7)
        for f in frames:
            tx.send_frame(f)
        tx.end_series()
        got = []
        t_end = time.monotonic() + 60
        while len(got) < 3 and time.monotonic() < t_end:
            got += m.poll(100)
        m.stop_workers()
        for t in threads:
            t.join(10)
    ref = FourDReducer(geometry).reduce_frames(frames)
    assert [(r.index, r.closed_by, r.missing) for r in got] == [(0, "complete", 0), (1, "complete", 0),
                                                                 (2, "complete", 0)]
    for r in got:
        for k, name in enumerate(m.state.names):
            assert np.array_equal(r.images[name].ravel(), ref[64 * r.index:64 * (r.index + 1), k]), name
    assert np.array_equal(m.state.sums["sum_pattern"], frames.sum(axis=0, dtype=np.float64))
    shares = [w.watermark for w in m.state.workers.values()]
    assert len(shares) == 2 and min(shares) >= 0  # both workers took part


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fanout_merge_command_with_two_workers(tmp_path, monkeypatch, caplog, capsys):
    """``beamloop fanout merge`` (registered here as the CLI would) with two ``fanout worker`` bodies in threads:
    one scan frame, written complete, and the summary."""
    import argparse

    from beamloop.edge.cli import fanout
    from beamloop.streams.dectris.simplon import SimplonSender

    caplog.set_level(logging.ERROR, "beamloop.streams.dectris.receiver")
    armed = threading.Event()
    original = FanoutMerger.wait_workers

    def wait_workers(self, *args, **kw):
        ok = original(self, *args, **kw)
        armed.set()
        return ok

    monkeypatch.setattr(FanoutMerger, "wait_workers", wait_workers)
    rng = np.random.default_rng(1)
    frames = rng.poisson(3.0, (64, 16, 16)).astype(np.uint16)
    results, control = (f"tcp://127.0.0.1:{_free_port()}" for _ in range(2))
    parser = argparse.ArgumentParser()
    fanout.register(parser.add_subparsers())
    with SimplonSender("tcp://127.0.0.1:0") as tx:
        a = parser.parse_args(["fanout", "merge", "--scan", "8x8", "--workers", "2", "--series", "3",
                               "--detector-shape", "16x16", "--nimages", "64", "--frames", "1", "--results", results,
                               "--control", control, "--out", str(tmp_path), "--idle-timeout", "60"])
        workers = [parser.parse_args(["fanout", "worker", "--detector", tx.endpoint, "--results", results,
                                      "--control", control, "--name", f"n{k}", "--stack", "8"]) for k in range(2)]
        threads = [threading.Thread(target=w.func, args=(w,), daemon=True) for w in workers]

        def send():
            assert armed.wait(120)
            time.sleep(0.2)
            tx.start_series((16, 16), np.uint16, 64, series=3)
            for f in frames:
                tx.send_frame(f)
            tx.end_series()

        sender = threading.Thread(target=send, daemon=True)
        for t in (*threads, sender):
            t.start()
        rc = a.func(a)
        for t in (*threads, sender):
            t.join(30)
    assert rc == 0, capsys.readouterr()
    ref = FourDReducer().reduce_frames(frames)
    assert np.array_equal(np.load(tmp_path / "frame_00000_adf.npy").ravel(), ref[:, 1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counters"]["complete"] == 1 and summary["counters"]["missing"] == 0
    assert sorted(summary["workers"]) == ["n0", "n1"]
    assert "scan frame 0: 64/64 frames (complete)" in capsys.readouterr().out


def test_a_killed_worker_process_is_declared_dead_and_its_share_counted(caplog):
    """Two worker processes; one hangs (SIGSTOP) with its share of a scan frame queued, then is killed: the merger
    declares it dead, every scan frame still closes, and the frames it took with it are counted missing and
    attributed to it."""
    import os
    import signal

    from beamloop.edge.fanout_worker import spawn_workers
    from beamloop.streams.dectris.simplon import SimplonSender

    caplog.set_level(logging.ERROR, "beamloop.streams.merge")
    rng = np.random.default_rng(2)
    scan, det, n = (8, 8), (16, 16), 4 * 64
    frames = rng.poisson(3.0, (n, *det)).astype(np.uint16)
    with SimplonSender("tcp://127.0.0.1:0") as tx, FanoutMerger(scan, timeout_s=1.0) as m:
        procs = spawn_workers(2, tx.endpoint, "simplon1", m.results_endpoint, m.control_endpoint, stack_size=8,
                              heartbeat_s=0.05)
        try:
            m.arm(DetectorSeries("simplon1", 4, "simplon1-4", ("data",), det, np.dtype("<u2"), n))
            assert m.wait_workers(2, 120.0, series_id=4)
            time.sleep(0.3)
            tx.start_series(det, np.uint16, n, series=4)
            closed = []

            def wait_for(count: int, limit_s: float = 30.0) -> None:
                t_end = time.monotonic() + limit_s
                while len(closed) < count and time.monotonic() < t_end:
                    closed.extend(m.poll(50))

            for f in frames[:64]:
                tx.send_frame(f)
            wait_for(1)
            assert closed[0].complete
            os.kill(procs[1].pid, signal.SIGSTOP)  # w1 hangs: its share of scan frame 1 waits in its queue
            for f in frames[64:128]:
                tx.send_frame(f)
            wait_for(2)  # w1 silent for 1 s: dead; w0's watermark passes scan frame 1, which closes without w1's
            os.kill(procs[1].pid, signal.SIGKILL)  # and what w1 held is gone with it
            procs[1].join(10)
            for f in frames[128:]:
                tx.send_frame(f)
            tx.end_series()
            wait_for(4)
            m.stop_workers()
            for _ in range(5):
                m.poll(50)
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
    c = m.state.counters
    print(f"killed worker: {c.missing} frames missing, all attributed to it; closed by "
          f"{[r.closed_by for r in closed]}")
    assert [r.index for r in closed] == [0, 1, 2, 3]
    assert c.deaths == 1 and not m.state.workers["w1"].alive and not m.state.workers["w1"].left
    assert closed[1].missing == 32 and closed[1].lost_with == ("w1",)  # round-robin: every other frame was w1's
    assert c.missing == c.missing_dead  # nothing lost silently: every missing frame is the dead worker's
    assert all(r.received + r.missing == 64 for r in closed)
    assert all(r.lost_with == ("w1",) for r in closed if r.missing)
    ref = FourDReducer().reduce_frames(frames)
    for r in closed:  # what arrived is right
        got = r.images["adf"].ravel()
        ok = ~np.isnan(got)
        assert np.array_equal(got[ok], ref[64 * r.index:64 * (r.index + 1), 1][ok])
