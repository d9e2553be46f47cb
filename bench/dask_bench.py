"""Dask benchmark: the 4D reductions of an HDF5 (bitshuffle-LZ4) recording on Dask's schedulers.

    python -m beamloop.bench.dask_bench [--quick] [--out bench/results]      -> dask.json

A simulated 4D-STEM scan of MoS2 (64 x 64 probe positions on a 128 x 128 detector; 32 x 32 with ``--quick``)
is recorded with beamloop's recorder (Stream V2 -> :func:`beamloop.streams.dectris.recorder.record`, 1024
frames per data file), then reduced (virtual BF, ADF, centre of mass, summed pattern:
:func:`beamloop.edge.dask_runner.reduce_recording`):

- ``baseline_h5py``: one process, no Dask: read every frame through HDF5's bitshuffle filter
  (:func:`beamloop.streams.dectris.recorder.read_frames`) and reduce them in one call.
- ``baseline``: one process, no Dask: the same partitions as the Dask tasks, read (raw chunks, numba decoder:
  :func:`beamloop.streams.chunks.read_partition`) and reduced one after the other. The speed-ups are against it.
- ``threads`` (1 and 2 workers), ``processes`` (2), ``local`` (a ``distributed.LocalCluster`` of 2 worker
  processes; its start-up time is given apart): partitions of 256 frames read and reduced by the workers.

Every figure is the best of ``repeats`` runs (wall time); the speed-up is baseline / run. Every result is checked
equal to the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

DETECTOR = (128, 128)
RESULTS = Path(__file__).resolve().parent / "results"


def make_recording(folder: Path, scan: tuple[int, int], seed: int = 0) -> tuple[Path, np.ndarray]:
    """Simulate and record a 4D scan; returns the master file and the frames."""
    from beamloop.edge.frame.scanframe import ScanFrame
    from beamloop.edge.sim import lattice
    from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope
    from beamloop.streams.dectris.receiver import DetectorReceiver
    from beamloop.streams.dectris.recorder import make_recorder, record
    from beamloop.streams.dectris.stream_v2 import Stream2Sender

    rng = np.random.default_rng(seed)
    spec = lattice.mos2((-25, 25, -25, 25))
    cfg = FourDConfig(detector_shape=DETECTOR, disk_radius_px=DETECTOR[0] / 6, df_width_px=DETECTOR[0] / 4)
    sf = ScanFrame(0, scan, (scan[0] * 0.025, scan[1] * 0.025))
    frames = FourDMicroscope(spec, cfg).scan(sf, 4000.0, rng).reshape(-1, *DETECTOR)
    with Stream2Sender("tcp://127.0.0.1:0") as tx, \
            DetectorReceiver(tx.endpoint, protocol="stream2", decode=False, stack_size=64) as rx:
        time.sleep(0.1)

        def send():
            tx.start_series(DETECTOR, frames.dtype, len(frames))
            for f in frames:
                tx.send_frame(f)
            tx.end_series()

        th = threading.Thread(target=send)
        th.start()
        (master,) = record(rx, lambda s: make_recorder("hdf5", folder, "scan", frames_per_file=1024), idle_ms=500)
        th.join()
    return Path(master), frames


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(quick: bool = False, out: Path = RESULTS) -> dict:
    """Record, reduce on every scheduler, write ``dask.json`` in ``out``; returns the result."""
    from beamloop.edge.dask_runner import DaskRunner, reduce_recording
    from beamloop.edge.fanout_worker import FourDReducer
    from beamloop.streams.dectris.recorder import data_files, read_frames

    scan = (32, 32) if quick else (64, 64)
    repeats = 1 if quick else 2
    res: dict = {"detector": list(DETECTOR), "scan": list(scan), "cores": len(os.sched_getaffinity(0)),
                 "load_avg_start": list(os.getloadavg()), "partition_frames": 256, "quick": quick}
    with tempfile.TemporaryDirectory() as tmp:
        master, frames = make_recording(Path(tmp), scan)
        files = data_files(master)
        res["recording"] = {"frames": len(frames), "data_files": len(files),
                            "bytes_on_disk": int(sum(p.stat().st_size for p in files)),
                            "bytes_raw": int(frames.nbytes)}
        FourDReducer().warm_up()

        def baseline():
            f, _ = read_frames(master)
            return FourDReducer().reduce_frames(f)[:, 1].copy()

        from beamloop.edge.dask_runner import _reduce_partition
        from beamloop.streams.chunks import partitions

        def serial():  # the tasks' own work, one after the other in this process
            parts = partitions(master, 256)
            return np.concatenate([_reduce_partition(p)[1][:, 1] for p in parts])

        h5_s, ref = _best(baseline, repeats)
        base_s, got_serial = _best(serial, repeats)
        if not np.array_equal(got_serial, ref):
            raise RuntimeError("the serial partition reduction differs from the whole-recording one")
        res["baseline_h5py_s"] = h5_s
        res["baseline_s"] = base_s
        runs = []
        for sched, workers in (("threads", 1), ("threads", 2), ("processes", 2), ("local", 2)):
            t0 = time.perf_counter()
            runner = DaskRunner(sched, workers=workers)
            start_s = time.perf_counter() - t0
            try:
                reduce_recording(master, scan, runner=runner, frames_per_partition=256)  # warm the workers
                wall, got = _best(lambda r=runner: reduce_recording(master, scan, runner=r, frames_per_partition=256),
                                  repeats)
            finally:
                runner.close()
            same = bool(np.array_equal(got.images["adf"].reshape(-1), ref))
            runs.append({"scheduler": sched, "workers": workers, "wall_s": wall, "fps": len(frames) / wall,
                         "speedup": base_s / wall, "startup_s": start_s, "partitions": got.partitions,
                         "equal_to_baseline": same})
        res["runs"] = runs
    res["load_avg_end"] = list(os.getloadavg())
    out.mkdir(parents=True, exist_ok=True)
    (out / "dask.json").write_text(json.dumps(res, indent=1))
    return res


def bench_summary_md(r: dict) -> str:
    """Markdown table of a :func:`run` result."""
    rec = r["recording"]
    lines = [f"4D reductions of a {rec['frames']}-frame recording at {r['detector'][0]}x{r['detector'][1]} "
             f"({rec['bytes_on_disk'] / 2**20:.1f} MiB bslz4 of {rec['bytes_raw'] / 2**20:.0f} MiB) on {r['cores']} "
             f"cores; baseline (one process, no Dask, the tasks in a loop) {r['baseline_s']:.2f} s "
             f"(reading through HDF5's filter instead: {r['baseline_h5py_s']:.2f} s).", "",
             "| scheduler | workers | wall s | frames/s | speed-up | start-up s |", "|---|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['scheduler']} | {x['workers']} | {x['wall_s']:.2f} | {x['fps']:.0f} | "
                     f"{x['speedup']:.2f} | {x['startup_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--quick`` (a 32 x 32 scan, one repeat), ``--out``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    print(bench_summary_md(run(a.quick, a.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
