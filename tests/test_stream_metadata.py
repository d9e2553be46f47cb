"""Stream metadata is input (edge/service.py, edge/frame/context.py, the runner's budget in edge/path.py): every
field of a series the service uses is checked before anything is sized by it; a bad series is rejected,
counted and logged, and the service goes on with the next one."""

import math

import numpy as np
import pytest
import zmq

from beamloop.edge.frame.context import PIXEL_SIZE_A, FrameMeta, check_pixel_size
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.frame.stage import FrameError, StageBase
from beamloop.edge.materials import MOS2
from beamloop.edge.path import FramePath, frame_path
from beamloop.edge.service import EdgeService, check_scan, sent_time_ns
from beamloop.edge.sim.frames import mos2_frame
from beamloop.streams.native import protocol
from beamloop.streams.native.receiver import FrameReceiver

SHAPE = (96, 96)
PX = 0.15
COUNTS = mos2_frame(shape=SHAPE, pixel_size_A=PX, dose_e_per_A2=1e5, seed=3).counts.astype(np.uint16)
SCAN = ScanFrame(1, SHAPE, (SHAPE[0] * PX / 10, SHAPE[1] * PX / 10)).as_dict()
GOOD = {"kind": "frame", "scan": SCAN, "pixel_size_A": PX}


class Feed:
    """A PUSH socket feeding hand-built native-stream messages to a service's receiver."""

    def __init__(self):
        self.push = zmq.Context.instance().socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind("tcp://127.0.0.1:*")
        self.endpoint = self.push.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sid = 0

    def series(self, user_data, image_user_data=None, frames=1, image=COUNTS):
        self.sid += 1
        s = protocol.new_series(self.sid, ["haadf"], image.shape, image.dtype, number_of_images=frames,
                                user_data=user_data)
        self.push.send(protocol.encode_start(s))
        for k in range(frames):
            blob = protocol.encode_blob(image, "raw")
            ud = {"sent_ns": __import__("time").monotonic_ns(), **(image_user_data or {})}
            head = protocol.encode_image_header(s, k, [("raw", image.nbytes)], user_data=ud)
            self.push.send_multipart([head, blob])
        self.push.send(protocol.encode_end(s))

    def close(self):
        self.push.close()


@pytest.fixture
def fed():
    feed = Feed()
    with FrameReceiver(feed.endpoint) as rx:
        service = EdgeService(rx, frame_path("classical", "MoS2"), None)
        assert feed.push.poll(10_000, zmq.POLLOUT)  # the receiver is connected
        yield feed, service
    feed.close()


BAD_SERIES = [
    ({**GOOD, "pixel_size_A": "abc"}, "is not a number"),
    ({**GOOD, "pixel_size_A": [1]}, "is not a number"),
    ({**GOOD, "pixel_size_A": -0.15}, "outside"),
    ({**GOOD, "pixel_size_A": math.nan}, "outside"),
    ({**GOOD, "pixel_size_A": 1e9}, "outside"),
    ({**GOOD, "pixel_size_A": 1e-9}, "outside"),  # once ~24 GB of kernel and buffers
    ({**GOOD, "pixel_size_A": 2**80}, "outside"),
    ({**GOOD, "kind": ["frame"]}, "kind"),
    ({**GOOD, "scan": {**SCAN, "fov_nm": [1e300, 1e300]}}, "field of view"),
    ({**GOOD, "scan": {**SCAN, "shape": [64, 64]}}, "scan frame of 64x64"),
    ({**GOOD, "scan": "frame"}, "not a map"),
    ({**GOOD, "scan": {**SCAN, "frame_id": 2**70}}, "frame id"),
    ({**GOOD, "pixel_size_A": 0.3}, "disagrees"),
]


@pytest.mark.parametrize("user_data, text", BAD_SERIES)
def test_a_bad_series_is_rejected_and_the_next_one_processed(fed, user_data, text):
    feed, service = fed
    feed.series(user_data, frames=2)
    feed.series(GOOD)
    got = service.next_frame(10_000)
    assert got is not None, service.stats
    ev, ctx, scan = got
    assert ev.series.series_id == 2 and len(ctx.columns) > 20 and scan.frame_id == 1
    st = service.stats
    assert st.series_rejected == 1 and st.frames_rejected == 2 and st.rejected == 2
    assert text in st.errors[-1], st.errors


