"""The ejection trigger at the scan controller (``arm_trigger``): bit-exact with the service's, blanking at the
decision sample plus the logic's latency, refused for bad arguments, and the service's fallback.

The simulated microscope is served in the test's own thread on a hand-moved clock (as in test_controller.py).
"""

import math

import numpy as np
import pytest

from beamloop.edge.control.controller import ScanController
from beamloop.edge.control.protocol import BridgeError, decode_reply, encode_request
from beamloop.edge.sim.microscope import MicroscopeConfig, SimulatedMicroscope
from beamloop.edge.trigger.model import ModelTrigger, model_hash, sample_trigger_models

FAST = {"frames": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*", "watchdog_s": None, "max_park_s": 100.0,
        "cross_section_barn": 20.0, "seed": 3}
"""A microscope whose parked S columns lose an atom within a few hundred samples."""


class Wire:
    """Calls to a controller that serves them in the test's thread."""

    def __init__(self, ctl, sock):
        self.ctl, self.sock, self.seq = ctl, sock, 0

    def __call__(self, call, **args):
        self.seq += 1
        self.sock.send(encode_request(call, self.seq, args, "test"))
        assert self.ctl.handle_one(5000)
        return decode_reply(self.sock.recv(), call)[1]

    def refused(self, code, call, **args):
        with pytest.raises(BridgeError) as err:
            self(call, **args)
        assert err.value.code == code, err.value
        return err.value.message


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
