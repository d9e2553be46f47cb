"""Closed-loop experiments built from the service's two verbs (next frame, dwell on a target).

:func:`vacancy_line` writes a line of S vacancies in MoS2 atom by atom: scan a frame, find and classify
its columns, pick the S2 columns along one row, park the beam on each until the trigger sees an S atom
leave, and scan again to see the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from beamloop.edge.control.protocol import BridgeError
from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.stages.policy import Target
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.service import END_TO_END, DwellResult, EdgeService, frame_image

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
    """

    rounds: int = 3
    shape: tuple[int, int] = (256, 256)
    fov_nm: float = 3.84
    dwell_us: float = 16.0
    targets_per_frame: int = 4
    max_dwell_s: float = 2.0
    frame_timeout_ms: int = 10000


@dataclass
class RoundRecord:
    """One frame of the experiment: what was seen, where the beam went, and how long it took."""

    index: int
    scan: ScanFrame
    image: np.ndarray
    columns: ColumnTable
    targets: list[Target]
    dwells: list[DwellResult] = field(default_factory=list)
    frame_sent_ns: int = 0
    frame_recv_ns: int = 0
    pixel_size_A: float = 0.0


def vacancy_line(service: EdgeService, cfg: ExperimentConfig, progress=None) -> list[RoundRecord]:
    """Run the vacancy-line experiment; returns one record per frame (the last one verifies).

    ``progress``, when given, is called with a short text after every step (for a progress bar).
    Bridge and stream errors are logged and the experiment goes on with the next step; the beam is
    blanked whenever a dwell ends.

    Raises
    ------
    RuntimeError
        The service has no bridge.
    """
    if service.bridge is None:
        raise RuntimeError("the vacancy-line experiment needs a bridge to the scan controller")
    records: list[RoundRecord] = []
    for r in range(cfg.rounds + 1):
        verifying = r == cfg.rounds
        try:
            service.bridge.acquire_frame(cfg.shape, (cfg.fov_nm, cfg.fov_nm), cfg.dwell_us)
        except BridgeError as exc:
            service.stats.note(f"acquire_frame failed: {exc}")
            log.error("acquire_frame failed: %s", exc)
            if progress:
                progress(f"frame {r}: acquire failed")
            continue
        got = service.next_frame(cfg.frame_timeout_ms, want_targets=not verifying)
        if got is None:
            service.stats.note(f"frame {r} did not arrive within {cfg.frame_timeout_ms} ms")
            if progress:
                progress(f"frame {r}: no frame")
            continue
        ev, result, scan = got
        rec = RoundRecord(r, scan, frame_image(ev).copy(), result.columns, result.targets,
                          frame_sent_ns=ev.header.user_data.get("sent_ns", ev.recv_ns), frame_recv_ns=ev.recv_ns,
                          pixel_size_A=float(ev.series.user_data.get("pixel_size_A", 0.0)))
        if progress:
            progress(f"frame {r}: {len(result.columns)} columns, {len(result.targets)} targets")
        for k, target in enumerate(rec.targets):
            d = service.dwell(target, cfg.max_dwell_s)
            rec.dwells.append(d)
            if k == 0 and d.set_probe_reply_ns:
                service.latency.add(END_TO_END, d.set_probe_reply_ns - rec.frame_sent_ns)
            if progress:
                progress(f"frame {r} target {k + 1}/{len(rec.targets)}: {d.reason}")
        records.append(rec)
    return records
