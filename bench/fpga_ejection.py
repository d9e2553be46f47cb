"""Benchmark: the shipped ejection trigger's IP (raw samples in, blank out) compiled to an ECP5-85F bitstream.

Full run (``python -m beamloop.bench.fpga_ejection``): ``beamloop.fpga.flow.build`` of the whole trigger IP
(:mod:`beamloop.fpga.ip`) with 20 simulated dwells of 1000 samples (:func:`beamloop.quantize.data.check_dwells`)
streamed through it in cocotb/Icarus against the integer runtime, the hls4ml C simulation of the network on
10,000 random inputs against qonnx, yosys ``synth_ecp5``, nextpnr-ecp5 at a 100 MHz constraint and ecppack;
writes ``bench/results/fpga_ejection_ip_cutoff<c>.json`` and ``.md`` (LUT4/FF/DSP/BRAM, fmax, latency in cycles
and ns at fmax, the register map). Place and route takes 5-15 minutes on 2 shared cores. Quick run (the
suite's): the stream simulation on 4 dwells and the C simulation on 2,000 inputs, no synthesis
(``fpga_ejection_quick.json``). ``--model-only`` builds the network alone on a ready feature vector (the
earlier flow; ``fpga_ejection_cutoff<c>``), and :func:`write_sweep` tabulates such builds
(``fpga_ejection.json`` / ``.md``). The design space of the IP is :mod:`beamloop.bench.fpga_pareto`.

Goal: sample in to blank out <= 100 ns at >= 100 MHz. Pipelining is set by da4ml's latency cutoff
(``LATENCY_CUTOFF`` adder delays per stage).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from beamloop.fpga import DEFAULT_LATENCY_CUTOFF as LATENCY_CUTOFF  # da4ml adder delays per stage

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"fmax_mhz": 100.0, "latency_ns": 100.0}
MODEL_ONLY_GOALS = {"fmax_mhz": 100.0, "latency_ns": 200.0}
"""The earlier goal of the model-only builds (the network alone, features not in logic)."""
ARTEFACTS_NOTE = ("artefacts, sources, synth.logs and synth.bitstream are absolute paths in the build's working "
                  "folder (a temporary folder under /tmp unless --out is given) on the machine that ran the "
                  "benchmark; they are not part of the repository and are not kept")
"""Written beside the paths in every result JSON."""


def stream_dwells(n: int, length: int = 1000, seed: int = 600):
    """Simulated parked-probe dwells for the IP's stream check (:func:`beamloop.quantize.data.check_dwells`, the
    training nuisances; every other dwell started with its expected rate)."""
    import numpy as np

    from beamloop.fpga.ip_sim import Dwells
    from beamloop.quantize.data import check_dwells

    st = check_dwells(n, length, seed)
    return Dwells([np.asarray(c) for c in st.counts], np.where(np.arange(n) % 2 == 1, st.rate0, np.nan), st.event)


def run(quick: bool = False, out_dir: str | Path | None = None, latency_cutoff: float = LATENCY_CUTOFF,
        name: str | None = None, model: str = "ejection", model_only: bool = False, record: bool = False) -> dict:
    """Build (full) or simulate (quick) the ejection trigger's IP and write the report into ``bench/results``.

    Parameters
    ----------
    quick : bool
        Simulations only (4 dwells through the IP, 2,000 C-simulation inputs), no synthesis.
    out_dir : str or Path, optional
        Artefact folder (default a temporary one).
    latency_cutoff : float
        da4ml adder delays per stage of the latency path.
    name : str, optional
        Results file stem.
    model : str
        Shipped model (default ``ejection``).
    model_only : bool
        The earlier flow: the network alone on a ready feature vector (10,000 random inputs against QONNX).
    record : bool
        Store the build's latency in the model's manifest entry (``logic``).

    Returns
    -------
    dict
        The report (see :mod:`beamloop.fpga.report`) plus ``goals``, ``goals_met`` and ``machine``; written to
        ``bench/results/<name>.json`` and ``.md`` (default ``fpga_ejection_ip_cutoff<c>`` (``<model>_ip_...`` for
        another model), ``fpga_ejection_cutoff<c>`` with ``model_only``, or ``fpga_ejection_quick``).
    """
    from beamloop.bench.suite import machine_info
    from beamloop.fpga.flow import build, model_build
    from beamloop.fpga.report import write_report

    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fpga_ejection_"))
    t0 = time.perf_counter()
    load = os.getloadavg()
    log = lambda s: print(f"[fpga_ejection] {s}", file=sys.stderr, flush=True)  # noqa: E731
    goals = MODEL_ONLY_GOALS if model_only else GOALS
    if quick:
        rep = _quick(work, latency_cutoff)
    elif model_only:
        rep = model_build(model, "ecp5-85k", work, samples=10_000, latency_cutoff=latency_cutoff,
                          freq_mhz=goals["fmax_mhz"], run_hls=True, progress=log)
    else:
        rep = build(model, "ecp5-85k", work, dwells=stream_dwells(20), latency_cutoff=latency_cutoff,
                    freq_mhz=goals["fmax_mhz"], run_hls=True, hls_samples=10_000, record=record, progress=log)
    rep["wall_s"] = time.perf_counter() - t0
    rep["machine"] = machine_info()
    rep["machine_note"] = machine_note(load[0])
    rep["goals"] = goals
    syn = rep.get("synth") or {}
    if syn.get("fmax_mhz"):
        rep["goals_met"] = {"fmax": syn["fmax_mhz"] >= goals["fmax_mhz"],
                            "latency": (rep.get("latency_ns") or 1e9) <= goals["latency_ns"]}
    rep["artefacts"] = str(work)
    rep["artefacts_note"] = ARTEFACTS_NOTE
    rep.setdefault("notes", []).append(goal_note(rep))
    rep["notes"].append(ARTEFACTS_NOTE[0].upper() + ARTEFACTS_NOTE[1:] + ".")
    stem = "fpga_ejection" if model == "ejection" else f"fpga_{model}"
    kind = "" if model_only else "_ip"
    name = name or ("fpga_ejection_quick" if quick else f"{stem}{kind}_cutoff{latency_cutoff:g}".replace(".", "p"))
    write_report(rep, RESULTS / f"{name}.json")
    return rep


def machine_note(load1: float) -> str:
    """How busy the 2 shared cores were when a build started (``load1``: 1-minute load average)."""
    busy = ("tool times are 2-4x those of an idle machine" if load1 >= 3 else
            "lightly loaded, tool times close to an idle machine's")
    return f"2 cores shared with other developers' jobs (load average {load1:.1f} at the start); {busy}"


def _quick(work: Path, latency_cutoff: float) -> dict:
    """The IP's stream simulation on 4 simulated dwells and the hls4ml C simulation on 2,000 inputs."""
    from beamloop.fpga.flow import build

    rep = build("ejection", "ecp5-85k", work, dwells=stream_dwells(4), latency_cutoff=latency_cutoff, run_hls=True,
                hls_samples=2000, run_synth=False, progress=lambda s: None)
    rep["target"] = "ecp5-85k (quick: no synthesis)"
    rep["synth"] = {}
    return rep


