"""The soak bench (bench/soak.py): a short run of the main job's loop, with its memory, latency and counters."""

import json
import math

import pytest

from beamloop.bench.soak import false_trips, run, slope_per_hour, summarize


def test_slope_and_summary_known_answers():
    assert slope_per_hour([0, 60, 120], [100.0, 101.0, 102.0]) == pytest.approx(60.0)  # 1 MiB a minute
    assert math.isnan(slope_per_hour([5], [1.0]))
    lat = {s: {"p50_us": p, "p99_us": p, "n": 1} for s, p in
           [("find", 10.0), ("classify", 1.0), ("bridge", 1.0), ("trigger", 1.0), ("end_to_end", 1.0)]}
    windows = [{"t_s": t, "rss_service_mib": 100.0 + t / 60, "rss_simulator_mib": 50.0, "python_objects": 1000,
                "latency": {**lat, "find": {"p50_us": 10.0 + t / 360, "p99_us": 0, "n": 1}}} for t in (0, 60, 120, 180)]
    s = summarize(windows)
    assert s["memory"]["rss_service_mib"]["slope_per_hour"] == pytest.approx(60.0)
    assert s["memory"]["rss_service_mib"]["change"] == 3.0 and s["memory"]["rss_simulator_mib"]["change"] == 0.0
    assert s["latency_drift"]["find"]["p50_slope_us_per_hour"] == pytest.approx(10.0)
    assert s["latency_drift"]["find"]["last_over_first"] == pytest.approx(10.5 / (10 + 1 / 6))


def test_short_soak(tmp_path):
    r = run(quick=True, duration_s=4.0, window_s=1.0, out=tmp_path, progress=False)
    saved = json.loads((tmp_path / "soak_quick.json").read_text())
    assert saved["totals"] == r["totals"] and (tmp_path / "soak_quick.png").stat().st_size > 0
    t = r["totals"]
    assert t["frames"] >= 2 and t["frames"] == r["windows"][-1]["frames"]
    # every dwell ended as the loop intends: the trigger fired or the time limit passed, beam blanked
    assert sum(t["dwells"].values()) >= 1 and set(t["dwells"]) <= {"trigger", "max_dwell"}
    c = r["counters"]
    assert c["stream"]["rejected"] == 0 and c["bridge"]["timeouts"] == 0 and c["bridge"]["errors"] == 0
    # the watchdog trips only when the service really was silent (by the service's own clock: a process
    # paused or starved of CPU on a busy machine is silent too)
    assert false_trips(c) == 0 and c["safety"]["refused_position"] == 0, c["trips_beyond_probes"]
    assert c["service"]["protocol_errors"] == 0 and c["service"]["frame_errors"] == 0
    assert len(r["windows"]) >= 3 and all(w["rss_service_mib"] > 0 and w["rss_simulator_mib"] > 0
                                          for w in r["windows"])
    assert r["windows"][-1]["latency"]["end_to_end"]["n"] >= 0
    mem = r["summary"]["memory"]["rss_service_mib"]
    assert math.isfinite(mem["slope_per_hour"]) and mem["last"] == r["windows"][-1]["rss_service_mib"]


def test_short_hostile_soak(tmp_path):
    """The main job with the hostile client beside it (flood, huge requests, replays, garbage frames) and
    watchdog probes: no blank refused, no frame lost, every silent client blanked, no other watchdog trip."""
    r = run(quick=True, duration_s=8.0, window_s=2.0, out=tmp_path, progress=False, hostile=True, probe_every_s=2.0)
    f = r["figures"]
    assert f["blanks_sent"] >= 1 and f["blanks_refused"] == 0, r["counters"]["blanks"]
    assert f["frames_lost"] == 0 and r["totals"]["stops"] == {}, r["totals"]
    assert f["watchdog_probes"] >= 1 and f["watchdog_probes_blanked"] == f["watchdog_probes"], r["probes"]
    assert f["watchdog_false_trips"] == 0, r["counters"]["trips_beyond_probes"]
    h = r["hostile"]
    assert h["flood_sent"] > 0 and h["huge_sent"] >= 3 and h["replays_sent"] > 0 and h["garbage_frames_sent"] > 0
    assert f["garbage_rejected"] > 0 and r["counters"]["service"]["frame_errors"] == 0
    saved = json.loads((tmp_path / "soak_hostile_quick.json").read_text())
    assert saved["figures"]["blanks_refused"] == 0 and (tmp_path / "soak_hostile_quick.md").read_text().startswith("#")
