"""Beam safety under hostile and faulty conditions, on the control layer: one test per rule.

Blanking always wins (rate limits per client, safer calls past every limit, refused heartbeats not heard,
beam state held by the controller, handler errors blank); the watchdog cannot be starved (request size
bounds, the backstop timer); sequence numbers cannot lie (the reply cache compares the request's bytes,
``get_state`` always runs); odd requests get clear refusals. Controllers run on the ``clock`` fixture: no
test measures real time (``wait_for`` only guards against hanging).
"""

import threading
import time

import cbor2
import numpy as np
import pytest
import zmq

from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.controller import Acquisition, Capabilities, ParkedStream, ScanController
from beamloop.edge.control.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_REQUEST_BYTES,
    BridgeError,
    ScanLimits,
    decode_envelope,
    decode_reply,
    encode_request,
    makes_safer,
    peek_request,
)
from beamloop.edge.control.safety import BeamSafety, ClientRates, SafetyLimits, SequenceTracker

LIMITS = ScanLimits(shape=(16, 256), dwell_us=(0.1, 100.0), default_dwell_us=2.0, channels=("haadf",))
FRAME = {"shape": [32, 32], "fov_nm": [1.0, 1.0], "dwell_us": 1.0}


class Backend:
    """A scan device in memory with a parked-probe signal; its calls can be made to fail or to hang."""

    def __init__(self, sample_time_us=10.0, block_samples=4):
        self.stream = ParkedStream(sample_time_us=sample_time_us, block_samples=block_samples)
        self.blanker = True
        self.log = []
        self.fail_unblank = False  # set_blanked(False) unblanks, then raises
        self.fail_blank = 0  # set_blanked(True) raises this many times
        self.hang_park = None  # a threading.Event park() waits for

    def capabilities(self):
        return Capabilities(LIMITS, self.stream)

    def set_frame(self, scan, channels):
        return {}

    def acquire(self, scan, channels):
        return Acquisition({c: np.zeros(scan.shape, np.uint16) for c in channels})

    def park(self, fx, fy, frame_id):
        self.log.append(("park", fx, fy))
        if self.hang_park is not None:
            self.hang_park.wait(30)
        return fx, fy

    def set_blanked(self, on):
        self.log.append(("blank", on))
        if on and self.fail_blank:
            self.fail_blank -= 1
            raise RuntimeError("blanker does not answer")
        self.blanker = on
        if not on and self.fail_unblank:
            raise RuntimeError("readback failed after unblanking")
        return on

    def parked_samples(self, n, dwell):
        return np.ones(n, np.uint16), []


class Wire:
    """Requests on a raw REQ socket to a controller served in the test's thread."""

    def __init__(self, ctl, sock, client="svc"):
        self.ctl, self.sock, self.client, self.seq = ctl, sock, client, 0

    def raw(self, payload, serve=True):
        self.sock.send(payload)
        if serve:
            assert self.ctl.handle_one(5000)
        assert self.sock.poll(5000)
        return cbor2.loads(self.sock.recv())

    def send(self, call, seq=None, client=None, **args):
        if seq is None:
            self.seq += 1
            seq = self.seq
        return self.raw(encode_request(call, seq, args, client or self.client))

    def __call__(self, call, **args):
        reply = self.send(call, **args)
        assert reply["ok"], reply
        return reply["result"]


@pytest.fixture
def rig(clock, req_socket):
    """``(controller, backend, wire, clock)``: watchdog 0.5 s, 100 requests/s with a burst of 5 per client."""
    backend = Backend()
    limits = SafetyLimits(watchdog_s=0.5, max_point_dwell_s=2.0, max_commands_per_s=100.0, command_burst=5,
                          max_pixel_dwell_us=100.0)
    with ScanController(backend, limits=limits, clock=clock) as ctl, req_socket(ctl.control_endpoint) as sock:
        yield ctl, backend, Wire(ctl, sock), clock


