"""DKL in the closed loop: point measurements through the control bridge on the simulated microscope."""

from __future__ import annotations

import json

import numpy as np
import pytest

from beamloop.edge.control.protocol import BridgeError
from beamloop.edge.experiments import dkl_bridge, dkl_model
from beamloop.edge.experiments.dkl import ScalarizedPoints
from beamloop.edge.experiments.dkl_model import DKLUnavailable, dkl_missing

needs_dkl = pytest.mark.skipif(dkl_missing() is not None, reason="the dkl extra (torch, gpytorch) is not installed")

MICROSCOPE = {"cross_section_barn": 0.0, "sample_time_us": 1000.0, "block_samples": 64, "seed": 5}
CAPS = {"adf": {"channel": "haadf"},
        "eels": {"offset_eV": 400.0, "dispersion_eV": 0.5, "channels": 512, "dtype": "<u4"},
        "pattern": {"shape": [48, 48], "binning": 2, "dtype": "<u4"}}


def test_without_the_extra_the_experiment_says_so_in_one_line_before_starting(monkeypatch, tmp_path):
    monkeypatch.setattr(dkl_model, "dkl_missing", lambda: "deep kernel learning needs the dkl extra: torch not "
                                                           "installed")
    started = []
    monkeypatch.setattr(dkl_bridge, "start_simulator", lambda *a, **k: started.append(a))
    with pytest.raises(DKLUnavailable, match="needs the dkl extra") as e:
        dkl_bridge.run(tmp_path / "out", budget=10)
    assert "\n" not in str(e.value) and not started and not (tmp_path / "out").exists()


def test_scalarizers_are_bound_to_the_controllers_calibration():
    onset, det = dkl_bridge.bind_for_bridge("eels_onset", CAPS)
    assert det == "eels" and onset.settings["offset_eV"] == 400.0 and onset.settings["dispersion_eV"] == 0.5
    ratio, det = dkl_bridge.bind_for_bridge("bf_adf_ratio", CAPS)
    assert det == "pattern" and ratio.settings["bf_radius_px"] == 8.0 and ratio.settings["adf_outer_px"] == 24.0
    assert dkl_bridge.bind_for_bridge("adf_mean", CAPS)[1] == "adf"
    with pytest.raises(BridgeError, match="needs the eels detector, not fitted") as e:
        dkl_bridge.bind_for_bridge("eels_onset", {"adf": CAPS["adf"]})
    assert e.value.code == "out_of_range"
    with pytest.raises(KeyError, match="unknown scalarizer"):
        dkl_bridge.bind_for_bridge("eels_nonsense", CAPS)


def test_bridge_acquire_measures_spectra_through_point_queues(microscope, bridge_client):
    """The seam: pixels -> fractions -> one point queue -> spectra -> scalars, as the simulator's truth says."""
    client = bridge_client(microscope.control_endpoint, timeout_ms=10000)
    scan = client.acquire_frame((128, 128), (2.0, 2.0), 10.0)
    caps = client.get_capabilities()["point_detectors"]
    bound, det = dkl_bridge.bind_for_bridge("eels_edge_integral", caps)
    pts = np.array([[20.0, 30.0], [64.0, 64.0], [100.0, 90.0]])
    scene = dkl_bridge.BridgeScene(np.zeros((128, 128), np.uint16), pts, np.zeros(3), "MoS2", "eels_edge_integral",
                                   scan)
    assert np.allclose(scene.fractions(pts), (pts + 0.5) / 128)
    acq = dkl_bridge.BridgeAcquire(client, scene, det, 32000.0)
    measurer = ScalarizedPoints(acq, bound)
    values = measurer.measure(pts)
    assert acq.queues == 1 and len(acq.mean_counts) == 3 and acq.xy_px == [tuple(p) for p in pts]
    truth = dkl_bridge.true_map(client, scene, bound, det, 32000.0)
    # the S L2,3 integral of 1e7 electrons: Poisson noise of a few percent around the noise-free value
    assert np.all(np.abs(values - truth) < 0.1 * np.abs(truth))
    stop = dkl_bridge.BridgeAcquire(client, scene, det, 32000.0, interrupt=lambda: 2)
    with pytest.raises(dkl_bridge.DKLStopped, match="signal 2") as e:
        stop(pts)
    assert e.value.reason == "interrupted" and e.value.signum == 2 and stop.queues == 0


