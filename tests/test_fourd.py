"""4D-STEM reductions (virtual detectors, CoM, DPC, iDPC) and the 4D-STEM simulated microscope."""

import numpy as np
import pytest

from beamloop.edge.analysis import live4d
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim import lattice
from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope, bin_patterns, training_patterns

DET = (24, 20)


def test_masks_geometry():
    bf = live4d.disk_mask(DET, 3.0)
    assert bf.dtype == np.float32 and bf.sum() == 32  # pixel centres within 3 px of (11.5, 9.5)
    adf = live4d.annulus_mask(DET, 3.0, 8.0)
    assert not (bf * adf).any()
    q = live4d.quadrant_masks(DET, 2.0, 9.0)
    assert q.shape == (4, *DET) and np.array_equal(q.sum(0), live4d.annulus_mask(DET, 2.0, 9.0))
    assert q[0, 11, 18] == 1 and q[2, 11, 1] == 1 and q[1, 19, 9] == 1 and q[3, 4, 10] == 1  # +x, -x, +y, -y
    with pytest.raises(ValueError):
        live4d.annulus_mask(DET, 5, 5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32])
def test_virtual_and_com_match_numpy(dtype):
    rng = np.random.default_rng(0)
    frames = rng.poisson(4.0, (17, *DET)).astype(dtype)
    w = rng.random(DET).astype(np.float32) * (rng.random(DET) < 0.3)
    masks = {"bf": live4d.disk_mask(DET, 4), "adf": live4d.annulus_mask(DET, 5, 9), "w": w}
    sm = live4d.SparseMasks.from_dense(masks)
    got = live4d.virtual_stack(frames, sm)
    ref = np.stack([(frames.astype(np.float64) * m).sum(axis=(1, 2)) for m in masks.values()], 1)
    assert np.allclose(got, ref, rtol=1e-6)
    com = live4d.com_stack(frames, (11.5, 9.5))
    yy, xx = np.mgrid[0:DET[0], 0:DET[1]]
    f = frames.astype(np.float64)
    s = f.sum(axis=(1, 2))
    assert np.allclose(com[:, 0], s)
    assert np.allclose(com[:, 1], (f * yy).sum(axis=(1, 2)) / s - 11.5)
    assert np.allclose(com[:, 2], (f * xx).sum(axis=(1, 2)) / s - 9.5)


def test_com_of_a_shifted_disk_and_an_empty_frame():
    frames = np.zeros((2, 40, 40), np.uint16)
    frames[0] = live4d.disk_mask((40, 40), 6, centre=(21.5, 17.0)) * 100
    com = live4d.com_stack(frames, (19.5, 19.5))
    assert np.allclose(com[0, 1:], [2.0, -2.5]) and com[1].tolist() == [0.0, 0.0, 0.0]


def test_live_imager_assembles_images_in_raster_order_and_dpc():
    scan = (3, 4)
    n = 12
    frames = np.zeros((n, *DET), np.uint16)
    for i in range(n):
        frames[i, 11, 18] = i  # quadrant A (+x) only
        frames[i, 11, 9] = 1  # centre
    q = live4d.quadrant_masks(DET, 2.0, 9.0)
    im = live4d.LiveImager(scan, {"A": q[0], "B": q[1], "C": q[2], "D": q[3], "bf": live4d.disk_mask(DET, 1.5)},
                          com_centre=(11.5, 9.5), device="cpu")
    order = np.array([5, 0, 11, 3, 1, 2, 4, 6, 7, 8, 9, 10])
    im.update(frames[order[:6]], order[:6])
    assert im.filled == 6 and np.isnan(im.images["A"]).sum() == 6
    im.update(frames[order[6:]], order[6:] + n)  # ids of a repeated scan wrap around
    imgs = im.images
    assert np.array_equal(imgs["A"].ravel(), np.arange(n)) and np.all(imgs["bf"] == 1)
    with np.errstate(invalid="ignore"):
        assert np.allclose(imgs["dpc_x"].ravel()[1:], 1.0) and np.isnan(imgs["dpc_x"].ravel()[0])
    assert np.allclose(imgs["dpc_y"].ravel()[1:], 0.0)
    with pytest.raises(ValueError):
        im.update(frames[:2], np.arange(3))
    with pytest.raises(ValueError):
        live4d.LiveImager(scan, {"bf": live4d.disk_mask((8, 8), 2)}).update(frames[:1], np.arange(1))


