"""Stage latencies of the main job: the closed loop through the real simulator and service over ZeroMQ.

For each frame size the benchmark runs the main job's own experiment
(:func:`beamloop.edge.experiments.vacancy_line.vacancy_line`)
on the simulated microscope (:class:`beamloop.bench.simhost.SimHost`, a separate process), one beam target per
frame and a short dwell per target, in chunks, until the wanted number of frames has gone through:

    acquire_frame -> detector stream (ZeroMQ, native protocol) -> receive -> decode -> background -> preprocess
    -> find -> classify -> vacancies -> ood -> register -> policy -> bridge (set_probe, unblank) -> trigger
    (parked-probe blocks) -> bridge (blank)

The service runs with drift correction (``lock_on="predict"``), so the ``register`` stage (frame-to-frame
registration and the drift estimate, :mod:`beamloop.edge.stages.register`) is measured with the rest.

Stages are recorded by the service itself (:class:`beamloop.edge.frame.latency.LatencyRecorder`), exactly as in
``beamloop run``: ``receive`` is the frame's ``sent_ns`` to its first byte read, ``decode`` to its last
blob decoded, ``bridge`` one beam-call round trip (``set_probe``, ``blank``), ``trigger`` one decision
on a block of parked-probe samples, ``end_to_end`` the frame leaving the detector to the controller
confirming the probe position. Kernels are compiled and a few frames run before anything is recorded.

Frames are MoS2 at 0.15 Angstrom per pixel and 1e5 e-/A^2 (the main job's defaults). The simulator
renders 4 distinct frames per size and cycles through them (:class:`beamloop.bench.simhost.FrameCache`): the
detector side costs nothing that the edge side sees, so every frame gets the same treatment.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from beamloop.bench.stats import stage_summary
from beamloop.bench.tails import breakdown

log = logging.getLogger("beamloop.bench")

SIZES = (256, 512, 1024)
"""Square frame sizes, pixels."""

FRAMES = {False: {256: 4000, 512: 2500, 1024: 1500}, True: {256: 250, 512: 150, 1024: 80}}
"""Frames per size: full run (False) and quick run (True)."""

PIXEL_SIZE_A = 0.15
DOSE_E_PER_A2 = 1e5
DWELL_S = 0.01
"""Time the beam stays on each target (no trigger): ten blocks of 100 parked-probe samples."""
CHUNK = 50
"""Frames per call of the experiment (bounds the images it keeps)."""


def measure_size(service, size: int, frames: int, current_pA: float, warmup_frames: int = 5,
                 progress=None, keep_trace: list | None = None) -> tuple[dict, dict]:
    """Run the closed loop on ``frames`` frames of ``size`` x ``size`` pixels; return (summary, samples).

    Parameters
    ----------
    service : beamloop.edge.service.EdgeService
        Connected to the simulator's stream and bridge; its path ends with a :class:`VacancyLinePolicy`.
    size : int
        Frame side, pixels.
    frames : int
        Frames to record (after ``warmup_frames`` unrecorded ones).
    current_pA : float
        The simulator's probe current (sets the pixel dwell time for the dose).
    progress : callable(int), optional
        Called with the number of frames done after every chunk.
    keep_trace : list, optional
        Receives ``(records, stages)``: the per-frame trace of the measured frames
        (:class:`beamloop.edge.frame.trace.FrameTrace`, with CPU times and garbage collections).

    Returns
    -------
    summary : dict
        ``stages`` (:func:`beamloop.bench.stats.stage_summary`), ``tails`` (the slowest 1 % of frames by stage,
        :func:`beamloop.bench.tails.breakdown`), ``frames``, ``wall_s``, ``frames_per_s``,
        ``dwell_reasons`` (count per reason), ``service`` (errors), ``config``.
    samples : dict
        Stage -> ndarray of nanoseconds (int64), for plots.

    Raises
    ------
    RuntimeError
        No frame came back from the simulator in a whole chunk.
    """
    from beamloop.edge.app import warm_up
    from beamloop.edge.experiments.vacancy_line import ExperimentConfig, vacancy_line
    from beamloop.edge.frame.latency import LatencyRecorder
    from beamloop.edge.frame.trace import GcWatch
    from beamloop.edge.service import latency_keys
    from beamloop.edge.sim.frames import electrons_per_second

    shape = (size, size)
    dwell_us = DOSE_E_PER_A2 * PIXEL_SIZE_A**2 / electrons_per_second(current_pA) * 1e6
    fov_nm = size * PIXEL_SIZE_A / 10
    path = service.path
    path.reset()
    warm_up(path, service.trigger, shape=shape, pixel_size_A=PIXEL_SIZE_A, dtypes=(np.uint16,))

    def chunk(n: int) -> list:
        cfg = ExperimentConfig(rounds=max(n - 1, 0), shape=shape, fov_nm=fov_nm, dwell_us=dwell_us,
                               targets_per_frame=1, max_dwell_s=DWELL_S)
        return vacancy_line(service, cfg)

    chunk(warmup_frames)
    rec = LatencyRecorder(latency_keys(path))
    service.latency = path.latency = rec
    gc_watch = GcWatch().start()
    trace = service.trace_frames(capacity=frames + CHUNK + 8, gc_watch=gc_watch)
    reasons: dict[str, int] = {}
    errors0 = (service.stats.frame_errors, service.stats.protocol_errors)
    t0 = time.perf_counter()
    done = 0
    while done < frames:
        records = chunk(min(CHUNK, frames - done))
        if not records:
            raise RuntimeError(f"{size}x{size}: no frame arrived in a whole chunk ({service.stats.errors[-3:]})")
        for r in records:
            for d in r.dwells:
                reasons[d.reason] = reasons.get(d.reason, 0) + 1
        done += len(records)
        if progress:
            progress(done)
    wall = time.perf_counter() - t0
    gc_watch.stop()
    service.end_trace()
    samples = {s: rec.samples(s).copy() for s in rec.summary()}
    if keep_trace is not None:
        keep_trace.append((trace.records(), trace.stages))
    summary = {
        "config": {"shape": list(shape), "pixel_size_A": PIXEL_SIZE_A, "dose_e_per_A2": DOSE_E_PER_A2,
                   "pixel_dwell_us": dwell_us, "targets_per_frame": 1, "dwell_per_target_s": DWELL_S,
                   "trigger": "cusum", "current_pA": current_pA},
        "frames": done,
        "wall_s": wall,
        "frames_per_s": done / wall if wall > 0 else float("nan"),
        "stages": stage_summary(rec),
        "tails": breakdown(trace.records(), trace.stages),
        "dwell_reasons": reasons,
        "service": {"frame_errors": service.stats.frame_errors - errors0[0],
                    "protocol_errors": service.stats.protocol_errors - errors0[1],
                    "last_errors": service.stats.errors[-3:]},
    }
    return summary, samples


def run(quick: bool = False, sizes=SIZES, frames: dict | None = None, progress_bar: bool = True,
        traces: dict | None = None) -> tuple[dict, dict]:
    """Measure every size through one simulator process; return (results, samples per size).

    ``traces``, when given, receives per size ``(records, stages)``: the measured frames' per-frame trace.

    ``results`` holds ``sizes`` (``"256x256"`` -> :func:`measure_size` summary), ``stream_counters`` and
    ``bridge_counters`` of the whole run, and ``method`` (how it was measured). ``frames`` overrides
    :data:`FRAMES` (size -> count).

    Raises
    ------
    RuntimeError
        The simulator could not be started or sent nothing.
    """
    from dataclasses import asdict

    from tqdm import tqdm

    from beamloop.bench.simhost import SimHost
    from beamloop.edge.app import ServiceConfig, build_service
    from beamloop.edge.control.client import BridgeClient
    from beamloop.edge.control.protocol import BridgeError
    from beamloop.streams.native.receiver import FrameReceiver

    counts = dict(FRAMES[bool(quick)])
    counts.update(frames or {})
    out = {"method": __doc__.split("\n\n")[1].replace("\n", " ").strip(), "sizes": {}}
    samples = {}
    kept: list = []
    host = SimHost()
    ends = host.start()
    try:
        with FrameReceiver(ends["frames"], ring=8) as rx, BridgeClient(ends["control"], timeout_ms=20000) as bridge:
            current = float(bridge.get_capabilities()["current_pA"])
            for size in sizes:
                n = counts[size]
                cfg = ServiceConfig("MoS2", targets_per_frame=1, trigger="cusum", lock_on="predict")
                service = build_service(rx, cfg, bridge)
                with tqdm(total=n, desc=f"stage latency {size}x{size}", unit="frame", disable=not progress_bar,
                          leave=False) as bar:
                    summary, samp = measure_size(service, size, n, current, progress=lambda d: bar.update(d - bar.n),
                                                 keep_trace=kept)
                out["sizes"][f"{size}x{size}"] = summary
                if traces is not None:
                    traces[f"{size}x{size}"] = kept[-1]
                samples[f"{size}x{size}"] = samp
                log.info("%dx%d: %d frames in %.1f s", size, size, summary["frames"], summary["wall_s"])
            out["stream_counters"] = rx.counters.as_dict()
            out["bridge_counters"] = asdict(bridge.counters)
            try:
                bridge.blank(True)
                bridge.call("shutdown")
            except BridgeError as exc:
                log.warning("simulator shutdown: %s", exc)
    finally:
        host.stop()
    return out, samples


def pixels_of(size: str) -> int:
    """Pixel count of a ``"ROWSxCOLS"`` label (e.g. ``"512x512"`` -> 262144).

    Raises ``ValueError`` for a label that is not two positive integers joined by ``x``."""
    try:
        r, c = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"frame size {size!r} is not ROWSxCOLS") from None
    if r <= 0 or c <= 0:
        raise ValueError(f"frame size {size!r} must be positive")
    return r * c


def samples_us(samples: dict) -> dict:
    """``samples`` (size -> stage -> ns) converted to microseconds (float64)."""
    return {size: {s: np.asarray(v, np.float64) / 1e3 for s, v in st.items()} for size, st in samples.items()}
