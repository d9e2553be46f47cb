"""The control bridge's scan-controller side for Nion Swift: beamloop drives a Nion scan device.

:class:`NionScanController` serves the bridge calls (:mod:`beamloop.edge.control.bridge`) with a scan hardware source of
nionswift-instrumentation (a real Nion microscope, or the headless simulator of nionswift-usim,
:func:`start_usim`) and streams the frames it acquires in the native beamloop stream, as the simulated
microscope does, so the beamloop.edge service works with either. The bridge's safety rules (:mod:`beamloop.edge.control.safety`)
apply unchanged; the watchdog blanks through the instrument's ``C_Blank`` control or parks the probe.

=====================  ==================================================================================
bridge call            Nion Swift (nionswift-instrumentation 23.6, ../shared/notes/scan-control.md)
=====================  ==================================================================================
``acquire_frame``      ``record_immediate`` of frame parameters with ``pixel_size`` (rows, cols),
                       ``fov_nm`` chosen so that ``fov_size_nm`` is the requested (h, w) (square pixels
                       only), ``pixel_time_us``; channels by name (``haadf``, ``maadf``, ...)
``set_probe``          ``probe_position = FloatPoint(y, x)``: same fractions of the last scan, origin
                       top-left; Nion orders them (y, x)
``blank``              instrument control ``C_Blank`` (1: blanked)
``queue_points``       one 1x1 subscan per point (``subscan_pixel_size`` 1x1, ``subscan_fractional_size``
                       one pixel, ``subscan_fractional_center`` the point, ``pixel_time_us`` the dwell):
                       Nion has no native point list; ``mean_counts`` is the pixel's value
=====================  ==================================================================================

Not available: the signal at a parked probe as a time series (Nion's scan device has no such stream,
and the simulator none either), so the trigger-driven dwell of :meth:`beamloop.edge.service.EdgeService.dwell`
needs a detector stream from elsewhere; ``get_capabilities`` reports ``parked_stream: None``.

Installing: ``pip install -e ".[nion]"`` (nionswift-instrumentation and nionswift-usim; pure Python,
no GUI toolkit needed for headless use).
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from beamloop.edge.control.bridge import BridgeError, BridgeServer
from beamloop.edge.control.keys import ServerKeys
from beamloop.edge.control.safety import BeamSafety, SafetyLimits
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.streams.native.sender import FrameSender

log = logging.getLogger("beamloop.nion")

USIM_SCAN_ID = "usim_scan_device"
"""Hardware source id of nionswift-usim's scan device."""

SHAPE_LIMITS = (1, 8192)
DWELL_US_LIMITS = (0.05, 1e5)


def nion_available() -> bool:
    """Whether nionswift-instrumentation can be imported."""
    import importlib.util

    try:
        return importlib.util.find_spec("nion.instrumentation") is not None
    except ModuleNotFoundError:
        return False


def start_usim(config_dir: str | Path | None = None, sample_index: int = 0):
    """Start nionswift-usim's simulated instrument headless and return its scan hardware source.

    Calling it again in the same process returns the running one. ``config_dir`` holds the device
    configuration files (a temporary folder by default).

    Raises
    ------
    ModuleNotFoundError
        nionswift-instrumentation or nionswift-usim is not installed (``pip install -e ".[nion]"``).
    RuntimeError
        The simulator started but registered no scan device.
    """
    from nion.instrumentation import HardwareSource, camera_base, scan_base
    from nion.usim_device import DeviceConfiguration

    manager = HardwareSource.HardwareSourceManager()
    scan = manager.get_hardware_source_for_hardware_source_id(USIM_SCAN_ID)
    if scan is not None:
        return scan
    cfg_dir = Path(config_dir) if config_dir is not None else Path(tempfile.mkdtemp(prefix="beamloop-usim-"))
    HardwareSource.run()
    camera_base.run(cfg_dir)
    scan_base.run(cfg_dir)
    DeviceConfiguration.AcquisitionContextConfiguration(sample_index=sample_index,
                                                        set_configuration_location=False).run()
    scan = manager.get_hardware_source_for_hardware_source_id(USIM_SCAN_ID)
    if scan is None:
        raise RuntimeError("nionswift-usim started but registered no scan device")
    return scan


