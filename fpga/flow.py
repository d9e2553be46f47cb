"""The whole FPGA flow for one trigger model: the trigger IP (:mod:`beamloop.fpga.ip`) from raw samples to
``blank``, its simulation on dwells against the integer runtime, hls4ml's C simulation of the model, synthesis
and a report. :func:`build` is ``beamloop fpga build``; :func:`sim` is ``beamloop fpga sim``.

Artefacts in ``out/``: ``ip/`` (da4ml projects of the precompute and the tail, the core, the Wishbone,
AXI4-Lite and place-and-route tops, ``ip.json``), ``sim/`` (Icarus builds, bench files, ``stream_result_*.json``),
``hls/`` (hls4ml project), ``ecp5/`` (``synth.json``, ``stat.json``, ``.config``, ``nextpnr_report.json``, ``.bit``,
logs), ``report.json`` and ``report.md``.

The earlier model-only flow (the network alone on a ready feature vector, against QONNX on random vectors:
:func:`model_build`, :func:`model_sim`; ``--model-only`` on the command line) is kept for models without a
feature spec and for comparison.
"""

from __future__ import annotations

import json
import math
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


def model_sim(model: str, out: str | Path, samples: int = 10_000, latency_cutoff: float = DEFAULT_LATENCY_CUTOFF,
              seed: int = 0, progress=print) -> dict:
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


def model_build(model: str, target: str, out: str | Path, samples: int = 10_000,
                latency_cutoff: float = DEFAULT_LATENCY_CUTOFF, freq_mhz: float = 100.0, seed: int = 0,
                run_sim: bool = True, run_hls: bool = True, progress=print) -> dict:
    """The model-only flow: the network on a ready feature vector (see the module docstring).

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


# ---------------------------------------------------------------------------------------------------------------
# the trigger IP


def model_folder(model: str) -> tuple[str, Path]:
    """(manifest entry, model folder) of a shipped model's name, a model folder, or a file inside one (the
    entry whose files name it, else the only entry with a feature spec).

    Raises
    ------
    FileNotFoundError
        No such model or folder.
    """
    from beamloop.edge.trigger.model import MODEL_DIR

    p = Path(model)
    if p.is_dir() or p.suffix:
        d = p if p.is_dir() else p.parent
        mf = d / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"{model}: no manifest.json in {d}")
        entries = json.loads(mf.read_text()).get("models", {})
        if p.is_file():
            hit = [k for k, v in entries.items() if p.name in (v.get("files") or {}).values()]
            if hit:
                return hit[0], d
        stream = [k for k, v in entries.items() if "features" in v]
        if len(stream) == 1:
            return stream[0], d
        raise FileNotFoundError(f"{model}: cannot tell which model of {d / 'manifest.json'} ({sorted(entries)})")
    entries = json.loads((MODEL_DIR / "manifest.json").read_text()).get("models", {})
    if model not in entries:
        raise FileNotFoundError(f"{model!r} is neither a model folder nor a model in {MODEL_DIR / 'manifest.json'} "
                                f"(models: {sorted(entries)})")
    return model, MODEL_DIR


def _ip_report(design, name: str, model_dir: Path, target: str) -> dict:
    from beamloop.fpga.ip import REGISTERS, register_table_md

    entry = json.loads((model_dir / "manifest.json").read_text())["models"][name]
    val = entry.get("metrics", {}).get("validation_windows", {}).get("quantized", {})
    return {"target": target, "kind": "ip",
            "model": {"name": name, "model_dir": str(model_dir), "dims": design.dims, "features": design.features,
                      "threshold_score": design.threshold, "model_id": f"0x{design.model_id:08X}",
                      "accuracy": val.get("accuracy"), "auc": val.get("auc"), "n_inputs": design.dims[0],
                      "input_bits": design.features["input_bits"]},
            "rtl": {"stages": design.tail.stages, "pre_stages": design.pre.stages,
                    "latency_cycles": design.latency_cycles, "min_interval_cycles": design.min_interval,
                    "prefill_cycles": design.prefill_cycles, "latency_cutoff": design.latency_cutoff,
                    "pre_cutoff": design.pre_cutoff, "history_impl": design.history_impl,
                    "clip_input": design.clip_input, "tail_ops": design.tail.ops, "pre_ops": design.pre.ops,
                    "tail_adder_depth": design.tail.adder_depth, "pre_adder_depth": design.pre.adder_depth,
                    "top": design.top_wb, "top_axil": design.top_axil, "board_top": design.top_board,
                    "sample_clip": design.sample_clip},
            "registers": [{"offset": f"0x{r.offset:02X}", "name": r.name, "access": r.access, "reset": r.reset,
                           "description": r.description} for r in REGISTERS],
            "registers_md": register_table_md(),
            "notes": [], "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _write_ip(model: str, out: Path, target: str, latency_cutoff: float, pre_cutoff: float | None,
              history_impl: str, progress):
    """Write ``model``'s IP into ``out/ip``; returns (design, manifest entry name, model folder, report dict)."""
    from beamloop.fpga.ip import write_ip

    name, d = model_folder(model)
    design = write_ip(name, out / "ip", model_dir=d, latency_cutoff=latency_cutoff, pre_cutoff=pre_cutoff,
                      history_impl=history_impl)
    progress(f"ip: precompute {design.pre.stages} stages, tail {design.tail.stages} stages, latency "
             f"{design.latency_cycles} cycles, minimum sample interval {design.min_interval} cycles")
    return design, name, d, _ip_report(design, name, d, target)


