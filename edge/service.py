"""The edge service: frames in from the detector stream, beam positions out through the control bridge.

:class:`EdgeService` owns the receiver, the frame path (:mod:`beamloop.edge.path`), the bridge client and
the trigger. :meth:`EdgeService.next_frame` is receive -> decode -> frame path; :meth:`EdgeService.dwell`
is bridge -> trigger for one target. Experiments (:mod:`beamloop.edge.experiments`) combine the two.

Where a dwell's ejection decision is made (:data:`TRIGGER_AT`): at the scan controller when it offers the
service's trigger model (``get_capabilities()["trigger"]``, the same model file by its hash; the service
arms it with ``arm_trigger`` before each unblank and the controller blanks the beam itself at the decision
sample plus its logic's latency), else in the service, on the blocks of samples streamed to it, blanking
through a ``blank`` round trip (the fallback). With the controller deciding, the service still runs its own
trigger on the streamed samples, as a check (:attr:`DwellResult.service_trigger_sample`), without acting on it.

Drift correction (:data:`LOCK_ON`): with lock-on ``predict`` the frame path registers every frame against
the previous one (:class:`beamloop.edge.stages.register.Register`, told each frame's scan timing from the
stream's metadata: ``t_start_s`` and ``line_time_s`` where the controller states them, else the receipt time),
and :meth:`EdgeService.dwell` sends the probe where the drift estimate says the target is now: shifted by the
predicted drift from the time its scan line was acquired to the service's clock at ``set_probe``, and asks the
controller to move it on at the estimated drift velocity while it is parked (``set_probe``'s ``track``). A target
whose predicted position is more uncertain than ``max_drift_sigma_A`` is skipped (reason ``uncertain``).
With ``none`` the probe goes where the frame showed the target. Two options of lock-on ``rescan``, both off by
default: ``rescan_updates`` feeds where each re-centring subscan found the column into the drift estimate (a
measurement of the specimen's displacement at the subscan's time, :meth:`EdgeService.rescan_update`), and
``recentre_s`` re-centres a long dwell every so many seconds (blank, subscan, re-park on the column found,
re-arm the controller's trigger, unblank: :meth:`EdgeService.recentre`); ``recentre_decline`` also when the
parked signal's running mean declines slowly below a fraction of its start (a walk-off; an ejection is a step,
on which the trigger ends the dwell first).

While it waits for messages the service sends the scan controller a ``heartbeat`` whenever the bridge
has been silent for ``heartbeat_s``, so that the controller's watchdog (:mod:`beamloop.edge.control.safety`)
blanks the beam only when the service has really stopped.

Stream metadata is input, and checked before anything is sized by it: a series whose ``kind`` is not text,
whose ``pixel_size_A`` is not a number in :data:`beamloop.edge.frame.context.PIXEL_SIZE_A`, whose ``scan``
frame is malformed, disagrees with the images or the pixel size, or whose frames would need more working
memory than the frame path's budget (:meth:`beamloop.edge.path.FramePath.check_budget`) is rejected as a
whole: counted (:attr:`ServiceStats.series_rejected`, :attr:`ServiceStats.frames_rejected`), logged once,
and the service goes on with the next series. A frame's ``sent_ns`` is used for latency only when it is an
integer time at most :data:`MAX_TRANSPORT_NS` before its receipt (else counted in
:attr:`ServiceStats.bad_times`).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.protocol import BridgeError
from beamloop.edge.frame.context import FrameContext, FrameMeta, check_pixel_size
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame
from beamloop.edge.frame.stage import FrameError
from beamloop.edge.frame.trace import FrameTrace, GcWatch
from beamloop.edge.path import FramePath
from beamloop.edge.stages.policy import Target
from beamloop.edge.stages.register import Register
from beamloop.edge.trigger import make_trigger
from beamloop.edge.trigger.model import ModelTrigger, model_hash
from beamloop.streams.errors import ProtocolError
from beamloop.streams.native.receiver import FrameReceiver, ImageEvent, SeriesEnd, SeriesStart

log = logging.getLogger("beamloop.service")

RECEIVE = "receive"
"""Latency key: the frame's ``sent_ns`` at the detector to its first byte read here."""
DECODE = "decode"
"""Latency key: first byte read to the last blob decoded into the ring."""
BRIDGE = "bridge"
"""Latency key: one round trip of a beam call (``set_probe``, ``blank``, ``queue_points``); other calls are
recorded as ``bridge:<call>``."""
TRIGGER = "trigger"
"""Latency key: one trigger decision on a block of parked-probe samples."""
END_TO_END = "end_to_end"
"""Latency key: the frame leaving the detector to the controller confirming the first target's probe position."""


LOCK_ON = ("none", "predict", "rescan")
"""How the service keeps the beam on a drifting target: not at all (where the frame showed it), at the
position the drift estimate predicts for the moment the probe gets there, or (``rescan``) there after a small
re-centring subscan around that prediction has found the column (:data:`RESCAN_PX`)."""

RESCAN_PX = 32
"""Side of the re-centring subscan of lock-on ``rescan``, pixels (at the frame's pixel size: 4.8 A at 0.15 A)."""

RESCAN_SIGMA_A = 0.1
"""Standard deviation of the drift measurement a re-centring subscan gives (``rescan_updates``), A: the
subscan's column centroid (< 0.08 A at 1e5 e/A^2, ``tests/test_drift.py``) and the target's position in its frame
(the finder's error and the frame's scan wobble, ~0.05 A) together. A model figure, not a measurement."""

RECENTRE_MIN_S = 0.05
"""Shortest re-centring period ``recentre_s`` taken, seconds (each re-centre costs a subscan and two blanks)."""

RECENTRE_REFERENCE_SAMPLES = 2000
"""Samples after each (re-)park whose mean is the reference of ``recentre_decline`` (20 ms at 10 us)."""

RESCAN_GATE_SIGMAS = 4.0
"""A re-centring measurement farther than this many standard deviations from the estimate's prediction is not
taken (the subscan found a neighbouring column, or none)."""

FRAME_TIMES_KEPT = 64
"""Frames whose scan timing the service keeps (to place their targets)."""

TRIGGER_AT = ("controller", "service")
"""Where a dwell's ejection decision is made: by the scan controller's own trigger, or by the service."""

MAX_TRANSPORT_NS = 3_600 * 10**9
"""Longest time from a frame's ``sent_ns`` to its receipt that is taken as a latency (1 hour), nanoseconds."""

MAX_FOV_NM = 1e5
"""Largest field of view a scan frame may state, nanometres (100 um)."""

PIXEL_SIZE_TOLERANCE = 0.05
"""Largest relative difference between a series' ``pixel_size_A`` and its scan frame's pixel size."""

REJECTED_SERIES_KEPT = 64
"""Rejected series remembered (so that their later frames are skipped without a second warning)."""


