"""The whole ejection trigger as an FPGA IP: raw ADF samples in, a latching ``blank`` out.

:func:`write_ip` turns a shipped trigger model (:class:`beamloop.edge.trigger.model.ModelTrigger`: the
:class:`~beamloop.edge.trigger.model.FeatureSpec` and the :class:`~beamloop.edge.trigger.model.IntegerMLP`)
into Verilog that does everything the integer runtime does, one sample per AXI4-Stream transfer:

Block diagram (one clock; ``<n>`` is the module prefix)::

    s_axis (16-bit counts) --+--> clip --> history --------------> precompute (da4ml, L_pre stages)
                             |            window regs (W-1)         P = b0 + W0[:, older] @ features
                             |            delay lines (B x block)   (clip, >> shift folded into stage 0)
                             |            running sums S_j             |
                             |            (add entering, subtract      v
                             |             leaving sample)          P registers (held between samples)
                             |                                         |
                             +--> x register, copy of P,  ----> tail (da4ml, L_tail stages):
                                  THRESHOLD (stage 0 input)      acc0 = P + W0[:, newest] * min(x, 255),
                                                                  ReLU/requantise, hidden layers, score and
                                                                  score - THRESHOLD (one adder tree); the
                                                                  decision is its sign --> blank latch

- **history**: the ``window - 1`` older samples of the next decision in registers (read in parallel by the
  precompute) and ``blocks`` delay lines of ``block`` samples each (shift registers, or LUT RAM circular
  buffers with ``history_impl="lutram"``), each block with a running sum kept incrementally: per sample
  ``S_j += entering - leaving``. Samples are clipped on entry at ``((input_max + 1) << shift) - 1`` (1023
  for the shipped spec), which changes no feature (a clipped sample saturates its window feature and its
  block feature either way). Entering and leaving samples older than what has been pushed since the dwell
  started count as 0, so a dwell needs no clearing pass.
- **precompute**: after every sample, the first layer's accumulator of the *next* decision without its
  newest sample, ``P = b0 + sum_{i != newest} W0[:, i] * f_i`` (the feature clipping and the block sums'
  right shift are in its first combinational stage). It runs between samples; the next sample is accepted
  once it is done (``s_axis_tready`` low for ``L_pre + 2`` cycles after each sample: the history takes the
  accepted sample one cycle later, from a register, so that its wide enables start at a flip-flop, and each
  block sum adds its registered ``entering - leaving`` a cycle after that, so that no path runs from the
  entering/leaving masks through two carry chains).
- **tail** (the latency path): ``acc0 = P + W0[:, newest] * min(x, input_max)``, then the network as the
  runtime computes it (ReLU, floor requantisation, saturation, the hidden layers, the score), and
  ``score - THRESHOLD`` as a second output of the last layer's adder tree: the decision is its sign bit,
  no compare follows the last adder. Integer arithmetic is associative, so splitting the first layer's sum
  between the two pipelines changes no result: the score is bit-exact with the runtime.
- **dwell start**: ``CTRL.START`` clears the history; with a non-zero ``EXPECTED_RATE`` (unsigned fixed point
  with 16 fractional bits, :func:`beamloop.edge.trigger.model.rate_word`) the logic pushes the
  ``history - 1`` counts ``floor((j + 1) * rate) - floor(j * rate)`` (an accumulator adding the rate per
  cycle) before the first sample, as :meth:`beamloop.edge.trigger.model.ModelTrigger.start` pre-fills its
  history, so decisions start at the first sample; without one the first ``history - 1`` samples are not
  decided on (``score_decided`` low), as in the runtime.

Interfaces: the sample input is an AXI4-Stream slave (Arm IHI 0051A, AMBA 4 AXI4-Stream protocol
specification: ``tdata`` 16 bits, ``tvalid``, ``tready``; ``tready`` is low while the precompute, a
prefill or a reset is in progress and high otherwise, so a source may hold ``tvalid`` until it is
accepted); the register block (:data:`REGISTERS`) is reached through a Wishbone B4 classic slave
(OpenCores, "Wishbone B4: WISHBONE System-on-Chip (SoC) Interconnection Architecture for Portable IP
Cores", 2010; ``<n>_ip_wb``, the open ECP5 flow) or an AXI4-Lite slave (Arm IHI 0022E, AMBA AXI and ACE
protocol specification, AXI4-Lite; ``<n>_ip_axil``, the vendor flow), both 32-bit data, byte addresses.
The model logic is da4ml's distributed-arithmetic adder graph of each constant matrix-vector product
(C. Sun et al., "da4ml: Distributed Arithmetic for Real-time Neural Networks on FPGAs", ACM TRETS (2025),
arXiv:2507.04535), pipelined by its latency cutoff; the ECP5 resources are per the Lattice ECP5 family
data sheet (FPGA-DS-02012).

Latency (``IPDesign.latency_cycles``) is ``L_tail + 1`` cycles counted as the earlier model wrapper counts
it: from the cycle in which the accepted sample is on ``s_axis_tdata`` to the first cycle with ``blank``
high; the logic measures it itself on every latch event (a cycle stamp travels with each sample) into
``LATENCY``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from beamloop.fpga import DEFAULT_LATENCY_CUTOFF

ID_WORD = 0x424C0100
"""Value of the ``ID`` register: ASCII ``"BL"`` in bits 31..16, IP version 1.0 (major in 15..8, minor in 7..0)."""

SAMPLE_BITS = 16
"""Width of ``s_axis_tdata`` (detector counts per sample, unsigned)."""

TAIL_SOLVER = {"hard_dc": 0}
"""da4ml CMVM solver options of the tail (the latency path): ``hard_dc = 0`` asks for the least adder depth
(at some extra adders), measured 1 adder level less than the default on the shipped model."""


@dataclass(frozen=True)
class Register:
    """One 32-bit register of the IP.

    Attributes
    ----------
    name : str
    offset : int
        Byte address (word aligned).
    access : str
        ``RO``, ``RW``, ``RW1C`` (read; write 1 to a bit to clear it) or ``WO`` (command bits read as 0).
    reset : str
        Value after reset (text: some depend on the model).
    description : str
    """

    name: str
    offset: int
    access: str
    reset: str
    description: str


REGISTERS = (
    Register("ID", 0x00, "RO", f"0x{ID_WORD:08X}", "IP identification: ASCII 'BL' (31..16), version major (15..8), "
             "minor (7..0)."),
    Register("CTRL", 0x04, "RW", "0", "bit 0 ENABLE: a decision whose score reaches THRESHOLD sets the latch "
             "(0: scores are computed, the latch is never set). bit 1 START (write 1; reads 0): begin a dwell: "
             "clear the history, SAMPLE_COUNT, the latch and LAST_TRIGGER_SAMPLE, and pre-fill the history "
             "from EXPECTED_RATE when it is not 0; acted on in the cycle after the write (a sample taken in the "
             "write's cycle is dropped), s_axis_tready low from then on for history + L_pre + 2 cycles with a "
             "rate, L_pre + 1 without."),
    Register("STATUS", 0x08, "RW1C", "0x2 (READY from L_pre cycles after reset)",
             "bit 0 BLANK: the latch (the blank output); write 1 to clear it "
             "(rearm); a decision that fires in the same cycle wins. bit 1 READY (s_axis_tready). bit 2 "
             "HISTORY_FULL: the next sample is decided on. bit 3 PREFILL: the expected-rate pre-fill is "
             "running. Bits 1-3 read-only."),
    Register("THRESHOLD", 0x0C, "RW", "model threshold", "Signed score threshold: a decision fires when "
             "score >= THRESHOLD (integer score units of the runtime). Takes effect for decisions made from "
             "the second cycle after the write."),
    Register("EXPECTED_RATE", 0x10, "RW", "0", "Expected counts per sample of the intact column, unsigned "
             "fixed point with 16 fractional bits (beamloop.edge.trigger.model.rate_word); 0: none. Read at "
             "START."),
    Register("TRIGGER_COUNT", 0x14, "RW", "0", "Latch events (0 -> 1 of BLANK) since reset; a write sets it "
             "(write 0 to clear)."),
    Register("SAMPLE_COUNT", 0x18, "RO", "0", "Samples accepted since START (wraps at 2**32)."),
    Register("LAST_TRIGGER_SAMPLE", 0x1C, "RO", "0xFFFFFFFF", "Index in the dwell (0 = first sample after "
             "START) of the sample that last set the latch; 0xFFFFFFFF: none since START."),
    Register("LATENCY", 0x20, "RO", "0", "Clock cycles from the sample that last set the latch being on "
             "s_axis_tdata (accepted) to the first cycle with blank high, counted by the logic."),
    Register("LAST_SCORE", 0x24, "RO", "0", "Signed score of the last decided sample."),
    Register("MODEL_ID", 0x28, "RO", "model hash", "First 32 bits of the SHA-256 of the model's integer "
             "file (<name>_int.npz): which model the bitstream holds."),
    Register("CONFIG", 0x2C, "RO", "design", "bits 7..0: latency in cycles (as LATENCY measures it); 15..8: "
             "minimum cycles between accepted samples; 31..16: history length in samples."),
)
"""The register map, in address order (documented in ``fpga/README.md`` and every build report)."""

REG = {r.name: r for r in REGISTERS}


def register_table_md() -> str:
    """The register map as a Markdown table."""
    rows = ["| offset | name | access | reset | description |", "|---|---|---|---|---|"]
    rows += [f"| 0x{r.offset:02X} | {r.name} | {r.access} | {r.reset} | {r.description} |" for r in REGISTERS]
    return "\n".join(rows) + "\n"


@dataclass
class Part:
    """One da4ml pipeline of the IP (the precompute or the tail) and its port layout.

    Attributes
    ----------
    module : str
        da4ml module prefix (stages ``<module>_stage<i>``).
    stages : int
    stage_bits : list of int
        Input width of each stage (the first is the packed input).
    out_bits : int
        Width of the packed output.
    inputs : list of [offset, width, signed, step]
        Per input value: its bit offset in the packed input (low bits first), width (0: not used by the
        logic), sign, and the value of one LSB.
    outputs : list of [offset, width, signed, step]
        The same for the packed output.
    sources : list of str
        Stage files (absolute paths).
    ops : int
        da4ml operations (adders, muxes, ...).
    adder_depth : float
        Combinational depth in da4ml's latency model (adder delays).
    """

    module: str
    stages: int
    stage_bits: list
    out_bits: int
    inputs: list
    outputs: list
    sources: list = field(default_factory=list)
    ops: int = 0
    adder_depth: float = 0.0


@dataclass
class IPDesign:
    """A written trigger IP.

    Attributes
    ----------
    prefix : str
        Module prefix: ``<prefix>_core``, ``<prefix>_ip_wb`` (Wishbone top), ``<prefix>_ip_axil`` (AXI4-Lite top).
    model : str
        Model name (manifest entry).
    out_dir : str
    sources : list of str
        Verilog files, dependencies first (da4ml static modules, stages, core, both tops).
    features : dict
        The feature spec.
    dims : list of int
        Network widths (inputs, hidden..., 1).
    threshold : int
        Reset value of THRESHOLD.
    model_id : int
        MODEL_ID (SHA-256 prefix of the integer file).
    history_impl : str
        ``"sr"`` (shift registers) or ``"lutram"`` (LUT RAM circular buffers).
    latency_cutoff, pre_cutoff : float
        da4ml adder delays per pipeline stage of the tail and of the precompute.
    clip_input : bool
        The sample is clipped before the tail's input register (see :func:`write_ip`).
    threshold_input : bool
        The threshold is an input of the tail (its second output is ``score - threshold``; see :func:`write_ip`).
    pre, tail : Part
    latency_cycles : int
        ``tail.stages + 1``.
    min_interval : int
        Minimum clock cycles between accepted samples (``pre.stages + 3``).
    prefill_cycles : int
        Clock edges from a START write to the first accepted sample with an expected rate
        (``history + pre.stages + 3``).
    sample_clip : int
        Largest sample value held (larger ones are clipped on entry).
    score_bits : int
        Width of the tail's score word; ``score_step`` the value of its LSB.
    score_step : int
    score_range : list of int
        Smallest and largest score the network can give (THRESHOLD is clamped to ``[min, max + 1]``).
    """

    prefix: str
    model: str
    out_dir: str
    sources: list
    features: dict
    dims: list
    threshold: int
    model_id: int
    history_impl: str
    latency_cutoff: float
    pre_cutoff: float
    clip_input: bool
    threshold_input: bool
    pre: Part
    tail: Part
    latency_cycles: int
    min_interval: int
    prefill_cycles: int
    sample_clip: int
    score_bits: int
    score_step: int
    score_range: list = field(default_factory=list)

    @property
    def top_wb(self) -> str:
        """Wishbone top module."""
        return f"{self.prefix}_ip_wb"

    @property
    def top_axil(self) -> str:
        """AXI4-Lite top module."""
        return f"{self.prefix}_ip_axil"

    @property
    def top_board(self) -> str:
        """Place-and-route harness (:func:`board_verilog`)."""
        return f"{self.prefix}_ip_board"

    @property
    def board_sources(self) -> list:
        """Sources of the place-and-route harness (the IP's and the harness)."""
        return list(self.sources) + [str(Path(self.out_dir) / "src" / f"{self.top_board}.v")]

    def save(self, path: Path) -> None:
        """Write the design description as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> IPDesign:
        """Read a description written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        d["pre"], d["tail"] = Part(**d["pre"]), Part(**d["tail"])
        return cls(**d)


def sample_clip(spec) -> int:
    """Largest sample value the history must hold to give the runtime's features: ``input_max`` without
    block sums, else ``((input_max + 1) << shift) - 1`` (a sample at or above it saturates both its window
    feature and its block's feature)."""
    return spec.input_max if spec.blocks == 0 else max(spec.input_max, ((spec.input_max + 1) << spec.shift) - 1)


def model_id(path: Path) -> int:
    """MODEL_ID of a model file: the first 32 bits of its SHA-256."""
    return int(hashlib.sha256(Path(path).read_bytes()).hexdigest()[:8], 16)


def _qints_layout(qints) -> list:
    """[offset, width, signed, step] per value of a da4ml interval list, packed low bits first."""
    from da4ml.types import minimal_kif

    out, off = [], 0
    for q in qints:
        k, i, f = minimal_kif(q)
        w = int(k) + int(i) + int(f)
        out.append([off, w, bool(k), float(2.0 ** -int(f))])
        off += w
    return out


def trace_parts(spec, mlp, solver_options: dict | None = None, tail_options: dict | None = None,
                clip_input: bool = True, threshold_input: bool = True):
    """Trace the precompute and the tail of an integer MLP into da4ml combinational logic.

    Parameters
    ----------
    spec : FeatureSpec
    mlp : IntegerMLP
        Its first layer takes ``spec.n_features`` inputs.
    solver_options : dict, optional
        da4ml CMVM solver options of the precompute.
    tail_options : dict, optional
        The same for the tail (default :data:`TAIL_SOLVER`: the least adder depth).
    clip_input : bool
        The tail takes the newest sample already clipped to ``[0, input_max]`` (the core clips it on its way
        into the tail's input register); else the raw 16-bit sample, clipped in the tail's first stage.
    threshold_input : bool
        The tail also takes the threshold (an integer in ``[score_min, score_max + 1]``) and gives a second
        output, ``score - threshold``, whose sign is the decision: the compare is part of the last layer's
        balanced adder tree instead of a carry chain after it.

    Returns
    -------
    pre, tail : da4ml CombLogic
        ``pre`` takes the ``window - 1`` older window samples (clipped samples, ``[0, sample_clip]``) and the
        ``blocks`` running sums (``[0, block * sample_clip]``) and gives the first hidden layer's partial
        accumulators ``P``; ``tail`` takes ``P`` (the precompute's output intervals), the newest sample and
        (``threshold_input``) the threshold, and gives the score (and ``score - threshold``). The tail's first
        layer, ``P + W0[:, newest] * c``, is one constant matrix-vector product over ``[P, c]`` so that da4ml
        balances its adder trees; so is the last one over ``[a, threshold]``.

    Raises
    ------
    ValueError
        The network does not fit the spec, or the spec has neither older window samples nor block sums.
    """
    from da4ml.trace import FixedVariableArray, comb_trace

    opts = dict(solver_options or {})
    topts = dict(TAIL_SOLVER if tail_options is None else tail_options)
    w0 = np.asarray(mlp.weights[0], np.int64)
    if w0.shape[1] != spec.n_features:
        raise ValueError(f"network takes {w0.shape[1]} inputs, the spec gives {spec.n_features}")
    w1 = spec.window - 1
    n_b = spec.blocks
    if w1 + n_b < 1:
        raise ValueError("the IP needs older window samples or block sums (window >= 2 or blocks >= 1)")
    sc = sample_clip(spec)
    lo = np.zeros(w1 + n_b)
    hi = np.array([sc] * w1 + [spec.block * sc] * n_b, np.float64)
    inp = FixedVariableArray.from_lhs(lo, hi, np.ones_like(lo), solver_options=opts)
    ib = spec.input_bits
    feats = []
    if w1:
        feats.append(inp[:w1].quantize(k=0, i=ib, f=0, overflow_mode="SAT", round_mode="TRN"))
    if n_b:
        feats.append((inp[w1:] * (2.0 ** -spec.shift)).quantize(k=0, i=ib, f=0, overflow_mode="SAT",
                                                               round_mode="TRN"))
    f = feats[0] if len(feats) == 1 else FixedVariableArray(np.concatenate([v._vars for v in feats]), opts)
    cols = list(range(w1)) + list(range(spec.window, spec.window + n_b))
    p = f @ w0[:, cols].T.astype(np.float64) + mlp.biases[0].astype(np.float64)
    pre = comb_trace(inp, p)

    pq = pre.out_qint
    p_in = FixedVariableArray.from_lhs(np.array([q.min for q in pq]), np.array([q.max for q in pq]),
                                       np.array([q.step for q in pq]), solver_options=topts)
    top = spec.input_max if clip_input else (1 << SAMPLE_BITS) - 1
    x = FixedVariableArray.from_lhs(np.zeros(1), np.full(1, float(top)), np.ones(1), solver_options=topts)
    c = x if clip_input else x.quantize(k=0, i=ib, f=0, overflow_mode="SAT", round_mode="TRN")
    h1 = w0.shape[0]
    m0 = np.concatenate([np.eye(h1), w0[:, spec.window - 1][None, :].astype(np.float64)], 0)
    a = FixedVariableArray(np.concatenate([p_in._vars, c._vars]), topts) @ m0
    n = len(mlp.weights)
    for k in range(1, n):
        e = int(mlp.shifts[k - 1])
        bits = int(mlp.act_max[k - 1]).bit_length()
        if (1 << bits) - 1 != int(mlp.act_max[k - 1]):
            raise ValueError(f"activation limit {mlp.act_max[k - 1]} of layer {k - 1} is not 2**bits - 1")
        a = (a.relu() * (2.0 ** e)).quantize(k=0, i=bits, f=0, overflow_mode="SAT", round_mode="TRN")
        if k < n - 1 or not threshold_input:
            a = a @ np.asarray(mlp.weights[k], np.float64).T + np.asarray(mlp.biases[k], np.float64)
    if n == 1 and threshold_input:
        raise ValueError("the threshold input needs a hidden layer")
    ins = [p_in._vars, x._vars]
    if threshold_input:
        w, b = np.asarray(mlp.weights[-1], np.float64), np.asarray(mlp.biases[-1], np.float64)
        score = a @ w.T + b
        lo, hi = float(score._vars[0].low), float(score._vars[0].high)
        thr = FixedVariableArray.from_lhs(np.array([lo]), np.array([hi + 1]), np.ones(1), solver_options=topts)
        # score - threshold as one product over [a, thr]: the threshold joins the last layer's adder tree
        m = np.concatenate([w.T, -np.ones((1, 1))], 0)
        smt = FixedVariableArray(np.concatenate([a._vars, thr._vars]), topts) @ m + b
        a = FixedVariableArray(np.concatenate([score._vars, smt._vars]), topts)
        ins.append(thr._vars)
    tail = comb_trace(FixedVariableArray(np.concatenate(ins), topts), a)
    return pre, tail


def reference_parts(pre, tail, spec, features: np.ndarray, newest: np.ndarray, threshold: int = 0) -> np.ndarray:
    """Scores of the two traced parts evaluated by da4ml's interpreter (for checks against the runtime).

    Parameters
    ----------
    pre, tail : CombLogic from :func:`trace_parts`
    spec : FeatureSpec
    features : ndarray, shape (n, window - 1 + blocks)
        Clipped older window samples and running block sums.
    newest : ndarray, shape (n,)
        Newest samples as the tail takes them (clipped to ``[0, input_max]`` when it was traced with
        ``clip_input``, else raw).
    threshold : int
        The tail's threshold input, when it has one.

    Returns
    -------
    ndarray, shape (n,) (the score) or (n, 2) (score and ``score - threshold``), int64
    """
    p = np.asarray(pre.predict(np.asarray(features, np.float64)), np.float64).reshape(len(features), -1)
    cols = [p, np.asarray(newest, np.float64)[:, None]]
    if tail.shape[0] == p.shape[1] + 2:
        cols.append(np.full((len(p), 1), float(threshold)))
    y = np.asarray(tail.predict(np.concatenate(cols, 1)), np.float64).reshape(len(p), -1)
    y = np.rint(y).astype(np.int64)
    return y[:, 0] if y.shape[1] == 1 else y


def _write_part(comb, module: str, out: Path, cutoff: float) -> Part:
    """Write one da4ml pipeline (``src/<module>_stage<i>.v``) and return its layout."""
    from da4ml.codegen import VerilogModel

    from beamloop.fpga.rtl import _stage_input_bits

    if any(int(s) != 0 for s in comb.inp_shifts):
        raise ValueError(f"{module}: da4ml input shifts {comb.inp_shifts} are not supported")
    cut = cutoff if cutoff > 0 else 1e9
    vm = VerilogModel(comb, module, out, latency_cutoff=cut, print_latency=False)
    vm.write()
    bits = _stage_input_bits(vm._pipe)
    outs = _qints_layout(comb.out_qint)
    files = sorted(str(p) for p in (out / "src").glob(f"{module}_stage*.v"))
    return Part(module=module, stages=len(bits), stage_bits=bits, out_bits=sum(o[1] for o in outs),
                inputs=_qints_layout(comb.inp_qint), outputs=outs, sources=files, ops=len(comb.ops),
                adder_depth=float(max(comb.latency)) if np.size(comb.latency) else 0.0)


def write_ip(model: str = "ejection", out_dir: str | Path = "ip", model_dir: Path | None = None,
             latency_cutoff: float = DEFAULT_LATENCY_CUTOFF, pre_cutoff: float | None = None,
             history_impl: str = "sr", threshold: int | None = None, solver_options: dict | None = None,
             tail_options: dict | None = None, clip_input: bool = True, threshold_input: bool = True,
             prefix: str | None = None) -> IPDesign:
    """Write the trigger IP of a shipped model: da4ml pipelines, core, Wishbone and AXI4-Lite tops.

    Parameters
    ----------
    model : str
        Manifest entry (default ``"ejection"``).
    out_dir : str or Path
        Project folder: ``pre/`` and ``tail/`` (da4ml projects), ``src/`` (core and tops), ``ip.json``.
    model_dir : Path, optional
        Folder of the manifest (default the shipped models).
    latency_cutoff : float
        da4ml adder delays per stage of the tail (the latency path).
    pre_cutoff : float, optional
        The same for the precompute (default ``latency_cutoff``); it sets the minimum sample interval only.
    history_impl : str
        ``"sr"``: the block delay lines as shift registers (flip-flops); ``"lutram"``: as circular buffers in
        LUT RAM (ECP5 distributed RAM, TRELLIS_DPR16X4).
    threshold : int, optional
        Reset value of THRESHOLD (default the manifest's score threshold).
    solver_options, tail_options : dict, optional
        da4ml CMVM solver options of the precompute and of the tail (:func:`trace_parts`).
    clip_input : bool
        Clip the sample to ``[0, input_max]`` on its way into the tail's input register (two LUT levels
        after ``s_axis_tdata``) instead of in the tail's first stage (one da4ml level more).
    threshold_input : bool
        The threshold joins the tail's last adder tree (``score - threshold``, the decision its sign bit)
        instead of a compare after the tail (a carry chain after the last adder: measured 83.6 MHz for the
        36-16-1 model's IP at cutoff 1).
    prefix : str, optional
        Module prefix (default the model name made an identifier).

    Returns
    -------
    IPDesign

    Raises
    ------
    ValueError
        Unknown ``history_impl``, a prefix that is not an identifier, or a network/spec the IP cannot take.
    """
    from beamloop.edge.trigger.model import MODEL_DIR, ModelTrigger, load_manifest

    if history_impl not in ("sr", "lutram"):
        raise ValueError(f"history_impl must be 'sr' or 'lutram', got {history_impl!r}")
    d = Path(model_dir or MODEL_DIR)
    trig = ModelTrigger(model, model_dir=d, threshold=threshold)
    entry = load_manifest(d)["models"][model]
    prefix = prefix or "".join(ch if ch.isalnum() else "_" for ch in model)
    if not prefix.isidentifier():
        prefix = "m_" + prefix
    spec, mlp = trig.spec, trig.mlp
    if spec.block & (spec.block - 1) and history_impl == "lutram":
        raise ValueError("the LUT RAM history needs a power-of-two block length")
    out = Path(out_dir).resolve()
    (out / "src").mkdir(parents=True, exist_ok=True)
    pre_c, tail_c = trace_parts(spec, mlp, solver_options, tail_options, clip_input, threshold_input)
    pc = latency_cutoff if pre_cutoff is None else pre_cutoff
    pre = _write_part(pre_c, f"{prefix}_pre", out / "pre", pc)
    tail = _write_part(tail_c, f"{prefix}_tail", out / "tail", latency_cutoff)
    if len(tail.outputs) != (2 if threshold_input else 1):
        raise ValueError("the tail must give the score (and score - threshold)")
    s_off, s_bits, s_signed, s_step = tail.outputs[0]
    if s_step < 1 or s_step != int(s_step) or int(s_step) & (int(s_step) - 1):
        raise ValueError(f"score LSB {s_step} is not a power of two >= 1")
    static = sorted(str(p) for p in (out / "pre" / "src" / "static").glob("*.v") if p.name != "lookup_table.v")
    design = IPDesign(prefix=prefix, model=model, out_dir=str(out), sources=[], features=spec.as_dict(),
                      dims=[int(v) for v in mlp.dims], threshold=int(trig.threshold),
                      model_id=model_id(d / entry["files"]["integer"]), history_impl=history_impl,
                      latency_cutoff=float(latency_cutoff), pre_cutoff=float(pc), clip_input=bool(clip_input),
                      threshold_input=bool(threshold_input), pre=pre, tail=tail,
                      latency_cycles=tail.stages + 1, min_interval=pre.stages + 3,
                      prefill_cycles=spec.history + pre.stages + 3, sample_clip=sample_clip(spec),
                      score_bits=int(s_bits), score_step=int(s_step),
                      score_range=[int(tail_c.out_qint[0].min), int(tail_c.out_qint[0].max)])
    core = out / "src" / f"{prefix}_core.v"
    core.write_text(core_verilog(design, spec))
    (out / "src" / f"{prefix}_ip_wb.v").write_text(wishbone_verilog(prefix))
    (out / "src" / f"{prefix}_ip_axil.v").write_text(axilite_verilog(prefix))
    (out / "src" / f"{prefix}_ip_board.v").write_text(board_verilog(prefix))
    design.sources = static + pre.sources + tail.sources + [str(core), str(out / "src" / f"{prefix}_ip_wb.v"),
                                                            str(out / "src" / f"{prefix}_ip_axil.v")]
    design.save(out / "ip.json")
    return design


# ---------------------------------------------------------------------------------------------------------------
# Verilog text


def _bits(n: int) -> int:
    """Bits of an unsigned value up to ``n`` (at least 1)."""
    return max(int(n).bit_length(), 1)


def _pack(layout: list, names: list) -> str:
    """Verilog concatenation (MSB first) of the used values of a packed input layout; ``names[i]`` is the
    expression of value ``i`` (of exactly that width)."""
    parts = [names[i] for i in range(len(layout) - 1, -1, -1) if layout[i][1] > 0]
    return "{" + ", ".join(parts) + "}"


def _pipeline(part: Part, inp: str) -> tuple[str, str]:
    """Declarations and always-block body of one da4ml pipeline: stage ``i``'s input register loaded every
    cycle from stage ``i - 1``'s output (stage 0 reads ``inp`` directly: its register is the caller's).
    Returns (declarations, register loads); the pipeline output wire is ``<module>_out``."""
    m = part.module
    decl = []
    n = part.stages
    outs = list(part.stage_bits[1:]) + [part.out_bits]
    for i in range(n):
        if i:
            decl.append(f"reg [{part.stage_bits[i] - 1}:0] {m}_s{i};")
        decl.append(f"wire [{outs[i] - 1}:0] {m}_o{i};")
    for i in range(n):
        src = inp if i == 0 else f"{m}_s{i}"
        decl.append(f"{m}_stage{i} {m}_u{i} (.model_inp({src}), .model_out({m}_o{i}));")
    decl.append(f"wire [{part.out_bits - 1}:0] {m}_out = {m}_o{n - 1};")
    loads = [f"{m}_s{i} <= {m}_o{i - 1};" for i in range(1, n)]
    return "\n    ".join(decl), "\n        ".join(loads)


def core_verilog(d: IPDesign, spec) -> str:
    """Verilog of ``<prefix>_core``: history, precompute, tail, control and registers (see the module
    docstring; register map :data:`REGISTERS`)."""
    p = d.prefix
    w1, nb, blk, h = spec.window - 1, spec.blocks, spec.block, spec.history
    sc = d.sample_clip
    sbw = _bits(sc)
    sumw = _bits(blk * sc)
    hb = _bits(h - 1)
    lp, lt = d.pre.stages, d.tail.stages
    sb, step = d.score_bits, d.score_step
    sh = int(math.log2(step))
    signed_score = d.tail.outputs[0][2]
    # ---- history -------------------------------------------------------------------------------------------------
    hist_decl, hist_reset, hist_push, hist_start, hist_sum = [], [], [], [], []
    if w1:
        hist_decl.append(f"reg [{sbw * w1 - 1}:0] winv;  // older window samples, oldest in the low bits")
        hist_reset.append("winv <= 0;")
        hist_push.append(f"winv <= {{val_q{', winv[' + str(sbw * w1 - 1) + ':' + str(sbw) + ']' if w1 > 1 else ''}}};")
        leave_win = f"winv[{sbw - 1}:0]"
    else:
        leave_win = "val_q"
    # reach flags: rch[m] = held >= window - 1 + m * block (m = 0 .. blocks), registered so that the block
    # sums' entering/leaving masks come straight from flip-flops
    thr = [spec.window - 1 + m * blk for m in range(nb + 1)]
    rch_init = "".join("1" if t == 0 else "0" for t in reversed(thr))
    rch_next = ", ".join("1'b1" if t == 0 else f"rch[{m}] | (held == {hb}'d{t - 1})"
                         for m, t in reversed(list(enumerate(thr))))
    ptr_bits = _bits(blk - 1)
    if nb and d.history_impl == "lutram":
        hist_decl.append(f"reg [{ptr_bits - 1}:0] dl_ptr;  // circular-buffer position (shared by the blocks)")
        hist_reset.append("dl_ptr <= 0;")
        hist_push.append(f"dl_ptr <= dl_ptr + {ptr_bits}'d1;")
    for j in range(nb):
        m_in, m_out = nb - 1 - j, nb - j  # reach flags of the samples entering and leaving block j
        enter_src = leave_win if j == nb - 1 else f"dl_l{j + 1}"
        hist_decl.append(f"reg [{sumw - 1}:0] bsum{j};  // running sum of block {j} (oldest first)")
        hist_decl.append(f"reg [{sbw}:0] bdelta{j};  // entering - leaving sample, added to bsum{j} a cycle later")
        if j == nb - 1:
            hist_decl.append(f"wire [{sbw - 1}:0] dl_e{j} = rch[{m_in}] ? {enter_src} : {sbw}'d0;")
        else:
            hist_decl.append(f"wire [{sbw - 1}:0] dl_e{j} = {enter_src};")
        if d.history_impl == "lutram":
            hist_decl.append(f"reg [{sbw - 1}:0] dl_m{j} [0:{blk - 1}];")
            hist_decl.append(f"wire [{sbw - 1}:0] dl_r{j} = dl_m{j}[dl_ptr];")
            hist_push.append(f"dl_m{j}[dl_ptr] <= dl_e{j};")
        else:
            hist_decl.append(f"reg [{sbw * blk - 1}:0] dl_v{j};  // block {j} delay line, oldest in the low bits")
            hist_decl.append(f"wire [{sbw - 1}:0] dl_r{j} = dl_v{j}[{sbw - 1}:0];")
            hist_reset.append(f"dl_v{j} <= 0;")
            tail_bits = f", dl_v{j}[{sbw * blk - 1}:{sbw}]" if blk > 1 else ""
            hist_push.append(f"dl_v{j} <= {{dl_e{j}{tail_bits}}};")
        hist_decl.append(f"wire [{sbw - 1}:0] dl_l{j} = rch[{m_out}] ? dl_r{j} : {sbw}'d0;")
        hist_reset.append(f"bsum{j} <= 0;")
        hist_start.append(f"bsum{j} <= 0;")
        hist_push.append(f"bdelta{j} <= {{1'b0, dl_e{j}}} - {{1'b0, dl_l{j}}};")
        hist_sum.append(f"bsum{j} <= bsum{j} + {{{{{sumw - sbw - 1}{{bdelta{j}[{sbw}]}}}}, bdelta{j}}};")
    # precompute input: older window samples then block sums, as trace_parts declares them
    names = [f"winv[{sbw * (i + 1) - 1}:{sbw * i}]" for i in range(w1)] + [f"bsum{j}" for j in range(nb)]
    for (_off, w, _sgn, _stp), nm in zip(d.pre.inputs, names):
        if w and w != (sbw if nm.startswith("winv") else sumw):
            raise ValueError(f"precompute input {nm}: da4ml width {w} differs from the register")
    pre_in = _pack(d.pre.inputs, names)
    pre_decl, pre_loads = _pipeline(d.pre, "pre_in")
    # tail input: P values (the precompute's output words) then the raw sample
    p_names = []
    for k, (off, w, _sgn, stp) in enumerate(d.pre.outputs):
        tw = d.tail.inputs[k][1]
        if tw and (tw != w or d.tail.inputs[k][3] != stp):
            raise ValueError(f"tail input P{k} ({tw} bits) does not match the precompute output ({w} bits)")
        p_names.append(f"p_reg[{off + w - 1}:{off}]" if w else "")  # P of the accepted sample's decision
    xb = spec.input_bits if d.clip_input else SAMPLE_BITS
    n_p = len(d.pre.outputs)
    if d.tail.inputs[n_p][1] != xb:
        raise ValueError(f"tail sample input is {d.tail.inputs[n_p][1]} bits, expected {xb}")
    if d.clip_input:
        x_load = (f"x_reg <= (s_axis_tdata > {SAMPLE_BITS}'d{spec.input_max}) ? {xb}'d{spec.input_max} : "
                  f"s_axis_tdata[{xb - 1}:0];  // clipped on the way in")
    else:
        x_load = "x_reg <= s_axis_tdata;"
    tail_in = _pack(d.tail.inputs, p_names + ["x_reg"] + (["thr_q"] if d.threshold_input else []))
    tail_decl, tail_loads = _pipeline(d.tail, "tail_in")
    s_off = d.tail.outputs[0][0]
    sw = "score_word"
    sext = f"{{{sw}[{sb - 1}], {sw}}}" if signed_score else f"{{1'b0, {sw}}}"
    if d.threshold_input:  # thresholds in score units, clamped to the score's range (+ 1: never fires)
        t_off, tw_bits, _, _ = d.tail.inputs[-1]
        m_off, m_bits, m_signed, _ = d.tail.outputs[1]
        lo_w, hi_w = int(d.score_range[0]), int(d.score_range[1]) + 1
        tstep = 1
        fire_expr = f"{{dec_last}} & ~{p}_tail_out[{m_off + m_bits - 1}]" if m_signed else "{dec_last}"
    else:  # thresholds in score words, compared after the tail
        lo_w = -(1 << (sb - 1)) if signed_score else 0
        hi_w = ((1 << (sb - 1)) - 1 if signed_score else (1 << sb) - 1) + 1
        tw_bits = sb + 2
        tstep = step
        fire_expr = "{dec_last} & (score_w >= thr_word)"
    regs = {r.name: r.offset >> 2 for r in REGISTERS}
    latc_bits = 8
    cfg_word = (min(h, 0xFFFF) << 16) | (min(d.min_interval, 255) << 8) | min(d.latency_cycles, 255)
    # shift registers carrying each sample's flags beside the tail (position i = stage i's input)
    if lt > 1:
        pipes = (f"reg [{lt - 1}:0] tv;  // tv[i]: stage i's input holds a sample\n"
                 f"    reg [{lt - 1}:0] dec_p;  // ... decided on (history full when accepted)\n"
                 f"    reg [{latc_bits * lt - 1}:0] stamp_p;  // ... and its accept-cycle stamp")
        tv_last, dec_last = f"tv[{lt - 1}]", f"dec_p[{lt - 1}]"
        stamp_last = f"stamp_p[{latc_bits * lt - 1}:{latc_bits * (lt - 1)}]"
        pipe_shift = (f"tv <= {{tv[{lt - 2}:0], accept}};\n"
                      f"            dec_p <= {{dec_p[{lt - 2}:0], accept & full}};\n"
                      f"            stamp_p <= {{stamp_p[{latc_bits * (lt - 1) - 1}:0], cyc}};")
    else:
        pipes = (f"reg tv;\n    reg dec_p;\n    reg [{latc_bits - 1}:0] stamp_p;")
        tv_last, dec_last, stamp_last = "tv", "dec_p", "stamp_p"
        pipe_shift = "tv <= accept;\n            dec_p <= accept & full;\n            stamp_p <= cyc;"
    hist_decl_s = "\n    ".join(hist_decl)
    hist_reset_s = "\n            ".join(hist_reset)
    hist_push_s = "\n                ".join(hist_push)
    hist_start_s = "\n                ".join(hist_start)
    hist_sum_s = "\n                ".join(hist_sum) or "// no block sums"
    rd_cases = "\n                ".join([
        f"6'd{regs['ID']}: reg_rdata <= 32'h{ID_WORD:08X};",
        f"6'd{regs['CTRL']}: reg_rdata <= {{31'd0, enable}};",
        f"6'd{regs['STATUS']}: reg_rdata <= {{28'd0, pf_active, full, ready, blank_r}};",
        f"6'd{regs['THRESHOLD']}: reg_rdata <= thr_reg;",
        f"6'd{regs['EXPECTED_RATE']}: reg_rdata <= rate_reg;",
        f"6'd{regs['TRIGGER_COUNT']}: reg_rdata <= trig_count;",
        f"6'd{regs['SAMPLE_COUNT']}: reg_rdata <= sample_count;",
        f"6'd{regs['LAST_TRIGGER_SAMPLE']}: reg_rdata <= last_trig;",
        f"6'd{regs['LATENCY']}: reg_rdata <= {{{32 - latc_bits}'d0, lat_reg}};",
        f"6'd{regs['LAST_SCORE']}: reg_rdata <= last_score;",
        f"6'd{regs['MODEL_ID']}: reg_rdata <= 32'h{d.model_id:08X};",
        f"6'd{regs['CONFIG']}: reg_rdata <= 32'h{cfg_word:08X};",
        "default: reg_rdata <= 32'd0;"])
    thr_reset = d.threshold & 0xFFFFFFFF
    rate_hi = 31 if sbw >= 16 else sbw + 15  # the integer part's bits that fit a held sample
    neg = "-" if lo_w < 0 else ""
    return f"""`timescale 1 ns / 1 ps
// beamloop trigger IP core (fpga/ip.py), model {d.model}: {d.dims} MLP on {spec.window} samples + {nb} block sums
// of {blk}; history {h} samples; precompute {lp} stage(s), tail {lt} stage(s); latency {d.latency_cycles} cycles
// (sample on s_axis_tdata to blank), minimum sample interval {d.min_interval} cycles.
module {p}_core (
    input clk,
    input rst,
    input [{SAMPLE_BITS - 1}:0] s_axis_tdata,
    input s_axis_tvalid,
    output s_axis_tready,
    input reg_req,
    input reg_we,
    input [5:0] reg_addr,
    input [31:0] reg_wdata,
    input [3:0] reg_wstrb,
    output reg [31:0] reg_rdata,
    output reg reg_ack,
    output blank,
    output reg score_valid,
    output reg score_decided,
    output reg score_fire,
    output reg signed [31:0] score
);
    // ---- registers
    reg enable;
    reg blank_r;
    reg [31:0] thr_reg;
    reg signed [{tw_bits - 1}:0] thr_word;  // THRESHOLD, clamped to [{lo_w}, {hi_w}]
    reg [31:0] rate_reg;
    reg [31:0] trig_count;
    reg [31:0] sample_count;
    reg [31:0] last_trig;
    reg [{latc_bits - 1}:0] lat_reg;
    reg signed [31:0] last_score;
    reg [{latc_bits - 1}:0] cyc;  // free-running cycle stamp
    wire wr = reg_req & reg_we;
    wire wr_ctrl = wr & (reg_addr == 6'd{regs['CTRL']}) & reg_wstrb[0];
    reg start;  // START, acted on in the cycle after the write (its decode stays off the sample path)

    // ---- history
    reg [{hb - 1}:0] held;  // samples held for the next decision (saturates at {h - 1})
    reg [{nb}:0] rch;  // rch[m]: held >= {', '.join(str(t) for t in thr)} (m = 0..{nb})
    wire full = rch[{nb}];
    reg pf_active;  // expected-rate pre-fill running
    reg [{hb - 1}:0] pf_n;
    // count j = floor((j + 1) r) - floor(j r) = (rate >> 16) + carry of the fraction of j r plus rate's fraction
    reg [15:0] pf_frac;  // fraction of j * rate
    reg [{sbw - 1}:0] pf_c0, pf_c1;  // min(rate >> 16, clip), min((rate >> 16) + 1, clip)
    wire [16:0] pf_sum = {{1'b0, pf_frac}} + {{1'b0, rate_reg[15:0]}};
    wire [{sbw - 1}:0] pf_val = pf_sum[16] ? pf_c1 : pf_c0;
    reg [{_bits(lp + 1) - 1}:0] pre_cnt;  // precompute cycles left
    reg push_q;  // the history takes a sample one cycle after it is accepted (short enable paths)
    reg push_qq;  // ... and the block sums their entering - leaving a cycle after that
    reg [{sbw - 1}:0] val_q;
    wire ready = (pre_cnt == 0) & ~pf_active & ~push_q & ~push_qq & ~start;
    assign s_axis_tready = ready;
    wire accept = s_axis_tvalid & s_axis_tready;
    wire [{sbw - 1}:0] x_clip = (s_axis_tdata > {SAMPLE_BITS}'d{sc}) ? {sbw}'d{sc} : s_axis_tdata[{sbw - 1}:0];
    wire push = accept | pf_active;
    wire [{sbw - 1}:0] push_val = pf_active ? pf_val : x_clip;
    {hist_decl_s}

    always @(posedge clk) begin
        push_q <= push;
        push_qq <= push_q & ~start;  // a START discards the pending block-sum update
        val_q <= push_val;
        if (rst) begin
            held <= 0;
            rch <= {nb + 1}'b{rch_init};
            push_q <= 1'b0;
            push_qq <= 1'b0;
            pf_active <= 1'b0;
            pf_n <= 0;
            pf_frac <= 16'd0;
            pf_c0 <= 0;
            pf_c1 <= 0;
            {hist_reset_s}
        end else begin
            if (push_q) begin
                {hist_push_s}
                held <= full ? held : held + {hb}'d1;
                rch <= {{{rch_next}}};
            end
            if (push_qq) begin
                {hist_sum_s}
            end
            if (pf_active) begin
                pf_frac <= pf_sum[15:0];
                pf_n <= pf_n + {hb}'d1;
                if (pf_n == {hb}'d{h - 2}) pf_active <= 1'b0;
            end
            if (start) begin  // a new dwell (a sample taken in the cycle of the START write is dropped)
                held <= 0;
                rch <= {nb + 1}'b{rch_init};
                {hist_start_s}
                pf_active <= rate_reg != 32'd0;
                pf_n <= 0;
                pf_frac <= rate_reg[15:0];  // j = 1
                pf_c0 <= (rate_reg[31:16] > 16'd{sc}) ? {sbw}'d{sc} : rate_reg[{rate_hi}:16];
                pf_c1 <= (rate_reg[31:16] >= 16'd{sc}) ? {sbw}'d{sc} : rate_reg[{rate_hi}:16] + {sbw}'d1;
            end
        end
    end

    // ---- precompute: P of the next decision, after every change of the history
    wire [{d.pre.stage_bits[0] - 1}:0] pre_in = {pre_in};
    {pre_decl}
    // the last stage's output holds P from pre_cnt == 0 until the next push; the tail takes a copy with the sample
    always @(posedge clk) begin
        {pre_loads}
        if (rst) pre_cnt <= {lp};  // P of the cleared history
        else if (push_q | push_qq | start) pre_cnt <= {lp};
        else if (pre_cnt != 0) pre_cnt <= pre_cnt - 1;
    end

    // ---- tail: the decision on the accepted sample
    reg [{xb - 1}:0] x_reg;
    reg [{d.pre.out_bits - 1}:0] p_reg;
    reg [{tw_bits - 1}:0] thr_q;  // THRESHOLD of the accepted sample's decision
    wire [{d.tail.stage_bits[0] - 1}:0] tail_in = {tail_in};
    {tail_decl}
    {pipes}
    reg [{_bits(lt + 1) - 1}:0] in_flight;
    wire [{sb - 1}:0] score_word = {p}_tail_out[{s_off + sb - 1}:{s_off}];
    wire signed [{sb}:0] score_w = {sext};
    wire fire = {fire_expr.format(dec_last=dec_last)};
    wire signed [31:0] score_v = $signed(score_w) <<< {sh};
    always @(posedge clk) begin
        {tail_loads}
        if (ready) begin  // stage 0's input register: loaded while ready, so it holds the accepted sample and
            {x_load}  // P of its decision (the enable is a function of registers, not of tvalid)
            p_reg <= {p}_pre_out;
            thr_q <= thr_word;
        end
        if (rst) begin
            x_reg <= 0;
            p_reg <= 0;
            thr_q <= 0;
            tv <= 0;
            dec_p <= 0;
            stamp_p <= 0;
        end else begin
            {pipe_shift}
            if (start) tv <= 0;
        end
    end

    // ---- control and registers
    always @(posedge clk) begin
        cyc <= cyc + {latc_bits}'d1;
        thr_word <= ($signed(thr_reg) >= $signed(32'd{hi_w * tstep})) ? {tw_bits}'sd{hi_w} :
                    ($signed(thr_reg) <= $signed({neg}32'd{abs(lo_w) * tstep})) ? {neg}{tw_bits}'sd{abs(lo_w)} :
                    ($signed(thr_reg) + $signed(32'd{tstep - 1})) >>> {int(math.log2(tstep))};
        reg_ack <= reg_req;
        start <= wr_ctrl & reg_wdata[1];
        score_valid <= 1'b0;
        score_fire <= 1'b0;
        if (rst) begin
            cyc <= 0;
            start <= 1'b0;
            enable <= 1'b0;
            blank_r <= 1'b0;
            thr_reg <= 32'h{thr_reset:08X};
            rate_reg <= 32'd0;
            trig_count <= 32'd0;
            sample_count <= 32'd0;
            last_trig <= 32'hFFFFFFFF;
            lat_reg <= 0;
            last_score <= 32'sd0;
            in_flight <= 0;
            reg_ack <= 1'b0;
            reg_rdata <= 32'd0;
            score <= 32'sd0;
            score_decided <= 1'b0;
        end else begin
            if (accept) sample_count <= sample_count + 32'd1;
            in_flight <= in_flight + (accept ? 1 : 0) - ({tv_last} ? 1 : 0);
            if ({tv_last}) begin
                score_valid <= 1'b1;
                score_decided <= {dec_last};
                score_fire <= fire;
                score <= {dec_last} ? score_v : 32'sd0;
                if ({dec_last}) last_score <= score_v;
            end
            if (wr & (reg_addr == 6'd{regs['STATUS']}) & reg_wstrb[0] & reg_wdata[0]) blank_r <= 1'b0;  // rearm
            if ({tv_last} & fire & enable & ~blank_r) begin
                blank_r <= 1'b1;
                trig_count <= trig_count + 32'd1;
                last_trig <= sample_count - {{{32 - _bits(lt + 1)}'d0, in_flight}};
                lat_reg <= cyc - {stamp_last} + {latc_bits}'d1;
            end
            if (wr_ctrl) enable <= reg_wdata[0];
            if (wr & (reg_addr == 6'd{regs['THRESHOLD']})) begin
                if (reg_wstrb[0]) thr_reg[7:0] <= reg_wdata[7:0];
                if (reg_wstrb[1]) thr_reg[15:8] <= reg_wdata[15:8];
                if (reg_wstrb[2]) thr_reg[23:16] <= reg_wdata[23:16];
                if (reg_wstrb[3]) thr_reg[31:24] <= reg_wdata[31:24];
            end
            if (wr & (reg_addr == 6'd{regs['EXPECTED_RATE']})) begin
                if (reg_wstrb[0]) rate_reg[7:0] <= reg_wdata[7:0];
                if (reg_wstrb[1]) rate_reg[15:8] <= reg_wdata[15:8];
                if (reg_wstrb[2]) rate_reg[23:16] <= reg_wdata[23:16];
                if (reg_wstrb[3]) rate_reg[31:24] <= reg_wdata[31:24];
            end
            if (wr & (reg_addr == 6'd{regs['TRIGGER_COUNT']})) trig_count <= reg_wdata;
            if (start) begin
                blank_r <= 1'b0;
                sample_count <= 32'd0;
                last_trig <= 32'hFFFFFFFF;
                in_flight <= 0;
            end
            if (reg_req & ~reg_we) begin
                case (reg_addr)
                {rd_cases}
                endcase
            end
        end
    end
    assign blank = blank_r;
endmodule
"""


_STREAM_PORTS = f"""    input [{SAMPLE_BITS - 1}:0] s_axis_tdata,
    input s_axis_tvalid,
    output s_axis_tready,
    output blank,
    output score_valid,
    output score_decided,
    output score_fire,
    output signed [31:0] score
);"""
"""The sample-stream and output ports both bus tops share (Verilog, ending the port list)."""


def _core_instance(prefix: str, clk: str, rst: str, req: str, we: str, addr: str, wdata: str, wstrb: str,
                   rdata: str) -> str:
    """Verilog instance ``core`` of ``<prefix>_core`` with the bus signals given and the stream ports passed on."""
    return (f"{prefix}_core core (.clk({clk}), .rst({rst}), .s_axis_tdata(s_axis_tdata), "
            f".s_axis_tvalid(s_axis_tvalid),\n        .s_axis_tready(s_axis_tready), .reg_req({req}), .reg_we({we}), "
            f".reg_addr({addr}),\n        .reg_wdata({wdata}), .reg_wstrb({wstrb}), .reg_rdata({rdata}), "
            ".reg_ack(ack), .blank(blank),\n        .score_valid(score_valid), .score_decided(score_decided), "
            ".score_fire(score_fire), .score(score));")


def wishbone_verilog(prefix: str) -> str:
    """Verilog of ``<prefix>_ip_wb``: the core behind a Wishbone B4 classic slave (32-bit data, byte
    addresses ``wb_adr_i[7:0]``, ``wb_sel_i`` byte lanes). Every access takes two cycles: the request cycle and
    the ``wb_ack_o`` cycle, which carries the read data (``wb_dat_o`` is a register of the core). One clock
    (``wb_clk_i``) for the bus and the sample stream; ``wb_rst_i`` is synchronous, active high."""
    return f"""`timescale 1 ns / 1 ps
// beamloop trigger IP, Wishbone B4 classic slave (fpga/ip.py). Register map: fpga/README.md.
module {prefix}_ip_wb (
    input wb_clk_i,
    input wb_rst_i,
    input [7:0] wb_adr_i,
    input [31:0] wb_dat_i,
    output [31:0] wb_dat_o,
    input wb_we_i,
    input [3:0] wb_sel_i,
    input wb_stb_i,
    input wb_cyc_i,
    output wb_ack_o,
{_STREAM_PORTS}
    wire ack;
    wire req = wb_cyc_i & wb_stb_i & ~ack;  // one request per classic cycle; ack ends it
    {_core_instance(prefix, "wb_clk_i", "wb_rst_i", "req", "wb_we_i", "wb_adr_i[7:2]", "wb_dat_i", "wb_sel_i",
                    "wb_dat_o")}
    assign wb_ack_o = ack;
endmodule
"""


def axilite_verilog(prefix: str) -> str:
    """Verilog of ``<prefix>_ip_axil``: the core behind an AXI4-Lite slave (32-bit data, 8-bit byte addresses,
    one outstanding write and one outstanding read, responses always OKAY). Address and data of a write may
    arrive in either order; a write pending at the same time as a read goes first. ``aresetn`` is
    synchronous, active low."""
    return f"""`timescale 1 ns / 1 ps
// beamloop trigger IP, AXI4-Lite slave (fpga/ip.py). Register map: fpga/README.md.
module {prefix}_ip_axil (
    input aclk,
    input aresetn,
    input [7:0] s_axil_awaddr,
    input s_axil_awvalid,
    output s_axil_awready,
    input [31:0] s_axil_wdata,
    input [3:0] s_axil_wstrb,
    input s_axil_wvalid,
    output s_axil_wready,
    output [1:0] s_axil_bresp,
    output reg s_axil_bvalid,
    input s_axil_bready,
    input [7:0] s_axil_araddr,
    input s_axil_arvalid,
    output s_axil_arready,
    output reg [31:0] s_axil_rdata,
    output [1:0] s_axil_rresp,
    output reg s_axil_rvalid,
    input s_axil_rready,
{_STREAM_PORTS}
    wire rst = ~aresetn;
    reg aw_full, w_full, ar_full, busy, busy_rd;
    reg [7:0] aw_addr, ar_addr;
    reg [31:0] w_data;
    reg [3:0] w_strb;
    wire [31:0] rdata;
    wire ack;
    assign s_axil_awready = ~aw_full & ~s_axil_bvalid;
    assign s_axil_wready = ~w_full & ~s_axil_bvalid;
    assign s_axil_arready = ~ar_full & ~s_axil_rvalid;
    assign s_axil_bresp = 2'b00;
    assign s_axil_rresp = 2'b00;
    wire do_wr = aw_full & w_full & ~busy & ~s_axil_bvalid;
    wire do_rd = ar_full & ~busy & ~do_wr & ~s_axil_rvalid;
    wire req = do_wr | do_rd;
    {_core_instance(prefix, "aclk", "rst", "req", "do_wr", "do_wr ? aw_addr[7:2] : ar_addr[7:2]", "w_data", "w_strb",
                    "rdata")}
    always @(posedge aclk) begin
        if (rst) begin
            aw_full <= 1'b0;
            w_full <= 1'b0;
            ar_full <= 1'b0;
            busy <= 1'b0;
            busy_rd <= 1'b0;
            s_axil_bvalid <= 1'b0;
            s_axil_rvalid <= 1'b0;
            s_axil_rdata <= 32'd0;
        end else begin
            if (s_axil_awvalid & s_axil_awready) begin aw_full <= 1'b1; aw_addr <= s_axil_awaddr; end
            if (s_axil_wvalid & s_axil_wready) begin w_full <= 1'b1; w_data <= s_axil_wdata; w_strb <= s_axil_wstrb; end
            if (s_axil_arvalid & s_axil_arready) begin ar_full <= 1'b1; ar_addr <= s_axil_araddr; end
            if (req) begin busy <= 1'b1; busy_rd <= do_rd; end
            if (ack) begin
                busy <= 1'b0;
                if (busy_rd) begin
                    s_axil_rvalid <= 1'b1;
                    s_axil_rdata <= rdata;
                    ar_full <= 1'b0;
                end else begin
                    s_axil_bvalid <= 1'b1;
                    aw_full <= 1'b0;
                    w_full <= 1'b0;
                end
            end
            if (s_axil_bvalid & s_axil_bready) s_axil_bvalid <= 1'b0;
            if (s_axil_rvalid & s_axil_rready) s_axil_rvalid <= 1'b0;
        end
    end
endmodule
"""


def board_verilog(prefix: str) -> str:
    """Verilog of ``<prefix>_ip_board``, the place-and-route harness: ``<prefix>_ip_wb`` with a register on every
    input and output pin, so that every path inside the IP, the sample's clipping and the accept logic
    included, starts and ends at a flip-flop and is timed by nextpnr (unconstrained pin-to-register paths are
    not). It is not a usable bus interface (a registered ``wb_stb_i`` would repeat a request); its extra
    flip-flops (one per pin, 137) count in the resources."""
    return f"""`timescale 1 ns / 1 ps
// beamloop trigger IP, place-and-route harness (fpga/ip.py): every pin registered.
module {prefix}_ip_board (
    input clk,
    input rst,
    input [7:0] wb_adr_i,
    input [31:0] wb_dat_i,
    output reg [31:0] wb_dat_o,
    input wb_we_i,
    input [3:0] wb_sel_i,
    input wb_stb_i,
    input wb_cyc_i,
    output reg wb_ack_o,
    input [{SAMPLE_BITS - 1}:0] s_axis_tdata,
    input s_axis_tvalid,
    output reg s_axis_tready,
    output reg blank,
    output reg score_valid,
    output reg score_decided,
    output reg score_fire,
    output reg [31:0] score
);
    reg rst_q, we_q, stb_q, cyc_q, tvalid_q;
    reg [7:0] adr_q;
    reg [31:0] dat_q;
    reg [3:0] sel_q;
    reg [{SAMPLE_BITS - 1}:0] tdata_q;
    wire [31:0] dat_o, score_o;
    wire ack_o, tready_o, blank_o, sv_o, sd_o, sf_o;
    always @(posedge clk) begin
        rst_q <= rst; adr_q <= wb_adr_i; dat_q <= wb_dat_i; we_q <= wb_we_i; sel_q <= wb_sel_i;
        stb_q <= wb_stb_i; cyc_q <= wb_cyc_i; tdata_q <= s_axis_tdata; tvalid_q <= s_axis_tvalid;
        wb_dat_o <= dat_o; wb_ack_o <= ack_o; s_axis_tready <= tready_o; blank <= blank_o;
        score_valid <= sv_o; score_decided <= sd_o; score_fire <= sf_o; score <= score_o;
    end
    {prefix}_ip_wb ip (.wb_clk_i(clk), .wb_rst_i(rst_q), .wb_adr_i(adr_q), .wb_dat_i(dat_q), .wb_dat_o(dat_o),
        .wb_we_i(we_q), .wb_sel_i(sel_q), .wb_stb_i(stb_q), .wb_cyc_i(cyc_q), .wb_ack_o(ack_o),
        .s_axis_tdata(tdata_q), .s_axis_tvalid(tvalid_q), .s_axis_tready(tready_o), .blank(blank_o),
        .score_valid(sv_o), .score_decided(sd_o), .score_fire(sf_o), .score(score_o));
endmodule
"""
