"""``summary.md``: the benchmark run in Markdown, from the suite's index and each section's results."""

from __future__ import annotations

import math
from pathlib import Path

from beamloop.edge.service import STAGES


def fmt(v, digits: int = 3) -> str:
    """A number with ``digits`` significant digits (no exponent between 1e-3 and 1e6); ``-`` for None/NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1e6 or a < 1e-3:
        return f"{v:.{digits - 1}e}"
    d = max(digits - 1 - int(math.floor(math.log10(a))), 0)
    return f"{v:.{d}f}"


def table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines; cells are formatted with :func:`fmt` unless they are strings."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        out.append("| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in r) + " |")
    return out


def _stages_md(res: dict) -> list[str]:
    lines = ["## 1. Main job: stage latencies (CPU)", "",
             "Measured through the real simulated microscope (separate process) and the edge service over "
             "ZeroMQ, one beam target and a 10 ms dwell per frame; MoS2, 0.15 A/px, 1e5 e-/A^2. "
             "Microseconds. jitter = standard deviation; spread = p99 - p50. A p99.9 marked * rests on "
             "fewer than 1000 samples (it is an interpolation towards the maximum).", ""]
    for size, r in res.get("sizes", {}).items():
        lines.append(f"**{size}**: {r['frames']} frames in {r['wall_s']:.1f} s ({r['frames_per_s']:.1f} frames/s "
                     f"closed loop); dwells ended by {r['dwell_reasons']}; frame errors "
                     f"{r['service']['frame_errors']}, protocol errors {r['service']['protocol_errors']}.")
        lines.append("")
        rows = []
        names = [s for s in STAGES if s in r["stages"]] + [s for s in r["stages"] if s not in STAGES]
        for s in names:
            v = r["stages"][s]
            p999 = fmt(v["p999_us"]) + ("" if v["tail_ok"] else "*")
            rows.append([s, v["n"], v["p50_us"], v["p99_us"], p999, v["max_us"], v["jitter_us"], v["spread_us"]])
        lines += table(["stage", "n", "p50", "p99", "p99.9", "max", "jitter", "spread"], rows) + [""]
    lines += ["Plots: `stage_latency_ccdf.png` (fraction of samples slower than t, per stage), "
              "`stage_latency_hist.png`, `throughput.png`.", ""]
    lines += _tails_md(res)
    lines += _floor_md(res)
    return lines


def _tails_md(res: dict) -> list[str]:
    """The slowest 1 % of frames by stage (:func:`beamloop.bench.tails.breakdown`, per-frame trace)."""
    rows = []
    for size, r in res.get("sizes", {}).items():
        t = r.get("tails")
        if not t:
            continue
        c = t["cause"]
        top = sorted(t["excess_us"].items(), key=lambda kv: -kv[1])[:3]
        rows.append([size, t["n_slow"], t["total_us"]["all_p50"], t["total_us"]["slow_p50"],
                     ", ".join(f"{k} +{fmt(v)}" for k, v in top), f"{c['kind']} ({fmt(100 * c['waited_share'], 2)} % "
                     "without a core)", fmt(t["gc_share"], 2)])
    if not rows:
        return []
    return (["### The slowest 1 % of frames (per-frame trace)", "",
             "Receipt to the last stage, microseconds, all frames' median against the slowest 1 %'s; where their "
             "extra time went (median excess per stage), what it was, and the share of slow frames with a garbage "
             "collection inside. Plots: `stage_tails_<size>.png`.", ""]
            + table(["size", "slow frames", "all p50", "slow p50", "largest excess", "cause", "GC share"], rows)
            + [""])


def _floor_md(res: dict) -> list[str]:
    """The floor section (:mod:`beamloop.bench.floor`): floor operations and each stage over its floor."""
    fl = res.get("floor")
    if not fl:
        return []
    lines = ["### What the machine can do (floor, same run)", "",
             "Floor operations on a uint16 frame of each size (beamloop.bench.floor), microseconds; then each "
             "stage's p50 and p99 divided by its floor's p50 (below 1: the stage beats the library reference).",
             ""]
    ops = sorted({op for v in fl["sizes"].values() for op in v})
    rows = [[op] + [f"{fmt(v[op]['p50_us'])} / {fmt(v[op]['p99_us'])}" if op in v else ""
                    for v in fl["sizes"].values()] for op in ops]
    lines += table(["floor (p50 / p99)"] + list(fl["sizes"]), rows) + [""]
    ratios = res.get("floor_ratios", {})
    stages = sorted({s for v in ratios.values() for s in v}, key=list(fl["stage_floor"]).index)
    rows = [[s, fl["stage_floor"][s]] + [f"{fmt(v[s]['p50_ratio'], 2)} / {fmt(v[s]['p99_ratio'], 2)}" if s in v
                                         else "" for v in ratios.values()] for s in stages]
    lines += table(["stage", "floor"] + [f"{k} p50 / p99 ratio" for k in ratios], rows) + [""]
    return lines


def _budget_md(b: list[dict]) -> list[str]:
    lines = ["## 2. Latency budgets on this machine", "",
             "Stage p50/p99 at the scenario's frame size from power laws fitted to the three measured sizes "
             "(`budget.json` has every stage; sizes outside 256^2..1024^2 are extrapolations). The frame path "
             "(receive..policy) runs back to back: a stage fits while the cumulative p99 stays within the "
             "frame time; leftover = frame time - frame path p99.", ""]
    rows = []
    for s in b:
        beam = s["beam"]
        notes = []
        if "end_to_end_p99_frames" in beam:
            notes.append(f"frame->beam p99 = {fmt(beam['end_to_end_p99_frames'])} frame times")
        if "probe_positions_per_beam_move_p99" in beam:
            notes.append(f"one beam move (bridge p99) = {fmt(beam['probe_positions_per_beam_move_p99'])} dwells")
        if "trigger_p99_us_per_sample" in beam:
            notes.append(f"trigger {fmt(beam['trigger_p99_us_per_sample'] * 1e3)} ns/sample "
                         f"({'fits' if beam['trigger_fits_dwell'] else 'does not fit'} the dwell)")
        fits = "all" if s["all_fit"] else (", ".join(s["fits_stages"]) or "none")
        rows.append([s["label"], fmt(s["frame_time_us"]), fmt(s["frame_path_p50_us"]), fmt(s["frame_path_p99_us"]),
                     fits, fmt(s["leftover_us"]), fmt(s["max_frame_rate_hz"]), "; ".join(notes)])
    lines += table(["scenario", "frame time us", "frame path p50 us", "p99 us", "stages that fit", "leftover us",
                    "max frames/s", "beam"], rows)
    lines += ["", "Plot: `budget.png`. Your own detector or scan: `beamloop bench budget --frame 512 "
              "--frame-rate 2000` or `beamloop bench budget --frame 512 --dwell-us 10`.", ""]
    return lines


def _atoms_md(res: dict) -> list[str]:
    lines = ["## 3. Atom finding, side by side", ""]
    g = res.get("goal", {})
    if "skipped" in g:
        lines += [f"Goal: not evaluated ({g['skipped']}).", ""]
    else:
        lines += [f"**Goal** (classical >= 5x faster than scikit-image peak_local_max + CoM at equal or better "
                  f"accuracy, {g['size']} @ {g['dose_e_per_A2']:.0e} e-/A^2): **{'met' if g['met'] else 'not met'}**. "
                  f"Classical {fmt(g['classical_ms'])} ms per frame (preprocess+find+classify; find only "
                  f"{fmt(g['classical_find_only_ms'])} ms) vs plm_com {fmt(g['plm_com_ms'])} ms: "
                  f"**{fmt(g['speed_ratio'])}x** ({fmt(g['speed_ratio_find_only'])}x find only). Accuracy classical "
                  f"recall {fmt(g['accuracy_classical']['recall'], 4)} / precision "
                  f"{fmt(g['accuracy_classical']['precision'], 4)} / RMS {fmt(g['accuracy_classical']['rms_pm'])} pm, "
                  f"plm_com {fmt(g['accuracy_plm_com']['recall'], 4)} / {fmt(g['accuracy_plm_com']['precision'], 4)} / "
                  f"{fmt(g['accuracy_plm_com']['rms_pm'])} pm "
                  f"({'equal or better' if g['accuracy_equal_or_better'] else 'not equal or better'} within "
                  f"{g['tolerance']['recall']:g} recall/precision and {g['tolerance']['rms_pm']:g} pm; strictly: "
                  f"{'yes' if g['accuracy_equal_or_better_strict'] else 'no'}).", ""]
    lines += ["Simulated MoS2 (0.15 A/px, defects, drift, Poisson noise), scored against ground truth "
              "(0.5 A matching, 0.5 A edge margin). Time per frame on the CPU, frame in memory; x = p50 time / "
              "classical p50 (>1: slower than beamloop). Peers' thresholds calibrated per dose on a separate "
              "frame; beamloop's defaults untuned.", ""]
    for key, cell in res.get("simulated", {}).items():
        lines.append(f"**{key.replace('@', ' @ ')} e-/A^2**")
        lines.append("")
        rows = []
        ratio = cell.get("speed_ratio_vs_classical", {})
        for name, v in cell.items():
            if not isinstance(v, dict) or name.startswith("speed_ratio"):
                continue
            if "skipped" in v:
                rows.append([name, "skipped: " + v["skipped"][:110], "", "", "", "", "", ""])
                continue
            t, a = v["time"], v["accuracy"]
            extra = f" (find only {fmt(t['find_only_p50_ms'])})" if "find_only_p50_ms" in t else ""
            rows.append([name, fmt(t["p50_ms"]) + extra, fmt(t["p99_ms"]), fmt(ratio.get(name)) + "x",
                         fmt(a["recall"], 4), fmt(a["precision"],
                                                  4), fmt(a["rms_pm"]), f"{a['frames']} ({t['n']} runs)"])
        lines += table(["method", "ms p50", "ms p99", "x", "recall", "precision", "RMS pm", "frames (runs)"], rows)
        lines.append("")
    cal = res.get("calibration", {})
    if cal:
        lines.append("Calibrated (threshold, fraction of the minimum distance): " + "; ".join(
            f"{d}: " + ", ".join(f"{k} {fmt(v['threshold'])}, distance x{fmt(v['distance_fraction'])} "
                                 f"(F1 {fmt(v['f1'], 4)})" for k, v in c.items())
            for d, c in cal.items()))
        lines.append("")
    real = res.get("real", {})
    lines.append("**Real images** (no ground truth: speed, and agreement with beamloop's classical columns "
                 "matched within half the minimum distance)")
    lines.append("")
    if "skipped" in real:
        lines += [f"Skipped: {real['skipped']}", ""]
    else:
        rows = []
        for img, r in real.get("images", {}).items():
            if "skipped" in r:
                rows.append([img, "skipped: " + r["skipped"], "", "", "", "", ""])
                continue
            for name, v in r["methods"].items():
                if "skipped" in v:
                    rows.append([img, name, "skipped: " + v["skipped"][:80], "", "", "", ""])
                    continue
                ag = v.get("agreement_with_classical", {})
                rows.append([img, name, fmt(v["time"]["p50_ms"]), fmt(r["speed_ratio_vs_classical"].get(name)) + "x",
                             v["n_found"],
                             f"{fmt(ag.get('of_ref'))} / {fmt(ag.get('of_own'))}" if ag else "(reference)",
                             fmt(ag.get("rms_px")) if ag else ""])
        lines += table(["image", "method", "ms p50", "x", "columns", "matched: of classical / of own", "RMS px"], rows)
        private = [n for n, r in res["real"]["images"].items() if "overlay_private" in r]
        lines += ["", "Overlays: `real_<image>.png`. Images are read in place from the shared folder, never copied"
                  + (f"; no overlay of {', '.join(private)} in the results (copyleft or no licence notice beside it:"
                     " drawn into out/bench_private/ only)" if private else "") + ".", ""]
    lines += ["Plot: `atom_finding_accuracy_vs_speed.png`.", ""]
    return lines


def _gpu_md(res: dict) -> list[str]:
    lines = ["## 4. GPU", ""]
    if "skipped" in res:
        return lines + [f"Skipped: {res['skipped']}", ""]
    lines += [f"Device: **{res['device']}**", ""]
    for part in ("classical_numba_cuda", "unet_onnxruntime_cuda"):
        r = res.get(part, {})
        if "skipped" in r:
            lines += [f"{part}: skipped ({r['skipped']})", ""]
            continue
        for size, v in r.items():
            rows = [[s, x["n"], x["p50_us"], x["p99_us"], x["p999_us"], x["max_us"], x["jitter_us"]]
                    for s, x in v["stages"].items()]
            lines += [f"**{part} {size}** (us)", ""]
            lines += table(["stage", "n", "p50", "p99", "p99.9", "max", "jitter"], rows) + [""]
    return lines


def _flat(d, prefix="", out=None, limit=16):
    out = [] if out is None else out
    if isinstance(d, dict):
        for k, v in d.items():
            if len(out) >= limit:
                break
            _flat(v, f"{prefix}{k}.", out, limit)
    elif isinstance(d, (int, float)) and not isinstance(d, bool) and len(out) < limit:
        out.append((prefix[:-1], d))
    return out


def _peers_md(res: dict) -> list[str]:
    lines = ["## 5. Other benchmarks (other issues' modules)", ""]
    for name, r in res.items():
        st = r.get("status")
        if st == "absent":
            lines.append(f"- `{name}*`: skipped, {r['error']}")
            continue
        head = f"- `bench/{name}.py`: **{st}**" + (f" in {r['wall_s']:.0f} s" if "wall_s" in r else "")
        if st != "ok":
            lines.append(head + f": {r.get('error', '')}")
            continue
        files = r.get("files")
        lines.append(head + ("; wrote " + ", ".join(f"`{f}`" for f in files) if files else
                             "; wrote no file in bench/results")
                     + (f" ({r['note']})" if r.get("note") else ""))
        if r.get("summary_md"):
            lines += ["", r["summary_md"], ""]
        else:
            figs = _flat(r.get("result", {}))
            if figs:
                lines.append("  " + "; ".join(f"{k} = {fmt(v)}" for k, v in figs))
    return lines + [""]


def write_summary(path: Path, index: dict, results: dict) -> Path:
    """Write ``summary.md`` for a suite run (``index``: :func:`beamloop.bench.suite.run_suite`'s index; ``results``:
    section name -> its results) and return its path."""
    m0, m1 = index["machine_start"], index.get("machine_end", index["machine_start"])
    lines = ["# beamloop benchmark summary", "",
             f"{index['mode']} run, {m0['date']}; {m0['cpu_count']} CPU cores ({m0['processor']}), "
             f"{m0['platform']}, Python {m0['python']}, numpy {m0['numpy']}, numba {m0['numba']}. "
             f"Load average (1/5/15 min) {', '.join(fmt(v) for v in m0['load_average_1_5_15'])} at the start, "
             f"{', '.join(fmt(v) for v in m1['load_average_1_5_15'])} at the end: the cores are shared with other "
             "work, so timings are noisy (tails most of all); re-run on a quiet machine for reference figures.",
             "", "| section | status | wall s |", "|---|---|---|"]
    for name, s in index["sections"].items():
        lines.append(f"| {name} | {s['status']}{': ' + s['error'] if 'error' in s else ''}"
                     f"{' (' + s['note'] + ')' if s.get('note') else ''} | {s['wall_s']:.0f} |")
    lines += [f"\nTotal {index.get('wall_s', float('nan')):.0f} s.", ""]
    if "stages" in results:
        lines += _stages_md(results["stages"])
    if "budget" in results:
        lines += _budget_md(results["budget"])
    if "atomfinding" in results:
        lines += _atoms_md(results["atomfinding"])
    if "gpu" in results:
        lines += _gpu_md(results["gpu"])
    if "peers" in results:
        lines += _peers_md(results["peers"])
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path

