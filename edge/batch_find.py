"""``beamloop find``: find atomic columns in arrays and image files through a frame path; a CSV table and an
overlay per image."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.context import FrameContext, FrameMeta
from beamloop.edge.frame.stage import FrameError, check_frame
from beamloop.edge.io.imageio import ImageReadError, read_image
from beamloop.edge.io.overlay import save_overlay
from beamloop.edge.path import DEFAULT_MEMORY_BUDGET, METHODS, FramePath, frame_path
from beamloop.edge.stages.find import FinderConfig

log = logging.getLogger("beamloop.find")


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
    uncertainty: Path | None = None


def find_columns(image: np.ndarray, pixel_size_A: float | None = None, material: str = "generic",
                 method: str = "classical", spacing_px: float | None = None, *, path: FramePath | None = None,
                 background: str = "on") -> tuple[ColumnTable, FrameContext]:
    """Find and classify the columns of one 2-D image with a frame path (the same stages as the service).

    Parameters
    ----------
    image : ndarray (rows, cols), integer or float32/float64
    pixel_size_A : float, optional
        Angstrom per pixel; with MoS2 it sets the physical scale. Without it (or for ``generic``) the
        lattice period and column size are estimated from this image.
    material : {"generic", "MoS2"}
    method : {"classical", "unet"}
    spacing_px : float, optional
        The lattice period in pixels (instead of the estimated one).
    path : FramePath, optional
        A path to reuse (e.g. one holding a loaded U-Net); by default a new one of ``method``/``material``.
    background : {"on", "auto", "off"}
        The classical path's background stage (:mod:`beamloop.edge.stages.background`); on by default for
        files (a support film or a particle's envelope is common in them; it costs about a millisecond at
        1024 x 1024).

    Returns
    -------
    columns : ColumnTable
    ctx : FrameContext
        The path's context (``ctx.meta`` has the scale used; ``ctx.segment`` the U-Net's uncertainty).

    Raises
    ------
    beamloop.edge.frame.stage.FrameError
        Bad image (not 2-D, unsupported dtype, non-finite pixels, too small) or no estimable scale.
    ValueError
        Unknown method or material.
    """
    path = path or frame_path(method, material, period_px=spacing_px, background=background)
    check_frame(image)
    meta = FrameMeta.of(image, pixel_size_A, path.material, period_px=spacing_px)
    path.prepare(meta, image)  # per image: the scale of one image is not the next one's
    ctx = path.run(image, meta=meta, record=False)
    return ctx.columns, ctx


def save_uncertainty_figure(path: Path, image: np.ndarray, seg, title: str = "") -> Path:
    """PNG of the U-Net's uncertainty: the per-pixel map (ensemble standard deviation of the heat) and the
    frame with each column coloured by its per-column uncertainty (:class:`beamloop.edge.stages.unet.SegmentResult`)."""
    from matplotlib.figure import Figure

    img = np.asarray(image, float)
    lo, hi = np.percentile(img, [0.5, 99.8])
    fig = Figure(figsize=(12.5, 6.0))
    axes = fig.subplots(1, 2)
    im0 = axes[0].imshow(seg.heat_map_std, cmap="magma", vmin=0, vmax=max(float(seg.heat_map_std.max()), 0.05))
    axes[0].set_title("per-pixel uncertainty (ensemble std of the heat map)", fontsize=9)
    fig.colorbar(im0, ax=axes[0], fraction=0.046)
    axes[1].imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    c = seg.columns
    sc = axes[1].scatter(c.x, c.y, c=seg.uncertainty, cmap="coolwarm", vmin=0, vmax=0.6,
                         s=float(np.clip(9000.0 / max(img.shape), 4, 60)), edgecolors="none")
    axes[1].set_title("per-column uncertainty", fontsize=9)
    fig.colorbar(sc, ax=axes[1], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_uncertainty_csv(path: Path, seg) -> Path:
    """``x_px,y_px,uncertainty,heat_std,position_std_px`` per column of a
    :class:`beamloop.edge.stages.unet.SegmentResult`."""
    c = seg.columns
    table = np.stack([c.x, c.y, seg.uncertainty, seg.heat_std, seg.position_std_px], axis=1)
    np.savetxt(path, table, fmt="%.4f", delimiter=",", header="x_px,y_px,uncertainty,heat_std,position_std_px",
               comments="")
    return path


def write_ood_json(path: Path, ctx: FrameContext, extra: dict | None = None) -> Path:
    """``<stem>_ood.json``: the out-of-distribution stage's score, alarm, threshold and per-statistic z-scores
    (:mod:`beamloop.edge.stages.ood`), the scale used, and the frame's detection threshold."""
    import json

    o = ctx.extras.get("ood", {})
    meta = ctx.meta
    doc = {"score": o.get("score"), "alarm": o.get("alarm"), "threshold": o.get("threshold"),
           "features": o.get("features", {}), "z": o.get("z", {}),
           "period_px": getattr(meta, "period_px", None), "column_sigma_px": getattr(meta, "column_sigma_px", None),
           "threshold_snr": ctx.extras.get("threshold_snr"), **(extra or {})}
    path.write_text(json.dumps(doc, indent=1, default=float))
    return path


