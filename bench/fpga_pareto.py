"""Benchmark: the trigger IP's design space on LFE5U-85F, latency against resources at equal detection.

Each configuration (:data:`CONFIGS`: model x da4ml tail cutoff x history implementation) is the whole trigger
IP (:func:`beamloop.fpga.ip.write_ip`: raw samples in, blank out). The full exploration
(``python -m beamloop.bench.fpga_pareto --full``; hours on 2 shared cores, one place and route at a time)
per configuration writes the IP, streams simulated dwells through it against the integer runtime (a
bit-exactness check, :func:`beamloop.fpga.ip_sim.simulate_stream`), synthesizes, places and routes the harness
(:func:`beamloop.fpga.synth.synth_ecp5`, 100 MHz constraint) and keeps LUT4 / CCU2C / FF / DSP / BRAM,
fmax, the latency in cycles and in ns at fmax and the critical path. Detection figures of every model come
from :func:`beamloop.quantize.evaluate.evaluate` on the same held-out dwells (1500 calibration + 1500 test
dwells per condition, seed 100, thresholds calibrated for 0.05 false triggers per second of dwell), read
from each model's manifest entry (``metrics.evaluation``, written by ``beamloop quantize eval
--update-manifest``). Results go to ``bench/results/fpga_pareto.json`` and ``.md`` after every build, so an
interrupted run resumes (``--resume`` skips configurations already measured).

The quick form (``run(quick=True)``, what the suite runs) builds no bitstream: it writes every configuration's
IP (da4ml stages, latency in cycles, minimum sample interval) and re-renders the table with the place-and-route
figures of the last full run.

Goal: sample in to blank out <= 100 ns at >= 100 MHz (:data:`GOALS`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
EXPLORE_DIR = REPO / "out" / "fpga_explore" / "models"
"""Where the exploration's retrained models are (``beamloop quantize train --model-dir``); the shipped models
are read from the package."""

GOALS = {"fmax_mhz": 100.0, "latency_ns": 100.0}

TRAIN_COMMANDS = {
    "ejection_h16": "beamloop quantize train --name ejection_h16 --hidden 16 --model-dir out/fpga_explore/models",
    "ejection_h8": "beamloop quantize train --name ejection_h8 --hidden 8 --model-dir out/fpga_explore/models",
    "ejection_h16w4": "beamloop quantize train --name ejection_h16w4 --hidden 16 --weight-bits 4 "
                      "--model-dir out/fpga_explore/models",
}
"""How the exploration's models were trained (everything else at ``quantize train``'s defaults: the shipped
model's features, data, epochs, mining and seed)."""

CONFIGS = (
    {"name": "h16_c1", "model": "ejection_h16", "cutoff": 1.0, "history": "sr"},
    {"name": "ejection_c1", "model": "ejection", "cutoff": 1.0, "history": "sr"},
    {"name": "ejection_c1p5", "model": "ejection", "cutoff": 1.5, "history": "sr"},
    {"name": "h16_c1p5", "model": "ejection_h16", "cutoff": 1.5, "history": "sr"},
    {"name": "h8_c1", "model": "ejection_h8", "cutoff": 1.0, "history": "sr"},
    {"name": "ejection_c2", "model": "ejection", "cutoff": 2.0, "history": "sr"},
    {"name": "ejection_c1_lutram", "model": "ejection", "cutoff": 1.0, "history": "lutram"},
    {"name": "h16_c2", "model": "ejection_h16", "cutoff": 2.0, "history": "sr"},
    {"name": "h16w4_c1", "model": "ejection_h16w4", "cutoff": 1.0, "history": "sr"},
)
"""Configurations explored: the shipped 36-16-8-1 model and retrained 36-16-1 / 36-8-1 (6-bit weights) and
36-16-1 with 4-bit weights, at tail cutoffs of 1, 1.5 and 2 adder delays per stage, history in flip-flops
(``sr``) or LUT RAM (``lutram``)."""


def _model_dir(model: str) -> Path | None:
    """The folder holding ``model``'s manifest (None: the shipped models), or raise ``FileNotFoundError``."""
    from beamloop.edge.trigger.model import MODEL_DIR, load_manifest

    if model in load_manifest(MODEL_DIR)["models"]:
        return None
    if (EXPLORE_DIR / "manifest.json").is_file() and model in load_manifest(EXPLORE_DIR)["models"]:
        return EXPLORE_DIR
    raise FileNotFoundError(f"model {model} not found; train it with `{TRAIN_COMMANDS.get(model, '?')}`")


