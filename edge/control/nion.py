"""The Nion Swift backend of the scan controller: beamloop drives a Nion scan device.

:class:`NionBackend` implements :class:`beamloop.edge.control.controller.ScanBackend` (and
:class:`~beamloop.edge.control.controller.PointProbe`, :class:`~beamloop.edge.control.controller.StageBackend`
and :class:`~beamloop.edge.control.controller.PointDetectors`) with a scan hardware source of
nionswift-instrumentation: a real Nion microscope, or the headless simulator of nionswift-usim
(:func:`start_usim`). :class:`NionScanController` is the
:class:`~beamloop.edge.control.controller.ScanController` over it: the bridge, its safety rules
(:mod:`beamloop.edge.control.safety`; the watchdog blanks through the instrument's ``C_Blank`` control or
parks the probe) and the native beamloop frame stream, as for the simulated microscope, so the edge
service works with either.

=====================  ==================================================================================
bridge call            Nion Swift (nionswift-instrumentation 23.6, ``nion/instrumentation/scan_base.py``)
=====================  ==================================================================================
``acquire_frame``      ``record_immediate`` of frame parameters with ``pixel_size`` (rows, cols),
                       ``fov_nm`` chosen so that ``fov_size_nm`` is the requested (h, w) (square pixels
                       only), ``pixel_time_us``; channels by name (``haadf``, ``maadf``, ...)
``set_probe``          ``probe_position = FloatPoint(y, x)``: same fractions of the last scan, origin
                       top-left; Nion orders them (y, x)
``blank``              instrument control ``C_Blank`` (1: blanked)
``center_nm``          of ``acquire_frame`` (x, y): the frame parameters' ``center_nm = FloatPoint(y, x)``
                       (a subscan or re-centred frame; ``fov_nm`` sets the magnification)
``move_stage``         instrument 2D control ``stage_position_m`` (``SetVal2D``, metres, x and y), read
                       back with ``GetVal2D`` (``get_stage``); travel range, speed and settle time are
                       the :class:`~beamloop.edge.control.protocol.StageLimits` given to the
                       controller (default :data:`DEFAULT_STAGE`), as Nion Swift does not report them
``queue_points``       one 1x1 subscan per point (``subscan_pixel_size`` 1x1, ``subscan_fractional_size``
                       one pixel, ``subscan_fractional_center`` the point, ``pixel_time_us`` the dwell):
                       Nion has no native point list; ``mean_counts`` is the pixel's value
``detectors``          of ``queue_points``: ``adf`` always; ``eels`` when the controller is given a camera
                       (``eels_camera``, a camera hardware source id, e.g. :data:`USIM_EELS_ID`): after each
                       point's ADF pixel the probe is parked there (``probe_position``) and one camera frame
                       of the point's dwell is grabbed (``grab_next_to_finish`` while playing); its summed
                       spectrum (float32) and the camera's energy calibration (``get_capabilities``'
                       ``point_detectors["eels"]``) come back. ``pattern`` is never fitted (a Ronchigram camera
                       is not wired), and without ``eels_camera`` neither is ``eels``: both are refused as not
                       fitted (``out_of_range``)
=====================  ==================================================================================

Point EELS is not simultaneous with the ADF pixel: the camera exposure follows it, so a point receives the dose
of twice its dwell (Nion's synchronised scan-camera acquisition, ``scan_base``'s synchronized acquisition, would
record both at once; not used here). nionswift-usim's EELS camera simulates a low-loss spectrum (channel 0 at
-20 eV, 1 eV per channel), not the core-loss edges of :mod:`beamloop.edge.sim.eels`.

Not available: the signal at a parked probe as a time series (Nion's scan device has no such stream,
and the simulator none either), so the trigger-driven dwell of the edge service needs a detector stream
from elsewhere; ``get_capabilities`` reports ``parked_stream: None``, and ``trigger: None`` (no ejection
trigger at the controller: ``arm_trigger`` is not served, and the service decides).

Installing: ``pip install -e ".[nion]"`` (nionswift-instrumentation and nionswift-usim; pure Python,
no GUI toolkit needed for headless use).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from beamloop.edge.control.controller import Acquisition, Capabilities, ScanController
from beamloop.edge.control.keys import ServerKeys
from beamloop.edge.control.protocol import BridgeError, ScanLimits, StageLimits
from beamloop.edge.control.safety import SafetyLimits
from beamloop.edge.frame.scanframe import ScanFrame

USIM_SCAN_ID = "usim_scan_device"
"""Hardware source id of nionswift-usim's scan device."""

