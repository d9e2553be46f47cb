"""The control bridge: calls, echoes, position validation on both sides, errors and timeouts."""

import math

import cbor2
import pytest
import zmq

from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.protocol import BridgeError, BridgeTimeout, decode_envelope, encode_request
from beamloop.edge.control.server import BridgeServer
from beamloop.edge.frame.scanframe import BeamPositionError, ScanFrame, check_fraction


class FakeController:
    """A minimal scan controller recording every position it applied."""

    def __init__(self):
        self.applied = []
        self.frame_id = 0
        self.blanked = True

    def handlers(self):
        return {"acquire_frame": self.acquire, "set_probe": self.set_probe, "blank": self.blank,
                "boom": self.boom}

    def acquire(self, args):
        self.frame_id += 1
        scan = ScanFrame(self.frame_id, tuple(args["shape"]), tuple(args["fov_nm"]), dwell_us=args["dwell_us"])
        return {"frame_id": self.frame_id, "scan": scan.as_dict()}

    def set_probe(self, args):
        x, y = check_fraction(args["x"], args["y"])
        if args["frame_id"] != self.frame_id:
            raise BeamPositionError("stale_frame", f"frame {args['frame_id']} is not current")
        self.applied.append((x, y))
        return {"applied": {"x": x, "y": y, "frame_id": args["frame_id"]}}

    def blank(self, args):
        self.blanked = bool(args["on"])
        return {"blanked": self.blanked}

    def boom(self, args):
        raise KeyError("handler bug")


@pytest.fixture
def bridge(run_server, bridge_client):
    ctl = FakeController()
    with run_server(BridgeServer("tcp://127.0.0.1:0", ctl.handlers())) as server:
        yield bridge_client(server.endpoint, timeout_ms=2000), ctl, server


def test_calls_echo_what_was_applied(bridge):
    client, ctl, _ = bridge
    scan = client.acquire_frame((64, 64), (1.0, 1.0), 2.0)
    assert scan.frame_id == 1 and client.frame == scan
    reply = client.set_probe(0.25, 0.75, scan.frame_id)
    assert reply["applied"] == {"x": 0.25, "y": 0.75, "frame_id": 1}
    assert ctl.applied == [(0.25, 0.75)]
    assert client.blank(False) == {"blanked": False} and client.blank(True) == {"blanked": True}
    assert [e.call for e in client.log] == ["acquire_frame", "set_probe", "blank", "blank"]
    assert all(e.ok and e.sent and e.rtt_ns > 0 for e in client.log)


def test_the_beam_log_keeps_the_newest_entries_and_counts_the_dropped(run_server, bridge_client):
    ctl = FakeController()
    with run_server(BridgeServer("tcp://127.0.0.1:0", ctl.handlers())) as server:
        client = bridge_client(server.endpoint, timeout_ms=2000, log_limit=3)
        for on in (True, False, True, False, True):
            client.blank(on)
        assert [e.args["on"] for e in client.log] == [True, False, True] and client.counters.log_dropped == 2
        silent = bridge_client(server.endpoint, timeout_ms=2000, log_limit=0)
        assert silent.blank(True) == {"blanked": True} and len(silent.log) == 0
        assert silent.counters.calls == 1 and silent.counters.log_dropped == 1


def test_the_controller_event_log_is_bounded_and_keeps_absolute_indexes():
    from beamloop.edge.control.controller import EventLog

    ev = EventLog(limit=10)
    for k in range(25):
        ev.append({"k": k})
    assert len(ev) <= 10 and ev.total == 25 and ev.base == 25 - len(ev)
    assert [e["k"] for e in ev.since(22)] == [22, 23, 24]
    assert ev.since(0)[0]["k"] == ev.base and ev.since(25) == []


@pytest.mark.parametrize("x, y", [(math.nan, 0.5), (0.5, math.inf), (-0.01, 0.5), (0.5, 1.0001), ("a", 0.1), (None, 0)])
def test_bad_positions_are_never_sent(bridge, x, y):
    client, ctl, server = bridge
    scan = client.acquire_frame((64, 64), (1.0, 1.0), 2.0)
    before = server.requests
    with pytest.raises(BeamPositionError) as err:
        client.set_probe(x, y, scan.frame_id)
    assert err.value.code == "out_of_range"
    assert server.requests == before and ctl.applied == []
    assert client.counters.rejected_before_send == 1
    assert client.log[-1].sent is False and client.log[-1].error == "out_of_range"


def test_stale_frame_is_refused_by_the_client(bridge):
    client, ctl, server = bridge
    old = client.acquire_frame((64, 64), (1.0, 1.0), 2.0)
    client.acquire_frame((64, 64), (1.0, 1.0), 2.0)
    before = server.requests
    with pytest.raises(BeamPositionError) as err:
        client.set_probe(0.5, 0.5, old.frame_id)
    assert err.value.code == "stale_frame" and server.requests == before and ctl.applied == []


def test_server_validates_positions_too(bridge):
    """A client that skips validation still cannot move the beam out of the frame."""
    client, ctl, _ = bridge
    scan = client.acquire_frame((64, 64), (1.0, 1.0), 2.0)
    for x, y, code in [(1.5, 0.5, "out_of_range"), (math.nan, 0.5, "out_of_range"), (0.5, 0.5, "stale_frame")]:
        fid = scan.frame_id if code != "stale_frame" else scan.frame_id + 7
        with pytest.raises(BridgeError) as err:
            client.call("set_probe", x=x, y=y, frame_id=fid)
        assert err.value.code == code
    assert ctl.applied == [] and client.counters.errors == 3


def test_unknown_call_and_handler_bug(bridge):
    client, _, server = bridge
    with pytest.raises(BridgeError) as err:
        client.call("teleport")
    assert err.value.code == "unknown_call"
    with pytest.raises(BridgeError) as err:
        client.call("boom")
    assert err.value.code == "internal" and "handler bug" in err.value.message
    assert client.blank(True) == {"blanked": True}  # the server goes on


def test_malformed_request_gets_bad_request(bridge, req_socket):
    _, _, server = bridge
    with req_socket(server.endpoint) as s:
        for raw in (b"\xff\xfe", cbor2.dumps([1, 2]), cbor2.dumps({"call": 5, "seq": 1})):
            s.send(raw)
            assert s.poll(2000)
            reply = cbor2.loads(s.recv())
            assert reply["ok"] is False and reply["error"] == "bad_request"


def test_request_codec_round_trip():
    req = decode_envelope(encode_request("set_probe", 3, {"x": 0.5}))
    assert (req.call, req.seq, req.args, req.client) == ("set_probe", 3, {"x": 0.5}, None)


def test_silent_peer_times_out_and_client_recovers():
    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.REP)  # receives requests, never answers
    silent.bind("tcp://127.0.0.1:0")
    endpoint = silent.getsockopt_string(zmq.LAST_ENDPOINT)
    client = BridgeClient(endpoint, timeout_ms=100)
    with pytest.raises(BridgeTimeout):
        client.blank(True)
    with pytest.raises(BridgeTimeout):  # the reopened socket can send again (a stuck REQ could not)
        client.blank(True)
    assert client.counters.timeouts == 2 and client.log[-1].error == "timeout"
    silent.close(linger=0)
    client.close()
