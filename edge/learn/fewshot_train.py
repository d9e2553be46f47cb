"""Train the few-shot chip encoder on simulated chips and ship it as ONNX (``beamloop fewshot train``).

Training data (:func:`simulated_chips`): chips of 32 x 32 pixels cut from frames of the large simulated
specimen (:class:`beamloop.edge.sim.specimen.LargeSpecimen`, seeds other than the search's: 7 region classes
at fields of view of 0.6-4 um and doses of 20-200 electrons per pixel, labelled by the majority class of the
chip), and from atomic-resolution MoS2 frames (:func:`beamloop.edge.sim.frames.mos2_frame`) labelled by the
lattice rotation in six 10-degree bins, so that the embedding separates textures at both scales.

Training (:func:`train`) is episodic, as for prototypical networks (J. Snell, K. Swersky & R. Zemel,
NeurIPS 2017): each episode draws ``ways`` classes, ``shots`` support and ``queries`` query chips per class,
and minimises the cross-entropy of the queries' softmax over negative squared distances to the support
means. The encoder (:func:`build_encoder`) is four blocks of 3x3 convolution, batch normalisation, ReLU and
2x2 max pooling (the "Conv-4" backbone of O. Vinyals et al., "Matching networks for one shot learning",
NeurIPS 2016), then a linear map to a 64-dimensional embedding.

:func:`export` writes ``encoder.onnx`` and ``manifest.json`` (training data, configuration, few-shot
accuracy on held-out simulated chips, SHA-256) into ``edge/models/fewshot``. torch is imported inside the
functions (the ``train`` extra); the runtime uses ONNX Runtime only (:mod:`beamloop.edge.analysis.fewshot`).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from beamloop.edge.analysis.fewshot import INPUT_PX, MODEL_DIR, normalize_frame, sha256_file, tile
from beamloop.edge.sim.frames import mos2_frame
from beamloop.edge.sim.specimen import REGION_CLASSES, LargeSpecimen, SpecimenConfig

TRAIN_SEEDS = (101, 102, 103)
"""Specimen seeds of the training chips (the search and the held-out evaluation use others)."""

EVAL_SEED = 7
"""Specimen seed of the held-out evaluation chips."""


@dataclass(frozen=True)
class TrainConfig:
    """Episodic training of the chip encoder.

    Attributes
    ----------
    episodes : int
        Training episodes.
    ways, shots, queries : int
        Classes per episode; support and query chips per class.
    lr : float
        Adam learning rate.
    dim : int
        Embedding size.
    width : int
        Channels of each convolution block.
    frames_per_seed : int
        Specimen frames rendered per training seed.
    lattice_frames : int
        MoS2 frames rendered.
    seed : int
        Seed of the data and of torch.

    Raises
    ------
    ValueError
        A count below 1 (``ways`` below 2) or a learning rate that is not positive.
    """

    episodes: int = 1500
    ways: int = 6
    shots: int = 3
    queries: int = 6
    lr: float = 1e-3
    dim: int = 64
    width: int = 32
    frames_per_seed: int = 60
    lattice_frames: int = 120
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("episodes", "shots", "queries", "dim", "width", "frames_per_seed", "lattice_frames"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"fewshot training {name} {getattr(self, name)!r} must be a whole number >= 1")
        if not (isinstance(self.ways, int) and self.ways >= 2):
            raise ValueError(f"fewshot training ways {self.ways!r} must be a whole number >= 2")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"fewshot training lr {self.lr!r} must be a positive number")


def specimen_chips(seed: int, frames: int, rng: np.random.Generator, chip_px: int = INPUT_PX,
                   purity: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Chips of frames of one simulated specimen, labelled by their majority region class.

    Frames of 256 x 256 pixels at random fields of view (0.6-4 um) and doses (20-200 electrons per pixel);
    a third of them centred near a rare region, at 0.3-1.2 um.

    Parameters
    ----------
    seed : int
        Specimen seed.
    frames : int
    rng : numpy.random.Generator
    chip_px : int
    purity : float
        Smallest fraction of the majority class in a chip kept.

    Returns
    -------
    chips : ndarray, shape (n, 32, 32), float32
    labels : ndarray, shape (n,), int64
        Index into :data:`beamloop.edge.sim.specimen.REGION_CLASSES`.
    """
    sp = LargeSpecimen(SpecimenConfig(seed=seed))
    out_c, out_l = [], []
    for k in range(frames):
        fov = float(rng.uniform(600, 4000))
        if k % 3 == 0 and sp.rare:
            fov = float(rng.uniform(300, 1200))
            q = sp.rare[int(rng.integers(len(sp.rare)))]
            c = (q.x_nm + rng.uniform(-0.3, 0.3) * fov, q.y_nm + rng.uniform(-0.3, 0.3) * fov)
        else:
            c = tuple(rng.uniform(-sp.half_nm + fov / 2, sp.half_nm - fov / 2, 2))
        img, lab = sp.render(c, (fov, fov), (256, 256), float(rng.uniform(20, 200)), rng)
        chips = tile(img, chip_px).reshape(-1, INPUT_PX, INPUT_PX)
        n = 256 // chip_px
        blocks = lab[:n * chip_px, :n * chip_px].reshape(n, chip_px, n, chip_px).transpose(0, 2, 1, 3)
        blocks = blocks.reshape(n * n, -1)
        counts = np.stack([(blocks == v).mean(axis=1) for v in range(len(REGION_CLASSES))], axis=1)
        major = counts.argmax(axis=1)
        keep = counts.max(axis=1) >= purity
        out_c.append(chips[keep])
        out_l.append(major[keep])
    return np.concatenate(out_c), np.concatenate(out_l).astype(np.int64)


