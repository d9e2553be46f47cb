"""The simulated microscope in its own process, for benchmarks that need many frames quickly.

Rendering a 1024 x 1024 MoS2 frame with the linear incoherent model takes 1-2 s on this machine, which
would make a run with the thousand frames a tail latency needs last half an hour. The benchmark host
therefore wraps the microscope's imager in a :class:`FrameCache`: the first ``frames_per_scan`` frames of
each scan geometry (shape, field of view, dwell time, dose) are rendered as usual, and later requests
for the same geometry cycle through them, re-labelled with the new scan (frame id). Everything else is
the real :class:`beamloop.edge.sim.microscope.SimulatedMicroscope`: its bridge server, its frame stream (ZeroMQ),
its real-time parked-probe stream and ejections. None of the edge service's stages is touched, and the
cache only changes what the detector sends, not when: a frame is time-stamped (``sent_ns``) as it
leaves, after rendering.

Scan damage is off by default here (the cached frames could not show it); the parked-probe signal still
comes from the specimen, so atoms leave under the parked beam and the trigger may fire.
"""

from __future__ import annotations

import dataclasses
import json
import selectors
import subprocess
import sys
import time
from dataclasses import asdict

from beamloop.edge.sim.microscope import MicroscopeConfig


class FrameCache:
    """An imager (:class:`beamloop.edge.sim.frames.FrameSimulator`) that renders ``frames_per_scan`` frames per scan
    geometry and then serves them in turn.

    Parameters
    ----------
    imager : FrameSimulator
        The microscope's own imager; every attribute other than :meth:`acquire` is its own (the parked
        probe reads ``renderer``).
    frames_per_scan : int
        Distinct frames rendered per geometry (>= 1).

    Raises
    ------
    ValueError
        ``frames_per_scan`` below 1.
    """

    def __init__(self, imager, frames_per_scan: int = 4) -> None:
        if frames_per_scan < 1:
            raise ValueError(f"frames_per_scan must be >= 1, got {frames_per_scan}")
        self._imager = imager
        self.frames_per_scan = int(frames_per_scan)
        self._frames: dict[tuple, list] = {}
        self._served: dict[tuple, int] = {}
        self.rendered = 0

    def __getattr__(self, name):
        return getattr(self._imager, name)

    def acquire(self, scan, electrons_per_pixel: float, distortion=None):
        """A :class:`~beamloop.edge.sim.frames.SimulatedFrame` for ``scan``: rendered while the geometry has fewer than
        ``frames_per_scan`` frames, else the next cached one with ``scan`` put in its place."""
        key = (tuple(scan.shape), tuple(scan.fov_nm), tuple(scan.center_nm), scan.rotation_deg, scan.dwell_us,
               float(electrons_per_pixel))
        cached = self._frames.setdefault(key, [])
        k = self._served.get(key, 0)
        self._served[key] = k + 1
        if len(cached) < self.frames_per_scan:
            frame = self._imager.acquire(scan, electrons_per_pixel, distortion)
            cached.append(frame)
            self.rendered += 1
            return frame
        return dataclasses.replace(cached[k % self.frames_per_scan], scan=scan)


ANNOUNCE = "BEAMLOOP-BENCH-SIM "
"""Prefix of the line on which the host process prints its endpoints (JSON)."""


def serve(config: MicroscopeConfig, frames_per_scan: int) -> None:
    """Build the microscope with a :class:`FrameCache`, print its endpoints on one line (:data:`ANNOUNCE` +
    JSON) and serve until a ``shutdown`` call."""
    from beamloop.edge.sim.microscope import SimulatedMicroscope

    with SimulatedMicroscope(config) as mic:
        mic.imager = FrameCache(mic.imager, frames_per_scan)
        print(ANNOUNCE + json.dumps({"frames": mic.frames_endpoint, "control": mic.control_endpoint}), flush=True)
        mic.serve()


class SimHost:
    """Start the benchmark microscope (:class:`FrameCache` on a :class:`SimulatedMicroscope`) in its own
    process (``python -m beamloop.bench.simhost``); use as a context manager.

    Parameters
    ----------
    config : MicroscopeConfig, optional
        Default: :func:`default_config` (free TCP ports on 127.0.0.1, a 240 Angstrom specimen with room
        for 1024 x 1024 frames at 0.15 Angstrom per pixel, no scan damage).
    frames_per_scan : int
        Distinct frames per scan geometry (:class:`FrameCache`).
    start_timeout_s : float

    Attributes
    ----------
    endpoints : dict
        ``{"frames": ..., "control": ...}`` once started.

    Raises
    ------
    RuntimeError
        The process exited or did not announce its endpoints within ``start_timeout_s``.
    """

    def __init__(self, config: MicroscopeConfig | None = None, frames_per_scan: int = 4,
                 start_timeout_s: float = 120.0) -> None:
        self.config = config or default_config()
        self.frames_per_scan = int(frames_per_scan)
        self.start_timeout_s = start_timeout_s
        self.endpoints: dict = {}
        self._proc: subprocess.Popen | None = None

    def start(self) -> dict:
        """Start the process and return its endpoints."""
        cmd = [sys.executable, "-m", "beamloop.bench.simhost", json.dumps(asdict(self.config)),
               str(self.frames_per_scan)]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        t_end = time.monotonic() + self.start_timeout_s
        while time.monotonic() < t_end:
            if not sel.select(max(t_end - time.monotonic(), 0.01)):
                continue
            line = self._proc.stdout.readline()
            if line.startswith(ANNOUNCE):
                self.endpoints = json.loads(line[len(ANNOUNCE):])
                return self.endpoints
            if not line and self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"benchmark simulator exited with status {code} before announcing its endpoints")
        self.stop(0)
        raise RuntimeError(f"benchmark simulator did not announce its endpoints within {self.start_timeout_s} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for the process to end (after a ``shutdown`` call), killing it after ``timeout_s``."""
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._proc.stdout.close()
        self._proc = None

    def __enter__(self) -> SimHost:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def default_config(**overrides) -> MicroscopeConfig:
    """The benchmark microscope's settings (see :class:`SimHost`), with ``overrides`` applied."""
    kw = {"frames": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*", "specimen_size_A": 240.0,
          "scan_damage": False, "seed": 0}
    kw.update(overrides)
    return MicroscopeConfig(**kw)


if __name__ == "__main__":
    serve(MicroscopeConfig(**json.loads(sys.argv[1])), int(sys.argv[2]))