@needs_dkl
def test_a_small_bridge_run_writes_its_report_run_file_and_plots(tmp_path):
    import h5py

    rep = dkl_bridge.run(tmp_path, seed=1, budget=8, shape=(128, 128), quiet=True)
    assert rep["outcome"]["complete"] is True and rep["outcome"]["reason"] == ""
    d = rep["dkl"]
    assert d["via"] == "bridge" and d["detector"] == "eels" and d["budget"] == 8 and d["goal"] == "min"
    assert set(d["top5_found"]) == {"dkl", "random", "raster"} and set(d["reconstruction_error"]) == {
        "dkl", "random", "raster"}
    assert d["measurements"] == {"dkl": 8, "random": 8, "raster": 8}
    assert d["ratio_vs_random"] == pytest.approx(d["top5_found"]["dkl"]["8"] / (8 / d["candidates"]))
    assert {"p50", "p90"} <= set(d["decision_s"]) and d["decision_s"]["steps"] == 3  # 5 seed points, then 3 steps
    assert d["truth_finite"] == d["candidates"]
    assert json.loads((tmp_path / "report.json").read_text())["dkl"]["budget"] == 8
    with h5py.File(tmp_path / "run.h5") as f:
        assert f["path/order"].shape == (8,) and f["prediction/mean"].shape == (d["candidates"],)
        assert f["prediction/std"].shape == (d["candidates"],) and f["truth"].shape == (d["candidates"],)
        assert f["bridge/mean_counts"].shape == (8,) and f.attrs["via"] == "bridge"
        assert set(f["baselines"]) == {"random", "raster"}
    assert (tmp_path / "path.png").stat().st_size > 0 and (tmp_path / "maps.png").stat().st_size > 0
    from beamloop.streams.dectris.recorder import read_spectra

    spectra, energy, meta = read_spectra(tmp_path / "spectra.hspy")  # every DKL spectrum, with its energy axis
    assert spectra.shape == (8, 512) and energy[0] == 130.0 and energy[1] - energy[0] == 0.25
    assert d["files"]["spectra"] == "spectra.hspy" and meta["user_data"]["dwell_us"] == 32000.0
    assert rep["safety"]["counters"]["watchdog_trips"] == 0


@pytest.mark.slow
@needs_dkl
def test_dkl_through_the_bridge_finds_the_low_onset_sites_far_more_often_than_random(tmp_path):
    """Seed 0, N = 25 on a 384 px frame (645 candidates, 33 top-5 % sites): DKL finds 6 of them (0.18), random
    sampling 1 (0.03), against an expected 25/645 = 0.039: 4.7x (bench/results/dkl.md, the bridge section)."""
    rep = dkl_bridge.run(tmp_path, seed=0, budget=25, quiet=True, plots=False)
    d = rep["dkl"]
    assert d["candidates"] == 645 and d["top_sites"] == 33
    assert d["top5_found"]["dkl"]["25"] == pytest.approx(6 / 33)
    assert d["ratio_vs_random"] > 2.0
    assert d["top5_found"]["dkl"]["25"] > d["top5_found"]["random"]["25"]
    assert d["reconstruction_error"]["dkl"]["25"] < d["reconstruction_error"]["random"]["25"]


def test_run_experiment_dkl_options():
    from beamloop.edge.cli import build_parser

    p = build_parser()
    a = p.parse_args(["run", "--experiment", "dkl", "--budget", "25", "--acquisition", "ucb",
                      "--point-dwell-us", "1000"])
    assert (a.experiment, a.budget, a.acquisition, a.point_dwell_us) == ("dkl", 25, "ucb", 1000.0)
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--experiment", "dkl", "--budget", "2"])


@pytest.mark.slow
def test_run_experiment_dkl_command_writes_its_report(tmp_path):
    import json

    from beamloop.edge.cli import main

    out = tmp_path / "dkl"
    assert main(["run", "--experiment", "dkl", "--budget", "8", "--quiet", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert "ratio_vs_random" in rep["dkl"] and (out / "run.h5").exists() and (out / "spectra.hspy").exists()
