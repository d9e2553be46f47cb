"""Scalarizers against known answers: power-law background, edge integrals, CoM of a shifted disc, virtual
detectors, the plugin registry."""

from __future__ import annotations

import math

import numpy as np
import pytest

from beamloop.edge.analysis import scalarize as sc


def _disc(shape=(64, 64), centre=(31.5, 31.5), radius=10.0, value=100.0) -> np.ndarray:
    """A uniform disc, each pixel weighted by its area inside (8x8 supersampling)."""
    sub = 8
    yy, xx = np.mgrid[0:shape[0] * sub, 0:shape[1] * sub]
    inside = np.hypot((yy + 0.5) / sub - 0.5 - centre[0], (xx + 0.5) / sub - 0.5 - centre[1]) <= radius
    return value * inside.reshape(shape[0], sub, shape[1], sub).mean(axis=(1, 3))


def test_com_of_shifted_disc():
    p = _disc(centre=(31.5 + 3.25, 31.5 - 2.0))
    dr, dc = sc.com_vector(p)
    assert dr == pytest.approx(3.25, abs=0.02) and dc == pytest.approx(-2.0, abs=0.02)
    assert sc.com_magnitude(p) == pytest.approx(math.hypot(3.25, 2.0), abs=0.02)
    assert sc.com_direction(p) == pytest.approx(math.atan2(3.25, -2.0), abs=0.01)
    assert sc.com_magnitude(_disc()) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(sc.com_magnitude(np.zeros((8, 8))))
    with pytest.raises(ValueError, match="2-D"):
        sc.com_magnitude(np.zeros(8))


def test_bf_adf_ratio_known_counts():
    p = np.zeros((96, 96))
    c = (47.5, 47.5)
    yy, xx = np.mgrid[0:96, 0:96]
    r = np.hypot(yy - c[0], xx - c[1])
    p[r <= 16] = 2.0
    p[(r > 20) & (r <= 48)] = 0.5
    want = 2.0 * (r <= 16).sum() / (0.5 * ((r > 20) & (r <= 48)).sum())
    assert sc.bf_adf_ratio(p) == pytest.approx(want)
    with pytest.raises(ValueError):
        sc.bf_adf_ratio(p, bf_radius_px=30.0, adf_inner_px=20.0)


def test_power_law_fit_recovers_exponent():
    e = sc.energy_axis(400, 130.0, 0.25)
    lam = 5e3 * (e / 130.0) ** -3.2
    rng = np.random.default_rng(0)
    counts = rng.poisson(lam)
    a, r = sc.fit_power_law(e, counts, (130.0, 160.0))
    assert r == pytest.approx(3.2, abs=0.05)
    assert a * 150.0 ** -r == pytest.approx(5e3 * (150.0 / 130.0) ** -3.2, rel=0.01)
    with pytest.raises(ValueError, match="channels"):
        sc.fit_power_law(e, counts, (10.0, 20.0))


def test_edge_integral_after_background_subtraction():
    """Background A E^-r plus a step edge of known counts: the integral recovers the edge's counts."""
    e = sc.energy_axis(512, 130.0, 0.25)
    bg = 4e3 * (e / 130.0) ** -3.0
    edge = sc.EDGES["S_L2,3"]
    step = np.where(e >= edge.onset_eV, 400.0 * (e / edge.onset_eV) ** -2.0, 0.0)
    lo, hi = edge.integral_eV
    want = float(step[(e >= lo) & (e <= hi)].sum())
    got = sc.edge_integral(e, bg + step, edge)
    assert got == pytest.approx(want, rel=0.01)
    rng = np.random.default_rng(1)
    noisy = [sc.edge_integral(e, rng.poisson(bg + step), edge) for _ in range(20)]
    assert np.mean(noisy) == pytest.approx(want, rel=0.03)
    assert sc.edge_integral(e, bg, edge) == pytest.approx(0.0, abs=1e-6 * bg.sum())


