"""Stage moves over the control bridge (move_stage, get_stage) and the large simulated specimen."""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np
import pytest

from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.protocol import BridgeError, StageLimits, parse_move_stage
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim.specimen import (
    RARE_CLASSES,
    REGION_CLASSES,
    LargeSpecimen,
    SearchMicroscope,
    SpecimenBackend,
    SpecimenConfig,
)

LIM = StageLimits((-4.0, 4.0), (-3.0, 3.0), speed_um_per_s=2.0, settle_s=4.0, backlash_um=0.1)


def test_move_time_known_answer():
    # both axes at once: the longer one sets the travel time, then the settle time
    assert LIM.move_time_s(3.0, -1.0) == pytest.approx(3.0 / 2.0 + 4.0)
    assert LIM.move_time_s(0.0, 0.0) == 0.0
    assert StageLimits.from_dict(LIM.as_dict()) == LIM


@pytest.mark.parametrize("args, code", [({"x_um": 1.0}, "bad_request"), ({"x_um": math.nan, "y_um": 0}, "bad_request"),
                                        ({"x_um": True, "y_um": 0}, "bad_request"),
                                        ({"x_um": 4.5, "y_um": 0}, "out_of_range"),
                                        ({"x_um": 0, "y_um": -3.01}, "out_of_range")])
def test_parse_move_stage_refuses(args, code):
    with pytest.raises(BridgeError) as e:
        parse_move_stage(args, LIM)
    assert e.value.code == code


@pytest.mark.parametrize("kw", [{"x_um": (1.0, 1.0)}, {"speed_um_per_s": 0.0}, {"settle_s": -1.0}])
def test_stage_limits_refuse_bad_values(kw):
    base = {"x_um": (-1.0, 1.0), "y_um": (-1.0, 1.0), "speed_um_per_s": 1.0, "settle_s": 1.0}
    with pytest.raises(ValueError):
        StageLimits(**{**base, **kw})


def test_backlash_known_answer(clock):
    cfg = SpecimenConfig(size_um=4.0, repeat_um=0.0, drift_A_per_s=0.0, drift_settle_A_per_s=0.0,
                         stage=StageLimits((-2.0, 2.0), (-2.0, 2.0), 2.0, 1.0, backlash_um=0.2))
    b = SpecimenBackend(cfg, clock)
    x, y, dur = b.move_stage(1.0, 0.0)
    assert (x, y) == (1.0, 0.0) and dur == pytest.approx(0.5 + 1.0)
    assert b.true_um == pytest.approx((0.9, 0.0))  # x stopped 0.1 short moving +; y did not move
    b.move_stage(-1.0, 0.5)
    assert b.true_um == pytest.approx((-0.9, 0.4))
    assert b.stage_position() == (-1.0, 0.5)  # the encoders read the target


def test_specimen_has_every_class_and_rare_regions():
    sp = LargeSpecimen(SpecimenConfig(seed=3))
    fractions = np.bincount(sp.labels.ravel(), minlength=len(REGION_CLASSES)) / sp.labels.size
    assert (fractions > 0).all()
    assert fractions[REGION_CLASSES.index("monolayer")] > 0.4
    assert all(fractions[REGION_CLASSES.index(c)] < 0.02 for c in RARE_CLASSES)
    q = sp.rare[0]
    lab = sp.labels_of((q.x_nm, q.y_nm), (100.0, 100.0), (8, 8))
    assert (lab[3:5, 3:5] == REGION_CLASSES.index(q.cls)).all()  # the region is where its record says
    assert sp.rare_in((q.x_nm, q.y_nm), (500.0, 500.0))[0] == q


def test_render_contrast_and_repeat():
    sp = LargeSpecimen(SpecimenConfig(seed=3))
    img, lab = sp.render((0.0, 0.0), (4000.0, 4000.0), (256, 256), 100.0)
    again, _ = sp.render((0.0, 0.0), (4000.0, 4000.0), (256, 256), 100.0)
    assert img.dtype == np.uint16 and lab.shape == (256, 256)
    assert np.array_equal(img, again)  # the same frame repeats exactly
    mean = {c: img[lab == k].mean() for k, c in enumerate(REGION_CLASSES) if (lab == k).sum() > 20}
    assert mean["hole"] < mean["monolayer"] < mean["multilayer"]  # mass-thickness contrast
    if "particle" in mean:
        assert mean["particle"] > mean["multilayer"]


@contextlib.contextmanager
def served(clock, **cfg):
    mic = SearchMicroscope(SpecimenConfig(**cfg), clock=clock)
    stop = threading.Event()
    th = threading.Thread(target=mic.serve, kwargs={"stop": stop.is_set}, daemon=True)
    th.start()
    try:
        with BridgeClient(mic.control_endpoint, timeout_ms=5000) as c:
            yield mic, c
    finally:
        stop.set()
        th.join()
        mic.close()


