"""Exporting the trained ensemble to ONNX (opset 17) in FP32, FP16 and INT8, evaluating it, and writing the manifest.

- FP32: ``torch.onnx.export`` of :class:`beamloop.edge.learn.model.Ensemble` after folding batch norms, with a fixed
  input ``image`` (1, 1, T, T) and outputs ``heat`` (1, M, T, T), ``classes`` (1, 4, T, T).
- FP16: weights and activations in half precision (onnxconverter-common's ``convert_float_to_float16``), inputs
  and outputs kept float32.
- INT8: ONNX Runtime static quantization (QDQ, per-channel int8 weights, uint8 activations) calibrated on
  simulated held-out tiles of every training structure over the whole dose range; the heads (last 1x1
  convolutions) stay in float so that the heat maps keep their sub-pixel shape.

The manifest (``manifest.json``) records the files, their SHA-256, tile size, members, classes, training
data and settings, date, and the held-out metrics of each precision (:mod:`beamloop.edge.learn.evaluate`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from beamloop.edge.learn.dataset import HELD_OUT_STRUCTURES, TRAIN_STRUCTURES, Augmenter, build_tileset
from beamloop.edge.stages.unet import HEAT_SIGMA_PX, SEG_CLASSES, default_model_dir

log = logging.getLogger("beamloop.export")

OPSET = 17
TILE = 256
"""Side of the exported model's fixed input tile, pixels."""

IR_VERSION = 9
"""ONNX IR version written (onnxruntime >= 1.16 reads it; newer onnx packages default to IR versions that
older runtimes refuse)."""

FILES = {"fp32": "unet_fp32.onnx", "fp16": "unet_fp16.onnx", "int8": "unet_int8.onnx"}