def beam_on(wire, clock):
    """Acquire a frame, park on it and unblank; returns the frame id (clock moved to refill the buckets)."""
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    wire("set_probe", x=0.5, y=0.5, frame_id=fid)
    assert wire("blank", on=False)["blanked"] is False
    return fid


def wait_for(cond, timeout_s=20.0):
    """Whether ``cond()`` holds within ``timeout_s`` of real time (a guard against hanging, not a limit)."""
    t_end = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < t_end:
        time.sleep(0.005)
    return cond()


# 1. blanking always wins ------------------------------------------------------------------------------------
def test_rate_limits_are_per_client_and_never_refuse_a_blank(rig):
    ctl, backend, wire, clock = rig
    beam_on(wire, clock)  # 3 of svc's 5 tokens
    for k in range(20):  # another client floods: its own bucket runs dry, svc's does not
        wire.send("get_state", client="flooder", seq=k)
    assert ctl.safety.counters.rate_limited == 15
    assert wire("heartbeat")["armed"] is True
    wire("heartbeat")
    assert wire.send("heartbeat")["error"] == "rate_limited"  # svc's own bucket is empty now...
    for _ in range(3):  # ...and still every blank is applied
        assert wire("blank", on=True)["blanked"] is True
    assert wire("stop")["blanked"] is True and backend.blanker is True
    assert ctl.safety.counters.safer_calls == 4


def test_a_refused_heartbeat_is_not_heard(rig):
    ctl, backend, wire, clock = rig
    ctl.safety.rates = ClientRates(rate=1e-6, burst=5, clock=clock)  # no refill while the clock moves
    beam_on(wire, clock)
    wire("heartbeat"), wire("heartbeat")  # heard; svc's bucket is empty now
    clock.t += 0.3
    assert wire.send("heartbeat")["error"] == "rate_limited"
    clock.t += 0.15
    assert wire.send("heartbeat")["error"] == "rate_limited"  # 0.45 s after the last heartbeat heard
    assert ctl.blanked is False
    clock.t += 0.1  # the refused ones did not count: 0.55 s of silence trips the watchdog
    ctl.handle_one(0)
    assert ctl.blanked is True and ctl.safety.counters.watchdog_trips == 1


def test_the_controller_holds_the_beam_state_and_blanks_after_a_failed_handler(rig):
    """A handler that fails after the beam may have changed: the beam goes off and the reply says so."""
    ctl, backend, wire, clock = rig
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    wire("set_probe", x=0.5, y=0.5, frame_id=fid)
    backend.fail_unblank = True
    reply = wire.send("blank", on=False)
    assert reply["error"] == "internal" and "the controller blanked the beam" in reply["message"]
    assert backend.blanker is True and ctl.blanked is True and ctl.dwell is None
    assert ctl.safety.counters.error_blanks == 1 and not ctl.safety.armed
    assert backend.log[-2:] == [("blank", False), ("blank", True)]


def test_a_refused_blank_is_tried_again_until_it_works(rig):
    ctl, backend, wire, clock = rig
    beam_on(wire, clock)
    backend.fail_blank = 3
    clock.t += 0.6  # the watchdog trips; the blanker refuses three times
    for _ in range(3):
        ctl.handle_one(0)
        assert backend.blanker is False and ctl.safety.state()["blank_pending"]
    ctl.handle_one(0)
    assert backend.blanker is True and ctl.blanked is True and not ctl.safety.state()["blank_pending"]
    assert ctl.safety.counters.blank_failures == 3 and ctl.safety.counters.watchdog_trips == 1


def test_a_blank_with_odd_fields_is_applied(rig):
    ctl, backend, wire, clock = rig
    beam_on(wire, clock)
    odd = cbor2.dumps({"call": "blank", "seq": -7, "args": {"on": True, "why": "because"}, "client": 5})
    reply = wire.raw(odd)
    assert reply["ok"] is True and reply["result"]["blanked"] is True and backend.blanker is True
    assert reply["seq"] == -1 and reply["result"]["notes"] == ["unusable seq -7", "unusable client id"]


