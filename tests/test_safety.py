"""Beam safety rules (edge/control/safety.py): one test per rule, on the rules themselves and on the simulated
microscope's bridge (the scan-controller side, live), all on a clock the test moves (the ``clock`` fixture)."""

import argparse
import math
import time

import cbor2
import pytest
import zmq

from beamloop.edge.cli.options import add_safety_arguments, safety_options
from beamloop.edge.control.protocol import BridgeError, encode_request
from beamloop.edge.control.safety import BeamSafety, ClientRates, RateLimiter, SafetyLimits, SequenceTracker
from beamloop.edge.control.server import BridgeServer
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.path import frame_path
from beamloop.edge.service import EdgeService
from beamloop.edge.sim.microscope import MicroscopeConfig
from beamloop.streams.native.receiver import FrameReceiver

MICROSCOPE = {"seed": 4, "specimen_size_A": 60.0}
"""Options of the ``microscope`` fixture (tests/conftest.py)."""


class Actions:
    """Records what the guard did to the beam."""

    def __init__(self):
        self.blanks, self.parks = [], []

    def blank(self, reason):
        self.blanks.append(reason)

    def park(self, x, y):
        self.parks.append((x, y))


def guard(clock, **limits):
    acts = Actions()
    g = BeamSafety(SafetyLimits(**limits), blank=acts.blank, park=acts.park, clock=clock)
    scan = ScanFrame(7, (64, 64), (2.0, 2.0))
    g.admit("c", 1, "acquire_frame", {"dwell_us": 5.0})
    g.applied("c", "acquire_frame", {}, {"frame_id": 7, "scan": scan.as_dict()})
    return g, clock, acts


def refused(g, code, client, seq, call, args):
    with pytest.raises(BridgeError) as err:
        g.admit(client, seq, call, args)
    assert err.value.code == code
    return err.value


# positions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x, y", [(math.nan, 0.5), (0.5, -math.inf), (1.0000001, 0.5), (0.5, -1e-9), ("0.5", 0.5),
                                  (None, 0.5), ([0.5], 0.5)])
def test_position_must_be_finite_and_inside_the_frame(x, y, clock):
    g, _, _ = guard(clock)
    refused(g, "out_of_range", "c", 2, "set_probe", {"x": x, "y": y, "frame_id": 7})
    refused(g, "out_of_range", "c", 3, "queue_points", {"points": [[0.5, 0.5], [x, y]], "dwell_us": 10.0,
                                                         "frame_id": 7})
    assert g.counters.refused_position == 2
    assert g.admit("c", 4, "set_probe", {"x": 0.0, "y": 1.0, "frame_id": 7}) is None  # the edges are inside