def goal_note(rep: dict) -> str:
    """One Markdown paragraph: the issue's goals against the figures reached, and what limits them."""
    syn = rep.get("synth") or {}
    sim = rep.get("sim") or {}
    goals = rep.get("goals") or GOALS
    if not syn.get("fmax_mhz"):
        return (f"Goals (fmax >= {goals['fmax_mhz']:g} MHz, latency <= {goals['latency_ns']:g} ns): not assessed (no "
                "place and route in the quick run).")
    f, lat, cyc = syn["fmax_mhz"], rep.get("latency_ns"), sim.get("latency_cycles")
    ok_f, ok_l = f >= goals["fmax_mhz"], (lat or 1e9) <= goals["latency_ns"]
    cp = syn.get("critical_path")
    if not cp and (syn.get("logs") or {}).get("nextpnr") and Path(syn["logs"]["nextpnr"]).is_file():
        from beamloop.fpga.synth import critical_path

        cp = critical_path(Path(syn["logs"]["nextpnr"]).read_text(errors="replace"))
    where = ""
    if cp:
        stage = [p for p in cp.get("sink", "").split(".") if "stage" in p]
        where = (f"The slowest path ends in {'.'.join(cp['sink'].split('.')[:3])}"
                 f"{' (da4ml pipeline ' + stage[0] + ')' if stage else ''}: {cp['logic_ns']:.2f} ns logic + "
                 f"{cp['routing_ns']:.2f} ns routing.")
    text = (f"Goals: fmax >= {goals['fmax_mhz']:g} MHz {'met' if ok_f else 'NOT met'} ({f:.1f} MHz); latency <= "
            f"{goals['latency_ns']:g} ns {'met' if ok_l else 'NOT met'} ({cyc} cycles = {lat:.1f} ns at fmax). "
            f"{where + ' ' if where else ''}Pipelining is set by da4ml's latency cutoff ("
            f"{(rep.get('rtl') or {}).get('latency_cutoff')} adder delays per stage); a smaller cutoff adds stages "
            "(higher fmax, more FF, more cycles). No DSP or BRAM is used: da4ml turns every constant "
            "multiplication into shift-and-add logic.")
    return text