# 2. the watchdog cannot be starved ----------------------------------------------------------------------------
def test_a_200_mib_request_does_not_hold_the_watchdog(clock, run_server, bridge_client):
    """A silent client's beam is blanked on time while another sends a 200 MiB CBOR list (209 M integers):
    the socket drops it unread (ZMQ_MAXMSGSIZE), and the serve loop never stops running the watchdog."""
    backend = Backend()
    limits = SafetyLimits(watchdog_s=0.5)
    ctl = ScanController(backend, limits=limits, clock=clock)
    stop = threading.Event()
    th = threading.Thread(target=ctl.serve, kwargs={"stop": stop.is_set}, daemon=True)
    th.start()
    ctx = zmq.Context.instance()
    hostile = ctx.socket(zmq.DEALER)
    hostile.setsockopt(zmq.LINGER, 0)
    try:
        driver = bridge_client(ctl.control_endpoint, timeout_ms=5000)
        scan = driver.acquire_frame((32, 32), (1.0, 1.0), 1.0)
        driver.set_probe(0.5, 0.5, scan.frame_id)
        driver.blank(False)  # and the driver falls silent
        n = 200 * 2**20
        huge = bytearray(9 + n)  # a CBOR array head for n items, then n zero bytes: the integer 0, n times
        huge[0] = 0x9B
        huge[1:9] = n.to_bytes(8, "big")
        hostile.connect(ctl.control_endpoint)
        requests = ctl.server.requests
        hostile.send_multipart([b"", huge], copy=False)
        clock.t += 0.6
        assert wait_for(lambda: backend.blanker is True)
        assert ctl.safety.counters.watchdog_trips == 1 and ctl.server.requests == requests
        assert hostile.poll(200) == 0  # nothing comes back: the connection was dropped
        assert len(huge) > MAX_MESSAGE_BYTES
    finally:
        hostile.close()
        stop.set()
        th.join()
        ctl.close()


def test_requests_over_the_decode_bound_are_refused_unread_unless_they_make_the_beam_safer(rig):
    ctl, backend, wire, clock = rig
    beam_on(wire, clock)
    pad = b"x" * (MAX_REQUEST_BYTES + 10)
    reply = wire.raw(cbor2.dumps({"call": "set_probe", "seq": 99, "args": {"x": 0.1, "y": 0.1}, "pad": pad,
                                  "client": "svc"}))
    assert reply["error"] == "bad_request" and "exceeds the 1048576-byte bound" in reply["message"]
    assert backend.blanker is False
    reply = wire.raw(cbor2.dumps({"call": "blank", "seq": 100, "args": {"on": True}, "client": "svc", "pad": pad}))
    assert reply["ok"] is True and backend.blanker is True and "exceeds" in reply["result"]["notes"][0]


def test_the_backstop_blanks_while_a_handler_hangs(clock, req_socket):
    """The serve loop is stuck in a handler that hangs in the hardware (holding the lock): the backstop
    timer's thread blanks through the backend directly, and the guard blanks properly once the lock is free."""
    backend = Backend()
    with ScanController(backend, limits=SafetyLimits(watchdog_s=0.5), clock=clock) as ctl, \
            req_socket(ctl.control_endpoint) as sock:
        wire = Wire(ctl, sock)
        fid = beam_on(wire, clock)
        ctl.start_backstop(grace_s=0.1, tick_s=0.002, lock_wait_s=0.02)
        backend.hang_park = threading.Event()
        sock.send(encode_request("set_probe", 50, {"x": 0.2, "y": 0.2, "frame_id": fid}, "svc"))
        th = threading.Thread(target=ctl.handle_one, args=(5000,), daemon=True)
        th.start()
        assert wait_for(lambda: backend.log[-1] == ("park", 0.2, 0.2))  # the handler hangs now
        clock.t += 0.7  # the owner is silent past the period plus the grace, and the loop is stuck
        assert wait_for(lambda: backend.blanker is True)
        assert any(e.get("emergency") for e in ctl.events) and ctl.safety.counters.backstop_trips >= 1
        backend.hang_park.set()
        th.join()
        assert cbor2.loads(sock.recv())["ok"] is True
        ctl.handle_one(0)  # the guard's own blank, under the lock: the parked series ends
        assert ctl.blanked is True and ctl.dwell is None and not ctl.safety.state()["blank_pending"]
        ctl.server.stop_backstop()


