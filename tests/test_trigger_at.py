"""The ejection trigger at the scan controller (``arm_trigger``): bit-exact with the service's, blanking at the
decision sample plus the logic's latency, refused for bad arguments, and the service's fallback.

The simulated microscope is served in the test's own thread on a hand-moved clock (as in test_controller.py).
"""

import math

import numpy as np
import pytest
from test_controller import Wire  # calls served in the test's thread

from beamloop.edge.control.controller import ScanController
from beamloop.edge.sim.microscope import MicroscopeConfig, SimulatedMicroscope
from beamloop.edge.trigger.model import ModelTrigger, model_hash, sample_trigger_models

FAST = {"frames": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*", "watchdog_s": None, "max_park_s": 100.0,
        "cross_section_barn": 20.0, "seed": 3}
"""A microscope whose parked S columns lose an atom within a few hundred samples."""


@pytest.fixture
def scope(clock, req_socket):
    """``(microscope, wire, frame_id, target)``: a frame acquired, ``target`` the fractions of an S2 column."""
    with SimulatedMicroscope(MicroscopeConfig(**FAST), clock=clock) as mic, req_socket(mic.control_endpoint) as s:
        wire = Wire(mic, s)
        fid = wire("acquire_frame", shape=[64, 64], fov_nm=[1.0, 1.0], dwell_us=1.0)["frame_id"]
        mic.step()
        fr = mic.backend.frames[fid]
        s2 = fr.class_names.index("S2")
        inner = [k for k in np.flatnonzero(fr.truth_cls == s2) if (8 < fr.truth_xy[k] ).all()
                 and (fr.truth_xy[k] < 56).all()]
        x, y = fr.truth_xy[inner[0]]
        yield mic, wire, fid, ((x + 0.5) / 64, (y + 0.5) / 64)


def capture(mic):
    """Record every block of samples the backend hands the controller."""
    blocks = []
    orig = mic.backend.parked_samples

    def parked_samples(n, dwell):
        counts, events = orig(n, dwell)
        blocks.append(counts.copy())
        return counts, events

    mic.backend.parked_samples = parked_samples
    return blocks


def dwell_until_end(mic, clock, max_blocks=2000):
    """Move the clock block by block until the open dwell ends (or ``max_blocks``)."""
    block_s = mic.config.block_samples * mic.config.sample_time_us * 1e-6
    for _ in range(max_blocks):
        if mic.dwell is None:
            return
        clock.t += block_s
        mic.step()
    raise AssertionError("the dwell did not end")


def test_capabilities_name_the_models_with_hash_threshold_and_latency(scope):
    mic, wire, _, _ = scope
    caps = wire("get_capabilities")
    assert {"arm_trigger", "get_trigger_state"} <= set(caps["calls"])
    models = caps["trigger"]["models"]
    shipped = sample_trigger_models()
    assert set(models) == set(shipped) and "ejection" in models and "fourd_column" not in models
    for name, m in models.items():
        assert m["hash"] == model_hash(name) and m["threshold"] == shipped[name]["threshold"]
        assert m["latency_ns"] > 0 and m["latency_source"] in ("manifest", "config")
        if shipped[name]["latency_ns"] is not None:
            assert m["latency_ns"] == shipped[name]["latency_ns"]


@pytest.mark.parametrize("model", ["ejection", "ejection_h16"])
def test_armed_trigger_fires_bit_exact_and_blanks_after_the_logic_latency(scope, clock, model):
    mic, wire, fid, (fx, fy) = scope
    blocks = capture(mic)
    wire("set_probe", x=fx, y=fy, frame_id=fid)
    rep = wire("arm_trigger", model=model, rearm="once")
    assert rep["armed"] and rep["blanked"] and mic.blanked  # arming never unblanks
    wire("blank", on=False)
    t_on = mic.dwell.started
    dwell_until_end(mic, clock)
    samples = np.concatenate(blocks)
    # the service-side runtime on the same samples, fed in other blocks: the same decision sample
    ref = ModelTrigger(model)
    ref.start()
    firsts = [ref.update(samples[a:a + 37]) for a in range(0, len(samples), 37)]
    k_ref = ref.trigger_sample
    assert k_ref >= 0 and sum(f >= 0 for f in firsts) == 1
    state = wire("get_trigger_state")
    last = state["last"]
    assert last["decision_sample"] == k_ref == len(samples) - 1  # the last sample the beam gave was the decision
    lat = wire("get_capabilities")["trigger"]["models"][model]["latency_ns"]
    dt_ns = mic.config.sample_time_us * 1e3
    assert last["latency_ns"] == lat and last["blank_time_ns"] == pytest.approx((k_ref + 1) * dt_ns + lat)
    assert last["blank_t_ns"] == round(t_on * 1e9 + (k_ref + 1) * dt_ns + lat)
    assert not state["armed"] and state["decisions"] == 1  # rearm="once"
    end = [e for e in mic.events if e["type"] == "dwell_end"][-1]
    assert end["reason"] == "trigger" and end["beam_off_sample"] == k_ref + 1 and end["trigger"] == last
    assert mic.blanked and mic.backend.blanked
    # no ejection after the blank; the one that fired the trigger came before it
    ej = end["ejection_samples"]
    assert ej and all(s <= k_ref + 1 for s in ej) and ej[0] <= k_ref


