"""The bench's floor section: every floor operation measured on a frame, and stage / floor ratios."""

import pytest

from beamloop.bench import floor


def test_every_floor_operation_is_timed_on_the_frame():
    r = floor.measure((32, 48), repeats=5)
    assert set(r) == {"memcpy", "numba_pass", "gaussian", "peak_local_max", "zmq_rtt_tcp", "zmq_rtt_ipc",
                      "zmq_frame_tcp", "zmq_frame_ipc"}
    for v in r.values():
        assert 0 < v["min_us"] <= v["p50_us"] <= v["p99_us"] and v["n"] >= 5
    assert set(floor.FLOOR_OF.values()) <= set(r)


def test_ratios_divide_by_the_floor_p50_and_skip_stages_without_one():
    stages = {"preprocess": {"p50_us": 300.0, "p99_us": 600.0}, "find": {"p50_us": 50.0, "p99_us": 80.0},
              "trigger": {"p50_us": 5.0, "p99_us": 9.0}}
    fl = {"gaussian": {"p50_us": 100.0}, "peak_local_max": {"p50_us": 200.0}}
    r = floor.ratios(stages, fl)
    assert set(r) == {"preprocess", "find"}  # the trigger has no floor operation
    assert r["preprocess"]["p50_ratio"] == pytest.approx(3.0) and r["preprocess"]["p99_ratio"] == pytest.approx(6.0)
    assert r["find"]["floor"] == "peak_local_max" and r["find"]["p50_ratio"] == pytest.approx(0.25)
