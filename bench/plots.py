"""PNG plots of the benchmark results (matplotlib, Agg backend). Each function writes one file and returns
its name (relative to the results folder, for the summary)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from beamloop.bench.stats import cdf

COLOURS = {"256x256": "tab:blue", "512x512": "tab:orange", "1024x1024": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_ccdf(path: Path, samples_us: dict, stages) -> str:
    """Per stage, the fraction of samples slower than t (log-log, one curve per frame size): the tail at a
    glance, p99 and p99.9 where the curves cross 1e-2 and 1e-3.

    ``samples_us``: size label -> stage -> 1-D array of microseconds."""
    plt = _plt()
    stages = [s for s in stages if any(s in st for st in samples_us.values())]
    ncol = 3
    nrow = max((len(stages) + ncol - 1) // ncol, 1)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.1 * nrow), squeeze=False)
    for ax, stage in zip(axes.ravel(), stages):
        for size, st in samples_us.items():
            if stage not in st or len(st[stage]) == 0:
                continue
            v, f = cdf(st[stage], 2000)
            ax.step(v, np.maximum(1.0 - f + 1.0 / len(st[stage]), 1e-6), where="post",
                    color=COLOURS.get(size), label=f"{size} (n={len(st[stage])})")
        for q in (1e-2, 1e-3):
            ax.axhline(q, color="0.8", lw=0.8, zorder=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("latency, us", fontsize=8)
        ax.set_ylabel("fraction slower", fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(stages):]:
        ax.axis("off")
    fig.suptitle("main job stage latencies (CPU); grey lines: p99 and p99.9", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def stage_hist(path: Path, samples_us: dict, stages) -> str:
    """Per stage, histograms of the latency on logarithmic bins, one per frame size."""
    plt = _plt()
    stages = [s for s in stages if any(s in st for st in samples_us.values())]
    ncol = 3
    nrow = max((len(stages) + ncol - 1) // ncol, 1)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, stage in zip(axes.ravel(), stages):
        vals = [st[stage] for st in samples_us.values() if stage in st and len(st[stage])]
        lo = max(min(float(v.min()) for v in vals), 1e-2)
        hi = max(float(v.max()) for v in vals) * 1.01
        bins = np.geomspace(lo, max(hi, lo * 1.1), 60)
        for size, st in samples_us.items():
            if stage in st and len(st[stage]):
                ax.hist(st[stage], bins=bins, histtype="step", color=COLOURS.get(size), label=size)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("latency, us", fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(stages):]:
        ax.axis("off")
    fig.suptitle("main job stage latency histograms (CPU)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def throughput(path: Path, sizes: dict, frame_stages) -> str:
    """Frames per second per frame size: the closed loop as measured (one target and a 10 ms dwell per frame),
    and what the frame path alone (``frame_stages`` at p50 and at p99, back to back) could sustain."""
    plt = _plt()
    labels = list(sizes)
    loop = [sizes[s]["frames_per_s"] for s in labels]
    p50 = [1e6 / sum(sizes[s]["stages"][k]["p50_us"] for k in frame_stages if k in sizes[s]["stages"]) for s in labels]
    p99 = [1e6 / sum(sizes[s]["stages"][k]["p99_us"] for k in frame_stages if k in sizes[s]["stages"]) for s in labels]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.27
    ax.bar(x - w, loop, w, label="closed loop as run (incl. 10 ms dwell)")
    ax.bar(x, p50, w, label="frame path at p50 (receive..policy)")
    ax.bar(x + w, p99, w, label="frame path at p99")
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("frames per second")
    ax.set_title("throughput on this machine (2 shared cores)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def accuracy_vs_speed(path: Path, simulated: dict) -> str:
    """One panel per (frame size, dose): each method's time per frame (p50, log) against its F1, labelled
    with its RMS error."""
    plt = _plt()
    cells = list(simulated)
    fig, axes = plt.subplots(1, max(len(cells), 1), figsize=(4.6 * max(len(cells), 1), 4.2), squeeze=False)
    for ax, key in zip(axes.ravel(), cells):
        for name, v in simulated[key].items():
            if not isinstance(v, dict) or "time" not in v:
                continue
            t, a = v["time"]["p50_ms"], v["accuracy"]
            mk = "*" if name.startswith("beamloop") else "o"
            ax.scatter(t, a["f1"], marker=mk, s=120 if mk == "*" else 50)
            ax.annotate(f"{name}\n{a['rms_pm']:.1f} pm", (t, a["f1"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("time per frame, ms (p50)")
        ax.set_ylabel("F1 (recall, precision at 0.5 A)")
        ax.set_title(key.replace("@", " @ ") + " e-/A^2", fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle("atom finding: accuracy against speed (simulated MoS2, 0.15 A/px, CPU)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def real_overlay(path: Path, image: np.ndarray, found: dict, title: str) -> str:
    """The image with each method's columns marked (one marker style per method)."""
    plt = _plt()
    img = np.asarray(image, float)
    lo, hi = np.percentile(img, [0.5, 99.8])
    fig, ax = plt.subplots(figsize=(7.5, 7.5 * img.shape[0] / img.shape[1] + 0.4))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
    markers = ["+", "x", "1", "2", "3", "4", "o"]
    for (name, xy), mk in zip(found.items(), markers):
        xy = np.asarray(xy).reshape(-1, 2)
        ax.scatter(xy[:, 0], xy[:, 1], marker=mk, s=22, linewidths=0.8, label=f"{name} ({len(xy)})",
                   facecolors="none" if mk == "o" else None)
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(img.shape[0] - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path).name


def budget_bars(path: Path, budgets: list[dict]) -> str:
    """Per budget scenario, the frame path's stages stacked by p99 as a share of the frame time (log scale,
    from 1e-4): a bar that crosses the line at 1 no longer fits."""
    plt = _plt()
    floor = 1e-4
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(budgets) + 1.9))
    names = []
    for b in budgets:
        for row in b["stages"]:
            if row["per_frame"] and row["stage"] not in names:
                names.append(row["stage"])
    colours = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for i, b in enumerate(budgets):
        left = floor
        for row in b["stages"]:
            if not row["per_frame"]:
                continue
            right = max(row["cumulative_p99_us"] / b["frame_time_us"], left)
            ax.barh(i, right - left, left=left, color=colours[row["stage"]],
                    label=row["stage"] if i == 0 else None)
            left = right
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(budgets)), [b["label"] for b in budgets], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(left=floor)
    ax.set_xlabel("cumulative p99 of the frame path / frame time (1 = the whole frame time)")
    ax.legend(fontsize=7, ncol=3)
    ax.set_title("latency budgets on this machine (CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name
