"""The benchmark suite (``beamloop bench``, ``make bench``): every section in one run, JSON + PNG + summary.

Sections, in order (each one's failure is recorded and the others go on):

=============  ==============================================================  ===========================
section        what                                                            writes (in the results dir)
=============  ==============================================================  ===========================
stages         main job stage latencies at 256^2, 512^2, 1024^2 (sim + service)  stage_latency.json, *.png
budget         which stages fit a detector's or a scan's frame time              budget.json, budget.png
atomfinding    beamloop's finders against atomap, scikit-image, trackpy          atom_finding.json, *.png
gpu            the stage table on an NVIDIA GPU (skipped without one)            gpu.json
peers          other issues' benchmarks: bench/streams_*.py, unet_*.py,          their own <name>.json
               trigger_*.py, fpga_*.py, soak*.py (each ``run(quick) -> dict``)
=============  ==============================================================  ===========================

``suite.json`` indexes the run (machine, load, wall time and status per section) and ``summary.md``
presents it all. Peer modules run one at a time in a child process (``python -m beamloop.bench.suite peer NAME``)
with a time limit, so that one that hangs or crashes loses nothing else; a module may also define
``bench_summary_md(result) -> str`` (Markdown) for its part of the summary. The files of its group (names
starting with the group's prefix) written or rewritten in :data:`RESULTS` during a peer's run are listed in
``peers.json`` and the summary (on a shared machine another developer's run of the same group may add some).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

log = logging.getLogger("beamloop.bench")

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
"""Default results folder (where peer modules write theirs too)."""

SECTIONS = ("stages", "budget", "atomfinding", "gpu", "peers")

PEER_GROUPS = {
    "streams_": "Detector streams: beamloop's receivers against libertem-dectris and the raw pyzmq ceiling",
    "unet_": "the learned finder (U-Net): latency and quality",
    "trigger_": "trigger models: decision time",
    "fpga_": "trigger logic on the FPGA: resources, fmax, initiation interval",
    "soak": "soak: the service under sustained load",
    "dkl": "deep kernel learning: top-5% sites found and reconstruction vs random and raster, decision time per step",
    "monitor": "the live view (--http): the frame path's p50/p99 with and without the page open",
    "fanout": "fan-out: 4D reductions at a 128x128 detector over 1, 2, 4 worker processes, per-worker ceiling, "
              "scaling model",
    "dask_": "Dask: the 4D reductions of a recording on threads, processes and a LocalCluster against one process",
    "search": "automated search: rare regions per stage move against raster and random at the same budget",
    "fewshot": "few-shot chips: accuracy at 1, 2, 5 shots on simulated and real chips, chips per second",
}
"""File-name prefixes of other developers' benchmark modules in bench/, and what they measure."""

PEER_TIMEOUT_S = {False: 420, True: 240}
"""Time limit per peer module, full and quick run, seconds (the whole full run must stay under 20 minutes
on 2 cores)."""
PEER_ALWAYS_QUICK = {
    "streams_receive": "its full form (100,000 + 20,000 frames, 3 trials per receiver) did not finish in 420 s on "
                       "2 shared cores; the quick form (20,000 + 4,000 frames, 1 trial) keeps the suite within 20 "
                       "minutes: run `python bench/streams_receive.py` for the full one",
    "soak": "the full soak runs 30 minutes, longer than the whole suite may take; the suite runs its quick "
            "form (40 s, soak_quick.json): run `python -m beamloop.bench.soak` for the long one",
    "fpga_ejection": "place and route of the shipped trigger takes 4-15 minutes on 2 cores; the suite runs both "
                     "simulations (quick form, fpga_ejection_quick.json) and keeps the builds made by "
                     "`python -m beamloop.bench.fpga_ejection` (fpga_ejection.md)",
    "trigger_at": "the full comparison runs `beamloop run` 60 times (seeds 0-29, trigger at the controller and in "
                  "the service), about 6 minutes on 2 shared cores; the suite runs seeds 0-3 (trigger_at_quick.json): "
                  "run `python -m beamloop.bench.trigger_at` for the full one (trigger_at.md)",
}
"""Peer modules the suite runs in their quick form even in a full run, and why."""
PEER_RESULT_CHARS = 100_000
"""Peer results larger than this (as JSON) are kept in their own file only, not in ``peers.json``."""