def write_sweep(names: list[str], out_name: str = "fpga_ejection", remarks: str = "") -> dict:
    """Combine single-build results (``bench/results/<name>.json``, e.g. one per latency cutoff) into
    ``bench/results/<out_name>.json`` and ``.md``: a table of LUT4/CCU2C/FF/DSP/BRAM, fmax, latency in
    cycles and ns, bit-exactness, the wrapper's latency formula (``rtl.latency_cycles - rtl.stages``: builds
    before the folded compare have ``stages + 3``), and which goals each build meets; ``remarks`` (Markdown) is
    appended.
    Returns the combined dict.

    Raises ``FileNotFoundError`` when a named result is missing.
    """
    import json

    builds = {}
    for n in names:
        p = RESULTS / f"{n}.json"
        if not p.is_file():
            raise FileNotFoundError(f"benchmark result {p} does not exist")
        builds[n] = json.loads(p.read_text())
    first = next(iter(builds.values()))
    mdl = first.get("model", {})
    lines = [f"# FPGA build sweep: ejection trigger on {first.get('synth', {}).get('part', 'ECP5')}", "",
             f"Model {mdl.get('source')} ({mdl.get('n_inputs')} inputs x {mdl.get('input_bits')} bits, "
             f"36-16-8-1 MLP); validation accuracy {mdl.get('accuracy'):.4f}, AUC {mdl.get('auc'):.4f} (manifest). "
             f"Goals: fmax >= {MODEL_ONLY_GOALS['fmax_mhz']:g} MHz, latency <= {MODEL_ONLY_GOALS['latency_ns']:g} ns "
             "(the model alone).", "",
             "| build | latency cutoff | stages | wrapper latency | LUT4 | CCU2C | FF | DSP | BRAM | fmax (MHz) | "
             "latency (cycles) | latency (ns) | RTL sim exact | C sim exact | goals met |", "|" + "---|" * 15]
    for n, r in builds.items():
        syn, sim, hls, rtl = (r.get(k) or {} for k in ("synth", "sim", "hls", "rtl"))
        met = r.get("goals_met") or {}
        goals = ", ".join(k for k, v in met.items() if v) or "none"
        extra = (rtl.get("latency_cycles") or 0) - (rtl.get("stages") or 0)
        lines.append(f"| `{n}` | {rtl.get('latency_cutoff')} | {rtl.get('stages')} | stages + {extra} | "
                     f"{syn.get('lut4')} | {syn.get('carry')} | "
                     f"{syn.get('ff')} | {syn.get('dsp')} | {syn.get('bram')} | {syn.get('fmax_mhz', 0):.1f} | "
                     f"{sim.get('latency_cycles')} | {r.get('latency_ns', 0):.1f} | "
                     f"{sim.get('exact')}/{sim.get('samples')} | "
                     f"{hls.get('exact')}/{hls.get('samples')} | {goals} |")
    lines += ["", "Per build (notes, tool times, artefacts): " + ", ".join(f"`{n}.md`" for n in builds) + ".",
              "", "Machine (first build listed): " + str(first.get("machine_note", ""))]
    lines += ["", remarks] if remarks else []
    combined = {"goals": GOALS, "model": mdl, "builds": builds, "summary_md": "\n".join(lines) + "\n"}
    (RESULTS / f"{out_name}.json").write_text(json.dumps(combined, indent=1, default=str))
    (RESULTS / f"{out_name}.md").write_text(combined["summary_md"])
    return combined


def bench_summary_md(result: dict) -> str:
    """A few Markdown lines for the suite's summary: the build's figures, or (quick form, no synthesis) the
    simulations' bit-exactness and the place-and-route results kept in ``fpga_ejection.md``."""
    syn = result.get("synth") or {}
    sim = result.get("sim") or {}
    hls = result.get("hls") or {}
    exact = (f"RTL sim {sim.get('exact')}/{sim.get('samples')} and C sim {hls.get('exact')}/{hls.get('samples')} "
             f"bit-exact, latency {sim.get('latency_cycles', '-')} cycles")
    if not syn.get("fmax_mhz"):
        return f"ejection trigger: {exact}; synthesis and place and route: see `fpga_ejection.md`"
    return (f"ejection trigger on {syn.get('part', 'ECP5')}: {syn.get('lut4')} LUT4, {syn.get('ff')} FF, "
            f"{syn.get('dsp')} DSP, fmax {syn['fmax_mhz']:.1f} MHz, {result.get('latency_ns', float('nan')):.1f} ns; "
            f"{exact}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="artefact folder (default: a temporary folder)")
    ap.add_argument("--latency-cutoff", type=float, default=LATENCY_CUTOFF)
    ap.add_argument("--name", default=None,
                    help="results file stem (default fpga_ejection_ip_cutoff<c> or fpga_ejection_quick)")
    ap.add_argument("--model", default="ejection", help="shipped model name")
    ap.add_argument("--model-only", action="store_true", help="the network alone on a ready feature vector")
    ap.add_argument("--record", action="store_true", help="store the latency in the model's manifest entry")
    a = ap.parse_args()
    r = run(a.quick, a.out, a.latency_cutoff, a.name, a.model, a.model_only, a.record)
    print(bench_summary_md(r))
