"""Latency budgets: which stages of the main job fit a detector's frame time or a scan's, on this machine.

Input: the measured stage table (:mod:`beamloop.bench.stages`, frame sizes 256^2, 512^2, 1024^2) and a scenario,
either a detector (frame rate, frame size) or a scan (dwell time per probe position, frame size). The
frame time is ``1 / rate`` or ``rows * cols * dwell``.

Each stage's p50 and p99 at the scenario's pixel count come from a power law ``t = a * N^b`` fitted in
log-log to the measured sizes (least squares; ``b`` clipped to [0, 2]); outside the measured range the
figure is an extrapolation and is flagged. The frame path (receive, decode, preprocess, find, classify,
policy) runs back to back on one core in the service, so its stages fit while their cumulative p99
stays within the frame time; what remains is the leftover for everything else per frame. The beam
stages are set against the scan: how many probe positions pass during one bridge round trip, and the
trigger's decision time per parked-probe sample (blocks of ``block_samples``) against the dwell time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from beamloop.edge.service import BRIDGE, END_TO_END, STAGES, TRIGGER

FRAME_PATH = STAGES[:STAGES.index(BRIDGE)]
"""Stages every frame goes through before a beam target exists (in order): receive, decode and the
classical path's stages."""
BEAM_STAGES = (BRIDGE, TRIGGER, END_TO_END)
"""Stages of the beam: bridge round trips, trigger decisions, frame-to-probe."""


@dataclass(frozen=True)
class Scenario:
    """A detector or a scan to plan for.

    Attributes
    ----------
    label : str
    shape : (rows, cols)
        Frame size, pixels.
    frame_rate_hz : float, optional
        Detector frames per second (a detector scenario).
    dwell_us : float, optional
        Dwell time per probe position, microseconds (a scan scenario).

    Raises
    ------
    ValueError
        Not exactly one of ``frame_rate_hz`` and ``dwell_us``, a non-positive value, or a bad shape.
    """

    label: str
    shape: tuple[int, int]
    frame_rate_hz: float | None = None
    dwell_us: float | None = None

    def __post_init__(self) -> None:
        if (self.frame_rate_hz is None) == (self.dwell_us is None):
            raise ValueError(f"{self.label}: give exactly one of frame_rate_hz and dwell_us")
        v = self.frame_rate_hz if self.frame_rate_hz is not None else self.dwell_us
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{self.label}: frame rate / dwell time must be a positive number, got {v!r}")
        if len(self.shape) != 2 or min(self.shape) <= 0:
            raise ValueError(f"{self.label}: frame size must be (rows, cols) > 0, got {self.shape!r}")

    @property
    def pixels(self) -> int:
        """Pixels per frame."""
        return int(self.shape[0]) * int(self.shape[1])

    @property
    def frame_time_us(self) -> float:
        """Time per frame, microseconds: ``1e6 / rate`` or ``pixels * dwell``."""
        if self.frame_rate_hz is not None:
            return 1e6 / self.frame_rate_hz
        return self.pixels * self.dwell_us


DEFAULT_SCENARIOS = (
    Scenario("scan 256x256, 10 us dwell", (256, 256), dwell_us=10.0),
    Scenario("scan 512x512, 1 us dwell", (512, 512), dwell_us=1.0),
    Scenario("scan 1024x1024, 1 us dwell", (1024, 1024), dwell_us=1.0),
    Scenario("scan 1024x1024, 0.1 us dwell", (1024, 1024), dwell_us=0.1),
    Scenario("detector 256x256 at 100 Hz", (256, 256), frame_rate_hz=100.0),
    Scenario("detector 512x512 at 2 kHz (ASI Cheetah, frame mode)", (512, 512), frame_rate_hz=2000.0),
    Scenario("detector 128x128 at 10 kHz (EMPAD-G2)", (128, 128), frame_rate_hz=10000.0),
)
"""Scenarios in every summary (detector rates from ../shared/notes/detector-protocols.md)."""


def fit_power_law(pixels, values) -> tuple[float, float]:
    """Fit ``t = a * N^b`` to measured (pixel count, time) pairs in log-log; returns ``(a, b)``.

    One point gives ``b = 0`` (the time is taken as independent of size); ``b`` is clipped to [0, 2]
    (no stage gets faster with more pixels; none is worse than quadratic). Times at or below 0 are
    taken as 1e-3 (same units).

    Raises
    ------
    ValueError
        No points, or lengths differ, or a pixel count is not positive.
    """
    n = np.asarray(pixels, float).ravel()
    t = np.maximum(np.asarray(values, float).ravel(), 1e-3)
    if len(n) == 0 or len(n) != len(t):
        raise ValueError(f"need matching, non-empty pixel counts and times, got {len(n)} and {len(t)}")
    if np.any(n <= 0):
        raise ValueError("pixel counts must be positive")
    if len(np.unique(n)) < 2:
        return float(np.exp(np.mean(np.log(t)))), 0.0
    b, loga = np.polyfit(np.log(n), np.log(t), 1)
    b = float(np.clip(b, 0.0, 2.0))
    a = float(np.exp(np.mean(np.log(t) - b * np.log(n))))  # refit the level with the clipped exponent
    return a, b


