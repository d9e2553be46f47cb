"""Soak: the main job's closed loop for a long time, watching memory, latency drift and counters.

It runs what ``beamloop run`` runs (the simulated microscope in its own process, :func:`beamloop.edge.experiments.closed_loop.start_simulator`;
the service with the MoS2 pipeline, the vacancy-line policy and the trigger; :func:`beamloop.edge.experiments.vacancy_line.vacancy_line`)
over and over for ``duration_s`` (30 minutes by default, 40 s with ``--quick``). When the field of view has no
S2 column left to write, it asks the simulator for a fresh area (``sim_fresh_area``: the removed atoms come back),
so the beam keeps working. Every ``window_s`` it samples:

- resident memory (VmRSS of /proc) of the service process and of the simulator process, MiB; live Python
  objects of the service (:func:`gc.get_objects`); entries kept by the bridge log and the latency recorder
  (both keep everything of a run by design);
- latency per stage in that window (p50, p99, microseconds): find, classify, bridge (set_probe / blank round
  trips), trigger, end to end (frame leaves the detector -> probe parked);
- the machine's 1-minute load average (other work on the shared cores shows up as latency);
- counters: frames, dwells by how they ended, stream rejections, bridge timeouts and errors, heartbeats,
  and the controller's safety counters (watchdog trips, dwell-limit blanks, refused positions).

Summary figures: memory growth as a least-squares slope (MiB per hour) over the windows after the first
(warm-up) one, and the total change; latency drift per stage as the slope of the window p50 (microseconds
per hour) and the ratio of the last window's p50 to the first's.

Usage: ``python -m beamloop.bench.soak [--quick] [--duration S] [--window S]``; writes ``bench/results/soak.json``
(``soak_quick.json`` with ``--quick``) and a PNG beside it. ``run(quick)`` returns the same dict. The
machine has 2 cores shared with other work: figures taken while it is busy are noisy (the JSON records the
load average).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("find", "classify", "bridge", "trigger", "end_to_end")


def rss_mib(pid: int | str = "self") -> float:
    """Resident memory of a process (VmRSS in /proc/PID/status), MiB; NaN when it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def slope_per_hour(t_s, v) -> float:
    """Least-squares slope of ``v`` against ``t_s`` (seconds), per hour; NaN with fewer than 2 finite points."""
    t, v = np.asarray(t_s, float), np.asarray(v, float)
    ok = np.isfinite(t) & np.isfinite(v)
    if ok.sum() < 2 or np.ptp(t[ok]) == 0:
        return float("nan")
    return float(np.polyfit(t[ok], v[ok], 1)[0] * 3600.0)


def _window_latency(latency, marks: dict) -> dict:
    out = {}
    for stage in STAGES:
        v = latency.samples(stage)[marks.get(stage, 0):] / 1e3
        out[stage] = ({"n": int(len(v)), "p50_us": float(np.percentile(v, 50)), "p99_us": float(np.percentile(v, 99))}
                      if len(v) else {"n": 0, "p50_us": float("nan"), "p99_us": float("nan")})
        marks[stage] = len(latency.samples(stage))
    return out


def summarize(windows: list[dict]) -> dict:
    """Memory growth and latency drift from the window samples (see the module docstring)."""
    later = windows[1:] if len(windows) > 2 else windows
    t = [w["t_s"] for w in later]
    out = {"memory": {}, "latency_drift": {}}
    for key in ("rss_service_mib", "rss_simulator_mib", "python_objects"):
        vals = [w[key] for w in later]
        out["memory"][key] = {"first": windows[0][key], "last": windows[-1][key],
                              "change": windows[-1][key] - windows[0][key], "slope_per_hour": slope_per_hour(t, vals)}
    for stage in STAGES:
        p50 = [w["latency"][stage]["p50_us"] for w in later]
        first = next((x for x in p50 if np.isfinite(x)), float("nan"))
        last = next((x for x in reversed(p50) if np.isfinite(x)), float("nan"))
        out["latency_drift"][stage] = {"p50_first_us": first, "p50_last_us": last,
                                       "last_over_first": last / first if first and np.isfinite(first) else float("nan"),
                                       "p50_slope_us_per_hour": slope_per_hour(t, p50)}
    return out


