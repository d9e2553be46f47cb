"""Closed-loop experiments built from the service's two verbs (next frame, dwell on a target).

:func:`vacancy_line` writes a line of S vacancies in MoS2 atom by atom: scan a frame, find and classify
its columns, pick the S2 columns along one row, park the beam on each until the trigger sees an S atom
leave, and scan again to see the result. The trigger decides at the scan controller when it offers one
(the service's ``trigger_at``, chosen from ``get_capabilities`` before the first frame), else in the
service.

It stops (:class:`ExperimentStopped`, holding the records made so far) instead of going on blind: when a
blank could not be confirmed (``beam_unsafe``: the beam may still be on), when the scan controller stops
answering (``controller_lost``), when a frame it asked for does not arrive (``no_frames``: the stream is
silent, or another consumer takes its messages), when the controller refuses a frame (``refused``), or
when the service's ``interrupt`` asks it to (``interrupted``, e.g. SIGINT). The beam is blanked on every
way out that can still reach the controller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from beamloop.edge.control.protocol import BridgeError
from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.service import END_TO_END, DwellResult, EdgeService, Interrupted, frame_image, sent_time_ns
from beamloop.edge.stages.policy import Target

log = logging.getLogger("beamloop.experiment")


@dataclass
class ExperimentConfig:
    """Settings of the vacancy-line experiment.

    Attributes
    ----------
    rounds : int
        Frames on which targets are chosen; one more frame is scanned at the end to verify.
    shape : (rows, cols)
        Frame size, pixels.
    fov_nm : float
        Square field of view, nanometres.
    dwell_us : float
        Pixel dwell time of the frames, microseconds.
    targets_per_frame : int
        Most targets per frame.
    max_dwell_s : float
        Longest time the beam stays on one target without a trigger.
    frame_timeout_ms : int
        How long to wait for a frame after asking for it.
    drift_frames : int
        Frames scanned before the first round only to measure the specimen's drift (no targets, no records;
        for lock-on ``predict``, whose uncertainty gate keeps targets back until the drift is known).
    """

    rounds: int = 3
    shape: tuple[int, int] = (256, 256)
    fov_nm: float = 3.84
    dwell_us: float = 16.0
    targets_per_frame: int = 4
    max_dwell_s: float = 2.0
    frame_timeout_ms: int = 10000
    drift_frames: int = 0


STOP_REASONS = ("beam_unsafe", "controller_lost", "no_frames", "refused", "interrupted")
"""Why an experiment stops early (:attr:`ExperimentStopped.reason`), most severe first."""


class ExperimentStopped(RuntimeError):
    """The experiment stopped before its end; the beam was blanked where the controller could be reached.

    Parameters
    ----------
    reason : str
        One of :data:`STOP_REASONS`.
    message : str
        What happened, for a person.
    records : list of RoundRecord
        The frames completed before it stopped.
    signum : int
        The signal that stopped it (``interrupted``), else 0.

    Attributes
    ----------
    reason, message : str
    records : list of RoundRecord
    signum : int
    """

    def __init__(self, reason: str, message: str, records: list | None = None, signum: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.records = records if records is not None else []  # the experiment's own list: it may still grow
        self.signum = int(signum)


def stream_hint(service: EdgeService) -> str:
    """What the receiver's counters say about frames that did not arrive (for error messages)."""
    c = service.receiver.counters
    parts = []
    if c.gaps or c.missing_frames or c.unexpected:
        parts.append(f"{c.missing_frames} frame ids missing in {c.gaps} gaps, {c.unexpected} messages outside a "
                     "series: another consumer on the frame stream? (a PUSH socket deals its messages out "
                     "among all connected consumers)")
    if service.stats.series_rejected:
        parts.append(f"{service.stats.series_rejected} series rejected ({service.stats.errors[-1]})")
    return "; ".join(parts)


@dataclass
class RoundRecord:
    """One frame of the experiment: what was seen, where the beam went, and how long it took (``drift``: the
    register stage's ``extras["drift"]`` of the frame, None on paths without drift correction)."""

    index: int
    scan: ScanFrame
    image: np.ndarray
    columns: ColumnTable
    targets: list[Target]
    dwells: list[DwellResult] = field(default_factory=list)
    frame_sent_ns: int = 0
    frame_recv_ns: int = 0
    pixel_size_A: float = 0.0
    drift: dict | None = None


