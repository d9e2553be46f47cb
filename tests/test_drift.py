"""Specimen drift in the simulated microscope, frame registration, the drift estimator and lock-on.

All on hand-moved clocks: the simulator's drift and the service's prediction read the clock they are given.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest

from beamloop.edge.analysis.drift import DriftEstimator
from beamloop.edge.control.controller import Dwell
from beamloop.edge.frame.context import FrameContext, FrameMeta
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.materials import MOS2
from beamloop.edge.sim.drift import DriftConfig, SpecimenDrift, coil_response
from beamloop.edge.sim.microscope import MicroscopeConfig, SimulatedBackend
from beamloop.edge.stages.register import Register


class HandClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def drifting(clock, speed=0.1, direction=30.0, **kw) -> SimulatedBackend:
    """A backend drifting at ``speed`` A/s without random walk, wobble or jitter (known shifts)."""
    cfg = dict(seed=2, specimen_size_A=80.0, drift_A_per_s=speed, drift_direction_deg=direction,
               drift_walk_A_per_sqrt_s=0.0, distortion_scale=0.0, scan_damage=False)
    cfg.update(kw)
    return SimulatedBackend(MicroscopeConfig(**cfg), clock)


def scan_of(fid: int, n: int = 192, px: float = 0.15, dose: float = 1e5) -> ScanFrame:
    dwell_us = dose * px * px / 3.1207e8 * 1e6  # 50 pA
    return ScanFrame(fid, (n, n), (n * px / 10, n * px / 10), dwell_us=dwell_us)


def acquire(b: SimulatedBackend, scan: ScanFrame) -> np.ndarray:
    b.set_frame(scan, ("haadf",))
    return b.acquire(scan, ("haadf",)).data["haadf"]


def register_frame(reg: Register, image: np.ndarray, scan: ScanFrame, timing=None) -> dict:
    ctx = FrameContext()
    ctx.meta = FrameMeta.of(image, scan.pixel_size_A, MOS2)
    ctx.image, ctx.scan = image, scan
    if reg._cur.shape != image.shape:
        reg.prepare(ctx.meta)
    if timing is not None:
        reg.set_timing(*timing)
    reg.process(ctx)
    return ctx.extras["drift"]


# --- simulator ---------------------------------------------------------------------------------------------
def test_drift_zero_is_bit_identical_to_the_simulator_before_drift():
    """A frame, its ground truth and a parked series at drift 0: the digest the simulator gave before drift
    was modelled (commit 3d437bc, computed there with the same script)."""
    b = SimulatedBackend(MicroscopeConfig(seed=3, specimen_size_A=60.0))
    assert b.drift is None
    scan = ScanFrame(0, (64, 64), (0.96, 0.96), dwell_us=5.0)
    b.set_frame(scan, ("haadf",))
    acq = b.acquire(scan, ("haadf",))
    b.park(0.5, 0.5, 0)
    h = hashlib.sha256()
    h.update(acq.data["haadf"].tobytes())
    h.update(b.frames[0].truth_xy.tobytes())
    d = Dwell(0.5, 0.5, 0, 1, 0.0, None)
    for _ in range(20):
        counts, events = b.parked_samples(100, d)
        h.update(counts.tobytes())
        h.update(repr([(e["sample"], e["column"]) for e in events if e["type"] == "ejection"]).encode())
        d.samples += len(counts)
    assert h.hexdigest() == "d7e0d2f9aa74779fba0654011abfdf5125c0b38f41337bae1f27e5168fdf9eaa"
    assert "t_start_s" not in acq.user_data


def test_specimen_drift_is_continuous_and_reproducible():
    cfg = DriftConfig(0.2, 90.0, walk_A_per_sqrt_s=0.01, seed=4)
    a, b = SpecimenDrift(cfg, 0.0), SpecimenDrift(cfg, 0.0)
    t = np.linspace(0, 30, 3001)
    dx, dy = a.displacement(t)
    assert np.max(np.abs(np.diff(dy))) < 0.01  # no jumps between samples 10 ms apart
    assert dy[-1] == pytest.approx(6.0, abs=0.3) and abs(dx[-1]) < 0.3
    # the same walk whatever order it is asked in
    late = b.displacement(np.array([30.0]))
    assert np.allclose(b.displacement(t)[1], dy) and late[1][0] == pytest.approx(dy[-1])


def test_settling_after_a_field_of_view_change():
    d = SpecimenDrift(DriftConfig(0.0, 0.0, walk_A_per_sqrt_s=0.0, settle_A_per_s=1.0, settle_tau_s=10.0), 0.0)
    d.fov_changed(5.0)
    x, _ = d.displacement(np.array([5.0, 15.0, 1e4]))
    assert x[0] == 0.0 and x[1] == pytest.approx(10 * (1 - math.exp(-1))) and x[2] == pytest.approx(10.0)
    assert d.velocity(15.0)[0] == pytest.approx(math.exp(-1))


def test_coil_response_settles_with_the_given_overshoot():
    s = np.linspace(0, 50, 5001)
    assert coil_response(s, 0.0, 0.0).max() == 0.0
    crit = coil_response(s, 2.0, 0.0)
    assert crit[0] == 1.0 and crit.min() >= 0 and crit[-1] < 1e-9
    under = coil_response(s, 2.0, 0.2)
    assert -under.min() == pytest.approx(0.2, abs=1e-3)  # the probe passes the target by 20 % of the move


def test_frames_and_ground_truth_move_with_the_specimen():
    clock = HandClock()
    b = drifting(clock, speed=0.5, direction=0.0)
    acquire(b, scan_of(0, 96))
    clock.t += 4.0
    acquire(b, scan_of(1, 96))
    f0, f1 = b.frames[0], b.frames[1]
    common, i0, i1 = np.intersect1d(f0.truth_index, f1.truth_index, return_indices=True)
    moved = f1.truth_xy[i1] - f0.truth_xy[i0]
    # 4 s at 0.5 A/s; a column 13 px further along its line is scanned 13 pixel dwells later (3e-4 px more)
    assert np.allclose(moved[:, 0], 2.0 / 0.15, atol=1e-3) and np.allclose(moved[:, 1], 0.0, atol=1e-6)


def test_parked_signal_falls_as_the_column_drifts_away():
    clock = HandClock()
    b = drifting(clock, speed=1.0, direction=0.0, cross_section_barn=0.0)
    scan = scan_of(0, 96)
    acquire(b, scan)
    fr = b.frames[0]
    mo = fr.class_names.index("Mo")
    centre = np.array([47.5, 47.5])
    k = [i for i in np.argsort(np.hypot(*(fr.truth_xy - centre).T)) if fr.truth_cls[i] == mo][0]
    b.park(*scan.fraction_of_pixel(*fr.truth_xy[k]), 0)
    d = Dwell(0.5, 0.5, 0, 1, clock.t, None)
    means = []
    for _ in range(10):  # 10 blocks of 0.1 s: the column walks 1 A away
        counts, _ = b.parked_samples(10_000, d)
        d.samples += len(counts)
        means.append(counts.mean())
    assert all(np.diff(means) < 0) and means[-1] < 0.5 * means[0]  # a slow decline, not a step


# --- registration and the estimator -----------------------------------------------------------------------
@pytest.mark.parametrize("dt_s", [1.7, 4.3, 9.1])
def test_registration_recovers_known_subpixel_shifts(dt_s):
    """Two frames of a specimen drifting 0.1 A/s at 30 degrees, ``dt_s`` apart (a shift of 1.1 .. 6.1 px, with
    fractional parts), 1e5 e/A^2: the registered shift within 0.05 px of the simulator's."""
    clock = HandClock()
    b = drifting(clock)
    reg = Register()
    register_frame(reg, acquire(b, scan_of(0)), scan_of(0))
    clock.t += dt_s
    got = register_frame(reg, acquire(b, scan_of(1)), scan_of(1))["shift_px"]
    dx, dy = b.drift.displacement(np.array([b.frames[1].t_start_s])) - np.array(
        b.drift.displacement(np.array([b.frames[0].t_start_s])))
    true = np.array([dx[0], dy[0]]) / 0.15
    assert np.hypot(*(np.array(got) - true)) <= 0.05


