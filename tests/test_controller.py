"""The scan controller (edge/control/controller.py) over an in-memory backend, on loopback and a hand-moved clock.

The controller is served in the test's own thread: a request is sent on a raw REQ socket, the controller
serves it (:meth:`ScanController.handle_one`), then the reply is read. Nothing runs in the background, so
every step, and every move of the clock, happens where the test says.
"""

import math

import numpy as np
import pytest
import zmq

from beamloop.edge.control.controller import (
    Acquisition,
    Capabilities,
    ParkedProbe,
    ParkedStream,
    PointProbe,
    ScanBackend,
    ScanController,
)
from beamloop.edge.control.nion import NionBackend
from beamloop.edge.control.protocol import BridgeError, ScanLimits, decode_reply, encode_request, parse_acquire_frame
from beamloop.edge.control.safety import SafetyLimits
from beamloop.edge.sim.microscope import MicroscopeConfig, SimulatedBackend
from beamloop.streams.native.receiver import FrameReceiver

LIMITS = ScanLimits(shape=(16, 256), dwell_us=(0.1, 100.0), default_dwell_us=2.0, channels=("haadf", "bf"))
PARKED = ParkedStream(sample_time_us=10.0, block_samples=4, user_data={"fake": True})
BLOCK_S = 4 * 10.0 * 1e-6


class FakeBackend:
    """A scan device in memory: images of known values, and a log of everything it was told to do."""

    def __init__(self, parked_stream=None):
        self.parked_stream = parked_stream
        self.log = []
        self.blanker = None

    def capabilities(self):
        return Capabilities(LIMITS, self.parked_stream, {"fake": True})

    def set_frame(self, scan, channels):
        (rows, cols), (h, w) = scan.shape, scan.fov_nm
        if not math.isclose(h / rows, w / cols):
            raise BridgeError("out_of_range", "this device makes square pixels only")
        self.log.append(("set_frame", scan.frame_id, channels))
        return {"pixel_nm": h / rows}

    def acquire(self, scan, channels):
        self.log.append(("acquire", scan.frame_id, channels))
        data = {c: np.full(scan.shape, k + 1, np.uint16) for k, c in enumerate(channels)}
        return Acquisition(data, {"fake": True}, events=[{"type": "scanned", "frame_id": scan.frame_id}])

    def park(self, fx, fy, frame_id):
        self.log.append(("park", fx, fy, frame_id))
        return fx, fy

    def set_blanked(self, on):
        self.log.append(("blank", on))
        self.blanker = on
        return on


class ParkedFake(FakeBackend):
    """With a parked-probe signal: sample k of a dwell counts k (mod 2^16); an event at every fifth sample."""

    def __init__(self):
        super().__init__(PARKED)

    def parked_samples(self, n, dwell):
        first = dwell.samples
        events = [{"type": "tick", "sample": k} for k in range(first, first + n) if k and k % 5 == 0]
        return (np.arange(first, first + n) % 65536).astype(np.uint16), events


class PointFake(FakeBackend):
    """Measures single points: the value at (fx, fy) is 100 fx + fy."""

    def measure_point(self, fx, fy, dwell_us, channel):
        self.log.append(("measure", fx, fy, dwell_us, channel))
        return 100 * fx + fy


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


BACKENDS = {"plain": FakeBackend, "parked": ParkedFake, "point": PointFake}


@pytest.fixture
def controller(request, clock, req_socket):
    """``(controller, backend, wire)`` for the backend named by the indirect parameter (default ``parked``);
    watchdog 0.5 s, dwell limit 2 s, on the ``clock`` fixture."""
    backend = BACKENDS[getattr(request, "param", "parked")]()
    limits = SafetyLimits(watchdog_s=0.5, max_point_dwell_s=2.0, max_pixel_dwell_us=100.0)
    with ScanController(backend, limits=limits, clock=clock) as ctl, req_socket(ctl.control_endpoint) as sock:
        yield ctl, backend, Wire(ctl, sock)


