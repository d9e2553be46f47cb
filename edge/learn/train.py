"""Training the U-Net ensemble on simulated tiles (PyTorch, CPU), with a progress bar and a loss curve.

One data set of noise-free tiles is rendered once (:func:`beamloop.edge.learn.dataset.build_tileset`, cached as
``tiles_<n>x<size>_s<seed>.npz`` in the output folder) and shared by all members; each member starts from its
own random initialisation and sees its own order, doses, noise and artefacts (:class:`Augmenter`).

Batches draw MoS2 tiles 1.5 times as often as others, and doses from :func:`training_dose`. Loss per pixel: ``w (1 + 10
t) (sigmoid(z) - t)^2`` for the heat map (``t`` the Gaussian target, ``w`` zero
around columns too faint to call) plus 0.01 x the cross-entropy of the class channels on the pixels next to
target columns. AdamW with a one-cycle learning-rate schedule (L. N. Smith & N. Topin, "Super-convergence",
arXiv:1708.07120), channels-last tensors (faster convolutions on CPU).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from beamloop.edge.learn.dataset import HELD_OUT_STRUCTURES, TRAIN_STRUCTURES, Augmenter, TileSet, build_tileset

log = logging.getLogger("beamloop.train")


@dataclass
class TrainConfig:
    """Settings of one training run (defaults: the shipped ensemble).

    Attributes
    ----------
    members : int
        Ensemble members (>= 1; the service needs >= 2 for an uncertainty, the issue asks for >= 3).
    steps : int
        Optimiser steps per member.
    batch : int
        Tiles per step.
    tiles : int
        Noise-free tiles rendered for training.
    tile : int
        Tile side, pixels (divisible by 8).
    lr : float
        Peak learning rate.
    seed : int
        Seed of the data set; member ``k`` uses ``seed + 1 + k`` for its weights and augmentation.
    threads : int
        torch intra-op threads.
    val_every : int
        Steps between validation losses (on held-out tiles: other seed, other structures).
    mos2_boost : float
        MoS2 tiles are drawn this many times more often than others (the service's main specimen).
    multislice_fraction : float
        Fraction of the tiles resampled from abTEM cell images (:data:`beamloop.edge.learn.multislice_set.TRAIN_CELLS`,
        no dichalcogenide among them); 0: the project's own simulator only.
    abtem_cache : str
        Folder of the cached abTEM cell images (simulated there on first use; needs abTEM).
    acquisition : bool
        Draw probe tails, backgrounds and detector models per sample
        (:func:`beamloop.edge.learn.dataset.acquisition_model`, :func:`~beamloop.edge.learn.dataset.detector_model`).
    ema_decay : float
        The saved weights are an exponential moving average of the trained ones with this decay per step
        (Polyak averaging: smoother, better-localising heat maps at the end of a short schedule).
    """

    members: int = 3
    steps: int = 1500
    batch: int = 10
    tiles: int = 3000
    tile: int = 128
    lr: float = 3e-3
    seed: int = 0
    threads: int = 2
    val_every: int = 100
    mos2_boost: float = 1.5
    ema_decay: float = 0.995
    multislice_fraction: float = 0.2
    abtem_cache: str = "out/abtem"
    acquisition: bool = True


def loss_terms(logits, heat, weight, classes):
    """Heat and class losses (torch scalars) of a batch: logits (b, 5, h, w); heat, weight (b, 1, h, w);
    classes (b, h, w) int64 with -1 where no class is defined."""
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(logits[:, :1])
    lh = (weight * (1.0 + 10.0 * heat) * (p - heat) ** 2).mean()
    if bool((classes >= 0).any()):
        lc = F.cross_entropy(logits[:, 1:], classes, ignore_index=-1)
    else:
        lc = logits.sum() * 0.0
    return lh, lc


def total_loss(lh, lc):
    """The optimised loss: the heat term dominates (localisation is the product), the class term guides."""
    return 20.0 * lh + 0.2 * lc


def _tiles(cfg: TrainConfig, out: Path, progress: bool) -> TileSet:
    ms = f"_ms{int(round(100 * cfg.multislice_fraction))}" if cfg.multislice_fraction > 0 else ""
    path = out / f"tiles_{cfg.tiles}x{cfg.tile}_s{cfg.seed}{ms}.npz"
    if path.exists():
        log.info("reusing %s", path)
        return TileSet.load(path)
    cells = None
    fraction = cfg.multislice_fraction
    if fraction > 0:
        from beamloop.edge.learn.multislice_set import train_cells

        try:
            cells = train_cells(cfg.abtem_cache)
        except ImportError as exc:  # no abTEM and no cached cells: the project's simulator only, said loudly
            log.warning("no abTEM cells (%s): training on the project's simulator only", exc)
            fraction = 0.0
    ts = build_tileset(cfg.tiles, (cfg.tile, cfg.tile), cfg.seed, progress=progress, cells=cells,
                       multislice_fraction=fraction)
    ts.save(path)
    return ts


def validation_set(n: int = 24, tile: int = 128, seed: int = 10_000) -> tuple:
    """A fixed batch of held-out tiles (seed, structures and noise unlike training): inputs and targets."""
    weights = dict(TRAIN_STRUCTURES)
    for name in HELD_OUT_STRUCTURES:
        weights[name] = 0.1
    ts = build_tileset(n, (tile, tile), seed, weights, progress=False)
    return Augmenter(ts, np.random.default_rng(seed)).batch(range(n))


def train_member(k: int, tiles: TileSet, val, cfg: TrainConfig, progress: bool = True):
    """Train member ``k``; returns ``(model, history)`` with history ``{"step", "loss", "val_step", "val_loss"}``."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    from tqdm import tqdm

    from beamloop.edge.learn.model import UNet

    torch.manual_seed(cfg.seed + 1 + k)
    rng = np.random.default_rng(cfg.seed + 1 + k)
    aug = Augmenter(tiles, rng, dose_sampler=training_dose, acquisition=cfg.acquisition)
    model = UNet().to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
    vx, vh, vw, vc = (torch.from_numpy(a) for a in val)
    vx = vx.contiguous(memory_format=torch.channels_last)
    hist = {"step": [], "loss": [], "heat": [], "val_step": [], "val_loss": []}
    p = np.where(tiles.structures == "MoS2", cfg.mos2_boost, 1.0)
    p /= p.sum()
    bar = tqdm(range(cfg.steps), desc=f"member {k + 1}/{cfg.members}", disable=not progress, unit="step")
    for step in bar:
        idx = rng.choice(len(tiles), cfg.batch, replace=False, p=p)
        x, h, w, c = (torch.from_numpy(a) for a in aug.batch(idx))
        model.train()
        lh, lc = loss_terms(model(x.contiguous(memory_format=torch.channels_last)), h, w, c)
        loss = total_loss(lh, lc)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)
        hist["step"].append(step)
        hist["loss"].append(float(loss.detach()))
        hist["heat"].append(float(lh.detach()))
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            ema.eval()
            with torch.no_grad():
                vl = float(total_loss(*loss_terms(ema(vx), vh, vw, vc)))
            hist["val_step"].append(step)
            hist["val_loss"].append(vl)
            bar.set_postfix(loss=f"{np.mean(hist['loss'][-50:]):.4f}", val=f"{vl:.4f}")
    return ema.module.eval(), hist


