"""Per-frame traces (edge/frame/trace.py): ring, slowest-frame breakdown, GC attribution, run-file round trip."""

import gc
import time

import h5py
import numpy as np
import pytest

import beamloop
from beamloop.edge.frame.context import FrameContext
from beamloop.edge.frame.trace import MISSING, FrameTrace, GcWatch, frame_total_ns, slowest
from beamloop.edge.io.runlog import RunLog
from beamloop.edge.path import frame_path

STAGES = ("a", "b", "c")


def ctx_with(t0, durations, cpu=None):
    ctx = FrameContext()
    t = t0
    for s, d in zip(STAGES, durations):
        ctx.started_ns[s] = t
        ctx.timings_ns[s] = d
        if cpu is not None:
            ctx.cpu_ns[s] = cpu[s]
        t += d + 100  # 100 ns between stages
    return ctx


def test_ring_keeps_the_newest_frames_in_order():
    tr = FrameTrace(STAGES, capacity=4)
    for i in range(10):
        tr.add(ctx_with(1000 * i, (10, 20, 30)), image_id=i, frame_id=100 + i, recv_ns=1000 * i - 50)
    rec = tr.records()
    assert len(tr) == 4 and tr.dropped == 6
    assert rec["image_id"].tolist() == [6, 7, 8, 9] and rec["frame_id"].tolist() == [106, 107, 108, 109]
    assert rec["b_start_ns"].tolist() == [6000 + 110, 7110, 8110, 9110]
    assert rec["c_end_ns"][0] - rec["c_start_ns"][0] == 30
    assert (rec["a_cpu_ns"] == MISSING).all() and (rec["sent_ns"] == MISSING).all()
    # receipt to the last stage's end: 50 + 10 + 100 + 20 + 100 + 30
    assert frame_total_ns(rec, STAGES).tolist() == [310] * 4


def test_slowest_frames_name_the_stage_and_the_wait():
    tr = FrameTrace(STAGES, capacity=1000)
    for i in range(1000):
        slow = i % 100 == 7  # 1 % of the frames: stage b takes 5000 ns more, 4000 of them without the CPU
        d = (100, 300 + (5000 if slow else 0), 200)
        cpu = {"a": 100, "b": 300 + (1000 if slow else 0), "c": 200}
        tr.add(ctx_with(10_000 * i, d, cpu), image_id=i, recv_ns=10_000 * i)
    out = slowest(tr.records(), STAGES, 0.01)
    assert out["n_frames"] == 1000 and out["n_slow"] == 10
    assert sorted(out["image_ids"]) == list(range(7, 1000, 100))
    assert out["excess_us"]["b"] == pytest.approx(5.0) and out["excess_us"]["a"] == pytest.approx(0.0)
    assert out["waited_us"]["b"] == pytest.approx(4.0) and out["waited_us"]["c"] == pytest.approx(0.0)
    assert out["gap_us"]["all_p50"] == pytest.approx(0.2)  # the two 100 ns gaps
    assert out["gc_share"] == 0.0
    with pytest.raises(ValueError):
        slowest(tr.records(), STAGES, 0.0)


def test_gc_watch_attributes_a_collection_to_the_frame_it_overlapped():
    with GcWatch() as gw:
        t0 = time.monotonic_ns()
        gc.collect()
        t1 = time.monotonic_ns()
        later = time.monotonic_ns() + 10**9
    assert gw.count >= 1
    inside = gw.overlap_ns(t0, t1)
    assert 0 < inside <= t1 - t0
    assert gw.overlap_ns(later, later + 10**6) == 0
    assert gw.overlap_ns(t0 - 10**9, t0 - 1) == 0


def test_frame_path_stage_starts_follow_each_other_and_cpu_is_measured():
    p = frame_path("classical", "MoS2")
    p.measure_cpu = True
    frame = beamloop.simulated_frame(shape=(96, 96), seed=2)
    before = time.monotonic_ns()
    ctx = p.run(frame.counts, 0.15)
    after = time.monotonic_ns()
    starts = [ctx.started_ns[s] for s in p.names]
    assert before <= starts[0] and starts[-1] + ctx.timings_ns[p.names[-1]] <= after
    for k in range(len(starts) - 1):
        assert starts[k + 1] >= starts[k] + ctx.timings_ns[p.names[k]]
    assert set(ctx.cpu_ns) == set(p.names) and all(v >= 0 for v in ctx.cpu_ns.values())


def test_run_file_keeps_the_trace(tmp_path):
    tr = FrameTrace(STAGES, capacity=8)
    for i in range(3):
        tr.add(ctx_with(500 * i, (1, 2, 3)), image_id=i)
    with RunLog(tmp_path / "run.h5") as rl:
        rl.write_trace(tr.records(), STAGES, tr.dropped)
    with h5py.File(tmp_path / "run.h5", "r") as f:
        d = f["trace"]
        assert d.attrs["stages"] == '["a", "b", "c"]' and d.attrs["dropped"] == 0
        assert d["image_id"].tolist() == [0, 1, 2] and np.array_equal(d[()], tr.records())


def test_tails_breakdown_names_the_cause_and_plots(tmp_path):
    from beamloop.bench.tails import breakdown, plot

    tr = FrameTrace(STAGES, capacity=500)
    for i in range(500):
        slow = i % 100 == 3
        d = (100, 300, 200 + (9000 if slow else 0))
        cpu = {"a": 100, "b": 300, "c": 200 + (500 if slow else 0)}  # the extra time in c is mostly waiting
        tr.add(ctx_with(100_000 * i, d, cpu), image_id=i, recv_ns=100_000 * i - 1000)
    out = breakdown(tr.records(), STAGES, 0.01)
    assert out["cause"]["stage"] == "c" and out["cause"]["kind"] == "waiting for a core"
    assert out["cause"]["waited_share"] == pytest.approx(8.5 / 9.0, rel=1e-6)
    png = tmp_path / "tails.png"
    plot(tr.records(), STAGES, png)
    assert png.stat().st_size > 5000
