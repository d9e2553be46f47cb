"""``beamloop quantize``: train, export and evaluate the quantized trigger models.

- ``beamloop quantize train [--task ejection|fourd] [--ship]``: simulate training data, train the float
  network and the Brevitas quantization-aware one, export QONNX / plain ONNX / integers into a model folder
  (``--model-dir``, default ``out/models/trigger``), check that they are bit-exact, calibrate the threshold;
  the checkpoint goes to ``--out``. ``--ship`` then copies the model into the installed package's folder
  (:data:`beamloop.edge.trigger.model.MODEL_DIR`), which the service loads.
- ``beamloop quantize export [--ship]``: the export step again from a checkpoint.
- ``beamloop quantize eval``: ROC PNG, false-trigger rate per second of dwell, detection delay, float vs
  quantized and the classical triggers on the same held-out dwells; for the 4D-STEM trigger, ROC and
  accuracy per dose against a virtual ADF detector. It reads the shipped models by default.
- ``beamloop quantize streams --out FILE``: simulated parked-probe dwells (events anywhere, the training
  nuisances) in the file format ``beamloop fpga sim --stream`` reads.
- ``beamloop quantize ship NAME --model-dir DIR``: copy a trained model (its files and manifest entry, with the
  metrics ``eval --update-manifest`` stored) into the installed package, as ``train --ship`` does.

torch, brevitas and qonnx (the ``quant`` extra) are imported by the command functions only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from beamloop.edge.trigger.model import MODEL_DIR
from beamloop.quantize.manifest import DEFAULT_MODEL_DIR, ship


def _ints(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers (``"16,8"``); raises ``ArgumentTypeError``."""
    try:
        v = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: widths must be positive")
    return v


def _need_quant_extra() -> None:
    """Raise ``RuntimeError`` naming the missing package when the ``quant`` extra is not installed."""
    import importlib

    for name in ("torch", "brevitas", "qonnx", "onnx", "onnxoptimizer"):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RuntimeError(f"{name} is not installed ({exc}); training and export need the quant extra: "
                               "pip install -e '.[quant]'") from None


def _config(a: argparse.Namespace):
    """The :class:`~beamloop.quantize.train.TrainConfig` of ``quantize train``'s arguments (``--quick``: a
    smoke run)."""
    from beamloop.edge.trigger.model import FeatureSpec
    from beamloop.quantize.train import TrainConfig

    spec = FeatureSpec(window=a.window, blocks=a.blocks, block=a.block, shift=a.shift, input_bits=a.input_bits)
    cfg = TrainConfig(spec=spec, hidden=a.hidden, weight_bits=a.weight_bits, act_bits=a.act_bits,
                      bias_bits=a.bias_bits, segments=a.segments, float_epochs=a.float_epochs,
                      qat_epochs=a.qat_epochs, mining_rounds=a.mining_rounds, seed=a.seed)
    if a.quick:
        cfg.segments, cfg.float_epochs, cfg.qat_epochs = min(cfg.segments, 3000), 3, 2
        cfg.mining_segments, cfg.mining_length, cfg.mining_top, cfg.finetune_epochs = 100, 2048, 5000, 1
    return cfg


def _save_checkpoint(path: Path, result: dict, cfg) -> None:
    """Write the config, both networks' state dicts and the training history to ``path`` (torch format)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cfg.as_dict(), "float": result["float_model"].state_dict(),
                "quant": result["quant_model"].state_dict(), "history": result["history"]}, path)


def cmd_train_fourd(a: argparse.Namespace) -> int:
    """``beamloop quantize train --task fourd``: train, export and calibrate the 4D-STEM trigger; exit status."""
    from beamloop.quantize.fourd import FourDTrainConfig, export_fourd, train_fourd

    cfg = FourDTrainConfig(seed=a.seed)
    if a.quick:
        # small batches so that the few patterns still give a few hundred optimiser steps
        cfg.train, cfg.val, cfg.chunk, cfg.float_epochs, cfg.qat_epochs, cfg.batch = 3000, 1000, 1000, 8, 3, 128
    result = train_fourd(cfg)
    ckpt = Path(a.out) / f"{a.name}.pt"
    _save_checkpoint(ckpt, result, cfg)
    entry = export_fourd(result, cfg, Path(a.model_dir), a.name)
    print(json.dumps(entry["metrics"], indent=1))
    _ship(a, a.name)
    return 0


def _ship(a: argparse.Namespace, name: str) -> None:
    """With ``--ship``, copy model ``name`` from ``--model-dir`` into the installed package's model folder."""
    if a.ship:
        written = ship(Path(a.model_dir), name, MODEL_DIR)
        print(f"shipped {name} into {MODEL_DIR}: {', '.join(p.name for p in written) or 'already there'}")