def test_rearm_dwell_decides_again_in_the_next_dwell(scope, clock):
    mic, wire, fid, (fx, fy) = scope
    wire("set_probe", x=fx, y=fy, frame_id=fid)
    wire("arm_trigger", model="ejection")  # rearm="dwell"
    for n in (1, 2):
        wire("blank", on=False)
        dwell_until_end(mic, clock)
        state = wire("get_trigger_state")
        assert state["decisions"] == n and state["armed"] and mic.blanked


def test_arm_trigger_by_hash_with_threshold_and_expected_rate(scope):
    mic, wire, _, _ = scope
    h = model_hash("ejection_h16")
    rep = wire("arm_trigger", model=h, threshold=123, expected_rate=7.5)
    assert (rep["model"], rep["threshold"], rep["expected_rate"], rep["hash"]) == ("ejection_h16", 123, 7.5, h)


@pytest.mark.parametrize("args, code, text", [
    ({"model": "nope"}, "out_of_range", "no trigger model 'nope' at this controller"),
    ({"model": "0" * 64}, "out_of_range", "no trigger model"),
    ({"model": "fourd_column"}, "out_of_range", "no trigger model"),
    ({}, "bad_request", "is not a model name or hash"),
    ({"model": 3}, "bad_request", "is not a model name or hash"),
    ({"model": "ejection", "threshold": 1.5}, "bad_request", "threshold 1.5 is not an integer score"),
    ({"model": "ejection", "threshold": True}, "bad_request", "is not an integer score"),
    ({"model": "ejection", "threshold": 1 << 40}, "out_of_range", "outside the 32-bit score range"),
    ({"model": "ejection", "rearm": "never"}, "out_of_range", "rearm 'never'; expected one of dwell, once"),
    ({"model": "ejection", "expected_rate": 0.0}, "out_of_range", "expected_rate 0.0 is outside"),
    ({"model": "ejection", "expected_rate": math.nan}, "out_of_range", "is outside"),
    ({"model": "ejection", "expected_rate": 10 ** 400}, "out_of_range", "is outside"),
    ({"model": "ejection", "expected_rate": "7"}, "bad_request", "is not a number"),
    ({"model": "ejection", "blank": False}, "bad_request", "unknown arguments ['blank']"),
])
def test_arm_trigger_refuses_bad_arguments_in_one_line(scope, args, code, text):
    mic, wire, fid, (fx, fy) = scope
    wire("set_probe", x=fx, y=fy, frame_id=fid)
    before = mic.safety.counters.refused_trigger
    msg = wire.refused(code, "arm_trigger", **args)
    assert text in msg and "\n" not in msg
    assert mic.safety.counters.refused_trigger == before + 1
    assert mic.trigger is None and mic.blanked and mic.dwell is None  # nothing armed, the beam still off


def test_arm_trigger_never_turns_the_beam_on_nor_takes_the_watchdog(scope):
    mic, wire, fid, (fx, fy) = scope
    wire("set_probe", x=fx, y=fy, frame_id=fid)
    owner = mic.safety.owner
    mic.safety.owner = "someone else"
    wire("arm_trigger", model="ejection", rearm="dwell", expected_rate=7.0)
    assert mic.blanked and mic.dwell is None and not mic.safety.armed and mic.safety.owner == "someone else"
    assert mic.backend.trigger is None  # decides only once a dwell starts
    mic.safety.owner = owner


