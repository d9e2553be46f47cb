"""Model folders: manifest writing, shipping into the package, and where `quantize train` writes by default."""

import argparse
import json

import pytest

from beamloop.edge.trigger.model import MODEL_DIR, load_manifest
from beamloop.quantize import cli
from beamloop.quantize.manifest import DEFAULT_MODEL_DIR, read_manifest, ship, write_manifest


def _parse(argv):
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers())
    return p.parse_args(argv)


def test_training_and_export_write_under_out_unless_shipped():
    assert str(DEFAULT_MODEL_DIR) == "out/models/trigger"
    a = _parse(["quantize", "train"])
    assert a.model_dir == "out/models/trigger" and a.ship is False
    assert _parse(["quantize", "train", "--ship"]).ship is True
    e = _parse(["quantize", "export", "x.pt"])
    assert e.model_dir == "out/models/trigger" and e.ship is False
    # evaluation reads the shipped models
    assert _parse(["quantize", "eval"]).model_dir == str(MODEL_DIR)


def test_write_manifest_keeps_other_entries_and_the_shipped_layout(tmp_path):
    assert read_manifest(tmp_path) == {"format": 1, "models": {}}
    write_manifest(tmp_path, "a", {"files": {}, "x": 1})
    path = write_manifest(tmp_path, "b", {"files": {}, "x": 2})
    m = json.loads(path.read_text())
    assert m == {"format": 1, "models": {"a": {"files": {}, "x": 1}, "b": {"files": {}, "x": 2}}}
    write_manifest(tmp_path, "a", {"files": {}, "x": 3})
    assert load_manifest(tmp_path)["models"]["a"]["x"] == 3
    # the shipped manifest is written in the same layout: rewriting it changes no byte
    text = (MODEL_DIR / "manifest.json").read_text()
    assert json.dumps(json.loads(text), indent=2) == text


def test_ship_copies_the_files_and_the_entry(tmp_path):
    src, dst = tmp_path / "trained", tmp_path / "package"
    src.mkdir()
    (src / "m_int.npz").write_bytes(b"weights")
    (src / "m.onnx").write_bytes(b"graph")
    write_manifest(src, "m", {"files": {"integer": "m_int.npz", "qonnx": "m.onnx"}, "threshold": {"score": 5}})
    write_manifest(dst, "other", {"files": {}})
    written = ship(src, "m", dst)
    assert [p.name for p in written] == ["m_int.npz", "m.onnx", "manifest.json"]
    assert (dst / "m.onnx").read_bytes() == b"graph"
    assert set(load_manifest(dst)["models"]) == {"other", "m"}
    assert ship(src, "m", src) == []  # already there
    with pytest.raises(KeyError):
        ship(src, "absent", dst)
