"""Few-shot chip classification: tiling, prototypes, support sets, the shipped ONNX encoder, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from beamloop.edge.analysis.fewshot import (
    INPUT_PX,
    MODEL_DIR,
    ChipEncoder,
    FewShotError,
    PrototypeClassifier,
    SupportSet,
    chip_px_for_scale,
    normalize_frame,
    sha256_file,
    tile,
)

ROOT = Path(__file__).resolve().parent.parent
AU = json.loads((ROOT / "tests" / "data" / "fewshot_au_chips.json").read_text())


def test_normalize_known_answer():
    a = np.arange(101, dtype=np.float32)  # percentiles 1 and 99 are 1 and 99
    n = normalize_frame(a.reshape(1, -1))
    assert n[0, 1] == pytest.approx(0.0) and n[0, 99] == pytest.approx(1.0) and n[0, 50] == pytest.approx(49 / 98)
    with pytest.raises(FewShotError, match="not finite"):
        normalize_frame(np.array([[1.0, np.nan]]))


def test_tile_block_means_and_order():
    img = np.zeros((130, 200), np.float32)
    img[:64, 64:128] = 1.0  # chip (0, 1) of a 64-px grid
    chips = tile(img, 64, normalized=True)
    assert chips.shape == (2, 3, INPUT_PX, INPUT_PX)  # remainder rows and columns dropped
    assert (chips[0, 1] == 1.0).all() and chips[0, 0].max() == 0.0 and chips[1, 1].max() == 0.0
    same = tile(img[:64, 64:96], 32, normalized=True)
    assert np.array_equal(same[0, 0], img[:32, 64:96])  # chip of the input size: the pixels themselves
    for bad in (4, 300, 12.5):
        with pytest.raises(FewShotError, match="chip size"):
            tile(img, bad)


def test_chip_size_from_lattice_scale():
    assert chip_px_for_scale(10.0) == 64 and chip_px_for_scale(1.0) == 8
    with pytest.raises(FewShotError):
        chip_px_for_scale(-1.0)


def test_prototypes_and_distance_softmax_known_answer():
    e = np.array([[0, 0], [2, 0], [10, 10], [10, 12]], np.float32)
    clf = PrototypeClassifier(e, ["a", "a", "b", "b"])
    assert clf.classes == ("a", "b")
    assert np.allclose(clf.prototypes, [[1, 0], [10, 11]])
    q = np.array([[1, 1]], np.float32)
    d2 = np.array([1.0, 81 + 100])
    want = np.exp(-d2) / np.exp(-d2).sum()
    assert np.allclose(clf.predict_proba(q)[0], want, atol=1e-7)
    k, conf = clf.predict(np.array([[9.0, 11.0], [1.0, 0.0]]))
    assert list(k) == [1, 0] and (conf > 0.99).all()
    with pytest.raises(FewShotError, match="two classes"):
        PrototypeClassifier(e, ["a"] * 4)
    with pytest.raises(FewShotError):
        PrototypeClassifier(e, ["a", "b"])


def test_support_set_round_trip_and_errors():
    s = SupportSet(64)
    s.add("grain", "img.png", 0, 64)
    s.add("boundary", "img.png", 128, 192)
    back = SupportSet.from_json(s.to_json())
    assert back == s
    with pytest.raises(FewShotError, match="two classes"):
        SupportSet.from_json(json.dumps({"chip_px": 8, "classes": {"a": [{"image": "x", "row": 0, "col": 0}]}}))
    with pytest.raises(FewShotError, match="chip_px"):
        SupportSet.from_json("{}")


@pytest.fixture(scope="module")
def encoder():
    return ChipEncoder()


def test_shipped_encoder_matches_manifest(encoder):
    m = json.loads((MODEL_DIR / "manifest.json").read_text())
    assert m["sha256"] == sha256_file(MODEL_DIR / "encoder.onnx")
    assert (MODEL_DIR / "encoder.onnx").stat().st_size < 2 * 1024 * 1024
    x = np.random.default_rng(0).random((5, INPUT_PX, INPUT_PX)).astype(np.float32)
    e = encoder.embed(x)
    assert e.shape == (5, m["output"]["shape"][1]) and e.dtype == np.float32
    assert np.array_equal(e[2:3], encoder.embed(x[2:3]))  # batch-independent (eval-mode batch norm)
    with pytest.raises(FewShotError, match="32 x 32"):
        encoder.embed(np.zeros((2, 16, 16), np.float32))


def test_fewshot_accuracy_on_held_out_simulated_chips(encoder):
    from beamloop.edge.learn.fewshot_train import evaluate_simulated

    acc = evaluate_simulated(encoder.embed, seed=11, frames=30, shots=(1, 5), episodes=20)
    chance = 1 / len(acc["classes"])
    assert len(acc["classes"]) >= 5
    assert acc["shots_5"] > 3 * chance and acc["shots_5"] >= acc["shots_1"] - 0.05


def _au_chips():
    from beamloop.edge.analysis.fewshot import chip_at
    from beamloop.edge.experiments.search import load_image

    img = load_image(ROOT / AU["image"])
    out = {k: np.stack([chip_at(img, r, c, AU["chip_px"]) for r, c in v]) for k, v in AU["classes"].items()}
    return out


def test_fewshot_on_real_gold_grains(encoder):
    # hand-labelled chips of a real HAADF image (not from the training generator): 2 shots per class
    chips = _au_chips()
    rng = np.random.default_rng(0)
    right = total = 0
    for _ in range(20):
        sup, lab, qry, qlab = [], [], [], []
        for k, c in chips.items():
            idx = rng.permutation(len(c))
            sup.append(c[idx[:2]])
            lab += [k, k]
            qry.append(c[idx[2:]])
            qlab += [k] * (len(c) - 2)
        clf = PrototypeClassifier(encoder.embed(np.concatenate(sup)), lab)
        pred, _ = clf.predict(encoder.embed(np.concatenate(qry)))
        right += sum(clf.classes[p] == t for p, t in zip(pred, qlab))
        total += len(qlab)
    assert right / total > 0.75


def main(argv: list[str]) -> int:
    """``beamloop fewshot ...`` through the command module's own parser (as ``beamloop`` registers it)."""
    import argparse

    from beamloop.edge.cli import fewshot

    p = argparse.ArgumentParser()
    fewshot.register(p.add_subparsers(dest="command", required=True))
    a = p.parse_args(argv)
    return a.func(a)


