"""The DKL experiment in the closed loop: the simulated microscope, measured through the control bridge.

What :mod:`beamloop.edge.experiments.dkl_run` does offline, done as on an instrument: the simulated
microscope runs in its own process (:func:`beamloop.edge.experiments.closed_loop.start_simulator`), the edge
service (:func:`beamloop.edge.app.build_service`) receives its HAADF frame and finds the atomic columns (the
candidate points), and every point measurement is a point queue on the bridge (``queue_points`` with the
scalarizer's detector: ``eels`` for a spectrum, ``pattern`` for a diffraction pattern, ``adf`` for the mean ADF
counts; :meth:`beamloop.edge.control.client.BridgeClient.measure_points`), reduced to a scalar by the scalarizer
bound to the controller's calibration (``get_capabilities``' ``point_detectors``). DKL
(:func:`beamloop.edge.experiments.dkl.run_dkl`, acquisition EI, UCB or maximum variance) chooses each next point;
random and raster sampling are measured through the bridge too, with the same number of points of the same dwell
(the same dose), and their maps fitted once by the same model.

The true property map comes from the simulator's ``sim_point_truth`` (the noise-free expectation of the same
detector at the candidates), reduced by the same scalarizer. The simulator runs with no knock-on damage
(``--cross-section-barn 0``): a point spectrum of 1e7 electrons on an S column would otherwise eject its atoms
and change the map being learnt, and the baselines would measure another specimen than DKL did. Its parked
probe samples the ADF at 1 ms (``--sample-time-us 1000``), so a 32 ms point is 32 samples.

Outputs in ``out``: ``report.json`` (``dkl`` section: ``ratio_vs_random``, ``top5_found`` at N = 25, 50, 100
where the budget allows, for DKL, random and raster; ``reconstruction_error``; ``decision_s`` p50 / p90; plus
``outcome``), ``run.h5`` (:func:`beamloop.edge.experiments.dkl_run.write_run_h5`'s layout, and
``/bridge/mean_counts`` the ADF mean of every DKL point, ``/truth_fractions`` the candidates as fractions of the
frame), ``path.png`` and ``maps.png`` (:func:`beamloop.edge.experiments.dkl_run.write_plots`), and for EELS
``spectra.hspy``: every spectrum DKL measured, in order, with its energy axis and probe position
(:class:`beamloop.streams.dectris.recorder.SpectrumRecorder`, the HyperSpy layout that RosettaSciIO reads).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from beamloop.edge.analysis.scalarize import SCALARIZERS, BoundScalarizer, make_scalarizer
from beamloop.edge.app import ServiceConfig, build_service, receiver_ring_bytes, warm_up
from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.protocol import BridgeError, decode_array
from beamloop.edge.experiments.closed_loop import check_options, simulator_gone, start_simulator, stop_simulator
from beamloop.edge.experiments.dkl import (
    DKLResult,
    DKLSettings,
    ScalarizedPoints,
    baseline_order,
    bind_for_material,
    extract_patches,
    fit_predict,
    run_dkl,
    scalarize_all,
)
from beamloop.edge.experiments.dkl_gp import reconstruction_error, top_share_found
from beamloop.edge.experiments.dkl_model import require_dkl
from beamloop.edge.experiments.dkl_run import (
    TOP_FRACTION,
    default_goal,
    random_expected_share,
    ranked_truth,
    write_plots,
    write_run_h5,
)
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.service import frame_image
from beamloop.streams.errors import ProtocolError
from beamloop.streams.native.receiver import FrameReceiver

DEFAULT_DWELL_US = 32000.0
"""Dwell per point measurement, microseconds: 1e7 electrons at 50 pA, the offline default of MoS2
(:data:`beamloop.edge.sim.eels.DEFAULT_ELECTRONS`)."""

SIM_SAMPLE_TIME_US = 1000.0
"""The simulator's parked-probe ADF sample time in this experiment, microseconds."""

