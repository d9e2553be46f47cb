"""The build report: one JSON document and its Markdown rendering.

Fields (JSON ``report``): ``model`` (source, ports, accuracy from the manifest), ``rtl`` (pipeline stages,
latency in cycles), ``sim`` (RTL simulation: samples, exact, fraction, latency), ``hls`` (C simulation and
``build`` status), ``synth`` (target, part, LUT4, carry cells, FF, DSP, BRAM, fmax, bitstream, tool times)
and ``latency_ns`` = latency cycles x 1000 / fmax (MHz). A trigger-IP report (``kind: "ip"``,
:func:`beamloop.fpga.flow.build`) adds the precompute's stages, the minimum sample interval, the stream
simulation against the runtime (dwells, decided samples, exact, firing samples) and the register map
(``registers``, ``registers_md``).
"""

from __future__ import annotations

import json
from pathlib import Path


def latency_ns(cycles: int | None, fmax_mhz: float | None) -> float | None:
    """Latency in ns at the achieved clock: ``cycles * 1000 / fmax_mhz``; None when either is unknown."""
    if not cycles or not fmax_mhz:
        return None
    return float(cycles) * 1000.0 / float(fmax_mhz)


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def _table_tail(rep: dict, rows: list) -> list[str]:
    """The figure table's rows (with the bitstream and a skipped synthesis's reason) as Markdown lines."""
    syn = rep.get("synth") or {}
    rows = rows + [("bitstream", syn.get("bitstream") or "-")]
    if syn.get("status"):
        rows.append(("synthesis", syn["status"]))
    return [f"| {k} | {v} |" for k, v in rows]


def _notes(rep: dict) -> list[str]:
    """Tool times (with the machine note) and the report's notes as Markdown paragraphs."""
    lines = []
    secs = (rep.get("synth") or {}).get("seconds") or {}
    if secs:
        lines += ["", "Tool times: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
                  + (f" ({rep['machine_note']})" if rep.get("machine_note") else "")]
    for note in rep.get("notes", []):
        lines += ["", note]
    return lines


def ip_markdown(rep: dict) -> str:
    """Markdown text of a trigger-IP report (see the module docstring)."""
    mdl = rep.get("model", {})
    sim = rep.get("sim") or {}
    hls = rep.get("hls") or {}
    syn = rep.get("synth") or {}
    rtl = rep.get("rtl") or {}
    f = mdl.get("features") or {}
    lines = [f"# FPGA trigger IP: {mdl.get('name', '?')}", "",
             f"Model {mdl.get('name')} ({'-'.join(str(v) for v in mdl.get('dims', []))} MLP; features: the last "
             f"{f.get('window')} samples and {f.get('blocks')} sums of {f.get('block')} samples >> {f.get('shift')}, "
             f"{f.get('input_bits')} bits; threshold {mdl.get('threshold_score')}; MODEL_ID {mdl.get('model_id')}). "
             "One raw 16-bit sample per AXI4-Stream transfer in, a latching blank out.", "",
             "| figure | value |", "|---|---|"]
    rows = [
        ("target / part", f"{syn.get('target', rep.get('target', '-'))} / {syn.get('part', '-')}"),
        ("LUT4", _fmt(syn.get("lut4"))), ("carry cells (CCU2C)", _fmt(syn.get("carry"))),
        ("FF", _fmt(syn.get("ff"))), ("DSP", _fmt(syn.get("dsp"))), ("BRAM", _fmt(syn.get("bram"))),
        ("fmax (MHz)", _fmt(syn.get("fmax_mhz"), ".1f")),
        ("tail stages (latency path) / precompute stages",
         f"{_fmt(rtl.get('stages'))} / {_fmt(rtl.get('pre_stages'))}"),
        ("latency (cycles, sample on s_axis_tdata -> blank)",
         f"{_fmt(sim.get('latency_cycles', rtl.get('latency_cycles')))} (LATENCY register "
         f"{_fmt(sim.get('latency_cycles_hw'))})"),
        ("latency (ns at fmax)", _fmt(rep.get("latency_ns"), ".1f")),
        ("latency (ns at the clock constraint)", _fmt(rep.get("latency_ns_at_constraint"), ".1f")),
        ("minimum sample interval (cycles)", _fmt(rtl.get("min_interval_cycles"))),
        ("history", f"{rtl.get('history_impl')} (samples clipped at {rtl.get('sample_clip')})"),
        ("stream simulation vs runtime", f"{_fmt(sim.get('exact'))} / {_fmt(sim.get('decided'))} decided samples "
                                         f"exact, {_fmt(sim.get('samples'))} samples, firing sample equal in "
                                         f"{_fmt(sim.get('firing_sample_equal'))} / {_fmt(sim.get('dwells'))} dwells "
                                         f"({_fmt(sim.get('dwells_fired'))} fired), counters "
                                         f"{'ok' if sim.get('counters_ok') else '-'}"),
        ("hls4ml C simulation of the network", f"{_fmt(hls.get('exact'))} / {_fmt(hls.get('samples'))}"),
    ]
    lines += _table_tail(rep, rows)
    cp = syn.get("critical_path") or {}
    if cp:
        lines += ["", f"Critical path: {cp.get('source')} -> {cp.get('sink')}: {cp.get('logic_ns')} ns logic + "
                      f"{cp.get('routing_ns')} ns routing."]
    lines += _notes(rep)
    if rep.get("registers_md"):
        lines += ["", "## Register map (32-bit words, byte offsets; Wishbone B4 classic and AXI4-Lite)", "",
                  rep["registers_md"].rstrip()]
    return "\n".join(lines) + "\n"


