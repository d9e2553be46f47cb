"""Training the ejection trigger: simulated segments -> labelled feature windows -> float MLP -> Brevitas QAT.

Labels: a decision at sample ``t`` is positive when the event happened at or before ``t`` (the atom is
gone; ``t - event`` is the delay), negative before the event or on a stream without one; decisions long
after the event are left out (:func:`make_windows`). The float
network is trained first; the quantized network starts from its weights and is fine-tuned with
quantization in the loop (straight-through estimators, Brevitas).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from beamloop.edge.trigger.model import FeatureSpec, window_features
from beamloop.quantize.data import NO_EVENT, StreamConditions, Streams, training_segments

log = logging.getLogger("beamloop.quantize")


@dataclass
class Windows:
    """Labelled decisions.

    Attributes
    ----------
    x : ndarray, shape (n, n_features), uint16
        Integer feature vectors.
    y : ndarray, shape (n,), float32
        1 when the atom is gone at the decided sample.
    delay : ndarray, shape (n,), int32
        Samples since the event (-1 for negatives).
    """

    x: np.ndarray
    y: np.ndarray
    delay: np.ndarray


def make_windows(streams: Streams, spec: FeatureSpec, per_stream: int, seed: int,
                 max_delay: int | None = None) -> Windows:
    """Draw ``per_stream`` decision samples from each stream and label them (see the module docstring).

    Decisions more than ``max_delay`` samples after the event (default ``spec.history - spec.window``: at
    least one context block still before the event) are left out: once the whole history lies after
    the event it looks like an intact column at a lower rate, and labelling it positive would teach the
    network to read absolute levels instead of the drop.

    Raises ``ValueError`` when a stream is shorter than ``spec.history``.
    """
    if max_delay is None:
        max_delay = spec.history - spec.window
    rng = np.random.default_rng(seed)
    xs, ys, ds = [], [], []
    for counts, ev in zip(streams.counts, streams.event):
        if len(counts) < spec.history:
            raise ValueError(f"stream of {len(counts)} samples is shorter than the model's history {spec.history}")
        ends = rng.choice(np.arange(spec.history - 1, len(counts)),
                          size=min(per_stream, len(counts) - spec.history + 1), replace=False)
        if ev != NO_EVENT:
            ends = ends[ends - ev <= max_delay]
        xs.append(window_features(counts, spec, ends).astype(np.uint16))
        gone = (ev != NO_EVENT) & (ends >= ev)
        ys.append(gone.astype(np.float32))
        ds.append(np.where(gone, ends - ev, -1).astype(np.int32))
    return Windows(np.concatenate(xs), np.concatenate(ys), np.concatenate(ds))


@dataclass
class TrainConfig:
    """Everything that decides a training run (stored in the manifest).

    Attributes
    ----------
    spec : FeatureSpec
    hidden : tuple of int
        Hidden layer widths.
    weight_bits, act_bits, bias_bits : int
    segments : int
        Training segments simulated (another ``segments // 5`` for validation).
    segment_length : int
        Samples per segment.
    event_fraction : float
    windows_per_segment : int
    float_epochs, qat_epochs : int
    mining_rounds : int
        Rounds of hard-negative mining after the float training (0: none).
    mining_segments, mining_length : int
        Event-free segments simulated per round, and their length in samples.
    mining_top : int
        Highest-scoring event-free decisions added to the training set per round (label 0).
    finetune_epochs : int
        Float epochs after each mining round.
    batch : int
    lr_float, lr_qat : float
    seed : int
    conditions : StreamConditions
    """

    spec: FeatureSpec = field(default_factory=FeatureSpec)
    hidden: tuple = (16, 8)
    weight_bits: int = 6
    act_bits: int = 8
    bias_bits: int = 16
    segments: int = 40000
    segment_length: int = 320
    event_fraction: float = 0.5
    windows_per_segment: int = 24
    float_epochs: int = 10
    qat_epochs: int = 8
    mining_rounds: int = 2
    mining_segments: int = 3000
    mining_length: int = 4096
    mining_top: int = 100_000
    finetune_epochs: int = 4
    batch: int = 1024
    lr_float: float = 3e-3
    lr_qat: float = 1e-3
    seed: int = 1

    conditions: StreamConditions = field(default_factory=StreamConditions)

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return {"features": self.spec.as_dict(), "hidden": list(self.hidden),
                "bits": {"input": self.spec.input_bits, "weight": self.weight_bits, "activation": self.act_bits,
                         "bias": self.bias_bits},
                "segments": self.segments, "segment_length": self.segment_length,
                "event_fraction": self.event_fraction, "windows_per_segment": self.windows_per_segment,
                "float_epochs": self.float_epochs, "qat_epochs": self.qat_epochs, "batch": self.batch,
                "mining": {"rounds": self.mining_rounds, "segments": self.mining_segments,
                           "length": self.mining_length, "top": self.mining_top,
                           "finetune_epochs": self.finetune_epochs},
                "lr_float": self.lr_float, "lr_qat": self.lr_qat, "seed": self.seed,
                "conditions": self.conditions.as_dict()}


def dataset(cfg: TrainConfig, n_segments: int, seed: int) -> Windows:
    """Simulate ``n_segments`` training segments (events between ``history - window`` and the end, so that
    decisions see the event anywhere from the context to the newest sample) and draw labelled windows."""
    lo = max(cfg.spec.history - cfg.spec.window - 64, 1)
    segs = training_segments(n_segments, cfg.segment_length, (lo, cfg.segment_length), cfg.event_fraction,
                             cfg.conditions, seed)
    return make_windows(segs, cfg.spec, cfg.windows_per_segment, seed + 1)


def _fit(model, x, y, epochs: int, lr: float, batch: int, seed: int, what: str, xv=None, yv=None) -> list[dict]:
    """Adam on binary cross-entropy with a cosine learning-rate decay; returns per-epoch losses."""
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    history = []
    for ep in range(epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(xt), generator=g)
        total = 0.0
        for k in range(0, len(xt), batch):
            idx = perm[k:k + batch]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]).reshape(-1), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        row = {"epoch": ep + 1, "train_loss": total / len(xt), "seconds": time.perf_counter() - t0}
        if xv is not None:
            model.eval()
            with torch.no_grad():
                lv = torch.from_numpy(xv.astype(np.float32))
                row["val_loss"] = float(loss_fn(model(lv).reshape(-1), torch.from_numpy(yv)))
        history.append(row)
        log.info("%s epoch %d: %s", what, ep + 1, row)
    model.eval()
    return history


def mine_hard_negatives(model, cfg: TrainConfig, seed: int) -> tuple[np.ndarray, float]:
    """The ``cfg.mining_top`` event-free decisions on which ``model`` gives the highest logits.

    A detector that must raise fewer than one false alarm in ~1e7 decisions is decided by the far tail
    of its scores on intact columns, which random training windows hardly sample. Each round simulates
    ``cfg.mining_segments`` event-free segments of ``cfg.mining_length`` samples (the training nuisances),
    scores every decision and keeps the worst (bootstrapping, as in K.-K. Sung & T. Poggio, IEEE TPAMI
    20, 39-51 (1998)).

    Returns
    -------
    features : ndarray, shape (cfg.mining_top, n_features), uint16
    threshold : float
        The smallest logit kept.
    """
    import torch

    segs = training_segments(cfg.mining_segments, cfg.mining_length, (0, 1), 0.0, cfg.conditions, seed)
    per = max(4 * cfg.mining_top // max(cfg.mining_segments, 1), 1)
    feats, scores = [], []
    model.eval()
    with torch.no_grad():
        for counts in segs.counts:
            f = window_features(counts, cfg.spec)
            s = model(torch.from_numpy(f.astype(np.float32))).reshape(-1).numpy()
            k = np.argpartition(s, -per)[-per:] if len(s) > per else np.arange(len(s))
            feats.append(f[k].astype(np.uint16))
            scores.append(s[k])
    f = np.concatenate(feats)
    s = np.concatenate(scores)
    top = np.argsort(s)[::-1][:cfg.mining_top]
    return f[top], float(s[top[-1]])


def train(cfg: TrainConfig, progress=print) -> dict:
    """Simulate data, train the float network, then the quantized one.

    Returns
    -------
    dict with ``float_model`` and ``quant_model`` (torch modules), ``history`` and the validation
    ``Windows`` (``val``).
    """
    import torch

    from beamloop.quantize.model import Bits, copy_float_weights, float_mlp, quant_mlp

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    tr = dataset(cfg, cfg.segments, cfg.seed)
    va = dataset(cfg, max(cfg.segments // 5, 100), cfg.seed + 1000)
    progress(f"simulated {cfg.segments} + {max(cfg.segments // 5, 100)} segments -> {len(tr.y)} training and "
             f"{len(va.y)} validation windows ({tr.y.mean():.2f} positive) in {time.perf_counter() - t0:.0f} s")
    torch.manual_seed(cfg.seed)  # the initial weights too depend on the seed only
    fm = float_mlp(cfg.spec.n_features, tuple(cfg.hidden))
    hf = _fit(fm, tr.x, tr.y, cfg.float_epochs, cfg.lr_float, cfg.batch, cfg.seed, "float", va.x, va.y)
    progress(f"float network: validation loss {hf[-1]['val_loss']:.4f}")
    x, y = tr.x, tr.y
    mined = []
    for r in range(cfg.mining_rounds):
        hard, lowest = mine_hard_negatives(fm, cfg, cfg.seed + 2000 + r)
        x = np.concatenate([x, hard])
        y = np.concatenate([y, np.zeros(len(hard), np.float32)])
        hf += _fit(fm, x, y, cfg.finetune_epochs, cfg.lr_float / 3, cfg.batch, cfg.seed + 10 + r, f"float-mined{r + 1}",
                   va.x, va.y)
        mined.append({"round": r + 1, "added": int(len(hard)), "lowest_logit": lowest})
        progress(f"hard negatives round {r + 1}: {len(hard)} event-free decisions with logits >= {lowest:.2f} added; "
                 f"validation loss {hf[-1]['val_loss']:.4f}")
    qm = quant_mlp(cfg.spec.n_features, tuple(cfg.hidden), cfg.spec.input_bits,
                   Bits(cfg.weight_bits, cfg.act_bits, cfg.bias_bits))
    copy_float_weights(fm, qm)
    hq = _fit(qm, x, y, cfg.qat_epochs, cfg.lr_qat, cfg.batch, cfg.seed + 1, "qat", va.x, va.y)
    progress(f"quantized network: validation loss {hq[-1]['val_loss']:.4f}")
    return {"float_model": fm, "quant_model": qm, "history": {"float": hf, "qat": hq, "mining": mined}, "val": va,
            "seconds": time.perf_counter() - t0}