CHECKPOINTS = (25, 50, 100)
"""Budgets at which the share of the top-5 % sites found is reported (those not above the run's budget)."""

KIND_DETECTOR = {"spectrum": "eels", "pattern": "pattern", "adf": "adf"}
"""The bridge detector that gives each scalarizer kind its signal."""


class DKLStopped(Exception):
    """The experiment stopped before its budget was measured.

    Parameters
    ----------
    reason : {"interrupted", "controller_lost", "refused", "no_frames"}
    message : str
    signum : int
        The signal that interrupted it (0: none).
    """

    def __init__(self, reason: str, message: str, signum: int = 0) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message, self.signum = reason, message, signum


@dataclass(frozen=True)
class BridgeScene:
    """The frame a bridge run works on (a :class:`beamloop.edge.experiments.dkl_run.RunScene`).

    Attributes
    ----------
    image : ndarray, shape (rows, cols), uint16
        The HAADF frame as received.
    candidates_px : ndarray, shape (m, 2), float64
        Found columns ``(x, y)``, pixels, at least half a patch from the edge.
    truth : ndarray, shape (m,), float64
        The simulator's noise-free property at the candidates (nan where the scalarizer gives none).
    material, scalarizer : str
    scan : ScanFrame
        The frame's scan (frame id, shape, field of view).
    """

    image: np.ndarray
    candidates_px: np.ndarray
    truth: np.ndarray
    material: str
    scalarizer: str
    scan: ScanFrame

    def fractions(self, points_px: np.ndarray) -> np.ndarray:
        """Frame pixels ``(x, y)`` ((k, 2)) as fractions of the frame ((k, 2) float64), as the bridge takes them."""
        p = np.asarray(points_px, np.float64).reshape(-1, 2)
        fx, fy = self.scan.fraction_of_pixel(p[:, 0], p[:, 1])
        return np.stack([fx, fy], axis=1)


def bind_for_bridge(name: str, point_detectors: dict) -> tuple[BoundScalarizer, str]:
    """Scalarizer ``name`` bound to a controller's point detectors, and the detector to ask for.

    Spectrum scalarizers get the ``eels`` calibration (``offset_eV``, ``dispersion_eV``) and MoS2's edges
    (:func:`beamloop.edge.experiments.dkl.bind_for_material`); ``bf_adf_ratio`` gets its radii divided by the
    ``pattern`` detector's ``binning``; the others take their defaults.

    Raises
    ------
    KeyError
        Unknown scalarizer.
    BridgeError
        (``out_of_range``) the controller has no detector of the scalarizer's kind.
    """
    if name not in SCALARIZERS:
        raise KeyError(f"unknown scalarizer {name!r}; known: {sorted(SCALARIZERS)}")
    det = KIND_DETECTOR[SCALARIZERS[name].kind]
    cal = point_detectors.get(det)
    if cal is None:
        raise BridgeError("out_of_range", f"scalarizer {name} needs the {det} detector, not fitted to this scan "
                                          f"controller (it has {sorted(point_detectors)})", "queue_points")
    if det == "eels":
        return bind_for_material(name, "MoS2", calibration=cal), det
    if name == "bf_adf_ratio":
        b = float(cal.get("binning", 1))
        d = SCALARIZERS[name].defaults
        return make_scalarizer(name, bf_radius_px=d["bf_radius_px"] / b, adf_inner_px=d["adf_inner_px"] / b,
                               adf_outer_px=d["adf_outer_px"] / b), det
    return make_scalarizer(name), det