class Interrupted(Exception):
    """A stop was requested (e.g. SIGINT) while the service waited: raised between messages, never in the
    middle of one, after a dwell in progress was blanked.

    Parameters
    ----------
    signum : int
        The signal number (0 when the stop did not come from a signal).
    """

    def __init__(self, signum: int = 0) -> None:
        super().__init__(f"stopped by signal {signum}" if signum else "stopped")
        self.signum = int(signum)


INTERRUPT_CHECK_S = 0.25
"""Longest wait between two checks of the service's ``interrupt`` callable, seconds."""


def sent_time_ns(ev: ImageEvent) -> int | None:
    """The frame's ``sent_ns`` (the sender's ``time.monotonic_ns()``) when it is usable: an integer in
    ``[0, 2**63)`` at most :data:`MAX_TRANSPORT_NS` before the frame's receipt; else None."""
    ud = ev.header.user_data
    sent = ud.get("sent_ns") if isinstance(ud, dict) else None
    if (isinstance(sent, int) and not isinstance(sent, bool) and 0 <= sent < 1 << 63
            and 0 <= ev.recv_ns - sent <= MAX_TRANSPORT_NS):
        return sent
    return None


def check_scan(d: Any, shape: tuple[int, ...], pixel_size_A: float | None) -> ScanFrame:
    """The scan frame a series states (``user_data["scan"]``), checked against its images.

    Parameters
    ----------
    d : object
        The stated scan frame (:meth:`beamloop.edge.frame.scanframe.ScanFrame.as_dict`).
    shape : tuple
        The images' shape.
    pixel_size_A : float or None
        The series' stated pixel size.

    Returns
    -------
    ScanFrame

    Raises
    ------
    FrameError
        Not a valid scan frame, another shape than the images, a field of view beyond
        :data:`MAX_FOV_NM`, a frame id outside ``[0, 2**63)``, or a pixel size that disagrees with the
        series' by more than :data:`PIXEL_SIZE_TOLERANCE`.
    """
    if not isinstance(d, dict):
        raise FrameError(f"scan frame {d!r:.60} is not a map")
    try:
        scan = ScanFrame.from_dict(d)
    except Exception as exc:  # noqa: BLE001 - whatever the stream sent, it is a rejection, not a crash
        raise FrameError(f"invalid scan frame: {exc}"[:200]) from None
    if tuple(scan.shape) != tuple(shape):
        raise FrameError(f"scan frame of {scan.shape[0]}x{scan.shape[1]} pixels for images of {shape}")
    if not all(0 < v <= MAX_FOV_NM for v in scan.fov_nm) or not all(math.isfinite(v) for v in scan.center_nm):
        raise FrameError(f"scan frame field of view {scan.fov_nm} nm is outside (0, {MAX_FOV_NM:g}] nm")
    if not 0 <= scan.frame_id < 1 << 63:
        raise FrameError(f"scan frame id {scan.frame_id} is outside [0, 2**63)")
    if pixel_size_A is not None:
        check_pixel_size(scan.pixel_size_A, "scan frame pixel size")
        if abs(scan.pixel_size_A - pixel_size_A) > PIXEL_SIZE_TOLERANCE * pixel_size_A:
            raise FrameError(f"pixel size {pixel_size_A:g} A disagrees with the scan frame's "
                             f"{scan.pixel_size_A:g} A")
    return scan


def latency_keys(path: FramePath | tuple[str, ...]) -> tuple[str, ...]:
    """Latency keys of a service running ``path``, in the order a frame meets them: receive, decode, the
    path's stages, bridge, trigger, end to end."""
    names = path.names if isinstance(path, FramePath) else tuple(path)
    return (RECEIVE, DECODE, *names, BRIDGE, TRIGGER, END_TO_END)


STAGES = latency_keys(("background", "preprocess", "find", "classify", "vacancies", "ood", "register", "policy"))
"""Latency keys of the service on the classical MoS2 path with a policy and drift correction (the main job with
``--lock-on predict``), in order; without drift correction there is no ``register``."""


def column_near_centre(image: np.ndarray, sigma_px: float) -> tuple[float, float]:
    """The column nearest the centre of a small re-centring scan: the local maximum of the Gaussian-smoothed
    image (sigma ``sigma_px``) nearest the centre, refined to its intensity-weighted centroid over 3 x 3 pixels.

    Parameters
    ----------
    image : ndarray, shape (rows, cols)
        The subscan, counts.
    sigma_px : float
        The column's standard deviation, pixels.

    Returns
    -------
    (x_px, y_px) : tuple of float
        Pixel coordinates; the centre when the image has no local maximum above its mean.
    """
    from scipy.ndimage import gaussian_filter, maximum_filter

    sm = gaussian_filter(np.asarray(image, np.float64), sigma_px)
    rows, cols = sm.shape
    size = max(3, int(2 * sigma_px) | 1)
    peaks = np.argwhere((sm == maximum_filter(sm, size=size)) & (sm > sm.mean()))
    if len(peaks) == 0:
        return (cols - 1) / 2, (rows - 1) / 2
    cy, cx = (rows - 1) / 2, (cols - 1) / 2
    r, c = peaks[int(np.argmin(np.hypot(peaks[:, 0] - cy, peaks[:, 1] - cx)))]
    r0, r1, c0, c1 = max(r - 1, 0), min(r + 2, rows), max(c - 1, 0), min(c + 2, cols)
    w = sm[r0:r1, c0:c1] - sm[r0:r1, c0:c1].min()
    if w.sum() <= 0:
        return float(c), float(r)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    return float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum())


def frame_image(ev: ImageEvent) -> np.ndarray:
    """The image of a frame event: its series' first channel (the HAADF image of a scan frame), a view
    into the receive ring valid until the ring slot is reused."""
    return ev.data[ev.series.channels[0]]