def detection(model: str) -> dict:
    """Detection figures of a model at its calibrated thresholds (manifest ``metrics.evaluation``): per
    condition, delay p50/mean/p90 (samples), false triggers per second, missed fraction, ROC AUC; plus the
    network's widths and weight bits. Empty figures when the model has no evaluation."""
    from beamloop.edge.trigger.model import MODEL_DIR, load_manifest

    d = _model_dir(model) or MODEL_DIR
    e = load_manifest(d)["models"][model]
    out = {"hidden": (e.get("training", {}).get("config") or {}).get("hidden"), "bits": e.get("bits"),
           "threshold": e.get("threshold", {}).get("score"), "conditions": {}}
    ev = (e.get("metrics") or {}).get("evaluation") or {}
    out["evaluation"] = {k: ev.get(k) for k in ("dwells_per_set", "target_fa_per_s", "date")}
    for cond, r in (ev.get("conditions") or {}).items():
        m = r["methods"]["model"]
        c = m["calibrated"]
        out["conditions"][cond] = {"delay_p50": c["delay_p50"], "delay_mean": c["delay_mean"],
                                   "delay_p90": c["delay_p90"], "fa_per_s": c["fa_per_s"], "missed": c["missed"],
                                   "false_triggers": c["false_triggers"], "roc_auc": m.get("roc_auc")}
    return out


def _check_dwells():
    import numpy as np

    from beamloop.fpga.ip_sim import Dwells
    from beamloop.quantize.data import check_dwells

    st = check_dwells(3, 400, seed=7)
    return Dwells([np.asarray(c) for c in st.counts], np.where(np.arange(3) % 2 == 1, st.rate0, np.nan), st.event)


def build_one(cfg: dict, work: Path, freq_mhz: float = 100.0, synth: bool = True, progress=print) -> dict:
    """Write, simulate and (``synth``) place and route one configuration; returns its figures."""
    from beamloop.fpga.ip import write_ip
    from beamloop.fpga.ip_sim import simulate_stream

    t0 = time.perf_counter()
    md = _model_dir(cfg["model"])
    d = write_ip(cfg["model"], work / cfg["name"] / "ip", model_dir=md, latency_cutoff=cfg["cutoff"],
                 history_impl=cfg["history"])
    res = {"config": cfg, "tail_stages": d.tail.stages, "pre_stages": d.pre.stages,
           "latency_cycles": d.latency_cycles, "min_interval_cycles": d.min_interval, "tail_ops": d.tail.ops,
           "pre_ops": d.pre.ops, "tail_adder_depth": d.tail.adder_depth, "dims": d.dims}
    if not synth:
        return res
    sim = simulate_stream(d, _check_dwells(), work / cfg["name"] / "sim", model_dir=md, progress=progress)
    res["sim"] = {k: sim.as_dict()[k] for k in ("samples", "decided", "exact", "all_exact", "latency_cycles",
                                                "latency_cycles_hw", "firing_sample_equal", "dwells")}
    from beamloop.fpga.synth import synth_ecp5

    s = synth_ecp5(d.board_sources, d.top_board, work / cfg["name"] / "ecp5", freq_mhz=freq_mhz, progress=progress)
    res["synth"] = {k: v for k, v in s.as_dict().items() if k not in ("utilisation", "logs", "bitstream")}
    res["latency_ns"] = d.latency_cycles * 1000.0 / s.fmax_mhz if s.fmax_mhz else None
    res["latency_ns_at_100mhz"] = d.latency_cycles * 10.0
    res["wall_s"] = time.perf_counter() - t0
    res["load_at_start"] = os.getloadavg()[0]
    return res


def pareto(rows: list[dict]) -> list[str]:
    """Names of the builds not dominated in (latency ns at fmax, LUT4 + CCU2C, FF, nuisance delay mean): no
    other build is at least as good in all four and better in one."""
    pts = {}
    for r in rows:
        syn = r.get("synth") or {}
        det = ((r.get("detection") or {}).get("conditions") or {}).get("nuisance") or {}
        if r.get("latency_ns") is None or not det:
            continue
        pts[r["config"]["name"]] = (r["latency_ns"], syn["lut4"] + syn["carry"], syn["ff"], det["delay_mean"])
    front = []
    for n, p in pts.items():
        if not any(all(a <= b for a, b in zip(q, p)) and any(a < b for a, b in zip(q, p))
                   for m, q in pts.items() if m != n):
            front.append(n)
    return front


