"""The simulator: lattice geometry, profiles, rendering, distortion, noise and the parked-probe physics."""

import math

import numpy as np
import pytest

from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.physics import electrons_per_second
from beamloop.edge.sim import distortion as dist
from beamloop.edge.sim import lattice, profiles
from beamloop.edge.sim.frames import FrameSimulator, mos2_frame
from beamloop.edge.sim.render import ColumnRenderer


def test_mos2_geometry():
    sp = lattice.mos2((-10, 10, -10, 10))
    mo = sp.xy[sp.site == 0]
    s = sp.xy[sp.site == 1]
    from scipy.spatial import cKDTree

    d, _ = cKDTree(s).query(mo)
    assert np.allclose(d, 3.16 / math.sqrt(3), atol=1e-9)
    d2, _ = cKDTree(mo).query(mo, k=2)
    assert np.allclose(d2[:, 1], 3.16, atol=1e-9)
    assert set(sp.classes()) == {0, 1}


def test_point_defects_change_classes():
    sp = lattice.mos2((-30, 30, -30, 30))
    rng = np.random.default_rng(0)
    lattice.add_point_defects(sp, rng, s_mono=0.2, s_di=0.1, mo_vacancy=0.1)
    cls = sp.classes()
    n_s = (sp.site == 1).sum()
    assert 0.12 < (cls == 2).sum() / n_s < 0.28
    assert ((cls == 3) & (sp.site == 1)).sum() > 0 and ((cls == 3) & (sp.site == 0)).sum() > 0
    with pytest.raises(ValueError):
        lattice.add_point_defects(sp, rng, s_mono=0.8, s_di=0.5)


def test_profile_ratio_and_blur_preserves_integral():
    tab0 = profiles.profile_table(("Mo", "S"), blur_sigma_A=0.0)
    assert tab0.table[0, 0] / tab0.table[1, 0] == pytest.approx(5.6, rel=0.01)
    tab = profiles.profile_table(("Mo", "S"), blur_sigma_A=0.25)
    r0 = np.arange(tab0.table.shape[1]) * tab0.dr
    r1 = np.arange(tab.table.shape[1]) * tab.dr
    for k in range(2):
        i0 = np.trapezoid(2 * math.pi * r0 * tab0.table[k], r0)
        i1 = np.trapezoid(2 * math.pi * r1 * tab.table[k], r1)
        assert i1 == pytest.approx(i0, rel=0.02)  # blurring moves signal, it does not create or lose it
    assert tab.table[0, 0] < tab0.table[0, 0]


def test_render_single_atom_matches_profile():
    sp = lattice.Specimen(np.array([[0.0, 0.0]]), ("Mo", "S"), np.array([[1, 0]], np.int16), np.array([0], np.int8),
                          ("Mo", "S2"), "MoS2", 1.8)
    tab = profiles.profile_table(("Mo", "S"))
    r = np.linspace(0, 3, 31)
    got = ColumnRenderer(sp, tab).expected(r[None, :], np.zeros((1, 31)))[0]
    assert np.allclose(got, tab.value("Mo", r), rtol=1e-9, atol=1e-12)


def test_no_distortion_puts_columns_at_nominal_pixels():
    scan = ScanFrame(1, (64, 80), (1.0, 1.2), rotation_deg=20.0)
    xy = np.array([[0.0, 0.0], [1.5, -2.0]])
    app = dist.apparent_positions(scan, dist.ScanDistortion(), xy)
    fx, fy = scan.fraction_of_specimen(xy[:, 0], xy[:, 1])
    px, py = scan.pixel_of_fraction(fx, fy)
    assert np.allclose(app, np.stack([px, py], 1))
    assert np.allclose(app[0], [39.5, 31.5])  # the specimen origin sits at the frame centre


def test_drift_moves_apparent_positions_consistently():
    """A column appears where the distorted probe actually met it."""
    scan = ScanFrame(1, (128, 128), (2.0, 2.0), dwell_us=10.0)
    d = dist.ScanDistortion(drift_A_per_s=(2.0, -1.0), wobble_A=0.2, wobble_hz=50.0)
    xy = np.array([[3.0, -4.0]])
    app = dist.apparent_positions(scan, d, xy)
    x, y = dist.specimen_of_pixel(scan, d, app[:, 0], app[:, 1])
    assert np.allclose([x[0], y[0]], xy[0], atol=1e-6)


def test_poisson_counts_follow_the_dose():
    fr = mos2_frame(dose_e_per_A2=1e6, seed=1, distortion_scale=0.0, defects=False)
    e_per_px = 1e6 * 0.15**2
    sp = lattice.mos2((-30, 30, -30, 30), rotation_deg=0.0)
    sim = FrameSimulator(sp, np.random.default_rng(0), distortion_scale=0.0)
    expected = sim.renderer.expected(*dist.probe_positions(fr.scan, dist.ScanDistortion(), np.random.default_rng(0)))
    # mean counts = (expected fraction + background) x electrons per pixel, for the same lattice density
    assert fr.counts.mean() == pytest.approx((expected.mean() + 2e-5) * e_per_px, rel=0.05)
    assert fr.dose_e_per_A2 == pytest.approx(1e6)


def test_electrons_per_second():
    assert electrons_per_second(1.0) == pytest.approx(6.2415e6, rel=1e-4)