def test_position_must_name_the_current_frame(clock):
    g, _, _ = guard(clock)
    for fid in (6, 8, None, True, "7", 7.5):
        refused(g, "stale_frame", "c", 2, "set_probe", {"x": 0.5, "y": 0.5, "frame_id": fid})
    # a new frame makes the old one stale
    g.applied("c", "acquire_frame", {}, {"scan": ScanFrame(8, (64, 64), (2.0, 2.0)).as_dict()})
    refused(g, "stale_frame", "c", 3, "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 7})
    assert g.admit("c", 4, "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 8}) is None
    # and before any frame nothing may be placed
    fresh = BeamSafety()
    refused(fresh, "stale_frame", "c", 1, "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 0})


# dwell and dose per point --------------------------------------------------------------------------------
def test_queued_dwell_per_point_is_limited(clock):
    g, _, _ = guard(clock, max_point_dwell_s=0.01)
    args = {"points": [[0.2, 0.2]], "frame_id": 7}
    for bad in (10_001.0, 0.0, -5.0, math.nan, math.inf, "10"):
        refused(g, "out_of_range", "c", 2, "queue_points", {**args, "dwell_us": bad})
    assert g.counters.refused_dwell == 6
    assert g.admit("c", 3, "queue_points", {**args, "dwell_us": 10_000.0}) is None


def test_parked_beam_is_blanked_after_the_dwell_limit(clock):
    g, clock, acts = guard(clock, max_point_dwell_s=0.5, watchdog_s=None)
    g.applied("c", "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 7}, {"applied": {}, "blanked": True})
    clock.t += 5.0
    assert g.poll() == "" and acts.blanks == []  # blanked: not timed
    g.applied("c", "blank", {"on": False}, {"blanked": False})
    clock.t += 0.4
    assert g.poll() == ""
    # moving the probe starts a new point
    g.applied("c", "set_probe", {"x": 0.6, "y": 0.5, "frame_id": 7}, {"applied": {}, "blanked": False})
    clock.t += 0.4
    assert g.poll() == ""
    clock.t += 0.2
    assert g.poll() == "dwell_limit: blank" and acts.blanks == ["dwell_limit"]
    assert g.counters.dwell_limit_blanks == 1
    clock.t += 10
    assert g.poll() == "" and len(acts.blanks) == 1


def test_dose_per_point_is_limited(clock):
    # 50 pA is 3.1207e8 electrons/s (I / e); 1e6 electrons then last 3.2044 ms
    lim = SafetyLimits(max_point_electrons=1e6, current_pA=50.0)
    assert lim.electrons_per_s == pytest.approx(3.12075e8, rel=1e-5)
    assert lim.point_time_limit_s == pytest.approx(1e6 / 3.12075e8, rel=1e-5)
    g, clock, acts = guard(clock, max_point_electrons=1e6, current_pA=50.0, watchdog_s=None)
    err = refused(g, "out_of_range", "c", 2, "queue_points", {"points": [[0.2, 0.2]], "dwell_us": 3300.0,
                                                               "frame_id": 7})
    assert "electrons" in err.message and g.counters.refused_dose == 1
    assert g.admit("c", 3, "queue_points", {"points": [[0.2, 0.2]], "dwell_us": 3200.0, "frame_id": 7}) is None
    # a parked beam gets the same dose limit as a time limit
    g.applied("c", "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 7}, {"blanked": False})
    clock.t += 0.0031
    assert g.poll() == ""
    clock.t += 0.0002
    assert g.poll() == "dwell_limit: blank"
    with pytest.raises(ValueError):
        SafetyLimits(max_point_electrons=1e6)  # a dose limit needs the current


def test_frame_pixel_dwell_is_limited(clock):
    g, _, _ = guard(clock, max_pixel_dwell_us=100.0)
    refused(g, "out_of_range", "c", 2, "acquire_frame", {"shape": [64, 64], "fov_nm": [1, 1], "dwell_us": 100.5})
    for bad in ("1e9", math.nan, math.inf, -1.0, 0, True, None, [5.0]):  # never left to a handler's float()
        refused(g, "out_of_range", "c", 2, "acquire_frame", {"shape": [64, 64], "fov_nm": [1, 1], "dwell_us": bad})
    assert g.counters.refused_dwell == 9
    assert g.admit("c", 3, "acquire_frame", {"shape": [64, 64], "fov_nm": [1, 1], "dwell_us": 100.0}) is None
    assert g.admit("c", 4, "acquire_frame", {"shape": [64, 64], "fov_nm": [1, 1]}) is None  # controller's default


# rate limit -------------------------------------------------------------------------------------------------
def test_token_bucket(clock):
    rl = RateLimiter(rate=10.0, burst=3, clock=clock)
    assert [rl.allow() for _ in range(4)] == [True, True, True, False]
    clock.t += 0.1  # one token back
    assert [rl.allow() for _ in range(2)] == [True, False]
    clock.t += 10.0  # never more than the burst
    assert [rl.allow() for _ in range(4)] == [True, True, True, False]


def test_command_rate_is_limited(clock):
    g, clock, _ = guard(clock, max_commands_per_s=100.0, command_burst=5)
    ok = [g.admit("c", 10 + k, "get_state", {}) is None for k in range(4)]  # one token went to acquire_frame
    refused(g, "rate_limited", "c", 20, "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 7})
    assert ok == [True] * 4 and g.counters.rate_limited == 1
    clock.t += 0.01
    assert g.admit("c", 21, "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 7}) is None


# sequence numbers ---------------------------------------------------------------------------------------------
def test_sequence_tracker():
    t = SequenceTracker(max_clients=2)
    assert t.replay("a", 1) is None
    t.remember("a", 1, b"r1")
    assert t.replay("a", 1) == b"r1" and t.replay("a", 2) is None
    with pytest.raises(BridgeError) as err:
        t.replay("a", 0)
    assert err.value.code == "stale_seq"
    t.remember("b", 5, b"x")
    t.remember("c", 9, b"y")  # "a" is forgotten (least recently heard)
    assert t.replay("a", 0) is None and t.replay("c", 9) == b"y"
    assert t.replay(None, 1) is None  # anonymous requests are not tracked


class CountingController:
    """A scan controller that counts how often each call really ran; set_probe can be made slow."""

    def __init__(self):
        self.ran = {}
        self.delay_s = 0.0
        self.frame_id = 0

    def handlers(self):
        return {"acquire_frame": self.acquire, "set_probe": self.set_probe, "get_state": self.get_state}

    def acquire(self, args):
        self.ran["acquire_frame"] = self.ran.get("acquire_frame", 0) + 1
        self.frame_id += 1
        return {"scan": ScanFrame(self.frame_id, (64, 64), (1.0, 1.0)).as_dict()}

    def set_probe(self, args):
        self.ran["set_probe"] = self.ran.get("set_probe", 0) + 1
        time.sleep(self.delay_s)
        return {"applied": {"x": args["x"], "y": args["y"], "frame_id": args["frame_id"]}, "blanked": True}

    def get_state(self, args):
        return {}


@pytest.fixture
def counting_server(run_server):
    ctl = CountingController()
    server = BridgeServer("tcp://127.0.0.1:0", ctl.handlers(), safety=BeamSafety(SafetyLimits(watchdog_s=None)))
    with run_server(server):
        yield ctl, server


def raw_exchange(endpoint, payload):
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        s.send(payload)
        assert s.poll(3000)
        return s.recv()
    finally:
        s.close()


def test_repeated_request_is_applied_once(counting_server):
    ctl, server = counting_server
    raw_exchange(server.endpoint, encode_request("acquire_frame", 1, {"dwell_us": 1.0}, "me"))
    req = encode_request("set_probe", 2, {"x": 0.25, "y": 0.5, "frame_id": 1}, "me")
    first = raw_exchange(server.endpoint, req)
    again = raw_exchange(server.endpoint, req)
    assert first == again and cbor2.loads(first)["ok"] is True
    assert ctl.ran["set_probe"] == 1 and server.safety.counters.duplicates == 1
    old = cbor2.loads(raw_exchange(server.endpoint, encode_request("set_probe", 1, {"x": 0.1, "y": 0.1,
                                                                                      "frame_id": 1}, "me")))
    assert old["ok"] is False and old["error"] == "stale_seq" and ctl.ran["set_probe"] == 1
    # another client's numbers are its own
    other = cbor2.loads(raw_exchange(server.endpoint, encode_request("set_probe", 1, {"x": 0.1, "y": 0.1,
                                                                                        "frame_id": 1}, "you")))
    assert other["ok"] is True and ctl.ran["set_probe"] == 2


def test_client_retry_after_timeout_is_applied_once(counting_server, bridge_client):
    """The controller is slower than the client's timeout: the client resends the same request on a new
    socket until a reply comes; the controller ran it once and the resends got the first reply."""
    ctl, server = counting_server
    client = bridge_client(server.endpoint, timeout_ms=100, retries=8)
    scan = client.acquire_frame((64, 64), (1.0, 1.0), 1.0)
    ctl.delay_s = 0.25
    reply = client.set_probe(0.3, 0.7, scan.frame_id)
    assert reply["applied"] == {"x": 0.3, "y": 0.7, "frame_id": scan.frame_id}
    assert ctl.ran["set_probe"] == 1
    assert client.counters.retries >= 2 and client.counters.timeouts == client.counters.retries
    assert server.safety.counters.duplicates >= 1
    client.close()


def test_live_rate_limit(counting_server, bridge_client):
    ctl, server = counting_server
    server.safety.rates = ClientRates(rate=0.001, burst=3)
    client = bridge_client(server.endpoint, timeout_ms=2000)
    client.get_state(), client.get_state(), client.get_state()
    with pytest.raises(BridgeError) as err:
        client.acquire_frame((64, 64), (1.0, 1.0), 1.0)
    assert err.value.code == "rate_limited" and "acquire_frame" not in ctl.ran
    client.close()


# watchdog ----------------------------------------------------------------------------------------------------
def test_watchdog_blanks_when_the_beam_owner_falls_silent(clock):
    g, clock, acts = guard(clock, watchdog_s=1.0)
    clock.t += 50
    assert g.poll() == ""  # not armed until someone turns the beam on
    g.admit("svc", 2, "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 7})
    g.applied("svc", "set_probe", {"x": 0.5, "y": 0.5, "frame_id": 7}, {"blanked": True})
    clock.t += 50
    assert g.poll() == ""  # a blanked beam needs no watching
    g.applied("svc", "blank", {"on": False}, {"blanked": False})
    for _ in range(5):  # heartbeats keep it quiet
        clock.t += 0.9
        assert g.admit("svc", 3 + _, "heartbeat", {}) is None
        assert g.poll() == ""
    clock.t += 0.9
    g.admit("monitor", 1, "get_state", {})  # another client does not count
    clock.t += 0.2
    assert g.poll() == "watchdog: blank" and acts.blanks == ["watchdog"] and g.counters.watchdog_trips == 1
    clock.t += 5
    assert g.poll() == "" and len(acts.blanks) == 1  # once, until the beam is driven again
    assert g.counters.heartbeats == 5
    # blanking disarms it: a service busy between dwells trips nothing
    g.applied("svc", "blank", {"on": False}, {"blanked": False})
    g.applied("svc", "blank", {"on": True}, {"blanked": True})
    clock.t += 60
    assert g.poll() == "" and g.counters.watchdog_trips == 1


def test_watchdog_parks_at_the_safe_position(clock):
    g, clock, acts = guard(clock, watchdog_s=0.5, on_watchdog="park", safe_position=(0.05, 0.95))
    g.applied("svc", "blank", {"on": False}, {"blanked": False})
    clock.t += 0.6
    assert g.poll() == "watchdog: park" and acts.parks == [(0.05, 0.95)] and acts.blanks == []
    with pytest.raises(ValueError):
        SafetyLimits(safe_position=(1.5, 0.5))


def test_heartbeat_that_waited_while_the_controller_was_busy_counts(clock, req_socket):
    """The soak found this: a controller busy for longer than the watchdog period (rendering a frame on a loaded
    machine) must serve the heartbeats that arrived meanwhile before the watchdog judges the silence."""
    acts = Actions()
    safety = BeamSafety(SafetyLimits(watchdog_s=1.0), blank=acts.blank, clock=clock)
    with (BridgeServer("tcp://127.0.0.1:0", {"blank": lambda a: {"blanked": a["on"]}}, safety=safety) as server,
          req_socket(server.endpoint) as s):
        s.send(encode_request("blank", 1, {"on": False}, "svc"))
        assert server.handle_one(3000) and cbor2.loads(s.recv())["result"] == {"blanked": False}
        clock.t += 0.9
        s.send(encode_request("heartbeat", 2, {}, "svc"))  # sent in time...
        assert server.socket.poll(3000)
        clock.t += 0.6  # ...but the controller was busy: 1.5 s since it last served this client
        assert server.handle_one(0) and cbor2.loads(s.recv())["ok"] is True
        assert acts.blanks == [] and safety.counters.watchdog_trips == 0 and safety.counters.heartbeats == 1
        clock.t += 1.1  # and real silence still trips it, without any request
        assert server.handle_one(0) is False
        assert acts.blanks == ["watchdog"] and safety.counters.watchdog_trips == 1


def wait_for(cond, timeout_s=10.0):
    """Whether ``cond()`` holds within ``timeout_s`` of real time (a guard against hanging, not a limit under
    test: the microscope's clock, not real time, decides when its watchdog acts)."""
    t_end = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < t_end:
        time.sleep(0.01)
    return cond()


@pytest.mark.parametrize("microscope", [{"watchdog_s": 0.3}], indirect=True)
def test_simulated_controller_blanks_when_the_service_dies(microscope, clock, bridge_client):
    client = bridge_client(microscope.control_endpoint)
    scan = client.acquire_frame((32, 32), (1.0, 1.0), 1.0)
    client.set_probe(0.5, 0.5, scan.frame_id)
    assert client.blank(False)["blanked"] is False
    client.close()  # the service is gone: nothing more arrives
    clock.t += 0.25
    assert not microscope.blanked and microscope.safety.counters.watchdog_trips == 0  # within the period
    clock.t += 0.1
    assert wait_for(lambda: microscope.blanked)
    ev = [e for e in microscope.events if e["type"] == "safety"]
    assert ev and ev[0]["reason"] == "watchdog" and microscope.safety.counters.watchdog_trips == 1
    assert microscope.dwell is None


@pytest.mark.parametrize("microscope", [{"watchdog_s": 0.3, "on_watchdog": "park", "safe_position": (0.0, 1.0)}],
                         indirect=True)
def test_simulated_controller_parks_at_the_safe_position(microscope, clock, bridge_client):
    client = bridge_client(microscope.control_endpoint)
    scan = client.acquire_frame((32, 32), (1.0, 1.0), 1.0)
    client.set_probe(0.5, 0.5, scan.frame_id)
    client.blank(False)
    client.close()
    clock.t += 0.35
    assert wait_for(lambda: microscope.safety.counters.watchdog_trips == 1)
    assert microscope.park[2:] == (0.0, 1.0, scan.frame_id)
    assert not microscope.blanked and microscope.dwell.fx == 0.0 and microscope.dwell.fy == 1.0


@pytest.mark.parametrize("microscope", [{"max_park_s": 0.2, "watchdog_s": None}], indirect=True)
def test_simulated_controller_enforces_the_dwell_limit(microscope, clock, bridge_client):
    client = bridge_client(microscope.control_endpoint)
    scan = client.acquire_frame((32, 32), (1.0, 1.0), 1.0)
    client.set_probe(0.5, 0.5, scan.frame_id)
    client.blank(False)
    clock.t += 0.15
    assert client.get_state()["blanked"] is False  # within the limit
    clock.t += 0.1
    assert wait_for(lambda: client.get_state()["blanked"])
    st = client.get_state()["safety"]
    assert st["counters"]["dwell_limit_blanks"] == 1 and st["last_action"] == "dwell_limit: blank"
    with pytest.raises(BridgeError) as err:
        client.queue_points([[0.5, 0.5]], dwell_us=250_000.0, frame_id=scan.frame_id)
    assert err.value.code == "out_of_range" and microscope.queue is None


@pytest.mark.parametrize("microscope", [{"watchdog_s": 0.3}], indirect=True)
def test_service_heartbeats_keep_the_beam_while_it_waits(microscope, clock, bridge_client):
    """A live service waiting for frames sends heartbeats: no trip while it waits 3 watchdog periods.

    The microscope's clock moves 0.2 s (less than the 0.3 s period) each time a heartbeat has been answered,
    so the outcome does not depend on how fast a loaded machine sends them."""
    with FrameReceiver(microscope.frames_endpoint) as rx:
        bridge = bridge_client(microscope.control_endpoint)
        service = EdgeService(rx, frame_path("classical", "MoS2"), bridge, heartbeat_s=0.05)
        scan = bridge.acquire_frame((32, 32), (1.0, 1.0), 1.0)
        assert service.next_frame(5000) is not None  # the frame
        bridge.set_probe(0.5, 0.5, scan.frame_id)
        bridge.blank(False)  # the watchdog watches this client from now on
        t0, beats = clock.t, bridge.counters.heartbeats
        for _ in range(2000):  # nothing more: the service waits, beating
            if clock.t - t0 >= 3 * 0.3:
                break
            assert service.next_frame(20) is None
            if bridge.counters.heartbeats > beats:
                beats = bridge.counters.heartbeats
                clock.t += 0.2
        assert clock.t - t0 >= 3 * 0.3
        assert bridge.counters.heartbeats >= 5 and microscope.safety.counters.watchdog_trips == 0
        assert microscope.safety.counters.heartbeats == bridge.counters.heartbeats
        bridge.close()  # and once it is gone the watchdog acts
        clock.t += 0.35
        assert wait_for(lambda: microscope.safety.counters.watchdog_trips == 1)


def test_service_turns_heartbeats_off_for_a_controller_without_them(run_server, bridge_client):
    ctl = CountingController()
    handlers = ctl.handlers()
    server = BridgeServer("tcp://127.0.0.1:0", handlers)
    server.handlers.pop("heartbeat")
    with run_server(server), FrameReceiver("tcp://127.0.0.1:1") as rx:
        service = EdgeService(rx, frame_path("classical", "MoS2"), bridge_client(server.endpoint), heartbeat_s=0.01)
        assert service.next_frame(100) is None
        assert service.heartbeat_s is None and service.stats.heartbeat_errors == 1


def test_command_options_give_valid_limits():
    p = argparse.ArgumentParser()
    add_safety_arguments(p)
    d = safety_options(p.parse_args([]))
    assert d == {"watchdog_s": 1.0, "on_watchdog": "blank", "safe_position": (0.0, 0.0), "max_point_electrons": None}
    d = safety_options(p.parse_args(["--watchdog", "0", "--on-watchdog", "park", "--safe-position", "0.25,1",
                                     "--max-point-electrons", "5e5"]))
    assert d == {"watchdog_s": None, "on_watchdog": "park", "safe_position": (0.25, 1.0), "max_point_electrons": 5e5}
    lim = SafetyLimits(current_pA=50.0, **d)
    assert lim.watchdog_s is None and lim.point_time_limit_s == pytest.approx(5e5 / 3.12075e8, rel=1e-5)
    MicroscopeConfig(**d)
    for bad in (["--safe-position", "1.5,0"], ["--safe-position", "nan,0"], ["--safe-position", "0.5"],
                ["--watchdog", "-1"], ["--on-watchdog", "ignore"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
