"""Benchmark: the shipped ejection trigger compiled to an ECP5-85F (LFE5U-85F-6BG381C) bitstream.

Full run (``python -m beamloop.bench.fpga_ejection`` or the suite): ``beamloop.fpga.flow.build`` with 10,000 test inputs
(RTL simulation in cocotb/Icarus and hls4ml C simulation, both against qonnx execution of the QONNX
graph), yosys ``synth_ecp5``, nextpnr-ecp5 at a 100 MHz constraint and ecppack; writes
``bench/results/fpga_ejection_cutoff<c>.json`` and ``.md`` with LUT4/FF/DSP/BRAM, fmax, latency in cycles and
ns at fmax, and the model's validation accuracy from the manifest; :func:`write_sweep` tabulates several
cutoffs into ``bench/results/fpga_ejection.json`` / ``.md``. Place and route takes minutes on 2 shared
cores. Quick run: the two simulations on 2,000 inputs, no synthesis (``fpga_ejection_quick.json``).

Goal (issue 6): fmax >= 100 MHz and latency <= 200 ns. Pipelining is set by da4ml's latency cutoff
(``LATENCY_CUTOFF`` adder delays per stage; ../shared/notes/fpga-toolflow.md has the measured trade-off).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from beamloop.fpga import DEFAULT_LATENCY_CUTOFF as LATENCY_CUTOFF  # da4ml adder delays per stage (1.0: meets both goals)

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"fmax_mhz": 100.0, "latency_ns": 200.0}
ARTEFACTS_NOTE = ("artefacts, sources, synth.logs and synth.bitstream are absolute paths in the build's working "
                  "folder (a temporary folder under /tmp unless --out is given) on the machine that ran the "
                  "benchmark; they are not part of the repository and are not kept")
"""Written beside the paths in every result JSON."""


def run(quick: bool = False, out_dir: str | Path | None = None, latency_cutoff: float = LATENCY_CUTOFF,
        name: str | None = None) -> dict:
    """Build (full) or simulate (quick) the ejection trigger and write the report into ``bench/results``.

    Returns
    -------
    dict
        The report (see :mod:`beamloop.fpga.report`) plus ``goals``, ``goals_met`` and ``machine``; written to
        ``bench/results/<name>.json`` and ``.md`` (default ``fpga_ejection_cutoff<c>``, e.g. ``..._cutoff1p5``,
        or ``fpga_ejection_quick``); :func:`write_sweep` combines such builds into ``fpga_ejection.json``.
    """
    from beamloop.bench.suite import machine_info
    from beamloop.fpga.flow import build
    from beamloop.fpga.report import write_report

    work = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="fpga_ejection_"))
    t0 = time.perf_counter()
    load = os.getloadavg()
    rep = build("ejection", "ecp5-85k", work, samples=2000 if quick else 10_000, latency_cutoff=latency_cutoff,
                freq_mhz=GOALS["fmax_mhz"], run_hls=True, progress=lambda s: print(f"[fpga_ejection] {s}",
                                                                                   file=sys.stderr, flush=True)) \
        if not quick else _quick(work, latency_cutoff)
    rep["wall_s"] = time.perf_counter() - t0
    rep["machine"] = machine_info()
    rep["machine_note"] = machine_note(load[0])
    rep["goals"] = GOALS
    syn = rep.get("synth") or {}
    if syn.get("fmax_mhz"):
        rep["goals_met"] = {"fmax": syn["fmax_mhz"] >= GOALS["fmax_mhz"],
                            "latency": (rep.get("latency_ns") or 1e9) <= GOALS["latency_ns"]}
    rep["artefacts"] = str(work)
    rep["artefacts_note"] = ARTEFACTS_NOTE
    rep.setdefault("notes", []).append(goal_note(rep))
    rep["notes"].append(ARTEFACTS_NOTE[0].upper() + ARTEFACTS_NOTE[1:] + ".")
    name = name or ("fpga_ejection_quick" if quick else f"fpga_ejection_cutoff{latency_cutoff:g}".replace(".", "p"))
    write_report(rep, RESULTS / f"{name}.json")
    return rep


def machine_note(load1: float) -> str:
    """How busy the 2 shared cores were when a build started (``load1``: 1-minute load average)."""
    busy = ("tool times are 2-4x those of an idle machine" if load1 >= 3 else
            "lightly loaded, tool times close to an idle machine's")
    return f"2 cores shared with other developers' jobs (load average {load1:.1f} at the start); {busy}"


def _quick(work: Path, latency_cutoff: float) -> dict:
    from beamloop.fpga.flow import prepare, _base_report
    from beamloop.fpga.hls import hls_check
    from beamloop.fpga.sim import simulate

    quiet = lambda s: None  # noqa: E731
    ref, traced, design, x, y = prepare("ejection", work, latency_cutoff, 2000, 0, quiet)
    rep = _base_report(ref, traced, design, "ecp5-85k (quick: no synthesis)")
    rep["sim"] = simulate(design, x, y, work / "sim", progress=quiet).as_dict()
    rep["hls"] = hls_check(ref.qonnx, x, y, work / "hls", progress=quiet).as_dict()
    return rep


def goal_note(rep: dict) -> str:
    """One Markdown paragraph: the issue's goals against the figures reached, and what limits them."""
    syn = rep.get("synth") or {}
    sim = rep.get("sim") or {}
    if not syn.get("fmax_mhz"):
        return "Goals (fmax >= 100 MHz, latency <= 200 ns): not assessed (no place and route in the quick run)."
    f, lat, cyc = syn["fmax_mhz"], rep.get("latency_ns"), sim.get("latency_cycles")
    ok_f, ok_l = f >= GOALS["fmax_mhz"], (lat or 1e9) <= GOALS["latency_ns"]
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
    text = (f"Goals: fmax >= {GOALS['fmax_mhz']:g} MHz {'met' if ok_f else 'NOT met'} ({f:.1f} MHz); latency <= "
            f"{GOALS['latency_ns']:g} ns {'met' if ok_l else 'NOT met'} ({cyc} cycles = {lat:.1f} ns at fmax). "
            f"{where + ' ' if where else ''}Pipelining is set by da4ml's latency cutoff ("
            f"{(rep.get('rtl') or {}).get('latency_cutoff')} adder delays per stage); a smaller cutoff adds stages "
            "(higher fmax, more FF, more cycles), as in ../shared/notes/fpga-toolflow.md. No DSP or BRAM is used: "
            "da4ml turns every constant multiplication into shift-and-add logic.")
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
             f"Goals: fmax >= {GOALS['fmax_mhz']:g} MHz, latency <= {GOALS['latency_ns']:g} ns.", "",
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
                     f"{sim.get('latency_cycles')} | {r.get('latency_ns', 0):.1f} | {sim.get('exact')}/{sim.get('samples')} | "
                     f"{hls.get('exact')}/{hls.get('samples')} | {goals} |")
    lines += ["", "Per build (notes, tool times, artefacts): " + ", ".join(f"`{n}.md`" for n in builds) + ".",
              "", "Machine (first build listed): " + str(first.get("machine_note", ""))] + (["", remarks] if remarks else [])
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
            f"{syn.get('dsp')} DSP, fmax {syn['fmax_mhz']:.1f} MHz, {result.get('latency_ns', float('nan')):.1f} ns; {exact}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="artefact folder (default: a temporary folder)")
    ap.add_argument("--latency-cutoff", type=float, default=LATENCY_CUTOFF)
    ap.add_argument("--name", default=None, help="results file stem (default fpga_ejection_cutoff<c> or fpga_ejection_quick)")
    a = ap.parse_args()
    r = run(a.quick, a.out, a.latency_cutoff, a.name)
    print(bench_summary_md(r))