# 3. sequence numbers cannot lie ----------------------------------------------------------------------------------
def test_a_reused_sequence_number_with_other_content_is_refused(rig):
    ctl, backend, wire, clock = rig
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    first = wire.send("set_probe", seq=1001, x=0.2, y=0.2, frame_id=fid)
    again = wire.send("set_probe", seq=1001, x=0.2, y=0.2, frame_id=fid)  # a true retry: the first reply
    assert first == again and first["ok"] and [e for e in backend.log if e[0] == "park"] == [("park", 0.2, 0.2)]
    other = wire.send("set_probe", seq=1001, x=0.9, y=0.9, frame_id=fid)
    assert other["error"] == "bad_request" and "reuses the sequence number" in other["message"]
    assert ctl.probe[:2] == (0.2, 0.2) and ctl.safety.counters.reused_seq == 1
    # a blank reusing the seq of an unblank is applied, never answered from the cache
    assert wire.send("blank", seq=1002, on=False)["result"]["blanked"] is False
    reply = wire.send("blank", seq=1002, on=True)
    assert reply["ok"] and reply["result"]["blanked"] is True and backend.blanker is True
    # and an old number cannot refuse it either
    assert wire.send("blank", seq=3, on=True)["result"]["blanked"] is True


def test_get_state_is_never_answered_from_the_cache(rig):
    ctl, backend, wire, clock = rig
    beam_on(wire, clock)
    st = wire.send("get_state", seq=500)
    assert st["result"]["blanked"] is False
    ctl.safety.blank_now("test")
    again = wire.send("get_state", seq=500)  # the same bytes: run again, fresh state
    assert again["result"]["blanked"] is True
    clock.t += 1.0  # refill svc's bucket
    assert wire.send("get_state", seq=2)["ok"] is True  # and no stale_seq for a read


def test_a_spoofed_sequence_number_cannot_refuse_a_blank(rig):
    ctl, backend, wire, clock = rig
    beam_on(wire, clock)
    spoof = wire.send("set_probe", client="svc", seq=10**9, x=0.5, y=0.5, frame_id=99)  # someone claims svc's id
    assert spoof["error"] == "stale_frame"  # refused, but its high seq is remembered for svc
    assert wire.send("set_probe", x=0.1, y=0.1, frame_id=1)["error"] == "stale_seq"  # svc's next request...
    assert wire.send("blank", on=True)["result"]["blanked"] is True  # ...but never its blank


def test_sequence_tracker_compares_digests():
    t = SequenceTracker()
    t.remember("a", 5, b"reply", b"digest-1")
    assert t.replay("a", 5, b"digest-1") == b"reply"
    with pytest.raises(BridgeError) as err:
        t.replay("a", 5, b"digest-2")
    assert err.value.code == "bad_request"
    t.remember("a", 3, b"older", b"d")  # never steps back
    assert t.replay("a", 5, b"digest-1") == b"reply"


# odd requests: clear refusals -----------------------------------------------------------------------------------
def test_odd_values_get_clear_refusals(rig):
    ctl, backend, wire, clock = rig
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    huge = wire.send("set_probe", x=10**400, y=0.5, frame_id=fid)
    assert huge["error"] == "out_of_range" and "outside the scan frame" in huge["message"]
    fractional = wire.send("acquire_frame", shape=[64.7, 64.2], fov_nm=[1.0, 1.0])
    assert fractional["error"] == "bad_request" and "two integers" in fractional["message"]
    text = wire.send("acquire_frame", **{**FRAME, "channels": "haadf"})
    assert text["error"] == "bad_request" and "got the text 'haadf'" in text["message"]
    assert wire.send("heartbeat", seq=2**80)["error"] == "bad_request"
    tagged = cbor2.dumps(cbor2.CBORTag(55799, {"call": "get_state", "seq": 77, "args": {}, "client": "svc"}))
    assert wire.raw(tagged)["ok"] is True  # self-described CBOR (RFC 8949 section 3.4.6) is read as the map


