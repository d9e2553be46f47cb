"""Export of the quantized trigger: QONNX (for hls4ml / da4ml), plain ONNX (for onnxruntime), integers (for
the service's numba runtime, :mod:`beamloop.edge.trigger.model`).

QONNX: ``brevitas.export.export_qonnx`` then qonnx's ``cleanup_model`` and ``GemmToMatMul``, so the graph
holds only ``Quant``, ``MatMul``, ``Add`` and ``Relu`` with batch size 1; rounding-mode attributes are
written in upper case (``ROUND``, ``FLOOR``) as the QONNX operator spec spells them.

Plain ONNX: the weight and bias ``Quant`` nodes are folded into constants on their grids and every
activation ``Quant`` becomes ``Mul(1/s) -> Floor|Round -> Clip -> Mul(s)`` (ONNX ``Round`` rounds half to
even, as Brevitas and QONNX do); scales are powers of two, so every step is exact in float32.

Integers: walking the QONNX chain, each layer's weights and bias are divided by their scales (exact
integers) and each activation quantiser becomes a shift ``e = log2(s_in * s_w / s_out)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from beamloop.edge.trigger.model import IntegerMLP

ALLOWED_OPS = {"Quant", "MatMul", "Add", "Relu", "Reshape"}
"""Operators the FPGA flow (:mod:`beamloop.fpga.qonnx_trace`) accepts in the exported QONNX graph."""


class ExportError(RuntimeError):
    """The exported graph is not the chain the integer runtime and the FPGA flow expect."""


def export_qonnx(quant_model, n_inputs: int, path: Path):
    """Export the Brevitas network to a cleaned QONNX file; returns the qonnx ``ModelWrapper``.

    Raises
    ------
    ExportError
        The graph holds an operator outside :data:`ALLOWED_OPS`.
    """
    import torch
    from brevitas.export import export_qonnx as _export
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.gemm_to_matmul import GemmToMatMul
    from qonnx.util.cleanup import cleanup_model

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    quant_model.eval()
    raw = path.with_suffix(".raw.onnx")
    _export(quant_model, input_t=torch.zeros(1, n_inputs), export_path=str(raw))
    m = cleanup_model(ModelWrapper(str(raw)))
    m = cleanup_model(m.transform(GemmToMatMul()))
    for leftover in raw.parent.glob(raw.name + "*"):  # the exporter may write external data beside it
        leftover.unlink()
    for node in m.graph.node:
        if node.op_type not in ALLOWED_OPS:
            raise ExportError(f"QONNX graph has a {node.op_type} node; only {sorted(ALLOWED_OPS)} are expected")
        for a in node.attribute:
            if a.name == "rounding_mode":
                a.s = a.s.upper()
    m.model.producer_name = "beamloop.quantize"
    m.save(str(path))
    return m


def _const(m, name: str) -> np.ndarray:
    """Initializer ``name`` of ModelWrapper ``m`` as float64; raises :class:`ExportError` if it is not a constant."""
    v = m.get_initializer(name)
    if v is None:
        raise ExportError(f"tensor {name} is not a constant")
    return np.asarray(v, np.float64)


def _quant_value(m, node) -> np.ndarray:
    """Float value of a ``Quant`` node on constant inputs (qonnx's own implementation)."""
    from qonnx.custom_op.general.quant import quant

    x, s, z, b = (_const(m, n) for n in node.input)
    attrs = {a.name: a for a in node.attribute}
    return quant(x, s, z, b, attrs["signed"].i, attrs["narrow"].i, attrs["rounding_mode"].s.decode())


def _pow2_exponent(v: float, what: str) -> int:
    """``log2(v)`` as an integer; raises :class:`ExportError` (naming ``what``) unless ``v`` is a power of two."""
    e = math.log2(v) if v > 0 else float("nan")
    if not (math.isfinite(e) and e == round(e)):
        raise ExportError(f"{what} scale {v} is not a power of two")
    return int(round(e))


def _integer(value: np.ndarray, scale: float, what: str) -> np.ndarray:
    """``value / scale`` as int64; raises :class:`ExportError` (naming ``what``) unless every entry is an integer."""
    q = value / scale
    r = np.rint(q)
    if not np.array_equal(q, r):
        raise ExportError(f"{what} is not on its quantiser's grid")
    return r.astype(np.int64)


def integer_mlp(m) -> IntegerMLP:
    """The QONNX chain ``Quant(input) -> [MatMul -> Add -> Relu -> Quant]* -> MatMul -> Add`` as integers.

    Raises
    ------
    ExportError
        Another graph shape, a non-power-of-two scale, a zero point, or an input scale other than 1.
    """
    producers = {o: n for n in m.graph.node for o in n.output}
    consumers = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def only_consumer(t):
        """The one node reading tensor ``t``; :class:`ExportError` unless there is exactly one."""
        c = consumers.get(t, [])
        if len(c) != 1:
            raise ExportError(f"tensor {t} feeds {len(c)} nodes; expected a chain")
        return c[0]

    node = only_consumer(m.graph.input[0].name)
    if node.op_type != "Quant":
        raise ExportError("the graph does not start with an input Quant node")
    s_in = float(_const(m, node.input[1]))
    in_attrs = {a.name: a.i for a in node.attribute if a.name in ("signed", "narrow")}
    if in_attrs.get("signed") or in_attrs.get("narrow"):
        raise ExportError("the input quantiser must be unsigned and not narrow (0 .. 2**bits - 1)")
    if s_in != 1.0 or float(_const(m, node.input[2])) != 0.0:
        raise ExportError(f"input quantiser must have scale 1 and zero point 0 (integer counts), got {s_in}")
    input_max = (1 << int(_const(m, node.input[3]))) - 1
    s_a = s_in
    t = node.output[0]
    weights, biases, shifts, act_max = [], [], [], []
    out_name = m.graph.output[0].name
    while True:
        mm = only_consumer(t)
        if mm.op_type != "MatMul":
            raise ExportError(f"expected MatMul after {t}, got {mm.op_type}")
        wq = producers[mm.input[1]]
        s_w = float(_const(m, wq.input[1]))
        _pow2_exponent(s_w, "weight")
        w = _integer(_quant_value(m, wq), s_w, "weight")  # (in, out)
        add = only_consumer(mm.output[0])
        if add.op_type != "Add":
            raise ExportError(f"expected Add after MatMul, got {add.op_type}")
        bname = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
        bq = producers.get(bname)
        bval = _quant_value(m, bq) if bq is not None and bq.op_type == "Quant" else _const(m, bname)
        s_acc = s_a * s_w
        b = _integer(np.asarray(bval).reshape(-1), s_acc, "bias")
        weights.append(w.T.copy())
        biases.append(b)
        if add.output[0] == out_name:
            return IntegerMLP(weights, biases, np.array(shifts, np.int64), np.array(act_max, np.int64), s_acc,
                              input_max)
        relu = only_consumer(add.output[0])
        q = only_consumer(relu.output[0]) if relu.op_type == "Relu" else None
        if q is None or q.op_type != "Quant":
            raise ExportError("expected Relu -> Quant after a hidden layer")
        attrs = {a.name: a for a in q.attribute}
        if attrs["signed"].i or attrs["rounding_mode"].s.decode().upper() != "FLOOR":
            raise ExportError("hidden activations must be unsigned with FLOOR rounding")
        if float(_const(m, q.input[2])) != 0.0:
            raise ExportError("activation zero point must be 0")
        s_out = float(_const(m, q.input[1]))
        bits = int(_const(m, q.input[3]))
        shifts.append(_pow2_exponent(s_acc, "accumulator") - _pow2_exponent(s_out, "activation"))
        act_max.append((1 << bits) - 1)
        s_a = s_out
        t = q.output[0]


def plain_onnx(m, path: Path) -> None:
    """Write the plain-ONNX twin of a cleaned QONNX graph (see the module docstring) to ``path``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    folded = {}
    for node in m.graph.node:
        if node.op_type == "Quant" and all(m.get_initializer(i) is not None for i in node.input):
            folded[node.output[0]] = _quant_value(m, node).astype(np.float32)
    for name, v in folded.items():
        inits.append(numpy_helper.from_array(v, name))
    for k, node in enumerate(m.graph.node):
        if node.output[0] in folded:
            continue
        if node.op_type != "Quant":
            nodes.append(helper.make_node(node.op_type, list(node.input), list(node.output),
                                          name=f"{node.op_type}_{k}"))
            continue
        attrs = {a.name: a for a in node.attribute}
        s = float(_const(m, node.input[1]))
        z = float(_const(m, node.input[2]))
        bits = int(_const(m, node.input[3]))
        signed, narrow = attrs["signed"].i, attrs["narrow"].i
        lo = (-(1 << (bits - 1)) + narrow) if signed else 0
        hi = ((1 << (bits - 1)) - 1) if signed else ((1 << bits) - 1 - narrow)
        if z != 0.0:
            raise ExportError("plain ONNX export handles zero points of 0 only")
        p = f"q{k}_"
        inits += [numpy_helper.from_array(np.array(1.0 / s, np.float32), p + "inv"),
                  numpy_helper.from_array(np.array(s, np.float32), p + "s"),
                  numpy_helper.from_array(np.array(lo, np.float32), p + "lo"),
                  numpy_helper.from_array(np.array(hi, np.float32), p + "hi")]
        rnd = {"ROUND": "Round", "FLOOR": "Floor", "CEIL": "Ceil"}[attrs["rounding_mode"].s.decode().upper()]
        nodes += [helper.make_node("Mul", [node.input[0], p + "inv"], [p + "x"], name=p + "div"),
                  helper.make_node(rnd, [p + "x"], [p + "r"], name=p + "round"),
                  helper.make_node("Clip", [p + "r", p + "lo", p + "hi"], [p + "c"], name=p + "clip"),
                  helper.make_node("Mul", [p + "c", p + "s"], [node.output[0]], name=p + "scale")]
    n_in = m.get_tensor_shape(m.graph.input[0].name)[-1]
    graph = helper.make_graph(nodes, "beamloop_trigger", [helper.make_tensor_value_info(
        m.graph.input[0].name, TensorProto.FLOAT, ["batch", n_in])], [helper.make_tensor_value_info(
            m.graph.output[0].name, TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="beamloop.quantize")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def qonnx_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """Execute the QONNX file with qonnx on a batch ``x`` (n, n_in); returns (n,) float32 logits."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    m = ModelWrapper(str(path))
    x = np.asarray(x, np.float32)
    m.set_tensor_shape(m.graph.input[0].name, [len(x), x.shape[1]])
    m.set_tensor_shape(m.graph.output[0].name, [len(x), 1])
    del m.graph.value_info[:]
    m = m.transform(InferShapes())
    return execute_onnx(m, {m.graph.input[0].name: x})[m.graph.output[0].name].reshape(-1)


def plain_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the plain-ONNX file with onnxruntime on ``x`` (n, n_in); returns (n,) float32 logits."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: np.asarray(x, np.float32)})[0].reshape(-1)


def brevitas_outputs(quant_model, x: np.ndarray) -> np.ndarray:
    """The Brevitas network's logits on ``x`` (n, n_in) in eval mode; (n,) float32."""
    import torch

    quant_model.eval()
    with torch.no_grad():
        return quant_model(torch.from_numpy(np.asarray(x, np.float32))).reshape(-1).numpy()


def agreement(x: np.ndarray, mlp: IntegerMLP, qonnx_path: Path, plain_path: Path, quant_model=None) -> dict:
    """Compare the integer runtime with qonnx execution, onnxruntime on the plain graph and (if given) the
    Brevitas network on inputs ``x``; returns the number of inputs and of exact matches of each.
    """
    ref = mlp.scores(x).astype(np.float64) * mlp.output_scale
    out = {"inputs": int(len(x)),
           "qonnx_exact": int(np.sum(qonnx_outputs(qonnx_path, x).astype(np.float64) == ref)),
           "plain_onnx_exact": int(np.sum(plain_outputs(plain_path, x).astype(np.float64) == ref))}
    if quant_model is not None:
        out["brevitas_exact"] = int(np.sum(brevitas_outputs(quant_model, x).astype(np.float64) == ref))
    return out