FRAME = {"shape": [64, 64], "fov_nm": [2.0, 2.0], "dwell_us": 1.0}


# acquire_frame ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, code, text", [
    ({}, "bad_request", "acquire_frame needs shape [rows, cols], fov_nm [h, w], dwell_us"),
    ({"shape": [64], "fov_nm": [1, 1]}, "bad_request", "acquire_frame needs shape"),
    ({"shape": [64, 64], "fov_nm": [1, 1, 1]}, "bad_request", "acquire_frame needs shape"),
    ({"shape": [64, 64], "fov_nm": ["a", 1]}, "bad_request", "acquire_frame needs shape"),
    ({"shape": [8, 64], "fov_nm": [1, 1]}, "out_of_range", "frame size 8x64 outside [16, 256]"),
    ({"shape": [64, 64], "fov_nm": [0, 1]}, "out_of_range", "field of view 0.0 x 1.0 nm is not positive"),
    ({"shape": [64, 64], "fov_nm": [math.inf, 1]}, "out_of_range", "is not positive"),
    ({**FRAME, "dwell_us": 0.05}, "out_of_range", "dwell 0.05 us outside [0.1, 100.0]"),
    ({**FRAME, "channels": "haadf"}, "bad_request", "channels must be a non-empty list of names"),
    ({**FRAME, "channels": []}, "bad_request", "channels must be a non-empty list of names"),
    ({**FRAME, "channels": ["haadf", "HAADF"]}, "bad_request", "name a channel more than once"),
    ({**FRAME, "channels": ["maadf"]}, "out_of_range",
     "channels ['maadf'] not all available; this scan device has ['haadf', 'bf']"),
    ({"shape": [64, 32], "fov_nm": [2.0, 2.0]}, "out_of_range", "square pixels only"),  # the backend's own rule
])
def test_acquire_frame_is_checked_before_anything_happens(controller, args, code, text):
    ctl, backend, wire = controller
    assert text in wire.refused(code, "acquire_frame", **args)
    assert ctl.frame is None and [e for e in backend.log if e[0] != "blank"] == []
    assert wire("acquire_frame", **FRAME)["frame_id"] == 1  # no frame id was used up


def test_acquire_frame_limits_of_a_bounded_field_of_view():
    lim = ScanLimits((16, 96), (0.05, 1000.0), 10.0, ("haadf",), max_fov_nm=3.0)
    req = parse_acquire_frame({"shape": [32, 16], "fov_nm": [3, 1.5], "channels": ["HAADF"]}, lim)
    assert (req.shape, req.fov_nm, req.dwell_us, req.channels) == ((32, 16), (3.0, 1.5), 10.0, ("haadf",))
    with pytest.raises(BridgeError) as err:
        parse_acquire_frame({"shape": [32, 32], "fov_nm": [3.5, 1]}, lim)
    assert err.value.code == "out_of_range" and err.value.message == "field of view (3.5, 1.0) nm outside (0, 3.00]"


def test_acquired_frame_goes_out_on_the_frame_stream(controller):
    ctl, backend, wire = controller
    with FrameReceiver(ctl.frames_endpoint) as rx:
        # a PUSH socket is writable once a receiver is connected: wait for that, so no send can time out
        assert ctl.sender._sock.poll(10_000, zmq.POLLOUT)
        reply = wire("acquire_frame", shape=[32, 64], fov_nm=[1.0, 2.0], channels=["bf", "haadf"])
        assert reply["frame_id"] == 1 and reply["pixel_nm"] == pytest.approx(1 / 32)  # the backend's field
        assert reply["scan"] == ctl.frame.as_dict() and ctl.frame.dwell_us == LIMITS.default_dwell_us
        # the frame was acquired after the reply, in the same turn of the serve loop
        assert backend.log[-2:] == [("set_frame", 1, ("bf", "haadf")), ("acquire", 1, ("bf", "haadf"))]
        start, image = rx.recv(5000), rx.recv(5000)
        assert start.series.channels == ("bf", "haadf")
        assert start.series.user_data == {"kind": "frame", "scan": reply["scan"], "pixel_size_A": 0.3125,
                                          "fake": True}
        assert image.data["bf"].shape == (32, 64) and (image.data["bf"] == 1).all() and (image.data["haadf"] == 2).all()
        assert rx.recv(5000) is not None  # the series' end
    assert [e["type"] for e in ctl.events] == ["scanned"] and "t_ns" in ctl.events[0]


