"""Brevitas QAT networks and their exports: Brevitas = QONNX (qonnx execution) = plain ONNX (onnxruntime) =
the service's integer runtime, bit for bit, on thousands of inputs; the shipped model's QONNX graph too."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("brevitas")
pytest.importorskip("qonnx")

from beamloop.edge.trigger.model import MODEL_DIR, FeatureSpec, IntegerMLP, load_manifest, window_features  # noqa: E402
from beamloop.quantize.data import StreamConditions, training_segments  # noqa: E402
from beamloop.quantize.export import ALLOWED_OPS, agreement, export_qonnx, integer_mlp, plain_onnx, qonnx_outputs  # noqa: E402
from beamloop.quantize.model import Bits, quant_mlp  # noqa: E402


def _inputs(spec: FeatureSpec, n_random: int, seed: int) -> np.ndarray:
    segs = training_segments(40, spec.history + 64, (max(spec.history - 40, 1), spec.history + 64), 0.5,
                             StreamConditions(), seed)
    sim = np.concatenate([window_features(c, spec) for c in segs.counts])
    rnd = np.random.default_rng(seed).integers(0, spec.input_max + 1, (n_random, spec.n_features))
    return np.concatenate([sim, rnd]).astype(np.int64)


def _calibrated(spec, hidden, bits, x, seed):
    """A Brevitas network with random weights whose activation scales saw data (training-mode passes)."""
    torch.manual_seed(seed)
    qm = quant_mlp(spec.n_features, hidden, spec.input_bits, bits)
    qm.train()
    with torch.no_grad():
        for k in range(0, len(x), 512):
            qm(torch.from_numpy(x[k:k + 512].astype(np.float32)))
    qm.eval()
    return qm


@pytest.mark.parametrize("bits,hidden", [(Bits(6, 8, 16), (16, 8)), (Bits(4, 6, 12), (8,)), (Bits(8, 4, 16), (12, 6))])
def test_brevitas_qonnx_plain_onnx_and_integer_runtime_agree_bit_for_bit(tmp_path, bits, hidden):
    spec = FeatureSpec(window=16, blocks=2, block=16, shift=2, input_bits=8)
    x = _inputs(spec, 1500, seed=3)
    qm = _calibrated(spec, hidden, bits, x, seed=5)
    m = export_qonnx(qm, spec.n_features, tmp_path / "t.onnx")
    assert {n.op_type for n in m.graph.node} <= ALLOWED_OPS
    mlp = integer_mlp(m)
    assert mlp.dims.tolist() == [spec.n_features, *hidden, 1]
    assert all(np.abs(w).max() <= 2 ** (bits.weight - 1) - 1 for w in mlp.weights)
    plain_onnx(m, tmp_path / "t_plain.onnx")
    res = agreement(x, mlp, tmp_path / "t.onnx", tmp_path / "t_plain.onnx", qm)
    assert res["inputs"] > 3000
    assert res == {"inputs": res["inputs"], "qonnx_exact": res["inputs"], "plain_onnx_exact": res["inputs"],
                   "brevitas_exact": res["inputs"]}
    # the network is not trivially constant: its scores spread over many integers
    assert len(np.unique(mlp.scores(x))) > 100


def test_qonnx_graph_is_clean_for_the_fpga_flow(tmp_path):
    spec = FeatureSpec(window=8, blocks=1, block=8)
    x = _inputs(spec, 200, seed=4)
    m = export_qonnx(_calibrated(spec, (8,), Bits(), x, seed=1), spec.n_features, tmp_path / "c.onnx")
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("MatMul") == 2 and ops.count("Relu") == 1 and set(ops) <= ALLOWED_OPS
    modes = {a.s.decode() for n in m.graph.node for a in n.attribute if a.name == "rounding_mode"}
    assert modes == {"ROUND", "FLOOR"}
    for n in m.graph.node:
        if n.op_type == "Quant":
            s = np.asarray(m.get_initializer(n.input[1]), np.float64)
            assert np.all(np.log2(s) == np.round(np.log2(s))), "scale is not a power of two"
    assert m.get_tensor_shape(m.graph.input[0].name) == [1, spec.n_features]


def test_shipped_qonnx_graph_matches_the_integer_runtime():
    entry = load_manifest()["models"]["ejection"]
    spec = FeatureSpec(**entry["features"])
    x = _inputs(spec, 2000, seed=9)
    mlp = IntegerMLP.load(MODEL_DIR / entry["files"]["integer"])
    y = qonnx_outputs(MODEL_DIR / entry["files"]["qonnx"], x)
    assert len(x) > 4000 and np.array_equal(y.astype(np.float64), mlp.scores(x) * mlp.output_scale)
    from qonnx.core.modelwrapper import ModelWrapper

    m = ModelWrapper(str(MODEL_DIR / entry["files"]["qonnx"]))
    again = integer_mlp(m)  # the shipped integers are exactly what the shipped graph says
    assert all(np.array_equal(a, b) for a, b in zip(again.weights, mlp.weights))
    assert all(np.array_equal(a, b) for a, b in zip(again.biases, mlp.biases))
    assert again.shifts.tolist() == mlp.shifts.tolist() and again.output_scale == mlp.output_scale
    assert entry["metrics"]["bit_exact"]["brevitas_exact"] == entry["metrics"]["bit_exact"]["inputs"] >= 5000


@pytest.mark.slow
def test_train_export_and_eval_from_the_command_line(tmp_path):
    from beamloop.edge.cli import main
    from beamloop.edge.trigger.model import ModelTrigger

    md = tmp_path / "models"
    assert main(["quantize", "train", "--quick", "--out", str(tmp_path / "run"), "--model-dir", str(md),
                 "--calibration-dwells", "100"]) == 0
    entry = json.loads((md / "manifest.json").read_text())["models"]["ejection"]
    b = entry["metrics"]["bit_exact"]
    assert b["qonnx_exact"] == b["plain_onnx_exact"] == b["brevitas_exact"] == b["inputs"]
    assert main(["quantize", "export", str(tmp_path / "run" / "ejection.pt"), "--model-dir", str(tmp_path / "m2"),
                 "--calibration-dwells", "100"]) == 0
    assert (tmp_path / "m2" / "ejection_int.npz").read_bytes() == (md / "ejection_int.npz").read_bytes()
    assert main(["quantize", "eval", "--model-dir", str(md), "--out", str(tmp_path / "ev"), "--dwells", "60"]) == 0
    rep = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(rep["conditions"]) == {"clean", "nuisance"} and (tmp_path / "ev" / "roc.png").stat().st_size > 10000
    assert set(rep["conditions"]["clean"]["methods"]) == {"model", "float", "cusum", "window"}
    assert ModelTrigger(model_dir=md).threshold == entry["threshold"]["score"]


def test_shipped_4d_stem_qonnx_graph_matches_the_integer_runtime():
    from beamloop.quantize.fourd import exactness_inputs

    entry = load_manifest()["models"]["fourd_column"]
    x = exactness_inputs(entry["input"]["shape"][0], entry["input"]["input_bits"], seed=22)
    mlp = IntegerMLP.load(MODEL_DIR / entry["files"]["integer"])
    y = qonnx_outputs(MODEL_DIR / entry["files"]["qonnx"], x)
    assert np.array_equal(y.astype(np.float64), mlp.scores(x) * mlp.output_scale)
    assert entry["metrics"]["bit_exact"]["brevitas_exact"] == entry["metrics"]["bit_exact"]["inputs"] >= 5000


@pytest.mark.slow
def test_4d_stem_trigger_train_export_and_eval_from_the_command_line(tmp_path):
    from beamloop.edge.cli import main

    md = tmp_path / "models"
    assert main(["quantize", "train", "--task", "fourd", "--quick", "--out", str(tmp_path / "run"),
                 "--model-dir", str(md)]) == 0
    entry = json.loads((md / "manifest.json").read_text())["models"]["fourd_column"]
    b = entry["metrics"]["bit_exact"]
    assert b["qonnx_exact"] == b["plain_onnx_exact"] == b["brevitas_exact"] == b["inputs"] >= 5000
    assert entry["input"]["shape"] == [16, 16] and entry["layers"][0]["in"] == 256
    assert main(["quantize", "export", str(tmp_path / "run" / "fourd_column.pt"),
                 "--model-dir", str(tmp_path / "m2")]) == 0
    assert (tmp_path / "m2" / "fourd_column_int.npz").read_bytes() == (md / "fourd_column_int.npz").read_bytes()
    assert main(["quantize", "eval", "--task", "fourd", "--model-dir", str(md), "--out", str(tmp_path / "ev"),
                 "--patterns", "3000"]) == 0
    rep = json.loads((tmp_path / "ev" / "eval_fourd.json").read_text())
    for dose in rep["doses"].values():  # even the quick model separates patterns better than chance
        assert dose["model"]["auc"] > 0.6 and dose["adf"]["auc"] > 0.5