def test_registration_buffers_are_preallocated():
    reg = Register()
    reg.prepare(FrameMeta((64, 64), np.dtype(np.uint16), 0.15, MOS2))
    bufs = (reg._cur, reg._window, reg._registrar)
    rng = np.random.default_rng(0)
    for k in range(3):
        register_frame(reg, rng.poisson(50, (64, 64)).astype(np.uint16), scan_of(k, 64))
    assert reg._cur is bufs[0] and reg._window is bufs[1] and reg._registrar is bufs[2]


def test_kalman_recovers_a_constant_velocity_from_noisy_positions():
    rng = np.random.default_rng(1)
    est = DriftEstimator(measurement_sigma_A=0.05)
    v = np.array([0.3, -0.12])
    for t in np.arange(0.0, 20.0, 0.8):
        est.update(100.0 + t, v * t + rng.normal(0, 0.05, 2))
    assert np.allclose(est.velocity_A_per_s, v, atol=0.01)
    (dx, dy), sigma = est.shift(110.0, 125.0)
    assert dx == pytest.approx(4.5, abs=0.15) and dy == pytest.approx(-1.8, abs=0.15) and 0.05 < sigma < 0.6
    assert est.shift(118.0, 120.0)[1] < sigma  # a shorter prediction is more certain
    assert DriftEstimator().shift(0.0, 1.0)[1] == math.inf


