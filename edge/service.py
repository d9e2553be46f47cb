"""The edge service: frames in from the detector stream, beam positions out through the control bridge.

:class:`EdgeService` owns the receiver, the frame path (:mod:`beamloop.edge.path`), the bridge client and
the trigger. :meth:`EdgeService.next_frame` is receive -> decode -> frame path; :meth:`EdgeService.dwell`
is bridge -> trigger for one target. Experiments (:mod:`beamloop.edge.experiments`) combine the two.

While it waits for messages the service sends the scan controller a ``heartbeat`` whenever the bridge
has been silent for ``heartbeat_s``, so that the controller's watchdog (:mod:`beamloop.edge.control.safety`)
blanks the beam only when the service has really stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.protocol import BridgeError
from beamloop.edge.frame.context import FrameContext, FrameMeta
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame
from beamloop.edge.frame.stage import FrameError
from beamloop.edge.path import FramePath
from beamloop.edge.stages.policy import Target
from beamloop.edge.trigger import make_trigger
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


def latency_keys(path: FramePath | tuple[str, ...]) -> tuple[str, ...]:
    """Latency keys of a service running ``path``, in the order a frame meets them: receive, decode, the
    path's stages, bridge, trigger, end to end."""
    names = path.names if isinstance(path, FramePath) else tuple(path)
    return (RECEIVE, DECODE, *names, BRIDGE, TRIGGER, END_TO_END)


STAGES = latency_keys(("preprocess", "find", "classify", "vacancies", "policy"))
"""Latency keys of the service on the classical MoS2 path with a policy (the main job), in order."""


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
    baseline_rate : float
        Counts per sample the trigger took as the column's intact signal (NaN if it never had one).
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
    """

    def __init__(self, receiver: FrameReceiver, path: FramePath, bridge: BridgeClient | None = None,
                 trigger: str = "model", trigger_options: dict | None = None,
                 latency: LatencyRecorder | None = None, heartbeat_s: float | None = 0.25) -> None:
        self.receiver = receiver
        self.path = path
        self.bridge = bridge
        self.heartbeat_s = heartbeat_s if bridge is not None else None
        self._no_beat_before = 0.0
        self.latency = latency or path.latency or LatencyRecorder(latency_keys(path))
        path.latency = self.latency
        self.trigger = make_trigger(trigger, **(trigger_options or {}))
        self.stats = ServiceStats()
        self._series_meta: tuple[int, FrameMeta] | None = None
        if bridge is not None:
            bridge.on_round_trip = self._record_round_trip

    def _record_round_trip(self, call: str, ns: int) -> None:
        self.latency.add(BRIDGE if call in ("set_probe", "blank", "queue_points") else f"{BRIDGE}:{call}", ns)

    # heartbeats ------------------------------------------------------------------------------------
    def _next_beat(self) -> float:
        """``time.monotonic()`` when the next heartbeat is due (never without a bridge or heartbeats)."""
        if self.bridge is None or self.heartbeat_s is None:
            return math.inf
        return max(self.bridge.last_sent + self.heartbeat_s, self._no_beat_before)

    def beat_if_due(self) -> None:
        """Send a heartbeat if the bridge has been silent for ``heartbeat_s``; never raises.

        A failed heartbeat is counted (``stats.heartbeat_errors``) and the next is tried ``heartbeat_s``
        later; ``unknown_call`` turns heartbeats off (a controller without a watchdog).
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

    # receive -> frame path -----------------------------------------------------------------------
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

    def _meta(self, ev: ImageEvent, image: np.ndarray) -> FrameMeta:
        """The frame path's metadata of ``ev``'s series (made once per series)."""
        sid = ev.series.series_id
        if self._series_meta is None or self._series_meta[0] != sid or self._series_meta[1].shape != image.shape:
            meta = FrameMeta.of(image, ev.series.user_data.get("pixel_size_A"), self.path.material,
                                channel=ev.series.channels[0])
            self._series_meta = (sid, meta)
        return self._series_meta[1]

    def next_frame(self, timeout_ms: int = 5000, want_targets: bool = True
                   ) -> tuple[ImageEvent, FrameContext, ScanFrame | None] | None:
        """Receive the next scanned frame and run the frame path on it.

        Parked-probe samples and bad messages met on the way are skipped (counted). Returns
        ``(event, context, scan)`` or None when nothing arrived within ``timeout_ms`` (per message). A
        frame the path rejects (:class:`~beamloop.edge.frame.stage.FrameError`) is counted and skipped.
        The context is the path's own (reused by the next frame); its ``columns`` and ``targets`` may be kept.
        ``want_targets=False`` asks the policy for no targets (a verification frame).
        """
        deadline = time.monotonic() + timeout_ms / 1000
        while time.monotonic() < deadline:
            ev = self._recv(max(int((deadline - time.monotonic()) * 1000), 1))
            if ev is None:
                return None
            if not isinstance(ev, ImageEvent):
                continue
            ud = ev.series.user_data
            if ud.get("kind", "frame") != "frame":
                self.stats.skipped_messages += 1
                continue
            sent = ev.header.user_data.get("sent_ns")
            if isinstance(sent, int):
                self.latency.add(RECEIVE, ev.recv_ns - sent)
            self.latency.add(DECODE, ev.decoded_ns - ev.recv_ns)
            scan = None
            if isinstance(ud.get("scan"), dict):
                try:
                    scan = ScanFrame.from_dict(ud["scan"])
                except ValueError as exc:
                    self.stats.note(str(exc))
            image = frame_image(ev)
            try:
                ctx = self.path.run(image, scan=scan, meta=self._meta(ev, image), want_targets=want_targets)
            except FrameError as exc:
                self.stats.frame_errors += 1
                self.stats.note(f"frame {ev.image_id}: {exc}")
                log.warning("frame %d rejected: %s", ev.image_id, exc)
                continue
            return ev, ctx, scan
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
                if ev.series.user_data.get("kind") == "parked":
                    res.series_id = ev.series.series_id
                continue
            if isinstance(ev, SeriesEnd):
                if ev.header.series_id == res.series_id:
                    res.reason = res.reason or "controller_ended"
                    return
                continue
            if ev.series.series_id != res.series_id:
                continue
            block = frame_image(ev)[0]
            yield block[:ev.header.user_data.get("valid", block.shape[0])]

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
        blocks = self.parked_blocks(res, stream_timeout_ms)
        for block in blocks:
            if blanked:
                continue  # the rest of the series, until the controller ends it
            t0 = time.perf_counter_ns()
            k = trig.update(block)
            self.latency.add(TRIGGER, time.perf_counter_ns() - t0)
            res.samples += len(block)
            if k >= 0 or time.monotonic() > deadline:
                res.reason = "trigger" if k >= 0 else "max_dwell"
                res.trigger_sample = trig.trigger_sample
                blanked = self.safe_blank()
                if not blanked:
                    res.reason, res.error = "bridge_error", "blank after trigger failed"
                    break
        if not blanked and res.reason == "stream_timeout":
            self.safe_blank()
        res.baseline_rate = trig.baseline_rate
        return res
