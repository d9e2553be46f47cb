"""Training side of the learned finder (edge/learn/): data, targets, augmentation, model, ONNX export."""

import math

import numpy as np
import pytest

from beamloop.edge.learn import dataset as ds
from beamloop.edge.stages.unet import HEAT_SIGMA_PX, SEG_CLASSES, normalise_frame


def test_column_snr_matches_the_matched_filter_formula():
    cols = np.array([[0, 0, 0, 0.004, 0.01, 2.0]], np.float32)
    ne = 250.0
    expect = 0.004 * 2.0 * math.sqrt(math.pi * ne / 0.01)
    assert ds.column_snr(cols, ne)[0] == pytest.approx(expect, rel=1e-5)
    # four times the dose doubles the SNR
    assert ds.column_snr(cols, 4 * ne)[0] == pytest.approx(2 * expect, rel=1e-5)


def test_targets_heat_classes_and_ignore_mask():
    cols = np.array([
        [10.0, 12.0, 0, 0, 0, 0],    # target, class Mo
        [30.3, 20.0, 3, 0, 0, 0],    # target, generic column, off-grid x
        [50.0, 40.0, 1, 0, 0, 0],    # too faint to ask for: ignored
        [20.0, 50.0, -1, 0, 0, 0],   # vacancy site: never a target
    ], np.float32)
    snr = np.array([5.0, 5.0, 0.5 * (ds.SNR_IGNORE + ds.SNR_VISIBLE), 9.0])
    heat, weight, cmap = ds.draw_targets(cols, snr, (64, 64))
    assert heat[12, 10] == pytest.approx(1.0)
    assert heat[20, 30] == pytest.approx(math.exp(-0.3 ** 2 / (2 * HEAT_SIGMA_PX ** 2)), rel=1e-5)
    assert heat[12, 11] == pytest.approx(math.exp(-1 / (2 * HEAT_SIGMA_PX ** 2)), rel=1e-5)
    assert cmap[12, 10] == 0 and cmap[20, 30] == 3 and cmap[40, 50] == -1 and cmap[50, 20] == -1
    assert heat[40, 50] == 0 and weight[40, 50] == 0 and weight[12, 10] == 1
    assert heat[50, 20] == 0 and weight[50, 20] == 1
    # flips mirror the targets
    hf, _, cf = ds.draw_targets(cols, snr, (64, 64), flip_x=True, flip_y=True)
    assert hf[63 - 12, 63 - 10] == pytest.approx(1.0) and cf[63 - 12, 63 - 10] == 0


def test_rendered_tile_truth_matches_the_image():
    """Columns of a bright noise-free tile sit on local maxima of the expected signal."""
    rng = np.random.default_rng(1)
    cfg = ds.sample_tile_config(rng, {"Au[110]": 1.0})
    cfg = ds.TileConfig(**{**cfg.__dict__, "pixel_size_A": 0.12, "distortion_scale": 0.0, "bicrystal": False,
                           "hole": False, "smooth_background": 0.0, "vacancy": 0.0, "partial": 0.0,
                           "substitution": 0.0})
    expected, cols = ds.render_tile(cfg, (96, 96))
    assert expected.shape == (96, 96) and expected.dtype == np.float32
    assert (cols[:, 2] == SEG_CLASSES.index("column")).all()
    inner = cols[(cols[:, :2].min(axis=1) > 4) & (cols[:, :2].max(axis=1) < 91)]
    assert len(inner) > 10
    for x, y in inner[:, :2]:
        i, j = int(round(y)), int(round(x))
        win = expected[i - 2:i + 3, j - 2:j + 3]
        di, dj = np.unravel_index(np.argmax(win), win.shape)
        assert abs(di - 2) <= 1 and abs(dj - 2) <= 1
    assert (cols[:, 3] > 0).all() and (cols[:, 5] > 1).all()


def test_mos2_tiles_carry_their_classes():
    rng = np.random.default_rng(7)
    cfg = ds.sample_tile_config(rng, {"MoS2": 1.0})
    _, cols = ds.render_tile(cfg, (96, 96))
    cls = cols[:, 2].astype(int)
    mo, s2 = (cls == 0).sum(), (cls == 1).sum()
    assert mo > 5 and 0.7 < s2 / mo < 1.3 and set(cls) <= {-1, 0, 1, 2}
    assert cols[cls == 0, 3].min() > cols[cls == 1, 3].max()  # Mo brighter than S2