@dataclass
class DwellResult:
    """What happened while the beam was parked on one target.

    Attributes
    ----------
    target : Target
    reason : str
        Why the dwell ended: ``trigger`` (the trigger fired and the beam was blanked), ``max_dwell``
        (no event within the time limit), ``controller_ended`` (the scan controller ended the stream),
        ``stream_timeout`` (no samples arrived), ``rejected`` (position refused before sending), ``uncertain``
        (lock-on ``predict``: the predicted position was too uncertain, or unknown; the beam never went on),
        ``bridge_error`` (a call failed; the beam was blanked), ``blank_failed`` (the beam could not be
        blanked: it may still be on).
    trigger_sample : int
        Sample index (from the start of the dwell) at which the trigger fired, -1 if it did not.
    samples : int
        Samples received.
    series_id : int
        Parked-probe series of this dwell (-1 if none started).
    set_probe_reply_ns : int
        ``time.monotonic_ns()`` when the controller confirmed the probe position.
    error : str
        Error text for ``rejected`` / ``bridge_error`` / ``stream_timeout``.
    baseline_rate : float
        Counts per sample the trigger took as the column's intact signal (NaN if it never had one).
    trigger_at : str
        Where the decision was made (:data:`TRIGGER_AT`).
    blank_time_ns : float
        With ``trigger_at="controller"`` and a decision: time from the dwell's start to the blank,
        nanoseconds (the decision sample's end plus the logic's latency); NaN otherwise.
    service_trigger_sample : int
        The service's own trigger on the samples it received (the decision itself with
        ``trigger_at="service"``, a check beside the controller's otherwise); -1 if it did not fire.
    decision_t_ns : int
        When the decision was acted on, ``time.monotonic_ns()``: the service's decision (just before its
        ``blank``), or the controller's blank (its clock, ``blank_t_ns``); 0 without a decision.
    placed : (float, float) or None
        Fractions the probe was sent to with lock-on ``predict`` (None: the target's own).
    predicted_shift_A : (float, float) or None
        The predicted drift the target was moved by, A (lab frame).
    predicted_sigma_A : float
        Its standard deviation, A (NaN without a prediction); over ``max_drift_sigma_A``: reason ``uncertain``.
    recentres : int
        Re-centring subscans during the dwell (``recentre_s``); each restarts the parked series (a new
        ``series_id``) and the trigger, so ``trigger_sample`` counts from the last one.
    frame_id : int
        The frame the probe was last placed in (the target's, or the last re-centring subscan's); -1 before.
    """

    target: Target
    reason: str = ""
    trigger_sample: int = -1
    samples: int = 0
    series_id: int = -1
    set_probe_reply_ns: int = 0
    error: str = ""
    baseline_rate: float = float("nan")
    trigger_at: str = "service"
    blank_time_ns: float = float("nan")
    service_trigger_sample: int = -1
    decision_t_ns: int = 0
    placed: tuple[float, float] | None = None
    predicted_shift_A: tuple[float, float] | None = None
    predicted_sigma_A: float = float("nan")
    recentres: int = 0
    frame_id: int = -1


@dataclass
class ServiceStats:
    """Counts of what the service rejected or skipped, with the last few error texts.

    ``frame_errors``: frames the frame path rejected; ``series_rejected``: series whose metadata was
    refused, ``frames_rejected``: their frames; ``protocol_errors``: messages the receiver rejected;
    ``skipped_messages``: images of other kinds met while waiting for a frame; ``bad_times``: frames with an
    unusable ``sent_ns``; ``heartbeat_errors``: heartbeats that failed; ``blank_failures``: blanks that
    failed (the beam may have stayed on)."""

    frame_errors: int = 0
    series_rejected: int = 0
    frames_rejected: int = 0
    protocol_errors: int = 0
    skipped_messages: int = 0
    bad_times: int = 0
    heartbeat_errors: int = 0
    blank_failures: int = 0
    errors: list = field(default_factory=list)

    @property
    def rejected(self) -> int:
        """Frames not processed for any reason of the service's own (bad frames and rejected series)."""
        return self.frame_errors + self.frames_rejected

    def note(self, text: str) -> None:
        """Keep an error text (the last 100)."""
        self.errors.append(text)
        del self.errors[:-100]


