"""Few-shot chip classification: accuracy against 1, 2 and 5 shots per class, and chips per second on the CPU.

    python -m beamloop.bench.fewshot [--quick]

Accuracy: prototype classification (:mod:`beamloop.edge.analysis.fewshot`) with the shipped ONNX encoder,
random episodes of ``k`` support chips per class and the rest as queries,

* on simulated chips of specimen seeds never trained on (:func:`beamloop.edge.learn.fewshot_train.evaluate_simulated`:
  all seven region classes of :mod:`beamloop.edge.sim.specimen` at once, labels from the ground truth);
* on the shipped real HAADF image of a gold grain boundary (``edge/data/examples``), two grains hand-labelled
  chip by chip (``tests/data/fewshot_au_chips.json``).

Speed: chips embedded per second by ONNX Runtime on 1 and 2 threads (chips of 32 x 32 from a 2048 x 2048
frame), and whole 1024 x 1024 frames tiled, embedded and classified per second. Seed figure: ~100 frames/s of
few-shot analysis (Akers et al., npj Comput. Mater. 7, 187 (2021)).

Writes ``bench/results/fewshot.json`` and ``fewshot.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
EVAL_SEEDS = (7, 11, 12)
SHOTS = (1, 2, 5)


def real_accuracy(encoder, shots=SHOTS, episodes: int = 50, seed: int = 0) -> dict:
    """Few-shot accuracy on the hand-labelled gold-grain chips: ``{"shots_k": acc, ...}``."""
    from beamloop.edge.analysis.fewshot import PrototypeClassifier, chip_at
    from beamloop.edge.experiments.search import load_image

    d = json.loads((ROOT / "tests" / "data" / "fewshot_au_chips.json").read_text())
    img = load_image(ROOT / d["image"])
    chips = {k: np.stack([chip_at(img, r, c, d["chip_px"]) for r, c in v]) for k, v in d["classes"].items()}
    emb = {k: encoder.embed(v) for k, v in chips.items()}
    rng = np.random.default_rng(seed)
    out: dict = {"image": d["image"], "chips": {k: len(v) for k, v in chips.items()}, "chip_px": d["chip_px"]}
    for k in shots:
        right = total = 0
        for _ in range(episodes):
            sup, lab, qry, qlab = [], [], [], []
            for name, e in emb.items():
                idx = rng.permutation(len(e))
                sup.append(e[idx[:k]])
                lab += [name] * k
                qry.append(e[idx[k:]])
                qlab += [name] * (len(e) - k)
            clf = PrototypeClassifier(np.concatenate(sup), lab)
            pred, _ = clf.predict(np.concatenate(qry))
            right += sum(clf.classes[p] == t for p, t in zip(pred, qlab))
            total += len(qlab)
        out[f"shots_{k}"] = right / total
    return out


def speed(quick: bool = False) -> dict:
    """Chips per second of the encoder (1 and 2 threads) and frames per second of whole-frame classification."""
    from beamloop.edge.analysis.fewshot import ChipEncoder, PrototypeClassifier, classify_frame, tile
    from beamloop.edge.sim.specimen import LargeSpecimen, SpecimenConfig

    sp = LargeSpecimen(SpecimenConfig(seed=7))
    big, _ = sp.render((0.0, 0.0), (4000.0, 4000.0), (2048, 2048), 60.0)
    chips = tile(big, 32).reshape(-1, 32, 32)
    out: dict = {"chips": len(chips)}
    for threads in (1, 2):
        enc = ChipEncoder(threads=threads)
        enc.embed(chips[:512])
        reps = 1 if quick else 3
        t0 = time.perf_counter()
        for _ in range(reps):
            enc.embed(chips)
        out[f"chips_per_s_{threads}_threads"] = reps * len(chips) / (time.perf_counter() - t0)
    enc = ChipEncoder(threads=2)
    frame, _ = sp.render((1000.0, 1000.0), (2000.0, 2000.0), (1024, 1024), 60.0)
    e = enc.embed(tile(frame, 32).reshape(-1, 32, 32)[:10])
    clf = PrototypeClassifier(e, [str(i % 5) for i in range(10)])
    classify_frame(frame, clf, enc, 32)
    n = 3 if quick else 10
    t0 = time.perf_counter()
    for _ in range(n):
        classify_frame(frame, clf, enc, 32)
    dt = (time.perf_counter() - t0) / n
    out.update(frame_shape=[1024, 1024], chips_per_frame=1024, frames_per_s=1 / dt, frame_ms=dt * 1e3)
    return out


def run(quick: bool = False) -> dict:
    """The benchmark; writes ``fewshot.json`` and ``fewshot.md`` under ``bench/results``."""
    from beamloop.edge.analysis.fewshot import MODEL_DIR, ChipEncoder
    from beamloop.edge.learn.fewshot_train import evaluate_simulated

    enc = ChipEncoder(threads=2)
    episodes = 30 if quick else 100
    sim = {s: evaluate_simulated(enc.embed, seed=s, frames=40 if quick else 90, shots=SHOTS, episodes=episodes)
           for s in (EVAL_SEEDS[:1] if quick else EVAL_SEEDS)}
    mean = {f"shots_{k}": float(np.mean([v[f"shots_{k}"] for v in sim.values()])) for k in SHOTS}
    res = {"encoder": json.loads((MODEL_DIR / "manifest.json").read_text())["sha256"],
           "simulated": {"per_seed": {str(k): v for k, v in sim.items()}, "mean": mean,
                         "chance": 1 / len(next(iter(sim.values()))["classes"])},
           "real_au_grains": real_accuracy(enc, episodes=20 if quick else 50),
           "speed": speed(quick), "machine": {"cpu": platform.processor() or platform.machine(),
                                              "python": platform.python_version()},
           "seed_figure": "~100 frames/s few-shot analysis (Akers et al. 2021)"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fewshot.json").write_text(json.dumps(res, indent=2) + "\n")
    r, s = res["real_au_grains"], res["speed"]
    lines = ["# Few-shot chip classification", "",
             "| shots per class | simulated, 7 classes (held-out seeds) | real Au grains, 2 classes |", "|---|---|---|"]
    lines += [f"| {k} | {mean[f'shots_{k}']:.3f} | {r[f'shots_{k}']:.3f} |" for k in SHOTS]
    lines += ["", f"Chance on the simulated chips: {res['simulated']['chance']:.3f}.",
              f"Encoder: {s['chips_per_s_1_threads']:.0f} chips/s on 1 thread, {s['chips_per_s_2_threads']:.0f} on 2; "
              f"a 1024 x 1024 frame (1024 chips) tiled, embedded and classified in {s['frame_ms']:.1f} ms "
              f"({s['frames_per_s']:.1f} frames/s). Seed: ~100 frames/s.", ""]
    (RESULTS / "fewshot.md").write_text("\n".join(lines))
    return res


def main(argv: list[str] | None = None) -> int:
    """``python -m beamloop.bench.fewshot``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer episodes and seeds")
    a = p.parse_args(argv)
    res = run(a.quick)
    print(json.dumps({"simulated": res["simulated"]["mean"], "real": {k: v for k, v in res["real_au_grains"].items()
                                                                      if k.startswith("shots")},
                      "speed": res["speed"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