def stop_usim() -> None:
    """Close every hardware source of this process (the simulator's threads end)."""
    from nion.instrumentation import HardwareSource

    HardwareSource.HardwareSourceManager().close()


class NionScanController:
    """Bridge server side for a Nion Swift scan hardware source (see the module docstring).

    Parameters
    ----------
    scan : nion.instrumentation.scan_base.ScanHardwareSource
        E.g. from :func:`start_usim`, or ``HardwareSourceManager().get_hardware_source_for_hardware_source_id``.
    control : str
        Bridge endpoint to bind (loopback unless ``keys`` are given, :func:`beamloop.edge.control.keys.check_bind`).
    frames : str
        Frame stream endpoint to bind (native beamloop stream, PUSH).
    limits : SafetyLimits, optional
        The bridge's safety rules (default limits by default).
    keys : ServerKeys, optional
        CURVE keys of the bridge.
    context : zmq.Context, optional

    Raises
    ------
    zmq.ZMQError, beamloop.edge.control.keys.InsecureBindError
        An endpoint cannot be bound, or may not be without keys.
    """

    def __init__(self, scan, *, control: str = "tcp://127.0.0.1:*", frames: str = "tcp://127.0.0.1:*",
                 limits: SafetyLimits | None = None, keys: ServerKeys | None = None,
                 context: zmq.Context | None = None) -> None:
        self.scan = scan
        self.instrument = scan.stem_controller
        self.channel_names = [scan.get_channel_name(i).lower() for i in range(scan.channel_count)]
        self._ctx = context or zmq.Context.instance()
        self.sender = FrameSender(frames, bind=True, context=self._ctx, send_timeout_ms=200)
        self.safety = BeamSafety(limits or SafetyLimits(max_pixel_dwell_us=DWELL_US_LIMITS[1]),
                                 blank=self._safety_blank, park=self._safety_park)
        self.server = BridgeServer(control, {
            "get_capabilities": self._get_capabilities,
            "get_state": self._get_state,
            "acquire_frame": self._acquire_frame,
            "set_probe": self._set_probe,
            "blank": self._blank,
            "queue_points": self._queue_points,
            "fetch_points": self._fetch_points,
            "abort_points": self._abort_points,
        }, context=self._ctx, safety=self.safety, keys=keys)
        self.frames_endpoint = self.sender.endpoint
        self.control_endpoint = self.server.endpoint
        self.frame: ScanFrame | None = None
        self._frame_parameters = None
        self._next_frame_id = 1
        self._pending: tuple | None = None
        self._queues: dict[int, dict] = {}
        self.queue: dict | None = None
        self.dropped_messages = 0
        self.events: list[dict] = []

    # lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Blank the beam and close both sockets (the hardware source stays open)."""
        try:
            self._set_blanker(True)
        finally:
            self.sender.close(linger_ms=200)
            self.server.close()

    def __enter__(self) -> "NionScanController":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def serve(self, duration_s: float | None = None, stop=None) -> None:
        """Serve bridge requests, acquire requested frames and run point queues until ``duration_s``
        passes or ``stop()`` returns true."""
        t_end = None if duration_s is None else time.monotonic() + duration_s
        while not (stop is not None and stop()) and (t_end is None or time.monotonic() < t_end):
            self.server.handle_one(0 if self._pending or self.queue else 10)
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self._scan(*pending)
            if self.queue is not None:
                self._next_point()

    # Nion access ---------------------------------------------------------------------------------
    def _set_blanker(self, on: bool) -> bool:
        self.instrument.SetVal("C_Blank", 1.0 if on else 0.0)
        return self._blanked()

    def _blanked(self) -> bool:
        ok, value = self.instrument.TryGetVal("C_Blank")
        return bool(ok and value >= 0.5)

    def _channel_indexes(self, channels) -> list[int]:
        if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
            raise BridgeError("bad_request", "channels must be a non-empty list of names")
        try:
            return [self.channel_names.index(c.lower()) for c in channels]
        except ValueError:
            raise BridgeError("out_of_range", f"channels {channels} not all available; this scan device has "
                                              f"{self.channel_names}") from None

    def _frame_parameters_for(self, rows: int, cols: int, h_nm: float, w_nm: float, dwell_us: float):
        from nion.utils import Geometry

        fp = self.scan.get_frame_parameters(0)
        fp.pixel_size = Geometry.IntSize(rows, cols)
        fp.pixel_time_us = dwell_us
        fp.rotation_rad = 0.0
        fp.center_nm = Geometry.FloatPoint(0.0, 0.0)
        fp.fov_nm = 1.0
        size = fp.fov_size_nm  # Nion spreads fov_nm over the frame with square pixels
        fp.fov_nm = h_nm / size.height
        size = fp.fov_size_nm
        if not math.isclose(size.width, w_nm, rel_tol=1e-6):
            raise BridgeError("out_of_range", f"field of view {h_nm} x {w_nm} nm over {rows} x {cols} pixels has "
                                              "non-square pixels, which a Nion scan cannot make")
        return fp

    # bridge handlers -----------------------------------------------------------------------------
    def _get_capabilities(self, args: dict) -> dict:
        return {"calls": sorted(self.server.handlers), "channels": list(self.channel_names),
                "shape_limits": list(SHAPE_LIMITS), "dwell_us_limits": list(DWELL_US_LIMITS),
                "parked_stream": None, "safety": self.safety.state()["limits"], "nion": True,
                "hardware_source_id": self.scan.hardware_source_id}

    def _get_state(self, args: dict) -> dict:
        pos = self.scan.probe_position
        return {"frame_id": None if self.frame is None else self.frame.frame_id, "probe": self.scan.probe_state,
                "blanked": self._blanked(), "probe_position": None if pos is None else [pos.x, pos.y],
                "queue_id": None if self.queue is None else self.queue["id"], "safety": self.safety.state()}

    def _busy(self) -> None:
        if self.queue is not None:
            raise BridgeError("busy", f"point queue {self.queue['id']} is running; abort it first")

    def _acquire_frame(self, args: dict) -> dict:
        self._busy()
        try:
            rows, cols = (int(v) for v in args["shape"])
            h_nm, w_nm = (float(v) for v in args["fov_nm"])
            dwell = float(args.get("dwell_us", 1.0))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BridgeError("bad_request", f"acquire_frame needs shape [rows, cols], fov_nm [h, w], dwell_us: {exc}")
        lo, hi = SHAPE_LIMITS
        if not (lo <= rows <= hi and lo <= cols <= hi):
            raise BridgeError("out_of_range", f"frame size {rows}x{cols} outside [{lo}, {hi}]")
        if not all(math.isfinite(v) and v > 0 for v in (h_nm, w_nm)):
            raise BridgeError("out_of_range", f"field of view {h_nm} x {w_nm} nm is not positive")
        if not (math.isfinite(dwell) and DWELL_US_LIMITS[0] <= dwell <= DWELL_US_LIMITS[1]):
            raise BridgeError("out_of_range", f"dwell {dwell} us outside {list(DWELL_US_LIMITS)}")
        channels = args.get("channels", ["haadf"])
        indexes = self._channel_indexes(channels)
        fp = self._frame_parameters_for(rows, cols, h_nm, w_nm, dwell)
        frame = ScanFrame(self._next_frame_id, (rows, cols), (h_nm, w_nm), dwell_us=dwell)
        self._next_frame_id += 1
        self.frame, self._frame_parameters = frame, fp
        self._pending = (frame, fp, indexes, [c.lower() for c in channels])
        return {"frame_id": frame.frame_id, "scan": frame.as_dict()}

    def _scan(self, frame: ScanFrame, fp, indexes: list[int], channels: list[str]) -> None:
        """Record the frame asked for by ``acquire_frame`` (after the reply) and stream it."""
        self.scan.set_enabled_channels(indexes)
        xdatas = self.scan.record_immediate(fp, sync_timeout=60)
        data = {ch: np.ascontiguousarray(x.data, dtype=np.float32) for ch, x in zip(channels, xdatas)}
        try:
            self.sender.start_series(channels, frame.shape, np.float32, number_of_images=1,
                                     user_data={"kind": "frame", "scan": frame.as_dict(),
                                                "pixel_size_A": frame.pixel_size_A, "nion": True})
            self.sender.send_frame(data, user_data={"frame_id": frame.frame_id})
            self.sender.end_series()
        except TimeoutError as exc:
            self.dropped_messages += 1
            self.sender.series = None
            log.warning("frame %d not delivered: %s", frame.frame_id, exc)

    def _set_probe(self, args: dict) -> dict:
        from nion.utils import Geometry

        self._busy()
        x, y = float(args["x"]), float(args["y"])  # validated by self.safety against the current frame
        self.scan.probe_position = Geometry.FloatPoint(y=y, x=x)
        pos = self.scan.probe_position
        return {"applied": {"x": pos.x, "y": pos.y, "frame_id": args["frame_id"]}, "blanked": self._blanked()}

    def _blank(self, args: dict) -> dict:
        on = args.get("on")
        if not isinstance(on, bool):
            raise BridgeError("bad_request", "blank needs on (boolean)")
        if not on:
            self._busy()
        elif self.queue is not None:
            self._finish_queue("aborted")
        return {"blanked": self._set_blanker(on)}

    def _queue_points(self, args: dict) -> dict:
        self._busy()
        signal = args.get("signal", "haadf")
        index = self._channel_indexes([signal])[0]
        qid = len(self._queues) + 1
        self.queue = {"id": qid, "points": [(float(x), float(y)) for x, y in args["points"]],
                      "dwell_us": float(args["dwell_us"]), "channel": index, "state": "running", "mean_counts": [],
                      "blank_between": bool(args.get("blank_between", True))}
        self._queues[qid] = self.queue
        return {"queue_id": qid, "points": len(self.queue["points"]), "samples_per_point": 1}

    def _next_point(self) -> None:
        """Record the next queued point as a one-pixel subscan."""
        from nion.utils import Geometry

        q = self.queue
        rows, cols = self.frame.shape
        x, y = q["points"][len(q["mean_counts"])]
        fp = self.scan.get_frame_parameters(0)
        fp.pixel_size = self._frame_parameters.pixel_size
        fp.fov_nm = self._frame_parameters.fov_nm
        fp.pixel_time_us = q["dwell_us"]
        fp.subscan_pixel_size = Geometry.IntSize(1, 1)
        fp.subscan_fractional_size = Geometry.FloatSize(1.0 / rows, 1.0 / cols)
        fp.subscan_fractional_center = Geometry.FloatPoint(y=y, x=x)
        self.scan.set_enabled_channels([q["channel"]])
        self._set_blanker(False)
        xdata = self.scan.record_immediate(fp, sync_timeout=60)[0]
        if q["blank_between"]:
            self._set_blanker(True)
        q["mean_counts"].append(float(np.mean(xdata.data)))
        if len(q["mean_counts"]) == len(q["points"]):
            self._finish_queue("done")

    def _finish_queue(self, state: str) -> None:
        self.queue["state"] = state
        self.queue = None
        self._set_blanker(True)

    def _queue_state(self, qid) -> dict:
        if not isinstance(qid, int) or isinstance(qid, bool) or qid not in self._queues:
            raise BridgeError("out_of_range", f"no point queue {qid!r}")
        return self._queues[qid]

    def _fetch_points(self, args: dict) -> dict:
        q = self._queue_state(args.get("queue_id"))
        return {"queue_id": q["id"], "state": q["state"], "done": len(q["mean_counts"]), "total": len(q["points"]),
                "mean_counts": list(q["mean_counts"])}

    def _abort_points(self, args: dict) -> dict:
        q = self._queue_state(args.get("queue_id"))
        if q["state"] == "running":
            self._finish_queue("aborted")
        return {"queue_id": q["id"], "state": q["state"], "blanked": self._blanked()}

    # safety actions ------------------------------------------------------------------------------
    def _safety_blank(self, reason: str) -> None:
        if self.queue is not None:
            self._finish_queue(reason)
        self._set_blanker(True)
        self.events.append({"type": "safety", "action": "blank", "reason": reason, "t_ns": time.monotonic_ns()})

    def _safety_park(self, x: float, y: float) -> None:
        from nion.utils import Geometry

        if self.queue is not None:
            self.queue["state"] = "watchdog"
            self.queue = None
        self.scan.probe_position = Geometry.FloatPoint(y=y, x=x)
        self.events.append({"type": "safety", "action": "park", "position": [x, y], "t_ns": time.monotonic_ns()})
