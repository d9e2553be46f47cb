"""``beamloop bench``: the benchmark suite (:mod:`beamloop.bench.suite`) and latency budgets
(:mod:`beamloop.bench.budget`).

    beamloop bench [--quick] [--out bench/results] [--only SECTION ...] [--real-data DIR]
                   [--frame ROWSxCOLS (--frame-rate HZ | --dwell-us US)]
    beamloop bench budget --dwell-us 10 --frame 512          (a scan: dwell per probe position, frame size)
    beamloop bench budget --frame-rate 2000 --frame 512x512  (a detector: frames per second, frame size)

``budget`` (same as ``--budget-only``) measures nothing: it reads ``stage_latency.json`` from ``--out``
(written by a full or quick run, or ``beamloop bench --only stages``) and prints the budget of the given
detector or scan, or of the default scenarios when none is given. ``--frame`` takes ``N`` (N x N) or
``ROWSxCOLS``; ``--frame-size`` is the same option.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from beamloop.edge.cli.types import parse_positive, parse_shape


def _scenarios(a: argparse.Namespace) -> list:
    """Default scenarios plus the one given on the command line (first)."""
    from beamloop.bench.budget import DEFAULT_SCENARIOS, Scenario

    extra = []
    if a.frame_rate is not None or a.dwell_us is not None:
        if a.frame_size is None:
            raise ValueError("--frame-rate / --dwell-us need --frame (N or ROWSxCOLS)")
        if a.frame_rate is not None and a.dwell_us is not None:
            raise ValueError("give --frame-rate (a detector) or --dwell-us (a scan), not both")
        r, c = a.frame_size
        label = (f"detector {r}x{c} at {a.frame_rate:g} Hz" if a.frame_rate is not None
                 else f"scan {r}x{c}, {a.dwell_us:g} us dwell")
        extra.append(Scenario(label, (r, c), frame_rate_hz=a.frame_rate, dwell_us=a.dwell_us))
    elif a.frame_size is not None:
        raise ValueError("--frame needs --frame-rate (a detector) or --dwell-us (a scan)")
    return extra + list(DEFAULT_SCENARIOS)


def _print_budget(b: dict) -> None:
    from beamloop.bench.summary import fmt

    print(f"{b['label']}: frame time {fmt(b['frame_time_us'])} us; frame path p50 {fmt(b['frame_path_p50_us'])} us, "
          f"p99 {fmt(b['frame_path_p99_us'])} us; leftover {fmt(b['leftover_us'])} us; "
          f"at most {fmt(b['max_frame_rate_hz'])} frames/s")
    print(f"  {'stage':<12}{'p50 us':>11}{'p99 us':>11}{'share':>9}{'cum p99':>11}  fits")
    for r in b["stages"]:
        cum = fmt(r["cumulative_p99_us"]) if r["per_frame"] else ""
        fit = ("yes" if r["fits"] else "NO") if r["per_frame"] else "(beam)"
        ex = " (extrapolated)" if r["extrapolated"] else ""
        print(f"  {r['stage']:<12}{fmt(r['p50_us']):>11}{fmt(r['p99_us']):>11}{fmt(r['share']):>9}{cum:>11}  {fit}{ex}")
    for k, v in b["beam"].items():
        print(f"  {k}: {fmt(v) if not isinstance(v, bool) else v}")
    if b["all_fit"]:
        print(f"  => the whole frame path fits (p99), {fmt(b['leftover_us'])} us left per frame")
    else:
        over = [r["stage"] for r in b["stages"] if r["per_frame"] and not r["fits"]]
        print(f"  => fits: {', '.join(b['fits_stages']) or 'none'}; over the frame time from {over[0]} on "
              f"(frame path p99 exceeds it by {fmt(-b['leftover_us'])} us)")


def cmd_bench(a: argparse.Namespace) -> int:
    """Run the suite (or only the budget); returns the exit status (1 when a section failed)."""
    from beamloop.bench.suite import SECTIONS, run_suite

    out = Path(a.out)
    scenarios = _scenarios(a)
    if a.budget_only or a.action == "budget":
        from beamloop.bench.budget import budgets

        src = out / "stage_latency.json"
        if not src.exists():
            print(f"beamloop bench: error: {src} does not exist; run `beamloop bench --only stages` (or a "
                  "quick or full run) first",
                  file=sys.stderr)
            return 1
        for b in budgets(json.loads(src.read_text())["sizes"], scenarios[:1] if a.frame_size else scenarios):
            _print_budget(b)
            print()
        return 0
    sections = tuple(a.only) if a.only else SECTIONS
    index = run_suite(out, quick=a.quick, sections=sections, real_dir=Path(a.real_data) if a.real_data else None,
                      scenarios=scenarios, progress=not a.no_progress)
    failed = [k for k, v in index["sections"].items() if v["status"] != "ok"]
    print(f"beamloop bench: {index['mode']} run in {index['wall_s']:.0f} s; results and summary in {out}"
          + (f"; FAILED sections: {failed}" if failed else ""))
    return 1 if failed else 0


def register(subparsers) -> None:
    """Add ``bench`` to the ``beamloop`` command (:data:`beamloop.edge.cli.COMMAND_MODULES`)."""
    from beamloop.bench.suite import RESULTS, SECTIONS

    p = subparsers.add_parser("bench", help="benchmark suite: stage latencies, budgets, atom finding vs peers, GPU",
                              description="The benchmark suite: main job stage latencies, latency budgets, atom "
                                          "finding against peers, the GPU section, and other issues' benchmarks; "
                                          "JSON, PNG plots and summary.md in --out.")
    p.add_argument("action", nargs="?", choices=("budget",), default=None,
                   help="budget: print the latency budget of --frame with --frame-rate or --dwell-us from the "
                        "stage results in --out (measures nothing); without it the suite runs")
    p.add_argument("--quick", action="store_true", help="a run of a few minutes (fewer frames and repeats)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default: %(default)s)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--real-data", default=None, help="folder of real images (default: ../shared/data/real)")
    p.add_argument("--frame", "--frame-size", dest="frame_size", type=parse_shape, default=None,
                   help="budget: frame size N or ROWSxCOLS, pixels")
    p.add_argument("--frame-rate", type=parse_positive, default=None, help="budget: detector frames per second")
    p.add_argument("--dwell-us", type=parse_positive, default=None,
                   help="budget: scan dwell time per probe position, us")
    p.add_argument("--budget-only", action="store_true",
                   help="print budgets from existing stage results; measure nothing")
    p.add_argument("--quiet", "--no-progress", dest="no_progress", action="store_true",
                   help="no progress lines or bars")
    p.set_defaults(func=cmd_bench)