class EdgeService:
    """Receive, process, and act on frames.

    Parameters
    ----------
    receiver : FrameReceiver
        Connected to the detector's frame stream.
    path : FramePath
        The stages every scan frame goes through (:func:`beamloop.edge.path.frame_path`).
    bridge : BridgeClient, optional
        Connected to the scan controller; without it the service only processes frames.
    trigger : str
        Trigger kind for dwells (:func:`beamloop.edge.trigger.make_trigger`): ``"model"`` (the
        shipped quantized ejection model, default), ``"cusum"`` or ``"window"``.
    trigger_options : dict, optional
    latency : LatencyRecorder, optional
        Shared with the path; by default the path's, or a new one.
    heartbeat_s : float or None
        Send a ``heartbeat`` when the bridge has been silent this long, seconds (checked while waiting
        for messages); None: never. Keep it well below the controller's watchdog period (1 s for the
        simulated microscope). A controller that does not know the call turns heartbeats off.
    interrupt : callable() -> int, optional
        Asked at least every :data:`INTERRUPT_CHECK_S` while waiting: a non-zero value (a signal number)
        raises :class:`Interrupted` (e.g. :class:`beamloop.edge.cli.StopSignals`).
    trigger_at : {"controller", "service"}
        Where dwells' decisions are wanted; ``controller`` takes effect once :meth:`choose_trigger_at` has
        seen a controller that offers the trigger's model (until then, and for a controller without one,
        the service decides).
    lock_on : {"none", "predict"}
        Drift correction of dwells (:data:`LOCK_ON`); ``predict`` needs a path with a ``register`` stage.
    clock : callable, optional
        Monotonic seconds on the clock of the frames' ``t_start_s`` (default :func:`time.monotonic`, the
        simulated microscope's): "now" of the drift prediction.
    max_drift_sigma_A : float
        Uncertainty gate of lock-on ``predict``: targets whose predicted position has a larger standard
        deviation are skipped, A.
    rescan_updates : bool
        With lock-on ``rescan``: feed where each re-centring subscan found the column into the drift estimate
        as a measurement of the specimen's displacement at the subscan's time (:meth:`rescan_update`; off by
        default).
    recentre_s : float or None
        With lock-on ``rescan``: every ``recentre_s`` seconds of a dwell (the service's clock) blank, run the
        re-centring subscan around where the column should be now, re-park on the column found (re-arming the
        controller's trigger) and go on with the dwell (:meth:`recentre`); None (default): never.
    recentre_decline : float or None
        With lock-on ``rescan``: also re-centre as soon as the parked signal's running mean (an exponential
        mean over blocks, weight ``1 - exp(-samples / RECENTRE_REFERENCE_SAMPLES)``) falls below this fraction
        (in (0, 1)) of its mean over the first :data:`RECENTRE_REFERENCE_SAMPLES` after the park, while the
        trigger has not fired: the slow decline of a column walking off, where an ejection is a step the
        trigger ends the dwell on first. None (default): only the period ``recentre_s``.

    Attributes
    ----------
    monitor : MonitorBoard or None
        Where frames and dwells are published for the live view and ``/metrics``
        (:class:`beamloop.edge.monitor.board.MonitorBoard`; set by :func:`beamloop.edge.app.start_monitor`):
        a rate-limited copy of the frame after the path, the probe position, the parked-probe blocks and each
        dwell's result; None (default): nothing is published.
    trigger_at : str
        Where dwells' decisions are made now (:data:`TRIGGER_AT`).
    trigger_at_note : str
        Why the service decides although the controller was asked for (empty otherwise).
    trigger_at_chosen : bool
        Whether :meth:`choose_trigger_at` has run.

    Raises
    ------
    ValueError
        ``trigger_at`` not in :data:`TRIGGER_AT`, ``lock_on`` not in :data:`LOCK_ON` (or ``predict`` on a
        path without a ``register`` stage), ``recentre_s`` not a number of seconds >= :data:`RECENTRE_MIN_S`,
        ``recentre_decline`` not a fraction in (0, 1), or the trigger's own options.
    """

    def __init__(self, receiver: FrameReceiver, path: FramePath, bridge: BridgeClient | None = None,
                 trigger: str = "model", trigger_options: dict | None = None,
                 latency: LatencyRecorder | None = None, heartbeat_s: float | None = 0.25,
                 interrupt: Callable[[], int] | None = None, trigger_at: str = "controller",
                 lock_on: str = "none", clock: Callable[[], float] = time.monotonic,
                 max_drift_sigma_A: float = 0.5, rescan_updates: bool = False,
                 recentre_s: float | None = None, recentre_decline: float | None = None) -> None:
        if trigger_at not in TRIGGER_AT:
            raise ValueError(f"trigger_at {trigger_at!r}; expected one of {', '.join(TRIGGER_AT)}")
        if lock_on not in LOCK_ON:
            raise ValueError(f"lock_on {lock_on!r}; expected one of {', '.join(LOCK_ON)}")
        self.register = next((st for st in path.stages if isinstance(st, Register)), None)
        if lock_on != "none" and self.register is None:
            raise ValueError(f"lock_on {lock_on!r} needs a frame path with a register stage (drift correction)")
        self.lock_on = lock_on
        self.clock = clock
        self.max_drift_sigma_A = float(max_drift_sigma_A)
        self.rescan_updates = bool(rescan_updates)
        if recentre_s is not None and not (isinstance(recentre_s, (int, float)) and not isinstance(recentre_s, bool)
                                           and math.isfinite(recentre_s) and recentre_s >= RECENTRE_MIN_S):
            raise ValueError(f"recentre_s must be a number of seconds >= {RECENTRE_MIN_S}, got {recentre_s!r}")
        self.recentre_s = None if recentre_s is None else float(recentre_s)
        if recentre_decline is not None and not (isinstance(recentre_decline, float) and 0 < recentre_decline < 1):
            raise ValueError(f"recentre_decline must be a fraction in (0, 1), got {recentre_decline!r}")
        self.recentre_decline = recentre_decline
        self.rescan_measurements = 0
        """Re-centring subscans taken into the drift estimate (``rescan_updates``)."""
        self._frame_times: OrderedDict[int, tuple[ScanFrame, float, float]] = OrderedDict()
        self.trigger_at_requested = trigger_at
        self.trigger_at = "service"
        self.trigger_at_note = "" if trigger_at == "service" else "the controller's capabilities not read yet"
        self.trigger_at_chosen = False
        self.receiver = receiver
        self.interrupt = interrupt
        self.path = path
        self.bridge = bridge
        self.heartbeat_s = heartbeat_s if bridge is not None else None
        self._no_beat_before = 0.0
        self.latency = latency or path.latency or LatencyRecorder(latency_keys(path))
        path.latency = self.latency
        self.trigger = make_trigger(trigger, **(trigger_options or {}))
        self.stats = ServiceStats()
        self._series_meta: tuple[tuple, FrameMeta, ScanFrame | None] | None = None
        self._rejected: OrderedDict[str, str] = OrderedDict()
        self.monitor: Any = None
        self.trace: FrameTrace | None = None
        """Per-frame timestamps of every frame that went through the path (:meth:`trace_frames` turns it on)."""
        if bridge is not None:
            bridge.on_round_trip = self._record_round_trip

    def trace_frames(self, capacity: int = 100_000, cpu: bool = True, gc_watch: GcWatch | None = None) -> FrameTrace:
        """Keep a per-frame trace from now on (:class:`beamloop.edge.frame.trace.FrameTrace`: receipt, decode and
        each stage's start, end and, with ``cpu``, thread CPU time; the last ``capacity`` frames), a few
        microseconds per frame. Returns it (also :attr:`trace`)."""
        self.path.measure_cpu = bool(cpu)
        self.trace = FrameTrace(self.path.names, capacity, gc_watch)
        return self.trace

    def end_trace(self) -> FrameTrace | None:
        """Stop the per-frame trace of :meth:`trace_frames` (and the CPU times); returns it (None without one)."""
        trace, self.trace = self.trace, None
        self.path.measure_cpu = False
        return trace

    def choose_trigger_at(self, capabilities: dict | None) -> str:
        """Decide where dwells' decisions are made, from the controller's ``get_capabilities`` reply.

        The controller decides when it was asked for (``trigger_at="controller"``), the service's trigger is a
        shipped model (:class:`~beamloop.edge.trigger.model.ModelTrigger`) and the controller offers that
        model with the same hash (the same integers); else the service does (:attr:`trigger_at_note` says
        why, logged once).

        Parameters
        ----------
        capabilities : dict or None
            The reply of :meth:`beamloop.edge.control.client.BridgeClient.get_capabilities` (None: unknown).

        Returns
        -------
        str
            :attr:`trigger_at`.
        """
        self.trigger_at, self.trigger_at_note = "service", ""
        self.trigger_at_chosen = True
        if self.trigger_at_requested == "service":
            return self.trigger_at
        offered = (capabilities or {}).get("trigger")
        model = self.trigger.model_name if isinstance(self.trigger, ModelTrigger) else None
        models = offered.get("models") if isinstance(offered, dict) else None
        if not isinstance(models, dict) or not models:
            self.trigger_at_note = "the scan controller has no trigger"
        elif model is None:
            self.trigger_at_note = f"the {self.trigger.name} trigger runs only in the service"
        elif model not in models:
            self.trigger_at_note = f"the scan controller does not offer model {model!r}"
        elif (models[model] or {}).get("hash") != model_hash(model):
            self.trigger_at_note = f"the scan controller's model {model!r} differs from the service's (hash)"
        else:
            self.trigger_at = "controller"
        if self.trigger_at_note:
            log.warning("trigger in the service: %s", self.trigger_at_note)
        return self.trigger_at

    def _record_round_trip(self, call: str, ns: int) -> None:
        self.latency.add(BRIDGE if call in ("set_probe", "blank", "queue_points") else f"{BRIDGE}:{call}", ns)

    # heartbeats ------------------------------------------------------------------------------------
    def _next_beat(self) -> float:
        """``time.monotonic()`` when the next heartbeat is due (never without a bridge or heartbeats)."""
        if self.bridge is None or self.heartbeat_s is None:
            return math.inf
        return max(self.bridge.last_sent + self.heartbeat_s, self._no_beat_before)

    def beat_if_due(self) -> None:
        """Send a heartbeat if the bridge has been silent for ``heartbeat_s``.

        A failed heartbeat is counted (``stats.heartbeat_errors``) and the next is tried ``heartbeat_s``
        later; ``unknown_call`` turns heartbeats off (a controller without a watchdog).

        Raises
        ------
        BridgeError
            (``unavailable``) the controller is known to be gone (its process exited): nothing the service
            waits for can come any more.
        """
        if self.bridge is None or self.heartbeat_s is None or time.monotonic() < self._next_beat():
            return
        try:
            self.bridge.heartbeat()
        except BridgeError as exc:
            self.stats.heartbeat_errors += 1
            self.stats.note(f"heartbeat failed: {exc}")
            self._no_beat_before = time.monotonic() + self.heartbeat_s
            if exc.code == "unknown_call":
                log.warning("the scan controller has no heartbeat call (no watchdog); heartbeats off")
                self.heartbeat_s = None
            elif exc.code == "unavailable":
                raise

    # receive -> frame path -----------------------------------------------------------------------
    def _recv_once(self, timeout_ms: int):
        try:
            return self.receiver.recv(timeout_ms)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self.stats.note(str(exc))
            log.warning("stream: %s", exc)
            return False

    def check_interrupt(self) -> None:
        """Raise :class:`Interrupted` if a stop was requested (the ``interrupt`` callable says so)."""
        if self.interrupt is not None:
            signum = self.interrupt()
            if signum:
                raise Interrupted(signum)

    def _recv(self, timeout_ms: int):
        """Next message within ``timeout_ms`` (None when none; False for a rejected one), sending
        heartbeats while waiting; raises ``unavailable`` (:meth:`beat_if_due`)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            self.check_interrupt()
            self.beat_if_due()
            now = time.monotonic()
            wait = deadline - now
            if self.heartbeat_s is not None:
                wait = min(wait, self._next_beat() - now)
            if self.interrupt is not None:
                wait = min(wait, INTERRUPT_CHECK_S)
            ev = self._recv_once(max(math.ceil(wait * 1000), 0))
            if ev is not None or time.monotonic() >= deadline:
                return ev

    def _series(self, ev: ImageEvent, image: np.ndarray) -> tuple[FrameMeta, ScanFrame | None]:
        """The frame path's metadata and the scan frame of ``ev``'s series, checked once per series.

        Raises
        ------
        FrameError
            The series' metadata is refused (see the module docstring).
        """
        series = ev.series
        key = (series.series_unique_id, image.shape, image.dtype)
        if self._series_meta is not None and self._series_meta[0] == key:
            return self._series_meta[1], self._series_meta[2]
        ud = series.user_data if isinstance(series.user_data, dict) else {}
        meta = FrameMeta.of(image, ud.get("pixel_size_A"), self.path.material, channel=series.channels[0])
        self.path.check_budget(meta)
        scan = check_scan(ud["scan"], image.shape, meta.pixel_size_A) if "scan" in ud else None
        self._series_meta = (key, meta, scan)
        return meta, scan

    def _reject_series(self, ev: ImageEvent, why: str) -> None:
        uid = ev.series.series_unique_id
        self._rejected[uid] = why
        while len(self._rejected) > REJECTED_SERIES_KEPT:
            self._rejected.popitem(last=False)
        self.stats.series_rejected += 1
        self.stats.frames_rejected += 1
        self.stats.note(f"series {ev.series.series_id} rejected: {why}")
        log.warning("series %d rejected: %s", ev.series.series_id, why)

    def next_frame(self, timeout_ms: int = 5000, want_targets: bool = True
                   ) -> tuple[ImageEvent, FrameContext, ScanFrame | None] | None:
        """Receive the next scanned frame and run the frame path on it.

        Parked-probe samples and bad messages met on the way are skipped (counted). Returns
        ``(event, context, scan)`` or None when nothing arrived within ``timeout_ms`` (per message). A
        frame the path rejects (:class:`~beamloop.edge.frame.stage.FrameError`), and every frame of a
        series whose metadata is refused, is counted and skipped: no message ends the service.
        The context is the path's own (reused by the next frame); its ``columns`` and ``targets`` may be kept.
        ``want_targets=False`` asks the policy for no targets (a verification frame).

        Raises
        ------
        BridgeError
            (``unavailable``) the scan controller is known to be gone (:meth:`beat_if_due`).
        """
        for ev in self._images(timeout_ms):
            if ev.series.series_unique_id in self._rejected:
                self.stats.frames_rejected += 1
                continue
            ud = ev.series.user_data if isinstance(ev.series.user_data, dict) else {}
            kind = ud.get("kind", "frame")
            if not isinstance(kind, str):
                self._reject_series(ev, f"kind {kind!r:.40} is not text")
                continue
            if kind != "frame":
                self.stats.skipped_messages += 1
                continue
            sent = sent_time_ns(ev)
            if sent is not None:
                self.latency.add(RECEIVE, ev.recv_ns - sent)
            elif "sent_ns" in ev.header.user_data:
                self.stats.bad_times += 1
            self.latency.add(DECODE, ev.decoded_ns - ev.recv_ns)
            image = frame_image(ev)
            try:
                meta, scan = self._series(ev, image)
            except FrameError as exc:
                self._reject_series(ev, str(exc))
                continue
            if self.register is not None:
                self._frame_timing(ev, scan, image.shape[0])
            try:
                ctx = self.path.run(image, scan=scan, meta=meta, want_targets=want_targets)
            except FrameError as exc:
                self.stats.frame_errors += 1
                self.stats.note(f"frame {ev.image_id}: {exc}")
                log.warning("frame %d rejected: %s", ev.image_id, exc)
                continue
            except Exception as exc:  # noqa: BLE001 - a stage's bug must not end the service either
                self.stats.frame_errors += 1
                self.stats.note(f"frame {ev.image_id}: {type(exc).__name__}: {exc}")
                log.error("frame %d: frame path failed", ev.image_id, exc_info=True)
                continue
            if self.trace is not None:
                self.trace.add(ctx, image_id=ev.image_id, frame_id=scan.frame_id if scan is not None else -1,
                               sent_ns=sent, recv_ns=ev.recv_ns, decoded_ns=ev.decoded_ns)
            if self.monitor is not None:
                self.monitor.publish_frame(image, ctx, scan, ev.image_id)
            return ev, ctx, scan
        return None

    def _frame_timing(self, ev: ImageEvent, scan: ScanFrame | None, rows: int) -> None:
        """Tell the register stage when this frame was scanned (the series' ``t_start_s`` and ``line_time_s``
        where stated, else its receipt less its scan time), and keep it to place the frame's targets."""
        assert self.register is not None
        ud = ev.series.user_data if isinstance(ev.series.user_data, dict) else {}
        t0, lt = ud.get("t_start_s"), ud.get("line_time_s")
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (t0, lt))
        if not ok or lt <= 0:  # type: ignore[operator]
            lt = (scan.shape[1] * scan.dwell_us * 1e-6) if scan is not None else 0.0
            t0 = ev.recv_ns * 1e-9 - rows * lt
        self.frame_timing(scan, float(t0), float(lt))  # type: ignore[arg-type]

    def frame_timing(self, scan: ScanFrame | None, t_start_s: float, line_time_s: float) -> None:
        """The next frame (of ``scan``) was scanned from ``t_start_s`` (seconds, the service's clock) at
        ``line_time_s`` per line: the register stage dates its measurement by it and :meth:`predict_target`
        places the frame's targets by it (called by :meth:`next_frame`; for frames run through the path
        directly, call it before :meth:`beamloop.edge.path.FramePath.run`). No effect without a register stage."""
        if self.register is None:
            return
        self.register.set_timing(t_start_s, line_time_s)
        if scan is not None:
            self._frame_times[scan.frame_id] = (scan, float(t_start_s), float(line_time_s))
            while len(self._frame_times) > FRAME_TIMES_KEPT:
                self._frame_times.popitem(last=False)

    def predict_target(self, target: Target) -> tuple[tuple[float, float], tuple[float, float], float] | None:
        """Where ``target`` is now by the drift estimate (lock-on ``predict``).

        Returns
        -------
        ((fx, fy), (dx, dy), sigma_A) or None
            The fractions of its scan frame to send the probe to, the predicted drift since its scan line was
            acquired (A) and its standard deviation (A); None when the frame's timing is unknown or no drift
            estimate exists.
        """
        info = self._frame_times.get(target.frame_id)
        if self.register is None or info is None or not self.register.estimator.ready:
            return None
        scan, t0, lt = info
        t_line = t0 + (target.y_px + 0.5) * lt + (target.x_px + 0.5) * scan.dwell_us * 1e-6
        (dx, dy), sigma = self.register.estimator.shift(t_line, self.clock())
        x, y = scan.specimen_of_fraction(target.fx, target.fy)
        fx, fy = scan.fraction_of_specimen(x + dx, y + dy)
        return (float(fx), float(fy)), (dx, dy), sigma

    def _track_rate(self, frame_id: int) -> tuple[float, float] | None:
        """The estimated drift velocity in fractions of frame ``frame_id`` per second (``set_probe``'s
        ``track``), or None when it is unknown or faster than the bridge takes."""
        from beamloop.edge.control.protocol import MAX_TRACK_PER_S

        info = self._frame_times.get(frame_id)
        if info is None or self.register is None or self.register.estimator.updates < 2:
            return None
        scan = info[0]
        vx, vy = self.register.estimator.velocity_A_per_s
        f0 = scan.fraction_of_specimen(0.0, 0.0)
        f1 = scan.fraction_of_specimen(vx, vy)
        rate = (float(f1[0] - f0[0]), float(f1[1] - f0[1]))
        return rate if max(abs(rate[0]), abs(rate[1])) <= MAX_TRACK_PER_S else None

    def _rescan(self, target: Target, placed: tuple[float, float], timeout_ms: int = 5000,
                frame_id: int | None = None) -> tuple[float, float, int]:
        """Lock-on ``rescan``: a :data:`RESCAN_PX` subscan centred on the predicted position ``placed`` (fractions
        of the target's frame, or of frame ``frame_id``), the column nearest its centre
        (:func:`column_near_centre`), moved on by the
        predicted drift since; returns its fractions of the subscan, which becomes the current frame, and the
        subscan's id. Where no column is found (or the subscan does not arrive) the subscan's centre is used.

        Raises
        ------
        BridgeError
            The subscan was refused, or the controller is gone.
        """
        assert self.bridge is not None and self.register is not None
        scan = self._frame_times[target.frame_id if frame_id is None else frame_id][0]
        x, y = scan.specimen_of_fraction(*placed)
        n = RESCAN_PX
        side_nm = n * scan.pixel_size_A / 10
        sub = self.bridge.acquire_frame((n, n), (side_nm, side_nm), scan.dwell_us,
                                        center_nm=(float(x) / 10, float(y) / 10))
        got = self._next_scan(sub.frame_id, timeout_ms)
        if got is None:
            self.stats.note(f"rescan frame {sub.frame_id} did not arrive; probe at its centre")
            return 0.5, 0.5, sub.frame_id
        image, t0, lt = got
        self._frame_times[sub.frame_id] = (sub, t0, lt)
        sigma_px = self.path.material.column_sigma_A / sub.pixel_size_A if self.path.material.column_sigma_A else 2.0
        px, py = column_near_centre(image, sigma_px)
        t_line = t0 + (py + 0.5) * lt
        if self.rescan_updates:
            self.rescan_update(target, sub, (px, py), t_line)
        (dx, dy), _ = self.register.estimator.shift(t_line, self.clock())
        sx, sy = sub.specimen_of_fraction(*sub.fraction_of_pixel(px, py))
        fx, fy = sub.fraction_of_specimen(sx + dx, sy + dy)
        return float(np.clip(fx, 0.0, 1.0)), float(np.clip(fy, 0.0, 1.0)), sub.frame_id

    def rescan_update(self, target: Target, sub: ScanFrame, found_px: tuple[float, float], t_found: float) -> bool:
        """Take a re-centring subscan's column into the drift estimate (``rescan_updates``).

        The column of ``target`` was at its frame's position at the time its scan line was acquired, when the
        specimen's displacement was the frame's registered one moved on by the estimated velocity; the subscan
        found it at ``found_px`` at ``t_found``: the displacement then is that plus how far the column moved.
        It is taken with standard deviation :data:`RESCAN_SIGMA_A` unless it lies more than
        :data:`RESCAN_GATE_SIGMAS` from the prediction (a neighbouring column).

        Parameters
        ----------
        target : Target
            The target, in its frame (pixels and fractions).
        sub : ScanFrame
            The subscan.
        found_px : (float, float)
            Where in the subscan the column is, pixels ``(x, y)``.
        t_found : float
            When the subscan's line through it was acquired, seconds (the service's clock).

        Returns
        -------
        bool
            Whether the estimate took it (False also when the target's frame has no registered displacement).
        """
        if self.register is None:
            return False
        info = self._frame_times.get(target.frame_id)
        reg = self.register.registered.get(target.frame_id)
        if info is None or reg is None or not math.isfinite(t_found):
            return False
        scan, t0, lt = info
        t_mid, (rx, ry) = reg
        t_line = t0 + (target.y_px + 0.5) * lt + (target.x_px + 0.5) * scan.dwell_us * 1e-6
        est = self.register.estimator
        vx, vy = est.velocity_A_per_s if est.updates >= 2 else (0.0, 0.0)
        lx, ly = scan.specimen_of_fraction(target.fx, target.fy)
        sx, sy = sub.specimen_of_fraction(*sub.fraction_of_pixel(*found_px))
        z = (rx + vx * (t_line - t_mid) + float(sx - lx), ry + vy * (t_line - t_mid) + float(sy - ly))
        took = est.update(float(t_found), z, sigma_A=RESCAN_SIGMA_A, gate_sigmas=RESCAN_GATE_SIGMAS)
        self.rescan_measurements += took
        return took

    def recentre(self, res: DwellResult, placed: tuple[float, float], t_placed: float,
                 expected_rate: float | None = None) -> tuple[float, float, int] | None:
        """Re-centre a dwell (``recentre_s``): blank, run the re-centring subscan around where the column
        should be now (``placed``, fractions of frame ``res.frame_id``, set at ``t_placed`` seconds, moved on by
        the predicted drift since), put the probe on the column found (tracking the drift), re-arm the
        controller's trigger where it decides, and unblank.

        Returns
        -------
        (fx, fy, frame_id) or None
            Where the probe is now (fractions of the subscan, its id); None when frame ``res.frame_id`` has no
            known timing (nothing done, the beam left as it was).

        Raises
        ------
        BridgeError
            From the bridge (the caller blanks).
        """
        assert self.bridge is not None and self.register is not None
        info = self._frame_times.get(res.frame_id)
        if info is None:
            return None
        scan = info[0]
        (dx, dy), _ = self.register.estimator.shift(t_placed, self.clock())
        x, y = scan.specimen_of_fraction(*placed)
        here = scan.fraction_of_specimen(x + dx, y + dy)
        self.bridge.blank(True)
        fx, fy, frame_id = self._rescan(res.target, (float(here[0]), float(here[1])), frame_id=res.frame_id)
        track = self._track_rate(frame_id)
        self.bridge.set_probe(fx, fy, frame_id, **({} if track is None else {"track": track}))
        res.placed, res.frame_id = (fx, fy), frame_id
        if self.trigger_at == "controller" and res.trigger_at == "controller":
            self._arm_controller(res, expected_rate)
        self.bridge.blank(False)
        res.recentres += 1
        return fx, fy, frame_id

    def _images(self, timeout_ms: int) -> Iterator[ImageEvent]:
        """Image messages of the stream until ``timeout_ms`` have passed or nothing came in the time left
        (other messages are taken by :meth:`_recv` on the way)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            ev = self._recv(max(int((deadline - time.monotonic()) * 1000), 1))
            if ev is None:
                return
            if isinstance(ev, ImageEvent):
                yield ev

    def _next_scan(self, frame_id: int, timeout_ms: int) -> tuple[np.ndarray, float, float] | None:
        """The image of scan frame ``frame_id`` from the stream (not run through the frame path), with its
        start time and line time; None when it does not arrive within ``timeout_ms``."""
        for ev in self._images(timeout_ms):
            ud = ev.series.user_data if isinstance(ev.series.user_data, dict) else {}
            sc = ud.get("scan")
            if ud.get("kind", "frame") != "frame" or not isinstance(sc, dict) or sc.get("frame_id") != frame_id:
                self.stats.skipped_messages += 1
                continue
            image = frame_image(ev)
            t0, lt = ud.get("t_start_s"), ud.get("line_time_s")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (t0, lt)):
                lt = image.shape[1] * float(sc.get("dwell_us", 1.0)) * 1e-6
                t0 = ev.recv_ns * 1e-9 - image.shape[0] * lt
            return np.array(image, np.float64), float(t0), float(lt)  # type: ignore[arg-type]
        return None

    def drift_summary(self) -> dict:
        """The drift estimate for a report: ``lock_on``, the estimator's figures (None without a register
        stage), and frames the policy's uncertainty gate left without targets."""
        if self.register is None:
            return {"lock_on": self.lock_on, "estimate": None}
        policy = next((st for st in self.path.stages if st.name == "policy"), None)
        return {"lock_on": self.lock_on, "estimate": self.register.estimator.as_dict(),
                "frames_registered": self.register.frames, "frames_gated": getattr(policy, "gated", 0)}

    # bridge -> trigger ---------------------------------------------------------------------------
    def safe_blank(self, attempts: int = 2) -> bool:
        """Blank the beam, swallowing (and counting) bridge errors; returns whether the controller confirmed it.

        Tries ``attempts`` times (a blank is never refused for its rate or sequence number, so a second
        try only helps after a timeout); stops early when the controller is known to be gone.
        """
        if self.bridge is None:
            return False
        for _ in range(max(int(attempts), 1)):
            try:
                self.bridge.blank(True)
                return True
            except BridgeError as exc:
                self.stats.blank_failures += 1
                self.stats.note(f"blank failed: {exc}")
                log.error("could not blank the beam: %s", exc)
                if exc.code == "unavailable":
                    break
        return False

    def parked_blocks(self, res: DwellResult, stream_timeout_ms: int) -> Iterator[np.ndarray]:
        """The blocks of parked-probe samples of the dwell ``res`` as they arrive (the valid part of each).

        Sets ``res.series_id`` when its parked series starts; ends (returns) when the controller ends
        that series (``res.reason = "controller_ended"``) or no message came for ``stream_timeout_ms``
        (``res.reason = "stream_timeout"``). Messages of other series and rejected messages are skipped.
        """
        while True:
            ev = self._recv(stream_timeout_ms)
            if ev is False:
                continue
            if ev is None:
                res.reason = res.reason or "stream_timeout"
                res.error = f"no parked-probe samples for {stream_timeout_ms} ms"
                return
            if isinstance(ev, SeriesStart):
                ud = getattr(ev.series, "user_data", None)
                if isinstance(ud, dict) and ud.get("kind") == "parked":
                    res.series_id = ev.series.series_id
                continue
            if isinstance(ev, SeriesEnd):
                if ev.series.series_id == res.series_id:
                    res.reason = res.reason or "controller_ended"
                    return
                continue
            if ev.series.series_id != res.series_id:
                continue
            block = frame_image(ev)[0]
            valid = ev.header.user_data.get("valid", block.shape[0])
            if isinstance(valid, bool) or not isinstance(valid, int) or not 0 <= valid <= block.shape[0]:
                valid = block.shape[0]  # a bogus count: the whole block
            yield block[:valid]

    def dwell(self, target: Target, max_dwell_s: float = 2.0, stream_timeout_ms: int = 1000,
              expected_rate: float | None = None) -> DwellResult:
        """Park the beam on ``target``, unblank, and blank again when the trigger fires.

        With :attr:`trigger_at` ``controller`` the trigger is armed at the controller (``arm_trigger``,
        ``rearm="once"``, the service trigger's threshold) before the unblank, the controller blanks the beam
        itself and ends the parked series, and the decision is read back (``get_trigger_state``); the
        service's own trigger runs on the streamed samples as a check. A controller that refuses the arming
        gets this dwell decided by the service.

        The beam is blanked on every way out: trigger, time limit, stream timeout, the controller ending
        the series, bridge error; ``reason`` is ``blank_failed`` when that blank could not be confirmed.
        Never raises for bridge or stream errors; they end up in the returned :class:`DwellResult`.

        Python's cyclic garbage collector is paused while the beam is on (and runs again after the blank):
        a full collection of a long run's heap (its bridge log, latency records) can stop the process for
        longer than the controller's watchdog period, and the heartbeats with it.

        Raises
        ------
        RuntimeError
            The service has no bridge.
        """
        if self.bridge is None:
            raise RuntimeError("dwell() needs a bridge to the scan controller")
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        try:
            res = self._dwell(target, max_dwell_s, stream_timeout_ms, expected_rate)
            if self.monitor is not None:
                self.monitor.dwell_ended(res)
            return res
        finally:
            if collecting:
                gc.enable()

    def _arm_controller(self, res: DwellResult, expected_rate: float | None) -> None:
        """Arm the controller's trigger for this dwell; a refusal leaves the decision to the service (noted).
        Raises ``BridgeError`` for a lost controller (``timeout``, ``unavailable``)."""
        assert self.bridge is not None
        trig = self.trigger
        assert isinstance(trig, ModelTrigger)  # choose_trigger_at chooses the controller only for one
        try:
            self.bridge.arm_trigger(trig.model_name, threshold=trig.threshold, rearm="once",
                                    expected_rate=expected_rate)
            res.trigger_at = "controller"
        except BridgeError as exc:
            if exc.code in ("timeout", "unavailable"):
                raise
            self.stats.note(f"arm_trigger refused, the service decides this dwell: {exc}")
            log.warning("arm_trigger refused (%s); the service decides this dwell", exc)

    def _dwell(self, target: Target, max_dwell_s: float, stream_timeout_ms: int,
               expected_rate: float | None) -> DwellResult:
        assert self.bridge is not None
        res = DwellResult(target)
        fx, fy = target.fx, target.fy
        if self.lock_on != "none":
            pred = self.predict_target(target)
            if pred is not None:
                (fx, fy), res.predicted_shift_A, res.predicted_sigma_A = pred
                res.placed = (fx, fy)
            if pred is None or not res.predicted_sigma_A <= self.max_drift_sigma_A:
                res.reason = "uncertain"
                res.error = f"predicted position uncertain ({res.predicted_sigma_A:.3g} A)"
                return res
        frame_id = target.frame_id
        try:
            if self.lock_on == "rescan":
                fx, fy, frame_id = self._rescan(target, (fx, fy))
                res.placed = (fx, fy)
            track = self._track_rate(frame_id) if res.placed is not None else None  # follow the drift while parked
            self.bridge.set_probe(fx, fy, frame_id, **({} if track is None else {"track": track}))
            res.set_probe_reply_ns = time.monotonic_ns()
            res.frame_id = frame_id
            if self.trigger_at == "controller":
                self._arm_controller(res, expected_rate)
            if self.monitor is not None:
                self.monitor.dwell_started(target, fx, fy, frame_id)
            self.bridge.blank(False)
        except BeamPositionError as exc:
            res.reason, res.error = "rejected", str(exc)
            return res
        except BridgeError as exc:
            res.reason, res.error = "bridge_error", str(exc)
            if not self.safe_blank():
                res.reason = "blank_failed"
            return res
        trig = self.trigger
        trig.start(expected_rate)
        deadline = time.monotonic() + max_dwell_s
        blanked = False
        acts = res.trigger_at == "service"  # else the controller's trigger blanks; the service's only checks
        period = self.recentre_s if self.lock_on == "rescan" and self.recentre_s is not None else math.inf
        decline = self.recentre_decline if self.lock_on == "rescan" else None
        recentring = decline is not None or period < math.inf
        t_placed = self.clock()
        ref_sum, ref_n, running = 0.0, 0, math.nan  # the decline's reference and running mean since the park
        try:
            for block in self.parked_blocks(res, stream_timeout_ms):
                if blanked:
                    continue  # the rest of the series, until the controller ends it
                t0 = time.perf_counter_ns()
                k = trig.update(block)
                self.latency.add(TRIGGER, time.perf_counter_ns() - t0)
                res.samples += len(block)
                fired = k >= 0 and acts
                if fired or time.monotonic() > deadline:
                    res.reason = "trigger" if fired else "max_dwell"
                    res.trigger_sample = trig.trigger_sample if fired else -1
                    res.decision_t_ns = time.monotonic_ns() if fired else 0
                    blanked = self.safe_blank()
                    if not blanked:
                        res.error = "blank after trigger failed"
                        break
                elif recentring:
                    walked_off = False
                    if decline is not None and len(block):
                        m = float(block.mean())
                        if ref_n < RECENTRE_REFERENCE_SAMPLES:
                            ref_sum, ref_n = ref_sum + m * len(block), ref_n + len(block)
                            running = ref_sum / ref_n
                        else:
                            w = -math.expm1(-len(block) / RECENTRE_REFERENCE_SAMPLES)
                            running += w * (m - running)
                            walked_off = running < decline * ref_sum / ref_n
                    if walked_off or self.clock() - t_placed >= period:
                        placed = res.placed if res.placed is not None else (fx, fy)
                        if self.recentre(res, placed, t_placed, expected_rate) is not None:
                            trig.start(expected_rate)  # a new parked series: the trigger starts again
                        t_placed = self.clock()
                        ref_sum, ref_n, running = 0.0, 0, math.nan
                if self.monitor is not None:  # after the decision's blank: the view never delays it
                    self.monitor.dwell_block(block, res.trigger_sample if fired else -1)
            if res.trigger_at == "controller" and res.reason == "controller_ended":
                self._controller_decision(res)
        except BridgeError as exc:  # the controller is gone while the beam was on
            res.reason, res.error = "bridge_error", str(exc)
        except Interrupted:
            self.safe_blank()  # blank first, then let the caller stop
            raise
        if not blanked:  # every way out blanks, also after the controller ended the series itself
            blanked = self.safe_blank()
        if not blanked:
            res.reason, res.error = "blank_failed", res.error or "blank failed"
        res.baseline_rate = trig.baseline_rate
        res.service_trigger_sample = trig.trigger_sample
        return res

    def _controller_decision(self, res: DwellResult) -> None:
        """The controller ended the parked series: read whether its trigger decided in it (and when it
        blanked). Raises ``BridgeError`` as :meth:`beamloop.edge.control.client.BridgeClient.call`."""
        assert self.bridge is not None
        last = self.bridge.get_trigger_state().get("last")
        if isinstance(last, dict) and last.get("series_id") == res.series_id and res.series_id >= 0:
            res.reason = "trigger"
            res.trigger_sample = int(last["decision_sample"])
            res.blank_time_ns = float(last["blank_time_ns"])
            res.decision_t_ns = int(last.get("blank_t_ns") or 0)
