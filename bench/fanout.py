"""Fan-out benchmark: 4D-STEM reductions at a 128 x 128 detector spread over 1, 2 and 4 worker processes.

    python -m beamloop.bench.fanout [--quick] [--out bench/results]      -> fanout.json

What it measures (all on this machine, one run):

- ``ceiling``: the frames per second one worker can reduce (:class:`beamloop.edge.fanout_worker.FourDReducer`:
  virtual BF, ADF, centre of mass, summed pattern) on decoded stacks in memory, and decode + reduce from the
  bitshuffle-LZ4 blobs (:func:`beamloop.streams.dectris.codecs.decode_stack`): the per-worker limit without
  the network.
- ``sender``: what one SIMPLON v1 sender process (pre-encoded blobs, :meth:`SimplonSender.send_blob`) pushes
  into one PULL socket that only counts messages: the stream's own limit here.
- ``merge``: what the merger (:class:`beamloop.streams.merge.MergeState`) takes, frames per second, from parts
  of 64 frames.
- ``workers``: the whole chain (sender process -> N worker processes each PULLing its share -> merger here),
  frames per second from the first frame sent to the last scan frame closed, for N = 1, 2, 4; every scan
  frame is checked complete.
- ``model``: per-frame CPU costs from the isolated figures, c_w (worker: receive, decode, reduce; from
  the 1-worker run), c_s (sender), c_m (merger), give the throughput of N workers on C cores as
  ``min(N / c_w, 1 / c_s, 1 / c_m, C / (c_w + c_s + c_m))`` (each process bound by its own cost, all of them by
  the cores they share; Amdahl's law with the sender and merger as the serial part: Amdahl, AFIPS 1967). It is
  checked against the measured N = 1, 2, 4 and extrapolated to larger machines and to N machines, where the
  network link (bytes per compressed frame) is the other bound.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

DETECTOR = (128, 128)
SCAN = (64, 64)
ELECTRONS = 4000.0
RESULTS = Path(__file__).resolve().parent / "results"


def _patterns(n: int, seed: int = 0) -> np.ndarray:
    """``n`` simulated MoS2 diffraction patterns at 128 x 128 (uint16), from the 4D mode of the simulator."""
    from beamloop.edge.sim import lattice
    from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope

    rng = np.random.default_rng(seed)
    spec = lattice.mos2((-15, 15, -15, 15))
    cfg = FourDConfig(detector_shape=DETECTOR, disk_radius_px=DETECTOR[0] / 6, df_width_px=DETECTOR[0] / 4)
    xy = rng.uniform(-5, 5, (n, 2))
    return FourDMicroscope(spec, cfg).patterns(xy[:, 0], xy[:, 1], ELECTRONS, rng)


def _blobs(frames: np.ndarray) -> list[bytes]:
    from beamloop.streams.dectris import codecs

    codec = codecs.Codec(codecs.BSLZ4, frames.dtype.itemsize)
    return [bytes(codecs.encode(f, codec)) for f in frames]


def _rate(fn, n_items: int, min_s: float) -> float:
    """Items per second of ``fn()`` (which handles ``n_items``), repeated for at least ``min_s``."""
    fn()
    t0, reps = time.perf_counter(), 0
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_s:
            return reps * n_items / dt


def ceiling(frames: np.ndarray, blobs: list[bytes], min_s: float) -> dict:
    """One worker's reduce and decode + reduce rates on 64-frame stacks, frames/s."""
    from beamloop.edge.fanout_worker import FourDReducer
    from beamloop.streams.dectris import codecs

    red = FourDReducer()
    stack = np.ascontiguousarray(frames[:64])
    reduce_fps = _rate(lambda: red.reduce_frames(stack), 64, min_s)
    cap = max(len(b) for b in blobs[:64])
    arena = np.zeros(64 * cap, np.uint8)
    for k, b in enumerate(blobs[:64]):
        arena[k * cap:k * cap + len(b)] = np.frombuffer(b, np.uint8)
    offs = np.arange(64, dtype=np.int64) * cap
    lens = np.array([len(b) for b in blobs[:64]], np.int64)
    out = np.empty((64, *DETECTOR), np.uint16)
    status = np.zeros(64, np.int8)
    codec = codecs.Codec(codecs.BSLZ4, 2)

    def decode_reduce():
        codecs.decode_stack(arena, offs, lens, codec, out, status)
        red.reduce_frames(out)

    return {"reduce_fps": reduce_fps, "decode_reduce_fps": _rate(decode_reduce, 64, min_s),
            "blob_bytes_mean": float(lens.mean()), "frame_bytes": int(np.prod(DETECTOR) * 2)}


def _sender(blobs: list[bytes], n: int, series: int, q, go) -> None:
    """Sender process body: bind, report the endpoint, wait for ``go``, send ``n`` frames, report the time."""
    from beamloop.streams.dectris.simplon import SimplonSender

    with SimplonSender("tcp://127.0.0.1:0", sndhwm=10_000) as tx:
        q.put(tx.endpoint)
        go.wait()
        t0 = time.perf_counter()
        tx.start_series(DETECTOR, np.uint16, n, series=series)
        for i in range(n):
            tx.send_blob(blobs[i % len(blobs)])
        tx.end_series()
        q.put(time.perf_counter() - t0)
        time.sleep(1.0)  # let the queues drain before the socket closes