class BridgeAcquire:
    """``acquire(points_px) -> signals`` through the bridge: one point queue per call (for
    :class:`beamloop.edge.experiments.dkl.ScalarizedPoints`).

    Parameters
    ----------
    bridge : BridgeClient
    scene : BridgeScene
    detector : {"adf", "eels", "pattern"}
    dwell_us : float
        Dwell per point, microseconds.
    interrupt : callable() -> int, optional
        A non-zero signal number stops the experiment (:class:`DKLStopped`, ``interrupted``), the queue aborted.
    keep : bool
        Keep every raw signal (:attr:`signals`).
    drain : callable(), optional
        Called after every queue: takes what the frame stream sent meanwhile (the parked-probe series of the
        points), so that the controller never waits on a full stream.

    Attributes
    ----------
    xy_px : list of (float, float)
        Every point measured, in order.
    mean_counts : list of float
        Their mean ADF counts per sample.
    signals : list of ndarray
        The raw signal of every point (when ``keep``).
    queues : int
        Point queues sent.
    wait_s : float
        Wall time spent measuring (queue, wait, fetch), seconds.
    """

    def __init__(self, bridge: BridgeClient, scene: BridgeScene, detector: str, dwell_us: float,
                 interrupt: Callable[[], int] | None = None, keep: bool = False,
                 drain: Callable[[], None] | None = None) -> None:
        self.bridge, self.scene, self.detector, self.dwell_us = bridge, scene, detector, float(dwell_us)
        self.interrupt = interrupt
        self.keep = keep
        self.drain = drain
        self.signals: list[np.ndarray] = []
        self.xy_px: list[tuple[float, float]] = []
        self.mean_counts: list[float] = []
        self.queues = 0
        self.wait_s = 0.0

    def __call__(self, points_px: np.ndarray) -> list[np.ndarray]:
        """The raw signal of each point: spectra (channels,), patterns (rows, cols) or ADF means (1,).

        Raises
        ------
        DKLStopped
            Interrupted, or the bridge failed (``controller_lost`` when it stopped answering, else ``refused``).
        """
        code = self.interrupt() if self.interrupt is not None else 0
        if code:
            raise DKLStopped("interrupted", f"stopped by signal {code}", code)
        pts = np.asarray(points_px, np.float64).reshape(-1, 2)
        t0 = time.perf_counter()
        try:
            got = self.bridge.measure_points(self.scene.fractions(pts).tolist(), self.dwell_us,
                                             self.scene.scan.frame_id, (self.detector,), interrupt=self.interrupt)
        except BridgeError as exc:
            code = self.interrupt() if self.interrupt is not None else 0
            if code:
                raise DKLStopped("interrupted", f"stopped by signal {code}", code) from None
            lost = exc.code in ("timeout", "unavailable")
            raise DKLStopped("controller_lost" if lost else "refused", str(exc)) from None
        if self.drain is not None:
            self.drain()
        self.wait_s += time.perf_counter() - t0
        self.queues += 1
        self.xy_px.extend((float(x), float(y)) for x, y in pts)
        self.mean_counts.extend(float(v) for v in got.mean_counts)
        out = ([np.array([v]) for v in got.mean_counts] if self.detector == "adf"
               else list(got.signals[self.detector]))
        if self.keep:
            self.signals.extend(np.array(v) for v in out)
        return out


def true_map(bridge: BridgeClient, scene: BridgeScene, scalarizer: BoundScalarizer, detector: str,
             dwell_us: float) -> np.ndarray:
    """The scalarizer on the simulator's noise-free signal at every candidate (``sim_point_truth``), (m,) float64."""
    fr = scene.fractions(scene.candidates_px)
    step = 256
    parts = []
    for i in range(0, len(fr), step):
        r = bridge.call("sim_point_truth", points=fr[i:i + step].tolist(), frame_id=scene.scan.frame_id,
                        detector=detector, dwell_us=float(dwell_us))
        parts.append(np.array(decode_array(r["truth"], "sim_point_truth")))
    sig = np.concatenate(parts)
    if detector == "adf":
        return sig.astype(np.float64)
    return scalarize_all(scalarizer, sig)


