"""Tails of the frame path: the slowest 1 % of frames taken apart by stage, from a per-frame trace.

Input: the records of a :class:`beamloop.edge.frame.trace.FrameTrace` (the stage benchmark keeps one while it
measures, :mod:`beamloop.bench.stages`; a run file holds one as ``/trace``). Output: the breakdown of
:func:`beamloop.edge.frame.trace.slowest` (where the slow frames' extra time went, stage by stage; how much of
it the thread spent without a core, wall time minus its CPU time; whether a garbage collection ran inside) and
a plot: one bar per slow frame, its stages stacked, beside the median frame.

Run on a run file: ``python -m beamloop.bench.tails out/run/run.h5 [--png tails.png]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from beamloop.edge.frame.trace import MISSING, frame_total_ns, slowest


def breakdown(records: np.ndarray, stages: tuple[str, ...], fraction: float = 0.01) -> dict:
    """:func:`beamloop.edge.frame.trace.slowest` of ``records`` plus the verdict ``cause``: the stage with the
    largest excess, and ``waiting`` when most of the slow frames' excess is time without a core, ``gc`` when
    most slow frames held a collection.

    Raises
    ------
    ValueError
        As :func:`~beamloop.edge.frame.trace.slowest`.
    """
    out = slowest(records, stages, fraction)
    excess = out["excess_us"]
    worst = max(excess, key=excess.get)
    total_excess = sum(max(v, 0.0) for v in excess.values()) + max(out["gap_us"]["slow_p50"]
                                                                  - out["gap_us"]["all_p50"], 0.0)
    waited = sum(max(v, 0.0) for v in out["waited_us"].values())
    if out["gc_share"] > 0.5:
        kind = "gc"
    elif out["waited_us"] and waited > 0.5 * total_excess:
        kind = "waiting for a core"
    else:
        kind = "work in the stage"
    out["cause"] = {"stage": worst, "excess_us": excess[worst], "kind": kind,
                    "waited_share": min(waited / total_excess, 1.0) if total_excess > 0 else 0.0}
    return out


def plot(records: np.ndarray, stages: tuple[str, ...], path: Path, fraction: float = 0.01, title: str = "") -> Path:
    """Stacked stage durations of the slowest ``fraction`` of frames beside the median frame; returns the PNG's
    ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tot = frame_total_ns(records, stages)
    ok = tot != MISSING
    rec, tot = records[ok], tot[ok]
    n_slow = max(int(np.ceil(fraction * len(rec))), 1)
    order = np.argsort(tot)[::-1][:min(n_slow, 40)]
    med = int(np.argsort(tot)[len(tot) // 2])
    rows = [med, *order.tolist()]
    labels = ["median"] + [f"frame {int(rec['frame_id'][k])}" if rec["frame_id"][k] != MISSING
                           else f"image {int(rec['image_id'][k])}" for k in order]
    fig, ax = plt.subplots(figsize=(9.5, 0.25 * len(rows) + 1.8))
    left = np.zeros(len(rows))
    start_ref = np.where(rec["recv_ns"] != MISSING, rec["recv_ns"], rec[f"{stages[0]}_start_ns"])
    gap0 = (rec[f"{stages[0]}_start_ns"] - start_ref)[rows] / 1e3
    ax.barh(range(len(rows)), gap0, left=left, color="0.85", label="receipt to first stage")
    left += gap0
    cmap = plt.get_cmap("tab10")
    for k, s in enumerate(stages):
        d = (rec[f"{s}_end_ns"] - rec[f"{s}_start_ns"])[rows] / 1e3
        ax.barh(range(len(rows)), d, left=left, color=cmap(k % 10), label=s)
        cpu = rec[f"{s}_cpu_ns"][rows]
        wait = np.where(cpu != MISSING, np.clip(d - cpu / 1e3, 0, None), 0.0)
        ax.barh(range(len(rows)), wait, left=left + d - wait, color="none", edgecolor="k", hatch="///", lw=0)
        left += d
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("microseconds from receipt (hatched: wall time without the CPU)")
    ax.set_title(title or f"slowest {100 * fraction:g} % of {len(rec)} frames by stage")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    """Break down the trace of a run file; prints JSON, writes the plot."""
    import h5py

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_file")
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--png", default=None, help="plot file (default: <run file>_tails.png)")
    a = p.parse_args(argv)
    with h5py.File(a.run_file, "r") as f:
        if "trace" not in f:
            print(f"error: {a.run_file} holds no /trace")
            return 1
        rec = f["trace"][()]
        stages = tuple(json.loads(f["trace"].attrs["stages"]))
    print(json.dumps(breakdown(rec, stages, a.fraction), indent=1))
    plot(rec, stages, Path(a.png or Path(a.run_file).with_suffix("").as_posix() + "_tails.png"), a.fraction)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
