"""The benchmark suite's machinery: peer discovery and calls, result files, the summary, the CLI, the
benchmark microscope's frame cache and the GPU kernels (under numba's CUDA simulator). No timings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from beamloop import bench
from beamloop.bench import suite
from beamloop.bench.simhost import FrameCache
from beamloop.bench.stages import pixels_of

REPO = Path(__file__).resolve().parents[1]


def _stage_results():
    """Synthetic stage_latency.json content: every stage linear in pixels (us), with the summary's fields."""
    sizes = {}
    for n in (256, 512, 1024):
        st = {}
        for k, per_px in (("receive", 1e-3), ("decode", 2e-4), ("preprocess", 4e-3), ("find", 8e-3),
                          ("classify", 4e-3), ("policy", 1e-4), ("bridge", 0.0), ("trigger", 0.0), ("end_to_end",
                                                                                                    2e-2)):
            p50 = per_px * n * n + (300.0 if k == "bridge" else 5.0 if k == "trigger" else 0.0)
            st[k] = {"n": 1000, "p50_us": p50, "p99_us": 2 * p50, "p999_us": 3 * p50, "max_us": 4 * p50,
                     "mean_us": p50, "jitter_us": 0.1 * p50, "spread_us": p50, "tail_ok": True, "beyond_p999": 1,
                     "per_s": 1e6 / p50}
        sizes[f"{n}x{n}"] = {"frames": 1000, "wall_s": 10.0, "frames_per_s": 100.0, "stages": st,
                             "dwell_reasons": {"max_dwell": 1000}, "service": {"frame_errors": 0, "protocol_errors": 0}}
    return {"sizes": sizes}


def test_pixels_of():
    assert pixels_of("512x256") == 131072
    for bad in ("512", "axb", "0x5", "-1x4"):
        with pytest.raises(ValueError):
            pixels_of(bad)


def test_discover_peers(tmp_path):
    for name in ("streams_libertem.py", "unet_latency.py", "soak.py", "soak_long.py", "stages.py", "trigger_x.txt"):
        (tmp_path / name).write_text("")
    found = suite.discover_peers(tmp_path)
    assert found["streams_"] == ["streams_libertem"]
    assert found["unet_"] == ["unet_latency"]
    assert found["soak"] == ["soak", "soak_long"]
    assert found["trigger_"] == [] and found["fpga_"] == []


@pytest.fixture
def fake_peers(tmp_path, monkeypatch):
    """Modules bench.<name> living in tmp_path (bench's package path extended for this test)."""
    monkeypatch.setattr(bench, "__path__", [*bench.__path__, str(tmp_path)])
    (tmp_path / "fakepeer_ok.py").write_text(
        "import numpy as np\n"
        "def run(quick):\n    return {'quick': quick, 'p50_us': np.float64(2.5), 'rows': np.arange(3)}\n"
        "def bench_summary_md(res):\n    return f\"fake p50 {res['p50_us']} us\"\n"
        "def summarize(windows):\n    return windows[1:]\n")  # a module's own summarize is not the hook
    (tmp_path / "fakepeer_boom.py").write_text("def run(quick):\n    raise RuntimeError('no detector')\n")
    (tmp_path / "fakepeer_norun.py").write_text("X = 1\n")
    yield tmp_path
    for name in ("fakepeer_ok", "fakepeer_boom", "fakepeer_norun"):
        sys.modules.pop(f"beamloop.bench.{name}", None)


def test_peer_child_outcomes(fake_peers, tmp_path):
    out = tmp_path / "r.json"
    assert suite._peer_child("fakepeer_ok", out, True) == 0
    got = json.loads(out.read_text())
    assert got["status"] == "ok" and got["result"] == {"quick": True, "p50_us": 2.5, "rows": [0, 1, 2]}
    assert got["summary_md"] == "fake p50 2.5 us"
    suite._peer_child("fakepeer_boom", out, False)
    got = json.loads(out.read_text())
    assert got["status"] == "error" and "RuntimeError: no detector" in got["error"]
    suite._peer_child("fakepeer_norun", out, False)
    assert json.loads(out.read_text())["status"] == "skipped"
    suite._peer_child("fakepeer_absent", out, False)
    assert "cannot import" in json.loads(out.read_text())["error"]


def test_call_peer_in_a_child_process():
    got = suite.call_peer("no_such_peer_module", quick=True, timeout_s=120)
    assert got["status"] == "skipped" and "cannot import beamloop.bench.no_such_peer_module" in got["error"]
    assert got["wall_s"] > 0