def machine_info() -> dict:
    """Cores, load averages, platform and library versions of this run (timings depend on all of them)."""
    import numba
    import numpy

    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpu_count": os.cpu_count(), "load_average_1_5_15": list(load), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "numpy": numpy.__version__, "numba": numba.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def discover_peers(bench_dir: Path = BENCH_DIR) -> dict:
    """Peer benchmark modules present in ``bench_dir``: prefix (:data:`PEER_GROUPS`) -> sorted module names
    (file stems; an empty list when none is there yet)."""
    found = {p: [] for p in PEER_GROUPS}
    for path in sorted(Path(bench_dir).glob("*.py")):
        for prefix in PEER_GROUPS:
            if path.stem.startswith(prefix):
                found[prefix].append(path.stem)
    return found


def call_peer(name: str, quick: bool, timeout_s: float) -> dict:
    """Run ``bench.<name>.run(quick)`` in a child process; returns ``{"status": "ok"|"error"|"timeout"|
    "skipped", "wall_s", "result" | "error", "summary_md"}``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "beamloop.bench.suite", "peer", name, str(out)] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  cwd=str(BENCH_DIR.parent))
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "wall_s": time.perf_counter() - t0,
                    "error": f"did not finish within {timeout_s:.0f} s"}
        wall = time.perf_counter() - t0
        if out.exists():
            got = json.loads(out.read_text())
            got["wall_s"] = wall
            if len(json.dumps(got.get("result", {}))) > PEER_RESULT_CHARS:
                r = got["result"]
                got["result"] = {"note": f"large result: see bench/results/{name}.json",
                                 "keys": sorted(r) if isinstance(r, dict) else []}
            return got
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
        return {"status": "error", "wall_s": wall, "error": f"exit status {proc.returncode}: " + " | ".join(tail)}


def _peer_child(name: str, out: Path, quick: bool) -> int:
    """Child-process body of :func:`call_peer`: import, run, and write the outcome to ``out``."""
    import importlib

    try:
        mod = importlib.import_module(f"beamloop.bench.{name}")
    except ImportError as exc:
        out.write_text(json.dumps({"status": "skipped", "error": f"cannot import beamloop.bench.{name}: {exc}"}))
        return 0
    if not callable(getattr(mod, "run", None)):
        out.write_text(json.dumps({"status": "skipped", "error": f"beamloop.bench.{name} has no run(quick) function"}))
        return 0
    try:
        res = mod.run(quick)
    except Exception as exc:  # report any failure of a peer's benchmark, keep the suite going
        out.write_text(json.dumps({"status": "error", "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc()[-3000:]}))
        return 0
    md = ""
    if callable(getattr(mod, "bench_summary_md", None)):
        try:
            md = str(mod.bench_summary_md(res))
        except Exception as exc:
            md = f"(summarize failed: {type(exc).__name__}: {exc})"
    out.write_text(json.dumps({"status": "ok", "result": res, "summary_md": md}, default=_jsonable))
    return 0


def _mtimes(folder: Path) -> dict:
    """File name -> modification time (ns) of the files in ``folder`` (empty when it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()}


def _jsonable(o):
    """JSON fallback for numpy scalars and arrays, paths and other objects."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_json(path: Path, obj) -> Path:
    """Write ``obj`` as indented JSON (numpy values converted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, default=_jsonable))
    return path