def test_controller_without_a_trigger_says_so(clock, req_socket):
    cfg = MicroscopeConfig(**{**FAST, "trigger": False})
    with SimulatedMicroscope(cfg, clock=clock) as mic, req_socket(mic.control_endpoint) as s:
        wire = Wire(mic, s)
        caps = wire("get_capabilities")
        assert caps["trigger"] is None and "arm_trigger" not in caps["calls"]
        wire.refused("unknown_call", "arm_trigger", model="ejection")


def test_controller_over_a_backend_without_trigger(clock):
    class Plain:
        def capabilities(self):
            from beamloop.edge.control.controller import Capabilities
            from beamloop.edge.control.protocol import ScanLimits
            return Capabilities(ScanLimits((16, 64), (0.1, 10.0), 1.0, ("haadf",)))

        def set_frame(self, scan, channels):
            return {}

        def acquire(self, scan, channels):
            raise NotImplementedError

        def park(self, fx, fy, frame_id):
            return fx, fy

        def set_blanked(self, on):
            return on

    with ScanController(Plain(), clock=clock) as ctl:
        assert ctl._trigger_caps() is None and "arm_trigger" not in ctl.server.handlers


# the service's side ---------------------------------------------------------------------------------------------
def _service(mic, trigger="model", trigger_at="controller"):
    from beamloop.edge.control.client import BridgeClient
    from beamloop.edge.path import frame_path
    from beamloop.edge.service import EdgeService
    from beamloop.streams.native.receiver import FrameReceiver

    rx = FrameReceiver(mic.frames_endpoint)
    bridge = BridgeClient(mic.control_endpoint, timeout_ms=5000)
    return EdgeService(rx, frame_path("classical", "MoS2"), bridge, trigger=trigger, trigger_at=trigger_at)


def _s2_target(service, mic):
    """A :class:`Target` on an S2 column of a freshly acquired frame (from the ground truth)."""
    from beamloop.edge.stages.policy import Target

    scan = service.bridge.acquire_frame((64, 64), (1.0, 1.0), 1.0)
    assert service.next_frame(10000) is not None
    fr = mic.backend.frames[scan.frame_id]
    s2 = fr.class_names.index("S2")
    k = next(k for k in np.flatnonzero(fr.truth_cls == s2)
             if (8 < fr.truth_xy[k]).all() and (fr.truth_xy[k] < 56).all())
    x, y = fr.truth_xy[k]
    return Target(float(x), float(y), (x + 0.5) / 64, (y + 0.5) / 64, scan.frame_id, -1)


@pytest.mark.parametrize("microscope", [FAST], indirect=True)
def test_service_dwell_decided_at_the_controller(microscope):
    service = _service(microscope)
    try:
        assert service.trigger_at == "service" and not service.trigger_at_chosen  # until it saw the controller
        assert service.choose_trigger_at(service.bridge.get_capabilities()) == "controller"
        d = service.dwell(_s2_target(service, microscope), max_dwell_s=5.0)
        assert (d.reason, d.trigger_at) == ("trigger", "controller"), d.error
        # the service's own trigger, on the samples streamed to it, fired on the same sample
        assert d.trigger_sample == d.service_trigger_sample >= 0 and d.samples == d.trigger_sample + 1
        calls = [e.call for e in service.bridge.log]
        assert calls[-4:] == ["arm_trigger", "blank", "get_trigger_state", "blank"]  # arm, unblank, read, blank
        lat = service.bridge.get_trigger_state()["last"]["latency_ns"]
        assert d.blank_time_ns == pytest.approx((d.trigger_sample + 1) * 10_000.0 + lat)
        end = [e for e in microscope.events if e["type"] == "dwell_end" and e["series_id"] == d.series_id][0]
        assert end["beam_off_sample"] == d.trigger_sample + 1 and end["reason"] == "trigger"
        assert service.bridge.get_state()["blanked"] is True
    finally:
        service.bridge.close()
        service.receiver.close()


@pytest.mark.parametrize("microscope", [{**FAST, "trigger": False}], indirect=True)
def test_controller_without_trigger_falls_back_to_the_service(microscope):
    service = _service(microscope)
    try:
        assert service.choose_trigger_at(service.bridge.get_capabilities()) == "service"
        assert service.trigger_at_note == "the scan controller has no trigger"
        d = service.dwell(_s2_target(service, microscope), max_dwell_s=5.0)
        assert (d.reason, d.trigger_at) == ("trigger", "service") and d.trigger_sample == d.service_trigger_sample
        assert math.isnan(d.blank_time_ns) and "arm_trigger" not in [e.call for e in service.bridge.log]
    finally:
        service.bridge.close()
        service.receiver.close()


