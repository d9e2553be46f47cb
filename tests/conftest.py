"""Shared fixtures: a simulated microscope served in a thread, bridge servers and clients, raw sockets, a clock.

Everything a fixture opens it closes, also when the test fails: threads are stopped and joined, then
sockets closed. Fixtures of any scope can start their own microscope or server through the session-scoped
factories (:func:`run_microscope`, :func:`run_server`, :func:`req_socket`), which are context managers.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import zmq

from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.server import BridgeServer
from beamloop.edge.sim.microscope import MicroscopeConfig, SimulatedMicroscope
from beamloop.streams.native.receiver import FrameReceiver

LOOPBACK = {"frames": "tcp://127.0.0.1:*", "control": "tcp://127.0.0.1:*"}
"""Endpoints on free loopback ports."""


class Clock:
    """A monotonic clock (seconds) that the test moves by hand: ``clock.t += dt``."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@contextlib.contextmanager
def _in_thread(serve):
    """Run ``serve(stop)`` in a daemon thread (``stop()`` turns true on exit); join it on exit."""
    stop = threading.Event()
    th = threading.Thread(target=serve, args=(stop.is_set,), daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


@contextlib.contextmanager
def _draining(endpoint: str):
    """A frame receiver on ``endpoint`` whose messages a thread takes and drops (as a detector's consumer)."""
    with FrameReceiver(endpoint) as rx:
        def drain(stop):
            while not stop():
                try:
                    rx.recv(10)
                except Exception:  # noqa: BLE001 - the stream is not under test here
                    pass

        with _in_thread(drain):
            yield rx


@contextlib.contextmanager
def running_microscope(config: MicroscopeConfig | None = None, *, clock=None, drain: bool = False, **options):
    """A :class:`SimulatedMicroscope` serving in a thread; stopped, joined and closed on exit.

    ``config`` (default: ``MicroscopeConfig(**LOOPBACK, **options)``); ``clock``: the microscope's clock
    (default: real time); ``drain``: also take and drop every frame stream message.
    """
    cfg = config if config is not None else MicroscopeConfig(**{**LOOPBACK, **options})
    mic = SimulatedMicroscope(cfg, clock=clock or time.monotonic)
    try:
        with contextlib.ExitStack() as stack:
            if drain:
                stack.enter_context(_draining(mic.frames_endpoint))
            stack.enter_context(_in_thread(lambda stop: mic.serve(stop=stop)))
            yield mic
    finally:
        mic.close()


@contextlib.contextmanager
def running_server(server: BridgeServer):
    """``server`` answering requests in a thread; stopped, joined and closed on exit."""
    try:
        with _in_thread(lambda stop: [server.handle_one(10) for _ in iter(stop, True)]):
            yield server
    finally:
        server.close()


@contextlib.contextmanager
def raw_req_socket(endpoint: str):
    """A bare ZeroMQ REQ socket connected to ``endpoint`` (linger 0), closed on exit."""
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        yield s
    finally:
        s.close()


@pytest.fixture
def clock():
    """A :class:`Clock` at t = 100 s. A test that asks for it gets the ``microscope`` on this clock."""
    return Clock()


@pytest.fixture(scope="session")
def run_microscope():
    """The factory :func:`running_microscope`, for fixtures of any scope."""
    return running_microscope


@pytest.fixture(scope="session")
def run_server():
    """The factory :func:`running_server`, for fixtures of any scope."""
    return running_server


@pytest.fixture(scope="session")
def req_socket():
    """The factory :func:`raw_req_socket`, for fixtures of any scope."""
    return raw_req_socket


@pytest.fixture
def microscope(request):
    """A simulated microscope on loopback, served in a thread.

    Its options: the test module's ``MICROSCOPE`` dict, updated by an indirect parameter
    (``@pytest.mark.parametrize("microscope", [{...}], indirect=True)``). It runs on the ``clock`` fixture
    when the test asks for that too, else on real time.
    """
    options = {**getattr(request.module, "MICROSCOPE", {}), **getattr(request, "param", {})}
    clk = request.getfixturevalue("clock") if "clock" in request.fixturenames else None
    with running_microscope(clock=clk, **options) as mic:
        yield mic


@pytest.fixture
def bridge_client():
    """Factory of :class:`BridgeClient` (same arguments); every client made is closed after the test."""
    made: list[BridgeClient] = []

    def connect(endpoint: str, **kwargs) -> BridgeClient:
        client = BridgeClient(endpoint, **kwargs)
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()


@pytest.fixture(scope="session")
def usim(tmp_path_factory):
    """nionswift-usim's scan device, started once for the whole session (its hardware-source registry takes a
    second start in one process badly) and closed at its end; skips where the nion extra is not installed."""
    from beamloop.edge.control.nion import nion_available

    if not nion_available():
        pytest.skip("nionswift-instrumentation / nionswift-usim not installed: pip install -e '.[nion]'")
    from beamloop.edge.control.nion import start_usim, stop_usim

    scan = start_usim(tmp_path_factory.mktemp("usim"))
    yield scan
    stop_usim()
