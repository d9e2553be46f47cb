"""Recordings and image folders on a cluster: ``beamloop find`` and the 4D reductions on Dask.

:class:`DaskRunner` maps a function over items on one of Dask's schedulers (Dask documentation,
"Scheduling": the single-machine ``threads`` and ``processes`` schedulers, and ``distributed``):

``threads``
    Dask's thread pool in this process (numba kernels release the GIL: ``nogil=True``).
``processes``
    Dask's multiprocessing scheduler on one pool of spawned processes kept for the runner's life.
``local``
    A ``distributed.LocalCluster`` of worker processes on this machine (one thread each).
``tcp://HOST:PORT``
    The scheduler of a running Dask cluster (``dask scheduler`` / ``dask worker``); every worker must be
    able to read the input files at the same paths (a shared file system) and import beamloop.

:func:`reduce_recording` splits a recording into partitions (:mod:`beamloop.streams.chunks`): each worker
reads its frames of the HDF5 (bitshuffle-LZ4) or Zarr data itself and reduces them
(:class:`beamloop.edge.fanout_worker.FourDReducer`: virtual BF, ADF, centre of mass, summed pattern); the
partial results are merged here, per-frame results placed at their probe positions and the summed pattern
added (LiberTEM's UDF ``merge`` for ``nav`` and ``sig`` buffers, ``libertem/udf/base.py``).
:func:`find_files_dask` runs :func:`beamloop.edge.batch_find.find_files` one file per task.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from beamloop.edge.fanout_worker import DEFAULT_GEOMETRY, DetectorGeometry, FourDReducer

LOCAL_SCHEDULERS = ("local", "threads", "processes")
"""Schedulers on this machine; any ``tcp://HOST:PORT`` names a running Dask scheduler."""


def check_scheduler(spec: str) -> str:
    """``spec`` when it names a scheduler (:data:`LOCAL_SCHEDULERS` or ``tcp://HOST:PORT``); else ``ValueError``."""
    if spec in LOCAL_SCHEDULERS:
        return spec
    if isinstance(spec, str) and spec.startswith("tcp://") and spec.rpartition(":")[2].isdigit():
        return spec
    raise ValueError(f"scheduler {spec!r}: expected one of {', '.join(LOCAL_SCHEDULERS)} or tcp://HOST:PORT")


