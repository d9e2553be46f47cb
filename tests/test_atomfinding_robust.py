"""Atom finding that holds on real images: scale and background, edges, close pairs, dose-adaptive threshold,
the OOD stage and the uncertainty gate, the second simulator's resampling (known answers: analytic Gaussians
and simulated frames with ground truth)."""

import math

import numpy as np
import pytest

from beamloop.edge.analysis.scoring import match, score_frame
from beamloop.edge.analysis.spacing import estimate_scale
from beamloop.edge.frame.columns import ColumnTable, read_csv
from beamloop.edge.frame.context import FrameMeta
from beamloop.edge.materials import GENERIC
from beamloop.edge.path import frame_path
from beamloop.edge.sim.frames import mos2_frame
from beamloop.edge.stages.background import Background, BackgroundSubtractor
from beamloop.edge.stages.find import ColumnFinder, FinderConfig, noise_maxima, noise_survival


def gaussians(shape, centres, sigma, amp=100.0, sigma_y=None):
    yy, xx = np.indices(shape)
    sy = sigma_y or sigma
    img = np.zeros(shape)
    for x, y in centres:
        img += amp * np.exp(-0.5 * ((xx - x) ** 2 / sigma**2 + (yy - y) ** 2 / sy**2))
    return img


def square_lattice(shape, period, sigma, offset=(5.3, 4.1)):
    c = [(offset[0] + i * period, offset[1] + j * period) for i in range(-1, shape[1] // int(period) + 2)
         for j in range(-1, shape[0] // int(period) + 2)]
    return gaussians(shape, c, sigma), np.array(c)


def test_scale_of_a_lattice_under_a_strong_envelope_with_offset_and_16_bit_counts():
    rng = np.random.default_rng(1)
    lat, truth = square_lattice((384, 384), 24.0, 3.0)
    yy, xx = np.indices(lat.shape)
    envelope = 2000.0 * np.clip(1 - ((xx - 190) ** 2 + (yy - 200) ** 2) / 170.0**2, 0, 1) ** 0.5
    img = rng.poisson(15000 + envelope + 3 * lat).astype(np.uint16)  # envelope >> lattice contrast
    est = estimate_scale(img)
    assert est.period_px == pytest.approx(24.0, rel=0.06)
    assert 2.0 < est.column_sigma_px < 6.0  # noisy: the envelope's edge widens the central peak a little
    assert est.confidence > 0.1 and est.fourier_spacing_px == pytest.approx(24.0, rel=0.06)
    # without a pixel size, the finder (background stage on) recovers the columns inside the particle
    from beamloop.edge.batch_find import find_columns

    cols, _ = find_columns(img, None, "generic")
    inside = truth[np.hypot(truth[:, 0] - 190, truth[:, 1] - 200) < 150]
    fi, _, _ = match(cols.xy, inside, 4.0)
    assert len(fi) >= 0.9 * len(inside)
    # saturated pixels (a detector's top value on a few percent of the frame) change little
    sat = img.copy()
    sat[:, :12] = 65535
    assert estimate_scale(sat).period_px == pytest.approx(24.0, rel=0.06)
    # a period given by the user is kept; the column sigma is still measured
    given = estimate_scale(img, period_px=25.0)
    assert given.given and given.period_px == 25.0 and 2.0 < given.column_sigma_px < 4.5


def test_background_subtraction_flattens_an_envelope():
    lat, _ = square_lattice((256, 256), 20.0, 2.5)
    yy, xx = np.indices(lat.shape)
    env = 500.0 * np.exp(-((xx - 128) ** 2 + (yy - 110) ** 2) / (2 * 70.0**2))
    sub = BackgroundSubtractor(20)  # the stage's block: about one period
    out = sub.run((lat + env + 1000).astype(np.float32))
    # the valleys between columns lie near zero everywhere (the envelope is mostly gone)
    m = (np.abs(((xx - 5.3) % 20) - 10) < 2) & (np.abs(((yy - 4.1) % 20) - 10) < 2)
    before = np.percentile(np.abs(env[m] - np.median(env[m])), 90)
    assert np.percentile(np.abs(out[m]), 90) < 0.25 * before
    stage = Background("auto")
    stage.prepare(FrameMeta((256, 256), np.dtype(np.float32), None, GENERIC, period_px=20.0, column_sigma_px=2.5))
    assert stage.active
    stage.prepare(FrameMeta((256, 256), np.dtype(np.float32), 0.15, GENERIC, period_px=20.0, column_sigma_px=2.5))
    assert not stage.active


def test_columns_near_the_edge_are_found_flagged_and_refined():
    sigma = 2.5
    centres = [(1.5 * sigma, 30.3), (40.2, 1.4 * sigma), (60.0 - 1 - 1.6 * sigma, 45.7), (30.4, 29.6)]
    img = gaussians((60, 60), centres, sigma) + 5.0
    cfg = FinderConfig.for_spacing(16.0, sigma)
    cols = ColumnFinder(cfg).find(img.astype(np.float32))
    fi, ti, d = match(cols.xy, np.array(centres), 1.5)
    assert len(cols) == 4 and len(fi) == 4
    assert d.max() < 0.15  # the clipped-window fit removes the reflected border's pull
    near = {int(t) for f, t in zip(fi, ti) if cols.near_edge[f]}
    assert near == {0, 1, 2}


def test_a_pair_the_image_resolves_is_two_columns_and_an_elongated_single_one():
    sigma = 2.0
    rng = np.random.default_rng(0)
    pairs = [(30 + 40 * i - 3.8, 30.0 + 40 * j) for i in range(3) for j in range(3)]
    pairs += [(30 + 40 * i + 3.8, 30.0 + 40 * j) for i in range(3) for j in range(3)]
    img = gaussians((140, 140), pairs, sigma) + rng.normal(0, 0.5, (140, 140)) + 10
    cfg = FinderConfig.for_lattice(40.0, 3.5)  # the autocorrelation sees the pair's width, not one column's
    cols = ColumnFinder(cfg).find(img.astype(np.float32))
    fi, _, d = match(cols.xy, np.array(pairs), 1.0)
    assert len(cols) == 18 and len(fi) == 18 and d.max() < 0.5
    single = [(30 + 40 * i, 30.0 + 40 * j) for i in range(3) for j in range(3)]
    ell = gaussians((140, 140), single, 3.6, sigma_y=2.0) + rng.normal(0, 0.5, (140, 140)) + 10
    assert len(ColumnFinder(cfg).find(ell.astype(np.float32))) == 9


def test_noise_null_and_dose_adaptive_threshold():
    cfg = FinderConfig.for_pixel_size(0.15)
    scores, density = noise_maxima(cfg)
    assert density > 0 and np.all(np.diff(scores) >= 0)
    sf = noise_survival(scores, np.array([0.0, 3.0, 5.0, 8.0]))
    assert sf[0] == pytest.approx(1.0, abs=0.02) and sf[0] > sf[1] > sf[2] > sf[3] > 0
    # the numba kernel and the reference implementation choose the same threshold
    from beamloop.edge.kernels.peaks import bh_threshold
    from beamloop.edge.stages.find import NULL_FIT_SNR, PeakFinder

    pf = PeakFinder(cfg, 0.1)
    rng = np.random.default_rng(2)
    for _ in range(5):
        h = np.concatenate([rng.rayleigh(1.0, 800), rng.uniform(3, 20, 300)]).astype(np.float32)
        ref = pf.score_threshold(h / 1.0, 256.0 * 256.0)
        got = bh_threshold(h, len(h), 1.0, pf.noise_scores, pf.noise_density * 65536.0, pf._below, NULL_FIT_SNR,
                           cfg.fdr, cfg.threshold_min_snr, cfg.threshold_snr, np.empty(len(h)))
        assert got == pytest.approx(ref, abs=1e-9)
    p = frame_path("classical", "MoS2")
    thr = {}
    for dose in (1e4, 1e6):
        f = mos2_frame(dose_e_per_A2=dose, seed=300_400)
        ctx = p.run(f.counts, 0.15)
        thr[dose] = ctx.extras["threshold_snr"]
        s = score_frame(ctx.columns.xy, ctx.columns.cls, f.truth_xy, f.truth_cls, f.class_names, 0.15,
                        frame_shape=f.counts.shape)
        assert s.recall >= (0.95 if dose == 1e4 else 0.995) and s.precision >= 0.98, (dose, s)
    assert thr[1e4] < 5.0 and thr[1e6] == pytest.approx(5.5)


def test_csv_near_edge_column_and_old_files(tmp_path):
    t = ColumnTable(np.array([1.0, 20.0], np.float32), np.array([2.0, 20.0], np.float32),
                    np.ones(2, np.float32), np.ones(2, np.float32), np.zeros(2, np.int8), ("column",),
                    np.array([True, False]))
    t.write_csv(tmp_path / "a.csv", 0.1, uncertainty=np.array([0.2, 0.1]))
    back, header = read_csv(tmp_path / "a.csv")
    assert header[:7] == ["x_px", "y_px", "intensity", "class", "score", "x_A", "y_A"]
    assert header[7:] == ["near_edge", "uncertainty"] and back.near_edge.tolist() == [True, False]
    (tmp_path / "old.csv").write_text("x_px,y_px,intensity,class,score\n1,2,3,column,4\n")
    old, _ = read_csv(tmp_path / "old.csv")
    assert old.near_edge.tolist() == [False]


def test_ood_stage_and_the_policy_uncertainty_gate():
    from beamloop.edge.frame.scanframe import ScanFrame
    from beamloop.edge.stages.ood import OODAlarm, calibrate, frame_features
    from beamloop.edge.stages.policy import VacancyLinePolicy

    f = mos2_frame(dose_e_per_A2=1e5, seed=300_500)
    p = frame_path("classical", "MoS2", VacancyLinePolicy(4))
    scan = ScanFrame(1, (256, 256), (3.84, 3.84))
    ctx = p.run(f.counts, 0.15, scan)
    feats = ctx.extras["ood"]["features"]
    assert set(feats) == {"nn_cv", "density", "weak_fraction"} and feats["nn_cv"] < 0.1
    unc = ctx.extras["column_uncertainty"]
    assert unc.shape == (len(ctx.columns),) and len(ctx.targets) > 0
    # calibrated on this frame's own features: in distribution; pure noise is out of it
    cal = {"MoS2": calibrate([feats, dict(feats, nn_cv=feats["nn_cv"] * 1.1)])}
    ood = [s for s in p.stages if isinstance(s, OODAlarm)][0]
    ood.calibration = cal
    p.prepare(FrameMeta.of(f.counts, 0.15, p.material), f.counts)
    noise = np.random.default_rng(0).poisson(20, (256, 256)).astype(np.uint16)
    ctx = p.run(noise, 0.15, scan)
    assert ctx.extras["ood"]["alarm"] and ctx.targets == []
    assert math.isfinite(frame_features(ctx, "classical")["nn_cv"])
    # uncertain columns are never targets
    pol = VacancyLinePolicy(4, max_uncertainty=0.0)
    ctx = frame_path("classical", "MoS2").run(f.counts, 0.15)
    assert pol.select(ctx.columns, scan, ctx.bonds, np.ones(len(ctx.columns))) == []


def test_periodic_resampling_of_a_cell_image_is_exact():
    from beamloop.edge.sim.multislice import CellImage, Optics, _upsampled, render_frame

    for n in (27, 28):  # odd and even sizes
        x = np.arange(n) / n
        img = np.cos(2 * np.pi * 3 * x)[:, None] * np.ones((1, 5))
        xx = np.arange(4 * n) / (4 * n)
        assert np.abs(_upsampled(img, 4)[:, 0] - np.cos(2 * np.pi * 3 * xx)).max() < 1e-9
    # a cell with one Gaussian column: the resampled frame's peaks lie on the reported truth
    lx, ly = 3.0, 3.6
    g = np.indices((36, 30))
    d2 = ((g[1] * 0.1 - 1.0 + lx / 2) % lx - lx / 2) ** 2 + ((g[0] * 0.1 - 1.2 + ly / 2) % ly - ly / 2) ** 2
    cell = CellImage(np.exp(-d2 / (2 * 0.35**2)), (lx, ly), np.array([[1.0, 1.2]]), np.array(["X1"]), "test",
                     Optics(), 1.0)
    rf = render_frame(cell, (96, 96), 0.15, np.random.default_rng(3), distortion_scale=0.0)
    cols = ColumnFinder(FinderConfig.for_spacing(20.0, 2.3)).find(rf.expected)
    fi, _, d = match(cols.xy, rf.truth_xy, 2.0)
    inside = ((rf.truth_xy > 4) & (rf.truth_xy < 91)).all(axis=1).sum()
    assert len(fi) >= inside and np.median(d) < 0.1


def test_acquisition_and_detector_models_keep_the_targets_consistent():
    from beamloop.edge.learn import dataset as ds

    ts = ds.build_tileset(3, (64, 64), seed=5, progress=False)
    rng = np.random.default_rng(0)
    for k in range(3):
        for _ in range(5):
            exp, cols = ds.acquisition_model(ts.expected[k].astype(np.float64), ts.tile_columns(k),
                                             float(ts.pixel_size_A[k]), rng)
            assert exp.shape == (64, 64) and np.isfinite(exp).all() and (exp >= 0).all()
            assert cols.shape == ts.tile_columns(k).shape and (cols[:, 3] >= 0).all()
            img = ds.detector_model(rng.poisson(exp * 50).astype(np.float64), exp * 50, rng)
            assert img.shape == (64, 64) and np.isfinite(img).all()


def test_find_writes_the_ood_report_and_per_column_uncertainty(tmp_path):
    import json

    from beamloop.edge.cli import main

    f = mos2_frame(shape=(128, 128), seed=4)
    np.save(tmp_path / "frame.npy", f.counts)
    assert main(["find", str(tmp_path / "frame.npy"), "--out", str(tmp_path)]) == 0
    table, header = read_csv(tmp_path / "frame_columns.csv")
    assert header[-2:] == ["near_edge", "uncertainty"] and len(table) > 50
    doc = json.loads((tmp_path / "frame_ood.json").read_text())
    assert {"score", "alarm", "features", "period_px", "threshold_snr"} <= set(doc)
    assert doc["period_px"] == pytest.approx(21.0, rel=0.1)  # MoS2 a = 3.16 A at 0.15 A/px, estimated


def test_training_tiles_from_a_second_simulator_and_export_defaults(tmp_path):
    from beamloop.edge.learn import dataset as ds
    from beamloop.edge.learn.cli import default_export_dir
    from beamloop.edge.sim.multislice import CellImage, Optics
    from beamloop.edge.stages.unet import default_model_dir

    g = np.indices((36, 30))
    d2 = ((g[1] * 0.1 - 1.0 + 1.5) % 3.0 - 1.5) ** 2 + ((g[0] * 0.1 - 1.2 + 1.8) % 3.6 - 1.8) ** 2
    cell = CellImage(1e-3 * np.exp(-d2 / (2 * 0.35**2)), (3.0, 3.6), np.array([[1.0, 1.2]]), np.array(["X1"]),
                     "test", Optics(), 1.0)
    ts = ds.build_tileset(4, (64, 64), seed=1, progress=False, cells=[cell], multislice_fraction=0.5)
    assert list(ts.structures[2:]) == ["test/abtem", "test/abtem"]
    cols = ts.tile_columns(3)
    assert len(cols) > 5 and np.all(cols[:, 2] == ds.GENERIC_CLASS) and np.all(cols[:, 3] > 0)
    with pytest.raises(ValueError, match="needs abTEM cell images"):
        ds.build_tileset(2, (64, 64), multislice_fraction=0.5, progress=False)
    # training never writes into the package unless asked (--ship)
    assert default_export_dir(tmp_path) == tmp_path / "model" and default_export_dir(tmp_path) != default_model_dir()
