"""One scan controller over a small hardware Protocol: the server side of the control bridge.

:class:`ScanController` is everything a scan controller does on the wire, written once: the bridge server
(:mod:`beamloop.edge.control.server`) with its handler table, beam safety
(:mod:`beamloop.edge.control.safety`), the frame stream (native beamloop stream, PUSH), frame ids, the one
check of ``acquire_frame`` (:func:`beamloop.edge.control.protocol.parse_acquire_frame`), point queues,
``get_state``, the watchdog's blank and park actions and the serve loop. It holds the beam's state (blanked
or not, where the probe is parked, the running point queue) and tells the hardware what to do through a
:class:`ScanBackend`, which only executes: scan a frame, park the probe, set the blanker.

The split follows Nion Swift's instrumentation (nionswift-instrumentation, ``nion/instrumentation/
scan_base.py``), where a scan device implements the small ``ScanDevice`` Protocol and the framework
(``ScanHardwareSource``) owns the state machine. Two optional Protocols add what not every device has:

=====================  ==================================================================================
:class:`ParkedProbe`   the detector signal at a parked probe as a time series (``parked_samples``): the
                       controller streams it in blocks, paced by its clock, while the beam is unblanked
                       at a parked position, and runs point queues as timed dwells
:class:`PointProbe`    one value per point (``measure_point``, e.g. a one-pixel subscan): the controller
                       runs point queues one point per serve-loop step
:class:`TriggerProbe`  a :class:`ParkedProbe` that runs an ejection trigger on its own samples, next to the
                       beam (FPGA logic on the ADC stream; the simulated microscope emulates it bit for
                       bit): the controller serves ``arm_trigger`` and ``get_trigger_state``, and the
                       backend blanks the beam itself at the decision sample plus its logic's latency
:class:`PointDetectors`  detectors read once per queued point besides the ADF signal (an EELS spectrometer,
                       a pixelated diffraction detector): ``queue_points``' ``detectors``, their
                       calibration in ``get_capabilities``' ``point_detectors``
:class:`StageBackend`  a motorised specimen stage (``move_stage``, ``get_stage``): the controller blanks the
                       beam, ends the current frame, starts the move and refuses beam-on calls until the
                       stage has settled (:meth:`beamloop.edge.control.safety.BeamSafety.stage_moved`)
=====================  ==================================================================================

A backend with neither has no point queues (``queue_points``, ``fetch_points`` and ``abort_points`` are
not served). The beam's state lives here, not in the backend: :attr:`ScanController.blanked`,
:attr:`~ScanController.probe` and :attr:`~ScanController.queue` change only when the controller tells the
backend to act (the backend reports back what it applied), so the controller can answer ``get_state``, and
guard the beam, without asking the hardware.

Time comes from an injectable ``clock`` (monotonic seconds): the watchdog, the parked-beam time limit, the
pacing of parked-probe samples and the serve loop's duration all read it, so tests can run them on a clock
they move by hand.

Beam safety (:mod:`beamloop.edge.control.safety`): the controller reports every change it makes to the beam
to its guard as it makes it (before asking the hardware to unblank, after it read the blanker back), so the
guard never depends on a reply. A handler that fails after it may have changed the beam (or while asking
the hardware) gets the beam blanked before the error reply goes out. A blank the hardware refuses is tried
again at every turn of the serve loop. :meth:`ScanController.serve` also starts the bridge's backstop timer
(:meth:`beamloop.edge.control.server.BridgeServer.start_backstop`), a thread of its own that blanks the beam
when its owner is silent and the serve loop is held up, through the backend directly if the loop holds the
lock.

Point queues of a :class:`ParkedProbe` backend are timed as a scan sequencer times them: each point lasts
exactly its samples (``dwell_us`` rounded down to whole samples, checked again against the dwell and dose
limits), the next point starts where the last one ended, whenever the serve loop gets to produce the
samples, and ``dwell_end`` reports the sample at which the beam went off.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import zmq

from beamloop.edge.control.keys import ServerKeys, check_bind
from beamloop.edge.control.protocol import (
    REARM_POLICIES,
    STAGE_CALLS,
    TRIGGER_CALLS,
    BridgeError,
    ScanLimits,
    StageLimits,
    check_channels,
    check_detectors,
    check_track,
    encode_array,
    parse_acquire_frame,
    parse_move_stage,
)
from beamloop.edge.control.safety import BeamSafety, SafetyLimits, fraction_pair
from beamloop.edge.control.server import BridgeServer
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame
from beamloop.streams.native.sender import FrameSender

log = logging.getLogger("beamloop.control")

Handler = Callable[[dict], dict]
"""A bridge call's handler: the request's ``args`` in, the result map out (or a raised :class:`BridgeError`)."""

CALLS = ("get_capabilities", "get_state", "acquire_frame", "set_probe", "blank", "stop")
"""Calls every :class:`ScanController` serves (besides ``heartbeat``, which the server adds; a
:class:`TriggerProbe` backend adds :data:`beamloop.edge.control.protocol.TRIGGER_CALLS`)."""

QUEUE_CALLS = ("queue_points", "fetch_points", "abort_points")

BLOCKS_PER_STEP = 8
"""Most parked-probe blocks one :meth:`ScanController.step` produces: a controller that fell behind the clock
catches up over several turns of the serve loop, serving the requests that wait (a blank) in between."""
"""Calls of a controller whose backend can visit points (:class:`ParkedProbe` or :class:`PointProbe`)."""


MAX_BLOCK_SAMPLES = 1 << 20
"""Most samples in one parked-probe message."""

SAMPLE_TIME_US = (0.01, 1e6)
"""Shortest and longest parked-probe sample time, microseconds (10 ns: a fast ADC's sample; 1 s)."""


class EventLog(list):
    """The controller's event list, bounded: past ``limit`` events the oldest half is dropped.

    Indexes seen by clients (``since`` of ``sim_events``) stay valid as absolute counts: :attr:`base` is how
    many events were dropped before the first one held, :attr:`total` how many were ever appended.

    Parameters
    ----------
    limit : int
        Most events held (at least 2).
    """

    def __init__(self, limit: int = 200_000) -> None:
        super().__init__()
        self.limit = max(int(limit), 2)
        self.base = 0

    @property
    def total(self) -> int:
        """Events appended so far, dropped ones included."""
        return self.base + len(self)

    def append(self, event: Any) -> None:
        """Add ``event``; drop the oldest half when more than ``limit`` are held."""
        super().append(event)
        if len(self) > self.limit:
            k = len(self) - self.limit // 2
            del self[:k]
            self.base += k

    def since(self, index: int) -> list:
        """Events with absolute index ``index`` or later (those still held)."""
        return self[max(index - self.base, 0):]


# what a backend declares and returns ------------------------------------------------------------------
@dataclass(frozen=True)
class ParkedStream:
    """The parked-probe signal of a :class:`ParkedProbe` backend, as the frame stream carries it.

    Attributes
    ----------
    sample_time_us : float
        Time per sample (one detector count value), microseconds, in :data:`SAMPLE_TIME_US`.
    block_samples : int
        Samples per stream message (one frame of shape ``(1, block_samples)``), 1 to
        :data:`MAX_BLOCK_SAMPLES`.
    channel : str
        Channel name of the parked series.
    dtype : str
        Sample dtype (numpy name).
    user_data : mapping
        Extra fields of the parked series' ``user_data`` (after ``kind``, ``probe_position``, ``frame_id``,
        ``sample_time_s``).

    Raises
    ------
    ValueError
        ``block_samples`` or ``sample_time_us`` outside its range.
    """

    sample_time_us: float
    block_samples: int
    channel: str = "haadf"
    dtype: str = "uint16"
    user_data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (isinstance(self.block_samples, int) and not isinstance(self.block_samples, bool)
                and 1 <= self.block_samples <= MAX_BLOCK_SAMPLES):
            raise ValueError(f"block_samples must be a whole number in [1, {MAX_BLOCK_SAMPLES}], "
                             f"got {self.block_samples!r}")
        lo, hi = SAMPLE_TIME_US
        if not (isinstance(self.sample_time_us, (int, float)) and math.isfinite(self.sample_time_us)
                and lo <= self.sample_time_us <= hi):
            raise ValueError(f"sample_time_us must be in [{lo:g}, {hi:g}] us, got {self.sample_time_us!r}")

    @property
    def block_s(self) -> float:
        """Duration of one block of samples, seconds."""
        return self.block_samples * self.sample_time_us * 1e-6

    def as_dict(self) -> dict:
        """``{"sample_time_us", "block_samples"}``, as ``get_capabilities`` reports it."""
        return {"sample_time_us": self.sample_time_us, "block_samples": self.block_samples}


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do (:meth:`ScanBackend.capabilities`).

    Attributes
    ----------
    limits : ScanLimits
        Frame sizes, dwell times, fields of view and channels that ``acquire_frame`` accepts.
    parked_stream : ParkedStream or None
        The parked-probe signal, for a :class:`ParkedProbe` backend; None: none.
    extras : mapping
        Further fields of the ``get_capabilities`` reply (e.g. ``"simulated": True``).
    """

    limits: ScanLimits
    parked_stream: ParkedStream | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Acquisition:
    """A frame a backend acquired (:meth:`ScanBackend.acquire`).

    Attributes
    ----------
    data : dict str -> ndarray, shape (rows, cols)
        One image per requested channel, in the order requested, all of one dtype.
    user_data : dict
        Extra fields of the frame series' ``user_data`` (after ``kind``, ``scan``, ``pixel_size_A``).
    count_time_s, frame_time_s : float
        Counting and frame time of the series header, seconds (0: not stated).
    events : list of dict
        What happened to the specimen while scanning (e.g. simulated knock-on ejections); the controller
        stamps each with ``t_ns`` and adds it to :attr:`ScanController.events` after sending the frame.
    """

    data: dict[str, np.ndarray]
    user_data: dict = field(default_factory=dict)
    count_time_s: float = 0.0
    frame_time_s: float = 0.0
    events: list[dict] = field(default_factory=list)


@dataclass
class Dwell:
    """The beam unblanked at one parked position of a :class:`ParkedProbe` backend: an open parked series.

    Attributes
    ----------
    fx, fy : float
        Probe position, fractions of frame ``frame_id``.
    frame_id : int
    series_id : int
        Id of the parked series on the frame stream (-1: its start message was not delivered).
    started : float
        Clock time the beam went on here, seconds.
    max_samples : int or None
        Samples after which the dwell ends (a queued point); None: until moved or blanked.
    samples : int
        Samples produced so far.
    counts_sum : int
        Sum of those samples.
    events : list of dict
        Events the backend reported during the dwell (each with its ``sample`` index).
    trigger : dict or None
        The controller-side trigger's decision in this dwell (:attr:`ScanController.trigger_last`), None
        when it made none.
    """

    fx: float
    fy: float
    frame_id: int
    series_id: int
    started: float
    max_samples: int | None
    samples: int = 0
    counts_sum: int = 0
    events: list = field(default_factory=list)
    trigger: dict | None = None


@dataclass
class ArmedTrigger:
    """The controller-side trigger as ``arm_trigger`` set it.

    Attributes
    ----------
    model, hash : str
        The model's name and hash (:func:`beamloop.edge.trigger.model.model_hash`).
    threshold : int
        Integer score threshold.
    rearm : str
        :data:`beamloop.edge.control.protocol.REARM_POLICIES`.
    expected_rate : float or None
        Counts per sample the dwell's history is pre-filled with (None: none).
    latency_ns : float
        Sample in to blank out of the logic, nanoseconds (as the backend reports it).
    armed : bool
        Whether it decides in the next parked dwell (``once``: false after its decision).
    running : bool
        Whether it decides in the open dwell now.
    """

    model: str
    hash: str
    threshold: int
    rearm: str
    expected_rate: float | None
    latency_ns: float
    armed: bool = True
    running: bool = False

    def as_dict(self) -> dict:
        """The fields as a plain dict (the ``get_trigger_state`` reply)."""
        return {"model": self.model, "hash": self.hash, "threshold": self.threshold, "rearm": self.rearm,
                "expected_rate": self.expected_rate, "latency_ns": self.latency_ns, "armed": self.armed,
                "running": self.running}


@dataclass
class PointQueue:
    """A ``queue_points`` request being run.

    Attributes
    ----------
    id : int
        The ``queue_id`` (1, 2, ... per controller).
    points : list of (float, float)
        Positions, fractions of frame ``frame_id``.
    frame_id : int
    dwell_us : float
        Dwell per point, microseconds.
    channel : str
        The signal recorded.
    samples : int
        Parked-probe samples per point (1 for a :class:`PointProbe` backend).
    blank_between : bool
        Blank the beam between points.
    state : str
        ``running``, ``done``, ``aborted``, or what ended it (``watchdog``, ``dwell_limit``).
    mean_counts : list of float
        Mean signal of every point done.
    detectors : tuple of str
        Detectors recorded per point besides the ADF mean (``eels``, ``pattern``; empty: none).
    signals : dict str -> list of ndarray
        Per detector of ``detectors``, the measurement of every point done.
    """

    id: int
    points: list[tuple[float, float]]
    frame_id: int
    dwell_us: float
    channel: str
    samples: int
    blank_between: bool
    state: str = "running"
    mean_counts: list[float] = field(default_factory=list)
    detectors: tuple[str, ...] = ()
    signals: dict[str, list[np.ndarray]] = field(default_factory=dict)


# the hardware Protocols -----------------------------------------------------------------------------------
@runtime_checkable
class ScanBackend(Protocol):
    """The hardware (or physics) calls of a scan controller; :class:`ScanController` owns everything else.

    A backend only executes. It keeps no beam state of its own that the controller relies on, and is
    called under the controller's lock, one call at a time; only ``set_blanked(True)`` may also come from
    the backstop timer's thread, without the lock, when the controller is stuck in another call (it must
    then be safe to call concurrently). Methods may raise :class:`BridgeError` to refuse a request (the
    code and message go back to the client); any other exception is an ``internal`` error, after which
    the controller blanks the beam.
    """

    def capabilities(self) -> Capabilities:
        """Channels, limits, the parked-probe stream (or None) and extra fields of ``get_capabilities``;
        read once, when the controller is built."""
        ...

    def set_frame(self, scan: ScanFrame, channels: tuple[str, ...]) -> dict:
        """Make ``scan`` the frame to acquire next (``acquire_frame``, before its reply).

        ``scan`` and ``channels`` passed :func:`~beamloop.edge.control.protocol.parse_acquire_frame`;
        raise :class:`BridgeError` for what the device cannot do beyond that (e.g. non-square pixels).
        Returns extra fields of the ``acquire_frame`` reply.
        """
        ...

    def acquire(self, scan: ScanFrame, channels: tuple[str, ...]) -> Acquisition:
        """Scan the frame of the last :meth:`set_frame` (after the reply) and return its images."""
        ...

    def park(self, fx: float, fy: float, frame_id: int) -> tuple[float, float]:
        """Put the probe at fractions ``(fx, fy)`` of frame ``frame_id`` (the current one, already
        acquired); return the position applied, as the device reports it."""
        ...

    def set_blanked(self, on: bool) -> bool:
        """Blank (``True``) or unblank the beam; return the blanker's state read back."""
        ...