def test_undelivered_frame_is_counted(controller):
    ctl, _, wire = controller  # nobody takes the frame stream
    wire("acquire_frame", **FRAME)
    assert ctl.dropped_messages == 1 and ctl.events[0]["type"] == "dropped" and ctl.events[0]["what"] == "frame 1"
    assert wire("get_state")["frame_id"] == 1


# probe, blanker, state -------------------------------------------------------------------------------------
def test_probe_blank_and_state(controller):
    ctl, backend, wire = controller
    assert backend.log == [("blank", True)]  # the controller starts from a blanked beam
    st = wire("get_state")
    assert {k: st[k] for k in ("frame_id", "probe", "blanked", "probe_position", "queue_id")} == {
        "frame_id": None, "probe": "idle", "blanked": True, "probe_position": None, "queue_id": None}
    wire.refused("stale_frame", "set_probe", x=0.5, y=0.5, frame_id=1)  # no frame yet
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    assert wire("set_probe", x=0.25, y=0.75, frame_id=fid) == {"applied": {"x": 0.25, "y": 0.75, "frame_id": fid},
                                                                "blanked": True}
    assert backend.log[-1] == ("park", 0.25, 0.75, fid) and ctl.dwell is None  # blanked: no parked series
    st = wire("get_state")
    assert (st["probe"], st["probe_position"], st["blanked"]) == ("parked", [0.25, 0.75], True)
    wire.refused("bad_request", "blank", on="yes")
    assert wire("blank", on=False) == {"blanked": False} and backend.blanker is False
    assert ctl.dwell is not None and (ctl.dwell.fx, ctl.dwell.fy, ctl.dwell.frame_id) == (0.25, 0.75, fid)
    assert wire("blank", on=True) == {"blanked": True} and backend.blanker is True and ctl.dwell is None
    assert ctl.events[-1]["type"] == "dwell_end" and ctl.events[-1]["reason"] == "blanked"
    wire("acquire_frame", **FRAME)  # a new frame: the probe is no longer parked on a current frame
    assert wire("get_state")["probe"] == "idle" and ctl.probe is None


def test_parked_samples_follow_the_clock(controller, clock):
    ctl, _, wire = controller
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    wire("set_probe", x=0.5, y=0.5, frame_id=fid)
    wire("blank", on=False)
    ctl.step()
    assert ctl.dwell.samples == 0  # no time has passed
    clock.t += 2.5 * BLOCK_S
    ctl.step()
    assert ctl.dwell.samples == 8 and ctl.dwell.counts_sum == sum(range(8))
    assert [e["sample"] for e in ctl.dwell.events] == [5]
    wire("blank", on=True)
    end = ctl.events[-1]
    assert end["type"] == "dwell_end" and end["samples"] == 8 and end["ejection_samples"] == [5]
    assert end["beam_off_sample"] == 10  # 2.5 blocks of 4 samples had passed when the beam went off