@pytest.mark.parametrize("microscope", [FAST], indirect=True)
def test_where_the_service_lets_the_controller_decide(microscope):
    caps = None
    for trigger, at, offered, want, note in [
        ("model", "service", True, "service", ""),
        ("cusum", "controller", True, "service", "the cusum trigger runs only in the service"),
        ("model", "controller", False, "service", "the scan controller has no trigger"),
        ("model", "controller", "other hash", "service", "differs from the service's (hash)"),
        ("model", "controller", True, "controller", ""),
    ]:
        service = _service(microscope, trigger, at)
        try:
            caps = caps or service.bridge.get_capabilities()
            c = dict(caps)
            if offered is False:
                c["trigger"] = None
            elif offered == "other hash":
                m = service.trigger.model_name  # the default model, offered with another hash
                c["trigger"] = {"models": {m: {**caps["trigger"]["models"][m], "hash": "0" * 64}}}
            assert service.choose_trigger_at(c) == want and note in service.trigger_at_note
        finally:
            service.bridge.close()
            service.receiver.close()
    with pytest.raises(ValueError, match="trigger_at 'fpga'"):
        _service(microscope, trigger_at="fpga")


def test_report_rows_and_summary_carry_trigger_at():
    from beamloop.edge.experiments.closed_loop import dwell_summary

    rows = [{"reason": "trigger", "trigger_at": "controller", "trigger_sample": 114, "service_trigger_sample": 114,
             "ejection_sample": 100, "end_sample": 115, "blank_time_ns": 115 * 10_000.0 + 200.0},
            {"reason": "trigger", "trigger_at": "controller", "trigger_sample": 50, "service_trigger_sample": 50,
             "ejection_sample": -1, "end_sample": 51, "blank_time_ns": 51 * 10_000.0 + 200.0}]
    s = dwell_summary(rows, 10.0, electrons_per_s=1e8, trigger_at="controller")
    assert s["trigger_at"] == "controller" and s["decisions_at_controller"] == 2 and s["service_check_agrees"] == 2
    assert (s["detected"], s["false_triggers"]) == (1, 1)
    assert (s["detection_delay_samples_p50"], s["samples_after_ejection_p50"]) == (14.0, 15.0)
    assert s["extra_electrons_after_ejection_p50"] == pytest.approx((15 * 10e-6 + 200e-9) * 1e8)


@pytest.mark.parametrize("trigger_at", ["controller", pytest.param("service", marks=pytest.mark.slow)])
def test_main_job_records_where_the_trigger_decided(tmp_path, trigger_at):
    import h5py

    from beamloop.edge.experiments import closed_loop

    rep = closed_loop.run(tmp_path, rounds=1, shape=(192, 192), targets_per_frame=2, seed=5, quiet=True,
                          trigger_at=trigger_at)
    t = rep["trigger"]
    assert t["trigger_at"] == trigger_at and rep["config"]["trigger_at"] == trigger_at
    assert {"samples_after_ejection_p50", "detection_delay_samples_p50"} <= set(t) and t["detected"] == 2
    if trigger_at == "controller":
        assert t["decisions_at_controller"] == t["service_check_agrees"] == 2
        assert t["samples_after_ejection_max"] <= t["detection_delay_samples_max"] + 1
    truth = rep["verification"]["truth"]
    assert truth["targets"] == 2 and sum(truth["classes"].values()) == 2
    with h5py.File(tmp_path / "run.h5") as f:
        dw = f["dwells"][()]
        assert [v.decode() for v in dw["trigger_at"]] == [trigger_at] * 2
        assert np.all(np.isfinite(dw["blank_time_ns"])) and np.all(dw["trigger_sample"] >= 0)
        log = f["beam_log"][()]
        decisions = [r for r in log if r["call"] == b"trigger_decision"]
        assert len(decisions) == 2
        import json
        args = json.loads(decisions[0]["args"])
        assert args["trigger_at"] == trigger_at and args["decision_sample"] == dw["trigger_sample"][0]
