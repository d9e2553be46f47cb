"""The edge service: frames in from the detector stream, beam positions out through the control bridge.

:class:`EdgeService` owns the receiver, the frame pipeline (:mod:`beamloop.edge.path`), the bridge client and
the trigger. :meth:`EdgeService.next_frame` is receive -> decode -> pipeline; :meth:`EdgeService.dwell`
is bridge -> trigger for one target. Experiments (:mod:`beamloop.edge.experiments.vacancy_line`) combine the two.

While it waits for messages the service sends the scan controller a ``heartbeat`` whenever the bridge
has been silent for ``heartbeat_s``, so that the controller's watchdog (:mod:`beamloop.edge.control.safety`) blanks the
beam only when the service has really stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from beamloop.edge.control.bridge import BridgeClient, BridgeError
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.path import FramePipeline, FrameResult
from beamloop.edge.stages.policy import Target
from beamloop.edge.stages.preprocess import FrameError
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame
from beamloop.edge.trigger.classical import make_trigger
from beamloop.streams.errors import ProtocolError
from beamloop.streams.native.receiver import Frame, FrameReceiver, StreamEnd, StreamStart

log = logging.getLogger("beamloop.service")

BEAM_CALLS = ("set_probe", "blank", "queue_points")
"""Bridge calls whose round trip is the ``bridge`` stage; others are recorded as ``bridge:<call>``."""


@dataclass
class DwellResult:
    """What happened while the beam was parked on one target.

    Attributes
    ----------
    target : Target
    reason : str
        Why the dwell ended: ``trigger`` (the trigger fired and the beam was blanked), ``max_dwell``
        (no event within the time limit), ``controller_ended`` (the scan controller ended the stream),
        ``stream_timeout`` (no samples arrived), ``rejected`` (position refused before sending),
        ``bridge_error``.
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
    """

    target: Target
    reason: str = ""
    trigger_sample: int = -1
    samples: int = 0
    series_id: int = -1
    set_probe_reply_ns: int = 0
    error: str = ""
    baseline_rate: float = float("nan")


@dataclass
class ServiceStats:
    """Counts of what the service rejected or skipped, with the last few error texts."""

    frame_errors: int = 0
    protocol_errors: int = 0
    skipped_messages: int = 0
    heartbeat_errors: int = 0
    errors: list = field(default_factory=list)

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
    pipeline : FramePipeline
    bridge : BridgeClient, optional
        Connected to the scan controller; without it the service only processes frames.
    trigger : str
        Trigger kind for dwells (:func:`beamloop.edge.trigger.classical.make_trigger`): ``"model"`` (the shipped quantized
        ejection model, default), ``"cusum"`` or ``"window"``.
    trigger_options : dict, optional
    latency : LatencyRecorder, optional
        Shared with the pipeline; a new one by default.
    heartbeat_s : float or None
        Send a ``heartbeat`` when the bridge has been silent this long, seconds (checked while waiting
        for messages); None: never. Keep it well below the controller's watchdog period (1 s for the
        simulated microscope). A controller that does not know the call turns heartbeats off.
    """

    def __init__(self, receiver: FrameReceiver, pipeline: FramePipeline, bridge: BridgeClient | None = None,
                 trigger: str = "model", trigger_options: dict | None = None,
                 latency: LatencyRecorder | None = None, heartbeat_s: float | None = 0.25) -> None:
        self.receiver = receiver
        self.pipeline = pipeline
        self.bridge = bridge
        self.heartbeat_s = heartbeat_s if bridge is not None else None
        self._no_beat_before = 0.0
        self.latency = latency or pipeline.latency or LatencyRecorder()
        pipeline.latency = self.latency
        self.trigger = make_trigger(trigger, **(trigger_options or {}))
        self.stats = ServiceStats()
        if bridge is not None:
            bridge.on_round_trip = self._record_round_trip

    def _record_round_trip(self, call: str, ns: int) -> None:
        self.latency.add("bridge" if call in BEAM_CALLS else f"bridge:{call}", ns)

    # heartbeats ------------------------------------------------------------------------------------
    def _next_beat(self) -> float:
        """``time.monotonic()`` when the next heartbeat is due."""
        return max(self.bridge.last_sent + self.heartbeat_s, self._no_beat_before)

    def beat_if_due(self) -> None:
        """Send a heartbeat if the bridge has been silent for ``heartbeat_s``; never raises.

        A failed heartbeat is counted (``stats.heartbeat_errors``) and the next is tried ``heartbeat_s``
        later; ``unknown_call`` turns heartbeats off (a controller without a watchdog).
        """
        if self.heartbeat_s is None or time.monotonic() < self._next_beat():
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

    # receive -> pipeline -------------------------------------------------------------------------
    def _recv_once(self, timeout_ms: int):
        try:
            return self.receiver.recv(timeout_ms)
        except ProtocolError as exc:
            self.stats.protocol_errors += 1
            self.stats.note(str(exc))
            log.warning("stream: %s", exc)
            return False

    def _recv(self, timeout_ms: int):
        """Next message within ``timeout_ms`` (None when none; False for a rejected one), sending
        heartbeats while waiting."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            self.beat_if_due()
            now = time.monotonic()
            wait = deadline - now
            if self.heartbeat_s is not None:
                wait = min(wait, self._next_beat() - now)
            ev = self._recv_once(max(math.ceil(wait * 1000), 0))
            if ev is not None or time.monotonic() >= deadline:
                return ev

    def next_frame(self, timeout_ms: int = 5000) -> tuple[Frame, FrameResult, ScanFrame | None] | None:
        """Receive the next scanned frame and run the pipeline on it.

        Parked-probe samples and bad messages met on the way are skipped (counted). Returns
        ``(frame, result, scan)`` or None when nothing arrived within ``timeout_ms`` (per message).
        A frame the pipeline rejects (:class:`~beamloop.edge.stages.preprocess.FrameError`) is counted and skipped.
        """
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            ev = self._recv(max(int((deadline - time.monotonic()) * 1000), 1))
            if ev is None:
                return None
            if not isinstance(ev, Frame):
                continue
            ud = ev.series.user_data
            if ud.get("kind", "frame") != "frame":
                self.stats.skipped_messages += 1
                continue
            sent = ev.header.user_data.get("sent_ns")
            if isinstance(sent, int):
                self.latency.add("receive", ev.recv_ns - sent)
            self.latency.add("decode", ev.decoded_ns - ev.recv_ns)
            scan = None
            if isinstance(ud.get("scan"), dict):
                try:
                    scan = ScanFrame.from_dict(ud["scan"])
                except ValueError as exc:
                    self.stats.note(str(exc))
            image = ev.data[ev.series.channels[0]]
            try:
                result = self.pipeline.process(image, ud.get("pixel_size_A"), scan)
            except FrameError as exc:
                self.stats.frame_errors += 1
                self.stats.note(f"frame {ev.image_id}: {exc}")
                log.warning("frame %d rejected: %s", ev.image_id, exc)
                continue
            return ev, result, scan
        return None

    # bridge -> trigger ---------------------------------------------------------------------------
    def safe_blank(self) -> bool:
        """Blank the beam, swallowing (and counting) bridge errors; returns whether it succeeded."""
        if self.bridge is None:
            return False
        try:
            self.bridge.blank(True)
            return True
        except BridgeError as exc:
            self.stats.note(f"blank failed: {exc}")
            log.error("could not blank the beam: %s", exc)
            return False

    def dwell(self, target: Target, max_dwell_s: float = 2.0, stream_timeout_ms: int = 1000) -> DwellResult:
        """Park the beam on ``target``, unblank, and blank again when the trigger fires.

        The beam is blanked on every way out: trigger, time limit, stream timeout, bridge error.
        Never raises for bridge or stream errors; they end up in the returned :class:`DwellResult`.

        Raises
        ------
        RuntimeError
            The service has no bridge.
        """
        if self.bridge is None:
            raise RuntimeError("dwell() needs a bridge to the scan controller")
        res = DwellResult(target)
        try:
            self.bridge.set_probe(target.fx, target.fy, target.frame_id)
            res.set_probe_reply_ns = time.monotonic_ns()
            self.bridge.blank(False)
        except BeamPositionError as exc:
            res.reason, res.error = "rejected", str(exc)
            return res
        except BridgeError as exc:
            res.reason, res.error = "bridge_error", str(exc)
            self.safe_blank()
            return res
        trig = self.trigger
        trig.start()
        deadline = time.monotonic() + max_dwell_s
        blanked = False
        while True:
            ev = self._recv(stream_timeout_ms)
            if ev is False:
                continue
            if ev is None:
                res.reason = res.reason or "stream_timeout"
                res.error = f"no parked-probe samples for {stream_timeout_ms} ms"
                if not blanked:
                    self.safe_blank()
                break
            if isinstance(ev, StreamStart):
                if ev.series.user_data.get("kind") == "parked":
                    res.series_id = ev.series.series_id
                continue
            if isinstance(ev, StreamEnd):
                if ev.header.series_id == res.series_id:
                    res.reason = res.reason or "controller_ended"
                    break
                continue
            if ev.series.series_id != res.series_id or blanked:
                continue
            block = ev.data[ev.series.channels[0]][0]
            valid = ev.header.user_data.get("valid", block.shape[0])
            t0 = time.perf_counter_ns()
            k = trig.update(block[:valid])
            self.latency.add("trigger", time.perf_counter_ns() - t0)
            res.samples += int(valid)
            if k >= 0 or time.monotonic() > deadline:
                res.reason = "trigger" if k >= 0 else "max_dwell"
                res.trigger_sample = trig.trigger_sample
                blanked = self.safe_blank()
                if not blanked:
                    res.reason, res.error = "bridge_error", "blank after trigger failed"
                    break
        res.baseline_rate = trig.lam0
        return res