def export_fp32(members, path: Path, tile: int = TILE) -> Path:
    """Fold batch norms, wrap the members in an :class:`Ensemble`, and export it (see module docstring)."""
    import onnx
    import torch

    from beamloop.edge.learn.model import Ensemble, fuse_batchnorm

    ens = Ensemble([fuse_batchnorm(m) for m in members]).eval()
    x = torch.zeros(1, 1, tile, tile)
    torch.onnx.export(ens, (x,), str(path), input_names=["image"], output_names=["heat", "classes"],
                      opset_version=OPSET, dynamo=False, do_constant_folding=True)
    model = onnx.load(str(path))
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_fp16(src: Path, dst: Path) -> Path:
    """Half-precision copy of ``src`` with float32 inputs and outputs (onnxconverter-common)."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    model.ir_version = min(model.ir_version, IR_VERSION)
    onnx.save(model, str(dst))
    return dst


def calibration_tiles(n: int = 32, tile: int = TILE, seed: int = 20_000) -> np.ndarray:
    """Normalised simulated tiles (n, 1, tile, tile) float32 for INT8 calibration: every training structure,
    doses 1e3-1e6, the training augmentations; seeds apart from training and evaluation."""
    ts = build_tileset(n, (tile, tile), seed, progress=False)
    return Augmenter(ts, np.random.default_rng(seed)).batch(range(n))[0]


def export_int8(src: Path, dst: Path, calib: np.ndarray) -> Path:
    """ONNX Runtime static quantization of ``src`` (QDQ, per-channel), calibrated on ``calib`` (n, 1, T, T)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"image": x[None].astype(np.float32)}

    pre = dst.with_suffix(".pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    heads = [n.name for n in model.graph.node if n.op_type == "Conv"
             and any(a.name == "kernel_shape" and list(a.ints) == [1, 1] for a in n.attribute)]
    log.info("quantizing %d convolutions, keeping %d heads in float", len(convs) - len(heads), len(heads))
    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=heads,
                    op_types_to_quantize=["Conv", "MaxPool", "Concat", "Resize", "Relu"])
    pre.unlink(missing_ok=True)
    q = onnx.load(str(dst))
    q.ir_version = min(q.ir_version, IR_VERSION)
    onnx.save(q, str(dst))
    return dst


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_all(work: Path, to: Path | None = None, quick: bool = False, progress: bool = True) -> dict:
    """Export the members trained in ``work`` to ``to`` (default: ``<work>/model``; ``beamloop export --ship``
    copies it into the package) in all three
    precisions, evaluate each on the held-out sets, and write ``manifest.json``.

    Returns
    -------
    dict
        The manifest.

    Raises
    ------
    FileNotFoundError
        No trained members in ``work``.
    """
    from beamloop.edge.learn.train import load_members

    work = Path(work)
    to = Path(to) if to else work / "model"
    to.mkdir(parents=True, exist_ok=True)
    members = load_members(work)
    t0 = time.perf_counter()
    export_fp32(members, to / FILES["fp32"])
    export_fp16(to / FILES["fp32"], to / FILES["fp16"])
    export_int8(to / FILES["fp32"], to / FILES["int8"], calibration_tiles(16 if quick else 32))
    t_export = time.perf_counter() - t0
    train_info = json.loads((work / "train.json").read_text()) if (work / "train.json").is_file() else {}
    manifest = {
        "name": "beamloop U-Net ensemble for atomic columns",
        "date": time.strftime("%Y-%m-%d"),
        "files": dict(FILES),
        "sha256": {p: _sha256(to / f) for p, f in FILES.items()},
        "size_bytes": {p: (to / f).stat().st_size for p, f in FILES.items()},
        "opset": OPSET,
        "tile": TILE,
        "members": len(members),
        "classes": list(SEG_CLASSES),
        "heat_sigma_px": HEAT_SIGMA_PX,
        "input": "frame minus its mean, divided by its standard deviation (beamloop.edge.stages.unet.normalise_frame)",
        "training_data": {
            "simulator": ("beamloop.edge.sim linear incoherent HAADF model (abTEM single-atom profiles), "
                          "beamloop.edge.learn.dataset"),
            "structures": TRAIN_STRUCTURES,
            "held_out_structures": list(HELD_OUT_STRUCTURES),
            "pixel_size_A": [0.05, 0.3],
            "dose_e_per_A2": [1e3, 1e6],
            "augmentation": "blur 0.15-0.45 A, drift/wobble/jitter 0-2x typical, rotation, vacancies, partial "
                            "columns, substitutions, grain boundaries, holes, smooth background, line streaks, "
                            "read noise, 8-bit contrast stretch, flips",
        },
        "training": train_info,
        "export_seconds": round(t_export, 1),
    }
    (to / "manifest.json").write_text(json.dumps(manifest, indent=1))  # the finder reads it; metrics follow
    return write_metrics(to, quick, progress)


def write_metrics(to: Path | None = None, quick: bool = False, progress: bool = True) -> dict:
    """Evaluate every precision of the model in ``to`` (default: the shipped folder) and the classical finder on
    the held-out sets (:func:`beamloop.edge.learn.evaluate.held_out_sets`) with the current serving code (column
    extraction included), and store the figures in the manifest's ``metrics``. Returns the manifest.

    Raises
    ------
    beamloop.edge.stages.unet.ModelError
        No manifest or model files in ``to``.
    """
    from beamloop.edge.learn import evaluate
    from beamloop.edge.stages.unet import UNetFinder, load_manifest

    to = Path(to) if to else default_model_dir()
    manifest = load_manifest(to)
    sets = evaluate.held_out_sets(quick)
    metrics = {}
    for prec in manifest["files"]:
        finder = UNetFinder(to, prec, device="cpu")
        metrics[prec] = evaluate.evaluate(evaluate.unet_find(finder), sets)
        if progress:
            print(f"{prec}: " + ", ".join(f"{k} {v['recall']:.3f}/{v['precision']:.3f}/{v['rms_pm']:.1f}pm"
                                          for k, v in metrics[prec].items()), flush=True)
    metrics["classical"] = evaluate.evaluate(evaluate.classical_find(), sets)
    manifest["metrics"] = metrics
    manifest["metrics_note"] = ("held-out simulated frames (beamloop.edge.learn.evaluate): recall / precision / "
                                "RMS pm, "
                                "0.5 A matching and edge margin; MoS2 256x256 at 0.15 A/px")
    manifest["metrics_date"] = time.strftime("%Y-%m-%d")
    (to / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