def lattice_chips(frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Chips of atomic-resolution MoS2 frames (192 x 192 pixels at 0.1-0.5 A per pixel; chips of 32, 48 or 64
    pixels resized to 32, so 1.5 to 20 lattice spacings per chip), labelled by the lattice rotation bin.

    Returns
    -------
    chips : ndarray, shape (n, 32, 32), float32
    labels : ndarray, shape (n,), int64
        Rotation bin 0..5 (10 degrees each over the 60-degree symmetry).
    """
    out_c, out_l = [], []
    for k in range(frames):
        b = k % 6
        rot = float(b * 10 + rng.uniform(1, 9))
        f = mos2_frame(shape=(192, 192), pixel_size_A=float(rng.uniform(0.1, 0.5)),
                       dose_e_per_A2=float(rng.uniform(2e4, 2e5)), seed=int(rng.integers(2**31)), rotation_deg=rot)
        chip = int(rng.choice([32, 48, 64]))
        chips = tile(normalize_frame(f.counts), chip, normalized=True).reshape(-1, INPUT_PX, INPUT_PX)
        out_c.append(chips)
        out_l.append(np.full(len(chips), b))
    return np.concatenate(out_c), np.concatenate(out_l).astype(np.int64)


def simulated_chips(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The training chips (module docstring): specimen chips of :data:`TRAIN_SEEDS` and lattice chips.

    Returns
    -------
    chips : ndarray, shape (n, 32, 32), float32
    labels : ndarray, shape (n,), int64
    names : list of str
        Class name per label value.
    """
    rng = np.random.default_rng([cfg.seed, 0xF5])
    cs, ls = [], []
    for s in TRAIN_SEEDS:
        c, lab = specimen_chips(s, cfg.frames_per_seed, rng)
        cs.append(c)
        ls.append(lab)
    lc, ll = lattice_chips(cfg.lattice_frames, rng)
    names = list(REGION_CLASSES) + [f"mos2_rot{10 * b}" for b in range(6)]
    return (np.concatenate([*cs, lc]), np.concatenate([*ls, ll + len(REGION_CLASSES)]), names)


def build_encoder(dim: int = 64, width: int = 32):
    """The Conv-4 encoder (module docstring): input (n, 1, 32, 32) float32, output (n, ``dim``)."""
    import torch.nn as nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(1, width), block(width, width), block(width, width), block(width, width),
                         nn.Flatten(), nn.Linear(width * 4, dim))


def episode_accuracy(embed, chips: np.ndarray, labels: np.ndarray, classes: list[int], shots: int, episodes: int,
                     rng: np.random.Generator, queries: int = 10) -> float:
    """Mean query accuracy of prototype classification over random episodes of all ``classes`` at once.

    Parameters
    ----------
    embed : callable (n, 32, 32) float32 -> (n, d)
    chips : ndarray, shape (n, 32, 32)
    labels : ndarray, shape (n,)
    classes : list of int
        Label values taking part (each with at least ``shots + 1`` chips).
    shots : int
        Support chips per class.
    episodes : int
    rng : numpy.random.Generator
    queries : int
        Query chips per class and episode (fewer when the class has fewer left).

    Returns
    -------
    float
    """
    from beamloop.edge.analysis.fewshot import PrototypeClassifier

    emb = embed(chips)
    by = {c: np.flatnonzero(labels == c) for c in classes}
    right = total = 0
    for _ in range(episodes):
        sup, sup_l, qry, qry_l = [], [], [], []
        for c in classes:
            idx = rng.permutation(by[c])
            sup.extend(idx[:shots])
            sup_l.extend([c] * shots)
            q = idx[shots:shots + queries]
            qry.extend(q)
            qry_l.extend([c] * len(q))
        clf = PrototypeClassifier(emb[sup], [str(v) for v in sup_l])
        k, _ = clf.predict(emb[qry])
        pred = np.array([int(clf.classes[i]) for i in k])
        right += int((pred == np.array(qry_l)).sum())
        total += len(qry_l)
    return right / max(total, 1)


