"""Deep kernel learning: the numpy posterior against gpytorch's, the ONNX embedding against torch's, DKL on a
tiny problem with known maxima against random sampling, the offline experiment and its command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from beamloop.edge.experiments import dkl_gp

SIDE = 14
STEP = 8
MARGIN = 16


def _spots(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frame of Gaussian spots on a square grid of 196: 10 of them (5 %) bright (amplitude 1-2), the rest
    0.3; the property at a grid point is its spot's amplitude. Returns image, candidates (x, y) and truth."""
    rng = np.random.default_rng(seed)
    cand = np.stack(np.meshgrid(np.arange(SIDE) * STEP + MARGIN, np.arange(SIDE) * STEP + MARGIN), -1)
    cand = cand.reshape(-1, 2).astype(np.float64)
    amp = np.full(len(cand), 0.3)
    hot = rng.choice(len(cand), -(-len(cand) // 20), replace=False)
    amp[hot] = rng.uniform(1.0, 2.0, len(hot))
    n = SIDE * STEP + 2 * MARGIN
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.zeros((n, n))
    for (x, y), a in zip(cand, amp):
        img += a * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
    img = rng.poisson(200 * img + 20).astype(np.float64)
    return img, cand, amp


class _Lookup:
    """A PointMeasurer on a known map: the value at the candidate under each point, plus Gaussian noise."""

    units = "1"

    def __init__(self, cand: np.ndarray, truth: np.ndarray, seed: int) -> None:
        self.index = {(int(x), int(y)): i for i, (x, y) in enumerate(np.rint(cand))}
        self.truth = truth
        self.rng = np.random.default_rng(seed)

    def measure(self, points_px: np.ndarray) -> np.ndarray:
        i = np.array([self.index[(int(x), int(y))] for x, y in np.rint(points_px)])
        return self.truth[i] + 0.02 * self.rng.standard_normal(len(i))


def test_acquisitions_and_top_share_known_answers():
    mu = np.array([0.0, 1.0, 0.5])
    sd = np.array([1.0, 0.0, 0.2])
    assert dkl_gp.upper_confidence_bound(mu, sd, beta=4.0).tolist() == [2.0, 1.0, 0.9]
    assert dkl_gp.max_variance(mu, sd).tolist() == [1.0, 0.0, pytest.approx(0.04)]
    ei = dkl_gp.expected_improvement(mu, sd, best=1.0, xi=0.0)
    assert ei[1] == pytest.approx(0.0, abs=1e-9) and ei[0] == pytest.approx(0.0833155, rel=1e-4)
    with pytest.raises(KeyError):
        dkl_gp.acquisition_values("pi", mu, sd, 0.0)
    truth = np.arange(100.0)
    assert dkl_gp.top_share_found(truth, [99, 98, 0]) == pytest.approx(0.4)
    assert dkl_gp.top_share_found(truth, [0, 1], maximize=False) == pytest.approx(0.4)
    assert dkl_gp.reconstruction_error(truth, truth) == 0.0
    assert dkl_gp.reconstruction_error(np.full(100, truth.mean()), truth) == pytest.approx(1.0)


def test_gp_state_batches_and_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.uniform(-1, 1, (12, 2))
    y = np.sin(3 * z[:, 0]) + z[:, 1]
    st = dkl_gp.GPState(z, y, np.array([0.5, 0.7]), 1.3, 1e-3, 0.1, y_mean=2.0, y_std=3.0)
    mu, sd = st.predict(z, original_units=False)
    assert np.allclose(mu, y, atol=0.05) and (sd < 0.1).all()
    back = dkl_gp.GPState.load(st.save(tmp_path / "gp.npz"))
    assert np.allclose(back.predict(z)[0], st.predict(z)[0])
    zc = rng.uniform(-1, 1, (50, 2))
    avail = np.ones(50, bool)
    avail[:10] = False
    b = dkl_gp.select_batch(st, zc, avail, 5, acquisition="ucb")
    assert len(set(b.tolist())) == 5 and (b >= 10).all()
    pos = rng.uniform(0, 100, (50, 2))
    b = dkl_gp.select_batch(st, zc, avail, 4, acquisition="maxvar", batch="exclusion", positions=pos, exclusion=10.0)
    d = np.hypot(*(pos[b][:, None] - pos[b][None]).transpose(2, 0, 1))
    assert (d[np.triu_indices(len(b), 1)] >= 10.0).all()


def test_baselines():
    from beamloop.edge.experiments import dkl

    cand = dkl.grid_candidates((100, 100), 10.0, 5.0)
    r = dkl.baseline_order("raster", cand, 16, np.random.default_rng(0))
    assert len(set(r.tolist())) == 16
    assert cand[r[0], 1] <= cand[r[-1], 1]
    with pytest.raises(ValueError):
        dkl.baseline_order("spiral", cand, 4, np.random.default_rng(0))
    p = dkl.extract_patches(np.arange(100.0).reshape(10, 10), np.array([[5.0, 5.0]]), 4, 2)
    assert p.shape == (1, 2, 2) and p[0, 0, 0] == 33 + 34 + 43 + 44


def test_missing_extra_is_one_line(monkeypatch, capsys):
    from beamloop.edge.cli import dkl as cli_dkl
    from beamloop.edge.experiments import dkl_model

    monkeypatch.setattr(dkl_model.importlib.util, "find_spec", lambda name: None)
    why = dkl_model.dkl_missing()
    assert why and "\n" not in why and "dkl" in why
    with pytest.raises(dkl_model.DKLUnavailable):
        dkl_model.require_dkl()
    import argparse

    assert cli_dkl.cmd_dkl(argparse.Namespace()) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0]


# --- with the dkl extra --------------------------------------------------------------------------------------


def test_numpy_posterior_equals_gpytorch():
    pytest.importorskip("gpytorch")
    from beamloop.edge.experiments.dkl import extract_patches
    from beamloop.edge.experiments.dkl_model import DKLConfig, DKLModel

    img, cand, truth = _spots(0)
    m = DKLModel(extract_patches(img, cand, 16, 2), DKLConfig(iterations_first=20))
    idx = np.arange(0, len(cand), 7)
    m.fit(idx, truth[idx])
    q = np.arange(1, len(cand), 5)
    mu, sd = m.predict(q)
    mu_g, sd_g = m.gpytorch_predict(q)
    assert np.allclose(mu, mu_g, atol=1e-3 * truth.std())
    assert np.allclose(sd, sd_g, atol=2e-3 * truth.std())


def test_onnx_embedding_equals_torch(tmp_path):
    pytest.importorskip("gpytorch")
    pytest.importorskip("onnx")
    from beamloop.edge.experiments.dkl import extract_patches
    from beamloop.edge.experiments.dkl_model import DKLConfig, DKLModel

    img, cand, truth = _spots(1)
    patches = extract_patches(img, cand, 16, 2)
    m = DKLModel(patches, DKLConfig(iterations_first=15))
    idx = np.arange(0, len(cand), 6)
    m.fit(idx, truth[idx])
    pred = dkl_gp.OnnxPredictor(m.export(tmp_path / "enc.onnx"), m.state)
    z_onnx = pred.embed(patches)
    assert z_onnx.shape == (len(cand), m.config.embed_dim) and z_onnx.dtype == np.float32
    assert np.allclose(z_onnx, m.embed(), atol=1e-4)
    mu_onnx, _ = pred.predict(patches)
    assert np.allclose(mu_onnx, m.predict()[0], atol=1e-3 * truth.std())


def test_dkl_finds_known_maxima_better_than_random():
    """10 bright spots among 196: DKL's share of them after 20 measurements, over three seeds, is at least
    three times random sampling's expected share (20 / 196)."""
    pytest.importorskip("gpytorch")
    from beamloop.edge.experiments import dkl

    shares = []
    for seed in range(3):
        img, cand, truth = _spots(seed)
        s = dkl.DKLSettings(budget=20, initial=4, patch_px=16, patch_bin=2, seed=seed, checkpoints=(),
                            model=dkl.DKLConfig(iterations_first=40, iterations_update=10))
        res = dkl.run_dkl(img, cand, _Lookup(cand, truth, seed), s)
        assert len(set(res.order.tolist())) == 20
        shares.append(dkl.evaluate(truth, res.order, (20,))[20])
    assert np.mean(shares) >= 3 * 20 / len(cand), shares


def test_offline_experiment_writes_its_files(tmp_path):
    pytest.importorskip("gpytorch")
    import h5py

    from beamloop.edge.cli import main

    out = tmp_path / "run"
    assert main(["dkl", "--out", str(out), "--budget", "8", "--initial", "4", "--frame", "160", "--no-plots",
                 "--scalarizer", "eels_onset"]) == 0
    rep = json.loads((out / "report.json").read_text())["dkl"]
    assert rep["budget"] == 8 and rep["ratio_vs_random"] >= 0 and set(rep["top5_found"]) == {"dkl", "random", "raster"}
    with h5py.File(out / "run.h5") as f:
        assert f["path/order"].shape == (8,) and f["prediction/std"].shape == f["truth"].shape
        assert len(set(f["path/order"][()].tolist())) == 8
    assert (out / "encoder.onnx").exists() and (out / "gp_state.npz").exists()


@pytest.mark.slow
def test_offline_experiment_with_plots(tmp_path):
    pytest.importorskip("gpytorch")
    from beamloop.edge.cli import main

    out = tmp_path / "run"
    assert main(["dkl", "--out", str(out), "--budget", "25", "--frame", "256", "--acquisition", "ucb"]) == 0
    assert (out / "path.png").stat().st_size > 0 and (out / "maps.png").stat().st_size > 0


def test_scalarized_points_is_the_bridge_seam():
    from beamloop.edge.analysis.scalarize import make_scalarizer
    from beamloop.edge.experiments import dkl

    m = dkl.ScalarizedPoints(lambda pts: [np.full((4, 4), p[0]) for p in pts], make_scalarizer("adf_mean"))
    assert isinstance(m, dkl.PointMeasurer) and m.units == "counts"
    assert m.measure(np.array([[1.0, 0.0], [3.0, 2.0]])).tolist() == [1.0, 3.0] and m.measured == 2
    com = dkl.ScalarizedPoints(lambda pts: [np.zeros(8)] * len(pts), make_scalarizer("com_magnitude"))
    assert np.isnan(com.measure(np.zeros((2, 2)))).all()  # 1-D signals: refused, nan
    bad = dkl.ScalarizedPoints(lambda pts: [], make_scalarizer("adf_mean"))
    with pytest.raises(ValueError, match="signals"):
        bad.measure(np.zeros((1, 2)))