# point queues -------------------------------------------------------------------------------------------------
def test_point_queue_of_a_parked_probe_runs_on_the_clock(controller, clock):
    ctl, backend, wire = controller
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    q = wire("queue_points", points=[[0.25, 0.25], [0.75, 0.5]], dwell_us=80.0, frame_id=fid)
    assert q == {"queue_id": 1, "points": 2, "samples_per_point": 8, "dwell_us": 80.0}
    assert ctl.blanked is False and backend.log[-2:] == [("park", 0.25, 0.25, fid), ("blank", False)]
    wire.refused("busy", "set_probe", x=0.5, y=0.5, frame_id=fid)
    wire.refused("busy", "acquire_frame", **FRAME)
    assert wire("fetch_points", queue_id=1) == {"queue_id": 1, "state": "running", "done": 0, "total": 2,
                                                 "mean_counts": []}
    clock.t += 80e-6
    ctl.step()  # the first point's 8 samples; blank between points; the second point starts where it ended
    assert backend.log[-3:] == [("blank", True), ("park", 0.75, 0.5, fid), ("blank", False)]
    clock.t += 80e-6
    ctl.step()
    assert wire("fetch_points", queue_id=1) == {"queue_id": 1, "state": "done", "done": 2, "total": 2,
                                                 "mean_counts": [3.5, 3.5]}
    assert ctl.queue is None and ctl.blanked is True and backend.blanker is True
    wire.refused("bad_request", "fetch_points", queue_id="1")
    wire.refused("out_of_range", "fetch_points", queue_id=7)


@pytest.mark.parametrize("controller", ["point"], indirect=True)
def test_point_queue_of_a_point_probe_measures_a_point_a_step(controller):
    ctl, backend, wire = controller
    assert wire("get_capabilities")["parked_stream"] is None
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    q = wire("queue_points", points=[[0.25, 0.5], [0.5, 0.75]], dwell_us=50.0, frame_id=fid, signal="BF",
             blank_between=False)
    assert q == {"queue_id": 1, "points": 2, "samples_per_point": 1, "dwell_us": 50.0} and ctl.queue is not None
    # wire() served the request and then took one step: the first point is measured
    assert backend.log[-2:] == [("blank", False), ("measure", 0.25, 0.5, 50.0, "bf")]
    ctl.step()
    assert wire("fetch_points", queue_id=1)["mean_counts"] == [25.5, 50.75]
    assert ctl.queue is None and ctl.blanked is True
    wire.refused("out_of_range", "queue_points", points=[[0.5, 0.5]], dwell_us=5.0, frame_id=fid, signal="adf")


@pytest.mark.parametrize("controller", ["plain"], indirect=True)
def test_no_point_queues_without_a_probe_that_can_visit_points(controller):
    ctl, _, wire = controller
    caps = wire("get_capabilities")
    assert "queue_points" not in caps["calls"] and caps["fake"] is True and caps["channels"] == ["haadf", "bf"]
    fid = wire("acquire_frame", **FRAME)["frame_id"]  # so that beam safety lets the request through
    wire.refused("unknown_call", "queue_points", points=[[0.5, 0.5]], dwell_us=5.0, frame_id=fid)


def test_aborting_a_queue_blanks_the_beam(controller):
    ctl, backend, wire = controller
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    wire("queue_points", points=[[0.25, 0.25]], dwell_us=80.0, frame_id=fid)
    assert wire("abort_points", queue_id=1) == {"queue_id": 1, "state": "aborted", "blanked": True}
    assert ctl.queue is None and backend.blanker is True and ctl.events[-1]["reason"] == "aborted"


# safety actions on the controller's clock -------------------------------------------------------------------
def test_watchdog_blanks_on_the_hand_moved_clock(controller, clock):
    ctl, backend, wire = controller
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    wire("set_probe", x=0.5, y=0.5, frame_id=fid)
    wire("blank", on=False)
    clock.t += 0.4
    ctl.handle_one(0)
    assert ctl.blanked is False
    wire("heartbeat")  # the client is alive: the watchdog's period starts again
    clock.t += 0.4
    ctl.handle_one(0)
    assert ctl.blanked is False and ctl.safety.counters.watchdog_trips == 0
    clock.t += 0.2
    ctl.handle_one(0)
    assert ctl.blanked is True and backend.blanker is True and ctl.dwell is None
    assert ctl.safety.counters.watchdog_trips == 1
    assert [e["reason"] for e in ctl.events if e["type"] == "safety"] == ["watchdog"]


