"""Benchmark: receiving a DECTRIS SIMPLON v1 bitshuffle-LZ4 stream, beamloop against LiberTEM.

One run on one machine, the same stream for every receiver: LiberTEM's native simulator
(``libertem_dectris.DectrisSim``, Rust) replays a dump of simulated 4D-STEM diffraction patterns
(:mod:`beamloop.edge.sim.fourd`; 256 distinct frames cycled) as fast as the receiver takes them, from its own
process. Receivers, each in turn (order rotated between trials):

- ``pyzmq_raw``: a plain pyzmq PULL loop that receives every message and does nothing (the ceiling of
  receiving in Python on this machine);
- ``beamloop``: :class:`beamloop.streams.dectris.receiver.DetectorReceiver` (receive, validate, decode into frame
  stacks);
- ``beamloop_adf``: the same plus a virtual ADF detector on every frame
  (:func:`beamloop.edge.analysis.live4d.virtual_stack`);
- ``libertem``: libertem-dectris' ``DectrisConnection`` + ``CamClient.decode_range_into_buffer``.

Frames per second are counted from the first to the last image at the receiver; CPU time per frame is the
receiver process's (its ZeroMQ I/O thread included). The machine has 2 cores shared by the sender, the
receiver and whatever else runs: results are noisy (the JSON records the load average).

Usage: ``python -m beamloop.bench.streams_receive [--quick] [--out DIR]``; writes ``streams_receive.json`` and
``streams_receive.png`` in ``DIR`` (default ``bench/results``; ``--quick``: ``streams_receive_quick.*``, so that a
quick run, e.g. the bench suite's, never overwrites the full figures). ``run(quick, out)`` returns the same dict.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "streams_receive"
RECEIVERS = ("pyzmq_raw", "beamloop", "beamloop_adf", "libertem")


def run_dectrissim(dump: str, q, go) -> None:
    """Child process: DectrisSim replaying ``dump`` on a free port (reported through ``q``) once ``go`` is set."""
    import libertem_dectris

    sim = libertem_dectris.DectrisSim("tcp://127.0.0.1", dump, None, True)
    q.put(sim.get_uri())
    if not go.wait(60):
        return
    sim.send_headers()
    sim.send_frames()
    sim.send_footer()
    time.sleep(1.0)


def make_patterns(det: int, count: int = 256, seed: int = 0) -> np.ndarray:
    """``count`` simulated MoS2 4D-STEM patterns (det x det, uint16) at random probe positions."""
    from beamloop.edge.sim import lattice
    from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope

    rng = np.random.default_rng(seed)
    spec = lattice.mos2((-10, 10, -10, 10))
    cfg = FourDConfig(detector_shape=(det, det), disk_radius_px=det / 6, df_width_px=det / 4)
    pos = rng.uniform(-5, 5, (count, 2))
    return FourDMicroscope(spec, cfg).patterns(pos[:, 0], pos[:, 1], 20000.0, rng)


def _recv_raw(uri: str, n: int) -> tuple[float, float]:
    import zmq

    s = zmq.Context.instance().socket(zmq.PULL)
    s.connect(uri)
    got, t0 = 0, None
    try:
        while got < n:
            parts = s.recv_multipart(copy=False)
            if len(parts) == 4:
                if t0 is None:
                    t0, c0 = time.perf_counter(), time.process_time()
                got += 1
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        s.close(linger=0)


def _recv_beamloop(uri: str, n: int, adf: bool) -> tuple[float, float]:
    from beamloop.edge.analysis import live4d
    from beamloop.streams.dectris.receiver import DetectorReceiver
    from beamloop.streams.dectris.series import FrameStack, SeriesStart

    got, t0, masks, total = 0, None, None, 0.0
    with DetectorReceiver(uri, stack_size=64) as rx:
        while got < n:
            ev = rx.recv(20_000)
            if ev is None:
                raise RuntimeError(f"beamloop: timed out after {got} of {n} frames")
            if isinstance(ev, SeriesStart) and adf:
                det = ev.series.shape
                masks = live4d.SparseMasks.from_dense({"adf": live4d.annulus_mask(det, det[0] / 5, det[0] / 2)})
                live4d.virtual_stack(np.zeros((1, *det), ev.series.dtype), masks)  # compile before the clock
            elif isinstance(ev, FrameStack):
                if t0 is None:
                    t0, c0 = time.perf_counter(), time.process_time()
                if masks is not None:
                    total += float(live4d.virtual_stack(ev.frames, masks)[:, 0].sum())
                got += len(ev)
        return time.perf_counter() - t0, time.process_time() - c0


def _recv_libertem(uri: str, n: int, det: int, workdir: str) -> tuple[float, float]:
    import libertem_dectris as ld

    conn = ld.DectrisConnection(uri=uri, frame_stack_size=64, handle_path=os.path.join(workdir, "lt.sock"),
                                num_slots=4000, bytes_per_frame=det * det * 2, huge=False)
    cam = ld.CamClient(conn.get_socket_path())
    buf = np.zeros((64, det, det), np.uint16)
    try:
        conn.start_passive(20_000)
        if conn.wait_for_arm(20.0) is None:
            raise RuntimeError("libertem: never armed")
        got, t0 = 0, None
        while got < n:
            stack = conn.get_next_stack(64)
            if stack is None:
                raise RuntimeError(f"libertem: stream ended after {got} of {n} frames")
            if t0 is None:
                t0, c0 = time.perf_counter(), time.process_time()
            k = len(stack)
            cam.decode_range_into_buffer(stack, buf[:k], 0, k)
            cam.done(stack)
            got += k
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        conn.close()
        cam.close()


def _one(receiver: str, dump: str, n: int, det: int, workdir: str) -> dict:
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=run_dectrissim, args=(dump, q, go), daemon=True)
    proc.start()
    uri = q.get(timeout=60)
    try:
        if receiver == "libertem":
            threading.Timer(0.5, go.set).start()  # LiberTEM connects inside its call
            wall, cpu = _recv_libertem(uri, n, det, workdir)
        else:
            threading.Timer(0.3, go.set).start()
            if receiver == "pyzmq_raw":
                wall, cpu = _recv_raw(uri, n)
            else:
                wall, cpu = _recv_beamloop(uri, n, adf=receiver == "beamloop_adf")
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    # the first frame starts the clock: n - 1 intervals
    return {"frames_per_s": (n - 1) / wall, "cpu_us_per_frame": 1e6 * cpu / n}


def run(quick: bool = False, out_dir: Path = RESULTS) -> dict:
    """Run the benchmark; returns (and writes into ``out_dir``) the results dict. ``quick``: fewer frames, one
    trial."""
    from beamloop.streams.dectris.simplon import series_messages, write_dump

    sizes = {96: 20_000 if quick else 100_000, 256: 4_000 if quick else 20_000}
    trials = 1 if quick else 3
    out = {"name": NAME, "quick": quick, "machine": {"nproc": os.cpu_count(), "load_before": os.getloadavg()},
           "note": "2 cores shared by sender (DectrisSim, own process), receiver and other work; noisy",
           "stream": "SIMPLON v1, bs16-lz4<, uint16, simulated MoS2 4D-STEM patterns (beamloop.edge.sim.fourd)",
           "sizes": {}}
    with tempfile.TemporaryDirectory() as work:
        for det, n in sizes.items():
            pats = make_patterns(det)
            dump = os.path.join(work, f"dump_{det}.bin")
            write_dump(dump, series_messages(pats[np.arange(n) % len(pats)], series=1))
            blob_mean = os.path.getsize(dump) / n
            runs = {r: [] for r in RECEIVERS}
            for t in range(trials):
                order = RECEIVERS[t % len(RECEIVERS):] + RECEIVERS[:t % len(RECEIVERS)]
                for r in order:
                    runs[r].append(_one(r, dump, n, det, work))
                    print(f"{det}x{det} trial {t} {r}: {runs[r][-1]['frames_per_s']:.0f} frames/s", file=sys.stderr)
            med = {r: float(np.median([x["frames_per_s"] for x in v])) for r, v in runs.items()}
            cpu = {r: float(np.median([x["cpu_us_per_frame"] for x in v])) for r, v in runs.items()}
            out["sizes"][f"{det}x{det}"] = {
                "frames": n, "bytes_per_frame_on_wire": blob_mean,
                "frames_per_s_median": med, "cpu_us_per_frame_median": cpu, "runs": runs,
                "ratio_beamloop_to_libertem": med["beamloop"] / med["libertem"],
                "ratio_beamloop_adf_to_libertem": med["beamloop_adf"] / med["libertem"],
                "ratio_beamloop_to_pyzmq_raw": med["beamloop"] / med["pyzmq_raw"],
                # CPU time per frame is less disturbed by other work than the rate: LiberTEM's over ours
                "cpu_ratio_libertem_to_beamloop": cpu["libertem"] / cpu["beamloop"],
                "cpu_ratio_libertem_to_beamloop_adf": cpu["libertem"] / cpu["beamloop_adf"],
            }
    out["machine"]["load_after"] = os.getloadavg()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{NAME}_quick" if quick else NAME
    (out_dir / f"{stem}.json").write_text(json.dumps(out, indent=1))
    _plot(out, out_dir / f"{stem}.png")
    return out


def _plot(out: dict, path: Path) -> None:
    """Bar chart of the median rates per frame size."""
    from matplotlib.figure import Figure  # no pyplot: the caller's matplotlib backend stays as it is

    fig = Figure(figsize=(5 * len(out["sizes"]), 3.6))
    axes = fig.subplots(1, len(out["sizes"]))
    for ax, (size, r) in zip(np.atleast_1d(axes), out["sizes"].items()):
        med = r["frames_per_s_median"]
        ax.bar(list(med), [v / 1e3 for v in med.values()], color=["grey", "tab:blue", "tab:cyan", "tab:orange"])
        ax.set_title(f"{size} bs16-lz4 (beamloop/LiberTEM {r['ratio_beamloop_to_libertem']:.2f})")
        ax.set_ylabel("thousand frames / s")
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle("receive + decode, DectrisSim sender, 2 shared cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    argv = sys.argv[1:]
    res = run(quick="--quick" in argv, out_dir=Path(argv[argv.index("--out") + 1]) if "--out" in argv else RESULTS)
    for size, r in res["sizes"].items():
        print(size, {k: round(v) for k, v in r["frames_per_s_median"].items()},
              f"beamloop/libertem {r['ratio_beamloop_to_libertem']:.2f}",
              f"(+ADF {r['ratio_beamloop_adf_to_libertem']:.2f}); CPU/frame LiberTEM/beamloop "
              f"{r['cpu_ratio_libertem_to_beamloop']:.2f}")
