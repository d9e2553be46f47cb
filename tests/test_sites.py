"""Lattice-site kernel (edge/kernels/sites.py) and the vacancy stage on it: known honeycombs with known holes."""

import math

import numpy as np
import pytest

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.kernels.smooth import noise_sigma
from beamloop.edge.materials import MOS2
from beamloop.edge.stages.vacancies import vacancy_sites

MO, S2, S1, VAC = (MOS2.class_names.index(c) for c in ("Mo", "S2", "S1", "vacancy"))


def honeycomb(bond_px: float, angle: float, shape=(200, 240), origin=(7.3, 5.1)):
    """Metal and chalcogen sites of a projected MX2 honeycomb (bond length ``bond_px``, first bond at ``angle``)
    covering ``shape`` (rows, cols): positions (n, 2) as (x, y) and classes."""
    a = bond_px * math.sqrt(3.0)
    a1 = a * np.array([math.cos(angle + math.pi / 6), math.sin(angle + math.pi / 6)])
    a2 = a * np.array([math.cos(angle - math.pi / 6), math.sin(angle - math.pi / 6)])
    bond = bond_px * np.array([math.cos(angle), math.sin(angle)])
    n = int(2 * max(shape) / a) + 4
    ij = np.array([(i, j) for i in range(-n, n) for j in range(-n, n)], float)
    metal = origin + ij[:, :1] * a1 + ij[:, 1:] * a2
    chalc = metal + bond
    xy = np.concatenate([metal, chalc])
    cls = np.concatenate([np.full(len(metal), MO), np.full(len(chalc), S2)]).astype(np.int8)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= shape[1] - 1) & (xy[:, 1] >= 0) & (xy[:, 1] <= shape[0] - 1)
    return xy[inside], cls[inside]


def table(xy, cls):
    n = len(xy)
    return ColumnTable(xy[:, 0].astype(np.float32), xy[:, 1].astype(np.float32), np.ones(n, np.float32),
                       np.ones(n, np.float32), cls.astype(np.int8), MOS2.class_names)


@pytest.mark.parametrize("angle", [0.0, 0.37, 1.9])
def test_removed_sites_come_back_as_vacancies_with_the_true_bonds(angle):
    bond = 12.0
    shape = (200, 240)
    xy, cls = honeycomb(bond, angle, shape)
    rng = np.random.default_rng(3)
    # holes well inside the frame, apart from each other (each keeps its three neighbours)
    interior = np.flatnonzero((xy[:, 0] > 3 * bond) & (xy[:, 0] < shape[1] - 3 * bond)
                              & (xy[:, 1] > 3 * bond) & (xy[:, 1] < shape[0] - 3 * bond))
    holes: list[int] = []
    for k in rng.permutation(interior):
        if all(np.hypot(*(xy[k] - xy[h])) > 2.5 * bond for h in holes):
            holes.append(int(k))
        if len(holes) == 8:
            break
    keep = np.ones(len(xy), bool)
    keep[holes] = False
    # one S1 column among the chalcogens: it occupies and predicts like S2
    cls = cls.copy()
    cls[np.flatnonzero(keep & (cls == S2))[5]] = S1
    values = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)
    vac, bonds = vacancy_sites(table(xy[keep], cls[keep]), values, bond, min_support=3)
    # bonds: the three true directions (120 degrees apart) and length, in any order
    true = np.array([[bond * math.cos(angle + b * 2 * math.pi / 3), bond * math.sin(angle + b * 2 * math.pi / 3)]
                     for b in range(3)])
    for t in true:
        assert np.min(np.hypot(*(bonds - t).T)) < 1e-3
    found = np.stack([vac.x, vac.y], axis=1)
    assert len(vac) == len(holes)
    for h in holes:
        d = np.hypot(*(found - xy[h]).T)
        assert d.min() < 1e-3
    assert np.all(vac.score == 3) and np.all(vac.cls == VAC)
    ii, jj = np.rint(vac.y).astype(int), np.rint(vac.x).astype(int)
    assert np.array_equal(vac.intensity, values[ii, jj])


def test_full_lattice_has_no_vacancy_and_too_few_bonds_give_none():
    xy, cls = honeycomb(10.0, 0.2)
    vac, bonds = vacancy_sites(table(xy, cls), np.zeros((200, 240), np.float32), 10.0)
    assert len(vac) == 0 and bonds is not None
    only_metal = cls == MO
    vac, bonds = vacancy_sites(table(xy[only_metal], cls[only_metal]), np.zeros((200, 240), np.float32), 10.0)
    assert bonds is None and len(vac) == 0


def test_columns_spread_far_apart_keep_exact_neighbour_queries():
    # two patches 10^5 px apart: the grid would need more cells than its scratch allows, and coarser cells
    # must still find every bond and hole
    xy, cls = honeycomb(10.0, 0.0, shape=(80, 80))
    far = xy + np.array([1e5, 0.0])
    values = np.zeros((80, 100_080), np.float32)
    both = np.concatenate([xy, far])
    both_cls = np.concatenate([cls, cls])
    centre = np.argmin(np.hypot(xy[:, 0] - 40, xy[:, 1] - 40))
    keep = np.ones(len(both), bool)
    keep[centre] = False
    vac, bonds = vacancy_sites(table(both[keep], both_cls[keep]), values, 10.0, min_support=3)
    assert bonds is not None
    assert len(vac) == 1 and np.hypot(vac.x[0] - xy[centre, 0], vac.y[0] - xy[centre, 1]) < 1e-3


def test_noise_sigma_separable_is_exact_on_integer_frames():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 65535, (64, 50)).astype(np.uint16)
    ref = 0.0
    f = img.astype(np.float64)
    for i in range(1, 63, 2):
        for j in range(1, 49):
            ref += abs(f[i - 1, j - 1] - 2 * f[i - 1, j] + f[i - 1, j + 1] - 2 * f[i, j - 1] + 4 * f[i, j]
                       - 2 * f[i, j + 1] + f[i + 1, j - 1] - 2 * f[i + 1, j] + f[i + 1, j + 1])
    expected = math.sqrt(math.pi / 2) * ref / (6.0 * 31 * 48)
    assert noise_sigma(img, 2) == expected
    assert noise_sigma(img, 2, np.empty((3, 50))) == expected