def test_tileset_roundtrip_and_augmented_batches(tmp_path):
    ts = ds.build_tileset(6, (64, 64), seed=2, progress=False)
    path = ts.save(tmp_path / "t.npz")
    back = ds.TileSet.load(path)
    assert np.array_equal(back.expected, ts.expected) and np.array_equal(back.columns, ts.columns)
    assert len(back) == 6 and back.offsets[-1] == len(back.columns)
    aug = ds.Augmenter(back, np.random.default_rng(0))
    x, h, w, c = aug.batch([0, 1, 2, 3])
    assert x.shape == (4, 1, 64, 64) and h.shape == w.shape == x.shape and c.shape == (4, 64, 64)
    assert x.dtype == np.float32 and np.allclose(x.mean(axis=(1, 2, 3)), 0, atol=1e-4)
    for k in range(4):
        if x[k].std() > 0:
            assert x[k].std() == pytest.approx(1.0, rel=1e-3)
    assert ((h >= 0) & (h <= 1)).all() and set(np.unique(w)) <= {0.0, 1.0}


def test_normalise_frame():
    f = np.arange(12, dtype=np.uint16).reshape(3, 4)
    n = normalise_frame(f)
    ref = (f - f.mean()) / f.std()
    assert np.allclose(n, ref, atol=1e-6)
    assert not normalise_frame(np.full((4, 4), 7.0)).any()  # flat frame: zeros, no division by zero


torch = pytest.importorskip("torch")


def test_fused_batchnorm_and_onnx_export_match_torch(tmp_path):
    """The exported ensemble (BN folded) computes what the torch members compute, in ONNX Runtime."""
    import onnxruntime as ort

    from beamloop.edge.learn import export
    from beamloop.edge.learn.model import Ensemble, UNet, fuse_batchnorm

    torch.manual_seed(0)
    members = []
    for _ in range(2):
        m = UNet()
        m.train()
        with torch.no_grad():  # give the batch norms non-trivial running statistics
            for _ in range(3):
                m(torch.randn(2, 1, 64, 64))
        members.append(m.eval())
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ref_heat, ref_cls = Ensemble(members)(x)
        fused = fuse_batchnorm(members[0])
        assert torch.allclose(fused(x), members[0](x), atol=1e-4)
    path = export.export_fp32(members, tmp_path / "e.onnx", tile=64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    heat, cls = sess.run(["heat", "classes"], {"image": x.numpy()})
    assert heat.shape == (1, 2, 64, 64) and cls.shape == (1, len(SEG_CLASSES), 64, 64)
    assert np.allclose(heat, ref_heat.numpy(), atol=1e-4) and np.allclose(cls, ref_cls.numpy(), atol=1e-4)
    assert np.allclose(cls.sum(axis=1), 1, atol=1e-5)
    import onnx

    model = onnx.load(str(path))
    assert model.opset_import[0].version >= 17
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)


@pytest.mark.slow
def test_train_and_export_smoke(tmp_path):
    """`beamloop train` end to end on a toy budget: weights, history, curve, ONNX files, manifest."""
    from beamloop.edge.cli import main

    rc = main(["train", "--out", str(tmp_path / "w"), "--members", "2", "--steps", "3", "--tiles", "8",
               "--batch", "2", "--tile", "64", "--to", str(tmp_path / "m"), "--quick-eval", "--quiet",
               "--multislice-fraction", "0"])
    assert rc == 0
    for name in ("member_0.pt", "member_1.pt", "history.json", "training_curve.png", "train.json"):
        assert (tmp_path / "w" / name).is_file()
    import json

    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert man["members"] == 2 and set(man["files"]) == {"fp32", "fp16", "int8"}
    assert set(man["metrics"]) == {"fp32", "fp16", "int8", "classical"}


def test_cramer_rao_bound_of_a_gaussian_spot():
    """Poisson counts of a Gaussian spot of N electrons and width sigma: the Fisher information on a shift is
    N / sigma^2 per axis, so the 2-D bound is sqrt(2) sigma / sqrt(N); background only adds noise."""
    from beamloop.edge.learn.evaluate import cramer_rao_rms_px

    sigma, n = 1.5, 400.0
    yy, xx = np.mgrid[0:41, 0:41]
    spot = n * np.exp(-((xx - 20.3) ** 2 + (yy - 19.8) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
    b = cramer_rao_rms_px(spot + 1e-9, np.array([[20.3, 19.8]]), radius_px=9)
    assert b[0] == pytest.approx(np.sqrt(2) * sigma / np.sqrt(n), rel=0.05)
    worse = cramer_rao_rms_px(spot + 5.0, np.array([[20.3, 19.8]]), radius_px=9)
    assert worse[0] > 1.2 * b[0]
    assert np.isinf(cramer_rao_rms_px(np.full((41, 41), 3.0), np.array([[20.0, 20.0]])))[0]