class DaskRunner:
    """Map functions over items on a Dask scheduler, results in the order of the items.

    Parameters
    ----------
    scheduler : str
        ``local``, ``threads``, ``processes`` or ``tcp://HOST:PORT`` (module docstring).
    workers : int, optional
        Workers (threads, processes) for the schedulers on this machine; default the CPU count (Dask's).
    progress : bool
        Show a progress bar on stderr (tqdm) while tasks complete.

    Raises
    ------
    ValueError
        Unknown scheduler, ``workers`` < 1.
    OSError
        A ``tcp://`` scheduler cannot be reached (``distributed``'s own error).
    """

    def __init__(self, scheduler: str = "threads", *, workers: int | None = None, progress: bool = False) -> None:
        self.scheduler = check_scheduler(scheduler)
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = None if workers is None else int(workers)
        self.progress = bool(progress)
        self.client = None
        self._cluster = None
        self._pool = None
        if self.scheduler == "processes":  # one pool for the runner's life: its workers import and compile once
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(max_workers=self.workers or default_workers(),
                                             mp_context=mp.get_context("spawn"))
        elif self.scheduler == "local":
            from distributed import Client, LocalCluster

            self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None)
            self.client = Client(self._cluster)
        elif self.scheduler.startswith("tcp://"):
            from distributed import Client

            self.client = Client(self.scheduler, timeout="10s")

    def map(self, fn: Callable, items: Sequence, desc: str = "tasks") -> list:
        """``[fn(x) for x in items]`` computed on the scheduler (``fn`` must be picklable: a module-level
        function, or a ``functools.partial`` of one). A task's exception is raised here."""
        items = list(items)
        if not items:
            return []
        if self.client is not None:
            futures = self.client.map(fn, items, pure=False)
            if self.progress:
                from distributed import as_completed
                from tqdm import tqdm

                for _ in tqdm(as_completed(futures), total=len(futures), desc=desc, file=sys.stderr):
                    pass
            return self.client.gather(futures)
        import dask

        tasks = [dask.delayed(fn, pure=False)(x) for x in items]
        kw: dict = {"scheduler": self.scheduler}
        if self._pool is not None:
            kw["pool"] = self._pool
        elif self.workers is not None:
            kw["num_workers"] = self.workers
        if self.progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=sys.stderr):
                return list(dask.compute(*tasks, **kw))
        return list(dask.compute(*tasks, **kw))

    def close(self) -> None:
        """Close the client, the local cluster and the process pool (those this runner started)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    def __enter__(self) -> DaskRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class FourDResult:
    """4D reductions of a recording, merged.

    Attributes
    ----------
    images : dict name -> ndarray (scan_frames, rows, cols), float64
        ``bf``, ``adf``, ``com_sum``, ``com_row``, ``com_col`` per scan frame; NaN at probe positions whose
        frame is not in the recording.
    sum_pattern : ndarray (det_rows, det_cols), float64
        Sum of every frame reduced, counts.
    frames : int
        Frames reduced.
    partitions : int
        Tasks run.
    wall_s : float
        Wall time of the reduction (reading, reducing, merging), seconds.
    """

    images: dict = field(default_factory=dict)
    sum_pattern: np.ndarray | None = None
    frames: int = 0
    partitions: int = 0
    wall_s: float = 0.0

    def write(self, path: str | Path) -> Path:
        """Write ``images`` and ``sum_pattern`` to ``path`` (``.npz``); returns it. Raises ``OSError``."""
        path = Path(path)
        arrays: dict[str, Any] = dict(self.images)
        if self.sum_pattern is not None:
            arrays["sum_pattern"] = self.sum_pattern
        np.savez(path, **arrays)
        return path


def _reduce_partition(part, geometry: DetectorGeometry = DEFAULT_GEOMETRY) -> tuple:
    """One task: read a partition and reduce it; returns ``(ids, values (n, K), names, summed pattern)``."""
    from beamloop.streams.chunks import read_partition

    frames, ids = read_partition(part)
    red = FourDReducer(geometry)
    values = red.reduce_frames(np.ascontiguousarray(frames)).copy()
    names = red.result_names
    return ids, values, names, red.sums()["sum_pattern"]


def reduce_recording(recording: str | Path, scan_shape: tuple[int, int], *, runner: DaskRunner | None = None,
                     geometry: DetectorGeometry = DEFAULT_GEOMETRY, frames_per_partition: int = 256,
                     channel: str | None = None) -> FourDResult:
    """Virtual BF / ADF, centre of mass and the summed pattern of every frame of a recording, on Dask.

    Parameters
    ----------
    recording : path
        ``<prefix>_master.h5`` (bitshuffle-LZ4 data files) or ``<prefix>.zarr``.
    scan_shape : (rows, cols)
        Probe positions per scan frame; frame id ``i`` is position ``i % (rows * cols)`` of scan frame
        ``i // (rows * cols)`` (raster).
    runner : DaskRunner, optional
        Default: Dask's threads on this machine.
    geometry : DetectorGeometry
    frames_per_partition : int
        Frames per task.
    channel : str, optional
        Default the first channel.

    Returns
    -------
    FourDResult

    Raises
    ------
    ValueError
        Non-positive scan shape or partition size.
    FileNotFoundError, KeyError, OSError
        As :func:`beamloop.streams.chunks.partitions` and :func:`beamloop.streams.chunks.read_partition`.
    """
    from functools import partial

    from beamloop.streams.chunks import partitions

    rows, cols = (int(v) for v in scan_shape)
    if rows <= 0 or cols <= 0:
        raise ValueError(f"scan shape must be positive, got {scan_shape}")
    t0 = time.perf_counter()
    parts = partitions(recording, frames_per_partition, channel)
    own = runner is None
    runner = runner or DaskRunner("threads")
    try:
        got = runner.map(partial(_reduce_partition, geometry=geometry), parts, desc="partitions")
    finally:
        if own:
            runner.close()
    npos = rows * cols
    res = FourDResult(partitions=len(parts))
    if not got:
        res.wall_s = time.perf_counter() - t0
        return res
    names = got[0][2]
    top = max(int(g[0].max()) for g in got if len(g[0]))
    nframes = top // npos + 1
    flat = np.full((len(names), nframes * npos), np.nan)
    total = np.zeros_like(got[0][3])
    for ids, values, _, sp in got:
        flat[:, ids] = values.T
        total += sp
        res.frames += len(ids)
    res.images = {n: flat[k].reshape(nframes, rows, cols) for k, n in enumerate(names)}
    res.sum_pattern = total
    res.wall_s = time.perf_counter() - t0
    return res


def _find_one(job: tuple, **kw) -> list:
    """One task of :func:`find_files_dask`: ``job = (path, stem)``."""
    from beamloop.edge.batch_find import find_files

    path, stem = job
    return find_files([path], kw.pop("out"), stems=[stem], **kw)


def find_files_dask(paths, out: str | Path, *, runner: DaskRunner, **kw) -> list:
    """:func:`beamloop.edge.batch_find.find_files` with one task per input file on ``runner``; the outputs are
    named as :func:`beamloop.edge.batch_find.output_stems` names them for the whole list, and written by the
    workers into ``out`` (which they must be able to reach).

    Returns
    -------
    list of FindOutcome, in the order of ``paths`` (a stack gives one per frame).

    Raises
    ------
    ValueError
        As :func:`beamloop.edge.batch_find.find_files` (checked here before anything is submitted).
    """
    from functools import partial

    from beamloop.edge.batch_find import check_find_options, output_stems

    paths = [Path(p) for p in paths]
    check_find_options(**{k: kw[k] for k in ("pixel_size_A", "method", "memory_budget_mib") if k in kw})
    Path(out).mkdir(parents=True, exist_ok=True)
    jobs = list(zip(paths, output_stems(paths)))
    outcomes = runner.map(partial(_find_one, out=Path(out), **kw), jobs, desc="files")
    return [o for group in outcomes for o in group]


def scan_images_for_find(result: FourDResult, out: str | Path, stem: str, signal: str = "adf") -> list[Path]:
    """Write each scan frame's ``signal`` image as ``<stem>_<signal>_<k>.npy`` in ``out`` (for ``find``); a scan
    frame with missing probe positions has them filled with the mean of the others. Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(result.images[signal]):
        a = np.array(img, np.float32)
        bad = ~np.isfinite(a)
        if bad.all():
            continue
        if bad.any():
            a[bad] = np.float32(np.nanmean(a))
        p = out / f"{stem}_{signal}_{k:04d}.npy"
        np.save(p, a)
        paths.append(p)
    return paths


def default_workers() -> int:
    """CPU cores of this machine (at least 1)."""
    import os

    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


__all__ = ["DaskRunner", "FourDResult", "LOCAL_SCHEDULERS", "check_scheduler", "default_workers",
           "find_files_dask", "reduce_recording", "scan_images_for_find"]