def default_dwells(n: int = 8, length: int = 1000, seed: int = 0):
    """The dwells ``beamloop fpga sim`` and ``build`` stream when given no file
    (:func:`beamloop.fpga.ip_sim.synthetic_dwells`)."""
    from beamloop.fpga.ip_sim import synthetic_dwells

    return synthetic_dwells(n, length, seed)


def sim(model: str, out: str | Path, dwells=None, latency_cutoff: float = DEFAULT_LATENCY_CUTOFF, bus: str = "wb",
        history_impl: str = "sr", pre_cutoff: float | None = None, progress=print) -> dict:
    """Write the trigger IP of ``model`` and stream ``dwells`` through it in Icarus, compared with the runtime;
    writes ``report.json``/``.md``.

    Parameters
    ----------
    model : str
        Shipped model name or model folder (:func:`model_folder`).
    out : str or Path
    dwells : beamloop.fpga.ip_sim.Dwells, optional
        Default :func:`default_dwells`.
    latency_cutoff, pre_cutoff : float
        da4ml adder delays per stage of the tail and the precompute.
    bus : str
        ``"wb"`` or ``"axil"``.
    history_impl : str
        ``"sr"`` or ``"lutram"``.
    progress : callable

    Returns
    -------
    dict
        The report.
    """
    from beamloop.fpga.ip_sim import simulate_stream

    out = Path(out)
    design, name, d, rep = _write_ip(model, out, "sim", latency_cutoff, pre_cutoff, history_impl, progress)
    rep["sim"] = simulate_stream(design, dwells if dwells is not None else default_dwells(), out / "sim", bus=bus,
                                 model_dir=d, progress=progress).as_dict()
    write_report(rep, out / "report.json")
    return rep