def test_move_stage_over_the_bridge(clock):
    with served(clock) as (mic, c):
        caps = c.get_capabilities()
        assert caps["stage"]["x_um"] == [-4.0, 4.0] and "move_stage" in caps["calls"]
        assert caps["max_fov_nm"] == 4000.0
        scan = c.acquire_frame((64, 64), (1000.0, 1000.0), 1.0)
        c.blank(False)
        res = c.move_stage(2.0, -1.0)
        assert res["blanked"] is True and res["duration_s"] == pytest.approx(2.0 / 2.0 + 4.0)
        assert mic.blanked
        st = c.get_stage()
        assert st["moving"] and st["x_um"] == 2.0 and st["settles_in_s"] == pytest.approx(5.0)
        for call, args in (("acquire_frame", {"shape": [64, 64], "fov_nm": [100.0, 100.0]}),
                           ("blank", {"on": False})):
            with pytest.raises(BridgeError) as e:
                c.call(call, **args)
            assert e.value.code == "busy"
        assert mic.blanked  # refused while moving: still blanked
        assert mic.safety.counters.refused_stage_moving == 2
        clock.t += 5.01
        assert not c.get_stage()["moving"]
        with pytest.raises(BridgeError) as e:  # the frame before the move no longer names the specimen here
            c.call("set_probe", x=0.5, y=0.5, frame_id=scan.frame_id)
        assert e.value.code == "stale_frame"
        c.acquire_frame((64, 64), (1000.0, 1000.0), 1.0)
        with pytest.raises(BridgeError) as e:
            c.move_stage(9.0, 0.0)
        assert e.value.code == "out_of_range" and mic.safety.counters.refused_stage == 1
        assert [ev["target_um"] for ev in mic.events if ev["type"] == "stage_move"] == [[2.0, -1.0]]


def test_client_refuses_non_finite_target(clock):
    with served(clock) as (mic, c):
        with pytest.raises(BridgeError) as e:
            c.move_stage(math.inf, 0.0)
        assert e.value.code == "bad_request" and mic.stage_moves == 0


def test_frame_follows_the_stage(clock):
    # the frame is rendered where the stage (with drift after the move) really is
    with served(clock, repeat_um=0.0, drift_A_per_s=0.0, drift_settle_A_per_s=0.0) as (mic, c):
        q = mic.backend.specimen.rare[0]
        c.move_stage(q.x_nm / 1000, q.y_nm / 1000)
        clock.t += 30
        scan = c.acquire_frame((64, 64), (500.0, 500.0), 1.0)
        mic.run_pending()
        truth = c.call("sim_frame_truth", frame_id=scan.frame_id)
        assert q.index in truth["rare"]
        bl = mic.backend.limits.backlash_um * 500
        assert abs(truth["center_nm"][0] - q.x_nm) <= bl + 1e-6 and abs(truth["center_nm"][1] - q.y_nm) <= bl + 1e-6


def test_nion_stage_and_center(usim, clock):
    """The Nion adapter drives nionswift-usim's ``stage_position_m`` and honours ``center_nm``."""
    from beamloop.edge.control.nion import NionScanController
    from beamloop.edge.control.safety import SafetyLimits

    scan = usim
    stage = StageLimits((-10.0, 10.0), (-10.0, 10.0), speed_um_per_s=5.0, settle_s=1.0)
    ctl = NionScanController(scan, limits=SafetyLimits(watchdog_s=None), clock=clock, stage=stage)
    stop = threading.Event()
    th = threading.Thread(target=ctl.serve, kwargs={"stop": stop.is_set}, daemon=True)
    th.start()
    try:
        with BridgeClient(ctl.control_endpoint, timeout_ms=30000) as c:
            assert c.get_capabilities()["stage"] == stage.as_dict()
            res = c.move_stage(3.0, -2.0)
            assert res["applied"] == pytest.approx({"x_um": 3.0, "y_um": -2.0})
            assert res["duration_s"] == pytest.approx(3.0 / 5.0 + 1.0)
            p = scan.stem_controller.GetVal2D("stage_position_m")
            assert (p.x, p.y) == pytest.approx((3e-6, -2e-6))
            assert c.get_stage()["moving"]
            clock.t += 2.0
            assert not c.get_stage()["moving"]
            ctl.backend.set_frame(ScanFrame(1, (32, 32), (20.0, 20.0), center_nm=(5.0, -3.0)), ("haadf",))
            fp = ctl.backend.frame_parameters
            assert (fp.center_nm.x, fp.center_nm.y) == (5.0, -3.0)
    finally:
        stop.set()
        th.join()
        ctl.close()