def output_stems(paths) -> list[str]:
    """One output stem per input file, all different: the file's stem; when an earlier file took it, the stem
    with the suffix if that file is in the same folder (``img_tif``), else with the parent folder's name
    (``B2_img``); then numbered.

    Parameters
    ----------
    paths : iterable of path-like

    Returns
    -------
    list of str, in the order of ``paths``.
    """
    used: dict[str, Path] = {}
    out = []
    for p in map(Path, paths):
        by_suffix, by_folder = f"{p.stem}_{p.suffix.lstrip('.').lower()}", f"{p.parent.name}_{p.stem}"
        owner = used.get(p.stem)
        tries = [p.stem] + ([by_suffix, by_folder] if owner is not None and owner.parent == p.parent
                            else [by_folder, by_suffix])
        stem = next((t for t in tries if t and t not in used), None)
        n = 2
        while stem is None:
            stem = f"{p.stem}_{n}" if f"{p.stem}_{n}" not in used else None
            n += 1
        used[stem] = p
        out.append(stem)
    return out


def check_find_options(pixel_size_A: float | None = None, method: str = "classical",
                       memory_budget_mib: float = DEFAULT_MEMORY_BUDGET / 2**20) -> None:
    """Raise ``ValueError`` for an unknown ``method``, a non-positive ``pixel_size_A`` or memory budget (what
    :func:`find_files` checks before it reads anything)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {METHODS}")
    if pixel_size_A is not None and not (math.isfinite(pixel_size_A) and pixel_size_A > 0):
        raise ValueError(f"pixel size must be a positive number of Angstrom, got {pixel_size_A}")
    if not (math.isfinite(memory_budget_mib) and memory_budget_mib > 0):
        raise ValueError(f"memory budget must be a positive number of MiB, got {memory_budget_mib}")


def find_files(paths, out: Path, pixel_size_A: float | None = None, method: str = "classical",
               material: str = "generic", spacing_px: float | None = None, *, device: str = "auto",
               precision: str = "fp32", background: str = "on",
               memory_budget_mib: float = DEFAULT_MEMORY_BUDGET / 2**20,
               stems: list[str] | None = None) -> list[FindOutcome]:
    """Run the finder on every image file; write ``<stem>_columns.csv`` (with ``near_edge`` and the per-column
    ``uncertainty``), ``<stem>_ood.json`` (:func:`write_ood_json`) and ``<stem>_overlay.png`` in ``out``.

    Stacks (3-D data) are processed frame by frame with ``<stem>_<k>`` names; two inputs with the same stem get
    different names (:func:`output_stems`). ``background`` as in :func:`find_columns`; ``memory_budget_mib``
    bounds the frame path's buffers per image (:meth:`beamloop.edge.path.FramePath.prepare`). A file that
    cannot be read, processed or written (disk full: the message names the output file, whose partial
    outputs are removed) is reported in its outcome's ``error`` and the others go on. ``method="unet"`` uses the
    U-Net ensemble (:class:`beamloop.edge.stages.unet.UNetFinder` on ``device`` at ``precision``; it needs no pixel size
    or spacing) and also writes ``<stem>_uncertainty.png`` and ``<stem>_uncertainty.csv``. ``stems`` gives the
    output stems instead (one per path: a caller that splits a list over workers names them for the whole list,
    :func:`beamloop.edge.dask_runner.find_files_dask`).

    Raises
    ------
    ValueError
        Unknown ``method`` or a non-positive ``pixel_size_A``.
    beamloop.edge.stages.unet.ModelError
        ``method="unet"`` and the model cannot be loaded on ``device``.
    """
    check_find_options(pixel_size_A, method, memory_budget_mib)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unet = None
    if method == "unet":
        from beamloop.edge.stages.unet import UNetFinder

        unet = UNetFinder(precision=precision, device=device)
    path = frame_path(method, material, period_px=spacing_px, unet=unet, background=background)
    path.memory_budget_bytes = int(memory_budget_mib * 2**20)
    outcomes = []
    paths = [Path(p) for p in paths]
    if stems is not None and len(stems) != len(paths):
        raise ValueError(f"{len(stems)} output stems for {len(paths)} files")
    for path_in, base in zip(paths, stems if stems is not None else output_stems(paths)):
        try:
            img = read_image(path_in)
        except ImageReadError as exc:
            outcomes.append(FindOutcome(path_in, None, error=str(exc)))
            continue
        size = pixel_size_A or img.pixel_size_A
        frames = img.frames
        for k, frame in enumerate(frames):
            stem = base if len(frames) == 1 else f"{base}_{k:04d}"
            try:
                cols, ctx = find_columns(frame, size, material, method, spacing_px, path=path)
            except (FrameError, ValueError) as exc:
                outcomes.append(FindOutcome(path_in, None, error=f"{path_in}: {exc}"))
                continue
            cfg = FinderConfig.for_meta(ctx.meta) if method == "classical" else None
            written: list[Path] = []
            try:
                csv, ov, unc = _write_outputs(out, stem, path_in, frame, cols, ctx, size, method, written)
            except OSError as exc:
                target = written[-1] if written else out / stem
                for p in written:
                    p.unlink(missing_ok=True)
                outcomes.append(FindOutcome(path_in, None, error=f"{path_in}: cannot write {target} "
                                                                 f"({exc.strerror or exc}); nothing kept for it"))
                continue
            outcomes.append(FindOutcome(path_in, cols, csv, ov, size, cfg, uncertainty=unc))
    return outcomes


def _write_outputs(out: Path, stem: str, path_in: Path, frame: np.ndarray, cols: ColumnTable, ctx: FrameContext,
                   size: float | None, method: str, written: list[Path]) -> tuple[Path, Path, Path | None]:
    """Write one frame's CSV, OOD JSON, overlay (and U-Net uncertainty files); each path joins ``written``
    before it is written, so that a failed write names it and the caller can remove what was started."""
    def target(name: str) -> Path:
        written.append(out / f"{stem}_{name}")
        return written[-1]

    seg = ctx.segment
    csv = cols.write_csv(target("columns.csv"), size, uncertainty=ctx.extras.get("column_uncertainty"))
    write_ood_json(target("ood.json"), ctx, {"file": str(path_in), "method": method})
    counts = {n: int((cols.cls == i).sum()) for i, n in enumerate(cols.class_names)}
    alarm = bool(ctx.extras.get("ood", {}).get("alarm"))
    title = (f"{path_in.name} ({method}): {len(cols)} columns {counts}"
             f"{'' if size else ' (pixel size unknown)'}{' - OUT OF DISTRIBUTION' if alarm else ''}")
    ov = save_overlay(target("overlay.png"), frame, cols, pixel_size_A=size, title=title)
    unc = None
    if seg is not None:
        unc = save_uncertainty_figure(target("uncertainty.png"), frame, seg, title)
        write_uncertainty_csv(target("uncertainty.csv"), seg)
    return csv, ov, unc