def build(model: str, target: str, out: str | Path, dwells=None, latency_cutoff: float = DEFAULT_LATENCY_CUTOFF,
          freq_mhz: float = 100.0, run_sim: bool = True, run_hls: bool = True, history_impl: str = "sr",
          pre_cutoff: float | None = None, hls_samples: int = 2000, seed: int = 1, record: bool = False,
          run_synth: bool = True, progress=print) -> dict:
    """The trigger IP of ``model``: RTL, stream simulation against the runtime, hls4ml C simulation of the
    network, and for an ECP5 target synthesis, place and route (the harness ``<n>_ip_board``) and a bitstream.

    Parameters
    ----------
    model : str
        Shipped model name or model folder (:func:`model_folder`).
    target : str
        ``ecp5-85k`` (or another key of :data:`beamloop.fpga.synth.ECP5_DEVICES`), else a Xilinx part for the
        hls4ml project (the IP's synthesis then needs Vivado: skipped).
    out : str or Path
    dwells : beamloop.fpga.ip_sim.Dwells, optional
        Streamed in the simulation (default :func:`default_dwells`).
    latency_cutoff, pre_cutoff : float
        da4ml adder delays per stage of the tail and of the precompute.
    freq_mhz : float
        Clock constraint for place and route.
    run_sim, run_hls, run_synth : bool
        Run the stream simulation, the hls4ml C simulation, the synthesis (ECP5 targets).
    history_impl : str
    hls_samples : int
        Random feature vectors for the hls4ml C simulation against QONNX.
    seed : int
        nextpnr placement seed.
    record : bool
        Write the measured latency into the model's manifest entry (``logic``), which
        :attr:`beamloop.edge.trigger.model.ModelTrigger.logic_latency_ns` reads.
    progress : callable

    Returns
    -------
    dict
        The report (also ``out/report.json`` and ``.md``); ``latency_ns`` at fmax.
    """
    from beamloop.fpga.synth import ECP5_DEVICES, synth_ecp5

    out = Path(out)
    design, name, d, rep = _write_ip(model, out, target, latency_cutoff, pre_cutoff, history_impl, progress)
    if run_sim:
        from beamloop.fpga.ip_sim import simulate_stream

        rep["sim"] = simulate_stream(design, dwells if dwells is not None else default_dwells(), out / "sim",
                                     model_dir=d, progress=progress).as_dict()
    entry = json.loads((d / "manifest.json").read_text())["models"][name]
    if run_hls and entry.get("files", {}).get("qonnx"):
        from beamloop.fpga.hls import hls_check
        from beamloop.fpga.qonnx_trace import qonnx_reference
        from beamloop.fpga.sim import sample_inputs

        q = d / entry["files"]["qonnx"]
        x = sample_inputs(hls_samples, design.dims[0], design.features["input_bits"], seed=0)
        part = target if target not in ECP5_DEVICES else "xcu250-figd2104-2L-e"
        rep["hls"] = hls_check(q, x, qonnx_reference(q, x), out / "hls", part=part, progress=progress).as_dict()
    if target in ECP5_DEVICES and not run_synth:
        rep["synth"] = {"target": target, "status": "skipped (not asked for)"}
    elif target in ECP5_DEVICES:
        s = synth_ecp5(design.board_sources, design.top_board, out / "ecp5", target=target, freq_mhz=freq_mhz,
                       seed=seed, progress=progress)
        rep["synth"] = s.as_dict()
        lat = (rep.get("sim") or {}).get("latency_cycles") or design.latency_cycles
        rep["latency_ns"] = latency_ns(lat, s.fmax_mhz)
        rep["latency_ns_at_constraint"] = latency_ns(lat, freq_mhz)
        rep["notes"].append(
            f"Resources and fmax are of the place-and-route harness {design.top_board}: the Wishbone top with a "
            "register on every pin (137 extra FF), so that every path inside the IP is timed.")
    else:
        rep["synth"] = {"target": target, "part": target,
                        "status": "skipped: Xilinx parts need Vivado for synthesis of the IP (sources in "
                                  f"{design.out_dir}/src, {design.out_dir}/pre/src, {design.out_dir}/tail/src); the "
                                  "hls4ml project of the network is made and C-simulated"}
    if record:
        rep["recorded"] = str(record_logic(name, d, rep))
    write_report(rep, out / "report.json")
    progress(f"report: {out / 'report.json'}, {out / 'report.md'}")
    return rep


def record_logic(name: str, model_dir: Path, rep: dict) -> Path:
    """Store a build's latency in the model's manifest entry as ``logic``; returns the manifest path.

    The entry: ``latency_cycles``; ``clock_mhz``, the clock the IP is rated for (the place-and-route
    constraint when fmax reaches it, else fmax rounded down to 0.1 MHz); ``latency_ns`` at that clock (what
    :attr:`beamloop.edge.trigger.model.ModelTrigger.logic_latency_ns` returns); ``fmax_mhz`` and
    ``latency_ns_at_fmax``; ``target``, ``part``, ``min_interval_cycles``, ``latency_cutoff``, ``ip_version``,
    ``date``.

    Raises
    ------
    ValueError
        The report has no place-and-route figures.
    """
    syn = rep.get("synth") or {}
    if not syn.get("fmax_mhz"):
        raise ValueError("nothing to record: the build has no place-and-route result")
    path = Path(model_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    rtl = rep.get("rtl") or {}
    cycles = int((rep.get("sim") or {}).get("latency_cycles") or rtl.get("latency_cycles"))
    fmax = float(syn["fmax_mhz"])
    clock = float(syn.get("target_mhz") or fmax)
    clock = clock if fmax >= clock else math.floor(fmax * 10) / 10
    manifest["models"][name]["logic"] = {
        "target": syn.get("target"), "part": syn.get("part"), "latency_cycles": cycles, "clock_mhz": clock,
        "latency_ns": round(cycles * 1000.0 / clock, 2), "fmax_mhz": round(fmax, 2),
        "latency_ns_at_fmax": round(cycles * 1000.0 / fmax, 2), "min_interval_cycles": rtl.get("min_interval_cycles"),
        "latency_cutoff": rtl.get("latency_cutoff"), "ip_version": "1.0", "date": time.strftime("%Y-%m-%d")}
    path.write_text(json.dumps(manifest, indent=2))
    return path