def test_watchdog_park_keeps_the_blanker_and_ends_a_queue(clock, req_socket):
    backend = ParkedFake()
    limits = SafetyLimits(watchdog_s=0.5, on_watchdog="park", safe_position=(0.0, 1.0))
    with ScanController(backend, limits=limits, clock=clock) as ctl, req_socket(ctl.control_endpoint) as sock:
        wire = Wire(ctl, sock)
        fid = wire("acquire_frame", **FRAME)["frame_id"]
        wire("queue_points", points=[[0.25, 0.25]], dwell_us=50_000.0, frame_id=fid)
        clock.t += 0.6
        ctl.handle_one(0)
        assert ctl.queue is None and ctl._queues[1].state == "watchdog"
        assert ctl.probe == (0.0, 1.0, fid) and ctl.blanked is False and backend.log[-1] == ("park", 0.0, 1.0, fid)
        assert (ctl.dwell.fx, ctl.dwell.fy) == (0.0, 1.0)  # the beam stays on, at the safe position


@pytest.mark.parametrize("controller", ["plain"], indirect=True)
def test_dwell_limit_blanks_a_parked_beam(controller, clock):
    ctl, backend, wire = controller
    fid = wire("acquire_frame", **FRAME)["frame_id"]
    wire("set_probe", x=0.5, y=0.5, frame_id=fid)
    wire("blank", on=False)
    for _ in range(4):  # heartbeats keep the watchdog quiet; the dwell limit (2 s) still acts
        clock.t += 0.45
        wire("heartbeat")
    assert ctl.blanked is False
    clock.t += 0.45
    wire("heartbeat")
    assert ctl.blanked is True and ctl.safety.counters.dwell_limit_blanks == 1
    assert ctl.events[-1] == {**ctl.events[-1], "type": "safety", "action": "blank", "reason": "dwell_limit"}


# lifecycle, extra calls, the Protocol -------------------------------------------------------------------------
def test_close_blanks_the_beam_and_can_be_repeated(clock):
    backend = ParkedFake()
    ctl = ScanController(backend, clock=clock)
    backend.set_blanked(False)
    ctl.close()
    ctl.close()
    assert backend.blanker is True


def test_backend_only_calls_are_served_besides_the_standard_ones(clock, req_socket):
    calls = {"fake_echo": lambda args: {"echo": args}}
    with ScanController(FakeBackend(), calls=calls, clock=clock) as ctl, req_socket(ctl.control_endpoint) as sock:
        wire = Wire(ctl, sock)
        assert wire("fake_echo", a=1) == {"echo": {"a": 1}}
        assert wire("get_capabilities")["calls"] == sorted(
            ["acquire_frame", "blank", "fake_echo", "get_capabilities", "get_state", "heartbeat", "set_probe",
             "stop"])
    with pytest.raises(ValueError, match="standard"):
        ScanController(FakeBackend(), calls={"blank": calls["fake_echo"]})


class NionStandIn:
    """Just enough of a Nion scan hardware source to build a :class:`NionBackend` (no calls are made)."""

    stem_controller = None
    channel_count = 2
    hardware_source_id = "stand-in"

    def get_channel_name(self, index):
        return ("HAADF", "MAADF")[index]


def test_the_backends_satisfy_the_protocol():
    sim = SimulatedBackend(MicroscopeConfig(seed=0, specimen_size_A=30.0))
    nion = NionBackend(NionStandIn())
    for backend in (sim, nion, FakeBackend(), ParkedFake(), PointFake()):
        assert isinstance(backend, ScanBackend)
    assert isinstance(sim, ParkedProbe) and not isinstance(sim, PointProbe)
    assert isinstance(nion, PointProbe) and not isinstance(nion, ParkedProbe)
    assert nion.capabilities().limits.channels == ("haadf", "maadf")
    assert sim.capabilities().parked_stream.as_dict() == {"sample_time_us": 10.0, "block_samples": 100}
    assert not isinstance(object(), ScanBackend)
    with pytest.raises(TypeError, match="ScanBackend"):
        ScanController(object())