def vacancy_line(service: EdgeService, cfg: ExperimentConfig, progress=None,
                 on_record: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
    """Run the vacancy-line experiment; returns one record per frame (the last one verifies).

    Parameters
    ----------
    service : EdgeService
        With a bridge to the scan controller.
    cfg : ExperimentConfig
    progress : callable(text), optional
        Called with a short text after every step (for a progress bar).
    on_record : callable(RoundRecord), optional
        Called with each frame's record as soon as its dwells are done (e.g. to write it to the run file).

    Raises
    ------
    ExperimentStopped
        The experiment stopped early (see the module docstring), with the records made so far.
    RuntimeError
        The service has no bridge.
    """
    bridge = service.bridge
    if bridge is None:
        raise RuntimeError("the vacancy-line experiment needs a bridge to the scan controller")
    records: list[RoundRecord] = []

    def stop(reason: str, message: str, signum: int = 0) -> ExperimentStopped:
        if reason == "beam_unsafe" and bridge.log and bridge.log[-1].error == "unavailable":
            # the blank could not even be sent: the controller's process is known to be gone
            reason, message = "controller_lost", f"{message}; {bridge.log[-1].message}"
        service.stats.note(message)
        (log.warning if reason == "interrupted" else log.error)("experiment stopped (%s): %s", reason, message)
        if progress:
            progress(f"stopped: {reason}")
        if reason != "beam_unsafe" and not service.safe_blank(attempts=1 if reason == "controller_lost" else 2):
            if reason == "controller_lost":
                message += "; the beam could not be blanked through it (its state is unknown)"
            else:
                reason, message = "beam_unsafe", f"{message}; and the beam could not be blanked"
        return ExperimentStopped(reason, message, records, signum)

    if not service.trigger_at_chosen:
        try:
            service.choose_trigger_at(bridge.get_capabilities())
        except BridgeError as exc:
            raise stop("controller_lost" if exc.code in ("timeout", "unavailable") else "refused",
                       f"get_capabilities failed: {exc}") from None
    for k in range(cfg.drift_frames):
        try:
            service.check_interrupt()
            _drift_frame(service, cfg, k, stop)
        except Interrupted as exc:
            raise stop("interrupted", f"drift frame {k}: {exc}", exc.signum) from None
    for r in range(cfg.rounds + 1):
        try:
            service.check_interrupt()
            _round(service, cfg, r, records, stop, progress, on_record)
        except Interrupted as exc:
            raise stop("interrupted", f"frame {r}: {exc}", exc.signum) from None
    return records


def _drift_frame(service: EdgeService, cfg: ExperimentConfig, k: int, stop) -> None:
    """A frame of :func:`vacancy_line` that only measures the drift (the path registers it; no targets)."""
    bridge = service.bridge
    assert bridge is not None
    try:
        bridge.acquire_frame(cfg.shape, (cfg.fov_nm, cfg.fov_nm), cfg.dwell_us)
    except BridgeError as exc:
        lost = exc.code in ("timeout", "unavailable")
        raise stop("controller_lost" if lost else "refused", f"drift frame {k}: acquire_frame failed: {exc}") from None
    try:
        got = service.next_frame(cfg.frame_timeout_ms, want_targets=False)
    except BridgeError as exc:
        raise stop("controller_lost", f"drift frame {k}: {exc}") from None
    if got is None:
        hint = stream_hint(service)
        raise stop("no_frames", f"drift frame {k} did not arrive within {cfg.frame_timeout_ms} ms"
                                + (f" ({hint})" if hint else ""))


def _round(service: EdgeService, cfg: ExperimentConfig, r: int, records: list[RoundRecord], stop,
           progress, on_record) -> None:
    """One frame of :func:`vacancy_line`: acquire, find, dwell on each target; appends its record."""
    bridge = service.bridge
    assert bridge is not None
    verifying = r == cfg.rounds
    try:
        bridge.acquire_frame(cfg.shape, (cfg.fov_nm, cfg.fov_nm), cfg.dwell_us)
    except BridgeError as exc:
        lost = exc.code in ("timeout", "unavailable")
        raise stop("controller_lost" if lost else "refused", f"frame {r}: acquire_frame failed: {exc}") from None
    try:
        got = service.next_frame(cfg.frame_timeout_ms, want_targets=not verifying)
    except BridgeError as exc:
        raise stop("controller_lost", f"frame {r}: {exc}") from None
    if got is None:
        hint = stream_hint(service)
        raise stop("no_frames", f"frame {r} did not arrive within {cfg.frame_timeout_ms} ms"
                                + (f" ({hint})" if hint else ""))
    ev, result, scan = got
    if scan is None:
        raise stop("refused", f"frame {r} arrived without a scan frame: its targets cannot be placed")
    sent = sent_time_ns(ev)
    drift = result.extras.get("drift")
    rec = RoundRecord(r, scan, frame_image(ev).copy(), result.columns, result.targets,
                      frame_sent_ns=ev.recv_ns if sent is None else sent, frame_recv_ns=ev.recv_ns,
                      pixel_size_A=scan.pixel_size_A if result.meta is None or result.meta.pixel_size_A is None
                      else result.meta.pixel_size_A, drift=None if drift is None else dict(drift))
    if progress:
        progress(f"frame {r}: {len(result.columns)} columns, {len(result.targets)} targets")
    try:
        for k, target in enumerate(rec.targets):
            d = service.dwell(target, cfg.max_dwell_s)
            rec.dwells.append(d)
            if k == 0 and d.set_probe_reply_ns and sent is not None:
                service.latency.add(END_TO_END, d.set_probe_reply_ns - sent)
            if progress:
                progress(f"frame {r} target {k + 1}/{len(rec.targets)}: {d.reason}")
            if d.reason == "blank_failed":
                raise stop("beam_unsafe", f"frame {r} target {k + 1}: the beam could not be blanked ({d.error})")
    finally:  # the frame is kept with the dwells done, also when the experiment stops in the middle of it
        records.append(rec)
        if on_record:
            on_record(rec)
