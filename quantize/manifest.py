"""Writing trigger-model manifests, and shipping a trained model into the installed package.

A model folder holds the model files and one ``manifest.json`` (``{"format": 1, "models": {name:
entry}}``); :func:`beamloop.edge.trigger.model.load_manifest` reads it and
:data:`beamloop.edge.trigger.model.MODEL_DIR` is the shipped folder. Training writes into a folder under
``out/`` (:data:`DEFAULT_MODEL_DIR`); :func:`ship` copies a model from there into the package.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from beamloop.edge.trigger.model import MODEL_DIR

DEFAULT_MODEL_DIR = Path("out") / "models" / "trigger"
"""Where ``beamloop quantize train`` and ``export`` write by default (relative to the working directory)."""

MANIFEST = "manifest.json"
"""File name of a model folder's manifest."""


def read_manifest(model_dir: Path) -> dict:
    """The manifest of ``model_dir``, or an empty one (``{"format": 1, "models": {}}``) when there is none.

    Raises
    ------
    json.JSONDecodeError
        A manifest that is not JSON.
    """
    p = Path(model_dir) / MANIFEST
    return json.loads(p.read_text()) if p.is_file() else {"format": 1, "models": {}}


def write_manifest(model_dir: Path, name: str, entry: dict) -> Path:
    """Set the manifest entry ``name`` of ``model_dir`` to ``entry``, keeping the other entries.

    The file is JSON with two-space indentation (the layout of the shipped manifest, so that a changed
    figure is a one-line diff).

    Parameters
    ----------
    model_dir : Path
        Model folder (created if missing).
    name : str
        Model name (the entry's key).
    entry : dict
        JSON-ready entry: ``task``, ``files``, ``threshold``, ``metrics``, ...

    Returns
    -------
    Path
        The manifest written.
    """
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(d)
    manifest["models"][name] = entry
    path = d / MANIFEST
    path.write_text(json.dumps(manifest, indent=2))
    return path


def ship(model_dir: Path, name: str, to: Path = MODEL_DIR) -> list[Path]:
    """Copy model ``name`` (its files and manifest entry) from ``model_dir`` into ``to`` (default the
    installed package's :data:`~beamloop.edge.trigger.model.MODEL_DIR`).

    Returns
    -------
    list of Path
        The files written in ``to``, manifest last.

    Raises
    ------
    KeyError
        ``name`` not in ``model_dir``'s manifest.
    FileNotFoundError
        A file the entry lists is missing.
    """
    src, dst = Path(model_dir), Path(to)
    entry = read_manifest(src)["models"][name]
    if src.resolve() == dst.resolve():
        return []
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for f in entry["files"].values():
        written.append(Path(shutil.copyfile(src / f, dst / f)))
    written.append(write_manifest(dst, name, entry))
    return written