def _fmt(v, spec=""):
    return "-" if v is None else (format(v, spec) if spec else str(v))


def write_results(builds: dict, quick: dict | None = None, remarks: str = "") -> dict:
    """Write ``fpga_pareto.json`` and ``.md`` from the builds measured so far (name -> figures)."""
    rows = [builds[c["name"]] for c in CONFIGS if c["name"] in builds]
    for r in rows:
        try:
            r["detection"] = detection(r["config"]["model"])
        except FileNotFoundError as exc:
            r["detection"] = {"error": str(exc)}
    front = pareto(rows)
    lines = ["# Trigger IP on LFE5U-85F: latency, resources and detection", "",
             f"Goal: sample in to blank out <= {GOALS['latency_ns']:g} ns at >= {GOALS['fmax_mhz']:g} MHz. The whole "
             "IP (history, block sums, precompute, tail, registers; the place-and-route harness registers every pin) "
             "placed and routed by nextpnr-ecp5 at a 100 MHz constraint, one build per row. Latency: cycles from the "
             "sample on s_axis_tdata to blank (measured in simulation and by the LATENCY register), in ns at fmax. "
             "Detection: the model's integer runtime on 1500 held-out test dwells per condition (thresholds "
             "calibrated on 1500 others for 0.05 false triggers per second; beamloop.quantize.evaluate, seed 100).",
             "",
             "| build | model | tail cutoff | history | tail / pre stages | LUT4 | CCU2C | FF | DSP | BRAM | DPR16X4 | "
             "fmax (MHz) | "
             "cycles | ns at fmax | min interval (cycles) | bit-exact (decided samples) | delay p50 / mean / p90, "
             "nuisance | false triggers / s | missed | delay p50 / mean, clean | goal | Pareto |",
             "|" + "---|" * 22]
    for r in rows:
        c, syn, sim = r["config"], r.get("synth") or {}, r.get("sim") or {}
        det = (r.get("detection") or {}).get("conditions") or {}
        nu, cl = det.get("nuisance") or {}, det.get("clean") or {}
        f, ns = syn.get("fmax_mhz"), r.get("latency_ns")
        met = "yes" if f and ns and f >= GOALS["fmax_mhz"] and ns <= GOALS["latency_ns"] else "no"
        dims = "-".join(str(v) for v in r.get("dims", []))
        lines.append(
            f"| `{c['name']}` | {c['model']} ({dims}) | {c['cutoff']:g} | {c['history']} | {r['tail_stages']} / "
            f"{r['pre_stages']} | {_fmt(syn.get('lut4'))} | {_fmt(syn.get('carry'))} | {_fmt(syn.get('ff'))} | "
            f"{_fmt(syn.get('dsp'))} | {_fmt(syn.get('bram'))} | {_fmt(syn.get('lutram'))} | {_fmt(f, '.1f')} | "
            f"{r['latency_cycles']} | "
            f"{_fmt(ns, '.1f')} | {r['min_interval_cycles']} | {_fmt(sim.get('exact'))}/{_fmt(sim.get('decided'))} | "
            f"{_fmt(nu.get('delay_p50'), '.0f')} / {_fmt(nu.get('delay_mean'), '.1f')} / "
            f"{_fmt(nu.get('delay_p90'), '.0f')} | "
            f"{_fmt(nu.get('fa_per_s'), '.3f')} | {_fmt(nu.get('missed'), '.3f')} | "
            f"{_fmt(cl.get('delay_p50'), '.0f')} / {_fmt(cl.get('delay_mean'), '.1f')} | {met} | "
            f"{'yes' if c['name'] in front else ''} |")
    lines += ["", "Critical paths (nextpnr, slowest clock path after routing):", ""]
    for r in rows:
        cp = (r.get("synth") or {}).get("critical_path") or {}
        if cp:
            lines.append(f"- `{r['config']['name']}`: {cp.get('source')} -> {cp.get('sink')}: {cp.get('logic_ns')} ns "
                         f"logic + {cp.get('routing_ns')} ns routing")
    lines += ["", "Models: " + "; ".join(f"{k}: `{v}`" for k, v in TRAIN_COMMANDS.items()) + "."]
    if quick:
        lines += ["", "Quick run (no place and route): " + ", ".join(
            f"`{n}` {q['latency_cycles']} cycles ({q['tail_stages']} tail stages)" for n, q in quick.items()) + "."]
    if remarks:
        lines += ["", remarks]
    doc = {"goals": GOALS, "configs": list(CONFIGS), "builds": builds, "pareto": front,
           "summary_md": "\n".join(lines) + "\n"}
    if quick:
        doc["quick"] = quick
    prev = RESULTS / "fpga_pareto.json"
    if prev.is_file():
        old = json.loads(prev.read_text())
        doc.setdefault("remarks", old.get("remarks", ""))
    (RESULTS / "fpga_pareto.json").write_text(json.dumps(doc, indent=1, default=str))
    (RESULTS / "fpga_pareto.md").write_text(doc["summary_md"])
    return doc