@pytest.mark.parametrize("sent", [2**100, -2**62, "now", 1.5, True])
def test_unusable_frame_times_are_counted_not_used(fed, sent):
    feed, service = fed
    feed.series(GOOD, {"sent_ns": sent})
    got = service.next_frame(10_000)
    assert got is not None and sent_time_ns(got[0]) is None
    assert service.stats.bad_times == 1 and len(service.latency.samples("receive")) == 0


def test_a_good_time_is_used(fed):
    feed, service = fed
    feed.series(GOOD)
    assert service.next_frame(10_000) is not None and len(service.latency.samples("receive")) == 1


def test_a_bogus_valid_count_in_a_parked_block_is_ignored():
    from beamloop.edge.service import DwellResult
    from beamloop.edge.stages.policy import Target

    feed = Feed()
    with FrameReceiver(feed.endpoint) as rx:
        service = EdgeService(rx, frame_path("classical", "MoS2"), None)
        assert feed.push.poll(10_000, zmq.POLLOUT)
        block = np.ones((1, 8), np.uint16)
        feed.series({"kind": "parked"}, {"valid": 2**70}, image=block)
        res = DwellResult(Target(0, 0, 0.5, 0.5, 1, 0))
        blocks = list(service.parked_blocks(res, 5000))
        assert [len(b) for b in blocks] == [8] and res.reason == "controller_ended"
    feed.close()


# the pieces ----------------------------------------------------------------------------------------------------
def test_pixel_size_bounds():
    lo, hi = PIXEL_SIZE_A
    assert (lo, hi) == (0.001, 100.0)
    assert check_pixel_size(None) is None and check_pixel_size(lo) == lo and check_pixel_size(hi) == hi
    for bad in (0.0, lo / 2, hi * 1.01, math.inf, -1.0, "0.15", True, [0.15], 10**400):
        with pytest.raises(FrameError):
            check_pixel_size(bad)
    with pytest.raises(FrameError, match="period_px"):
        FrameMeta.of(COUNTS, PX, MOS2, period_px=-3.0)


def test_scan_frame_checks():
    assert check_scan(SCAN, SHAPE, PX).frame_id == 1
    assert check_scan(SCAN, SHAPE, None).pixel_size_A == pytest.approx(PX)
    for bad in ({**SCAN, "fov_nm": [0, 1]}, {**SCAN, "frame_id": -1}, {"shape": [96, 96]}, None, [1, 2]):
        with pytest.raises(FrameError):
            check_scan(bad, SHAPE, PX)


class Spy(StageBase):
    """A stage that records whether it was asked to prepare (to allocate)."""

    name = "spy"

    def __init__(self):
        self.prepared = 0

    def prepare(self, meta):
        self.prepared += 1

    def process(self, ctx):
        pass


def test_the_path_refuses_a_series_over_its_budget_before_any_stage_allocates():
    spy = Spy()
    path = FramePath([spy], MOS2, memory_budget_bytes=64 * 96 * 96 + 10_000)
    path.run(COUNTS, PX)
    assert spy.prepared == 1
    big = np.zeros((200, 200), np.uint16)
    with pytest.raises(FrameError, match="over the budget"):
        path.run(big, PX)
    assert spy.prepared == 1  # never asked to allocate for it
    with pytest.raises(FrameError, match="per side"):
        path.check_budget(FrameMeta((1, 2**17), np.dtype(np.uint16), PX, MOS2))
    # a scale that implies a huge smoothing kernel (the finder's sigma from a tiny pixel size) is refused too
    real = frame_path("classical", "MoS2")
    assert real.buffer_bytes(FrameMeta(SHAPE, np.dtype(np.uint16), PX, MOS2)) < 2**20
    from beamloop.edge.stages.find import FinderConfig

    fixed = frame_path("classical", "MoS2", config=FinderConfig.for_spacing(1e9))
    with pytest.raises(FrameError, match="over the budget"):
        fixed.run(COUNTS, None)