def test_register_stage_is_only_in_paths_with_drift_correction():
    from beamloop.edge.app import ServiceConfig, build_path
    from beamloop.edge.service import latency_keys

    plain = build_path(ServiceConfig("MoS2", targets_per_frame=4))
    assert "register" not in plain.names
    assert latency_keys(plain)[2:-3] == ("background", "preprocess", "find", "classify", "vacancies", "ood", "policy")
    locked = build_path(ServiceConfig("MoS2", targets_per_frame=4, lock_on="predict"))
    assert locked.names[-2:] == ("register", "policy")
    with pytest.raises(ValueError, match="lock_on"):
        ServiceConfig("MoS2", lock_on="always")


# --- where the probe lands --------------------------------------------------------------------------------
def landing(b: SimulatedBackend, clock: HandClock) -> dict:
    counts, events = b.parked_samples(10, Dwell(0.5, 0.5, 0, 7, clock.t, None))
    return next(e for e in events if e["type"] == "probe_landed")


def target_column(b: SimulatedBackend, fid: int) -> tuple[int, np.ndarray]:
    fr = b.frames[fid]
    rows, cols = fr.scan.shape
    k = int(np.argmin(np.hypot(fr.truth_xy[:, 0] - cols / 2, fr.truth_xy[:, 1] - rows / 2)))
    return int(fr.truth_index[k]), fr.truth_xy[k]


def test_without_lock_on_the_probe_lands_off_the_column_by_the_drift():
    clock = HandClock()
    b = drifting(clock, speed=0.5, direction=0.0)
    scan = scan_of(0)
    acquire(b, scan)
    col, xy = target_column(b, 0)
    t_line = b.frames[0].t_start_s + (xy[1] + 0.5) * (scan.shape[1] * scan.dwell_us + 20.0) * 1e-6
    clock.t += 3.0
    b.park(*scan.fraction_of_pixel(*xy), 0)
    ev = landing(b, clock)
    rest = b.specimen.xy[col]
    dist_pm = 100 * math.hypot(ev["probe_A"][0] - rest[0], ev["probe_A"][1] - rest[1])
    assert dist_pm == pytest.approx(50 * (clock.t - t_line), abs=2.0)  # 0.5 A/s since the column was scanned


def test_with_lock_on_predict_the_probe_lands_on_the_column():
    from beamloop.edge.path import frame_path
    from beamloop.edge.service import EdgeService
    from beamloop.edge.stages.policy import Target

    clock = HandClock()
    b = drifting(clock, speed=0.5, direction=40.0)
    svc = EdgeService(None, frame_path("classical", "MoS2", register=Register()), None, lock_on="predict",  # type: ignore[arg-type]
                      clock=clock, heartbeat_s=None)
    for fid in range(3):  # frames 1.5 s apart: the service registers them and estimates the drift
        scan = scan_of(fid)
        image = acquire(b, scan)
        svc.frame_timing(scan, b.frames[fid].t_start_s, (scan.shape[1] * scan.dwell_us + 20.0) * 1e-6)
        svc.path.run(image, scan=scan)
        clock.t += 1.5
    col, xy = target_column(b, 2)
    fx, fy = scan.fraction_of_pixel(*xy)
    placed, shift, sigma = svc.predict_target(Target(float(xy[0]), float(xy[1]), float(fx), float(fy), 2, 0))
    assert sigma < 0.5
    b.park(*placed, 2)
    ev = landing(b, clock)
    rest = b.specimen.xy[col]
    assert 100 * math.hypot(ev["probe_A"][0] - rest[0], ev["probe_A"][1] - rest[1]) <= 10.0
    b.park(fx, fy, 2)  # the same target without the prediction: ~0.9 A off
    ev = landing(b, clock)
    assert 100 * math.hypot(ev["probe_A"][0] - rest[0], ev["probe_A"][1] - rest[1]) > 50.0


