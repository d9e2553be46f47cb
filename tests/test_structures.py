"""The other specimens (edge/sim/structures.py): projected geometry, defects, grain boundaries, rendering."""

import math

import numpy as np
import pytest
from scipy.spatial import cKDTree

from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim import lattice, structures
from beamloop.edge.sim.frames import FrameSimulator

BOX = (-20.0, 20.0, -20.0, 20.0)


def nearest(xy):
    d, _ = cKDTree(xy).query(xy, k=2)
    return d[:, 1]


@pytest.mark.parametrize("name, nn", [
    ("WS2", 3.153 / math.sqrt(3)),
    ("MoSe2", 3.288 / math.sqrt(3)),
    ("graphene", 2.46 / math.sqrt(3)),
    ("hBN", 2.504 / math.sqrt(3)),
    ("SrTiO3[001]", 3.905 / 2),
    ("Si[110]", 5.431 / 4),
    ("Au[110]", 4.078 * math.sqrt(3 / 8)),
])
def test_nearest_column_distances(name, nn):
    sp = structures.STRUCTURES[name](BOX, rotation_deg=23.0)
    d = nearest(sp.xy)  # a corner column may have its neighbours outside the box: min and median
    assert d.min() == pytest.approx(nn, abs=2e-3) and np.median(d) == pytest.approx(nn, abs=2e-3)
    assert sp.nn_distance_A == pytest.approx(nn, abs=2e-3)
    assert sp.class_names == structures.GENERIC_CLASSES and set(sp.classes()) == {0}


def test_mos2_is_unchanged_and_keeps_its_classes():
    a = structures.tmd(BOX, "Mo", "S", rotation_deg=11.0, origin_A=(0.4, -0.2))
    b = lattice.mos2(BOX, rotation_deg=11.0, origin_A=(0.4, -0.2))
    assert np.array_equal(a.xy, b.xy) and a.class_names == lattice.MOS2_CLASSES
    doped = structures.tmd(BOX, "Mo", "S", dopants=("W",))
    assert doped.material == "MoS2-doped" and doped.class_names == structures.GENERIC_CLASSES


def test_column_contents():
    sto = structures.srtio3_001(BOX, thickness=7)
    per_site = {k: sto.counts[sto.site == k][0].tolist() for k in range(3)}
    el = sto.elements
    assert per_site[0][el.index("Sr")] == 7 and per_site[1][el.index("Ti")] == 7 and per_site[1][el.index("O")] == 7
    assert per_site[2][el.index("O")] == 7 and per_site[2][el.index("Ti")] == 0
    # Si [110]: each dumbbell is two columns a/4 apart along y ([001]) before rotation
    si = structures.si_110(BOX, thickness=5)
    inner = np.abs(si.xy).max(axis=1) < 15  # partners of edge columns may lie outside the box
    d, j = cKDTree(si.xy).query(si.xy[inner], k=2)
    vec = si.xy[j[:, 1]] - si.xy[inner]
    assert np.allclose(np.abs(vec[:, 0]), 0, atol=1e-9) and np.allclose(np.abs(vec[:, 1]), 5.431 / 4)
    assert (si.counts == 5).all()
    with pytest.raises(ValueError):
        structures.fcc_110(BOX, "Au", thickness=0)


def test_vacancies_partial_and_substitution():
    rng = np.random.default_rng(3)
    sp = structures.fcc_110((-60, 60, -60, 60), "Cu", thickness=10, dopants=("Au",))
    n = len(sp)
    total = int(sp.counts.sum())
    structures.substitute(sp, rng, "Cu", "Au", 0.2)
    au = sp.counts[:, sp.elements.index("Au")]
    assert int(sp.counts.sum()) == total  # substitution conserves atoms
    assert 0.15 < (au > 0).mean() < 0.25
    structures.add_vacancies(sp, rng, 0.1, partial=0.1)
    empty = sp.counts.sum(axis=1) == 0
    thin = (sp.counts.sum(axis=1) > 0) & (sp.counts.sum(axis=1) < 10)
    assert 0.07 < empty.mean() < 0.13 and 0.07 < thin.mean() < 0.13
    assert (sp.classes()[empty] == 1).all() and len(sp) == n
    with pytest.raises(ValueError):
        structures.substitute(sp, rng, "Cu", "Pt", 0.1)
    with pytest.raises(ValueError):
        structures.add_vacancies(sp, rng, 1.5)


def test_hole_and_bicrystal():
    rng = np.random.default_rng(5)
    sp = structures.honeycomb(BOX)
    holed = structures.remove_region(sp, (0.0, 0.0), 6.0)
    assert np.hypot(*holed.xy.T).min() > 6.0 and len(holed) < len(sp)
    bi = structures.bicrystal(structures.STRUCTURES["Au[110]"], BOX, rng, misorientation_deg=30.0, thickness=4)
    assert nearest(bi.xy).min() >= 0.8 * bi.nn_distance_A - 1e-9
    assert len(bi) > 0.8 * len(structures.fcc_110(BOX, "Au"))


def test_rendered_columns_sit_at_the_truth():
    """A thick Si [110] crystal rendered without distortion: the brightest pixel near each dumbbell column is
    within half a pixel plus the pixel grid of the true position."""
    rng = np.random.default_rng(0)
    px = 0.1
    sp = structures.si_110((-20, 20, -20, 20), thickness=20)
    sim = FrameSimulator(sp, rng, distortion_scale=0.0, blur_sigma_A=0.2)
    scan = ScanFrame(0, (160, 160), (1.6, 1.6), dwell_us=1.0)  # 0.1 A/px
    fr = sim.acquire(scan, 1e6 * px * px)
    img = fr.counts.astype(float)
    inner = (fr.truth_xy.min(axis=1) > 5) & (fr.truth_xy.max(axis=1) < 154)
    for x, y in fr.truth_xy[inner]:
        i, j = int(round(y)), int(round(x))
        win = img[i - 2:i + 3, j - 2:j + 3]
        di, dj = np.unravel_index(np.argmax(win), win.shape)
        assert abs(di - 2) <= 1 and abs(dj - 2) <= 1
