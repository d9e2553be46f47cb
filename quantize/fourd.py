"""The second trigger: a binned 4D-STEM diffraction pattern in, "the probe is over an atomic column" out.

Data come from the 4D-STEM mode of the simulated microscope (:func:`beamloop.edge.sim.fourd.training_patterns`:
MoS2 with point defects, 96x96 detector sum-binned to 16x16, Poisson counts; ``over_column`` is true
when an occupied column lies within 0.5 Angstrom of the probe). The network is the same Brevitas MLP
as the ejection trigger (:func:`beamloop.quantize.model.quant_mlp`) on the 256 binned counts, which are integers
on the input quantiser's grid; export and bit-exact checks are shared (:mod:`beamloop.quantize.export`).

Classical baseline: a virtual annular dark-field detector, the counts outside the bright-field disk
(``r > disk_radius``) over the total, thresholded; over a column more electrons are scattered out of the
disk (:mod:`beamloop.edge.sim.fourd`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from beamloop.edge.trigger.model import IntegerMLP
from beamloop.quantize.manifest import write_manifest

TASK = "over_column: an occupied atomic column lies within 0.5 A of the probe (4D-STEM pattern, 16x16 binned)"


@dataclass
class FourDTrainConfig:
    """Settings of the 4D-STEM trigger's training (stored in the manifest).

    Attributes
    ----------
    detector_px : int
        Binned detector side (the input is ``detector_px**2`` counts).
    electrons : tuple of float
        Probe electrons per position; training chunks cycle through them.
    train, val : int
        Patterns simulated for training and validation.
    chunk : int
        Patterns per simulated specimen (each chunk gets a new specimen and seed).
    hidden : tuple of int
    input_bits, weight_bits, act_bits, bias_bits : int
    float_epochs, qat_epochs, batch : int
    lr_float, lr_qat : float
    seed : int
    """

    detector_px: int = 16
    electrons: tuple = (1000.0, 2000.0, 4000.0)
    train: int = 40000
    val: int = 8000
    chunk: int = 4000
    hidden: tuple = (16, 8)
    input_bits: int = 9
    weight_bits: int = 6
    act_bits: int = 8
    bias_bits: int = 16
    float_epochs: int = 20
    qat_epochs: int = 10
    batch: int = 512
    lr_float: float = 3e-3
    lr_qat: float = 1e-3
    seed: int = 1
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def patterns(n: int, cfg: FourDTrainConfig, seed: int,
             electrons: tuple | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """``n`` labelled binned patterns in chunks of ``cfg.chunk`` (one specimen and dose per chunk).

    Returns
    -------
    x : ndarray (n, detector_px**2), uint16 counts (saturated at ``2**input_bits - 1`` by the network)
    y : ndarray (n,), float32: 1 over a column
    info : dict of (n,) arrays: ``electrons``, ``column_class``, ``distance_A``
    """
    from beamloop.edge.sim.fourd import training_patterns

    electrons = tuple(electrons or cfg.electrons)
    xs, ys, el, cls, dist = [], [], [], [], []
    for k, a in enumerate(range(0, n, cfg.chunk)):
        m = min(cfg.chunk, n - a)
        e = electrons[k % len(electrons)]
        p, lab = training_patterns(m, detector_px=cfg.detector_px, electrons=e, seed=seed * 1000 + k)
        xs.append(np.rint(p).astype(np.uint16).reshape(m, -1))
        ys.append(lab["over_column"].astype(np.float32))
        el.append(np.full(m, e))
        cls.append(lab["column_class"])
        dist.append(lab["distance_A"])
    return (np.concatenate(xs), np.concatenate(ys),
            {"electrons": np.concatenate(el), "column_class": np.concatenate(cls), "distance_A": np.concatenate(dist)})


def exactness_inputs(detector_px: int, input_bits: int, seed: int, n_random: int = 3000,
                     n_simulated: int = 1000) -> np.ndarray:
    """Inputs for bit-exactness checks of a pattern model: Poisson counts of random level (including values
    past the input quantiser's range, which must saturate alike everywhere) and simulated patterns.

    Returns
    -------
    ndarray (n_random + 1000 + n_simulated, detector_px**2), int64
    """
    from beamloop.edge.sim.fourd import training_patterns

    n_in = detector_px * detector_px
    rng = np.random.default_rng(seed)
    x = [rng.poisson(rng.uniform(0, 120, (n_random, 1)), (n_random, n_in)),
         rng.integers(0, 2 ** input_bits + 40, (1000, n_in))]
    if n_simulated:
        p, _ = training_patterns(n_simulated, detector_px=detector_px, electrons=2000.0, seed=seed)
        x.append(np.rint(p).reshape(len(p), -1))
    return np.concatenate(x).astype(np.int64)


def adf_fraction(x: np.ndarray, detector_px: int, disk_radius_px: float | None = None) -> np.ndarray:
    """Virtual ADF detector on binned patterns: counts outside the BF disk over all counts, (n,) float64.

    The disk radius defaults to :class:`beamloop.edge.sim.fourd.FourDConfig`'s, scaled to the binned detector.
    """
    from beamloop.edge.sim.fourd import FourDConfig

    c = FourDConfig()
    scale = detector_px / c.detector_shape[0]
    r = (disk_radius_px if disk_radius_px is not None else c.disk_radius_px) * scale
    cy, cx = (detector_px - 1) / 2, (detector_px - 1) / 2
    yy, xx = np.mgrid[:detector_px, :detector_px]
    outside = (np.hypot(yy - cy, xx - cx) > r).ravel()
    x = np.asarray(x, np.float64)
    return x[:, outside].sum(1) / np.maximum(x.sum(1), 1.0)


def train_fourd(cfg: FourDTrainConfig, progress=print) -> dict:
    """Simulate patterns, train the float MLP and the Brevitas QAT twin (from the float weights)."""
    import torch

    from beamloop.quantize.model import Bits, copy_float_weights, float_mlp, quant_mlp
    from beamloop.quantize.train import _fit

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    x, y, _ = patterns(cfg.train, cfg, cfg.seed)
    xv, yv, _ = patterns(cfg.val, cfg, cfg.seed + 500)
    progress(f"simulated {len(y)} + {len(yv)} patterns ({y.mean():.2f} over a column) "
             f"in {time.perf_counter() - t0:.0f} s")
    n_in = x.shape[1]
    torch.manual_seed(cfg.seed)  # the initial weights too depend on the seed only
    fm = float_mlp(n_in, tuple(cfg.hidden))
    hf = _fit(fm, x, y, cfg.float_epochs, cfg.lr_float, cfg.batch, cfg.seed, "4d-float", xv, yv)
    qm = quant_mlp(n_in, tuple(cfg.hidden), cfg.input_bits, Bits(cfg.weight_bits, cfg.act_bits, cfg.bias_bits))
    copy_float_weights(fm, qm)
    hq = _fit(qm, x, y, cfg.qat_epochs, cfg.lr_qat, cfg.batch, cfg.seed + 1, "4d-qat", xv, yv)
    progress(f"4D-STEM trigger: validation loss float {hf[-1]['val_loss']:.4f}, quantized {hq[-1]['val_loss']:.4f}")
    return {"float_model": fm, "quant_model": qm, "history": {"float": hf, "qat": hq}, "val": (xv, yv),
            "seconds": time.perf_counter() - t0}


def export_fourd(result: dict, cfg: FourDTrainConfig, model_dir: Path, name: str = "fourd_column",
                 progress=print) -> dict:
    """Export the 4D-STEM trigger into ``model_dir`` (same files as :func:`beamloop.quantize.ship.export_model`) and
    record it in the manifest; the threshold is logit 0 (score 0).

    Raises
    ------
    beamloop.quantize.export.ExportError
        Not bit-exact, or not the expected graph.
    """
    from beamloop.quantize.evaluate import FloatMLP, save_float, window_accuracy
    from beamloop.quantize.export import ExportError, agreement, brevitas_outputs, export_qonnx, integer_mlp, plain_onnx

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    files = {"qonnx": f"{name}.onnx", "plain_onnx": f"{name}_plain.onnx", "integer": f"{name}_int.npz",
             "float": f"{name}_float.npz"}
    qm = result["quant_model"]
    xv, yv = result["val"]
    n_in = xv.shape[1]
    m = export_qonnx(qm, n_in, model_dir / files["qonnx"])
    mlp = integer_mlp(m)
    mlp.save(model_dir / files["integer"])
    plain_onnx(m, model_dir / files["plain_onnx"])
    save_float(result["float_model"], model_dir / files["float"])
    held = xv[:2000]  # with fewer validation patterns (--quick), more random ones: at least 5000 inputs in all
    check = np.concatenate([held, exactness_inputs(cfg.detector_px, cfg.input_bits, cfg.seed,
                                                   n_random=4000 - len(held), n_simulated=0)])
    agree = agreement(check, mlp, model_dir / files["qonnx"], model_dir / files["plain_onnx"], qm)
    if any(v != agree["inputs"] for k, v in agree.items() if k != "inputs"):
        raise ExportError(f"4D-STEM trigger exports disagree with the integer runtime: {agree}")
    progress(f"bit-exact on {agree['inputs']} patterns: integer runtime = qonnx = onnxruntime (plain) = Brevitas")
    fl = FloatMLP(model_dir / files["float"])
    from beamloop.quantize.ship import layer_description

    bits = {"input": cfg.input_bits, "weight": cfg.weight_bits, "activation": cfg.act_bits, "bias": cfg.bias_bits}
    entry = {
        "task": TASK,
        "files": files,
        "input": {"shape": [cfg.detector_px, cfg.detector_px], "layout": "row-major, detector rows then columns",
                  "binning": "96x96 detector sum-binned 6x6 (beamloop.edge.sim.fourd.bin_patterns)",
                  "input_bits": cfg.input_bits},
        "layers": layer_description(mlp, bits),
        "bits": bits,
        "scales": {"input": 1.0, "output": mlp.output_scale, "requant_shifts": mlp.shifts.tolist()},
        "threshold": {"score": 0, "logit": 0.0},
        "training": {"date": time.strftime("%Y-%m-%d"), "config": cfg.as_dict(), "seconds": result.get("seconds"),
                     "history": result["history"],
                     "data": "beamloop.edge.sim.fourd.training_patterns: MoS2 with point defects, half the probe "
                             "positions within 0.5 A of a site, Poisson counts at the listed electrons per position"},
        "metrics": {"bit_exact": agree,
                    "validation_patterns": {"float": window_accuracy(xv, yv, fl.logits(xv)),
                                            "quantized": window_accuracy(xv, yv, brevitas_outputs(qm, xv))}},
    }
    write_manifest(model_dir, name, entry)
    return entry


def evaluate_fourd(out: Path, model_dir: Path, name: str = "fourd_column", n: int = 24000, seed: int = 300,
                   update_manifest: bool = False, progress=print) -> dict:
    """Held-out patterns per dose: accuracy and ROC AUC of the quantized model (integer runtime), its float
    twin and the virtual-ADF threshold; true-positive rate at a 1 % false-positive rate; ROC PNG.

    Returns the report (also ``out/eval_fourd.json``; the plot is ``out/roc_fourd.png``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from beamloop.edge.trigger.model import load_manifest
    from beamloop.quantize.evaluate import FloatMLP

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entry = load_manifest(model_dir)["models"][name]
    mlp = IntegerMLP.load(Path(model_dir) / entry["files"]["integer"])
    fl = FloatMLP(Path(model_dir) / entry["files"]["float"])
    cfg = FourDTrainConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                              for k, v in entry["training"]["config"].items()})
    report = {"model": name, "patterns_per_dose": n // len(cfg.electrons), "doses": {}}
    fig, axes = plt.subplots(1, len(cfg.electrons), figsize=(5.5 * len(cfg.electrons), 4.8), squeeze=False)
    for k, e in enumerate(cfg.electrons):
        x, y, _ = patterns(n // len(cfg.electrons), cfg, seed + k, electrons=(e,))
        thr = entry["threshold"]["score"]
        scores = {"model": mlp.scores(x).astype(np.float64), "float": fl.logits(x).astype(np.float64),
                  "adf": adf_fraction(x, cfg.detector_px)}
        res = {}
        for m, s in scores.items():
            fpr, tpr, auc = _roc(s, y)
            ax = axes[0, k]
            ax.plot(fpr, tpr, label=f"{m} (AUC {auc:.4f})", ls=":" if m == "float" else "-")
            i = np.searchsorted(fpr, 0.01, side="right") - 1
            res[m] = {"auc": auc, "tpr_at_fpr_1pct": float(tpr[max(i, 0)])}
        res["model"]["accuracy"] = float(np.mean((scores["model"] >= thr) == (y > 0.5)))
        res["float"]["accuracy"] = float(np.mean((scores["float"] >= 0) == (y > 0.5)))
        best = _best_threshold_accuracy(scores["adf"], y)
        res["adf"]["accuracy_best_threshold"] = best
        ax = axes[0, k]
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate (over a column)")
        ax.set_title(f"4D-STEM trigger, {e:g} e- per position")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        report["doses"][f"{e:g}"] = res
        progress(f"{e:g} e-: " + ", ".join(f"{m} AUC {r['auc']:.4f} TPR@1%FPR {r['tpr_at_fpr_1pct']:.3f}"
                                             for m, r in res.items())
                 + f"; accuracy model {res['model']['accuracy']:.4f} float {res['float']['accuracy']:.4f} "
                   f"ADF (best threshold) {best:.4f}")
    fig.tight_layout()
    fig.savefig(out / "roc_fourd.png", dpi=100)
    plt.close(fig)
    (out / "eval_fourd.json").write_text(json.dumps(report, indent=2))
    if update_manifest:
        entry = load_manifest(model_dir)["models"][name]
        entry["metrics"]["evaluation"] = report
        write_manifest(model_dir, name, entry)
    return report


def _roc(score: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of a score (higher = over a column) against labels ``y`` (n,): fpr, tpr ascending (every
    distinct score is a point of the curve), AUC (:func:`beamloop.quantize.evaluate.binary_roc`)."""
    from beamloop.quantize.evaluate import binary_roc

    return binary_roc(y, score, drop_intermediate=False)


def _best_threshold_accuracy(score: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the best single threshold on ``score`` (an optimistic figure for the baseline)."""
    order = np.argsort(score)
    ys = (y[order] > 0.5).astype(np.int64)
    # predict positive for the top part: accuracy = (negatives below + positives above) / n
    neg_below = np.concatenate([[0], np.cumsum(1 - ys)])
    pos_above = ys.sum() - np.concatenate([[0], np.cumsum(ys)])
    return float(((neg_below + pos_above) / len(ys)).max())
