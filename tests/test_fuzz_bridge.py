"""Fuzzing the control bridge (edge/control/protocol.py, server.py, controller.py) with hypothesis: the request
and reply decoders, and a live bridge server with the simulated microscope's handlers behind it.

Properties: the decoders raise nothing but :class:`BridgeError` with a documented code; the live server
answers every request with a well-formed reply whose error code is documented and never ``internal``
(an ``internal`` is a handler bug), counts every request, never parks the probe outside the current
frame, and keeps serving. Default runs are short; ``_long`` variants (``-m slow``) run 20,000 examples.
"""

import math
import os
import time

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.protocol import ERROR_CODES, BridgeError, decode_envelope, decode_reply, encode_request
from beamloop.edge.sim.microscope import MicroscopeConfig

FAST = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=int(os.environ.get("BEAMLOOP_FUZZ_EXAMPLES", "20000")), deadline=None,
                suppress_health_check=list(HealthCheck))
"""The ``_long`` runs: 20_000 examples, or ``BEAMLOOP_FUZZ_EXAMPLES`` when set (counts are printed by pytest's
``--hypothesis-show-statistics``)."""

numbers = st.sampled_from([0, 1, -1, 0.5, 1.0, 1.0000001, -0.0, 1e-320, 16, 17, 64, 96, 97, 2**31, 2**63, 2**64,
                           -(2**64), math.nan, math.inf, -math.inf, 1e308, 5.0, 1000.0, 1000.5, 10_000_000.0])
cbor_values = st.recursive(
    st.none() | st.booleans() | numbers | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3),
    max_leaves=8)
ARG_NAMES = ["x", "y", "frame_id", "on", "shape", "fov_nm", "dwell_us", "channels", "points", "signal",
             "blank_between", "queue_id", "since", "model", "threshold", "rearm", "expected_rate"]
CALLS = ["get_capabilities", "get_state", "acquire_frame", "set_probe", "blank", "queue_points", "fetch_points",
         "abort_points", "sim_ground_truth", "sim_events", "heartbeat", "arm_trigger", "get_trigger_state"]


def check_decoders(buf):
    try:
        decode_envelope(buf)
    except BridgeError as exc:
        assert exc.code == "bad_request" and exc.message
    try:
        seq, result = decode_reply(buf, "fuzz")
        assert isinstance(seq, int) and isinstance(result, dict)
    except BridgeError as exc:
        assert exc.code in ERROR_CODES and exc.call == "fuzz"


raw_messages = st.one_of(
    st.binary(max_size=300),
    cbor_values.map(cbor2.dumps),
    st.fixed_dictionaries({}, optional={"call": cbor_values | st.sampled_from(CALLS), "seq": cbor_values,
                                        "args": cbor_values, "client": cbor_values, "ok": cbor_values,
                                        "result": cbor_values, "error": cbor_values | st.sampled_from(ERROR_CODES),
                                        "message": cbor_values}).map(cbor2.dumps),
)
test_bridge_decoders = FAST(given(raw_messages)(check_decoders))
test_bridge_decoders_long = pytest.mark.slow(LONG(given(raw_messages)(check_decoders)))


def test_request_round_trip_keeps_the_client_id():
    req = decode_envelope(encode_request("blank", 7, {"on": True}, "abc"))
    assert (req.call, req.seq, req.args, req.client) == ("blank", 7, {"on": True}, "abc")
    with pytest.raises(BridgeError):
        decode_envelope(encode_request("blank", 7, {}, "x" * 65))


# a live server ------------------------------------------------------------------------------------------------
class SmallFrames(MicroscopeConfig):
    """Frames of at most 96x96 pixels, so that fuzzed acquisitions stay fast."""

    LIMITS = {"shape": (16, 96), "dwell_us": (0.05, 1000.0)}


@pytest.fixture(scope="module")
def live(run_microscope, req_socket):
    cfg = SmallFrames(frames="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", seed=1, specimen_size_A=60.0,
                      max_park_s=0.05, block_samples=50)
    # drain: the detector's messages must go somewhere, as in a real setup
    with run_microscope(cfg, drain=True) as mic, req_socket(mic.control_endpoint) as sock:
        yield mic, sock


requests = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda call, seq, args, client: encode_request(call, seq, args, client),
              st.sampled_from(CALLS) | st.text(max_size=12), st.integers(-5, 2**66),
              st.dictionaries(st.sampled_from(ARG_NAMES) | st.text(max_size=6), cbor_values, max_size=5),
              st.none() | st.sampled_from(["a", "b"]) | st.text(min_size=1, max_size=64)),
    st.fixed_dictionaries({}, optional={"call": cbor_values | st.sampled_from(CALLS), "seq": cbor_values,
                                        "args": cbor_values, "client": cbor_values}).map(cbor2.dumps),
)


def _call_of(buf):
    """The ``call`` of a request's bytes, None when they are not a CBOR map naming one."""
    try:
        obj = cbor2.loads(buf)
    except Exception:  # noqa: BLE001 - fuzzed bytes
        return None
    return obj.get("call") if isinstance(obj, dict) else None


def check_live(live, reqs):
    mic, sock = live
    for buf in reqs:
        before = mic.server.requests
        was_blanked = mic.blanked
        sock.send(buf)
        assert sock.poll(5000), "the server stopped answering"
        reply = cbor2.loads(sock.recv())
        assert mic.server.requests == before + 1
        assert isinstance(reply, dict) and isinstance(reply["ok"], bool) and isinstance(reply["seq"], int)
        if not reply["ok"]:
            assert reply["error"] in ERROR_CODES and reply["error"] != "internal", reply
        if was_blanked and _call_of(buf) == "arm_trigger":
            assert mic.blanked  # arming the trigger never unblanks
        if mic.park is not None:
            fx, fy, fid = mic.park[2:]
            assert 0 <= fx <= 1 and 0 <= fy <= 1 and math.isfinite(fx) and math.isfinite(fy)
            assert mic.frame is not None and fid == mic.frame.frame_id
    sock.send(encode_request("get_state", 1, {}))  # and it is still serving
    assert sock.poll(5000) and cbor2.loads(sock.recv())["ok"] is True


_reqs = st.lists(requests, min_size=1, max_size=6)
test_live_server = FAST(given(reqs=_reqs)(check_live))
test_live_server_long = pytest.mark.slow(LONG(given(reqs=_reqs)(check_live)))


def test_live_server_after_fuzzing_is_usable(live):
    """A normal client can still acquire, park and blank after the fuzz runs above."""
    mic, _ = live
    time.sleep(0.05)
    with BridgeClient(mic.control_endpoint) as client:
        if client.get_state()["queue_id"] is not None:
            client.abort_points(client.get_state()["queue_id"])
        scan = client.acquire_frame((32, 32), (1.0, 1.0), 1.0)
        assert client.set_probe(0.5, 0.25, scan.frame_id)["applied"] == {"x": 0.5, "y": 0.25,
                                                                          "frame_id": scan.frame_id}
        assert client.blank(True)["blanked"] is True
