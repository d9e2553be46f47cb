"""``beamloop find``: atomic columns in image files, a CSV table and an overlay per image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from beamloop.edge.cli.types import parse_positive


def add_finder_arguments(p: argparse.ArgumentParser, default_material: str) -> None:
    """``--method``, ``--device``, ``--precision``, ``--material``, ``--spacing-px`` (the frame path's choice)."""
    from beamloop.edge.materials import MATERIALS
    from beamloop.edge.path import METHODS
    from beamloop.edge.stages.unet import DEVICES, PRECISIONS

    p.add_argument("--method", choices=METHODS, default="classical",
                   help="classical (numba local maxima) or unet (the shipped U-Net ensemble on ONNX Runtime)")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="ONNX Runtime provider for --method unet (auto: TensorRT, then CUDA, then CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="which shipped U-Net export --method unet runs")
    p.add_argument("--material", choices=tuple(MATERIALS), default=default_material, help="material of the frames")
    p.add_argument("--spacing-px", type=parse_positive, default=None,
                   help="lattice period / column spacing in pixels for images without a pixel size "
                        "(default: estimated from each image)")


def cmd_find(a: argparse.Namespace) -> int:
    """``beamloop find``: columns in image files (:func:`beamloop.edge.batch_find.find_files`); exit status 1
    if any file failed."""
    from beamloop.edge.batch_find import find_files
    from beamloop.edge.io.imageio import image_files

    empty: list[str] = []
    files = image_files(a.images, empty)
    for msg in empty:
        print(f"error: {msg}", file=sys.stderr)
    outcomes = find_files(files, Path(a.out), a.pixel_size, a.method, a.material, a.spacing_px,
                          device=a.device, precision=a.precision, background=a.background,
                          memory_budget_mib=a.memory_budget_mib)
    bad = len(empty)
    for o in outcomes:
        if o.error:
            bad += 1
            print(f"error: {o.error}", file=sys.stderr)
        else:
            print(f"{o.path}: {len(o.columns)} columns -> {o.csv}, {o.overlay}")
    return 1 if bad else 0


def register(sub) -> None:
    """Add ``find`` to the ``beamloop`` subcommands."""
    f = sub.add_parser("find", help="find atomic columns in image files (.tif .png .npy .hspy .hdf5)")
    f.add_argument("images", nargs="+", help="image files or folders")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--pixel-size", type=parse_positive, default=None, help="Angstrom per pixel (overrides the file)")
    add_finder_arguments(f, default_material="generic")
    f.add_argument("--background", choices=("on", "auto", "off"), default="on",
                   help="subtract a smooth background (support film, particle envelope) before finding; auto: "
                        "only for images without a pixel size")
    f.add_argument("--memory-budget-mib", type=parse_positive, default=1024.0,
                   help="working memory the finder may take per image, MiB (larger images are refused by name)")
    f.set_defaults(func=cmd_find)