def run_suite(out: Path = RESULTS, quick: bool = False, sections=SECTIONS, real_dir: Path | None = None,
              scenarios=None, progress: bool = True) -> dict:
    """Run the chosen ``sections`` and write their results, plots, ``suite.json`` and ``summary.md`` in ``out``.

    Parameters
    ----------
    out : Path
        Results folder (created). Peer modules write their own files in :data:`RESULTS` whatever it is.
    quick : bool
        A run of a few minutes instead of the full one.
    sections : iterable of str
        Subset of :data:`SECTIONS`. ``budget`` without ``stages`` reads ``out/stage_latency.json``.
    real_dir : Path, optional
        Folder of real images (default ``../shared/data/real``).
    scenarios : list of beamloop.bench.budget.Scenario, optional
        Budget scenarios (default :data:`beamloop.bench.budget.DEFAULT_SCENARIOS`).

    Returns the index written to ``suite.json``.
    """
    from beamloop.bench import plots
    from beamloop.bench.budget import DEFAULT_SCENARIOS, FRAME_PATH, budgets
    from beamloop.edge.service import STAGES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    index = {"mode": "quick" if quick else "full", "machine_start": machine_info(), "sections": {}, "files": []}
    results: dict = {}
    t_suite = time.perf_counter()

    def section(name, fn):
        if name not in sections:
            return
        t0 = time.perf_counter()
        if progress:
            print(f"[bench] {name} ...", flush=True)
        try:
            files = fn() or []
            status = {"status": "ok"}
        except Exception as exc:  # one section's failure must not lose the others
            log.exception("section %s failed", name)
            files, status = [], {"status": "error", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()[-3000:]}
        status["wall_s"] = time.perf_counter() - t0
        index["sections"][name] = status
        index["files"] += [str(f) for f in files]
        if progress:
            print(f"[bench] {name}: {status['status']} in {status['wall_s']:.0f} s", flush=True)

    def do_stages():
        from beamloop.bench import floor, stages
        from beamloop.bench.tails import plot as tails_plot

        traces: dict = {}
        res, samples = stages.run(quick, progress_bar=progress, traces=traces)
        sizes = tuple(int(s.split("x")[0]) for s in res["sizes"])
        res["floor"] = floor.run(quick, sizes)  # what the machine can do, in the same run
        res["floor_ratios"] = {s: floor.ratios(r["stages"], res["floor"]["sizes"].get(s, {}))
                               for s, r in res["sizes"].items()}
        res["machine"] = machine_info()
        results["stages"] = res
        us = stages.samples_us(samples)
        return [write_json(out / "stage_latency.json", res),
                plots.stage_ccdf(out / "stage_latency_ccdf.png", us, STAGES),
                plots.stage_hist(out / "stage_latency_hist.png", us, STAGES),
                plots.throughput(out / "throughput.png", res["sizes"], FRAME_PATH),
                *(tails_plot(rec, names, out / f"stage_tails_{size}.png", title=f"{size}: slowest 1 % of frames")
                  for size, (rec, names) in traces.items())]

    def do_budget():
        st = results.get("stages")
        if st is None:
            src = out / "stage_latency.json"
            if not src.exists():
                raise FileNotFoundError(f"{src} does not exist: run the stages section first")
            st = results["stages"] = json.loads(src.read_text())
        b = budgets(st["sizes"], scenarios or DEFAULT_SCENARIOS)
        results["budget"] = b
        return [write_json(out / "budget.json", {"scenarios": b, "method": _budget_doc()}),
                plots.budget_bars(out / "budget.png", b)]

    def do_atoms():
        from beamloop.bench import atomfinding

        res = atomfinding.run(quick, real_dir, plots_dir=out)
        results["atomfinding"] = res
        files = [write_json(out / "atom_finding.json", res),
                 plots.accuracy_vs_speed(out / "atom_finding_accuracy_vs_speed.png", res["simulated"])]
        return files + [r["overlay"] for r in res["real"].get("images", {}).values() if "overlay" in r]

    def do_gpu():
        from beamloop.bench import gpu

        res = gpu.run(quick)
        results["gpu"] = res
        return [write_json(out / "gpu.json", res)]

    def do_peers():
        found = discover_peers()
        res = {}
        for prefix, names in found.items():
            if not names:
                res[prefix] = {"status": "absent", "error": f"no bench/{prefix}*.py yet ({PEER_GROUPS[prefix]})"}
                continue
            for name in names:
                if progress:
                    print(f"[bench]   peer beamloop.bench.{name} ...", flush=True)
                peer_quick = bool(quick) or name in PEER_ALWAYS_QUICK
                before = _mtimes(RESULTS)
                res[name] = call_peer(name, peer_quick, PEER_TIMEOUT_S[bool(quick)])
                after = _mtimes(RESULTS)
                res[name]["files"] = sorted(f for f, t in after.items() if before.get(f) != t and f.startswith(prefix))
                res[name]["group"] = prefix
                if peer_quick and not quick:
                    res[name]["note"] = "quick form: " + PEER_ALWAYS_QUICK[name]
        results["peers"] = res
        return [write_json(out / "peers.json", res)]

    section("stages", do_stages)
    section("budget", do_budget)
    section("atomfinding", do_atoms)
    section("gpu", do_gpu)
    section("peers", do_peers)
    index["machine_end"] = machine_info()
    index["wall_s"] = time.perf_counter() - t_suite
    from beamloop.bench.summary import write_summary

    index["files"].append(str(write_summary(out / "summary.md", index, results)))
    write_json(out / "suite.json", index)
    return index


def _budget_doc() -> str:
    from beamloop.bench import budget

    return budget.__doc__.strip()


if __name__ == "__main__":
    # child process of call_peer: python -m beamloop.bench.suite peer NAME OUTFILE [--quick]
    if len(sys.argv) >= 4 and sys.argv[1] == "peer":
        sys.exit(_peer_child(sys.argv[2], Path(sys.argv[3]), "--quick" in sys.argv[4:]))
    print("usage: beamloop bench [--quick] [--out DIR]  (this module's own entry point runs peer modules)",
          file=sys.stderr)
    sys.exit(2)
