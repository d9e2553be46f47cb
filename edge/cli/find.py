"""``beamloop find``: atomic columns in image files, a CSV table and an overlay per image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from beamloop.edge.cli.types import parse_positive, parse_positive_int, parse_shape


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


def is_recording(path: str) -> bool:
    """Whether ``path`` names a detector recording (``*_master.h5`` or a ``*.zarr`` store) rather than images."""
    p = Path(path)
    return p.name.endswith("_master.h5") or p.suffix == ".zarr"


def _reduce_recordings(recs: list[str], a: argparse.Namespace, runner, out: Path) -> tuple[list[Path], int]:
    """4D reductions of each recording on ``runner``: ``<stem>_4d.npz`` in ``out``, and the virtual ADF image of
    every scan frame as ``.npy`` for the finder; returns those images and the number of recordings that failed."""
    from beamloop.edge.dask_runner import reduce_recording, scan_images_for_find

    images: list[Path] = []
    bad = 0
    for rec in recs:
        stem = Path(rec).name.removesuffix("_master.h5").removesuffix(".zarr")
        try:
            res = reduce_recording(rec, a.scan, runner=runner, frames_per_partition=a.partition_frames)
            npz = res.write(out / f"{stem}_4d.npz")
        except (OSError, KeyError, ValueError) as exc:
            print(f"error: {rec}: {exc}", file=sys.stderr)
            bad += 1
            continue
        print(f"{rec}: {res.frames} frames in {res.partitions} partitions reduced in {res.wall_s:.2f} s "
              f"({res.frames / max(res.wall_s, 1e-9):.0f} frames/s) -> {npz}")
        images += scan_images_for_find(res, out, stem)
    return images, bad


def cmd_find(a: argparse.Namespace) -> int:
    """``beamloop find``: columns in image files (:func:`beamloop.edge.batch_find.find_files`), and in the virtual
    ADF images of 4D recordings (``--scan``), in this process or on Dask (``--scheduler``); exit status 1 if any
    input failed, 2 for a recording without ``--scan``."""
    from beamloop.edge.batch_find import find_files
    from beamloop.edge.io.imageio import image_files

    recs = [p for p in a.images if is_recording(p)]
    if recs and a.scan is None:
        print("error: a 4D recording needs --scan ROWSxCOLS (probe positions per scan frame)", file=sys.stderr)
        return 2
    empty: list[str] = []
    others = [p for p in a.images if not is_recording(p)]
    files = image_files(others, empty) if others else []
    for msg in empty:
        print(f"error: {msg}", file=sys.stderr)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = {"device": a.device, "precision": a.precision, "background": a.background,
          "memory_budget_mib": a.memory_budget_mib}
    bad = len(empty)
    if a.scheduler is None and not recs:
        outcomes = find_files(files, out, a.pixel_size, a.method, a.material, a.spacing_px, **kw)
    else:
        from beamloop.edge.dask_runner import DaskRunner, find_files_dask

        with DaskRunner(a.scheduler or "threads", workers=a.workers, progress=not a.no_progress) as runner:
            made, failed = _reduce_recordings(recs, a, runner, out)
            bad += failed
            outcomes = find_files_dask(files + made, out, runner=runner, pixel_size_A=a.pixel_size,
                                       method=a.method, material=a.material, spacing_px=a.spacing_px, **kw)
    for o in outcomes:
        if o.error:
            bad += 1
            print(f"error: {o.error}", file=sys.stderr)
        else:
            print(f"{o.path}: {len(o.columns)} columns -> {o.csv}, {o.overlay}")
            if a.export:
                bad += _export(a.export, o)
    return 1 if bad else 0


def _export(fmt: str, o) -> int:
    """Write outcome ``o``'s columns in export format ``fmt`` beside its CSV; 1 if that failed (said on stderr)."""
    from beamloop.edge.io.columns_export import export_columns

    stem = o.csv.with_name(o.csv.name.removesuffix("_columns.csv"))
    try:
        files = export_columns(fmt, stem, o.columns, pixel_size_A=o.pixel_size_A)
    except OSError as exc:
        print(f"error: {o.path}: cannot write the {fmt} export ({exc.strerror or exc})", file=sys.stderr)
        return 1
    print(f"{o.path}: {fmt} -> {', '.join(str(p) for p in files)}")
    return 0


def register(sub) -> None:
    """Add ``find`` to the ``beamloop`` subcommands."""
    from beamloop.edge.io.columns_export import EXPORT_FORMATS

    f = sub.add_parser("find", help="find atomic columns in image files (.tif .png .npy .hspy .hdf5; .dm3 .dm4 "
                                    ".emd .ser .mrc .mib .zspy .nxs with the formats extra)")
    f.add_argument("images", nargs="+", help="image files or folders")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--pixel-size", type=parse_positive, default=None, help="Angstrom per pixel (overrides the file)")
    add_finder_arguments(f, default_material="generic")
    f.add_argument("--background", choices=("on", "auto", "off"), default="on",
                   help="subtract a smooth background (support film, particle envelope) before finding; auto: "
                        "only for images without a pixel size")
    f.add_argument("--memory-budget-mib", type=parse_positive, default=1024.0,
                   help="working memory the finder may take per image, MiB (larger images are refused by name)")
    f.add_argument("--scheduler", type=_scheduler, default=None,
                   help="run on Dask: threads or processes (this machine's pools), local (a distributed "
                        "LocalCluster here) or tcp://HOST:PORT (a running Dask scheduler; workers need the files at "
                        "the same paths); default: in this process")
    f.add_argument("--workers", type=parse_positive_int, default=None,
                   help="Dask workers on this machine (default: cores)")
    f.add_argument("--scan", type=parse_shape, default=None,
                   help="probe positions ROWSxCOLS per scan frame of 4D recordings (*_master.h5, *.zarr) given: "
                        "their virtual BF/ADF/CoM go to <stem>_4d.npz and the columns are found in the ADF images "
                        "(give --pixel-size: the probe step in Angstrom)")
    f.add_argument("--partition-frames", type=parse_positive_int, default=256,
                   help="frames per Dask task of a recording")
    f.add_argument("--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress bar (with --scheduler or recordings)")
    f.add_argument("--export", choices=EXPORT_FORMATS, default=None,
                   help="also write the columns for atomap (<stem>_atomap.csv, <stem>_atomap.npz) or TEMUL "
                        "(<stem>_temul.csv)")
    f.set_defaults(func=cmd_find)


def _scheduler(text: str) -> str:
    """argparse type of ``--scheduler`` (:func:`beamloop.edge.dask_runner.check_scheduler`)."""
    from beamloop.edge.dask_runner import check_scheduler

    try:
        return check_scheduler(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