def train(cfg: TrainConfig | None = None, *, log=print):
    """Train the encoder episodically on :func:`simulated_chips`.

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    info : dict
        ``chips``, ``class_counts``, ``seconds``, ``final_loss``.
    """
    import torch

    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    chips, labels, names = simulated_chips(cfg)
    log(f"{len(chips)} training chips in {time.perf_counter() - t0:.1f} s")
    need = cfg.shots + cfg.queries
    usable = [c for c in range(len(names)) if (labels == c).sum() >= need]
    rng = np.random.default_rng([cfg.seed, 0xE9])
    by = {c: np.flatnonzero(labels == c) for c in usable}
    model = build_encoder(cfg.dim, cfg.width)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(cfg.episodes // 3, 1), gamma=0.5)
    x_all = torch.from_numpy(chips[:, None])
    loss_v = math.nan
    model.train()
    for ep in range(cfg.episodes):
        cls = rng.choice(usable, size=min(cfg.ways, len(usable)), replace=False)
        idx = np.stack([rng.choice(by[c], size=need, replace=False) for c in cls])  # (ways, need)
        x = x_all[torch.from_numpy(idx.reshape(-1))]
        if rng.random() < 0.5:  # a whole episode mirrored: its classes stay consistent within the episode
            x = torch.flip(x, dims=[3])
        e = model(x).reshape(len(cls), need, -1)
        proto = e[:, :cfg.shots].mean(dim=1)
        q = e[:, cfg.shots:].reshape(-1, e.shape[-1])
        logits = -((q[:, None, :] - proto[None]) ** 2).sum(-1)
        target = torch.arange(len(cls)).repeat_interleave(cfg.queries)
        loss = torch.nn.functional.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if (ep + 1) % max(cfg.episodes // 10, 1) == 0:
            log(f"episode {ep + 1}/{cfg.episodes}: loss {loss_v:.3f}")
    model.eval()
    counts = {names[c]: int((labels == c).sum()) for c in range(len(names))}
    return model, {"chips": int(len(chips)), "class_counts": counts, "seconds": time.perf_counter() - t0,
                   "final_loss": loss_v}


def evaluate_simulated(embed, seed: int = EVAL_SEED, frames: int = 90, shots=(1, 2, 5), episodes: int = 100
                       ) -> dict:
    """Few-shot accuracy on held-out simulated specimen chips (a seed not trained on), all 7 classes per
    episode (fewer when a class has too few chips).

    Returns
    -------
    dict
        ``{"shots_1": acc, ...}``, ``classes``, ``chips``.
    """
    rng = np.random.default_rng([seed, 0xEA])
    chips, labels = specimen_chips(seed, frames, rng)
    classes = [c for c in range(len(REGION_CLASSES)) if (labels == c).sum() >= max(shots) + 2]
    out: dict = {f"shots_{k}": episode_accuracy(embed, chips, labels, classes, k, episodes, rng) for k in shots}
    out["classes"] = [REGION_CLASSES[c] for c in classes]
    out["chips"] = int(len(chips))
    out["specimen_seed"] = seed
    return out


def export(model, cfg: TrainConfig, info: dict, out_dir: Path = MODEL_DIR, metrics: dict | None = None) -> Path:
    """Write ``encoder.onnx`` (opset 17, dynamic batch; input ``chips``, output ``embedding``) and
    ``manifest.json`` into ``out_dir``; returns the ONNX path."""
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "encoder.onnx"
    dummy = torch.zeros(2, 1, INPUT_PX, INPUT_PX)
    torch.onnx.export(model, (dummy,), str(path), input_names=["chips"], output_names=["embedding"],
                      dynamic_axes={"chips": {0: "n"}, "embedding": {0: "n"}}, opset_version=17, dynamo=False)
    manifest = {
        "model": "encoder.onnx", "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "input": {"name": "chips", "shape": ["n", 1, INPUT_PX, INPUT_PX], "dtype": "float32",
                  "scaling": "frame scaled by its 1st and 99th percentiles, then resized chips"},
        "output": {"name": "embedding", "shape": ["n", cfg.dim], "dtype": "float32"},
        "architecture": f"Conv-4 ({cfg.width} channels) + linear {cfg.dim}",
        "training_data": {"specimen_seeds": list(TRAIN_SEEDS), "frames_per_seed": cfg.frames_per_seed,
                          "lattice_frames": cfg.lattice_frames, **info},
        "config": asdict(cfg), "metrics": metrics or {}, "sha256": sha256_file(path),
        "source": "beamloop.edge.learn.fewshot_train (beamloop fewshot train)",
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def train_and_export(cfg: TrainConfig | None = None, out_dir: Path = MODEL_DIR, *, log=print) -> dict:
    """:func:`train`, held-out evaluation through the exported ONNX model, :func:`export`; returns the manifest."""
    from beamloop.edge.analysis.fewshot import ChipEncoder

    cfg = cfg or TrainConfig()
    model, info = train(cfg, log=log)
    path = export(model, cfg, info, out_dir)
    enc = ChipEncoder(path)
    metrics = evaluate_simulated(enc.embed)
    log(f"held-out simulated few-shot accuracy: {metrics}")
    export(model, cfg, info, out_dir, metrics)
    return json.loads((Path(out_dir) / "manifest.json").read_text())