def test_peek_reads_only_the_start():
    big = cbor2.dumps({"call": "blank", "seq": 4, "args": {"on": True}, "tail": list(range(10_000))})
    assert peek_request(big) == {"call": "blank", "seq": 4, "args": {"on": True}}
    skipped = cbor2.dumps({"pad": b"y" * 100_000, "call": "stop", "seq": 1})
    assert peek_request(skipped) == {"pad": None, "call": "stop", "seq": 1}
    assert peek_request(cbor2.dumps([1, 2])) is None and peek_request(b"") is None
    assert peek_request(cbor2.dumps({"a": 1}), max_items=1) is None
    assert makes_safer("blank", {"on": True}) and not makes_safer("blank", {"on": 1})
    assert makes_safer("abort_points", {}) and not makes_safer("set_probe", {})
    with pytest.raises(BridgeError, match="exceeds"):
        decode_envelope(cbor2.dumps({"call": "get_state", "seq": 1, "args": {}, "pad": b"z" * 64}), max_bytes=32)


def test_guard_in_front_of_plain_handlers_still_learns_from_replies(clock):
    blanks = []
    g = BeamSafety(SafetyLimits(watchdog_s=1.0), blank=blanks.append, clock=clock)
    g.applied("svc", "blank", {"on": False}, {"blanked": False})
    assert g.armed and g.owner == "svc"
    clock.t += 1.1
    assert g.poll() == "watchdog: blank" and blanks == ["watchdog"]


# CURVE: an unauthorised client does not hang -------------------------------------------------------------------
@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq has no CURVE support")
def test_unauthorised_client_times_out_and_says_why(tmp_path, clock):
    from beamloop.edge.control.keys import ClientKeys, ServerKeys, authorize, create_key_pair

    for name in ("server", "client", "rogue"):
        create_key_pair(tmp_path, name)
    authorize(tmp_path / "client.key", tmp_path / "authorized")
    keys = ServerKeys.load(tmp_path / "server.key_secret", tmp_path / "authorized")
    with ScanController(Backend(), keys=keys, clock=clock) as ctl:
        stop = threading.Event()
        th = threading.Thread(target=ctl.serve, kwargs={"stop": stop.is_set}, daemon=True)
        th.start()
        try:
            rogue = BridgeClient(ctl.control_endpoint, timeout_ms=300,
                                 keys=ClientKeys.load(tmp_path / "rogue.key_secret", tmp_path / "server.key"))
            time.sleep(0.5)  # the handshake was refused and the pipe dropped: a send would block for ever
            with pytest.raises(BridgeError) as err:
                rogue.get_state()
            assert err.value.code == "timeout" and "refused this client's CURVE key" in err.value.message
            with pytest.raises(BridgeError):
                rogue.get_state()  # and again, not hanging
            rogue.close()
            good = BridgeClient(ctl.control_endpoint, timeout_ms=5000,
                                keys=ClientKeys.load(tmp_path / "client.key_secret", tmp_path / "server.key"))
            assert good.get_state()["blanked"] is True
            good.close()
            # the folder is read again on request: a removed key is refused from the next connection on
            (tmp_path / "authorized" / "client.key").unlink()
            authorize(tmp_path / "rogue.key", tmp_path / "authorized")
            assert ctl.reload_keys()
            late = BridgeClient(ctl.control_endpoint, timeout_ms=300,
                                keys=ClientKeys.load(tmp_path / "client.key_secret", tmp_path / "server.key"))
            with pytest.raises(BridgeError):
                late.get_state()
            late.close()
            rogue = BridgeClient(ctl.control_endpoint, timeout_ms=5000,
                                 keys=ClientKeys.load(tmp_path / "rogue.key_secret", tmp_path / "server.key"))
            assert rogue.get_state()["blanked"] is True
            rogue.close()
        finally:
            stop.set()
            th.join()


