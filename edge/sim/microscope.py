"""The simulated microscope: a scan controller (bridge server) and a HAADF detector (frame stream).

It scans frames of a MoS2 monolayer on request (``acquire_frame``) and streams them in the native beamloop
protocol; it parks the probe where the bridge asks (``set_probe``) and, while the beam is unblanked,
streams the ADF signal at the parked probe: detector counts per sample, one row of ``block_samples``
samples per message, paced in real time. A parked-on S column loses atoms at random moments whose rate
follows the electron dose it receives (knock-on damage):

    rate per S atom = sigma * (I / e) * g(d),    g(d) = exp(-d^2 / 2 s^2) / (2 pi s^2)

with ``sigma`` the displacement cross-section, ``I`` the probe current, ``d`` the probe-column distance and
``s`` the probe's standard deviation (its areal density of electrons at the atom). Scanning frames damages
the specimen too: each S atom survives a frame with probability ``exp(-sigma * dose)``. The cross-section
is a model parameter (default 1 barn), not a measured value.

Ground truth (column positions and classes of every frame, every ejection with its sample index) is
available through the simulator-only calls ``sim_ground_truth`` and ``sim_events``; ``sim_fresh_area``
puts back every atom removed so far (as moving to a fresh area of the same crystal, for long runs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import zmq

from beamloop.edge.control.bridge import BridgeError, BridgeServer
from beamloop.edge.control.keys import ServerKeys
from beamloop.edge.control.safety import BeamSafety, SafetyLimits
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame, check_fraction
from beamloop.edge.sim import distortion as dist
from beamloop.edge.sim import lattice
from beamloop.edge.sim.frames import FrameSimulator, SimulatedFrame, electrons_per_second
from beamloop.streams.native.sender import FrameSender

log = logging.getLogger("beamloop.sim")

BARN_A2 = 1e-8
"""One barn in square Angstrom (1e-24 cm^2)."""


@dataclass
class MicroscopeConfig:
    """Settings of the simulated microscope.

    Attributes
    ----------
    frames, control : str
        Endpoints it binds: the frame stream (PUSH) and the bridge (REP).
    seed : int
        Seed of the specimen, the noise and the ejections.
    specimen_size_A : float
        Side of the square specimen area centred on the origin, Angstrom; frames must fit inside.
    rotation_deg : float or None
        Lattice rotation; random when None.
    s_mono, s_di, mo_vacancy : float
        Initial defect fractions (:func:`beamloop.edge.sim.lattice.add_point_defects`).
    current_pA : float
        Probe current, picoampere.
    blur_sigma_A : float
        Source-size blur, Angstrom.
    background_fraction : float
        Constant extra signal, fraction of probe electrons.
    distortion_scale : float
        Scale of drift, wobble and jitter in frames (0: none).
    sample_time_us : float
        Parked-probe ADF sample time (one count value per sample), microseconds.
    block_samples : int
        Samples per parked-probe message.
    cross_section_barn : float
        S displacement cross-section, barn.
    probe_sigma_A : float
        Standard deviation of the probe's current density, Angstrom.
    max_park_s : float
        The beam is blanked after this long unblanked at one position, and no queued point may dwell
        longer (:class:`beamloop.edge.control.safety.SafetyLimits` ``max_point_dwell_s``).
    max_point_electrons : float or None
        Dose limit per probe position, electrons (None: none).
    watchdog_s : float or None
        The bridge's watchdog: once a client has moved or unblanked the beam, silence for this long
        blanks it (or parks it, ``on_watchdog="park"``, at ``safe_position``). None disables it.
    on_watchdog : {"blank", "park"}
    safe_position : (x, y)
        Fractions of the current frame for ``on_watchdog="park"``.
    keys : ServerKeys or None
        CURVE keys of the bridge (:mod:`beamloop.edge.control.keys`); needed to bind it to a non-loopback address.
    scan_damage : bool
        Whether scanning a frame ejects atoms.
    encoding : {"raw", "lz4"}
        Frame stream encoding.
    """

    frames: str = "tcp://127.0.0.1:5555"
    control: str = "tcp://127.0.0.1:5556"
    seed: int = 0
    specimen_size_A: float = 160.0
    rotation_deg: float | None = None
    s_mono: float = 0.02
    s_di: float = 0.005
    mo_vacancy: float = 0.003
    current_pA: float = 50.0
    blur_sigma_A: float = 0.25
    background_fraction: float = 2e-5
    distortion_scale: float = 1.0
    sample_time_us: float = 10.0
    block_samples: int = 100
    cross_section_barn: float = 1.0
    probe_sigma_A: float = 0.35
    max_park_s: float = 10.0
    max_point_electrons: float | None = None
    watchdog_s: float | None = 1.0
    on_watchdog: str = "blank"
    safe_position: tuple[float, float] = (0.0, 0.0)
    keys: ServerKeys | None = None
    scan_damage: bool = True
    encoding: str = "raw"

    LIMITS = {"shape": (16, 2048), "dwell_us": (0.05, 1000.0)}


@dataclass
class _Dwell:
    """The beam parked at one position: an open parked-probe series."""

    x_A: float
    y_A: float
    fx: float
    fy: float
    frame_id: int
    series_id: int
    started: float
    max_samples: int | None
    samples: int = 0
    counts_sum: int = 0
    ejections: list = field(default_factory=list)


class SimulatedMicroscope:
    """Scan controller and detector in one process (see the module docstring).

    Parameters
    ----------
    config : MicroscopeConfig
    context : zmq.Context, optional

    Raises
    ------
    zmq.ZMQError
        An endpoint cannot be bound (e.g. already in use).
    """

    def __init__(self, config: MicroscopeConfig | None = None, context: zmq.Context | None = None) -> None:
        self.config = cfg = config or MicroscopeConfig()
        self.rng = np.random.default_rng(cfg.seed)
        half = cfg.specimen_size_A / 2
        rot = float(self.rng.uniform(0, 60)) if cfg.rotation_deg is None else cfg.rotation_deg
        self.specimen = lattice.mos2((-half, half, -half, half), rotation_deg=rot,
                                     origin_A=tuple(self.rng.uniform(-1, 1, 2)))
        lattice.add_point_defects(self.specimen, self.rng, s_mono=cfg.s_mono, s_di=cfg.s_di, mo_vacancy=cfg.mo_vacancy)
        self._initial_counts = self.specimen.counts.copy()
        self.imager = FrameSimulator(self.specimen, self.rng, blur_sigma_A=cfg.blur_sigma_A,
                                     background_fraction=cfg.background_fraction,
                                     distortion_scale=cfg.distortion_scale)
        self._ctx = context or zmq.Context.instance()
        # a detector with nobody listening must not stall the scan controller: sends give up after 200 ms
        self.sender = FrameSender(cfg.frames, bind=True, encoding=cfg.encoding, context=self._ctx,
                                  send_timeout_ms=200)
        self.dropped_messages = 0
        limits = SafetyLimits(max_point_dwell_s=cfg.max_park_s, max_point_electrons=cfg.max_point_electrons,
                              current_pA=cfg.current_pA, max_pixel_dwell_us=cfg.LIMITS["dwell_us"][1],
                              watchdog_s=cfg.watchdog_s, on_watchdog=cfg.on_watchdog,
                              safe_position=tuple(cfg.safe_position))
        self.safety = BeamSafety(limits, blank=self._safety_blank, park=self._safety_park)
        self.server = BridgeServer(cfg.control, {
            "get_capabilities": self._get_capabilities,
            "get_state": self._get_state,
            "acquire_frame": self._acquire_frame,
            "set_probe": self._set_probe,
            "blank": self._blank,
            "queue_points": self._queue_points,
            "fetch_points": self._fetch_points,
            "abort_points": self._abort_points,
            "sim_ground_truth": self._sim_ground_truth,
            "sim_events": self._sim_events,
            "sim_fresh_area": self._sim_fresh_area,
            "shutdown": self._shutdown,
        }, context=self._ctx, safety=self.safety, keys=cfg.keys)
        self.frames_endpoint = self.sender.endpoint
        self.control_endpoint = self.server.endpoint
        self.electrons_per_s = electrons_per_second(cfg.current_pA)
        self.frame: ScanFrame | None = None
        self._frames: dict[int, SimulatedFrame] = {}
        self._next_frame_id = 1
        self.blanked = True
        self.park: tuple[float, float, float, float, int] | None = None  # x_A, y_A, fx, fy, frame_id
        self.dwell: _Dwell | None = None
        self.queue: dict | None = None
        self._queues: dict[int, dict] = {}
        self.events: list[dict] = []
        self._running = False
        self._next_block = 0.0
        self._pending_scan: ScanFrame | None = None

    # lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """End any open series and close both sockets."""
        self._end_dwell("shutdown")
        self.sender.close(linger_ms=200)
        self.server.close()

    def __enter__(self) -> "SimulatedMicroscope":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def serve(self, duration_s: float | None = None, stop=None) -> None:
        """Serve bridge requests and stream the parked-probe signal until ``shutdown``, ``duration_s``
        or ``stop()`` returns true."""
        self._running = True
        t_end = None if duration_s is None else time.monotonic() + duration_s
        while self._running:
            if stop is not None and stop():
                break
            now = time.monotonic()
            if t_end is not None and now >= t_end:
                break
            wait_ms = 10
            if self.dwell is not None:
                wait_ms = max(int((self._next_block - now) * 1000), 0)
            self.server.handle_one(min(wait_ms, 10))
            if self._pending_scan is not None:
                scan, self._pending_scan = self._pending_scan, None
                self._scan(scan)
            self._advance_dwell()

    # bridge handlers -----------------------------------------------------------------------------
    def _get_capabilities(self, args: dict) -> dict:
        lo, hi = self.config.LIMITS["shape"]
        dlo, dhi = self.config.LIMITS["dwell_us"]
        return {
            "calls": sorted(self.server.handlers),
            "channels": ["haadf"],
            "shape_limits": [lo, hi],
            "dwell_us_limits": [dlo, dhi],
            "max_fov_nm": self.config.specimen_size_A / 10 / math.sqrt(2),
            "parked_stream": {"sample_time_us": self.config.sample_time_us,
                              "block_samples": self.config.block_samples},
            "current_pA": self.config.current_pA,
            "safety": self.safety.state()["limits"],
            "simulated": True,
        }

    def _get_state(self, args: dict) -> dict:
        probe = "parked" if self.park else "idle"
        return {
            "frame_id": None if self.frame is None else self.frame.frame_id,
            "probe": probe,
            "blanked": self.blanked,
            "probe_position": None if self.park is None else [self.park[2], self.park[3]],
            "queue_id": None if self.queue is None else self.queue["id"],
            "safety": self.safety.state(),
        }

    def _check_idle(self) -> None:
        if self.queue is not None and self.queue["state"] == "running":
            raise BridgeError("busy", f"point queue {self.queue['id']} is running; abort it first")

    def _acquire_frame(self, args: dict) -> dict:
        self._check_idle()
        lo, hi = self.config.LIMITS["shape"]
        dlo, dhi = self.config.LIMITS["dwell_us"]
        try:
            rows, cols = (int(v) for v in args["shape"])
            fov = tuple(float(v) for v in args["fov_nm"])
            dwell = float(args.get("dwell_us", 10.0))
            channels = list(args.get("channels", ["haadf"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BridgeError("bad_request", f"acquire_frame needs shape [rows, cols], fov_nm [h, w], dwell_us: {exc}")
        if not (lo <= rows <= hi and lo <= cols <= hi):
            raise BridgeError("out_of_range", f"frame size {rows}x{cols} outside [{lo}, {hi}]")
        max_fov = self.config.specimen_size_A / 10 / math.sqrt(2) - 1.0
        if len(fov) != 2 or not all(math.isfinite(v) and 0 < v <= max_fov for v in fov):
            raise BridgeError("out_of_range", f"field of view {fov} nm outside (0, {max_fov:.2f}]")
        if not (math.isfinite(dwell) and dlo <= dwell <= dhi):
            raise BridgeError("out_of_range", f"dwell {dwell} us outside [{dlo}, {dhi}]")
        if channels != ["haadf"]:
            raise BridgeError("out_of_range", f"channels {channels} not available; this detector has ['haadf']")
        self._end_dwell("scan")
        self.park = None
        scan = ScanFrame(self._next_frame_id, (rows, cols), fov, dwell_us=dwell)
        self._next_frame_id += 1
        self.frame = scan
        self._pending_scan = scan
        return {"frame_id": scan.frame_id, "scan": scan.as_dict(),
                "dose_e_per_A2": self.electrons_per_s * dwell * 1e-6 / (scan.pixel_size_A_yx[0] * scan.pixel_size_A_yx[1])}

    def _scan(self, scan: ScanFrame) -> None:
        """Acquire a frame requested by ``acquire_frame`` (after the reply, as a scan controller would)."""
        rows, cols = scan.shape
        dwell = scan.dwell_us
        frame = self.imager.acquire(scan, self.electrons_per_s * dwell * 1e-6)
        self._frames[scan.frame_id] = frame
        for old in [k for k in self._frames if k < scan.frame_id - 32]:
            del self._frames[old]
        try:
            self.sender.start_series(["haadf"], (rows, cols), np.uint16, number_of_images=1,
                                     count_time=rows * cols * dwell * 1e-6, frame_time=rows * cols * dwell * 1e-6,
                                     user_data={"kind": "frame", "scan": scan.as_dict(),
                                                "pixel_size_A": scan.pixel_size_A,
                                                "dose_e_per_A2": frame.dose_e_per_A2, "simulated": True})
            self.sender.send_frame(frame.counts, user_data={"frame_id": scan.frame_id})
            self.sender.end_series()
        except TimeoutError as exc:
            self._dropped(f"frame {scan.frame_id}", exc)
        if self.config.scan_damage:
            self._scan_damage(frame)

    def _scan_damage(self, frame: SimulatedFrame) -> int:
        """Eject S atoms of the scanned area with probability 1 - exp(-sigma * dose)."""
        s = self.specimen.elements.index("S")
        idx = frame.truth_index
        n = self.specimen.counts[idx, s].astype(np.int64)
        p = 1.0 - math.exp(-self.config.cross_section_barn * BARN_A2 * frame.dose_e_per_A2)
        lost = self.rng.binomial(n, p)
        self.specimen.counts[idx, s] -= lost.astype(np.int16)
        for k in np.flatnonzero(lost):
            self.events.append({"type": "ejection", "cause": "scan", "column": int(idx[k]), "element": "S",
                                "frame_id": frame.scan.frame_id, "t_ns": time.monotonic_ns()})
        return int(lost.sum())

    def _position(self, fx: float, fy: float, frame_id: int) -> tuple[float, float]:
        """Specimen position under fraction (fx, fy) of frame ``frame_id`` as the frame showed it."""
        fr = self._frames[frame_id]
        x_px, y_px = fr.scan.pixel_of_fraction(fx, fy)
        x, y = dist.specimen_of_pixel(fr.scan, fr.distortion, x_px, y_px)
        return float(x), float(y)

    def _check_position(self, args: dict) -> tuple[float, float, int]:
        if "x" not in args or "y" not in args or "frame_id" not in args:
            raise BridgeError("bad_request", "set_probe needs x, y and frame_id")
        fx, fy = check_fraction(args["x"], args["y"])
        fid = args["frame_id"]
        if self.frame is None or not isinstance(fid, int) or fid != self.frame.frame_id:
            cur = None if self.frame is None else self.frame.frame_id
            raise BeamPositionError("stale_frame", f"frame {fid!r} is not the current frame ({cur})")
        return fx, fy, fid

    def _set_probe(self, args: dict) -> dict:
        self._check_idle()
        fx, fy, fid = self._check_position(args)
        self._end_dwell("moved")
        x, y = self._position(fx, fy, fid)
        self.park = (x, y, fx, fy, fid)
        if not self.blanked:
            self._start_dwell(None)
        return {"applied": {"x": fx, "y": fy, "frame_id": fid}, "blanked": self.blanked}

    def _blank(self, args: dict) -> dict:
        on = args.get("on")
        if not isinstance(on, bool):
            raise BridgeError("bad_request", "blank needs on (boolean)")
        if on:
            if self.queue is not None and self.queue["state"] == "running":
                self._finish_queue("aborted")
            self._end_dwell("blanked")
            self.blanked = True
        else:
            self._check_idle()
            self.blanked = False
            if self.park is not None and self.dwell is None:
                self._start_dwell(None)
        return {"blanked": self.blanked}

    def _queue_points(self, args: dict) -> dict:
        self._check_idle()
        try:
            pts = [(p[0], p[1]) for p in args["points"]]
            dwell_us = float(args["dwell_us"])
            fid = args["frame_id"]
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise BridgeError("bad_request", f"queue_points needs points, dwell_us and frame_id: {exc}")
        if not pts:
            raise BridgeError("bad_request", "queue_points got no points")
        # the dwell and dose per point were checked by self.safety before this handler ran
        checked = [self._check_position({"x": x, "y": y, "frame_id": fid})[:2] for x, y in pts]
        qid = len(self._queues) + 1
        n = max(int(round(dwell_us / self.config.sample_time_us)), 1)
        self.queue = {"id": qid, "points": checked, "frame_id": fid, "samples": n, "next": 0, "state": "running",
                      "mean_counts": [], "blank_between": bool(args.get("blank_between", True))}
        self._queues[qid] = self.queue
        self._end_dwell("moved")
        self._next_queue_point()
        return {"queue_id": qid, "points": len(checked), "samples_per_point": n}

    def _queue_state(self, qid) -> dict:
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise BridgeError("bad_request", f"queue_id must be an integer, got {qid!r}")
        q = self._queues.get(qid)
        if q is None:
            raise BridgeError("out_of_range", f"no point queue {qid!r}")
        return q

    def _fetch_points(self, args: dict) -> dict:
        q = self._queue_state(args.get("queue_id"))
        return {"queue_id": q["id"], "state": q["state"], "done": len(q["mean_counts"]),
                "total": len(q["points"]), "mean_counts": list(q["mean_counts"])}

    def _abort_points(self, args: dict) -> dict:
        q = self._queue_state(args.get("queue_id"))
        if q["state"] == "running":
            self._finish_queue("aborted")
        return {"queue_id": q["id"], "state": q["state"], "blanked": self.blanked}

    def _sim_ground_truth(self, args: dict) -> dict:
        fid = args.get("frame_id")
        if not isinstance(fid, int) or isinstance(fid, bool):
            raise BridgeError("bad_request", f"sim_ground_truth needs frame_id (integer), got {fid!r}")
        if self._pending_scan is not None and self._pending_scan.frame_id == fid:
            self._scan(self._pending_scan)
            self._pending_scan = None
        fr = self._frames.get(fid)
        if fr is None:
            raise BridgeError("out_of_range", f"no ground truth kept for frame {fid!r}")
        return {"frame_id": fid, "n": len(fr.truth_xy), "xy": fr.truth_xy.astype("<f8").tobytes(),
                "cls": fr.truth_cls.astype("i1").tobytes(), "index": fr.truth_index.astype("<i8").tobytes(),
                "class_names": list(fr.class_names), "pixel_size_A": fr.pixel_size_A,
                "dose_e_per_A2": fr.dose_e_per_A2, "distortion": asdict(fr.distortion)}

    def _sim_events(self, args: dict) -> dict:
        since = args.get("since", 0)
        if not isinstance(since, int) or isinstance(since, bool):
            raise BridgeError("bad_request", f"sim_events: since must be an integer, got {since!r}")
        return {"events": self.events[since:], "next": len(self.events)}

    def _sim_fresh_area(self, args: dict) -> dict:
        restored = int((self._initial_counts - self.specimen.counts).sum())
        self.specimen.counts[:] = self._initial_counts
        return {"restored_atoms": restored}

    def _shutdown(self, args: dict) -> dict:
        self._running = False
        return {"stopping": True}

    # parked probe --------------------------------------------------------------------------------
    def _dropped(self, what: str, exc: Exception) -> None:
        """A message nobody took (no receiver connected, or one too slow): count it and go on."""
        self.dropped_messages += 1
        self.sender.series = None
        self.events.append({"type": "dropped", "what": what, "error": str(exc), "t_ns": time.monotonic_ns()})
        log.warning("%s not delivered: %s", what, exc)

    def _start_dwell(self, max_samples: int | None) -> None:
        x, y, fx, fy, fid = self.park
        cfg = self.config
        try:
            series = self._open_parked_series(fx, fy, fid)
        except TimeoutError as exc:
            self._dropped("parked-probe series start", exc)
            series = None
        now = time.monotonic()
        self.dwell = _Dwell(x, y, fx, fy, fid, -1 if series is None else series.series_id, now, max_samples)
        self._next_block = now + cfg.block_samples * cfg.sample_time_us * 1e-6

    def _open_parked_series(self, fx: float, fy: float, fid: int):
        cfg = self.config
        return self.sender.start_series(
            ["haadf"], (1, cfg.block_samples), np.uint16,
            count_time=cfg.block_samples * cfg.sample_time_us * 1e-6,
            frame_time=cfg.block_samples * cfg.sample_time_us * 1e-6,
            user_data={"kind": "parked", "probe_position": [fx, fy], "frame_id": fid,
                       "sample_time_s": cfg.sample_time_us * 1e-6, "current_pA": cfg.current_pA, "simulated": True})

    def _end_dwell(self, reason: str) -> None:
        d = self.dwell
        if d is None:
            return
        self.dwell = None
        try:
            self.sender.end_series({"reason": reason, "samples": d.samples})
        except TimeoutError as exc:
            self._dropped(f"end of parked series {d.series_id}", exc)
        # the beam went off now: count samples by the real-time sample clock, not by blocks already sent
        clock = int((time.monotonic() - d.started) / (self.config.sample_time_us * 1e-6))
        self.events.append({"type": "dwell_end", "series_id": d.series_id, "frame_id": d.frame_id, "reason": reason,
                            "samples": d.samples, "beam_off_sample": max(clock, d.samples - self.config.block_samples),
                            "position": [d.fx, d.fy], "t_ns": time.monotonic_ns(),
                            "ejection_samples": [e["sample"] for e in d.ejections]})

    def _advance_dwell(self) -> None:
        d = self.dwell
        if d is None:
            return
        cfg = self.config
        block_s = cfg.block_samples * cfg.sample_time_us * 1e-6
        while self.dwell is d and time.monotonic() >= self._next_block:
            n = cfg.block_samples if d.max_samples is None else min(cfg.block_samples, d.max_samples - d.samples)
            counts = self._parked_samples(d, n)
            if n < cfg.block_samples:
                counts = np.concatenate([counts, np.zeros(cfg.block_samples - n, np.uint16)])
            if self.sender.series is not None:
                try:
                    self.sender.send_frame(counts[None, :], user_data={"first_sample": d.samples - n, "valid": n})
                except TimeoutError as exc:
                    self._dropped(f"parked samples {d.samples - n}..{d.samples}", exc)
            self._next_block += block_s
            if d.max_samples is not None and d.samples >= d.max_samples:
                self._end_point()

    def _parked_samples(self, d: _Dwell, n: int) -> np.ndarray:
        """``n`` samples of detector counts at the parked probe, with ejections along the way."""
        cfg = self.config
        dt = cfg.sample_time_us * 1e-6
        e_per_sample = self.electrons_per_s * dt
        s_el = self.specimen.elements.index("S")
        near = np.flatnonzero(np.hypot(self.specimen.xy[:, 0] - d.x_A, self.specimen.xy[:, 1] - d.y_A)
                              < 4 * cfg.probe_sigma_A)
        dist2 = (self.specimen.xy[near, 0] - d.x_A) ** 2 + (self.specimen.xy[near, 1] - d.y_A) ** 2
        g = np.exp(-dist2 / (2 * cfg.probe_sigma_A**2)) / (2 * math.pi * cfg.probe_sigma_A**2)
        per_atom_rate = cfg.cross_section_barn * BARN_A2 * self.electrons_per_s * g  # 1/s per S atom
        lam = np.empty(n)
        k0 = 0
        while k0 < n:
            f = self.imager.renderer.expected(np.array([d.x_A]), np.array([d.y_A]))[0, 0]
            rate_now = float((per_atom_rate * self.specimen.counts[near, s_el]).sum())
            k_eject = n
            if rate_now > 0:
                t_next = self.rng.exponential(1.0 / rate_now)
                k_eject = k0 + int(t_next / dt)
            k1 = min(k_eject, n)
            lam[k0:k1] = (f + cfg.background_fraction) * e_per_sample
            if k_eject < n:
                w = per_atom_rate * self.specimen.counts[near, s_el]
                c = near[self.rng.choice(len(near), p=w / w.sum())]
                self.specimen.counts[c, s_el] -= 1
                ev = {"type": "ejection", "cause": "parked", "column": int(c), "element": "S",
                      "series_id": d.series_id, "frame_id": d.frame_id, "sample": d.samples + k_eject,
                      "t_ns": time.monotonic_ns()}
                d.ejections.append(ev)
                self.events.append(ev)
                lam[k_eject] = (f + cfg.background_fraction) * e_per_sample
                k0 = k_eject + 1
            else:
                k0 = n
        counts = np.minimum(self.rng.poisson(lam), 65535).astype(np.uint16)
        d.samples += n
        d.counts_sum += int(counts.sum())
        return counts

    # safety actions (called by self.safety: watchdog, parked-beam time limit) ----------------------
    def _safety_blank(self, reason: str) -> None:
        """Blank the beam now, ending a running point queue or parked series (``reason`` in the event)."""
        if self.queue is not None and self.queue["state"] == "running":
            self._finish_queue(reason)
        self._end_dwell(reason)
        self.blanked = True
        self.events.append({"type": "safety", "action": "blank", "reason": reason, "t_ns": time.monotonic_ns()})

    def _safety_park(self, fx: float, fy: float) -> None:
        """Park the probe at fractions ``(fx, fy)`` of the current frame, keeping the blanker as it is
        (a scanned-but-not-yet-rendered frame is rendered first)."""
        if self._pending_scan is not None:
            self._scan(self._pending_scan)
            self._pending_scan = None
        if self.queue is not None and self.queue["state"] == "running":
            was_blanked = self.blanked
            self._finish_queue("watchdog")
            self.blanked = was_blanked
        self._end_dwell("watchdog")
        fid = self.frame.frame_id
        x, y = self._position(fx, fy, fid)
        self.park = (x, y, fx, fy, fid)
        if not self.blanked:
            self._start_dwell(None)
        self.events.append({"type": "safety", "action": "park", "position": [fx, fy], "t_ns": time.monotonic_ns()})

    # point queues --------------------------------------------------------------------------------
    def _next_queue_point(self) -> None:
        q = self.queue
        k = q["next"]
        fx, fy = q["points"][k]
        x, y = self._position(fx, fy, q["frame_id"])
        self.park = (x, y, fx, fy, q["frame_id"])
        self.blanked = False
        self._start_dwell(q["samples"])

    def _end_point(self) -> None:
        q = self.queue
        d = self.dwell
        q["mean_counts"].append(d.counts_sum / max(d.samples, 1))
        self._end_dwell("point_done")
        q["next"] += 1
        if q["next"] >= len(q["points"]):
            self._finish_queue("done")
        else:
            if q["blank_between"]:
                self.blanked = True
            self._next_queue_point()

    def _finish_queue(self, state: str) -> None:
        q = self.queue
        self._end_dwell(state)
        q["state"] = state
        self.blanked = True
        self.queue = None


def decode_ground_truth(result: dict) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Arrays of a ``sim_ground_truth`` reply: positions (n, 2) pixels, classes (n,) int8, class names."""
    n = int(result["n"])
    xy = np.frombuffer(result["xy"], "<f8").reshape(n, 2)
    cls = np.frombuffer(result["cls"], "i1")
    return xy, cls, tuple(result["class_names"])