@runtime_checkable
class ParkedProbe(Protocol):
    """A backend that records the detector signal at a parked probe as a time series."""

    def parked_samples(self, n: int, dwell: Dwell) -> tuple[np.ndarray, list[dict]]:
        """The next ``n`` samples at the parked probe of ``dwell`` (which has produced ``dwell.samples``
        so far), in the dtype of :attr:`ParkedStream.dtype`, and the events that happened meanwhile
        (dicts with a ``sample`` index counted from the dwell's start)."""
        ...


@runtime_checkable
class TrackingProbe(Protocol):
    """A backend that moves the parked probe on at a set rate (drift compensation, ``set_probe``'s ``track``)."""

    def track_probe(self, vx: float, vy: float) -> tuple[float, float]:
        """Move the probe parked last at ``(vx, vy)`` fractions of its frame per second from now on (kept
        inside the frame; zero: stay); returns the rate applied."""


@runtime_checkable
class PointProbe(Protocol):
    """A backend that measures one value at a point of the current frame (the beam already unblanked)."""

    def measure_point(self, fx: float, fy: float, dwell_us: float, channel: str) -> float:
        """Mean signal of ``channel`` with the probe at fractions ``(fx, fy)`` for ``dwell_us``."""
        ...


@runtime_checkable
class PointDetectors(Protocol):
    """A backend with detectors read once per queued point (a spectrometer, a pixelated detector).

    The controller reads them at the end of each point of a queue (the beam still on there, the dose of the
    point's dwell applied), for the detectors the queue names, and returns them in ``fetch_points``.
    """

    def point_detectors(self) -> dict[str, dict]:
        """Detector name (``eels``, ``pattern``) -> its calibration, JSON-ready (``get_capabilities``'
        ``point_detectors``): ``eels`` needs ``channels`` and ``dtype``, ``pattern`` ``shape`` and ``dtype``
        (:func:`beamloop.edge.control.protocol.detector_point_bytes`); read once."""
        ...

    def point_signals(self, fx: float, fy: float, frame_id: int, dwell_us: float,
                      detectors: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The measurement of each of ``detectors`` with the probe at fractions ``(fx, fy)`` of frame
        ``frame_id`` for ``dwell_us``: arrays of the shape and dtype that :meth:`point_detectors` states."""
        ...


@runtime_checkable
class TriggerProbe(Protocol):
    """A :class:`ParkedProbe` backend that decides on its own samples whether the atom under the probe is gone.

    While started, :meth:`ParkedProbe.parked_samples` evaluates the trigger on every sample it produces. When
    the trigger fires on a sample, that sample is the last one returned (fewer than ``n`` samples), the
    backend has blanked the beam itself (its blank line), nothing the beam did after the blank happened
    (no later ejection), the trigger is stopped, and the events include one ``{"type": "trigger",
    "sample": k, "blank_time_ns": t, "latency_ns": l, ...}``: ``k`` the decision sample counted from the
    dwell's start, ``t`` the time from the dwell's start to the blank, nanoseconds (the end of sample ``k``
    plus the logic's latency ``l``).
    """

    def trigger_models(self) -> dict[str, dict]:
        """The models offered, name -> ``{"hash", "threshold", "latency_ns", ...}`` (JSON-ready); read once."""
        ...

    def start_trigger(self, model: str, threshold: int, expected_rate: float | None) -> float:
        """Decide from the next sample on with ``model`` at ``threshold``: fresh history (pre-filled for
        ``expected_rate`` counts per sample when given), latch clear. Returns the logic's latency, ns."""
        ...

    def stop_trigger(self) -> None:
        """Stop deciding (the dwell ended)."""
        ...


@runtime_checkable
class StageBackend(Protocol):
    """A backend with a motorised specimen stage (the controller serves ``move_stage`` and ``get_stage``).

    The controller blanks the beam before :meth:`move_stage` and keeps it blanked until the move's duration
    has passed on its clock; the backend only drives the stage.
    """

    def stage_limits(self) -> StageLimits:
        """Travel range, speed, settle time and backlash of the stage; read once."""
        ...

    def move_stage(self, x_um: float, y_um: float) -> tuple[float, float, float]:
        """Start driving the stage to ``(x_um, y_um)`` (checked against :meth:`stage_limits`); return the
        position the stage reports it will reach, micrometres, and the seconds until it has settled there."""
        ...

    def stage_position(self) -> tuple[float, float]:
        """The stage position as the stage reports it (its encoders), micrometres."""
        ...


# the controller -----------------------------------------------------------------------------------------------
class ScanController:
    """Bridge server, beam safety, frame stream and point queues over one :class:`ScanBackend`.

    Parameters
    ----------
    backend : ScanBackend
        The hardware or the simulator; may also be a :class:`ParkedProbe` or a :class:`PointProbe`.
    control : str
        Bridge endpoint to bind (REP); loopback or host-local unless ``keys`` are given
        (:func:`beamloop.edge.control.keys.check_bind`).
    frames : str
        Frame stream endpoint to bind (PUSH). Sends give up after 200 ms, so that a detector with nobody
        listening cannot stall the controller; what is not delivered is counted (:attr:`dropped_messages`).
        Only local endpoints unless ``insecure_frames``: the frame stream is neither encrypted nor
        authenticated, and frames decide where the beam goes.
    insecure_frames : bool
        Allow binding the frame stream to a network-reachable endpoint.
    limits : SafetyLimits, optional
        The bridge's safety rules; default: :class:`SafetyLimits` with the backend's longest pixel dwell.
    keys : ServerKeys, optional
        CURVE keys of the bridge.
    context : zmq.Context, optional
    clock : callable, optional
        Monotonic seconds (default :func:`time.monotonic`): watchdog, parked-beam time limit, rate limit,
        parked-sample pacing, serve duration, event time stamps. A clock that stands still also stops
        the rate limiter's refill.
    encoding : {"raw", "lz4"}
        Frame stream encoding.
    calls : mapping name -> handler, optional
        Backend-only calls to serve besides the standard ones (e.g. the simulator's ground truth).
    backstop : bool or None
        Start the watchdog's backstop timer thread in :meth:`serve` (default: when the clock is
        :func:`time.monotonic`; a test on a hand-moved clock starts it with :meth:`start_backstop`).

    Attributes
    ----------
    frame : ScanFrame or None
        The current frame (the last ``acquire_frame``).
    blanked : bool
        The beam's blanker, as last set (and read back).
    probe : (float, float, int) or None
        Where the probe is parked: fractions and frame id; None before any ``set_probe`` on this frame.
    dwell : Dwell or None
        The open parked-probe series.
    queue : PointQueue or None
        The running point queue.
    events : EventLog
        What happened (``dwell_end``, ``safety``, ``dropped``, and the backend's events), each with ``t_ns``
        (the last 100 000 to 200 000).
    dropped_messages : int
        Frame stream messages nobody took.
    trigger : ArmedTrigger or None
        The controller-side trigger (a :class:`TriggerProbe` backend, after ``arm_trigger``).
    trigger_decisions : int
        Decisions the controller-side trigger made.
    trigger_last : dict or None
        Its last decision: ``decision_sample``, ``blank_time_ns`` (from the dwell's start), ``blank_t_ns``
        (on the controller's clock), ``latency_ns``, ``series_id``, ``frame_id``, ``model``, ``threshold``.
    frames_endpoint, control_endpoint : str
        The bound endpoints (with the ports chosen for ``*``).
    safety : BeamSafety
    server : BridgeServer
    sender : FrameSender

    Raises
    ------
    TypeError
        ``backend`` is not a :class:`ScanBackend`.
    ValueError
        A name in ``calls`` is a standard call.
    zmq.ZMQError, beamloop.edge.control.keys.InsecureBindError
        An endpoint cannot be bound, or may not be (the bridge without keys, the frame stream without
        ``insecure_frames``); nothing is left open.
    """

    def __init__(self, backend: ScanBackend, *, control: str = "tcp://127.0.0.1:*",
                 frames: str = "tcp://127.0.0.1:*", limits: SafetyLimits | None = None,
                 keys: ServerKeys | None = None, context: zmq.Context | None = None,
                 clock: Callable[[], float] = time.monotonic, encoding: str = "raw",
                 calls: Mapping[str, Handler] | None = None, insecure_frames: bool = False,
                 backstop: bool | None = None) -> None:
        if not isinstance(backend, ScanBackend):
            raise TypeError(f"{type(backend).__name__} does not implement ScanBackend")
        if not insecure_frames:
            check_bind(frames, None, what="frame stream", insecure_option="--insecure")
        self.backend = backend
        self.caps = backend.capabilities()
        stream = self.caps.parked_stream
        self._parked_probe = backend if isinstance(backend, ParkedProbe) and stream is not None else None
        self._parked = stream if self._parked_probe is not None else None
        self._point_probe = backend if self._parked is None and isinstance(backend, PointProbe) else None
        self._trigger_probe = backend if self._parked is not None and isinstance(backend, TriggerProbe) else None
        self._tracking_probe = backend if isinstance(backend, TrackingProbe) else None
        self._stage = backend if isinstance(backend, StageBackend) else None
        self._detectors = backend if isinstance(backend, PointDetectors) else None
        self.point_detectors: dict[str, dict] = {"adf": {"channel": self.caps.limits.channels[0]}}
        if self._detectors is not None:
            self.point_detectors.update({k: dict(v) for k, v in self._detectors.point_detectors().items()
                                         if k != "adf"})
        self._stage_limits = None if self._stage is None else self._stage.stage_limits()
        self.stage_moves = 0
        self._trigger_models = {} if self._trigger_probe is None else dict(self._trigger_probe.trigger_models())
        if self._trigger_probe is not None and not self._trigger_models:
            self._trigger_probe = None  # a trigger without models is no trigger
        self.trigger: ArmedTrigger | None = None
        self.trigger_decisions = 0
        self.trigger_last: dict | None = None
        self._clock = clock
        self._now_ns = time.monotonic_ns if clock is time.monotonic else (lambda: int(self._clock() * 1e9))
        self.frame: ScanFrame | None = None
        self.probe: tuple[float, float, int] | None = None
        self.dwell: Dwell | None = None
        self.queue: PointQueue | None = None
        self._queues: dict[int, PointQueue] = {}
        self.events = EventLog()
        self.dropped_messages = 0
        self._next_frame_id = 1
        self._pending: tuple[ScanFrame, tuple[str, ...]] | None = None
        self._next_block = 0.0
        self._running = False
        self._lock = threading.RLock()
        self._beam_epoch = 0  # counts the controller's requests to the hardware that change the beam
        self._call_epoch = 0  # the epoch when the running handler started
        self._backstop = backstop if backstop is not None else clock is time.monotonic
        self.blanked = bool(backend.set_blanked(True))  # the state held here starts true
        handlers = self._handlers(calls or {})
        self.safety = BeamSafety(limits or SafetyLimits(max_pixel_dwell_us=self.caps.limits.dwell_us[1]),
                                 blank=self._safety_blank, park=self._safety_park, clock=clock,
                                 beam_from_replies=False)
        self.safety.trigger_models = self._trigger_models
        self.safety.stage_limits = self._stage_limits
        self.sender = FrameSender(frames, bind=True, encoding=encoding, context=context, send_timeout_ms=200)
        try:
            self.server = BridgeServer(control, handlers, context=context, safety=self.safety, keys=keys,
                                       lock=self._lock, on_error=self._handler_failed)
        except BaseException:
            self.sender.close(linger_ms=0)
            raise
        self.frames_endpoint = self.sender.endpoint
        self.control_endpoint = self.server.endpoint

    def _handlers(self, calls: Mapping[str, Handler]) -> dict[str, Handler]:
        handlers: dict[str, Handler] = {
            "get_capabilities": self._get_capabilities, "get_state": self._get_state,
            "acquire_frame": self._acquire_frame, "set_probe": self._set_probe, "blank": self._blank,
            "stop": self._stop}
        if self._parked is not None or self._point_probe is not None:
            handlers.update(queue_points=self._queue_points, fetch_points=self._fetch_points,
                            abort_points=self._abort_points)
        if self._trigger_probe is not None:
            handlers.update(arm_trigger=self._arm_trigger, get_trigger_state=self._get_trigger_state)
        if self._stage is not None:
            handlers.update(move_stage=self._move_stage, get_stage=self._get_stage)
        clash = sorted(set(calls) & (set(CALLS) | set(QUEUE_CALLS) | set(TRIGGER_CALLS) | set(STAGE_CALLS)
                                     | {"heartbeat"}))
        if clash:
            raise ValueError(f"calls {clash} are standard calls of the scan controller")
        handlers.update(calls)
        return {name: self._watched(fn) for name, fn in handlers.items()}

    def _watched(self, fn: Handler) -> Handler:
        """``fn`` that notes the beam's epoch when it starts (for :meth:`_handler_failed`)."""
        def run(args: dict) -> dict:
            self._call_epoch = self._beam_epoch
            return fn(args)

        run.__doc__ = fn.__doc__
        return run

    def _handler_failed(self, call: str, exc: BaseException) -> str:
        """The server's hook after a handler raised (under the lock): blank the beam if the handler may have
        changed it (it asked the hardware to park, blank or unblank) or failed unexpectedly with the beam
        on; returns the note for the error reply."""
        refused = isinstance(exc, (BridgeError, BeamPositionError))
        if self._beam_epoch == self._call_epoch and (refused or self.blanked):
            return ""
        log.error("%s failed with the beam possibly changed (%s: %s); blanking it", call, type(exc).__name__, exc)
        action = self.safety.blank_now(f"error in {call}")
        self.safety.counters.error_blanks += 1
        return ("the controller blanked the beam" if action.endswith(": blank")
                else f"the controller could not blank the beam ({action}); it keeps trying")

    # lifecycle -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """End an open parked series, blank the beam and close both sockets (closing twice is harmless)."""
        self.server.stop_backstop()
        with self._lock:
            try:
                if self.queue is not None:
                    self._end_queue("shutdown")
                self._end_dwell("shutdown")
            finally:
                try:
                    self._set_blanked(True)
                finally:
                    self.sender.close(linger_ms=200)
                    self.server.close()

    def reload_keys(self) -> bool:
        """Read the bridge's folder of authorized client keys again (e.g. on SIGHUP); returns whether the
        bridge has keys (:meth:`beamloop.edge.control.server.BridgeServer.reload_keys`)."""
        return self.server.reload_keys()

    def start_backstop(self, **options: Any) -> None:
        """Start the watchdog's backstop timer (:meth:`beamloop.edge.control.server.BridgeServer.start_backstop`),
        which blanks through :meth:`emergency_blank` when the serve loop holds the lock too long."""
        self.server.start_backstop(emergency=self.emergency_blank, **options)

    def emergency_blank(self, reason: str) -> None:
        """Blank through the backend without the lock (from the backstop's thread, while a handler hangs),
        then have the guard blank again properly, under the lock, at its next poll. Never raises."""
        try:
            self.backend.set_blanked(True)
            ok = True
        except Exception as exc:  # noqa: BLE001 - reported, and the guard keeps trying
            log.error("emergency blank failed: %s: %s", type(exc).__name__, exc)
            ok = False
        self.safety.request_blank(reason)
        self.events.append({"type": "safety", "action": "blank" if ok else "blank_failed", "reason": reason,
                            "emergency": True, "t_ns": self._now_ns()})

    def __enter__(self) -> ScanController:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def serve(self, duration_s: float | None = None, stop: Callable[[], bool] | None = None) -> None:
        """Serve requests, acquire frames, stream the parked-probe signal and run point queues.

        Parameters
        ----------
        duration_s : float, optional
            Stop after this many seconds of the controller's clock.
        stop : callable, optional
            Stop once it returns true (checked between requests, at least every 10 ms).

        Notes
        -----
        Also stops after :meth:`stop_serving` (e.g. called by a ``shutdown`` handler). Runs the watchdog's
        backstop timer meanwhile (see ``backstop`` of the class).
        """
        self._running = True
        t_end = None if duration_s is None else self._clock() + duration_s
        if self._backstop:
            self.start_backstop()
        try:
            while self._running:
                if stop is not None and stop():
                    break
                now = self._clock()
                if t_end is not None and now >= t_end:
                    break
                self.handle_one(self._wait_ms(now))
        finally:
            if self._backstop:
                self.server.stop_backstop()

    def stop_serving(self) -> None:
        """Make :meth:`serve` return after the request it is serving."""
        self._running = False

    def handle_one(self, timeout_ms: int = 0) -> bool:
        """One turn of the serve loop: serve a request if one arrives within ``timeout_ms`` (then the
        watchdog and the parked-beam time limit run), then :meth:`step`. Returns whether one was served."""
        served = self.server.handle_one(timeout_ms)
        self.step()
        return served

    def step(self) -> None:
        """Do what is due without a request: acquire a requested frame, send the parked-probe samples
        due by the clock (ending queued points), or measure the next queued point.

        An error on the way (a backend or stream failure) is logged and recorded as an event, and the beam
        is blanked; the serve loop goes on."""
        with self._lock:
            epoch = self._beam_epoch
            try:
                self.run_pending()
                if self._parked is not None:
                    self._advance_dwell()
                elif self.queue is not None:
                    self._measure_next_point()
            except Exception as exc:  # noqa: BLE001 - the serve loop must go on, with the beam safe
                log.error("scan controller step failed: %s: %s", type(exc).__name__, exc)
                self.events.append({"type": "error", "where": "step", "error": f"{type(exc).__name__}: {exc}",
                                    "t_ns": self._now_ns()})
                if self._beam_epoch != epoch or not self.blanked or self.queue is not None:
                    self.safety.blank_now("error in step")
                    self.safety.counters.error_blanks += 1

    def run_pending(self) -> None:
        """Acquire and send the frame asked for by the last ``acquire_frame``, if not done yet."""
        if self._pending is None:
            return
        scan, channels = self._pending
        self._pending = None
        acq = self.backend.acquire(scan, channels)
        try:
            self.sender.start_series(list(channels), scan.shape, acq.data[channels[0]].dtype, number_of_images=1,
                                     count_time=acq.count_time_s, frame_time=acq.frame_time_s,
                                     user_data={"kind": "frame", "scan": scan.as_dict(),
                                                "pixel_size_A": scan.pixel_size_A, **acq.user_data})
            self.sender.send_frame(acq.data, user_data={"frame_id": scan.frame_id})
            self.sender.end_series()
        except TimeoutError as exc:
            self._dropped(f"frame {scan.frame_id}", exc)
        for ev in acq.events:
            self._record(ev)

    def _wait_ms(self, now: float) -> int:
        if self._pending is not None or (self._point_probe is not None and self.queue is not None):
            return 0
        if self.dwell is not None and now >= self._next_block:
            return 0  # behind the clock: catch up
        if self.dwell is not None:
            return min(max(int((self._next_block - now) * 1000), 0), 10)
        return 10

    # bridge handlers -----------------------------------------------------------------------------------
    def _get_capabilities(self, args: dict) -> dict:
        lim = self.caps.limits
        return {"calls": sorted(self.server.handlers), "channels": list(lim.channels),
                "shape_limits": list(lim.shape), "dwell_us_limits": list(lim.dwell_us),
                "parked_stream": None if self.caps.parked_stream is None else self.caps.parked_stream.as_dict(),
                "safety": self.safety.state()["limits"], "trigger": self._trigger_caps(),
                "max_fov_nm": lim.max_fov_nm,
                "stage": None if self._stage_limits is None else self._stage_limits.as_dict(),
                "point_detectors": self.point_detectors if "queue_points" in self.server.handlers else None,
                **self.caps.extras}

    def _move_stage(self, args: dict) -> dict:
        """``move_stage``: blank, end the frame and any parked series, start the move; beam-on calls wait for
        the settle time (:meth:`beamloop.edge.control.safety.BeamSafety.stage_moved`)."""
        assert self._stage is not None and self._stage_limits is not None
        self._check_idle()
        x, y = parse_move_stage(args, self._stage_limits)
        self.run_pending()  # a frame asked for before the move is scanned where it was asked for
        self._end_dwell("stage")
        self._set_blanked(True)
        if not self.blanked:
            raise BridgeError("internal", "the blanker did not read back blanked; the stage was not moved",
                              "move_stage")
        self._beam_epoch += 1
        ax, ay, duration = self._stage.move_stage(x, y)
        self.stage_moves += 1
        self.probe = None
        self.frame = None
        self.safety.stage_moved(duration)
        self._report()
        self.events.append({"type": "stage_move", "target_um": [x, y], "applied_um": [ax, ay],
                            "duration_s": duration, "t_ns": self._now_ns()})
        return {"applied": {"x_um": ax, "y_um": ay}, "duration_s": duration, "blanked": self.blanked}

    def _get_stage(self, args: dict) -> dict:
        """``get_stage``: position (the stage's readback), whether it moves, seconds until settled."""
        assert self._stage is not None
        x, y = self._stage.stage_position()
        left = max(self.safety.stage_settled_at - self._clock(), 0.0)
        return {"x_um": x, "y_um": y, "moving": left > 0, "settles_in_s": left, "moves": self.stage_moves}

    def _trigger_caps(self) -> dict | None:
        """The ``trigger`` field of ``get_capabilities``: None without a controller-side trigger."""
        if self._trigger_probe is None:
            return None
        return {"where": "controller", "models": {k: dict(v) for k, v in self._trigger_models.items()},
                "rearm": list(REARM_POLICIES)}

    def _arm_trigger(self, args: dict) -> dict:
        """``arm_trigger``: deploy the model to the backend's trigger (checked by the guard before; never
        touches the blanker, except that a trigger started in an open dwell may blank it later)."""
        req = self.safety.check_arm_trigger(args)
        info = self._trigger_models[req.model]
        thr = int(info["threshold"]) if req.threshold is None else req.threshold
        if self.trigger is not None and self.trigger.running:
            self._stop_trigger()
        self.trigger = ArmedTrigger(req.model, str(info.get("hash", "")), thr, req.rearm, req.expected_rate,
                                    float("nan"))
        d = self.dwell
        if d is not None and self.queue is None and d.max_samples is None:
            self._start_trigger()  # the beam is on here now: decide from its next sample
        return {**self._get_trigger_state({}), "blanked": self.blanked}

    def _get_trigger_state(self, args: dict) -> dict:
        """``get_trigger_state``: the armed trigger (or ``armed: false``), decisions so far, the last one."""
        t = self.trigger
        state = t.as_dict() if t is not None else {"armed": False, "running": False, "model": None}
        return {**state, "where": "controller", "decisions": self.trigger_decisions, "last": self.trigger_last}

    def _get_state(self, args: dict) -> dict:
        p = self.probe
        return {"frame_id": None if self.frame is None else self.frame.frame_id,
                "probe": "idle" if p is None else "parked", "blanked": self.blanked,
                "probe_position": None if p is None else [p[0], p[1]],
                "queue_id": None if self.queue is None else self.queue.id, "safety": self.safety.state()}

    def _check_idle(self) -> None:
        if self.queue is not None:
            raise BridgeError("busy", f"point queue {self.queue.id} is running; abort it first")

    def _check_position(self, args: dict) -> tuple[float, float, int]:
        if "x" not in args or "y" not in args or "frame_id" not in args:
            raise BridgeError("bad_request", "set_probe needs x, y and frame_id")
        fx, fy = fraction_pair(args["x"], args["y"])
        fid = args["frame_id"]
        if self.frame is None or not isinstance(fid, int) or fid != self.frame.frame_id:
            cur = None if self.frame is None else self.frame.frame_id
            raise BeamPositionError("stale_frame", f"frame {fid!r} is not the current frame ({cur})")
        return fx, fy, fid

    def _acquire_frame(self, args: dict) -> dict:
        self._check_idle()
        self.run_pending()
        req = parse_acquire_frame(args, self.caps.limits)
        scan = ScanFrame(self._next_frame_id, req.shape, req.fov_nm, center_nm=req.center_nm, dwell_us=req.dwell_us)
        extras = self.backend.set_frame(scan, req.channels)
        self._next_frame_id += 1
        self._end_dwell("scan")
        self.probe = None
        self.frame = scan
        self._report()
        self._pending = (scan, req.channels)
        return {"frame_id": scan.frame_id, "scan": scan.as_dict(), **extras}

    def _set_probe(self, args: dict) -> dict:
        self._check_idle()
        fx, fy, fid = self._check_position(args)
        track = check_track(args["track"]) if args.get("track") is not None else None
        self._end_dwell("moved")
        ax, ay = self._park(fx, fy, fid)
        applied: dict = {"x": ax, "y": ay, "frame_id": fid}
        if track is not None:  # a backend that cannot track says so: the probe stays where it was put
            applied["track"] = (list(self._tracking_probe.track_probe(*track)) if self._tracking_probe is not None
                                else None)
        if not self.blanked:
            self._start_dwell(None)
        return {"applied": applied, "blanked": self.blanked}

    def _stop(self, args: dict) -> dict:
        """``stop``: end a running point queue and a parked series, and blank the beam."""
        return self._blank({"on": True}, "stopped")

    def _blank(self, args: dict, reason: str = "blanked") -> dict:
        on = args.get("on")
        if not isinstance(on, bool):
            raise BridgeError("bad_request", "blank needs on (boolean)")
        if on:
            try:
                if self.queue is not None:
                    self._end_queue("aborted")
                self._end_dwell(reason)
            finally:
                self._set_blanked(True)  # whatever failed before, the beam goes off
        else:
            self._check_idle()
            self._set_blanked(False)
            if self.probe is not None and self.dwell is None:
                self._start_dwell(None)
        return {"blanked": self.blanked}

    def _queue_points(self, args: dict) -> dict:
        self._check_idle()
        try:
            pts = [(p[0], p[1]) for p in args["points"]]
            dwell_us = float(args["dwell_us"])
            fid = args["frame_id"]
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise BridgeError("bad_request", f"queue_points needs points, dwell_us and frame_id: {exc}") from None
        if not pts:
            raise BridgeError("bad_request", "queue_points got no points")
        # the dwell and dose per point were checked by self.safety before this handler ran
        channel = check_channels([args.get("signal", self.caps.limits.channels[0])], self.caps.limits)[0]
        detectors = () if args.get("detectors") is None else check_detectors(args["detectors"],
                                                                             self.point_detectors, len(pts))
        extra = tuple(d for d in detectors if d != "adf")
        checked = [self._check_position({"x": x, "y": y, "frame_id": fid})[:2] for x, y in pts]
        ps = self._parked
        n = 1
        if ps is not None:
            # whole samples, never more than asked for: the dwell (and dose) the sequencer really applies
            n = int(math.floor(dwell_us / ps.sample_time_us + 1e-9))
            if n < 1:
                raise BridgeError("out_of_range", f"dwell {dwell_us:g} us per point is shorter than one sample "
                                                  f"({ps.sample_time_us:g} us) of this controller")
            dwell_us = n * ps.sample_time_us
            self.safety.check_point_dwell(dwell_us)
        qid = len(self._queues) + 1
        self._end_dwell("moved")
        self.queue = self._queues[qid] = PointQueue(qid, checked, fid, dwell_us, channel, n,
                                                    bool(args.get("blank_between", True)), detectors=extra,
                                                    signals={d: [] for d in extra})
        if ps is not None:
            self._next_queue_point(self._clock())
        return {"queue_id": qid, "points": len(checked), "samples_per_point": n, "dwell_us": dwell_us}

    def _queue_state(self, qid) -> PointQueue:
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise BridgeError("bad_request", f"queue_id must be an integer, got {qid!r}")
        q = self._queues.get(qid)
        if q is None:
            raise BridgeError("out_of_range", f"no point queue {qid!r}")
        return q

    def _fetch_points(self, args: dict) -> dict:
        q = self._queue_state(args.get("queue_id"))
        start = args.get("start", 0)
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise BridgeError("bad_request", f"fetch_points start must be a whole number >= 0, got {start!r:.40}")
        out = {"queue_id": q.id, "state": q.state, "done": len(q.mean_counts), "total": len(q.points),
               "mean_counts": list(q.mean_counts[start:])}
        if start:
            out["start"] = start
        if q.detectors and args.get("measurements", True) is not False:
            out["measurements"] = {d: encode_array(self._stacked(q, d, start)) for d in q.detectors}
        return out

    def _stacked(self, q: PointQueue, detector: str, start: int) -> np.ndarray:
        """The measurements of ``detector`` from point ``start`` on, stacked: (k, ...) in its dtype."""
        got = q.signals[detector][start:]
        if got:
            return np.stack(got)
        cal = self.point_detectors[detector]
        shape = (int(cal["channels"]),) if detector == "eels" else tuple(int(v) for v in cal["shape"])
        return np.zeros((0, *shape), np.dtype(cal.get("dtype", "<u4")))

    def _point_signals(self, q: PointQueue, fx: float, fy: float) -> None:
        """Read the queue's detectors at the point just done (the beam still on there)."""
        if not q.detectors:
            return
        if self._detectors is None:  # check_detectors let nothing else through
            raise BridgeError("internal", f"detectors {list(q.detectors)} have no backend")
        got = self._detectors.point_signals(fx, fy, q.frame_id, q.dwell_us, q.detectors)
        checked = []
        for d in q.detectors:
            cal = self.point_detectors[d]
            a = np.asarray(got[d])
            shape = (int(cal["channels"]),) if d == "eels" else tuple(int(v) for v in cal["shape"])
            if a.shape != shape:
                raise BridgeError("internal", f"detector {d} gave shape {a.shape}, its calibration says {shape}")
            checked.append(a.astype(np.dtype(cal.get("dtype", "<u4")), copy=False))
        for d, a in zip(q.detectors, checked):  # all or none: every list stays as long as mean_counts
            q.signals[d].append(a)

    def _abort_points(self, args: dict) -> dict:
        q = self._queue_state(args.get("queue_id"))
        if q.state == "running":
            self._finish_queue("aborted")
        return {"queue_id": q.id, "state": q.state, "blanked": self.blanked}

    # the beam ---------------------------------------------------------------------------------------------
    def _report(self, moved: bool = False) -> None:
        """Tell the guard the beam's state as held here."""
        pos = None if self.probe is None else (self.probe[0], self.probe[1])
        self.safety.beam_changed(self.blanked, pos, queue=self.queue is not None, moved=moved)

    def _set_blanked(self, on: bool) -> None:
        self._beam_epoch += 1
        if not on:  # on from the moment it is asked for, whatever the hardware then says or raises
            self.blanked = False
            self._report()
        try:
            self.blanked = bool(self.backend.set_blanked(on))
        finally:
            self._report()

    def _park(self, fx: float, fy: float, frame_id: int) -> tuple[float, float]:
        self.run_pending()  # the backend parks on a frame it has acquired
        self._beam_epoch += 1
        ax, ay = self.backend.park(fx, fy, frame_id)
        self.probe = (ax, ay, frame_id)
        self._report(moved=True)
        return ax, ay

    def _record(self, event: dict) -> dict:
        event = {**event, "t_ns": self._now_ns()}
        self.events.append(event)
        return event

    def _dropped(self, what: str, exc: Exception) -> None:
        """A message nobody took (no receiver connected, or one too slow): count it and go on."""
        self.dropped_messages += 1
        self.sender.series = None
        self.events.append({"type": "dropped", "what": what, "error": str(exc), "t_ns": self._now_ns()})
        log.warning("%s not delivered: %s", what, exc)

    # safety actions (called by self.safety: watchdog, parked-beam time limit, failed handlers) ---------------
    def _safety_blank(self, reason: str) -> None:
        """Blank the beam now, ending a running point queue or parked series (``reason`` in the event); the
        blanker is set even when ending those fails. Raises when the hardware refuses to blank (the guard
        counts it and tries again)."""
        try:
            if self.queue is not None:
                self._end_queue(reason)
            self._end_dwell(reason)
        except Exception as exc:  # noqa: BLE001 - the blank below matters more
            log.error("ending the dwell before a safety blank failed: %s: %s", type(exc).__name__, exc)
        finally:
            self.queue, self.dwell = None, None
            self._set_blanked(True)
        self.events.append({"type": "safety", "action": "blank", "reason": reason, "t_ns": self._now_ns()})

    def _safety_park(self, fx: float, fy: float) -> None:
        """Park the probe at fractions ``(fx, fy)`` of the current frame, leaving the blanker as it is
        (a running point queue ends with state ``watchdog``)."""
        if self.frame is None:  # BeamSafety parks only on a current frame; blank should that ever fail
            self._safety_blank("watchdog")
            return
        self.run_pending()
        if self.queue is not None:
            self._end_queue("watchdog")
        self._end_dwell("watchdog")
        self._park(fx, fy, self.frame.frame_id)
        if not self.blanked:
            self._start_dwell(None)
        self.events.append({"type": "safety", "action": "park", "position": [fx, fy], "t_ns": self._now_ns()})

    # parked probe ---------------------------------------------------------------------------------------------
    def _start_dwell(self, max_samples: int | None, t0: float | None = None) -> None:
        """Open a parked series at the probe; ``t0``: clock time the beam went on here (default now; a queued
        point starts where the last one ended)."""
        ps = self._parked
        if ps is None or self.probe is None:
            return
        fx, fy, fid = self.probe
        try:
            series = self.sender.start_series(
                [ps.channel], (1, ps.block_samples), np.dtype(ps.dtype), count_time=ps.block_s,
                frame_time=ps.block_s, user_data={"kind": "parked", "probe_position": [fx, fy], "frame_id": fid,
                                                  "sample_time_s": ps.sample_time_us * 1e-6, **ps.user_data})
        except TimeoutError as exc:
            self._dropped("parked-probe series start", exc)
            series = None
        start = self._clock() if t0 is None else t0
        self.dwell = Dwell(fx, fy, fid, -1 if series is None else series.series_id, start, max_samples)
        self._next_block = self._block_end(self.dwell)
        if self.trigger is not None and self.trigger.armed and max_samples is None and self.queue is None:
            self._start_trigger()

    def _start_trigger(self) -> None:
        t, probe = self.trigger, self._trigger_probe
        assert t is not None and probe is not None
        t.latency_ns = float(probe.start_trigger(t.model, t.threshold, t.expected_rate))
        t.running = True

    def _stop_trigger(self) -> None:
        t, probe = self.trigger, self._trigger_probe
        if t is not None and t.running and probe is not None:
            t.running = False
            probe.stop_trigger()

    def _trigger_fired(self, d: Dwell, ev: dict) -> None:
        """The backend's trigger decided on a sample of ``d`` and blanked the beam: end the dwell there, read
        the blanker back, and apply the rearm policy."""
        t = self.trigger
        if t is not None:
            t.running = False
            if t.rearm == "once":
                t.armed = False
        blank_ns = float(ev["blank_time_ns"])
        self.trigger_decisions += 1
        self.trigger_last = d.trigger = {
            "decision_sample": int(ev["sample"]), "blank_time_ns": blank_ns,
            "blank_t_ns": int(round(d.started * 1e9 + blank_ns)),
            "latency_ns": float(ev.get("latency_ns", math.nan if t is None else t.latency_ns)),
            "series_id": d.series_id, "frame_id": d.frame_id, "model": ev.get("model", None if t is None else t.model),
            "threshold": ev.get("threshold", None if t is None else t.threshold),
            "baseline_rate": ev.get("baseline_rate")}
        try:
            self._end_dwell("trigger")
        finally:
            self._set_blanked(True)  # the backend blanked itself; read the blanker back and tell the guard

    def _block_end(self, d: Dwell) -> float:
        """Clock time the next block of ``d`` is complete: a full block, or a queued point's last samples."""
        ps = self._parked
        assert ps is not None
        n = ps.block_samples if d.max_samples is None else min(ps.block_samples, d.max_samples - d.samples)
        return d.started + (d.samples + n) * ps.sample_time_us * 1e-6

    def _end_dwell(self, reason: str) -> None:
        d, ps = self.dwell, self._parked
        if d is None or ps is None:
            return
        self.dwell = None
        self._stop_trigger()
        try:
            self.sender.end_series({"reason": reason, "samples": d.samples})
        except TimeoutError as exc:
            self._dropped(f"end of parked series {d.series_id}", exc)
        if (reason == "point_done" and d.max_samples is not None) or d.trigger is not None:
            # sequencer-timed, or blanked by the trigger's logic: the beam went off exactly after these samples
            off = d.samples
        else:  # the beam went off now: count samples by the sample clock, not by blocks already sent
            clock = int((self._clock() - d.started) / (ps.sample_time_us * 1e-6))
            off = max(clock, d.samples - ps.block_samples)
        self.events.append({"type": "dwell_end", "series_id": d.series_id, "frame_id": d.frame_id, "reason": reason,
                            "samples": d.samples, "beam_off_sample": off,
                            "position": [d.fx, d.fy], "t_ns": self._now_ns(),
                            "ejection_samples": [e["sample"] for e in d.events
                                                 if e.get("type") not in ("trigger", "probe_landed")],
                            "trigger": d.trigger})

    def _advance_dwell(self) -> None:
        ps, probe = self._parked, self._parked_probe
        if ps is None or probe is None:
            return
        for _ in range(BLOCKS_PER_STEP):
            if self.dwell is None or self._clock() < self._next_block:
                break
            d = self.dwell
            n = ps.block_samples if d.max_samples is None else min(ps.block_samples, d.max_samples - d.samples)
            counts, events = probe.parked_samples(n, d)
            fired = next((ev for ev in events if ev.get("type") == "trigger"), None)
            n = len(counts)  # fewer than asked for only when the backend's trigger blanked the beam
            d.events.extend(self._record(ev) for ev in events)
            d.samples += n
            d.counts_sum += int(counts.sum())
            if n < ps.block_samples:
                counts = np.concatenate([counts, np.zeros(ps.block_samples - n, counts.dtype)])
            if self.sender.series is not None:
                what = f"parked samples {d.samples - n}..{d.samples}"
                if not self.sender.socket.poll(0, zmq.POLLOUT):
                    # nobody takes the stream now: drop the block at once instead of holding the serve loop
                    # (and with it every request, a blank too) for the send timeout
                    self._dropped(what, TimeoutError("frame stream not writable (receiver gone or too slow)"))
                else:
                    try:
                        self.sender.send_frame(counts[None, :], user_data={"first_sample": d.samples - n,
                                                                           "valid": n})
                    except TimeoutError as exc:
                        self._dropped(what, exc)
            if fired is not None:
                self._trigger_fired(d, fired)
                break
            if d.max_samples is not None and d.samples >= d.max_samples:
                self._end_point()  # the next point, if any, starts where this one ended
            else:
                self._next_block = self._block_end(d)

    # point queues ---------------------------------------------------------------------------------------------
    def _next_queue_point(self, t0: float) -> None:
        q = self.queue
        assert q is not None
        fx, fy = q.points[len(q.mean_counts)]
        self._park(fx, fy, q.frame_id)
        self._set_blanked(False)
        self._start_dwell(q.samples, t0)

    def _end_point(self) -> None:
        q, d, ps = self.queue, self.dwell, self._parked
        assert q is not None and d is not None and ps is not None
        t_end = d.started + d.samples * ps.sample_time_us * 1e-6
        self._point_signals(q, d.fx, d.fy)
        q.mean_counts.append(d.counts_sum / max(d.samples, 1))
        self._end_dwell("point_done")
        if len(q.mean_counts) >= len(q.points):
            self._finish_queue("done")
        else:
            if q.blank_between:
                self._set_blanked(True)
            self._next_queue_point(t_end)

    def _measure_next_point(self) -> None:
        q, probe = self.queue, self._point_probe
        if q is None or probe is None:
            return
        fx, fy = q.points[len(q.mean_counts)]
        self._set_blanked(False)
        value = probe.measure_point(fx, fy, q.dwell_us, q.channel)
        self._point_signals(q, fx, fy)
        if q.blank_between:
            self._set_blanked(True)
        q.mean_counts.append(float(value))
        if len(q.mean_counts) == len(q.points):
            self._finish_queue("done")

    def _end_queue(self, state: str) -> None:
        q = self.queue
        assert q is not None
        self._end_dwell(state)
        q.state = state
        self.queue = None
        self._report()

    def _finish_queue(self, state: str) -> None:
        self._end_queue(state)
        self._set_blanked(True)
