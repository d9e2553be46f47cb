"""Verilog for a trigger model: da4ml's pipelined adder graph inside our trigger wrapper.

The wrapper (:func:`wrapper_verilog`, module ``<name>_trigger``) is written here, not by da4ml. It
instantiates da4ml's combinational stage modules (``<name>_stage0`` ... ``<name>_stage<stages-1>``) and
its own pipeline registers, in place of da4ml's pipeline top ``<name>`` (which registers the last stage's
output, one cycle the trigger does not need):

- **input sample**: ``in_features`` (``n_inputs`` words of ``input_bits``, word 0 in the least significant
  bits) is taken on the clock edge where ``in_valid`` is high, straight into stage 0's input register
  (loaded every cycle, as in da4ml's pipeline; no extra input register);
- **model**: each of the ``stages`` stages is registered at its input (``stages`` cycles); a shift register
  carries ``valid`` beside it;
- **threshold compare**, folded into the last stage: ``score >= THRESHOLD`` (signed, in output words) is
  computed on the last stage's combinational output and registered with it (1 cycle) into ``out_valid``,
  ``score``, ``trigger`` (the decision of this sample) and ``blank``, which is set by the first trigger
  and stays set until ``rearm`` (the beam stays blanked until software re-arms it);
- **latency counter**: ``latency_cycles`` holds the cycles from the most recent accepted ``in_valid`` to
  its ``out_valid`` (valid when samples are further apart than the pipeline depth, as the 10 us detector
  samples are; the pipeline itself accepts a sample every cycle, initiation interval 1).

Latency from ``in_valid`` to ``out_valid``: ``stages + 1`` clock cycles (:attr:`RTLDesign.latency_cycles`).
(An earlier wrapper had its own input register and a separate compare cycle around da4ml's pipeline top,
``stages + 3`` cycles; benchmark results built with it say so.)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from beamloop.fpga import DEFAULT_LATENCY_CUTOFF
from beamloop.fpga.qonnx_trace import TracedModel


@dataclass
class RTLDesign:
    """A written RTL project.

    Attributes
    ----------
    top : str
        Top module name (the trigger wrapper).
    model : str
        da4ml model module name.
    sources : list of str
        Verilog files, dependencies first (absolute paths): da4ml's static sources and stage modules, then
        the wrapper (da4ml's pipeline top ``<model>.v`` is written but not used).
    out_dir : str
    n_inputs, input_bits, output_bits : int
    output_step : float
        Value of one output word LSB (logit units).
    stages : int
        da4ml pipeline stages.
    latency_cycles : int
        Clock cycles from ``in_valid`` to ``out_valid`` (``stages + 1``).
    threshold_word : int
        Trigger threshold in output words (``score >= threshold_word`` fires).
    latency_cutoff : float
        da4ml's combinational depth per stage (adder delays).
    """

    top: str
    model: str
    sources: list = field(default_factory=list)
    out_dir: str = ""
    n_inputs: int = 0
    input_bits: int = 0
    output_bits: int = 0
    output_step: float = 1.0
    stages: int = 0
    latency_cycles: int = 0
    threshold_word: int = 0
    latency_cutoff: float = 0.0

    def save(self, path: Path) -> None:
        """Write the design description as JSON."""
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> RTLDesign:
        """Read a description written by :meth:`save`."""
        return cls(**json.loads(Path(path).read_text()))


def threshold_word(threshold_logit: float, output_step: float, output_bits: int) -> int:
    """The smallest output word whose value is ``>= threshold_logit`` (so ``word >= result`` fires exactly when
    ``word * output_step >= threshold_logit``), clipped to the signed output range.

    Raises ``ValueError`` for a threshold that is not finite.
    """
    if not math.isfinite(threshold_logit):
        raise ValueError(f"threshold {threshold_logit} is not finite")
    w = math.ceil(threshold_logit / output_step - 1e-12)
    lo, hi = -(1 << (output_bits - 1)), (1 << (output_bits - 1)) - 1
    return int(min(max(w, lo), hi + 1))


def wrapper_verilog(name: str, n_inputs: int, input_bits: int, output_bits: int, stage_bits: list[int],
                    threshold: int) -> str:
    """Verilog text of the trigger wrapper around da4ml's stage modules ``<name>_stage<i>`` (see the module
    docstring).

    Parameters
    ----------
    name : str
        da4ml module name; the wrapper is ``<name>_trigger``.
    n_inputs, input_bits : int
        Input words and their width.
    output_bits : int
        Width of the (signed) score word (the last stage's output).
    stage_bits : list of int
        Input width in bits of each da4ml stage (``len(stage_bits)`` stages; the first is
        ``n_inputs * input_bits``), as da4ml's pipeline writer computes them (:func:`_stage_input_bits`).
    threshold : int
        Signed threshold in output words; may be one past the largest score (never fires).

    Raises
    ------
    ValueError
        No stages, or a first stage narrower or wider than ``n_inputs * input_bits``.
    """
    w_in = n_inputs * input_bits
    n = len(stage_bits)
    if n < 1:
        raise ValueError("the model has no pipeline stages")
    if stage_bits[0] != w_in:
        raise ValueError(f"stage 0 takes {stage_bits[0]} bits, the wrapper's input is "
                         f"{n_inputs} x {input_bits} = {w_in}")
    out_bits = list(stage_bits[1:]) + [output_bits]
    regs = "\n    ".join(f"reg [{w - 1}:0] stage{i}_inp;" for i, w in enumerate(stage_bits))
    wires = "\n    ".join(f"wire [{w - 1}:0] stage{i}_out;" for i, w in enumerate(out_bits))
    insts = "\n    ".join(f"{name}_stage{i} stage{i} (.model_inp(stage{i}_inp), .model_out(stage{i}_out));"
                          for i in range(n))
    loads = "\n        ".join(["stage0_inp <= in_features;"] + [f"stage{i}_inp <= stage{i - 1}_out;" for i in range(1,
                                                                                                                    n)])
    shift = "in_valid" if n == 1 else f"{{valid_pipe[{n - 2}:0], in_valid}}"
    thr_bits = output_bits + 1
    thr_lit = f"{thr_bits}'sd{threshold}" if threshold >= 0 else f"-{thr_bits}'sd{-threshold}"
    return f"""`timescale 1 ns / 1 ps
// beamloop trigger wrapper (fpga/rtl.py): da4ml's {n} combinational stages with our pipeline registers,
// threshold compare folded into the last stage, registered trigger/blank outputs and a latency counter.
// Latency in_valid -> out_valid: {n + 1} cycles.
module {name}_trigger #(
    parameter signed [{thr_bits - 1}:0] THRESHOLD = {thr_lit}
) (
    input clk,
    input rst,
    input in_valid,
    input [{w_in - 1}:0] in_features,
    input rearm,
    output reg out_valid,
    output reg signed [{output_bits - 1}:0] score,
    output reg trigger,
    output reg blank,
    output reg [15:0] latency_cycles
);
    {regs}
    {wires}
    reg [{n - 1}:0] valid_pipe;  // valid_pipe[i]: stage{{i}}_inp holds a sample
    reg [15:0] since_valid;

    {insts}

    always @(posedge clk) begin  // da4ml's pipeline registers, loaded every cycle
        {loads}
    end

    wire [{output_bits - 1}:0] model_out = stage{n - 1}_out;

    wire fire = $signed({{model_out[{output_bits - 1}], model_out}}) >= THRESHOLD;

    always @(posedge clk) begin
        if (rst) begin
            valid_pipe <= {n}'d0;
            out_valid <= 1'b0;
            trigger <= 1'b0;
            blank <= 1'b0;
            score <= {output_bits}'d0;
            since_valid <= 16'd0;
            latency_cycles <= 16'd0;
        end else begin
            valid_pipe <= {shift};
            out_valid <= valid_pipe[{n - 1}];
            if (valid_pipe[{n - 1}]) begin
                score <= model_out;
                trigger <= fire;
                if (fire) blank <= 1'b1;
                latency_cycles <= since_valid + 16'd1;
            end else begin
                trigger <= 1'b0;
                if (rearm) blank <= 1'b0;
            end
            if (in_valid) since_valid <= 16'd1;
            else if (since_valid != 16'hffff) since_valid <= since_valid + 16'd1;
        end
    end
endmodule
"""


def write_rtl(traced: TracedModel, out_dir: str | Path, name: str = "trigger_model",
              latency_cutoff: float = DEFAULT_LATENCY_CUTOFF,
              threshold_logit: float | None = None, part_name: str | None = None) -> RTLDesign:
    """Write da4ml's pipelined Verilog of ``traced`` and our wrapper into ``out_dir``.

    Parameters
    ----------
    traced : TracedModel
        From :func:`beamloop.fpga.qonnx_trace.trace_qonnx`; must have one output (the score).
    out_dir : str or Path
        Project folder (da4ml's layout: ``src/``, ``src/static/``, ``model/``, ``metadata.json``) plus
        ``src/<name>_trigger.v`` and ``design.json``.
    name : str
        Verilog module name of the model (a valid identifier).
    latency_cutoff : float
        Combinational depth per pipeline stage in da4ml adder delays: smaller means more stages, higher
        fmax, more flip-flops (measured trade-off: :data:`beamloop.fpga.DEFAULT_LATENCY_CUTOFF`).
        ``<= 0``: one stage.
    threshold_logit : float, optional
        Trigger threshold in logit units (e.g. the manifest's ``threshold.logit``); default 0.
    part_name : str, optional
        Xilinx part written into da4ml's Vivado/Quartus project scripts (``build_vivado_prj.tcl``).

    Returns
    -------
    RTLDesign

    Raises
    ------
    ValueError
        More than one output, or a name that is not a Verilog identifier.
    """
    from da4ml.codegen import VerilogModel

    if traced.n_outputs != 1:
        raise ValueError(f"the trigger wrapper needs a one-output model, got {traced.n_outputs} outputs")
    if not name.isidentifier():
        raise ValueError(f"module name {name!r} is not a valid identifier")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cut = latency_cutoff if latency_cutoff > 0 else 1e9
    extra = {"part_name": part_name} if part_name else {}
    vm = VerilogModel(traced.comb, name, out, latency_cutoff=cut, print_latency=False, **extra)
    vm.write()
    stage_bits = _stage_input_bits(vm._pipe)
    stages = len(stage_bits)
    thr = threshold_word(0.0 if threshold_logit is None else threshold_logit, traced.output_step, traced.output_bits)
    top = f"{name}_trigger"
    (out / "src" / f"{top}.v").write_text(
        wrapper_verilog(name, traced.n_inputs, traced.input_bits, traced.output_bits, stage_bits, thr))
    static = sorted(str(p) for p in (out / "src" / "static").glob("*.v"))
    model_files = sorted(str(p) for p in (out / "src").glob(f"{name}_stage*.v"))
    sources = static + model_files + [str(out / "src" / f"{top}.v")]
    design = RTLDesign(top=top, model=name, sources=sources, out_dir=str(out), n_inputs=traced.n_inputs,
                       input_bits=traced.input_bits, output_bits=traced.output_bits, output_step=traced.output_step,
                       stages=stages, latency_cycles=stages + 1, threshold_word=thr,
                       latency_cutoff=float(latency_cutoff))
    design.save(out / "design.json")
    return design


def _stage_input_bits(pipe) -> list[int]:
    """Input width in bits of each stage of a da4ml ``Pipeline``, computed as da4ml's Verilog pipeline writer
    does (``da4ml.codegen.rtl.verilog.pipeline.pipeline_logic_gen``: sum of ``minimal_kif`` of each input
    ``QInterval``), so the wrapper's registers match the generated stage ports."""
    from da4ml.types import minimal_kif

    return [int(sum(map(sum, map(minimal_kif, sol.inp_qint)))) for sol in pipe.solutions]


def pack_inputs(x_int: np.ndarray, input_bits: int) -> list[int]:
    """Pack integer input rows into the wrapper's ``in_features`` words (word 0 in the low bits).

    Parameters
    ----------
    x_int : ndarray, shape (n, n_inputs), integer, each in ``[0, 2**input_bits)`` (two's complement for
        signed inputs is the caller's job)

    Returns
    -------
    list of int, length n

    Raises
    ------
    ValueError
        A value outside ``[0, 2**input_bits)``.
    """
    x = np.asarray(x_int, np.int64)
    if x.size and (x.min() < 0 or x.max() >= (1 << input_bits)):
        raise ValueError(f"input words must lie in [0, {1 << input_bits}), got [{x.min()}, {x.max()}]")
    shifts = [k * input_bits for k in range(x.shape[1])]
    return [sum(int(v) << s for v, s in zip(row, shifts)) for row in x]


def board_verilog(top: str, n_inputs: int, input_bits: int, output_bits: int) -> str:
    """Verilog of the place-and-route harness ``<top>_board`` around the trigger wrapper ``top``.

    A model's parallel feature vector (e.g. 36 x 8 = 288 bits) is wider than the package's I/O pins, and
    in a real design it comes from on-chip logic. The harness loads it over an ``input_bits`` wide bus:
    ``word_valid`` shifts ``word`` in (word 0 first), and after ``n_inputs`` words it pulses the
    wrapper's ``in_valid`` with the whole vector. It adds ``n_inputs * input_bits`` flip-flops and a word
    counter to the resource figures; the trigger's latency is counted from ``in_valid``.
    """
    w_in = n_inputs * input_bits
    cbits = max(1, math.ceil(math.log2(n_inputs + 1)))
    return f"""`timescale 1 ns / 1 ps
// beamloop place-and-route harness (fpga/rtl.py): serial feature load into {top}.
module {top}_board (
    input clk,
    input rst,
    input [{input_bits - 1}:0] word,
    input word_valid,
    input rearm,
    output out_valid,
    output signed [{output_bits - 1}:0] score,
    output trigger,
    output blank
);
    reg [{w_in - 1}:0] vec;
    reg [{cbits - 1}:0] count;
    reg vec_valid;
    wire [15:0] latency_cycles;

    always @(posedge clk) begin
        if (rst) begin
            count <= {cbits}'d0;
            vec_valid <= 1'b0;
        end else begin
            vec_valid <= 1'b0;
            if (word_valid) begin
                vec <= {{word, vec[{w_in - 1}:{input_bits}]}};
                if (count == {cbits}'d{n_inputs - 1}) begin
                    count <= {cbits}'d0;
                    vec_valid <= 1'b1;
                end else begin
                    count <= count + {cbits}'d1;
                end
            end
        end
    end

    {top} core (.clk(clk), .rst(rst), .in_valid(vec_valid), .in_features(vec), .rearm(rearm),
        .out_valid(out_valid), .score(score), .trigger(trigger), .blank(blank),
        .latency_cycles(latency_cycles));
endmodule
"""