def run(quick: bool = False, duration_s: float | None = None, window_s: float | None = None,
        out: Path | None = RESULTS, seed: int = 0, progress: bool = True) -> dict:
    """Run the soak and return its results (also written to ``out/soak[_quick].json`` unless ``out`` is None).

    Parameters
    ----------
    quick : bool
        40 s of loop in 4-s windows on 192x192 frames, instead of 30 minutes in 60-s windows on 256x256.
    duration_s, window_s : float, optional
        Override the loop's length and the sampling window, seconds.
    out : Path or None
        Results folder; None writes nothing.
    seed : int
        Simulator seed.
    progress : bool
        Print one line per window.

    Raises
    ------
    RuntimeError
        The simulator could not be started.
    """
    from beamloop.edge.control.client import BridgeClient
    from beamloop.edge.control.protocol import BridgeError
    from beamloop.edge.experiments.vacancy_line import ExperimentConfig, vacancy_line
    from beamloop.edge.app import ServiceConfig, build_service, warm_up
    from beamloop.edge.experiments.closed_loop import start_simulator
    from beamloop.edge.sim.frames import electrons_per_second
    from beamloop.streams.native.receiver import FrameReceiver

    duration_s = float(duration_s or (40.0 if quick else 1800.0))
    window_s = float(window_s or (4.0 if quick else 60.0))
    shape = (192, 192) if quick else (256, 256)
    pixel_size_A, dose, current_pA, targets = 0.15, 1e5, 50.0, 4
    dwell_us = dose * pixel_size_A**2 / electrons_per_second(current_pA) * 1e6
    cfg = ExperimentConfig(rounds=1, shape=shape, fov_nm=shape[1] * pixel_size_A / 10, dwell_us=dwell_us,
                           targets_per_frame=targets, max_dwell_s=2.0)
    proc, ends = start_simulator(["--frames", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                                  "--seed", str(seed), "--current-pA", str(current_pA)])
    reasons: Counter = Counter()
    windows: list[dict] = []
    totals = {"chunks": 0, "frames": 0, "targets": 0, "fresh_areas": 0, "errors": []}
    t_start = time.monotonic()
    try:
        with FrameReceiver(ends["frames"], ring=8) as rx, BridgeClient(ends["control"], timeout_ms=20000,
                                                                        retries=1) as bridge:
            service = build_service(rx, ServiceConfig("MoS2", targets_per_frame=targets), bridge)
            latency = service.latency
            warm_up(service.path, service.trigger, shape=shape, pixel_size_A=pixel_size_A, dtypes=(np.uint16,))
            marks: dict = {}
            t0 = time.monotonic()
            t_window = t0

            def sample() -> None:
                state = bridge.get_state()
                gc.collect()
                w = {"t_s": time.monotonic() - t0, "rss_service_mib": rss_mib(), "rss_simulator_mib": rss_mib(proc.pid),
                     "python_objects": len(gc.get_objects()), "bridge_log_entries": len(bridge.log),
                     "load_1min": os.getloadavg()[0],
                     "latency_samples": int(sum(len(latency.samples(s)) for s in latency.summary())),
                     "latency": _window_latency(latency, marks), "frames": totals["frames"],
                     "dwells": dict(reasons), "stream_rejected": rx.counters.rejected,
                     "bridge": asdict(bridge.counters), "safety": state.get("safety", {}).get("counters", {})}
                windows.append(w)
                if progress:
                    lat = w["latency"]["end_to_end"]["p50_us"]
                    print(f"soak {w['t_s']:7.1f} s: service {w['rss_service_mib']:.1f} MiB, simulator "
                          f"{w['rss_simulator_mib']:.1f} MiB, frames {w['frames']}, dwells {sum(reasons.values())}, "
                          f"end-to-end p50 {lat:.0f} us, load {w['load_1min']:.1f}, watchdog trips "
                          f"{w['safety'].get('watchdog_trips')}", flush=True)

            sample()  # the state after warm-up
            while time.monotonic() - t0 < duration_s:
                records = vacancy_line(service, cfg)
                totals["chunks"] += 1
                totals["frames"] += len(records)
                n_targets = sum(len(r.targets) for r in records)
                totals["targets"] += n_targets
                reasons.update(d.reason for r in records for d in r.dwells)
                del records
                if n_targets == 0:  # nothing left to write here: a fresh area of the crystal
                    try:
                        bridge.call("sim_fresh_area")
                        totals["fresh_areas"] += 1
                    except BridgeError as exc:
                        totals["errors"].append(str(exc))
                if time.monotonic() - t_window >= window_s:
                    sample()
                    t_window = time.monotonic()
            sample()
            counters = {"stream": rx.counters.as_dict(), "bridge": asdict(bridge.counters),
                        "service": {"frame_errors": service.stats.frame_errors,
                                    "protocol_errors": service.stats.protocol_errors,
                                    "heartbeat_errors": service.stats.heartbeat_errors,
                                    "errors": service.stats.errors[-10:]},
                        "safety": bridge.get_state().get("safety", {}).get("counters", {}),
                        "sim_events": {}}
            events = bridge.call("sim_events", since=0)["events"]
            counters["sim_events"] = dict(Counter(e.get("type", "?") for e in events))
            counters["sim_safety_events"] = [e for e in events if e.get("type") in ("safety", "dropped")][-20:]
            try:
                bridge.blank(True)
                bridge.call("shutdown")
            except BridgeError:
                pass
    finally:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {
        "mode": "quick" if quick else "full",
        "config": {"duration_s": duration_s, "window_s": window_s, "shape": list(shape), "pixel_size_A": pixel_size_A,
                   "dose_e_per_A2": dose, "current_pA": current_pA, "targets_per_frame": targets, "seed": seed},
        "wall_s": time.monotonic() - t_start,
        "load_average": list(os.getloadavg()),
        "totals": {**{k: v for k, v in totals.items() if k != "errors"}, "dwells": dict(reasons),
                   "errors": totals["errors"][-10:]},
        "counters": counters,
        "summary": summarize(windows),
        "windows": windows,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        name = "soak_quick" if quick else "soak"
        (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=float))
        plot(result, out / f"{name}.png")
    return result