def test_cli_label_and_classify(tmp_path):
    img = ROOT / AU["image"]
    sup = tmp_path / "support.json"
    l0, r0 = AU["classes"]["left_grain"][0], AU["classes"]["right_grain"][0]
    assert main(["fewshot", "label", str(img), "--chip-px", "64", "--out", str(sup),
                 "--chip", f"left:{l0[0]},{l0[1]}", "--chip", f"right:{r0[0]},{r0[1]}"]) == 0
    s = SupportSet.from_json(sup.read_text())
    assert s.chips == {"left": [(str(img), l0[0], l0[1])], "right": [(str(img), r0[0], r0[1])]}
    out = tmp_path / "maps"
    assert main(["fewshot", "classify", str(img), "--support", str(sup), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / f"{img.stem}_chips.csv")))
    assert len(rows) == 64 and {r["class"] for r in rows} <= {"left", "right"}
    by = {(int(r["row"]), int(r["col"])): r for r in rows}
    assert by[tuple(l0)]["class"] == "left" and by[tuple(r0)]["class"] == "right"  # support chips themselves
    assert all(abs(float(r["p_left"]) + float(r["p_right"]) - 1) < 1e-5 for r in rows)
    assert (out / f"{img.stem}_overlay.png").is_file() and (out / f"{img.stem}_map.png").is_file()
    assert main(["fewshot", "label", str(img), "--chip-px", "64", "--out", str(sup),
                 "--chip", "left:500,0", "--chip", "right:0,0"]) == 1  # a chip outside the image