def test_integrate_com_recovers_a_potential():
    y, x = np.mgrid[0:64, 0:64]
    phi = np.exp(-((y - 30) ** 2 + (x - 20) ** 2) / 30.0) + 0.5 * np.exp(-((y - 10) ** 2 + (x - 45) ** 2) / 20.0)
    gy, gx = np.gradient(phi)
    rec = live4d.integrate_com(gy, gx, eps=1e-4)
    assert np.corrcoef(rec.ravel(), (phi - phi.mean()).ravel())[0, 1] > 0.99
    with pytest.raises(ValueError):
        live4d.integrate_com(gy * np.nan, gx)


@pytest.mark.skipif(not live4d.cuda_available(), reason="no CUDA device on this machine (numba.cuda)")
def test_cuda_kernels_match_cpu():  # pragma: no cover - needs a CUDA device
    rng = np.random.default_rng(1)
    frames = rng.poisson(4.0, (64, *DET)).astype(np.uint16)
    sm = live4d.SparseMasks.from_dense({"bf": live4d.disk_mask(DET, 4), "adf": live4d.annulus_mask(DET, 5, 9)})
    assert np.allclose(live4d.virtual_stack_cuda(frames, sm), live4d.virtual_stack(frames, sm))
    assert np.allclose(live4d.com_stack_cuda(frames, (11.5, 9.5)), live4d.com_stack(frames, (11.5, 9.5)))


# --- the simulated 4D-STEM microscope ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scan4d():
    spec = lattice.mos2((-12, 12, -12, 12))
    cfg = FourDConfig(detector_shape=(48, 48), disk_radius_px=8, df_width_px=12, max_shift_px=1.0)
    mic = FourDMicroscope(spec, cfg)
    scan = ScanFrame(0, (24, 24), (0.6, 0.6))
    patterns = mic.scan(scan, 20000, np.random.default_rng(0))
    x, y = mic.positions(scan)
    return mic, patterns, mic.labels(x.ravel(), y.ravel())


def test_patterns_conserve_electrons_and_follow_the_sample(scan4d):
    mic, patterns, lab = scan4d
    assert patterns.shape == (24, 24, 48, 48) and patterns.dtype == np.uint16
    exp = mic.expected(np.array([0.0, 1.0]), np.array([0.0, 0.5]))
    assert np.allclose(exp.sum(axis=(1, 2)), 1.0)
    flat = patterns.reshape(-1, 48, 48)
    c = mic.config.centre
    v = live4d.virtual_stack(flat, live4d.SparseMasks.from_dense({"bf": live4d.disk_mask((48, 48), 7, c),
                                                                 "adf": live4d.annulus_mask((48, 48), 10, 24, c)}))
    over = lab["over_column"]
    assert over.any() and (~over).any()
    assert v[over, 0].mean() < v[~over, 0].mean()  # BF darker over columns
    assert v[over, 1].mean() > 3 * v[~over, 1].mean()  # ADF brighter over columns
    assert np.corrcoef(v[:, 1], lab["haadf_fraction"])[0, 1] > 0.9
    com = live4d.com_stack(flat, c)
    for k in (0, 1):
        assert np.corrcoef(com[:, 1 + k], lab["shift_px"][:, k])[0, 1] > 0.9


def test_com_points_towards_the_column():
    spec = lattice.mos2((-6, 6, -6, 6))
    mo = spec.xy[np.argmin(np.hypot(*spec.xy.T) + 100 * (spec.site != 0))]
    mic = FourDMicroscope(spec, FourDConfig(detector_shape=(32, 32), disk_radius_px=6))
    sig = mic.signals(np.array([mo[0] - 0.5, mo[0] + 0.5, mo[0]]), np.array([mo[1], mo[1], mo[1] - 0.5]))
    shift = sig["shift_px"]
    assert shift[0, 1] > 0.1 and shift[1, 1] < -0.1 and shift[2, 0] > 0.1  # towards the Mo column


def test_training_patterns_api():
    p, lab = training_patterns(200, detector_px=16, electrons=3000, seed=1)
    assert p.shape == (200, 16, 16) and p.dtype == np.float32
    assert lab["over_column"].dtype == bool and 0.3 < lab["over_column"].mean() < 0.8
    assert lab["column_class"].dtype == np.int8 and set(np.unique(lab["column_class"])) <= {0, 1, 2, 3}
    assert np.all(lab["distance_A"][lab["over_column"]] <= 0.5 + 1e-9)
    assert np.allclose(p.sum(axis=(1, 2)), 3000, rtol=0.1)
    p2, lab2 = training_patterns(200, detector_px=16, electrons=3000, seed=1)
    assert np.array_equal(p, p2)  # reproducible
    with pytest.raises(ValueError):
        bin_patterns(p, (5, 5))