def test_budget_section_writes_results_and_summary(tmp_path):
    (tmp_path / "stage_latency.json").write_text(json.dumps(_stage_results()))
    index = suite.run_suite(tmp_path, quick=True, sections=("budget",), progress=False)
    assert index["sections"]["budget"]["status"] == "ok"
    for name in ("budget.json", "budget.png", "summary.md", "suite.json"):
        assert (tmp_path / name).stat().st_size > 0
    b = json.loads((tmp_path / "budget.json").read_text())["scenarios"]
    by = {s["label"]: s for s in b}
    # 512x512 at 2 kHz: the frame path's p99 = 2 * (1e-3 + 2e-4 + 4e-3 + 8e-3 + 4e-3 + 1e-4) * 512^2 us
    s = by["detector 512x512 at 2 kHz (ASI Cheetah, frame mode)"]
    assert s["frame_path_p99_us"] == pytest.approx(2 * 0.0173 * 512 * 512, rel=1e-6)
    assert s["leftover_us"] == pytest.approx(500.0 - s["frame_path_p99_us"], rel=1e-9)
    md = (tmp_path / "summary.md").read_text()
    assert "## 2. Latency budgets" in md and "detector 512x512 at 2 kHz" in md
    assert json.loads((tmp_path / "suite.json").read_text())["mode"] == "quick"


def test_budget_section_without_stage_results_fails_cleanly(tmp_path):
    index = suite.run_suite(tmp_path, sections=("budget",), progress=False)
    assert index["sections"]["budget"]["status"] == "error"
    assert "stage_latency.json does not exist" in index["sections"]["budget"]["error"]
    assert (tmp_path / "summary.md").exists()
    with pytest.raises(ValueError, match="unknown sections"):
        suite.run_suite(tmp_path, sections=("nonsense",), progress=False)


def test_summary_renders_every_section(tmp_path):
    from beamloop.bench.budget import budgets
    from beamloop.bench.summary import write_summary

    st = _stage_results()
    index = {"mode": "full", "machine_start": suite.machine_info(), "sections": {"stages": {"status": "ok",
                                                                                            "wall_s": 1.0}}}
    results = {"stages": st, "budget": budgets(st["sizes"]),
               "gpu": {"skipped": "no usable NVIDIA GPU here: test"},
               "peers": {"streams_": {"status": "absent", "error": "no bench/streams_*.py yet"},
                         "unet_latency": {"status": "ok", "wall_s": 3.0, "result": {"cpu": {"median_ms": 4.5}},
                                          "summary_md": ""}}}
    md = write_summary(tmp_path / "summary.md", index, results).read_text()
    assert "| find | 1000 |" in md
    assert "Skipped: no usable NVIDIA GPU here: test" in md
    assert "`streams_*`: skipped" in md and "cpu.median_ms = 4.50" in md


