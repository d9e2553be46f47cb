"""From a trained pair of networks to the files the service and the FPGA flow load.

:func:`export_model` writes, into a model folder (training's default is ``out/models/trigger/``;
:func:`beamloop.quantize.manifest.ship` copies a model into the shipped ``edge/models/trigger/``):

- ``<name>.onnx``: QONNX graph, batch 1: Quant/MatMul/Add/Relu, power-of-two scales; read by hls4ml /
  da4ml (:mod:`beamloop.fpga`) and the tests;
- ``<name>_plain.onnx``: the same network in standard ONNX ops (opset 13); read by onnxruntime;
- ``<name>_int.npz``: integer weights, biases, requantisation shifts; read by :mod:`beamloop.edge.trigger.model`;
- ``<name>_float.npz``: the float twin's weights; read by ``beamloop quantize eval``;
- ``manifest.json``: per model: files, features, bit widths, scales, threshold, training data, metrics; read
  by all of the above (:func:`beamloop.quantize.manifest.write_manifest`).

It checks, before writing the manifest, that the integer runtime, qonnx execution, onnxruntime on the plain
graph and the Brevitas network agree exactly on held-out windows and on random inputs, and calibrates the
operating threshold on simulated dwells for a target false-trigger rate (the smallest threshold whose
false-trigger rate does not exceed the target, :func:`beamloop.quantize.evaluate.calibrate`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from beamloop.edge.trigger.model import ModelTrigger
from beamloop.quantize.data import StreamConditions, dwell_streams
from beamloop.quantize.evaluate import (
    FloatMLP,
    calibrate,
    candidate_thresholds,
    method_scores,
    save_float,
    sweep,
    window_accuracy,
)
from beamloop.quantize.export import agreement, brevitas_outputs, export_qonnx, integer_mlp, plain_onnx
from beamloop.quantize.manifest import write_manifest
from beamloop.quantize.train import TrainConfig, Windows


def layer_description(mlp, bits: dict) -> list[dict]:
    """Per-layer widths and integer ranges for the FPGA flow.

    ``acc_bits`` is the signed width that holds every accumulator value the layer can produce from inputs
    in their full range (``[0, input_max]`` or ``[0, act_max]``), bias included.
    """
    rows = []
    for k, w in enumerate(mlp.weights):
        last = k == len(mlp.weights) - 1
        in_max = mlp.input_max if k == 0 else int(mlp.act_max[k - 1])
        b = mlp.biases[k]
        hi = int((np.clip(w, 0, None).sum(1) * in_max + b).max())
        lo = int((np.clip(w, None, 0).sum(1) * in_max + b).min())
        acc_bits = max(hi, -lo - 1, 1).bit_length() + 1
        rows.append({"layer": k, "in": int(w.shape[1]), "out": int(w.shape[0]), "input_max": in_max,
                     "weight_bits": bits["weight"],
                     "weight_min": int(w.min()), "weight_max": int(w.max()), "bias_bits": bits["bias"],
                     "bias_min": int(b.min()), "bias_max": int(b.max()), "acc_min": lo, "acc_max": hi,
                     "acc_bits": acc_bits,
                     "activation": "none (score = accumulator)" if last else
                     f"relu, unsigned {bits['activation']} bits, floor(acc * 2^{int(mlp.shifts[k])})"})
    return rows


def export_model(result: dict, cfg: TrainConfig, model_dir: Path, name: str = "ejection",
                 target_fa_per_s: float = 0.05, calibration_dwells: int = 1500, seed: int = 90,
                 progress=print) -> dict:
    """Export a trained pair (``result`` of :func:`beamloop.quantize.train.train`) into ``model_dir``.

    Returns the manifest entry.

    Raises
    ------
    beamloop.quantize.export.ExportError
        The export is not bit-exact or not the expected graph.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    files = {"qonnx": f"{name}.onnx", "plain_onnx": f"{name}_plain.onnx", "integer": f"{name}_int.npz",
             "float": f"{name}_float.npz"}
    qm = result["quant_model"]
    m = export_qonnx(qm, cfg.spec.n_features, model_dir / files["qonnx"])
    mlp = integer_mlp(m)
    mlp.save(model_dir / files["integer"])
    plain_onnx(m, model_dir / files["plain_onnx"])
    save_float(result["float_model"], model_dir / files["float"])

    va: Windows = result["val"]
    rng = np.random.default_rng(seed)
    check = np.concatenate([va.x[rng.choice(len(va.x), min(4000, len(va.x)), replace=False)],
                            rng.integers(0, cfg.spec.input_max + 1, (1000, cfg.spec.n_features))]).astype(np.int64)
    agree = agreement(check, mlp, model_dir / files["qonnx"], model_dir / files["plain_onnx"], qm)
    bad = {k: v for k, v in agree.items() if k != "inputs" and v != agree["inputs"]}
    if bad:
        from beamloop.quantize.export import ExportError

        raise ExportError(f"exports disagree with the integer runtime: {agree}")
    progress(f"bit-exact on {agree['inputs']} inputs: integer runtime = qonnx = onnxruntime (plain) = Brevitas")

    fl = FloatMLP(model_dir / files["float"])
    acc = {"float": window_accuracy(va.x, va.y, fl.logits(va.x)),
           "quantized": window_accuracy(va.x, va.y, brevitas_outputs(qm, va.x))}
    bits = {"input": cfg.spec.input_bits, "weight": cfg.weight_bits, "activation": cfg.act_bits,
            "bias": cfg.bias_bits}
    entry = {
        "task": "ejection: the atom under the parked probe is gone (S2 -> S1 or a hop away)",
        "files": files,
        "features": cfg.spec.as_dict(),
        "sample_time_us": cfg.conditions.sample_time_us,
        "layers": layer_description(mlp, bits),
        "bits": bits,
        "scales": {"input": 1.0, "output": mlp.output_scale, "requant_shifts": mlp.shifts.tolist()},
        "threshold": {"score": 0, "logit": 0.0},
        "training": {"date": time.strftime("%Y-%m-%d"), "config": cfg.as_dict(), "seconds": result.get("seconds"),
                     "history": result["history"],
                     "data": "simulated parked-probe ADF segments (quantize/data.py): Poisson counts from the linear "
                             "HAADF model of a MoS2 patch with point defects (edge/sim), beam-current fluctuation "
                             "(OU + trend), probe offset and drift off the column, background, and an S ejection or a "
                             "hop to a neighbour site at a random sample in half of the segments"},
        "metrics": {"bit_exact": agree, "validation_windows": acc},
    }
    write_manifest(model_dir, name, entry)

    # operating point: calibrated on simulated dwells with the training nuisances (not the test seeds)
    cond = StreamConditions()
    cal = dwell_streams(calibration_dwells, cond, seed)
    trig = ModelTrigger(name, threshold=0, model_dir=model_dir)
    sc = method_scores(cal, "model", trig)
    sw = sweep(sc, cal.event, candidate_thresholds(sc, cal.event), cal.sample_time_us)
    thr = calibrate(sw, target_fa_per_s)
    if not math.isfinite(thr):
        thr = float(sw.thresholds[-1])
    k = int(np.searchsorted(sw.thresholds, thr))
    entry["threshold"] = {"score": int(math.ceil(thr)), "logit": math.ceil(thr) * mlp.output_scale,
                          "target_fa_per_s": target_fa_per_s,
                          "calibration": {"dwells": calibration_dwells, "seconds": cal.seconds, "seed": seed,
                                          "conditions": "training ranges (StreamConditions())", **sw.at(k)}}
    write_manifest(model_dir, name, entry)
    progress(f"threshold {entry['threshold']['score']} (logit {entry['threshold']['logit']:.3f}) for "
             f"{target_fa_per_s} false triggers per second: calibration {sw.at(k)}")
    return entry