def plot(result: dict, path: Path) -> None:
    """Memory and window p50 latencies against time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = result["windows"]
    t = np.array([x["t_s"] for x in w]) / 60
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    a.plot(t, [x["rss_service_mib"] for x in w], "o-", label="service")
    a.plot(t, [x["rss_simulator_mib"] for x in w], "s-", label="simulator")
    a.set_ylabel("resident memory, MiB")
    a.legend()
    for stage in STAGES:
        b.plot(t, [x["latency"][stage]["p50_us"] for x in w], ".-", label=stage)
    b.set_yscale("log")
    b.set_ylabel("p50 in window, us")
    b.set_xlabel("time, minutes")
    b.legend(fontsize=8, ncol=3)
    fig.suptitle(f"soak ({result['mode']}): {result['totals']['frames']} frames, "
                 f"{sum(result['totals']['dwells'].values())} dwells")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    """Command line: ``python -m beamloop.bench.soak [--quick] [--duration S] [--window S] [--out DIR]``."""
    p = argparse.ArgumentParser(prog="python -m beamloop.bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="40 s instead of 30 minutes")
    p.add_argument("--duration", type=float, default=None, help="loop length, seconds")
    p.add_argument("--window", type=float, default=None, help="sampling window, seconds")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    r = run(a.quick, a.duration, a.window, Path(a.out))
    s = r["summary"]
    print(json.dumps({"memory": s["memory"], "latency_drift": s["latency_drift"], "totals": r["totals"]}, indent=2,
                     default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