def test_cli_budget_only(tmp_path, capsys):
    from beamloop.edge.cli import main

    assert main(["bench", "--budget-only", "--out", str(tmp_path)]) == 1
    (tmp_path / "stage_latency.json").write_text(json.dumps(_stage_results()))
    assert main(["bench", "--budget-only", "--out", str(tmp_path), "--frame-size", "512x512",
                 "--frame-rate", "1000"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("detector 512x512 at 1000 Hz: frame time 1000 us")
    assert main(["bench", "--budget-only", "--out", str(tmp_path), "--frame-rate", "1000"]) == 1  # no size


def test_cli_budget_action_for_a_scan(tmp_path, capsys):
    from beamloop.edge.cli import main

    (tmp_path / "stage_latency.json").write_text(json.dumps(_stage_results()))
    assert main(["bench", "budget", "--dwell-us", "10", "--frame", "512", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # 512 x 512 probe positions x 10 us = 2621440 us per frame; p99 frame path 2 * 0.0173 us/px * 512^2
    assert out.startswith("scan 512x512, 10 us dwell: frame time 2.62e+06 us")
    assert "leftover 2.61e+06 us" in out and "probe_positions_per_beam_move_p99: 60.0" in out
    assert main(["bench", "budget", "--dwell-us", "10", "--frame-rate", "5", "--frame", "512",
                 "--out", str(tmp_path)]) == 1  # a scan or a detector, not both


def test_soak_runs_in_its_quick_form_in_a_full_run(monkeypatch, tmp_path):
    calls = []
    shared = tmp_path / "shared_results"
    shared.mkdir()
    (shared / "unet_x.json").write_text("{}")  # an older result of another group

    def fake_call(name, quick, timeout_s):
        calls.append((name, quick))
        (shared / f"{name}{'_quick' if quick else ''}.json").write_text("{}")
        if name == "soak":
            os.utime(shared / "unet_x.json", ns=(1, 1))  # someone else's run touches another group's file
        return {"status": "ok", "result": {}}

    monkeypatch.setattr(suite, "RESULTS", shared)
    monkeypatch.setattr(suite, "discover_peers", lambda: {"soak": ["soak"], "unet_": ["unet_x"]})
    monkeypatch.setattr(suite, "call_peer", fake_call)
    suite.run_suite(tmp_path, quick=False, sections=("peers",), progress=False)
    assert sorted(calls) == [("soak", True), ("unet_x", False)]
    got = json.loads((tmp_path / "peers.json").read_text())
    assert "quick form" in got["soak"]["note"] and "note" not in got["unet_x"]
    assert got["soak"]["files"] == ["soak_quick.json"] and got["unet_x"]["files"] == ["unet_x.json"]


def test_real_image_overlays_only_for_permissive_licences(tmp_path):
    from beamloop.bench.atomfinding import may_publish

    (tmp_path / "LICENSE-mit.txt").write_text("The file a_mit.png comes from X.\n\nMIT License\n\nPermission ...")
    (tmp_path / "LICENSE-gpl.txt").write_text("b_gpl.hdf5 is part of atomap.\nGNU GENERAL PUBLIC LICENSE v3")
    assert may_publish(tmp_path / "a_mit.png")
    assert not may_publish(tmp_path / "b_gpl.hdf5")
    assert not may_publish(tmp_path / "c_unknown.tif")  # no notice: never into the repository


def test_frame_cache_renders_then_cycles():
    from beamloop.edge.frame.scanframe import ScanFrame
    from beamloop.edge.sim import lattice, profiles
    from beamloop.edge.sim.frames import FrameSimulator
    from beamloop.edge.sim.render import ColumnRenderer  # noqa: F401  (the imager's renderer stays reachable)

    spec = lattice.mos2((-8.0, 8.0, -8.0, 8.0), rotation_deg=0.0, origin_A=(0.0, 0.0))
    cache = FrameCache(FrameSimulator(spec, np.random.default_rng(1)), frames_per_scan=2)
    assert cache.renderer is cache._imager.renderer
    scans = [ScanFrame(k, (24, 24), (0.36, 0.36), dwell_us=5.0) for k in range(1, 6)]
    frames = [cache.acquire(s, 100.0) for s in scans]
    assert cache.rendered == 2
    assert not np.array_equal(frames[0].counts, frames[1].counts)
    assert frames[2].counts is frames[0].counts and frames[3].counts is frames[1].counts
    assert [f.scan.frame_id for f in frames] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(frames[4].truth_xy, frames[0].truth_xy)
    other = cache.acquire(ScanFrame(6, (32, 24), (0.48, 0.36), dwell_us=5.0), 100.0)  # new geometry: rendered
    assert cache.rendered == 3 and other.counts.shape == (32, 24)
    with pytest.raises(ValueError):
        FrameCache(cache, 0)
    assert profiles  # imported for the renderer's tables


def test_gpu_kernels_match_cpu_under_cuda_simulator():
    code = (
        "import numpy as np\n"
        "from beamloop.edge.stages.preprocess_gpu import GpuPreprocessor\n"
        "from beamloop.edge.stages.preprocess import Preprocessor\n"
        "f = np.random.default_rng(0).poisson(5, (19, 26)).astype(np.uint16)\n"
        "s, n = GpuPreprocessor(1.2).run(f)\n"
        "s2, n2 = Preprocessor(1.2).run(f)\n"
        "assert np.array_equal(s, s2), np.abs(s - s2).max()\n"
        "assert abs(n - n2) <= 1e-12 * n2, (n, n2)\n"
        "from beamloop.bench.gpu import detect\n"
        "d = detect()\n"
        "assert not d['available'] and 'CUDA simulator' in d['reason'], d\n"
        "print('ok')\n")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_gpu_section_reports_its_reason_without_a_gpu():
    from beamloop.bench import gpu

    d = gpu.detect()
    assert set(d["backends"]) == {"nvidia_smi", "numba_cuda", "onnxruntime_cuda", "torch_cuda"}
    if not d["available"]:
        res = gpu.run(quick=True)
        assert res["skipped"].startswith("no usable NVIDIA GPU here") and res["detection"] == d
        assert all(v["reason"] for v in d["backends"].values() if not v["ok"])


@pytest.mark.slow
def test_stage_latency_through_the_simulator():
    """A few frames of 256x256 through the benchmark microscope and the service: every stage recorded."""
    from beamloop.bench import stages
    from beamloop.edge.frame.latency import STAGES

    res, samples = stages.run(quick=True, sizes=(256,), frames={256: 6}, progress_bar=False)
    r = res["sizes"]["256x256"]
    assert r["frames"] == 6 and r["service"]["frame_errors"] == 0 and r["service"]["protocol_errors"] == 0
    for s in STAGES:
        assert r["stages"][s]["n"] >= 1 and r["stages"][s]["p50_us"] > 0, s
    assert len(samples["256x256"]["find"]) == 6
    assert res["stream_counters"]["rejected"] == 0