def training_dose(rng: np.random.Generator) -> float:
    """Dose of one training sample, e-/A^2: half log-uniform over 1e3-1e6, half log-uniform over 3e3-3e5 (the
    service's working range, where columns are faint but findable, gets more of the budget)."""
    lo, hi = (3.0, 6.0) if rng.random() < 0.5 else (3.5, 5.5)
    return float(10.0 ** rng.uniform(lo, hi))


def plot_curves(histories: list[dict], path: Path) -> Path:
    """Training curve PNG: running-mean training loss and validation loss per member, log scale."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for k, h in enumerate(histories):
        loss = np.asarray(h["loss"])
        win = max(len(loss) // 50, 1)
        smooth = np.convolve(loss, np.ones(win) / win, mode="valid")
        line, = ax.plot(np.arange(len(smooth)) + win - 1, smooth, lw=1, label=f"member {k + 1} train")
        ax.plot(h["val_step"], h["val_loss"], "o--", ms=3, color=line.get_color(), label=f"member {k + 1} held-out")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("U-Net ensemble: training and held-out loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def train(out: str | Path, cfg: TrainConfig | None = None, progress: bool = True) -> dict:
    """Train the ensemble: render (or reuse) the tiles, train each member, save weights, history and curve.

    Writes ``member_<k>.pt`` (state dicts), ``history.json``, ``training_curve.png`` and ``train.json``
    (settings and timings) in ``out``.

    Returns
    -------
    dict
        The contents of ``train.json``.

    Raises
    ------
    ValueError
        Fewer than one member, no steps, or a tile side not divisible by 8.
    """
    import torch

    cfg = cfg or TrainConfig()
    if cfg.members < 1 or cfg.steps < 1 or cfg.tile % 8 or cfg.batch < 1:
        raise ValueError(f"invalid training settings {cfg}")
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tiles = _tiles(cfg, out, progress)
    t_data = time.perf_counter() - t0
    val = validation_set(tile=cfg.tile)
    histories, member_s = [], []
    for k in range(cfg.members):
        t1 = time.perf_counter()
        model, hist = train_member(k, tiles, val, cfg, progress)
        member_s.append(time.perf_counter() - t1)
        torch.save(model.state_dict(), out / f"member_{k}.pt")
        histories.append(hist)
    (out / "history.json").write_text(json.dumps(histories))
    plot_curves(histories, out / "training_curve.png")
    info = {
        "config": asdict(cfg),
        "data_seconds": round(t_data, 1),
        "member_seconds": [round(s, 1) for s in member_s],
        "total_seconds": round(time.perf_counter() - t0, 1),
        "final_val_loss": [h["val_loss"][-1] for h in histories],
        "train_structures": TRAIN_STRUCTURES,
        "tile_sources": {str(k): int(v) for k, v in zip(*np.unique(tiles.structures, return_counts=True))},
        "torch": torch.__version__,
        "threads": cfg.threads,
        "date": time.strftime("%Y-%m-%d"),
    }
    (out / "train.json").write_text(json.dumps(info, indent=1))
    return info


def load_members(out: str | Path, members: int | None = None) -> list:
    """The trained members saved by :func:`train` (eval mode). Raises ``FileNotFoundError`` when none."""
    import torch

    from beamloop.edge.learn.model import UNet

    paths = sorted(Path(out).glob("member_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if members is not None:
        paths = paths[:members]
    if not paths:
        raise FileNotFoundError(f"no member_<k>.pt in {out}; run `beamloop train` first")
    models = []
    for p in paths:
        m = UNet()
        m.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        models.append(m.eval())
    return models