def sender_rate(blobs: list[bytes], n: int) -> float:
    """Frames per second one sender process pushes into a PULL socket that only counts them."""
    import zmq

    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_sender, args=(blobs, n, 1, q, go), daemon=True)
    p.start()
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.connect(q.get(timeout=60))
    time.sleep(0.3)
    go.set()
    got = 0
    t0 = None
    while got < n + 1:  # the header, then the frames (the end is not waited for)
        parts = sock.recv_multipart(copy=False)
        if t0 is None:
            t0 = time.perf_counter()
        got += 1 if len(parts) >= 3 or got == 0 else 0
    dt = time.perf_counter() - t0
    sock.close(linger=0)
    p.join(10)
    return n / dt


def merge_rate(min_s: float) -> float:
    """Frames per second the merger places, from parts of 64 frames of 5 results each."""
    from beamloop.streams.fanout import WIRE_VERSION
    from beamloop.streams.merge import MergeState

    st = MergeState(SCAN, timeout_s=1e9)
    npos = SCAN[0] * SCAN[1]
    vals = np.random.default_rng(0).random((64, 5)).tobytes()
    sums = np.zeros(DETECTOR).tobytes()
    names = ["bf", "adf", "com_sum", "com_row", "com_col"]
    state = {"next": 0}

    def run():
        for _ in range(npos // 64):
            a = state["next"]
            ids = np.arange(a, a + 64, dtype="<i8")
            state["next"] = a + 64
            st.handle({"v": WIRE_VERSION, "kind": "part", "worker": "w", "series_id": 1, "n": 64, "names": names,
                       "sums": {"sum_pattern": list(DETECTOR)}}, [ids.tobytes(), vals, sums])
        st.check()
        st.pop_closed()

    return _rate(run, npos, min_s)


def fanout_run(n_workers: int, blobs: list[bytes], nframes: int, series: int) -> dict:
    """The whole chain with ``n_workers`` worker processes; frames/s and the merger's counters."""
    from beamloop.edge.fanout_worker import spawn_workers
    from beamloop.streams.dectris.series import DetectorSeries
    from beamloop.streams.merge import FanoutMerger

    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    sender = ctx.Process(target=_sender, args=(blobs, nframes, series, q, go), daemon=True)
    sender.start()
    endpoint = q.get(timeout=60)
    nscan = nframes // (SCAN[0] * SCAN[1])
    with FanoutMerger(SCAN, timeout_s=10.0) as m:
        procs = spawn_workers(n_workers, endpoint, "simplon1", m.results_endpoint, m.control_endpoint,
                              stack_size=64, heartbeat_s=0.1)
        try:
            s = DetectorSeries("simplon1", series, f"simplon1-{series}", ("data",), DETECTOR, np.dtype("<u2"), nframes)
            m.arm(s)
            if not m.wait_workers(n_workers, 180.0, series_id=series):
                raise RuntimeError(f"{n_workers} workers did not come up within 180 s")
            time.sleep(0.5)  # every worker's PULL connected to the sender
            go.set()
            t0 = time.perf_counter()
            closed = []
            while len(closed) < nscan and time.perf_counter() - t0 < 300:
                closed += m.poll(50)
            wall = time.perf_counter() - t0
            send_s = q.get(timeout=60)
            m.stop_workers()
            for _ in range(20):
                m.poll(50)
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.terminate()
            sender.join(10)
        c = m.state.counters
        shares = {w.name: w.frames for w in m.state.workers.values()}
    return {"workers": n_workers, "frames": nframes, "wall_s": wall, "fps": nframes / wall, "sender_s": send_s,
            "scan_frames_closed": len(closed), "complete": sum(r.complete for r in closed),
            "missing": int(c.missing), "deaths": int(c.deaths), "frames_per_worker": shares}


def model(c_w: float, c_s: float, c_m: float, n: int, cores: float) -> float:
    """Throughput (frames/s) of ``n`` workers on ``cores`` cores with per-frame costs c_w, c_s, c_m (seconds)."""
    return min(n / c_w, 1.0 / c_s, 1.0 / c_m, cores / (c_w + c_s + c_m))


DETECTOR_RATES_HZ = {"EMPAD-G2": 10_000, "NCEM 4D Camera": 87_000, "ARINA (binned)": 120_000}
"""Frame rates to plan for (shared/notes/detector-protocols.md, "Detector rates to plan for")."""


def scaling_model(res: dict) -> dict:
    """The scaling model of a :func:`run` result (its measured parts): per-frame costs, the throughput predicted
    here and on larger machines, and the workers a detector's frame rate needs."""
    import math

    cores = res["cores"]
    fps = {int(r["workers"]): r["fps"] for r in res["runs"]}
    c_s, c_m = 1.0 / res["sender_fps"], 1.0 / res["merge_fps"]
    c_w = 1.0 / fps[1]  # the 1-worker chain is bound by its worker (it runs below the sender's rate)
    c_eff = min(float(cores), fps[2] * (c_w + c_s + c_m))  # cores the chain got, fitted on the 2-worker run
    blob = res["ceiling"]["blob_bytes_mean"]
    link_10g = 10e9 / 8 / blob

    def detector_bound(n: int, c: float) -> float:  # a detector's sender costs the workers' machines nothing
        return min(n / c_w, c / (c_w + c_m), link_10g)

    return {
        "formula": "fps(N, C) = min(N / c_w, 1 / c_s, 1 / c_m, C / (c_w + c_s + c_m)); with a detector as the "
                   "sender (its cost on its own hardware): min(N / c_w, C / (c_w + c_m), link / frame bytes)",
        "c_w_us": c_w * 1e6, "c_s_us": c_s * 1e6, "c_m_us": c_m * 1e6, "cores_effective": c_eff,
        "calibration": "c_w from the 1-worker run, c_s from the sender alone, c_m from the merger alone, C fitted "
                       "on the 2-worker run; the 4-worker run checks it (it falls below: 6 processes on 2 cores)",
        "predicted_here": {str(n): model(c_w, c_s, c_m, n, c_eff) for n in (1, 2, 4)},
        "measured_here": {str(n): v for n, v in fps.items()},
        "per_worker_ceiling_fps": {"in_memory_reduce": res["ceiling"]["reduce_fps"],
                                   "decode_and_reduce": res["ceiling"]["decode_reduce_fps"],
                                   "whole_worker_1_chain": fps[1]},
        "extrapolated_python_sender": {f"{n} workers on {c} dedicated cores": model(c_w, c_s, c_m, n, c)
                                       for c in (16, 64) for n in (4, 8, 16, 32) if n < c},
        "extrapolated_detector_sender": {f"{n} workers on {c} dedicated cores": detector_bound(n, c)
                                         for c in (16, 64) for n in (4, 8, 16, 32) if n < c},
        "workers_needed": {f"{name} at {hz} Hz": math.ceil(hz * c_w) for name, hz in DETECTOR_RATES_HZ.items()},
        "network_fps": {f"{g} GbE": g * 1e9 / 8 / blob for g in (10, 25, 100)},
        "note": "N machines: each worker node adds 1 / c_w until the detector's rate or the network link (bytes "
                "per compressed frame; 10 GbE per worker node multiplies with the nodes) binds; the merger takes "
                "64-frame parts and is far from binding. Here the Python sender (1 / c_s) binds from 2 workers on, "
                "and on this 2-core machine, shared with other users, the sender, the workers and the merger "
                "compete for the cores (the C term): more workers than cores only add contention.",
    }


def run(quick: bool = False, out: Path = RESULTS) -> dict:
    """Run every part and write ``fanout.json`` in ``out``; returns the result."""
    nframes = SCAN[0] * SCAN[1] * (1 if quick else 2)
    min_s = 0.5 if quick else 1.5
    frames = _patterns(256)
    blobs = _blobs(frames)
    res: dict = {"detector": list(DETECTOR), "scan": list(SCAN), "electrons_per_pattern": ELECTRONS,
                 "cores": len(os.sched_getaffinity(0)), "load_avg_start": list(os.getloadavg()),
                 "protocol": "simplon1 (bslz4 blobs)", "quick": quick}
    res["ceiling"] = ceiling(frames, blobs, min_s)
    res["sender_fps"] = sender_rate(blobs, nframes)
    res["merge_fps"] = merge_rate(min_s)
    res["runs"] = [fanout_run(n, blobs, nframes, series=10 + n) for n in (1, 2, 4)]
    res["model"] = scaling_model(res)
    res["load_avg_end"] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout.json").write_text(json.dumps(res, indent=1))
    return res


def bench_summary_md(r: dict) -> str:
    """Markdown table of a :func:`run` result."""
    lines = [f"Fan-out at a {r['detector'][0]}x{r['detector'][1]} detector ({r['cores']} cores): one worker "
             f"reduces {r['ceiling']['reduce_fps']:.0f} frames/s in memory, {r['ceiling']['decode_reduce_fps']:.0f} "
             f"with bslz4 decoding; the sender pushes {r['sender_fps']:.0f}/s, the merger takes "
             f"{r['merge_fps']:.0f}/s.",
             "", "| workers | frames/s | model | complete scan frames |", "|---|---|---|---|"]
    for run_ in r["runs"]:
        n = str(run_["workers"])
        lines.append(f"| {n} | {run_['fps']:.0f} | {r['model']['predicted_here'][n]:.0f} | "
                     f"{run_['complete']}/{run_['scan_frames_closed']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--quick`` (one scan frame per run, shorter timings), ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    r = run(a.quick, a.out)
    print(bench_summary_md(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