def cmd_train(a: argparse.Namespace) -> int:
    """``beamloop quantize train``: train, export and calibrate a trigger model; exit status."""
    from beamloop.quantize.ship import export_model
    from beamloop.quantize.train import train

    _need_quant_extra()
    if a.task == "fourd":
        if a.name == "ejection":
            a.name = "fourd_column"
        return cmd_train_fourd(a)
    cfg = _config(a)
    result = train(cfg)
    ckpt = Path(a.out) / f"{a.name}.pt"
    _save_checkpoint(ckpt, result, cfg)
    print(f"checkpoint {ckpt}")
    entry = export_model(result, cfg, Path(a.model_dir), a.name, a.target_fa, a.calibration_dwells)
    print(json.dumps(entry["metrics"], indent=1))
    print(f"wrote {a.model_dir}/{{{', '.join(entry['files'].values())}, manifest.json}}")
    _ship(a, a.name)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    """``beamloop quantize export``: QONNX, plain ONNX and integers from a checkpoint, with bit-exact checks;
    exit status."""
    _need_quant_extra()
    import torch

    from beamloop.edge.trigger.model import FeatureSpec
    from beamloop.quantize.data import StreamConditions
    from beamloop.quantize.model import Bits, float_mlp, quant_mlp
    from beamloop.quantize.ship import export_model
    from beamloop.quantize.train import TrainConfig, dataset

    ck = torch.load(a.checkpoint, weights_only=False)
    c = ck["config"]
    if "features" not in c:
        return _export_fourd(ck, a)
    spec = FeatureSpec(**c["features"])
    b = c["bits"]
    cond = StreamConditions(**{k: tuple(v) if isinstance(v, list) else v for k, v in c["conditions"].items()})
    cfg = TrainConfig(spec=spec, hidden=tuple(c["hidden"]), weight_bits=b["weight"], act_bits=b["activation"],
                      bias_bits=b["bias"], segments=c["segments"], seed=c["seed"], conditions=cond)
    fm = float_mlp(spec.n_features, cfg.hidden)
    fm.load_state_dict(ck["float"])
    qm = quant_mlp(spec.n_features, cfg.hidden, spec.input_bits, Bits(b["weight"], b["activation"], b["bias"]))
    qm.load_state_dict(ck["quant"])
    qm.eval()
    val = dataset(cfg, max(cfg.segments // 5, 100), cfg.seed + 1000)
    export_model({"float_model": fm, "quant_model": qm, "val": val, "history": ck["history"]}, cfg,
                 Path(a.model_dir), a.name, a.target_fa, a.calibration_dwells)
    _ship(a, a.name)
    return 0


def _export_fourd(ck: dict, a: argparse.Namespace) -> int:
    """``export`` for a 4D-STEM trigger checkpoint (its config has no sample-stream features)."""
    from beamloop.quantize.fourd import FourDTrainConfig, export_fourd, patterns
    from beamloop.quantize.model import Bits, float_mlp, quant_mlp

    cfg = FourDTrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"].items()})
    n_in = cfg.detector_px ** 2
    fm = float_mlp(n_in, cfg.hidden)
    fm.load_state_dict(ck["float"])
    qm = quant_mlp(n_in, cfg.hidden, cfg.input_bits, Bits(cfg.weight_bits, cfg.act_bits, cfg.bias_bits))
    qm.load_state_dict(ck["quant"])
    qm.eval()
    xv, yv, _ = patterns(cfg.val, cfg, cfg.seed + 500)
    name = "fourd_column" if a.name == "ejection" else a.name
    export_fourd({"float_model": fm, "quant_model": qm, "val": (xv, yv), "history": ck["history"]}, cfg,
                 Path(a.model_dir), name)
    _ship(a, name)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    """``beamloop quantize eval``: ROC, false-trigger rate and delay of the model against its baselines; exit status."""
    from beamloop.edge.trigger.model import load_manifest
    from beamloop.quantize.evaluate import evaluate
    from beamloop.quantize.fourd import evaluate_fourd

    models = load_manifest(Path(a.model_dir))["models"]
    if a.task in ("ejection", "all"):
        evaluate(Path(a.out), Path(a.model_dir), a.name, dwells=a.dwells, seed=a.seed, target_fa_per_s=a.target_fa,
                 roc_delay=a.roc_delay, update_manifest=a.update_manifest)
        print(f"wrote {Path(a.out) / 'eval.json'} and {Path(a.out) / 'roc.png'}")
    if a.task == "fourd" or (a.task == "all" and "fourd_column" in models):
        evaluate_fourd(Path(a.out), Path(a.model_dir), "fourd_column", n=a.patterns,
                       update_manifest=a.update_manifest)
        print(f"wrote {Path(a.out) / 'eval_fourd.json'} and {Path(a.out) / 'roc_fourd.png'}")
    elif a.task == "all":
        print("no 4D-STEM trigger in the manifest (train one with `beamloop quantize train --task fourd`)")
    return 0


def cmd_ship(a: argparse.Namespace) -> int:
    """``beamloop quantize ship``: copy a trained model into the installed package; exit status."""
    try:
        _ship(a, a.name)
    except KeyError:
        raise ValueError(f"no model {a.name!r} in {Path(a.model_dir) / 'manifest.json'}") from None
    return 0


def cmd_streams(a: argparse.Namespace) -> int:
    """``beamloop quantize streams``: write simulated dwells for ``beamloop fpga sim --stream``; exit status."""
    from beamloop.quantize.data import StreamConditions, check_dwells, save_dwells

    cond = StreamConditions.clean() if a.clean else StreamConditions()
    st = check_dwells(a.dwells, a.length, a.seed, cond)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_dwells(st, a.out)
    print(f"wrote {a.out}: {len(st)} dwells, {sum(len(c) for c in st.counts)} samples, "
          f"{int((st.event >= 0).sum())} with an event")
    return 0


def register(subparsers) -> None:
    """Add ``quantize`` with its ``train``, ``export`` and ``eval`` subcommands to the ``beamloop`` parser."""
    q = subparsers.add_parser("quantize", help="trigger models: quantization-aware training, export, evaluation")
    sub = q.add_subparsers(dest="quantize_command", required=True)

    t = sub.add_parser("train", help="simulate data, train float + Brevitas QAT networks, export, calibrate")
    t.add_argument("--task", choices=("ejection", "fourd"), default="ejection",
                   help="ejection: parked-probe ADF samples; fourd: 16x16 binned 4D-STEM pattern -> over a column")
    t.add_argument("--name", default="ejection", help="model name (files <name>.onnx, ...; manifest entry; "
                   "fourd_column for --task fourd)")
    t.add_argument("--out", default="out/quantize", help="folder for the training checkpoint")
    t.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="folder the model files and manifest go to")
    t.add_argument("--ship", action="store_true",
                   help=f"then copy the model into the installed package ({MODEL_DIR}), which the service loads")
    t.add_argument("--window", type=int, default=32, help="newest samples fed one by one (N)")
    t.add_argument("--blocks", type=int, default=4, help="context sums before the window (0: none)")
    t.add_argument("--block", type=int, default=32, help="samples per context sum")
    t.add_argument("--shift", type=int, default=2, help="right shift of each context sum, bits")
    t.add_argument("--input-bits", type=int, default=8, help="unsigned input width")
    t.add_argument("--weight-bits", type=int, default=6)
    t.add_argument("--act-bits", type=int, default=8)
    t.add_argument("--bias-bits", type=int, default=16)
    t.add_argument("--hidden", type=_ints, default=(16, 8), help="hidden widths, e.g. 16,8")
    t.add_argument("--segments", type=int, default=40000, help="simulated training segments")
    t.add_argument("--float-epochs", type=int, default=10)
    t.add_argument("--qat-epochs", type=int, default=8)
    t.add_argument("--mining-rounds", type=int, default=2, help="hard-negative mining rounds after float training")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--target-fa", type=float, default=0.05, help="false triggers per second of dwell to calibrate for")
    t.add_argument("--calibration-dwells", type=int, default=1500)
    t.add_argument("--quick", action="store_true", help="small data and few epochs (a smoke run)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("export", help="export a checkpoint to QONNX, plain ONNX and integers, with checks")
    e.add_argument("checkpoint", help="checkpoint written by `quantize train` (<out>/<name>.pt)")
    e.add_argument("--name", default="ejection")
    e.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="folder the model files and manifest go to")
    e.add_argument("--ship", action="store_true", help=f"then copy the model into the installed package ({MODEL_DIR})")
    e.add_argument("--target-fa", type=float, default=0.05)
    e.add_argument("--calibration-dwells", type=int, default=1500)
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("eval", help="ROC, false-trigger rate, delay: model vs float vs CUSUM vs window")
    v.add_argument("--task", choices=("ejection", "fourd", "all"), default="all")
    v.add_argument("--name", default="ejection", help="ejection model's manifest entry")
    v.add_argument("--patterns", type=int, default=24000, help="held-out 4D-STEM patterns (split over the doses)")
    v.add_argument("--model-dir", default=str(MODEL_DIR),
                   help="folder of the manifest and models to evaluate (default the shipped ones)")
    v.add_argument("--out", default="out/quantize/eval")
    v.add_argument("--dwells", type=int, default=1500, help="dwells per set (calibration and test, per condition)")
    v.add_argument("--seed", type=int, default=100)
    v.add_argument("--target-fa", type=float, default=0.05, help="false triggers per second of dwell")
    v.add_argument("--roc-delay", type=int, default=16, help="lowered samples before the ROC's positive decisions")
    v.add_argument("--update-manifest", action="store_true", help="store the figures in the model's manifest entry")
    v.set_defaults(func=cmd_eval)

    h = sub.add_parser("ship", help="copy a trained model (files + manifest entry) into the installed package")
    h.add_argument("name", help="model name (manifest entry)")
    h.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR), help="folder the model was trained into")
    h.set_defaults(func=cmd_ship, ship=True)

    s = sub.add_parser("streams", help="simulated parked-probe dwells for `beamloop fpga sim --stream`")
    s.add_argument("--out", required=True, help=".npz file to write")
    s.add_argument("--dwells", type=int, default=200)
    s.add_argument("--length", type=int, default=1000, help="samples per dwell")
    s.add_argument("--seed", type=int, default=500)
    s.add_argument("--clean", action="store_true", help="the main job's steady microscope instead of the nuisances")
    s.set_defaults(func=cmd_streams)
