"""The benchmark suite's arithmetic: tail statistics and latency budgets (known answers, no timings)."""

import math

import numpy as np
import pytest

from beamloop.bench.budget import Scenario, budget, fit_power_law, stage_models
from beamloop.bench.stats import TAIL_SAMPLES, cdf, recorder_of, stage_summary


def test_stage_summary_percentiles_and_extras():
    # 1..2000 us: p50 = 1000.5, p99 = 1980.01 (numpy's linear interpolation), max 2000
    rec = recorder_of({"find": np.arange(1, 2001) * 1000, "bridge": [5_000_000, 7_000_000]})
    s = stage_summary(rec)
    f = s["find"]
    assert f["n"] == 2000
    assert f["p50_us"] == pytest.approx(1000.5)
    assert f["p99_us"] == pytest.approx(1980.01)
    assert f["p999_us"] == pytest.approx(1998.001)
    assert f["max_us"] == 2000.0
    assert f["spread_us"] == pytest.approx(1980.01 - 1000.5)
    assert f["beyond_p999"] == 2 and f["tail_ok"]
    assert f["per_s"] == pytest.approx(1e6 / 1000.5)
    b = s["bridge"]
    assert b["n"] == 2 and not b["tail_ok"] and b["beyond_p999"] == 0
    assert b["jitter_us"] == pytest.approx(1000.0)  # standard deviation of 5 and 7 ms
    assert TAIL_SAMPLES == 1000


def test_stage_summary_leaves_out_empty_stages():
    rec = recorder_of({"decode": [], "policy": [3000]})
    assert list(stage_summary(rec)) == ["policy"]


def test_cdf_is_monotone_and_complete():
    v, f = cdf(np.array([3.0, 1.0, 2.0, 2.0]), points=10)
    assert v.tolist() == [1.0, 2.0, 2.0, 3.0]
    assert f.tolist() == [0.25, 0.5, 0.75, 1.0]
    v, f = cdf(np.arange(10_000.0), points=50)
    assert len(v) <= 50 and f[-1] == 1.0 and np.all(np.diff(v) >= 0) and np.all(np.diff(f) > 0)
    v, f = cdf(np.zeros(0))
    assert len(v) == 0 and len(f) == 0


def test_power_law_fit_recovers_known_law():
    n = np.array([256**2, 512**2, 1024**2], float)
    a, b = fit_power_law(n, 0.02 * n**0.9)
    assert b == pytest.approx(0.9, abs=1e-9)
    assert a == pytest.approx(0.02, rel=1e-9)


def test_power_law_fit_clips_and_handles_one_point():
    n = np.array([100.0, 400.0])
    a, b = fit_power_law(n, [10.0, 5.0])  # faster with more pixels: clipped to size-independent
    assert b == 0.0
    assert a == pytest.approx(math.sqrt(50.0))  # geometric mean of the times
    assert fit_power_law([100.0], [7.0]) == (pytest.approx(7.0), 0.0)
    with pytest.raises(ValueError):
        fit_power_law([], [])
    with pytest.raises(ValueError):
        fit_power_law([0.0, 1.0], [1.0, 2.0])


def test_scenario_frame_time_and_validation():
    assert Scenario("d", (512, 512), frame_rate_hz=2000).frame_time_us == pytest.approx(500.0)
    assert Scenario("s", (256, 128), dwell_us=2.0).frame_time_us == pytest.approx(256 * 128 * 2.0)
    with pytest.raises(ValueError):
        Scenario("both", (8, 8), frame_rate_hz=1.0, dwell_us=1.0)
    with pytest.raises(ValueError):
        Scenario("neither", (8, 8))
    with pytest.raises(ValueError):
        Scenario("bad", (8, 8), dwell_us=-1.0)
    with pytest.raises(ValueError):
        Scenario("bad", (0, 8), dwell_us=1.0)


def _sizes(**per_stage):
    """Synthetic stage results: stage -> (p50 per pixel, p99 per pixel) in us, linear in pixel count."""
    out = {}
    for n in (256, 512, 1024):
        st = {k: {"p50_us": p50 * n * n, "p99_us": p99 * n * n} for k, (p50, p99) in per_stage.items()}
        out[f"{n}x{n}"] = {"stages": st}
    return out


def test_budget_arithmetic_on_linear_stages():
    # per pixel: preprocess 1e-3 / 2e-3 us, find 2e-3 / 4e-3 us; 512x512 -> 262.144 / 524.288 and 524.288 / 1048.576
    models = stage_models(_sizes(preprocess=(1e-3, 2e-3), find=(2e-3, 4e-3), bridge=(1e-6, 2e-6)))
    assert models["find"]["p99"][1] == pytest.approx(1.0)
    b = budget(models, Scenario("d", (512, 512), frame_rate_hz=1e6 / 1000.0))  # 1000 us per frame
    rows = {r["stage"]: r for r in b["stages"]}
    assert rows["preprocess"]["p99_us"] == pytest.approx(524.288)
    assert rows["preprocess"]["fits"] and not rows["find"]["fits"]  # 524 fits in 1000, 524 + 1049 does not
    assert rows["find"]["cumulative_p99_us"] == pytest.approx(524.288 + 1048.576)
    assert b["fits_stages"] == ["preprocess"] and not b["all_fit"]
    assert b["leftover_us"] == pytest.approx(1000.0 - 1572.864)
    assert b["frame_path_p50_us"] == pytest.approx(262.144 + 524.288)
    assert b["max_frame_rate_hz"] == pytest.approx(1e6 / (262.144 + 524.288))
    assert not rows["find"]["extrapolated"]
    assert not rows["bridge"]["per_frame"] and "fits" not in rows["bridge"]


def test_budget_scan_beam_figures_and_extrapolation():
    models = stage_models(_sizes(decode=(1e-4, 1e-4)))
    models["bridge"] = {"p50": (200.0, 0.0), "p99": (400.0, 0.0), "pixels": [256**2, 1024**2]}
    models["trigger"] = {"p50": (5.0, 0.0), "p99": (50.0, 0.0), "pixels": [256**2, 1024**2]}
    b = budget(models, Scenario("s", (128, 128), dwell_us=0.4), block_samples=100)
    assert b["frame_time_us"] == pytest.approx(128 * 128 * 0.4)
    assert b["all_fit"]
    assert b["beam"]["probe_positions_per_beam_move_p99"] == pytest.approx(1000.0)
    assert b["beam"]["trigger_p99_us_per_sample"] == pytest.approx(0.5)
    assert not b["beam"]["trigger_fits_dwell"]  # 500 ns per sample > 400 ns dwell
    assert {r["stage"]: r["extrapolated"] for r in b["stages"]}["decode"]  # 128^2 is below the measured sizes
