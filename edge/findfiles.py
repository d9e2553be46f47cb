"""``beamloop find``: find atomic columns in image files and write a CSV table and an overlay per image."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.classify import GenericClassifier, MoS2Classifier
from edge.columns import ColumnTable
from edge.find import ColumnFinder, FinderConfig
from edge.imageio import ImageReadError, read_image
from edge.overlay import save_overlay
from edge.pipeline import MOS2_SPACING_A
from edge.preprocess import FrameError
from edge.spacing import estimate_scale

log = logging.getLogger("beamloop.find")

METHODS = ("classical",)
"""Finder methods ``beamloop find`` offers."""


@dataclass
class FindOutcome:
    """Result for one input file: the table written (or the error), and the files produced."""

    path: Path
    columns: ColumnTable | None
    csv: Path | None = None
    overlay: Path | None = None
    pixel_size_A: float | None = None
    config: FinderConfig | None = None
    error: str = ""


def finder_config(image: np.ndarray, pixel_size_A: float | None, material: str,
                  spacing_px: float | None = None) -> FinderConfig:
    """Finder parameters for one image.

    MoS2 with a known pixel size: physical defaults (:meth:`FinderConfig.for_pixel_size`). Otherwise,
    with ``spacing_px`` given: the lattice period; else the period and column size estimated from the
    image's autocorrelation (:func:`edge.spacing.estimate_scale`).

    Raises
    ------
    ValueError
        The scale cannot be estimated.
    """
    if material == "MoS2" and pixel_size_A:
        return FinderConfig.for_pixel_size(pixel_size_A, spacing_A=MOS2_SPACING_A)
    est = estimate_scale(np.asarray(image, np.float32))
    period = spacing_px or est.period_px
    return FinderConfig.for_lattice(period, est.column_sigma_px)


def find_in_image(image: np.ndarray, pixel_size_A: float | None = None, material: str = "generic",
                  spacing_px: float | None = None) -> tuple[ColumnTable, FinderConfig]:
    """Find and classify the columns of one 2-D image.

    Raises
    ------
    edge.preprocess.FrameError
        Not 2-D, too small, or non-finite pixels.
    ValueError
        The scale cannot be estimated.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise FrameError(f"need a 2-D image, got shape {img.shape}")
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise FrameError(f"image has {int((~np.isfinite(img)).sum())} non-finite pixels (NaN or infinity)")
    cfg = finder_config(img, pixel_size_A, material, spacing_px)
    finder = ColumnFinder(cfg)
    cols = finder.find(img)
    if material == "MoS2":
        spacing = MOS2_SPACING_A / pixel_size_A if pixel_size_A else cfg.min_distance_px / 0.55
        cols = MoS2Classifier(spacing).classify(cols, finder.preprocessor.smooth)
    else:
        cols = GenericClassifier().classify(cols)
    return cols, cfg


def find_files(paths, out: Path, pixel_size_A: float | None = None, method: str = "classical",
               material: str = "generic", spacing_px: float | None = None) -> list[FindOutcome]:
    """Run the finder on every image file; write ``<stem>_columns.csv`` and ``<stem>_overlay.png`` in ``out``.

    Stacks (3-D data) are processed frame by frame with ``<stem>_<k>`` names. A file that cannot be read
    or processed is reported in its outcome's ``error`` and the others go on.

    Raises
    ------
    ValueError
        Unknown ``method`` or a non-positive ``pixel_size_A``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {METHODS}")
    if pixel_size_A is not None and not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise ValueError(f"pixel size must be a positive number of Angstrom, got {pixel_size_A}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for path in map(Path, paths):
        try:
            img = read_image(path)
        except ImageReadError as exc:
            outcomes.append(FindOutcome(path, None, error=str(exc)))
            continue
        size = pixel_size_A or img.pixel_size_A
        frames = img.frames
        for k, frame in enumerate(frames):
            stem = path.stem if len(frames) == 1 else f"{path.stem}_{k:04d}"
            try:
                cols, cfg = find_in_image(frame, size, material, spacing_px)
            except (FrameError, ValueError) as exc:
                outcomes.append(FindOutcome(path, None, error=f"{path}: {exc}"))
                continue
            csv = cols.write_csv(out / f"{stem}_columns.csv", size)
            counts = {n: int((cols.cls == i).sum()) for i, n in enumerate(cols.class_names)}
            ov = save_overlay(out / f"{stem}_overlay.png", frame, cols, pixel_size_A=size,
                              title=f"{path.name}: {len(cols)} columns {counts}"
                                    f"{'' if size else ' (pixel size unknown)'}")
            outcomes.append(FindOutcome(path, cols, csv, ov, size, cfg))
    return outcomes
