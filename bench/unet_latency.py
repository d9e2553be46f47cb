"""Benchmark: latency (and accuracy) of the U-Net ensemble per precision against the classical finder and
scikit-image ``peak_local_max`` + centre of mass, on simulated MoS2 frames of 256x256 and 1024x1024 pixels.

CPU: ONNX Runtime's CPU provider with 2 intra-op threads (the machine's cores). GPU: ONNX Runtime's CUDA
provider when this onnxruntime build offers it (the ``gpu`` extra on a machine with an NVIDIA GPU); skipped
with the reason otherwise. Times are wall-clock per frame, the frame already in memory, from raw counts to the
column table (U-Net: normalise + network + extraction; classical: preprocess + find; peak_local_max:
smoothing + peaks + centre of mass); median and 99th percentile over repeats after a warm-up.

Writes ``bench/results/unet_latency.json`` and ``bench/results/unet_latency.png``.
Run: ``python -m beamloop.bench.unet_latency [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def _times(fn, repeats: int) -> dict:
    fn()  # warm-up (numba compilation, ONNX Runtime arenas)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    a = np.asarray(ts) * 1e3
    return {"median_ms": round(float(np.median(a)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "repeats": repeats}


def peak_local_max_com(image: np.ndarray, sigma_px: float, min_distance: int = 3):
    """scikit-image ``peak_local_max`` on the Gaussian-smoothed frame, refined by the centre of mass of the
    background-subtracted smoothed frame within ``min_distance`` pixels (the baseline of
    ../shared/notes/atom-finding.md). Returns an (n, 2) array of (x, y) pixels."""
    from scipy.ndimage import gaussian_filter
    from skimage.feature import peak_local_max

    s = gaussian_filter(image.astype(np.float32), sigma_px)
    bg = np.percentile(s, 5)
    s -= bg
    thr = 0.15 * float(np.percentile(s, 99.5))
    peaks = peak_local_max(s, min_distance=min_distance, threshold_abs=thr, exclude_border=False)
    r = min_distance
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    disc = (xx ** 2 + yy ** 2) <= r * r
    pad = np.pad(s, r, mode="constant")
    out = np.empty((len(peaks), 2))
    for k, (i, j) in enumerate(peaks):  # per-peak python loop: the baseline as commonly written
        w = np.clip(pad[i:i + 2 * r + 1, j:j + 2 * r + 1], 0, None) * disc
        tot = w.sum()
        out[k] = (j + (w * xx).sum() / tot, i + (w * yy).sum() / tot) if tot > 0 else (j, i)
    return out


def run(quick: bool = False) -> dict:
    """Run the benchmark; returns (and writes) the results dict."""
    import onnxruntime as ort

    from beamloop.edge.analysis.scoring import combine, score_frame
    from beamloop.edge.sim.frames import mos2_frame
    from beamloop.edge.stages.find import ColumnFinder, FinderConfig
    from beamloop.edge.stages.unet import PRECISIONS, UNetFinder, load_manifest

    px = 0.15
    reps = {256: 5 if quick else 30, 1024: 2 if quick else 6}
    frames = {n: mos2_frame((n, n), px, 1e5, seed=300_000 + n) for n in reps}
    cfg = FinderConfig.for_pixel_size(px)
    classical = ColumnFinder(cfg)
    unets = {p: UNetFinder(precision=p, device="cpu", threads=2) for p in PRECISIONS}
    methods = {f"unet_{p}": (lambda f, u=u: u.find(f, "MoS2").columns.xy) for p, u in unets.items()}
    methods["classical"] = lambda f: classical.find(f).xy
    methods["peak_local_max_com"] = lambda f: peak_local_max_com(f, 0.33 / px)
    res: dict = {"machine": {"cpu_cores": 2, "platform": platform.platform(), "onnxruntime": ort.__version__,
                             "note": "2 shared cores; other developers' jobs ran at the same time (noisy)"},
                 "model": {k: load_manifest()[k] for k in ("date", "members", "tile", "size_bytes")},
                 "cpu": {}, "accuracy": {}, "gpu": {}}
    for n, fr in frames.items():
        res["cpu"][f"{n}x{n}"] = {name: _times(lambda fn=fn, c=fr.counts: fn(c), reps[n])
                                  for name, fn in methods.items()}
    # accuracy on held-out frames (same seeds for every method)
    for dose in (1e4, 1e5):
        fs = [mos2_frame((256, 256), px, dose, seed=300_100 + k) for k in range(2 if quick else 4)]
        row = {}
        for name, fn in methods.items():
            scores = []
            for f in fs:
                xy = fn(f.counts)  # unclassified rows (class -1) count as columns
                scores.append(score_frame(xy, -np.ones(len(xy), int), f.truth_xy, f.truth_cls, f.class_names, px,
                                          frame_shape=f.counts.shape))
            s = combine(scores)
            row[name] = {"recall": round(s.recall, 4), "precision": round(s.precision, 4), "rms_pm": round(s.rms_pm, 2)}
        res["accuracy"][f"256x256@{dose:.0e}"] = row
    if "CUDAExecutionProvider" in ort.get_available_providers():
        for p in PRECISIONS:
            u = UNetFinder(precision=p, device="cuda")
            for n, fr in frames.items():
                res["gpu"].setdefault(f"{n}x{n}", {})[f"unet_{p}"] = _times(lambda u=u, c=fr.counts: u.find(c, "MoS2"),
                                                                              reps[n])
    else:
        res["gpu"] = {"skipped": "onnxruntime has no CUDAExecutionProvider here (no NVIDIA GPU / 'gpu' extra not "
                                 f"installed; providers: {ort.get_available_providers()})"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "unet_latency.json").write_text(json.dumps(res, indent=1))
    _plot(res, RESULTS / "unet_latency.png")
    return res


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(res["cpu"])
    names = list(res["cpu"][sizes[0]])
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4))
    for ax, size in zip(np.atleast_1d(axes), sizes):
        med = [res["cpu"][size][n]["median_ms"] for n in names]
        p99 = [res["cpu"][size][n]["p99_ms"] for n in names]
        ax.bar(names, med, color=["tab:blue"] * 3 + ["tab:gray", "tab:orange"][: len(names) - 3])
        ax.scatter(names, p99, color="k", marker="_", s=200, label="p99")
        ax.set_yscale("log")
        ax.set_title(f"MoS2 {size}, CPU (2 cores)")
        ax.set_ylabel("ms per frame")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    out = run(ap.parse_args().quick)
    print(json.dumps({"cpu": out["cpu"], "accuracy": out["accuracy"], "gpu": out["gpu"]}, indent=1))