def _percentiles(dec: np.ndarray) -> dict:
    if not len(dec):
        return {"p50": 0.0, "p90": 0.0, "mean": 0.0, "max": 0.0, "steps": 0}
    return {"p50": float(np.median(dec)), "p90": float(np.percentile(dec, 90)), "mean": float(dec.mean()),
            "max": float(dec.max()), "steps": int(len(dec))}


def run(out: Path, *, seed: int = 0, budget: int = 50, scalarizer: str = "eels_onset", acquisition: str = "ei",
        quiet: bool = False, interrupt: Callable[[], int] | None = None, shape: tuple[int, int] = (384, 384),
        pixel_size_A: float = 0.15, dose_e_per_A2: float = 1e5, dwell_us: float = DEFAULT_DWELL_US,
        current_pA: float = 50.0, goal: str | None = None, baselines: bool = True, plots: bool = True,
        settings: DKLSettings | None = None) -> dict:
    """Run DKL against the simulated microscope through the bridge; return the report (also ``out/report.json``).

    Parameters
    ----------
    out : Path
        Output folder (created).
    seed : int
        Seed of the simulator (specimen, noise) and of DKL's seed points.
    budget : int
        Point measurements of DKL (and of each baseline).
    scalarizer : str
        A registered scalarizer (:data:`beamloop.edge.analysis.scalarize.SCALARIZERS`); its kind chooses the
        detector (``eels``, ``pattern``, ``adf``).
    acquisition : {"ei", "ucb", "maxvar"}
    quiet : bool
        No progress lines.
    interrupt : callable() -> int, optional
        Asked before every point queue and while waiting; non-zero stops the run (``outcome.reason``
        ``interrupted``, the queue aborted and the beam blanked).
    shape, pixel_size_A, dose_e_per_A2, current_pA :
        The HAADF frame (checked by :func:`beamloop.edge.experiments.closed_loop.check_options`).
    dwell_us : float
        Dwell per point measurement, microseconds (the dose of each point: ``current_pA`` times it).
    goal : {"max", "min"}, optional
        Default: the scalarizer's usual direction (:func:`beamloop.edge.experiments.dkl_run.default_goal`).
    baselines : bool
        Also measure random and raster sampling of the same budget (2 x ``budget`` more points).
    plots : bool
        Write ``path.png`` and ``maps.png``.
    settings : DKLSettings, optional
        Everything else of the loop (its ``budget``, ``acquisition``, ``goal``, ``seed`` and ``checkpoints``
        are replaced by the arguments above).

    Returns
    -------
    dict
        ``{"config", "outcome", "dkl"}``: ``outcome`` as :func:`beamloop.edge.experiments.closed_loop.run`'s
        (``complete``, ``reason``, ``message``, ``signum``, ``output_errors``); ``dkl`` the results (module
        docstring; empty when the run stopped before DKL finished).

    Raises
    ------
    beamloop.edge.experiments.dkl_model.DKLUnavailable
        The ``dkl`` extra (torch, gpytorch) is not installed: one line saying so, before anything starts.
    ValueError, KeyError
        A bad option or scalarizer, before anything starts.
    RuntimeError
        The simulator could not be started.
    """
    require_dkl()
    if scalarizer not in SCALARIZERS:
        raise KeyError(f"--scalarizer {scalarizer!r} unknown; known: {', '.join(sorted(SCALARIZERS))}")
    goal = goal or default_goal(scalarizer)
    base = settings or DKLSettings()
    settings = replace(base, budget=int(budget), initial=min(base.initial, int(budget)), acquisition=acquisition,
                       goal=goal, seed=int(seed), checkpoints=tuple(n for n in CHECKPOINTS if n <= budget))
    frame_dwell_us, fov_nm = check_options(rounds=1, shape=shape, pixel_size_A=pixel_size_A,
                                           dose_e_per_A2=dose_e_per_A2, targets_per_frame=0, current_pA=current_pA,
                                           max_dwell_s=1.0)
    if not (math.isfinite(dwell_us) and 0 < dwell_us <= 1e6):
        raise ValueError(f"dwell_us {dwell_us!r} per point must be in (0, 1e6] us")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"seed": seed, "budget": budget, "scalarizer": scalarizer, "acquisition": acquisition, "goal": goal,
              "shape": list(shape), "pixel_size_A": pixel_size_A, "dose_e_per_A2": dose_e_per_A2,
              "point_dwell_us": dwell_us, "current_pA": current_pA, "settings": settings.as_dict()}
    outcome: dict[str, Any] = {"complete": False, "reason": "", "message": "", "signum": 0, "output_errors": []}
    report: dict[str, Any] = {"config": config, "outcome": outcome, "dkl": {}}
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    t_start = time.perf_counter()
    proc, ends = start_simulator(["--frames", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                                  "--seed", str(seed), "--current-pA", str(current_pA), "--cross-section-barn", "0",
                                  "--sample-time-us", repr(SIM_SAMPLE_TIME_US), "--block-samples", "64"])
    res: DKLResult | None = None
    eels_cal: dict | None = None
    scene: BridgeScene | None = None
    acq: BridgeAcquire | None = None
    base_orders: dict[str, np.ndarray] = {}
    base_values: dict[str, np.ndarray] = {}
    safety: dict = {}
    try:
        svc_cfg = ServiceConfig("MoS2")
        with FrameReceiver(ends["frames"], ring=4, max_ring_bytes=receiver_ring_bytes(svc_cfg)) as rx, \
                BridgeClient(ends["control"], timeout_ms=20000, peer_gone=simulator_gone(proc)) as bridge:
            service = build_service(rx, svc_cfg, bridge)
            service.interrupt = interrupt
            caps = bridge.get_capabilities()
            bound, detector = bind_for_bridge(scalarizer, caps.get("point_detectors") or {})
            warm_up(service.path, None, shape=shape, pixel_size_A=pixel_size_A, dtypes=(np.uint16,))
            try:
                scene = _scan(bridge, service, shape, fov_nm, frame_dwell_us, scalarizer, settings.patch_px)
                scene = replace(scene, truth=true_map(bridge, scene, bound, detector, dwell_us))
                m = len(scene.candidates_px)
                if m <= budget:
                    raise DKLStopped("refused", f"{m} candidate columns for a budget of {budget}: use a larger "
                                                "frame or a smaller budget")
                say(f"frame {scene.scan.frame_id}: {m} candidate columns; measuring {detector} at "
                    f"{dwell_us:g} us per point")
                def drain() -> None:
                    for _ in range(100_000):
                        try:
                            if rx.recv(0) is None:
                                return
                        except ProtocolError:
                            continue

                acq = BridgeAcquire(bridge, scene, detector, dwell_us, interrupt, keep=detector == "eels", drain=drain)
                eels_cal = (caps.get("point_detectors") or {}).get("eels")
                measurer = ScalarizedPoints(acq, bound)

                def step(rec, _model) -> None:
                    say(f"measured {rec.measured_before + len(rec.chosen)}/{budget}: {rec.values[0]:.4g} "
                        f"{measurer.units} (decision {rec.decision_s * 1e3:.0f} ms)")

                res = run_dkl(scene.image, scene.candidates_px, measurer, settings, on_step=step)
                if baselines:
                    rng = np.random.default_rng(seed + 2)
                    for kind in ("random", "raster"):
                        order = baseline_order(kind, scene.candidates_px, budget, rng)
                        base_values[kind] = ScalarizedPoints(
                            BridgeAcquire(bridge, scene, detector, dwell_us, interrupt, drain=drain), bound).measure(
                            scene.candidates_px[order])
                        base_orders[kind] = order
                outcome["complete"] = True
            except DKLStopped as exc:
                outcome.update(reason=exc.reason, message=exc.message, signum=exc.signum)
            if outcome["reason"] != "controller_lost":
                try:
                    safety = bridge.get_state().get("safety", {})
                    bridge.stop()
                    bridge.call("shutdown")
                except BridgeError as exc:
                    outcome["message"] += f" (at the end: {exc})"
    finally:
        stop_simulator(proc)
    report["safety"] = {"counters": safety.get("counters", {})}
    if res is not None and scene is not None and acq is not None:
        report["dkl"] = _results(scene, res, base_orders, base_values, settings, bound, detector, dwell_us,
                                 current_pA, acq, time.perf_counter() - t_start)
        _write(out, scene, res, base_orders, bound, acq, report, plots, outcome, eels_cal)
    elif acq is not None and scene is not None:
        report["dkl"] = {"measured": len(acq.xy_px)}
    try:
        (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    except OSError as exc:
        outcome["output_errors"].append(f"{out / 'report.json'}: {exc}")
    if not quiet and report["dkl"].get("ratio_vs_random") is not None:
        d = report["dkl"]
        say(f"top-5 % found at N={budget}: DKL {d['top5_found']['dkl'][str(budget)]:.3f}, ratio vs random "
            f"{d['ratio_vs_random']:.2f}; decision p50 {d['decision_s']['p50'] * 1e3:.0f} ms, p90 "
            f"{d['decision_s']['p90'] * 1e3:.0f} ms; files in {out}")
    return report


def _scan(bridge: BridgeClient, service, shape: tuple[int, int], fov_nm: float, frame_dwell_us: float,
          scalarizer: str, patch_px: int) -> BridgeScene:
    """Scan one HAADF frame, find its columns with the service's frame path; the scene (no truth yet)."""
    try:
        bridge.acquire_frame(shape, (fov_nm, fov_nm), frame_dwell_us)
    except BridgeError as exc:
        lost = exc.code in ("timeout", "unavailable")
        raise DKLStopped("controller_lost" if lost else "refused", f"acquire_frame failed: {exc}") from None
    got = service.next_frame(20000, want_targets=False)
    if got is None:
        raise DKLStopped("no_frames", "the frame asked for did not arrive within 20 s")
    ev, ctx, scan = got
    if scan is None:
        raise DKLStopped("no_frames", "the frame arrived without its scan (frame id, field of view)")
    image = np.array(frame_image(ev))  # a copy: the ring slot is reused
    xy = ctx.columns.xy
    half = patch_px / 2
    rows, cols = image.shape
    keep = (xy[:, 0] >= half) & (xy[:, 0] <= cols - 1 - half) & (xy[:, 1] >= half) & (xy[:, 1] <= rows - 1 - half)
    return BridgeScene(image, xy[keep], np.zeros(int(keep.sum())), "MoS2", scalarizer, scan)


def _results(scene: BridgeScene, res: DKLResult, orders: dict[str, np.ndarray], values: dict[str, np.ndarray],
             settings: DKLSettings, bound: BoundScalarizer, detector: str, dwell_us: float, current_pA: float,
             acq: BridgeAcquire, wall_s: float) -> dict:
    """The report's ``dkl`` section."""
    m, n, goal = len(scene.candidates_px), settings.budget, settings.goal
    t = ranked_truth(scene.truth, goal)
    top = {"maximize": goal == "max"}
    budgets = sorted({*settings.checkpoints, n})
    all_orders = {"dkl": res.order, **orders}
    found = {k: {str(b): top_share_found(t, o[:b], TOP_FRACTION, **top) for b in budgets if b <= len(o)}
             for k, o in all_orders.items()}
    recon = {"dkl": {str(b): reconstruction_error(res.snapshots[b][0], scene.truth)
                     for b in budgets if b in res.snapshots}}
    recon["dkl"][str(n)] = reconstruction_error(res.mean, scene.truth)
    if orders:
        patches = extract_patches(scene.image, scene.candidates_px, settings.patch_px, settings.patch_bin)
        for k, o in orders.items():
            mu, _ = fit_predict(patches, o, values[k], settings.model, goal)
            recon[k] = {str(n): reconstruction_error(mu, scene.truth)}
    expected = random_expected_share(m, n)
    from beamloop.edge.physics import electrons_per_second

    return {
        "via": "bridge", "material": scene.material, "scalarizer": scene.scalarizer, "detector": detector,
        "units": res.units, "goal": goal, "budget": n, "acquisition": settings.acquisition, "seed": settings.seed,
        "candidates": m, "top_fraction": TOP_FRACTION, "top_sites": max(1, math.ceil(TOP_FRACTION * m)),
        "top5_found": found, "random_expected": {str(b): random_expected_share(m, b) for b in budgets},
        "ratio_vs_random": found["dkl"][str(n)] / expected,
        "ratio_vs_random_measured": (found["dkl"][str(n)] / found["random"][str(n)]
                                     if "random" in found and found["random"][str(n)] > 0 else None),
        "reconstruction_error": recon, "decision_s": _percentiles(res.decision_s),
        "measure_s_per_point": acq.wait_s / max(len(acq.xy_px), 1),
        "point_dwell_us": dwell_us, "electrons_per_point": electrons_per_second(current_pA) * dwell_us * 1e-6,
        "measurements": {"dkl": len(acq.xy_px), **{k: len(o) for k, o in orders.items()}},
        "truth_finite": int(np.isfinite(scene.truth).sum()), "scalarizer_settings": bound.describe(),
        "wall_s": wall_s,
        "files": {"run": "run.h5"},
    }


def _write(out: Path, scene: BridgeScene, res: DKLResult, orders: dict[str, np.ndarray], bound: BoundScalarizer,
           acq: BridgeAcquire, report: dict, plots: bool, outcome: dict, eels_cal: dict | None = None) -> None:
    """``run.h5``, ``spectra.hspy`` (EELS) and the plots; what cannot be written goes to
    ``outcome["output_errors"]``."""
    import h5py

    from beamloop.streams.dectris.recorder import SpectrumRecorder

    if acq.signals and eels_cal is not None:
        try:
            fr = scene.fractions(np.asarray(acq.xy_px, np.float64))
            with SpectrumRecorder(out / "spectra.hspy", float(eels_cal["offset_eV"]), float(eels_cal["dispersion_eV"]),
                                  int(eels_cal["channels"]), dtype=np.asarray(acq.signals[0]).dtype,
                                  title="dkl_points", resolution_eV=eels_cal.get("resolution_eV"),
                                  user_data={"frame_id": scene.scan.frame_id, "dwell_us": acq.dwell_us,
                                             "scalarizer": bound.describe()}) as rec:
                for s, (fx, fy) in zip(acq.signals, fr):
                    rec.write(s, (float(fx), float(fy)))
            report["dkl"]["files"]["spectra"] = "spectra.hspy"
        except (OSError, ValueError) as exc:
            outcome["output_errors"].append(f"{out / 'spectra.hspy'}: {exc}")

    try:
        path = write_run_h5(out / "run.h5", scene, res, orders, bound.describe(), scene.scan.pixel_size_A)
        with h5py.File(path, "a") as f:
            f["bridge/mean_counts"] = np.asarray(acq.mean_counts, np.float64)
            f["bridge/xy_px"] = np.asarray(acq.xy_px, np.float64).reshape(-1, 2)
            f["truth_fractions"] = scene.fractions(scene.candidates_px)
            f.attrs["frame_id"] = scene.scan.frame_id
            f.attrs["via"] = "bridge"
            f.attrs["report"] = json.dumps(report["dkl"], default=float)
    except OSError as exc:
        outcome["output_errors"].append(f"{out / 'run.h5'}: {exc}")
    if plots:
        try:
            write_plots(out, scene, res, res.settings.goal)
            report["dkl"]["files"].update({"path_plot": "path.png", "maps_plot": "maps.png"})
        except OSError as exc:
            outcome["output_errors"].append(f"plots: {exc}")