USIM_EELS_ID = "usim_eels_camera"
"""Hardware source id of nionswift-usim's EELS camera (``nion.usim_device.EELSCameraSimulator``)."""

SHAPE_LIMITS = (1, 8192)
"""Smallest and largest frame size, pixels per axis."""
DWELL_US_LIMITS = (0.05, 1e5)
"""Shortest and longest pixel dwell time, microseconds."""


DEFAULT_STAGE = StageLimits(x_um=(-1000.0, 1000.0), y_um=(-1000.0, 1000.0), speed_um_per_s=10.0, settle_s=3.0)
"""Stage limits assumed for a Nion instrument when none are given: +-1 mm travel, 10 um/s, 3 s to settle (an
assumption of the order of a goniometer stage's, not a Nion specification; pass the instrument's own)."""

STAGE_CONTROL = "stage_position_m"
"""nionswift-instrumentation's 2D instrument control of the stage position (metres; ``SetVal2D``/``GetVal2D``)."""


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


class NionBackend:
    """Nion calls behind the scan controller (see the module docstring).

    Parameters
    ----------
    scan : nion.instrumentation.scan_base.ScanHardwareSource
        E.g. from :func:`start_usim`, or ``HardwareSourceManager().get_hardware_source_for_hardware_source_id``.

    Attributes
    ----------
    scan
        The hardware source.
    instrument
        Its STEM controller (``SetVal`` / ``TryGetVal`` of ``C_Blank``).
    channel_names : list of str
        The scan device's channels, lower case, by index.
    frame_parameters : ScanFrameParameters or None
        Those of the current frame (the last :meth:`set_frame`).
    stage : StageLimits
        The stage's travel range, speed and settle time (constructor ``stage``, default :data:`DEFAULT_STAGE`).
    eels_camera : camera hardware source or None
        The EELS camera of point spectra (constructor ``eels_camera``, an id); None: no spectrometer.

    Raises
    ------
    BridgeError
        (``internal``) ``eels_camera`` names no hardware source.
    """

    def __init__(self, scan, stage: StageLimits | None = None, eels_camera: str | None = None) -> None:
        self.scan = scan
        self.stage = stage or DEFAULT_STAGE
        self.eels_camera: Any = None
        if eels_camera is not None:
            from nion.instrumentation import HardwareSource

            self.eels_camera = HardwareSource.HardwareSourceManager().get_hardware_source_for_hardware_source_id(
                eels_camera)
            if self.eels_camera is None:
                raise BridgeError("internal", f"no camera hardware source {eels_camera!r}")
        self.instrument = scan.stem_controller
        self.channel_names = [scan.get_channel_name(i).lower() for i in range(scan.channel_count)]
        self.frame_parameters: Any = None

    def capabilities(self) -> Capabilities:
        """The device's channels, :data:`SHAPE_LIMITS`, :data:`DWELL_US_LIMITS`; no parked stream."""
        limits = ScanLimits(SHAPE_LIMITS, DWELL_US_LIMITS, default_dwell_us=1.0, channels=tuple(self.channel_names))
        return Capabilities(limits, None, {"nion": True, "hardware_source_id": self.scan.hardware_source_id})

    def set_frame(self, scan: ScanFrame, channels: tuple[str, ...]) -> dict:
        """Frame parameters for ``scan``: its pixels, dwell, and ``fov_nm`` such that Nion's ``fov_size_nm``
        is the requested (h, w).

        Raises
        ------
        BridgeError
            (``out_of_range``) the field of view asks for non-square pixels, which a Nion scan cannot make.
        """
        from nion.utils import Geometry

        (rows, cols), (h_nm, w_nm) = scan.shape, scan.fov_nm
        fp = self.scan.get_frame_parameters(0)
        fp.pixel_size = Geometry.IntSize(rows, cols)
        fp.pixel_time_us = scan.dwell_us
        fp.rotation_rad = 0.0
        fp.center_nm = Geometry.FloatPoint(y=float(scan.center_nm[1]), x=float(scan.center_nm[0]))
        fp.fov_nm = 1.0
        size = fp.fov_size_nm  # Nion spreads fov_nm over the frame with square pixels
        fp.fov_nm = h_nm / size.height
        size = fp.fov_size_nm
        if not math.isclose(size.width, w_nm, rel_tol=1e-6):
            raise BridgeError("out_of_range", f"field of view {h_nm} x {w_nm} nm over {rows} x {cols} pixels has "
                                              "non-square pixels, which a Nion scan cannot make")
        self.frame_parameters = fp
        return {}

    def acquire(self, scan: ScanFrame, channels: tuple[str, ...]) -> Acquisition:
        """``record_immediate`` of the current frame parameters; float32 images, one per channel."""
        if self.frame_parameters is None:
            raise BridgeError("stale_frame", "acquire() before set_frame()")
        self.scan.set_enabled_channels([self.channel_names.index(c) for c in channels])
        xdatas = self.scan.record_immediate(self.frame_parameters, sync_timeout=60)
        data = {ch: np.ascontiguousarray(x.data, dtype=np.float32) for ch, x in zip(channels, xdatas)}
        return Acquisition(data, {"nion": True})

    def park(self, fx: float, fy: float, frame_id: int) -> tuple[float, float]:
        """``probe_position = FloatPoint(y=fy, x=fx)``; returns the position Nion reports back."""
        from nion.utils import Geometry

        self.scan.probe_position = Geometry.FloatPoint(y=fy, x=fx)
        pos = self.scan.probe_position
        return pos.x, pos.y

    def set_blanked(self, on: bool) -> bool:
        """Set ``C_Blank`` (1: blanked) and read it back (False when it cannot be read)."""
        self.instrument.SetVal("C_Blank", 1.0 if on else 0.0)
        ok, value = self.instrument.TryGetVal("C_Blank")
        return bool(ok and value >= 0.5)

    # StageBackend ----------------------------------------------------------------------------------------
    def stage_limits(self) -> StageLimits:
        """The stage limits given to the backend (:data:`DEFAULT_STAGE` by default)."""
        return self.stage

    def stage_position(self) -> tuple[float, float]:
        """``GetVal2D("stage_position_m")`` as ``(x_um, y_um)``.

        Raises
        ------
        BridgeError
            (``internal``) the instrument has no such control.
        """
        try:
            p = self.instrument.GetVal2D(STAGE_CONTROL)
        except Exception as exc:  # noqa: BLE001 - any instrument failure is reported as one error
            raise BridgeError("internal", f"the instrument's {STAGE_CONTROL} cannot be read: {exc}") from None
        return float(p.x) * 1e6, float(p.y) * 1e6

    def move_stage(self, x_um: float, y_um: float) -> tuple[float, float, float]:
        """``SetVal2D("stage_position_m", FloatPoint(y, x))`` in metres; returns the readback and the move time
        of :meth:`StageLimits.move_time_s` from the position before.

        Raises
        ------
        BridgeError
            (``internal``) the instrument refused the value.
        """
        from nion.utils import Geometry

        x0, y0 = self.stage_position()
        if not self.instrument.SetVal2D(STAGE_CONTROL, Geometry.FloatPoint(y=y_um * 1e-6, x=x_um * 1e-6)):
            raise BridgeError("internal", f"the instrument refused {STAGE_CONTROL} = ({x_um:g}, {y_um:g}) um")
        ax, ay = self.stage_position()
        return ax, ay, self.stage.move_time_s(ax - x0, ay - y0)

    def measure_point(self, fx: float, fy: float, dwell_us: float, channel: str) -> float:
        """Record a one-pixel subscan of the current frame centred on ``(fx, fy)``; its mean value."""
        from nion.utils import Geometry

        cur = self.frame_parameters
        if cur is None:
            raise BridgeError("stale_frame", "no frame has been acquired")
        rows, cols = cur.pixel_size.height, cur.pixel_size.width
        fp = self.scan.get_frame_parameters(0)
        fp.pixel_size = cur.pixel_size
        fp.fov_nm = cur.fov_nm
        fp.pixel_time_us = dwell_us
        fp.subscan_pixel_size = Geometry.IntSize(1, 1)
        fp.subscan_fractional_size = Geometry.FloatSize(1.0 / rows, 1.0 / cols)
        fp.subscan_fractional_center = Geometry.FloatPoint(y=fy, x=fx)
        self.scan.set_enabled_channels([self.channel_names.index(channel)])
        xdata = self.scan.record_immediate(fp, sync_timeout=60)[0]
        return float(np.mean(xdata.data))


    # PointDetectors ----------------------------------------------------------------------------------------
    def _grab_spectrum(self, exposure_ms: float):
        """One frame of the EELS camera at ``exposure_ms``: its summed spectrum's xdata (the last one the camera
        returns: nionswift-instrumentation gives the image, then the spectrum summed over the rows)."""
        cam = self.eels_camera
        fp = cam.get_current_frame_parameters()
        fp.exposure_ms = float(exposure_ms)
        cam.set_current_frame_parameters(fp)
        cam.start_playing(sync_timeout=10)
        try:
            xdatas = cam.get_next_xdatas_to_finish(60)
        finally:
            cam.stop_playing()
        spectra = [x for x in xdatas if x is not None and x.data.ndim == 1]
        if not spectra:
            raise BridgeError("internal", "the EELS camera returned no 1-D spectrum")
        return spectra[-1]

    def point_detectors(self) -> dict[str, dict]:
        """``eels`` with the camera's calibration (read from one grab of 1 ms: ``offset_eV``, ``dispersion_eV``,
        ``channels``; float32 counts) when an EELS camera is given, else nothing (module docstring)."""
        if self.eels_camera is None:
            return {}
        x = self._grab_spectrum(1.0)
        cal = x.dimensional_calibrations[-1]
        return {"eels": {"offset_eV": float(cal.offset), "dispersion_eV": float(cal.scale),
                         "channels": int(x.data.shape[-1]), "units": str(cal.units), "dtype": "<f4",
                         "camera": self.eels_camera.hardware_source_id}}

    def point_signals(self, fx: float, fy: float, frame_id: int, dwell_us: float,
                      detectors: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Park the probe at ``(fx, fy)`` and grab one EELS camera frame of ``dwell_us``: ``{"eels": (channels,)
        float32}``.

        Raises
        ------
        BridgeError
            (``internal``) a detector other than ``eels``, or no camera (the controller never asks then).
        """
        if self.eels_camera is None or set(detectors) - {"eels"}:
            raise BridgeError("internal", f"detectors {list(detectors)} are not fitted to the Nion adapter")
        self.park(fx, fy, frame_id)
        x = self._grab_spectrum(dwell_us / 1000.0)
        return {"eels": np.ascontiguousarray(x.data, np.float32)}


class NionScanController(ScanController):
    """The bridge's server side for a Nion Swift scan hardware source: a :class:`ScanController` over
    :class:`NionBackend`.

    Parameters
    ----------
    scan : nion.instrumentation.scan_base.ScanHardwareSource
    control : str
        Bridge endpoint to bind (loopback unless ``keys`` are given, :func:`beamloop.edge.control.keys.check_bind`).
    frames : str
        Frame stream endpoint to bind (native beamloop stream, PUSH).
    limits : SafetyLimits, optional
        The bridge's safety rules (default limits, with the longest pixel dwell of :data:`DWELL_US_LIMITS`).
    keys : ServerKeys, optional
        CURVE keys of the bridge.
    context : zmq.Context, optional
    clock : callable, optional
        Monotonic seconds for the watchdog and the dwell limit (default :func:`time.monotonic`).
    stage : StageLimits, optional
        The instrument's stage travel range, speed and settle time (default :data:`DEFAULT_STAGE`).
    eels_camera : str, optional
        Hardware source id of the EELS camera for point spectra (e.g. :data:`USIM_EELS_ID`); None: point queues
        refuse ``eels`` as not fitted.

    Raises
    ------
    zmq.ZMQError, beamloop.edge.control.keys.InsecureBindError
        An endpoint cannot be bound, or may not be without keys.
    BridgeError
        (``internal``) ``eels_camera`` names no hardware source.
    """

    def __init__(self, scan, *, control: str = "tcp://127.0.0.1:*", frames: str = "tcp://127.0.0.1:*",
                 limits: SafetyLimits | None = None, keys: ServerKeys | None = None,
                 context: zmq.Context | None = None, clock: Callable[[], float] = time.monotonic,
                 stage: StageLimits | None = None, eels_camera: str | None = None) -> None:
        super().__init__(NionBackend(scan, stage, eels_camera), control=control, frames=frames, limits=limits,
                         keys=keys, context=context, clock=clock)
