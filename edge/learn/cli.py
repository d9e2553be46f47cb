"""``beamloop train`` and ``beamloop export``: the segmentation network's commands (torch imported inside only)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_WORK = "out/unet"
"""Where ``train`` writes weights, tiles and curves, and ``export`` reads them."""


def cmd_train(a: argparse.Namespace) -> int:
    """``beamloop train``: train the U-Net ensemble (and export it unless ``--no-export``); exit status."""
    from beamloop.edge.learn.train import TrainConfig, train

    cfg = TrainConfig(members=a.members, steps=a.steps, batch=a.batch, tiles=a.tiles, tile=a.tile, lr=a.lr,
                      seed=a.seed, threads=a.threads, multislice_fraction=a.multislice_fraction,
                      abtem_cache=a.abtem_cache, acquisition=not a.no_acquisition)
    info = train(Path(a.out), cfg, progress=not a.quiet)
    print(f"trained {cfg.members} members in {info['total_seconds']:.0f} s (tiles {info['data_seconds']:.0f} s, "
          f"members {info['member_seconds']} s); held-out loss {info['final_val_loss']}; "
          f"curve {Path(a.out) / 'training_curve.png'}")
    if not a.no_export:
        return cmd_export(argparse.Namespace(work=a.out, to=a.to, quick=a.quick_eval, quiet=a.quiet, ship=a.ship))
    return 0


def default_export_dir(work: str | Path) -> Path:
    """Where ``export`` writes unless told: ``<work>/model`` (never into the installed package)."""
    return Path(work) / "model"


def ship(model_dir: Path) -> Path:
    """Copy an exported model (its manifest and ONNX files) into the package's ``edge/models/unet``; returns it.

    Raises ``FileNotFoundError`` when ``model_dir`` has no manifest."""
    import shutil

    from beamloop.edge.stages.unet import default_model_dir

    src = Path(model_dir)
    manifest = json.loads((src / "manifest.json").read_text())
    dst = default_model_dir()
    dst.mkdir(parents=True, exist_ok=True)
    for name in list(manifest["files"].values()) + ["manifest.json"]:
        shutil.copy2(src / name, dst / name)
    return dst


def cmd_export(a: argparse.Namespace) -> int:
    """``beamloop export``: ONNX FP32/FP16/INT8 and manifest from trained members; exit status."""
    from beamloop.edge.learn.export import export_all, write_metrics

    to = Path(a.to) if a.to else default_export_dir(a.work)
    if getattr(a, "metrics_only", False):
        manifest = write_metrics(to, quick=a.quick, progress=not a.quiet)
    else:
        manifest = export_all(Path(a.work), to, quick=a.quick, progress=not a.quiet)
    print(json.dumps({k: manifest[k] for k in ("files", "metrics") if k in manifest}, indent=1))
    if getattr(a, "ship", False):
        print(f"shipped into {ship(to)}")
    return 0


def register(sub) -> None:
    """Add ``train`` and ``export`` to the ``beamloop`` sub-parsers (see :mod:`beamloop.edge.cli`)."""
    t = sub.add_parser("train", help="train the U-Net ensemble on simulated frames (needs the 'train' extra)")
    t.add_argument("--out", default=DEFAULT_WORK, help="work folder: tiles, weights, history, training curve")
    t.add_argument("--members", type=int, default=3, help="ensemble members (>= 3 for the shipped model)")
    t.add_argument("--steps", type=int, default=1500, help="optimiser steps per member")
    t.add_argument("--batch", type=int, default=10)
    t.add_argument("--tiles", type=int, default=3000, help="simulated noise-free tiles")
    t.add_argument("--tile", type=int, default=128, help="tile side, pixels (divisible by 8)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    t.add_argument("--to", default=None, help="export folder (default: <out>/model)")
    t.add_argument("--ship", action="store_true", help="after exporting, copy the model into the package's "
                                                       "edge/models/unet (the shipped model)")
    t.add_argument("--multislice-fraction", type=float, default=0.2,
                   help="fraction of the training tiles resampled from abTEM cells (0: own simulator only)")
    t.add_argument("--abtem-cache", default="out/abtem", help="cache of the abTEM cell images")
    t.add_argument("--no-acquisition", action="store_true",
                   help="no probe-tail, background and detector models in the augmentation")
    t.add_argument("--no-export", action="store_true", help="train only")
    t.add_argument("--quick-eval", action="store_true", help="fewer held-out frames in the manifest's metrics")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export trained members to ONNX FP32/FP16/INT8 with a manifest")
    e.add_argument("--work", default=DEFAULT_WORK, help="folder written by `beamloop train`")
    e.add_argument("--to", default=None, help="export folder (default: <work>/model)")
    e.add_argument("--ship", action="store_true", help="copy the exported model into the package's edge/models/unet")
    e.add_argument("--quick", action="store_true", help="fewer held-out frames in the manifest's metrics")
    e.add_argument("--metrics-only", action="store_true",
                   help="re-evaluate the model already in the export folder (after a change to the serving code) "
                        "and rewrite the manifest's metrics")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_export)


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args()
    sys.exit(args.func(args))