def markdown(rep: dict) -> str:
    """Markdown text of a report dict (see the module docstring)."""
    if rep.get("kind") == "ip":
        return ip_markdown(rep)
    mdl = rep.get("model", {})
    sim = rep.get("sim") or {}
    hls = rep.get("hls") or {}
    syn = rep.get("synth") or {}
    rtl = rep.get("rtl") or {}
    lines = [f"# FPGA build: {mdl.get('name', mdl.get('source', '?'))}", ""]
    if mdl.get("accuracy") is not None:
        lines += [f"Model: {mdl.get('source')} ({mdl.get('n_inputs')} inputs x {mdl.get('input_bits')} bits, score "
                  f"{mdl.get('output_bits')} bits); validation accuracy {mdl['accuracy']:.4f}"
                  f"{', AUC ' + format(mdl['auc'], '.4f') if mdl.get('auc') is not None else ''} (manifest).", ""]
    lines += ["| figure | value |", "|---|---|"]
    rows = [
        ("target / part", f"{syn.get('target', rep.get('target', '-'))} / {syn.get('part', '-')}"),
        ("LUT4", _fmt(syn.get("lut4"))), ("carry cells (CCU2C)", _fmt(syn.get("carry"))),
        ("FF", _fmt(syn.get("ff"))), ("DSP", _fmt(syn.get("dsp"))), ("BRAM", _fmt(syn.get("bram"))),
        ("fmax (MHz)", _fmt(syn.get("fmax_mhz"), ".1f")),
        ("pipeline stages (da4ml)", _fmt(rtl.get("stages"))),
        ("latency (cycles, in_valid -> out_valid)", _fmt(sim.get("latency_cycles", rtl.get("latency_cycles")))),
        ("latency (ns at fmax)", _fmt(rep.get("latency_ns"), ".1f")),
        ("initiation interval (cycles)", "1"),
        ("RTL simulation bit-exact", f"{_fmt(sim.get('exact'))} / {_fmt(sim.get('samples'))} "
                                     f"({_fmt(sim.get('bit_exact_fraction'), '.4%')})"),
        ("hls4ml C simulation bit-exact", f"{_fmt(hls.get('exact'))} / {_fmt(hls.get('samples'))} "
                                          f"({_fmt(hls.get('bit_exact_fraction'), '.4%')})"),
        ("hls4ml build()", (hls.get("build") or {}).get("status", "-")),
    ]
    return "\n".join(lines + _table_tail(rep, rows) + _notes(rep)) + "\n"


def write_report(rep: dict, json_path: str | Path, md_path: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``rep`` as JSON and Markdown (default: the JSON path with ``.md``); returns both paths."""
    json_path = Path(json_path)
    md_path = Path(md_path) if md_path is not None else json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(rep, indent=1, default=str))
    md_path.write_text(markdown(rep))
    return json_path, md_path
