"""QONNX -> da4ml: our own tracer for the operators the trigger models use.

da4ml 0.6 (https://github.com/calad0i/da4ml) has no ONNX frontend. This module walks a QONNX graph
in topological order and evaluates every node either on numpy constants (weights, biases, their ``Quant``
nodes; qonnx's own ``quant`` function) or on da4ml's traceable fixed-point arrays
(:class:`da4ml.trace.FixedVariableArray`), so the result is a da4ml ``CombLogic`` (adder graph, the
distributed-arithmetic form of every constant matrix-vector product) that :mod:`beamloop.fpga.rtl` turns into
Verilog.

Supported operators: ``Quant`` (power-of-two scales, zero point 0), ``MatMul``, ``Gemm`` (no transposed
input A), ``Add``, ``Sub``, ``Mul`` by a power-of-two constant, ``Relu``, ``Reshape``, ``Flatten``,
``Identity``. The graph input must go through a ``Quant`` node first: the hardware input is that
quantiser's output (integers on its grid, e.g. ADC counts), so the hardware port carries
``bits`` wide words and the input ``Quant`` itself costs no logic.

Rounding (a trap): da4ml implements truncation (``TRN`` = floor) and round-half-up
(``RND``); QONNX ``ROUND`` is round-half-to-even. A ``FLOOR`` quantiser maps to ``TRN`` exactly; a
``ROUND`` quantiser on a traced tensor is accepted only when it cannot round (the tensor already lies
on the output grid), otherwise :class:`TraceError` is raised rather than emitting logic that is not
bit-exact. QONNX ``Quant`` saturates, so traced quantisers use da4ml's ``SAT`` overflow mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_OPS = ("Quant", "MatMul", "Gemm", "Add", "Sub", "Mul", "Relu", "Reshape", "Flatten", "Identity")
"""QONNX operators :func:`trace_qonnx` understands."""


class TraceError(ValueError):
    """The QONNX graph holds something the tracer cannot map exactly onto da4ml (message names the node)."""


@dataclass
class TracedModel:
    """A QONNX graph traced to da4ml combinational logic.

    Attributes
    ----------
    comb : da4ml.types.CombLogic
        The adder graph; ``comb.shape == (n_inputs, n_outputs)``.
    n_inputs, n_outputs : int
        Flattened input and output lengths (batch dimension removed).
    input_bits : int
        Width of each input word (the input ``Quant`` node's bit width).
    input_signed : bool
    input_scale : float
        Scale of the input grid (1.0: the port carries the integers themselves).
    output_step : float
        Value of one least significant bit of the output words; ``output_value = word * output_step``.
    output_bits : int
        Width of each output word (two's complement when ``output_signed``).
    output_signed : bool
    source : str
        Path of the QONNX file traced.
    """

    comb: object
    n_inputs: int
    n_outputs: int
    input_bits: int
    input_signed: bool
    input_scale: float
    output_step: float
    output_bits: int
    output_signed: bool
    source: str

    def predict_words(self, x_int: np.ndarray) -> np.ndarray:
        """The traced logic evaluated in numpy (da4ml's own interpreter) on integer inputs.

        Parameters
        ----------
        x_int : ndarray, shape (n, n_inputs), integer
            Input words (values on the input grid divided by ``input_scale``).

        Returns
        -------
        ndarray, shape (n, n_outputs), int64
            Output words; multiply by ``output_step`` for the graph's float outputs.
        """
        x = np.asarray(x_int, np.float64) * self.input_scale
        y = np.asarray(self.comb.predict(x), np.float64)
        return np.rint(y / self.output_step).astype(np.int64).reshape(len(x), self.n_outputs)


def _pow2_exp(scale: np.ndarray, node) -> np.ndarray:
    """Exponents e with scale == 2**e; raises :class:`TraceError` otherwise."""
    s = np.asarray(scale, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.log2(s)
    if not np.all(np.isfinite(e)) or not np.array_equal(e, np.round(e)):
        raise TraceError(f"node {node.name or node.op_type}: scale {s.ravel()[:4]} is not a power of two")
    return np.round(e).astype(np.int64)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _quant_kif(bits: int, signed: bool, exp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """da4ml (k, i, f) of a QONNX quantiser with ``bits`` and scale ``2**exp``: k sign bit, i integer bits
    without the sign, f fractional bits, ``k + i + f == bits``."""
    f = -np.asarray(exp, np.int64)
    k = np.full_like(f, int(signed))
    i = bits - k - f
    return k, i, f


def trace_qonnx(path: str | Path):
    """Trace a QONNX file into da4ml combinational logic.

    Parameters
    ----------
    path : str or Path
        QONNX model (batch size 1, one input, one output), as written by :func:`beamloop.quantize.export.export_qonnx`.

    Returns
    -------
    TracedModel

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    TraceError
        An unsupported operator, a non-power-of-two scale, a zero point, a non-constant weight, or a
        rounding that da4ml cannot reproduce bit-exactly (see the module docstring).
    """
    from da4ml.trace import FixedVariableArray, comb_trace
    from onnx import numpy_helper
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.general.quant import quant

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"QONNX model {path} does not exist")
    m = ModelWrapper(str(path))
    if len(m.graph.input) != 1 or len(m.graph.output) != 1:
        raise TraceError(f"{path}: expected one input and one output, got {len(m.graph.input)} and "
                         f"{len(m.graph.output)}")
    env: dict[str, object] = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer}
    in_name = m.graph.input[0].name
    in_shape = [d if d > 0 else 1 for d in m.get_tensor_shape(in_name)]
    traced_input = None
    input_info = None

    def const(name: str, node) -> np.ndarray:
        v = env.get(name)
        if not isinstance(v, np.ndarray):
            raise TraceError(f"node {node.name or node.op_type}: input {name} must be a constant")
        return v

    def is_var(v) -> bool:
        return isinstance(v, FixedVariableArray)

    for node in m.graph.node:  # qonnx/onnx graphs are stored in topological order
        op = node.op_type
        if op not in SUPPORTED_OPS:
            raise TraceError(f"node {node.name or op}: operator {op} is not supported (supported: {SUPPORTED_OPS})")
        ins = [env.get(n) if n else None for n in node.input]
        if op == "Quant":
            a = _attrs(node)
            signed, narrow = int(a.get("signed", 1)), int(a.get("narrow", 0))
            mode = a.get("rounding_mode", b"ROUND")
            mode = (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()
            if node.input[0] == in_name:
                scale, zp, bits = (const(n, node) for n in node.input[1:4])
                if np.any(zp != 0) or np.size(scale) != 1:
                    raise TraceError("the input quantiser needs one scale and zero point 0")
                e = _pow2_exp(scale, node)
                k, i, f = _quant_kif(int(bits), bool(signed), e)
                if narrow:
                    raise TraceError("a narrow-range input quantiser is not supported")
                traced_input = FixedVariableArray.from_kif(np.broadcast_to(k, in_shape), np.broadcast_to(i, in_shape),
                                                           np.broadcast_to(f, in_shape))
                input_info = (int(bits), bool(signed), float(scale))
                out = traced_input
            elif not is_var(ins[0]):
                x, scale, zp, bits = (const(n, node) for n in node.input)
                out = quant(x, scale, zp, bits, signed, narrow, mode)
            else:
                scale, zp, bits = (const(n, node) for n in node.input[1:4])
                if np.any(zp != 0):
                    raise TraceError(f"node {node.name or op}: zero point must be 0")
                x = ins[0]
                e = np.broadcast_to(_pow2_exp(scale, node), x.shape)
                k, i, f = _quant_kif(int(bits), bool(signed), e)
                if mode in ("FLOOR",):
                    rmode = "TRN"
                elif mode in ("ROUND", "ROUND_TO_ZERO", "CEIL"):
                    _, _, f_in = x.kif
                    if np.any(np.asarray(f_in) > f):
                        raise TraceError(f"node {node.name or op}: {mode} rounding of a computed tensor is not "
                                         "bit-exact in da4ml (only truncation and round-half-up); train with "
                                         "FLOOR activation quantisers (float_to_int_impl_type=FLOOR)")
                    rmode = "TRN"
                else:
                    raise TraceError(f"node {node.name or op}: rounding mode {mode} is not supported")
                out = x.quantize(k=k, i=i, f=f, overflow_mode="SAT", round_mode=rmode)
                if narrow and signed:
                    lo = -(2.0 ** (bits - 1) - 1) * np.asarray(scale, np.float64)
                    out = np.maximum(out, lo)
        elif op in ("MatMul", "Gemm"):
            a, b = ins[0], ins[1]
            if op == "Gemm":
                at = _attrs(node)
                if at.get("transA", 0):
                    raise TraceError(f"node {node.name or op}: transA is not supported")
                b = const(node.input[1], node)
                if at.get("transB", 0):
                    b = b.T
                b = b * float(at.get("alpha", 1.0))
            if is_var(a) and is_var(b):
                raise TraceError(f"node {node.name or op}: product of two computed tensors is not supported")
            out = a @ b
            if op == "Gemm" and len(node.input) > 2 and node.input[2]:
                out = out + const(node.input[2], node) * float(_attrs(node).get("beta", 1.0))
        elif op == "Add":
            out = ins[0] + ins[1] if is_var(ins[0]) else ins[1] + ins[0]
        elif op == "Sub":
            out = ins[0] - ins[1] if is_var(ins[0]) else -(ins[1]) + ins[0]
        elif op == "Mul":
            var, c = (ins[0], ins[1]) if is_var(ins[0]) else (ins[1], ins[0])
            if is_var(c):
                raise TraceError(f"node {node.name or op}: product of two computed tensors is not supported")
            _pow2_exp(np.abs(c[c != 0]) if np.any(c != 0) else np.ones(1), node)
            out = var * c
        elif op == "Relu":
            out = ins[0].relu() if is_var(ins[0]) else np.maximum(ins[0], 0)
        elif op == "Reshape":
            shape = [int(s) for s in const(node.input[1], node)]
            out = ins[0].reshape(*shape)
        elif op == "Flatten":
            axis = int(_attrs(node).get("axis", 1))
            x = ins[0]
            lead = int(np.prod(x.shape[:axis])) if axis else 1
            out = x.reshape(lead, -1)
        else:  # Identity
            out = ins[0]
        env[node.output[0]] = out

    if traced_input is None:
        raise TraceError(f"{path}: the graph input does not feed a Quant node (the hardware input format is "
                         "taken from it)")
    y = env.get(m.graph.output[0].name)
    if not is_var(y):
        raise TraceError(f"{path}: the output does not depend on the input")
    comb = comb_trace(traced_input.ravel(), y.ravel())
    k, i, f = (np.asarray(v).ravel() for v in y.kif)
    f_out = int(np.max(f))
    bits = int(np.max(k + i + f_out))
    return TracedModel(comb=comb, n_inputs=int(np.prod(in_shape)), n_outputs=int(y.size),
                       input_bits=input_info[0], input_signed=input_info[1], input_scale=input_info[2],
                       output_step=2.0 ** -f_out, output_bits=bits, output_signed=bool(np.any(k)),
                       source=str(path))


def qonnx_reference(path: str | Path, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The QONNX graph executed by qonnx (``execute_onnx``) on a batch: the bit-exactness reference.

    Parameters
    ----------
    path : str or Path
    x : ndarray, shape (n, n_inputs)
        Inputs in the graph's units (for the trigger: integer features as float).
    batch : int
        Rows per qonnx call.

    Returns
    -------
    ndarray, shape (n, n_outputs), float64
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    x = np.asarray(x, np.float32)
    base = ModelWrapper(str(path))
    iname, oname = base.graph.input[0].name, base.graph.output[0].name
    outs = []
    cache = {}
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        m = cache.get(len(xb))
        if m is None:
            m = ModelWrapper(str(path))
            m.set_tensor_shape(iname, [len(xb), x.shape[1]])
            m.set_tensor_shape(oname, [len(xb), m.get_tensor_shape(oname)[-1]])
            del m.graph.value_info[:]
            m = m.transform(InferShapes())
            cache[len(xb)] = m
        outs.append(np.asarray(execute_onnx(m, {iname: xb})[oname], np.float64).reshape(len(xb), -1))
    return np.concatenate(outs)


def model_summary(traced: TracedModel) -> dict:
    """JSON-ready description of the traced logic (ports, da4ml cost estimate, adder depth)."""
    c = traced.comb
    return {"source": traced.source, "n_inputs": traced.n_inputs, "n_outputs": traced.n_outputs,
            "input_bits": traced.input_bits, "input_signed": traced.input_signed,
            "output_bits": traced.output_bits, "output_signed": traced.output_signed,
            "output_step": traced.output_step, "da4ml_cost": float(c.cost),
            "comb_latency": float(max(c.latency)) if np.size(c.latency) else 0.0,
            "ops": len(c.ops), "log2_output_step": int(math.log2(traced.output_step))}
