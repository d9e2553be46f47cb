"""One socket lifecycle for every stream sender and receiver (beamloop.streams._socket).

Explicit close with a linger period, use as a context manager, a ResourceWarning for an owner that is
garbage-collected unclosed, and bind/connect errors that name the endpoint.
"""

import gc
import warnings

import pytest
import zmq

from beamloop.streams._socket import SocketOwner, open_pull, open_push
from beamloop.streams.dectris.receiver import DetectorReceiver
from beamloop.streams.dectris.simplon import SimplonSender
from beamloop.streams.dectris.stream_v2 import Stream2Sender
from beamloop.streams.native.receiver import FrameReceiver
from beamloop.streams.native.sender import FrameSender

OWNERS = {
    "FrameReceiver": lambda: FrameReceiver("tcp://127.0.0.1:0", bind=True),
    "DetectorReceiver": lambda: DetectorReceiver("tcp://127.0.0.1:0", bind=True, protocol="stream2"),
    "FrameSender": lambda: FrameSender("tcp://127.0.0.1:0"),
    "SimplonSender": lambda: SimplonSender("tcp://127.0.0.1:0"),
    "Stream2Sender": lambda: Stream2Sender("tcp://127.0.0.1:0"),
}


def resource_warnings(action) -> list[str]:
    """Messages of the ResourceWarnings ``action()`` and a garbage collection emit (what earlier tests left
    for the collector is collected first, outside the record)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.parametrize("name", sorted(OWNERS))
def test_unclosed_owner_warns_and_closes_its_socket(name):
    held = {}

    def leak():
        owner = OWNERS[name]()
        held["socket"], held["endpoint"] = owner.socket, owner.endpoint
        del owner

    assert resource_warnings(leak) == [f"unclosed {name} on {held['endpoint']}"]
    assert held["socket"].closed


@pytest.mark.parametrize("name", sorted(OWNERS))
def test_closed_owner_is_silent_and_close_is_idempotent(name):
    def use():
        with OWNERS[name]() as owner:
            assert isinstance(owner, SocketOwner) and not owner.closed
        assert owner.closed
        owner.close()
        owner.close(linger_ms=0)

    assert resource_warnings(use) == []


def test_bind_error_names_the_endpoint_and_leaks_nothing():
    with FrameReceiver("tcp://127.0.0.1:0", bind=True) as rx:
        def clash():
            with pytest.raises(zmq.ZMQError, match=f"cannot bind '{rx.endpoint}'"):
                DetectorReceiver(rx.endpoint, bind=True)
            with pytest.raises(zmq.ZMQError, match=f"cannot bind '{rx.endpoint}'"):
                FrameSender(rx.endpoint)

        assert resource_warnings(clash) == []


@pytest.mark.parametrize("make", [lambda ep: FrameReceiver(ep), lambda ep: SimplonSender(ep, bind=False)])
def test_connect_error_names_the_endpoint(make):
    with pytest.raises(zmq.ZMQError, match="cannot connect 'nonsense://x'"):
        make("nonsense://x")


def test_options_are_set_before_binding():
    sock, ep = open_pull("tcp://127.0.0.1:0", bind=True, rcvhwm=7, linger_ms=3)
    push, _ = open_push(ep, bind=False, sndhwm=5, linger_ms=11, send_timeout_ms=13)
    try:
        assert ep.startswith("tcp://127.0.0.1:") and not ep.endswith(":0")
        assert (sock.rcvhwm, sock.linger) == (7, 3)
        assert (push.sndhwm, push.linger, push.sndtimeo) == (5, 11, 13)
    finally:
        sock.close()
        push.close()
