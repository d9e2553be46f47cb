"""Class kernels (edge/kernels/classes.py): the same bins, Otsu threshold and MoS2 classes as their numpy form."""

import math

import numpy as np

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.kernels.classes import uniform_edges
from beamloop.edge.stages.classify import classify_mos2, otsu_threshold


def numpy_classes(intensity):
    """The numpy form: numpy.histogram, Otsu's between-class variance, numpy.median."""
    n = len(intensity)
    cls = np.full(n, 1, np.int8)
    if n < 4:
        return cls
    logi = np.log(np.maximum(intensity.astype(float), 1e-12))
    hist, edges = np.histogram(logi, bins=64)
    centres = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / (w0 * (w0[-1] - w0))
    between[~np.isfinite(between)] = -1
    split = float(centres[int(np.argmax(between))] + 0.5 * (edges[1] - edges[0]))
    cls[logi > split] = 0
    s = logi <= split
    if s.any():
        cls[s & (logi < float(np.median(logi[s])) - 0.5 * math.log(2.0))] = 2
    return cls, split


def test_classes_and_edges_equal_the_numpy_form_on_random_heights():
    rng = np.random.default_rng(7)
    for t in range(600):
        n = int(rng.integers(4, 2000))
        kind = t % 4
        if kind == 0:
            h = rng.gamma(2, 1, n)
        elif kind == 1:  # three MoS2-like modes
            h = np.concatenate([rng.normal(1, 0.1, n), rng.normal(2, 0.1, n // 2 + 1), rng.normal(2.8, 0.1, n // 3)])
        elif kind == 2:  # ties
            h = rng.integers(0, 4, n).astype(float)
        else:  # constant
            h = np.full(n, 3.3)
        h = h.astype(np.float32)
        z = np.zeros(len(h), np.float32)
        want, split = numpy_classes(h)
        got = classify_mos2(ColumnTable(z, z, h, z, np.zeros(len(h), np.int8))).cls
        assert np.array_equal(got, want)
        logi = np.log(np.maximum(h.astype(float), 1e-12))
        assert otsu_threshold(logi) == split
        e = np.empty(65)
        uniform_edges(float(logi.min()), float(logi.max()), e)
        assert np.array_equal(e, np.histogram(logi, 64)[1])


def test_a_mos2_population_gives_mo_s2_s1():
    # as many Mo as S columns, a few S columns missing one atom (heights 2.8 : 2 : 1, with a spread)
    rng = np.random.default_rng(0)
    h = np.concatenate([rng.normal(2.8, 0.15, 20), rng.normal(2.0, 0.12, 17), rng.normal(1.0, 0.1, 3)])
    h = h.astype(np.float32)
    z = np.zeros(len(h), np.float32)
    cls = classify_mos2(ColumnTable(z, z, h, z, np.zeros(len(h), np.int8))).cls
    assert cls.tolist() == [0] * 20 + [1] * 17 + [2] * 3
