"""The Nion Swift backend (edge/control/nion.py) against nionswift-usim's headless simulated microscope."""

import math
import threading
import time

import numpy as np
import pytest

from beamloop.edge.control.nion import nion_available

pytestmark = pytest.mark.skipif(not nion_available(), reason=(
    "nionswift-instrumentation / nionswift-usim not installed: pip install -e '.[nion]'"))

from beamloop.edge.control.client import BridgeClient  # noqa: E402
from beamloop.edge.control.protocol import BridgeError  # noqa: E402
from beamloop.edge.control.safety import SafetyLimits  # noqa: E402
from beamloop.streams.native.receiver import FrameReceiver, ImageEvent, SeriesEnd, SeriesStart  # noqa: E402


def serving(scan, limits):
    from beamloop.edge.control.nion import NionScanController

    ctl = NionScanController(scan, limits=limits)
    stop = threading.Event()
    th = threading.Thread(target=ctl.serve, kwargs={"stop": stop.is_set}, daemon=True)
    th.start()

    def finish():
        stop.set()
        th.join()
        ctl.close()

    return ctl, finish


@pytest.fixture
def nion(usim):
    ctl, finish = serving(usim, SafetyLimits(watchdog_s=None, max_pixel_dwell_us=1e5))
    rx = FrameReceiver(ctl.frames_endpoint)
    client = BridgeClient(ctl.control_endpoint, timeout_ms=30000)
    yield ctl, client, rx, usim
    client.close()
    rx.close()
    finish()


def blanked(scan):
    return scan.stem_controller.TryGetVal("C_Blank")[1] >= 0.5


def test_frames_arrive_on_the_native_stream(nion):
    ctl, client, rx, scan = nion
    caps = client.get_capabilities()
    assert caps["nion"] and "haadf" in caps["channels"] and caps["parked_stream"] is None
    frame = client.acquire_frame((32, 64), (4.0, 8.0), 2.0, channels=("haadf", "maadf"))
    assert frame.shape == (32, 64) and frame.fov_nm == (4.0, 8.0) and frame.pixel_size_A == pytest.approx(1.25)
    start = rx.recv(30000)
    assert isinstance(start, SeriesStart) and start.series.channels == ("haadf", "maadf")
    assert start.series.user_data["scan"] == frame.as_dict()
    ev = rx.recv(30000)
    assert isinstance(ev, ImageEvent)
    for ch in ("haadf", "maadf"):
        img = ev.data[ch]
        assert img.shape == (32, 64) and img.dtype == np.float32 and np.isfinite(img).all() and img.std() > 0
    assert isinstance(rx.recv(30000), SeriesEnd)
    # Nion recorded what was asked: 32x64 pixels of 0.125 nm
    fp = ctl.backend.frame_parameters
    assert tuple(fp.pixel_size) == (32, 64) and fp.fov_size_nm.width == pytest.approx(8.0)
    with pytest.raises(BridgeError) as err:
        client.acquire_frame((32, 64), (4.0, 4.0), 2.0)  # non-square pixels
    assert err.value.code == "out_of_range"


def test_probe_position_and_blanker(nion):
    ctl, client, rx, scan = nion
    frame = client.acquire_frame((16, 16), (2.0, 2.0), 1.0)
    reply = client.set_probe(0.75, 0.25, frame.frame_id)
    assert reply["applied"] == {"x": 0.75, "y": 0.25, "frame_id": frame.frame_id}
    pos = scan.probe_position
    assert (pos.x, pos.y) == (0.75, 0.25)  # Nion's FloatPoint is (y, x)
    assert client.get_state()["probe_position"] == [0.75, 0.25]
    for x, y, fid, code in [(1.5, 0.5, frame.frame_id, "out_of_range"), (math.nan, 0.5, frame.frame_id,
                                                                            "out_of_range"),
                            (0.5, 0.5, frame.frame_id - 1, "stale_frame")]:
        with pytest.raises(BridgeError) as err:
            client.call("set_probe", x=x, y=y, frame_id=fid)
        assert err.value.code == code
    pos = scan.probe_position
    assert (pos.x, pos.y) == (0.75, 0.25)  # never moved by a refused call
    assert client.blank(False)["blanked"] is False and not blanked(scan)
    assert client.blank(True)["blanked"] is True and blanked(scan)


def test_point_queue_as_subscans(nion):
    ctl, client, rx, scan = nion
    frame = client.acquire_frame((16, 16), (2.0, 2.0), 1.0)
    q = client.queue_points([[0.25, 0.25], [0.5, 0.75], [0.9, 0.1]], dwell_us=50.0, frame_id=frame.frame_id)
    t_end = time.monotonic() + 60
    while client.fetch_points(q["queue_id"])["state"] == "running" and time.monotonic() < t_end:
        time.sleep(0.01)
    res = client.fetch_points(q["queue_id"])
    assert res["state"] == "done" and res["done"] == 3
    assert all(math.isfinite(m) and m > 0 for m in res["mean_counts"])
    assert blanked(scan)
    with pytest.raises(BridgeError) as err:
        client.call("queue_points", points=[[0.5, 0.5]], dwell_us=50.0, frame_id=frame.frame_id - 1)  # unchecked
    assert err.value.code == "stale_frame"


@pytest.mark.parametrize("mode", ["blank", "park"])
def test_watchdog_on_nion(usim, mode):
    ctl, finish = serving(usim, SafetyLimits(watchdog_s=0.3, on_watchdog=mode, safe_position=(0.0, 0.0)))
    try:
        client = BridgeClient(ctl.control_endpoint, timeout_ms=30000)
        frame = client.acquire_frame((16, 16), (2.0, 2.0), 1.0)
        client.set_probe(0.5, 0.5, frame.frame_id)
        client.blank(False)
        client.close()  # the service falls silent
        t_end = time.monotonic() + 10
        while ctl.safety.counters.watchdog_trips == 0 and time.monotonic() < t_end:
            time.sleep(0.01)
        assert ctl.safety.counters.watchdog_trips == 1
        if mode == "blank":
            assert blanked(usim)
        else:
            pos = usim.probe_position
            assert (pos.x, pos.y) == (0.0, 0.0)
    finally:
        finish()
