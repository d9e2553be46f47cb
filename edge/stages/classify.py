"""The classify stage: Mo / S2 / S1 for MoS2 by column intensity, a generic "column" otherwise.

MoS2 (viewed along [001]) by intensity: the HAADF signal of a column grows with its atoms' Z to a power
of about 1.78 (Mo/S peak ratio 5.6 in abTEM single-atom profiles; cf. Krivanek et al., Nature 464, 571
(2010)), so Mo : S2 : S1 heights stand near 2.8 : 2 : 1 after smoothing. The brightest mode of the
log-height histogram is Mo, split from the S columns by Otsu's threshold; among the S columns, those
below the S2 median divided by sqrt(2) (the geometric midpoint between S2 and S1 = S2/2) are S1.

Empty lattice sites (vacancies) are not found here but inferred from the lattice by the next stage
(:mod:`beamloop.edge.stages.vacancies`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.stage import StageBase
from beamloop.edge.kernels.classes import mos2_classes, otsu_split
from beamloop.edge.materials import GENERIC, MOS2

if TYPE_CHECKING:
    from beamloop.edge.frame.context import FrameContext

MOS2_CLASSES = MOS2.class_names
GENERIC_CLASSES = GENERIC.class_names


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of 1-D ``values`` (maximises the between-class variance of a two-class split).

    N. Otsu, "A threshold selection method from gray-level histograms", IEEE Trans. SMC 9, 62 (1979).
    ``bins`` uniform bins over the values' range, as ``numpy.histogram`` makes them; the threshold is the upper
    edge of the last bin of the lower class (:func:`beamloop.edge.kernels.classes.otsu_split`, one compiled pass).
    Raises ``ValueError`` for fewer than two values.
    """
    v = np.ascontiguousarray(values, np.float64).ravel()
    if v.size < 2:
        raise ValueError("Otsu's threshold needs at least two values")
    return float(otsu_split(v, np.empty(bins + 1, np.float64), np.empty(bins, np.int64)))


def classify_mos2(cols: ColumnTable) -> ColumnTable:
    """Mo / S2 / S1 classes of found MoS2 columns by their heights (see the module docstring).

    Parameters
    ----------
    cols : ColumnTable
        Found columns (heights in ``intensity``, frame units).

    Returns
    -------
    ColumnTable
        The same rows with ``class_names = ("Mo", "S2", "S1", "vacancy")`` and ``cls`` 0, 1 or 2; with
        fewer than 4 columns every column is S2 (too few for a histogram).
    """
    n = len(cols)
    cls = np.full(n, 1, np.int8)
    if n >= 4:
        logi = np.log(np.maximum(cols.intensity.astype(np.float64), 1e-12))
        mos2_classes(logi, cls, np.empty(65, np.float64), np.empty(64, np.int64), np.empty(n, np.float64))
    return ColumnTable(cols.x, cols.y, cols.intensity, cols.score, cls, MOS2_CLASSES, cols.near_edge)


def classify_generic(cols: ColumnTable) -> ColumnTable:
    """Every found column labelled ``column`` (``cls = 0``): materials without an intensity model."""
    return ColumnTable(cols.x, cols.y, cols.intensity, cols.score, np.zeros(len(cols), np.int8), GENERIC_CLASSES,
                       cols.near_edge)


CLASSIFIERS: dict[str, Callable[[ColumnTable], ColumnTable]] = {}
"""Intensity classifiers by material name (:func:`register_classifier`)."""


def register_classifier(material: str, fn: Callable[[ColumnTable], ColumnTable]) -> None:
    """Make ``fn`` (a ColumnTable -> classified ColumnTable function) the classifier of ``material``."""
    CLASSIFIERS[material] = fn


register_classifier(MOS2.name, classify_mos2)
register_classifier(GENERIC.name, classify_generic)


class Classify(StageBase):
    """Frame stage ``classify``: the material's intensity classes of ``columns`` (:data:`CLASSIFIERS`).

    Materials without a registered classifier get :func:`classify_generic`.
    """

    name = "classify"
    reads = ("columns",)
    writes = ("columns",)

    def __init__(self) -> None:
        self._fn: Callable[[ColumnTable], ColumnTable] = classify_generic

    def prepare(self, meta) -> None:
        """Pick the classifier of the series' material."""
        self._fn = CLASSIFIERS.get(meta.material.name, classify_generic)

    def process(self, ctx: FrameContext) -> None:
        """Replace ``ctx.columns`` by the classified table."""
        ctx.columns = self._fn(ctx.columns)