def stage_models(sizes: dict) -> dict:
    """Per stage, power laws of p50 and p99 against pixel count from :mod:`beamloop.bench.stages` results
    (``sizes``: ``"ROWSxCOLS"`` -> summary with ``stages``). Returns stage -> ``{"p50": (a, b), "p99": (a, b),
    "pixels": [min, max]}``."""
    from beamloop.bench.stages import pixels_of

    per: dict[str, dict[str, list]] = {}
    for size, r in sizes.items():
        n = pixels_of(size)
        for stage, s in r["stages"].items():
            d = per.setdefault(stage, {"n": [], "p50": [], "p99": []})
            d["n"].append(n)
            d["p50"].append(s["p50_us"])
            d["p99"].append(s["p99_us"])
    return {stage: {"p50": fit_power_law(d["n"], d["p50"]), "p99": fit_power_law(d["n"], d["p99"]),
                    "pixels": [min(d["n"]), max(d["n"])]} for stage, d in per.items()}


def budget(models: dict, scenario: Scenario, block_samples: int = 100) -> dict:
    """The budget of one scenario (see the module docstring).

    Parameters
    ----------
    models : dict
        :func:`stage_models` output.
    scenario : Scenario
    block_samples : int
        Parked-probe samples per trigger decision (the simulator's block).

    Returns
    -------
    dict with ``label``, ``shape``, ``frame_time_us``, ``stages`` (rows: ``stage``, ``p50_us``, ``p99_us``,
    ``share`` of the frame time, ``cumulative_p99_us``, ``fits``, ``per_frame``, ``extrapolated``),
    ``frame_path_p50_us``, ``frame_path_p99_us``, ``fits_stages`` (frame-path stages that fit),
    ``leftover_us`` (frame time minus the frame path's cumulative p99; negative: over budget),
    ``max_frame_rate_hz`` (1 / frame path p50), ``beam`` (closed-loop figures).
    """
    n = scenario.pixels
    ft = scenario.frame_time_us
    rows = []
    cum = 0.0
    fits = []
    for stage in [s for s in FRAME_PATH if s in models] + [s for s in BEAM_STAGES if s in models]:
        m = models[stage]
        p50 = m["p50"][0] * n ** m["p50"][1]
        p99 = m["p99"][0] * n ** m["p99"][1]
        per_frame = stage in FRAME_PATH
        row = {"stage": stage, "p50_us": p50, "p99_us": p99, "share": p99 / ft, "per_frame": per_frame,
               "extrapolated": not (m["pixels"][0] <= n <= m["pixels"][1])}
        if per_frame:
            cum += p99
            row["cumulative_p99_us"] = cum
            row["fits"] = cum <= ft
            if row["fits"]:
                fits.append(stage)
        rows.append(row)
    path50 = sum(r["p50_us"] for r in rows if r["per_frame"])
    out = {"label": scenario.label, "shape": list(scenario.shape), "frame_time_us": ft,
           "frame_rate_hz": 1e6 / ft, "stages": rows, "frame_path_p50_us": path50, "frame_path_p99_us": cum,
           "fits_stages": fits, "all_fit": len(fits) == sum(r["per_frame"] for r in rows), "leftover_us": ft - cum,
           "max_frame_rate_hz": 1e6 / path50 if path50 > 0 else math.inf}
    beam = {}
    by = {r["stage"]: r for r in rows}
    if "end_to_end" in by:
        beam["end_to_end_p99_frames"] = by["end_to_end"]["p99_us"] / ft
    if scenario.dwell_us is not None:
        if "bridge" in by:
            beam["probe_positions_per_beam_move_p99"] = by["bridge"]["p99_us"] / scenario.dwell_us
        if "trigger" in by:
            per_sample = by["trigger"]["p99_us"] / block_samples
            beam["trigger_p99_us_per_sample"] = per_sample
            beam["trigger_fits_dwell"] = per_sample <= scenario.dwell_us
    out["beam"] = beam
    return out


def budgets(sizes: dict, scenarios=DEFAULT_SCENARIOS, block_samples: int = 100) -> list[dict]:
    """:func:`budget` of every scenario from measured stage results (``sizes`` as in :func:`stage_models`)."""
    models = stage_models(sizes)
    return [budget(models, s, block_samples) for s in scenarios]
