"""The EELS simulator against known answers: edge energies recovered from its spectra, Poisson statistics,
coordination deficit of a perfect crystal and next to a vacancy, the fine structure's response."""

from __future__ import annotations

import math

import numpy as np
import pytest

from beamloop.edge.analysis import scalarize as sc
from beamloop.edge.sim import eels, lattice, structures

EXTENT = (-15.0, 15.0, -15.0, 15.0)


def _centre_column(spec, site: int) -> int:
    idx = np.flatnonzero(spec.site == site)
    return int(idx[np.argmin(np.hypot(*spec.xy[idx].T))])


def test_perfect_crystal_has_no_deficit():
    for spec in (lattice.mos2(EXTENT), structures.srtio3_001(EXTENT)):
        d = eels.coordination_deficit(spec)
        inner = (np.abs(spec.xy) < 8).all(axis=1)
        assert d[inner].max() == pytest.approx(0.0, abs=1e-12)


def test_vacancy_raises_deficit_of_its_neighbours_and_shifts_the_onset():
    spec = lattice.mos2(EXTENT)
    j = _centre_column(spec, site=1)
    spec.counts[j, spec.elements.index("S")] = 0  # an S di-vacancy
    m = eels.EELSModel(spec, "MoS2")
    dist = np.hypot(*(spec.xy - spec.xy[j]).T)
    nb = np.argsort(dist)[1:4]  # its three Mo neighbours
    far = (dist > 8.0) & (np.abs(spec.xy) < 8).all(axis=1)
    assert (m.deficit[nb] > 0.05).all() and m.deficit[far].max() == pytest.approx(0.0, abs=1e-12)
    perfect = eels.EELSModel(lattice.mos2(EXTENT), "MoS2")
    e = m.spectrometer.energy_eV
    x, y = spec.xy[nb[:1], 0], spec.xy[nb[:1], 1]
    shift = m.fine_structure(x, y)["S_L2,3_shift_eV"][0]
    assert shift < -0.3
    on_defect = sc.edge_onset(e, m.expected(x, y)[0] * 1e7, sc.EDGES["S_L2,3"])
    on_perfect = sc.edge_onset(e, perfect.expected(x, y)[0] * 1e7, sc.EDGES["S_L2,3"])
    assert on_defect - on_perfect == pytest.approx(shift, abs=0.35)


def test_edge_energies_recovered_from_simulated_spectra():
    """Pure steps (no near-edge peaks): the step-equivalent onset is the edge energy; a spin-orbit doublet of
    2:1 steps puts it a third of the splitting above L3."""
    spec = structures.srtio3_001(EXTENT)
    o_k = eels.EdgeModel("O_K", "O", "sawtooth", 5e-7, decay=2.5)
    mat = eels.EELSMaterial("t", (o_k,), eels.Spectrometer(480.0, 0.1, 1024, 0.5), 2.5e-5, 3.5, 0.8)
    m = eels.EELSModel(spec, mat)
    k = _centre_column(spec, site=2)
    x, y = spec.xy[[k], 0], spec.xy[[k], 1]
    onset = sc.edge_onset(m.spectrometer.energy_eV, m.expected(x, y)[0] * 1e9, sc.EDGES["O_K"])
    assert onset == pytest.approx(532.0, abs=0.1)

    mos2 = lattice.mos2(EXTENT)
    s_l = eels.EdgeModel("S_L2,3", "S", "sawtooth", 2.5e-5, decay=2.5)
    m2 = eels.EELSModel(mos2, eels.EELSMaterial("t", (s_l,), eels.Spectrometer(), 4e-5, 3.0, 1.0))
    k = _centre_column(mos2, site=1)
    x, y = mos2.xy[[k], 0], mos2.xy[[k], 1]
    onset = sc.edge_onset(m2.spectrometer.energy_eV, m2.expected(x, y)[0] * 1e7, sc.EDGES["S_L2,3"])
    assert onset == pytest.approx(165.0 + sc.EDGES["S_L2,3"].spin_orbit_eV / 3, abs=0.2)


def test_nominal_edges_and_spectrometer():
    assert sc.EDGES["S_L2,3"].onset_eV == 165.0 and sc.EDGES["Mo_M4,5"].onset_eV == 227.0
    assert sc.EDGES["Ti_L2,3"].onset_eV == 456.0 and sc.EDGES["O_K"].onset_eV == 532.0
    sp = eels.Spectrometer(130.0, 0.25, 512, 0.8)
    assert sp.energy_eV[0] == 130.0 and sp.energy_eV[-1] == pytest.approx(130.0 + 0.25 * 511)
    with pytest.raises(ValueError):
        eels.Spectrometer(channels=4)
    with pytest.raises(ValueError, match="shape"):
        eels.EdgeModel("O_K", "O", "lorentz", 1.0)
    with pytest.raises(KeyError, match="needs element"):
        eels.EELSModel(lattice.mos2(EXTENT), "SrTiO3")


def test_spectra_are_poisson_around_the_expectation():
    spec = lattice.mos2(EXTENT)
    m = eels.EELSModel(spec, "MoS2")
    x = np.zeros(400)
    lam = m.expected(x[:1], x[:1])[0] * 1e7
    counts = m.spectra(x, x, 1e7, np.random.default_rng(0))
    assert counts.dtype == np.uint32 and counts.shape == (400, m.spectrometer.channels)
    mean, var = counts.mean(0), counts.var(0)
    big = lam > 50
    assert np.allclose(mean[big], lam[big], rtol=0.05)
    assert np.median(var[big] / lam[big]) == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="electrons"):
        m.spectra(x, x, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="finite"):
        m.expected(np.array([math.nan]), np.array([0.0]))


def test_resolution_blurs_a_white_line():
    spec = structures.srtio3_001(EXTENT)
    k = _centre_column(spec, site=1)
    x, y = spec.xy[[k], 0], spec.xy[[k], 1]
    widths = []
    for res in (0.3, 1.5):
        mat = eels.MATERIALS["SrTiO3"]
        m = eels.EELSModel(spec, mat, spectrometer=eels.Spectrometer(400.0, 0.1, 1024, res))
        s = m.expected(x, y)[0]
        e = m.spectrometer.energy_eV
        win = (e > 455) & (e < 460)
        peak = s[win].max()
        base = s[(e > 452) & (e < 454)].mean()
        widths.append(((s[win] - base) > 0.5 * (peak - base)).sum() * 0.1)
    assert widths[1] > widths[0] + 0.5