def test_edge_onset_of_a_step():
    e = sc.energy_axis(512, 130.0, 0.25)
    edge = sc.EDGES["S_L2,3"]
    bg = 4e3 * (e / 130.0) ** -3.0
    for e0 in (164.0, 165.0, 165.7):
        s = bg + np.where(e >= e0, 200.0, 0.0)
        assert sc.edge_onset(e, s, edge) == pytest.approx(e0, abs=0.15)
    assert math.isnan(sc.edge_onset(e, bg, edge))


def test_registry_binds_and_refuses():
    assert {"com_magnitude", "com_direction", "bf_adf_ratio", "adf_mean", "eels_edge_integral",
            "eels_edge_ratio", "eels_onset", "eels_white_line_ratio"} <= set(sc.scalarizer_names())
    b = sc.make_scalarizer("eels_edge_integral", edge="Mo_M4,5")
    assert b.kind == "spectrum" and b.units == "counts" and b.settings["edge"] == "Mo_M4,5"
    assert b.describe()["name"] == "eels_edge_integral"
    with pytest.raises(KeyError, match="registered"):
        sc.make_scalarizer("nope")
    with pytest.raises(TypeError):
        sc.make_scalarizer("com_magnitude", radius=3)
    with pytest.raises(ValueError, match="already"):
        sc.register_scalarizer("adf_mean", "adf", "counts", "twice")(lambda x: 0.0)
    with pytest.raises(ValueError, match="kind"):
        sc.register_scalarizer("x_new", "image", "1", "bad kind")
    assert sc.make_scalarizer("adf_mean").many(np.arange(6.0).reshape(3, 2)).tolist() == [0.5, 2.5, 4.5]


def test_edge_ratio_needs_a_denominator():
    e = sc.energy_axis(512, 130.0, 0.25)
    bg = 4e3 * (e / 130.0) ** -3.0
    s_edge = np.where(e >= 165.0, 200.0 * (e / 165.0) ** -2.0, 0.0)
    mo_edge = np.where(e >= 227.0, 100.0 * (e / 227.0) ** -2.0, 0.0)
    both = sc.eels_edge_ratio(bg + s_edge + mo_edge)
    want = (sc.edge_integral(e, s_edge + bg, sc.EDGES["S_L2,3"])
            / sc.edge_integral(e, mo_edge + bg, sc.EDGES["Mo_M4,5"]))
    assert both == pytest.approx(want, rel=0.02)
    assert math.isnan(sc.eels_edge_ratio(bg + s_edge))


def test_white_line_ratio_of_simulated_lines():
    """Ti L2,3 of the simulator at L3/L2 = 0.85 and 1.35: the measured ratio follows, and a spectrum without
    the edge gives nan rather than an outlier."""
    from beamloop.edge.sim import eels, structures

    spec = structures.srtio3_001((-12.0, 12.0, -12.0, 12.0))
    idx = np.flatnonzero(spec.site == 1)
    k = idx[np.argmin(np.hypot(*spec.xy[idx].T))]
    got = []
    for r in (0.85, 1.35):
        base = eels.MATERIALS["SrTiO3"]
        ti = [e for e in base.edges if e.name == "Ti_L2,3"][0]
        mat = eels.EELSMaterial("t", (eels.EdgeModel(**{**ti.__dict__, "ratio": r}),), base.spectrometer,
                                base.background, base.background_exponent, base.probe_sigma_A)
        s = eels.EELSModel(spec, mat).expected(spec.xy[[k], 0], spec.xy[[k], 1])[0] * 1e8
        got.append(sc.eels_white_line_ratio(s))
    assert got[1] > got[0] + 0.3
    e = sc.energy_axis(768, 400.0, 0.25)
    assert math.isnan(sc.eels_white_line_ratio(np.random.default_rng(0).poisson(3e3 * (e / 400.0) ** -3.5)))