@pytest.mark.slow
def test_main_job_keeps_the_beam_on_a_drifting_specimen(tmp_path):
    from beamloop.edge.experiments import closed_loop

    rep = closed_loop.run(tmp_path, rounds=2, shape=(192, 192), targets_per_frame=3, seed=1, quiet=True,
                          drift_A_per_s=0.5, lock_on="predict")
    d = rep["drift"]
    assert d["simulated"]["speed_A_per_s"] == pytest.approx(0.5, abs=0.05)
    assert d["estimate"]["estimate"]["speed_A_per_s"] == pytest.approx(0.5, abs=0.1)
    assert d["landing_distance_pm"]["p50"] <= 20.0 and d["written_truth"] >= 0.8 * d["targets"] > 0


def test_tracking_keeps_the_parked_probe_on_a_drifting_column():
    """``track_probe`` (``set_probe``'s ``track``) at the drift's rate: the probe follows the column."""
    clock = HandClock()
    b = drifting(clock, speed=1.0, direction=0.0)
    scan = scan_of(0)
    acquire(b, scan)
    col, xy = target_column(b, 0)
    t_line = b.frames[0].t_start_s + (xy[1] + 0.5) * (scan.shape[1] * scan.dwell_us + 20.0) * 1e-6
    clock.t += 1.0
    fx, fy = scan.fraction_of_pixel(xy[0] + 1.0 / 0.15 * (clock.t - t_line), xy[1])  # where it is now
    b.park(float(fx), float(fy), 0)
    assert b.track_probe(1.0 / (scan.fov_nm[1] * 10), 0.0) == pytest.approx((1.0 / (scan.fov_nm[1] * 10), 0.0))
    rest = b.specimen.xy[col]
    for _ in range(3):
        clock.t += 0.5
        x, y = b.probe_rest_A(np.array([clock.t]))
        assert 100 * math.hypot(x[0] - rest[0], y[0] - rest[1]) < 3.0
    b.park(float(fx), float(fy), 0)  # back where it was aimed 1.5 s ago, untracked: 3 s of drift off 1.5 s later
    clock.t += 1.5
    x, y = b.probe_rest_A(np.array([clock.t]))
    assert math.hypot(x[0] - rest[0], y[0] - rest[1]) == pytest.approx(3.0, abs=0.05)


def test_set_probe_track_is_checked():
    from beamloop.edge.control.protocol import BridgeError, check_track

    assert check_track([0.01, -0.02]) == (0.01, -0.02)
    for bad in ([0.5, 0.0], [math.nan, 0.0], "fast", [0.01], [True, 0.0]):
        with pytest.raises(BridgeError, match="track"):
            check_track(bad)


def test_rescan_finds_the_column_nearest_the_subscan_centre():
    """A 32-pixel subscan centred 0.3 A off a column: :func:`column_near_centre` finds the column."""
    from beamloop.edge.service import column_near_centre

    clock = HandClock()
    b = drifting(clock, speed=1e-9)
    b.set_frame(scan_of(0), ("haadf",))
    b.acquire(scan_of(0), ("haadf",))
    col, _ = target_column(b, 0)
    x, y = b.specimen.xy[col]
    sub = ScanFrame(1, (32, 32), (0.48, 0.48), center_nm=((x + 0.3) / 10, (y - 0.2) / 10), dwell_us=scan_of(0).dwell_us)
    image = acquire(b, sub)
    px, py = column_near_centre(image, 0.45 / 0.15)
    fx, fy = sub.fraction_of_pixel(px, py)
    sx, sy = sub.specimen_of_fraction(fx, fy)
    assert 100 * math.hypot(sx - x, sy - y) < 8.0


def test_acquire_frame_subscans_are_checked():
    from beamloop.edge.control.protocol import BridgeError, ScanLimits, parse_acquire_frame

    lim = ScanLimits(shape=(16, 2048), dwell_us=(0.05, 1000.0), default_dwell_us=10.0, channels=("haadf",),
                     max_fov_nm=10.0)
    req = parse_acquire_frame({"shape": [32, 32], "fov_nm": [0.5, 0.5], "center_nm": [0.3, -0.2]}, lim)
    assert req.center_nm == (0.3, -0.2)
    assert parse_acquire_frame({"shape": [32, 32], "fov_nm": [0.5, 0.5]}, lim).center_nm == (0.0, 0.0)
    for bad in ([math.nan, 0.0], "middle", [1.0], [True, 0.0]):
        with pytest.raises(BridgeError, match="center_nm"):
            parse_acquire_frame({"shape": [32, 32], "fov_nm": [0.5, 0.5], "center_nm": bad}, lim)
    b = SimulatedBackend(MicroscopeConfig(seed=0, specimen_size_A=60.0))
    with pytest.raises(BridgeError, match="beyond"):
        b.set_frame(ScanFrame(0, (32, 32), (0.5, 0.5), center_nm=(2.9, 0.0)), ("haadf",))