def test_client_notices_a_gone_controller_without_waiting_for_its_timeout(clock, req_socket):
    with ScanController(Backend(), clock=clock) as ctl:  # never served: only the liveness check answers
        gone = {"why": None}
        client = BridgeClient(ctl.control_endpoint, timeout_ms=60_000, retries=3, peer_gone=lambda: gone["why"])
        threading.Timer(0.3, lambda: gone.update(why="simulator exited with status -9")).start()
        with pytest.raises(BridgeError) as err:
            client.get_state()
        assert err.value.code == "unavailable" and "status -9" in err.value.message
        assert client.counters.timeouts == 0
        client.close()


def test_a_blank_reply_that_says_otherwise_is_an_error(run_server, bridge_client):
    from beamloop.edge.control.server import BridgeServer

    server = BridgeServer("tcp://127.0.0.1:0", {"blank": lambda a: {"blanked": False}})
    with run_server(server):
        client = bridge_client(server.endpoint)
        with pytest.raises(BridgeError, match="answered with blanked=False"):
            client.blank(True)


def test_reply_decoding_is_unchanged_for_safer_calls():
    seq, result = decode_reply(cbor2.dumps({"seq": 3, "ok": True, "result": {"blanked": True, "notes": ["x"]}}),
                               "blank")
    assert seq == 3 and result["notes"] == ["x"]


# queued points honour their dwell and the dose limit -------------------------------------------------------------
def test_queued_points_are_timed_by_their_own_dwell(clock, req_socket):
    """Points of 10 us (one 10-us sample each) are on for exactly one sample, not for the 1-ms block: the
    sequencer's timeline, sample-accurate beam_off_sample, dose within the limit."""
    backend = Backend(sample_time_us=10.0, block_samples=100)
    limits = SafetyLimits(watchdog_s=None, max_point_electrons=5000.0, current_pA=50.0)  # 5000 e = 16 us at 50 pA
    with ScanController(backend, limits=limits, clock=clock) as ctl, req_socket(ctl.control_endpoint) as sock:
        wire = Wire(ctl, sock)
        fid = wire("acquire_frame", **FRAME)["frame_id"]
        pts = [[0.1 * k, 0.5] for k in range(1, 9)]
        q = wire("queue_points", points=pts, dwell_us=10.0, frame_id=fid)
        assert q["samples_per_point"] == 1 and q["dwell_us"] == 10.0
        clock.t += 8 * 10e-6 + 1e-9  # 80 us: all eight points, not eight blocks of 1 ms
        ctl.step()
        ends = [e for e in ctl.events if e["type"] == "dwell_end"]
        assert len(ends) == 8 and all(e["samples"] == 1 and e["beam_off_sample"] == 1 for e in ends)
        assert wire("fetch_points", queue_id=q["queue_id"])["state"] == "done" and backend.blanker is True
        # a dwell of less than a sample is refused, not stretched to one; a dwell between samples is cut
        # down to whole samples, and the dose is checked on what is applied
        refused = wire.send("queue_points", points=pts, dwell_us=0.01, frame_id=fid)
        assert refused["error"] == "out_of_range" and "shorter than one sample" in refused["message"]
        cut = wire("queue_points", points=[[0.5, 0.5]], dwell_us=15.9, frame_id=fid)
        assert cut["samples_per_point"] == 1 and cut["dwell_us"] == 10.0
        assert wire.send("queue_points", points=[[0.5, 0.5]], dwell_us=10.0, frame_id=fid)["error"] == "busy"
        clock.t += 1e-3
        ctl.step()
        over = wire.send("queue_points", points=[[0.5, 0.5]], dwell_us=20.0, frame_id=fid)  # 6242 e > 5000
        assert over["error"] == "out_of_range" and "electrons" in over["message"]
