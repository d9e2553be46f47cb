"""Benchmark: decision time of the quantized trigger model (integer numba runtime) against CUSUM and the
moving-window trigger, per block of parked-probe samples and per sample.

Each trigger is fed the same Poisson stream at 7.5 counts per sample (an S2 column at 50 pA, 10 us
samples) in blocks of 1, 100 (what the simulated microscope sends) and 1000 samples, the way
:meth:`beamloop.edge.service.EdgeService.dwell` calls ``update``; the time of every ``update`` call is recorded
with ``time.perf_counter_ns``. No alarm is raised during the measurement (the threshold is set out of
reach), so every sample is decided. Writes ``bench/results/trigger_decision.json`` and ``.png``.

Run: ``python -m beamloop.bench.trigger_decision [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from beamloop.edge.trigger import ModelTrigger, Trigger, make_trigger

RESULTS = Path(__file__).resolve().parent / "results"


def _time_updates(trigger: Trigger, x: np.ndarray, block: int, repeats: int) -> np.ndarray:
    """Nanoseconds of every ``update`` call over ``repeats`` passes of ``x`` in blocks of ``block``."""
    out = []
    for _ in range(repeats):
        trigger.start(expected_rate=7.5)
        for a in range(0, len(x) - block + 1, block):
            b = x[a:a + block]
            t0 = time.perf_counter_ns()
            trigger.update(b)
            out.append(time.perf_counter_ns() - t0)
    return np.array(out, np.float64)


def run(quick: bool = False) -> dict:
    """Measure and write the results; returns them.

    Returns
    -------
    dict: per trigger and block size, p50 / p99 / max microseconds per ``update`` call and ns per sample.
    """
    rng = np.random.default_rng(0)
    n = 20_000 if quick else 200_000
    x = rng.poisson(7.5, n).astype(np.uint16)
    # thresholds out of reach: every sample is decided
    options: dict[str, dict[str, float]] = {"model": {"threshold": 2 ** 62}, "cusum": {"h": 1e12},
                                            "window": {"fraction": 1e-9}}
    triggers = {name: make_trigger(name, **kw) for name, kw in options.items()}
    model = triggers["model"]
    assert isinstance(model, ModelTrigger)
    for t in triggers.values():  # compile / load numba caches
        t.start(expected_rate=7.5)
        t.update(x[:500])
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.processor(),
                       "note": "2 shared cores; other developers' jobs may run at the same time"},
           "stream": {"samples": n, "counts_per_sample": 7.5},
           "model": {"name": model.model_name, "features": model.spec.as_dict(), "layers": model.mlp.dims.tolist(),
                     "macs_per_sample": int(sum(a * b for a, b in zip(model.mlp.dims[:-1], model.mlp.dims[1:])))},
           "results": {}}
    for block in (1, 100, 1000):
        reps = 1 if block == 1 else (2 if quick else 5)
        xs = x[:n // 10] if block == 1 else x
        for name, t in triggers.items():
            ns = _time_updates(t, xs, block, reps)
            res["results"][f"{name}/block{block}"] = {
                "trigger": name, "block": block, "calls": int(len(ns)),
                "p50_us": float(np.percentile(ns, 50) / 1e3), "p99_us": float(np.percentile(ns, 99) / 1e3),
                "max_us": float(ns.max() / 1e3), "ns_per_sample_p50": float(np.percentile(ns, 50) / block)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "trigger_decision.json").write_text(json.dumps(res, indent=2))
    _plot(res, RESULTS / "trigger_decision.png")
    return res


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(res["results"].values())
    fig, ax = plt.subplots(figsize=(8, 4))
    blocks = sorted({r["block"] for r in rows})
    names = ["model", "cusum", "window"]
    w = 0.25
    for i, name in enumerate(names):
        v = [next(r["p50_us"] for r in rows if r["trigger"] == name and r["block"] == b) for b in blocks]
        e = [next(r["p99_us"] for r in rows if r["trigger"] == name and r["block"] == b) for b in blocks]
        xs = np.arange(len(blocks)) + (i - 1) * w
        ax.bar(xs, v, w, label=f"{name} p50")
        ax.scatter(xs, e, marker="_", color="k", s=200, label="p99" if i == 0 else None)
    ax.set_xticks(np.arange(len(blocks)), [f"{b} samples" for b in blocks])
    ax.set_yscale("log")
    ax.set_ylabel("time per update() call, us")
    ax.set_title("trigger decision time per block (CPU, numba)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Command line: ``--quick`` for a short run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    res = run(p.parse_args().quick)
    for k, r in res["results"].items():
        print(f"{k:<18} p50 {r['p50_us']:9.2f} us  p99 {r['p99_us']:9.2f} us  {r['ns_per_sample_p50']:8.1f} ns/sample")


if __name__ == "__main__":
    main()