def _previous() -> dict:
    p = RESULTS / "fpga_pareto.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def explore(names: list[str] | None = None, resume: bool = False, work: Path | None = None,
            remarks: str | None = None, progress=print) -> dict:
    """The full exploration (see the module docstring); returns the results document."""
    prev = _previous()
    builds = dict(prev.get("builds") or {})
    work = Path(work or tempfile.mkdtemp(prefix="fpga_pareto_"))
    rem = prev.get("remarks", "") if remarks is None else remarks
    for cfg in CONFIGS:
        if names and cfg["name"] not in names:
            continue
        if resume and cfg["name"] in builds and (builds[cfg["name"]].get("synth") or {}).get("fmax_mhz"):
            continue
        try:
            _model_dir(cfg["model"])
        except FileNotFoundError as exc:
            progress(f"skip {cfg['name']}: {exc}")
            continue
        progress(f"build {cfg['name']}")
        builds[cfg["name"]] = build_one(cfg, work, progress=progress)
        write_results(builds, remarks=rem)
    doc = write_results(builds, remarks=rem)
    if remarks is not None:
        doc["remarks"] = remarks
        (RESULTS / "fpga_pareto.json").write_text(json.dumps(doc, indent=1, default=str))
    return doc


def run(quick: bool = True) -> dict:
    """The suite's entry: the quick form (every configuration's IP written, no place and route) whatever
    ``quick`` says; the full exploration is :func:`explore` (``--full``), hours long."""
    prev = _previous()
    builds = dict(prev.get("builds") or {})
    q = {}
    with tempfile.TemporaryDirectory(prefix="fpga_pareto_quick_") as tmp:
        for cfg in CONFIGS:
            try:
                r = build_one(cfg, Path(tmp), synth=False)
            except FileNotFoundError:
                continue
            q[cfg["name"]] = {k: r[k] for k in ("tail_stages", "pre_stages", "latency_cycles", "min_interval_cycles")}
    doc = {"quick": q, "builds": builds, "pareto": prev.get("pareto", []), "goals": GOALS,
           "note": "quick form: IPs written and traced, no place and route; figures of the last full run "
                   "(python -m beamloop.bench.fpga_pareto --full) in fpga_pareto.md"}
    (RESULTS / "fpga_pareto_quick.json").write_text(json.dumps(doc, indent=1, default=str))
    return doc


def bench_summary_md(result: dict) -> str:
    """One Markdown line for the suite's summary."""
    b = result.get("builds") or {}
    ok = [(n, r) for n, r in b.items() if r.get("latency_ns") and (r.get("synth") or {}).get("fmax_mhz", 0) >= 100]
    if not ok:
        return "trigger IP design space: see `fpga_pareto.md` (no full run yet)"
    n, r = min(ok, key=lambda t: t[1]["latency_ns"])
    return (f"trigger IP on LFE5U-85F: fastest build at >= 100 MHz `{n}`: {r['latency_cycles']} cycles, "
            f"{r['latency_ns']:.1f} ns at {r['synth']['fmax_mhz']:.1f} MHz (`fpga_pareto.md`)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="place and route every configuration (hours)")
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--resume", action="store_true", help="skip configurations already placed and routed")
    ap.add_argument("--out", default=None, help="work folder (default a temporary folder)")
    a = ap.parse_args()
    log = lambda s: print(f"[fpga_pareto] {s}", file=sys.stderr, flush=True)  # noqa: E731
    if a.full:
        doc = explore([s for s in a.only.split(",") if s] or None, a.resume, Path(a.out) if a.out else None,
                      progress=log)
    else:
        doc = run(True)
    print(bench_summary_md(doc))
