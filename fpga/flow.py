"""The whole FPGA flow for one trigger model: resolve the model, trace, RTL, simulation, hls4ml, synthesis,
report. :func:`build` is ``beamloop fpga build``; :func:`sim` is ``beamloop fpga sim``.

Artefacts in ``out/``: ``rtl/`` (da4ml project + ``<name>_trigger.v`` + ``<name>_trigger_board.v``,
``design.json``), ``sim/`` (Icarus build, ``sim_result.json``), ``hls/`` (hls4ml project), ``ecp5/``
(``synth.json``, ``stat.json``, ``.config``, ``nextpnr_report.json``, ``.bit``, logs), ``report.json`` and
``report.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from beamloop.fpga import DEFAULT_LATENCY_CUTOFF
from beamloop.fpga.report import latency_ns, write_report


@dataclass
class ModelRef:
    """A QONNX trigger model and what the manifest says about it.

    Attributes
    ----------
    name : str
    qonnx : Path
    threshold_logit : float
        Decision threshold (manifest ``threshold.logit``; 0.0 when unknown).
    accuracy, auc : float or None
        Validation accuracy and AUC of the quantized model (manifest ``metrics.validation_windows``).
    """

    name: str
    qonnx: Path
    threshold_logit: float = 0.0
    accuracy: float | None = None
    auc: float | None = None


def resolve_model(model: str) -> ModelRef:
    """A QONNX path or the name of a shipped model (``edge/models/trigger/manifest.json``, e.g. ``ejection``).

    For a path, a ``manifest.json`` beside it that lists the file supplies threshold and accuracy.

    Raises
    ------
    FileNotFoundError
        Neither an existing file nor a model in the manifest.
    """
    from beamloop.edge.trigger.model import MODEL_DIR

    p = Path(model)
    manifest_path = (p.parent if p.suffix == ".onnx" else MODEL_DIR) / "manifest.json"
    entries = json.loads(manifest_path.read_text()).get("models", {}) if manifest_path.is_file() else {}
    if p.suffix == ".onnx":
        if not p.is_file():
            raise FileNotFoundError(f"QONNX model {p} does not exist")
        name = next((k for k, v in entries.items() if v.get("files", {}).get("qonnx") == p.name), p.stem)
        path = p
    else:
        if model not in entries:
            raise FileNotFoundError(f"{model!r} is neither a .onnx file nor a model in {manifest_path} "
                                    f"(models: {sorted(entries)})")
        name = model
        path = MODEL_DIR / entries[model]["files"]["qonnx"]
    e = entries.get(name, {})
    val = e.get("metrics", {}).get("validation_windows", {}).get("quantized", {})
    return ModelRef(name=name, qonnx=Path(path), threshold_logit=float(e.get("threshold", {}).get("logit", 0.0)),
                    accuracy=val.get("accuracy"), auc=val.get("auc"))


def _identifier(name: str) -> str:
    s = "".join(c if c.isalnum() else "_" for c in name)
    return s if s[:1].isalpha() else "m_" + s


def prepare(model: str, out: Path, latency_cutoff: float, samples: int, seed: int, progress,
            part_name: str | None = None):
    """Trace ``model``, write its RTL and compute the QONNX reference on ``samples`` test inputs.

    Returns (ModelRef, TracedModel, RTLDesign, inputs (n, n_inputs) int64, reference (n,) float64).
    """
    from beamloop.fpga.qonnx_trace import qonnx_reference, trace_qonnx
    from beamloop.fpga.rtl import board_verilog, write_rtl
    from beamloop.fpga.sim import sample_inputs

    ref = resolve_model(model)
    progress(f"trace: {ref.qonnx} -> da4ml")
    traced = trace_qonnx(ref.qonnx)
    design = write_rtl(traced, out / "rtl", name=_identifier(ref.name), latency_cutoff=latency_cutoff,
                       threshold_logit=ref.threshold_logit, part_name=part_name)
    board = Path(design.out_dir) / "src" / f"{design.top}_board.v"
    board.write_text(board_verilog(design.top, design.n_inputs, design.input_bits, design.output_bits))
    progress(f"rtl: {design.stages} pipeline stages, latency {design.latency_cycles} cycles, threshold word "
             f"{design.threshold_word}")
    if traced.input_signed:
        raise ValueError("signed model inputs are not supported by the trigger wrapper's test bench")
    x = sample_inputs(samples, traced.n_inputs, traced.input_bits, seed)
    progress(f"qonnx: reference outputs on {samples} inputs")
    y = qonnx_reference(ref.qonnx, x).reshape(-1)
    return ref, traced, design, x, y


def _base_report(ref: ModelRef, traced, design, target: str) -> dict:
    from beamloop.fpga.qonnx_trace import model_summary

    return {"target": target, "model": {"name": ref.name, "source": str(ref.qonnx), "accuracy": ref.accuracy,
                                         "auc": ref.auc, "threshold_logit": ref.threshold_logit,
                                         **model_summary(traced)},
            "rtl": {"stages": design.stages, "latency_cycles": design.latency_cycles,
                    "latency_cutoff": design.latency_cutoff, "threshold_word": design.threshold_word,
                    "top": design.top, "board_top": design.top + "_board"},
            "notes": [], "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def sim(model: str, out: str | Path, samples: int = 10_000, latency_cutoff: float = DEFAULT_LATENCY_CUTOFF, seed: int = 0,
        progress=print) -> dict:
    """Trace, write RTL and simulate it with cocotb/Icarus against QONNX; writes ``report.json``/``.md``.

    Returns the report dict. Raises what :func:`resolve_model`, :func:`beamloop.fpga.qonnx_trace.trace_qonnx` and
    :func:`beamloop.fpga.sim.simulate` raise.
    """
    from beamloop.fpga.sim import simulate

    out = Path(out)
    ref, traced, design, x, y = prepare(model, out, latency_cutoff, samples, seed, progress)
    rep = _base_report(ref, traced, design, "sim")
    rep["sim"] = simulate(design, x, y, out / "sim", progress=progress).as_dict()
    write_report(rep, out / "report.json")
    return rep


def build(model: str, target: str, out: str | Path, samples: int = 10_000,
          latency_cutoff: float = DEFAULT_LATENCY_CUTOFF,
          freq_mhz: float = 100.0, seed: int = 0, run_sim: bool = True, run_hls: bool = True, progress=print) -> dict:
    """The full flow (see the module docstring).

    Parameters
    ----------
    model : str
        QONNX path or shipped model name.
    target : str
        ``ecp5-85k`` (or another key of :data:`beamloop.fpga.synth.ECP5_DEVICES`): open flow to a ``.bit``; otherwise a
        Xilinx part number for the hls4ml project (its ``build()`` and any Vivado run need vendor tools).
    out : str or Path
    samples : int
        Test inputs for both bit-exactness checks.
    latency_cutoff : float
        da4ml combinational depth per pipeline stage (adder delays).
    freq_mhz : float
        Clock constraint for place and route.
    seed : int
    run_sim, run_hls : bool
        Skip the RTL simulation or the hls4ml path.
    progress : callable

    Returns
    -------
    dict
        The report (also written to ``out/report.json`` and ``out/report.md``).
    """
    from beamloop.fpga.synth import ECP5_DEVICES, synth_ecp5

    out = Path(out)
    xilinx = None if target in ECP5_DEVICES else target
    ref, traced, design, x, y = prepare(model, out, latency_cutoff, samples, seed, progress, part_name=xilinx)
    rep = _base_report(ref, traced, design, target)
    if run_sim:
        from beamloop.fpga.sim import simulate

        rep["sim"] = simulate(design, x, y, out / "sim", progress=progress).as_dict()
    if run_hls:
        from beamloop.fpga.hls import hls_check

        part = target if target not in ECP5_DEVICES else "xcu250-figd2104-2L-e"
        rep["hls"] = hls_check(ref.qonnx, x, y, out / "hls", part=part, progress=progress).as_dict()
    if target in ECP5_DEVICES:
        s = synth_ecp5(design.sources + [str(Path(design.out_dir) / "src" / f"{design.top}_board.v")],
                       design.top + "_board", out / "ecp5", target=target, freq_mhz=freq_mhz, progress=progress)
        rep["synth"] = s.as_dict()
        lat = (rep.get("sim") or {}).get("latency_cycles") or design.latency_cycles
        rep["latency_ns"] = latency_ns(lat, s.fmax_mhz)
        rep["notes"].append(
            f"Resources include the place-and-route harness {design.top}_board, which loads the "
            f"{design.n_inputs} x {design.input_bits}-bit feature vector over an {design.input_bits}-bit bus "
            f"({design.n_inputs * design.input_bits} extra FF); latency is counted from the trigger's in_valid.")
    else:
        rep["synth"] = {"target": target, "part": target,
                        "status": "skipped: Xilinx parts need Vivado for synthesis of the da4ml RTL (project "
                                  f"script {Path(design.out_dir) / 'build_vivado_prj.tcl'}); the hls4ml project is "
                                  "made and C-simulated, its build() runs where Vitis exists"}
    write_report(rep, out / "report.json")
    progress(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return rep
