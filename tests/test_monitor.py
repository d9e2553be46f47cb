"""The live view and the metrics (edge/monitor, edge/frame/latency.py): the bounded latency recorder and its
fixed-bucket histograms, the board the service publishes to, /metrics while frames flow, the token rule, the
stop button blanking the beam through the bridge, and the page in a real (headless) browser."""

import io
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import zmq

from beamloop.edge.frame.latency import (
    LINEAR,
    N_BUCKETS,
    LatencyRecorder,
    bucket_edges,
    bucket_of,
    histogram_quantile,
)
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.path import frame_path
from beamloop.edge.service import EdgeService, Interrupted
from beamloop.edge.sim.frames import mos2_frame
from beamloop.edge.stages.policy import Target
from beamloop.streams.native import protocol
from beamloop.streams.native.receiver import FrameReceiver

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from beamloop.edge.app import start_monitor  # noqa: E402
from beamloop.edge.monitor.auth import (  # noqa: E402
    MonitorAuthError,
    parse_http,
    token_from_key_file,
    token_from_secret,
)
from beamloop.edge.monitor.board import MonitorBoard  # noqa: E402
from beamloop.edge.monitor.metrics import registry_of, render  # noqa: E402
from beamloop.edge.monitor.web import MonitorServer, png_of, serve_live_images  # noqa: E402

SHAPE = (128, 128)
PX = 0.15
COUNTS = mos2_frame(shape=SHAPE, pixel_size_A=PX, dose_e_per_A2=1e5, seed=3).counts.astype(np.uint16)


class Clock:
    """A hand-moved monotonic clock, seconds."""

    def __init__(self, t: float = 10.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Feed:
    """A PUSH socket sending simulated MoS2 scan frames (native stream) to a service's receiver."""

    def __init__(self):
        self.push = zmq.Context.instance().socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.bind("tcp://127.0.0.1:*")
        self.endpoint = self.push.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sid = 0

    def frames(self, n, frame_id=7, image=COUNTS):
        self.sid += 1
        scan = ScanFrame(frame_id, image.shape, (image.shape[0] * PX / 10, image.shape[1] * PX / 10)).as_dict()
        s = protocol.new_series(self.sid, ["haadf"], image.shape, image.dtype, number_of_images=n,
                                user_data={"kind": "frame", "scan": scan, "pixel_size_A": PX})
        self.push.send(protocol.encode_start(s))
        for k in range(n):
            head = protocol.encode_image_header(s, k, [("raw", image.nbytes)],
                                                user_data={"sent_ns": time.monotonic_ns()})
            self.push.send_multipart([head, protocol.encode_blob(image, "raw")])

    def close(self):
        self.push.close()


@pytest.fixture
def fed():
    """A service (classical MoS2 path, no bridge) on a :class:`Feed`."""
    feed = Feed()
    with FrameReceiver(feed.endpoint) as rx:
        service = EdgeService(rx, frame_path("classical", "MoS2"), None)
        assert feed.push.poll(10_000, zmq.POLLOUT)
        yield feed, service
    feed.close()


def get(url, token=None, method="GET"):
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


# latency recorder ------------------------------------------------------------------------------------------------
def test_buckets_cover_every_duration_once():
    edges = bucket_edges()
    assert len(edges) == N_BUCKETS + 1 and np.all(np.diff(edges) > 0)
    values = np.unique(np.concatenate([np.arange(0, 5000), (2.0 ** np.arange(4, 41)).astype(np.int64),
                                       (2.0 ** np.arange(4, 41)).astype(np.int64) - 1,
                                       np.random.default_rng(0).integers(0, 1 << 40, 5000)]))
    for ns in values.tolist():
        b = bucket_of(ns)
        assert edges[b] <= ns < edges[b + 1], (ns, b)
    widths = np.diff(edges)[LINEAR:-1]
    assert np.all(widths <= edges[LINEAR:-2] / 8)  # within 1/8 of the value: 8 buckets per octave
    assert bucket_of(-5) == 0 and bucket_of(1 << 50) == N_BUCKETS - 1


def test_recorder_summary_is_unchanged_below_the_window():
    rng = np.random.default_rng(1)
    v = rng.lognormal(11, 0.6, 5000).astype(np.int64)
    rec = LatencyRecorder(("find",), capacity=16)
    for x in v.tolist():
        rec.add("find", x)
    s = rec.summary()["find"]
    u = v / 1e3
    p50, p99, p999 = np.percentile(u, [50, 99, 99.9])
    assert s == {"n": 5000, "p50_us": float(p50), "p99_us": float(p99), "p999_us": float(p999),
                 "max_us": float(u.max()), "mean_us": float(u.mean()), "jitter_us": float(u.std())}
    assert np.array_equal(rec.samples("find"), v)
    assert rec.histogram("find").sum() == 5000


def test_recorder_is_bounded_and_keeps_the_newest():
    rec = LatencyRecorder(("a",), capacity=8, window=100)
    for x in range(1000):
        rec.add("a", x)
    assert np.array_equal(rec.samples("a"), np.arange(900, 1000))
    assert rec.count("a") == 1000 and rec.totals("a") == (1000, sum(range(1000)), 999)
    assert np.array_equal(rec.since("a", 990), np.arange(990, 1000))
    assert np.array_equal(rec.since("a", 0), np.arange(900, 1000))  # only what is held
    s = rec.summary()["a"]
    assert s["n"] == 1000 and s["max_us"] == 0.999 and s["mean_us"] == pytest.approx(0.4995)
    assert s["p50_us"] == pytest.approx(np.percentile(np.arange(900, 1000), 50) / 1e3)
    assert rec.histogram("a").sum() == 1000
    rec.add("new", 5)  # an unknown stage is added
    assert rec.stages == ("a", "new") and rec.count("new") == 1


def test_histogram_quantile_is_within_a_bucket():
    rng = np.random.default_rng(2)
    v = rng.lognormal(12, 1.0, 20000).astype(np.int64)
    rec = LatencyRecorder(("x",))
    for x in v.tolist():
        rec.add("x", x)
    h = rec.histogram("x")
    for q in (0.5, 0.9, 0.99):
        exact = np.quantile(v, q)
        assert abs(histogram_quantile(h, q) - exact) <= exact / 8
    assert np.isnan(histogram_quantile(np.zeros(N_BUCKETS, np.int64), 0.5))
    with pytest.raises(ValueError, match="quantile"):
        histogram_quantile(h, 1.5)


# board --------------------------------------------------------------------------------------------------------
class Ctx:
    """The parts of a FrameContext the board reads."""

    def __init__(self, columns, targets=(), extras=None):
        self.columns, self.targets, self.extras, self.meta = columns, list(targets), extras or {}, None


def test_board_copies_frames_at_its_rate_only(fed):
    feed, service = fed
    feed.frames(1)
    _, ctx, scan = service.next_frame(10_000)
    clock = Clock()
    board = MonitorBoard(min_interval_s=0.2, clock=clock)
    img = COUNTS.copy()
    assert board.publish_frame(img, ctx, scan, 0)
    buf = board._image
    img[:] = 0  # the caller reuses its buffer: the board kept its own copy
    clock.t += 0.1
    assert not board.publish_frame(img, ctx, scan, 1)  # not due
    clock.t += 0.15
    assert board.publish_frame(COUNTS, ctx, scan, 2)
    assert board._image is buf  # no allocation per frame
    assert board.frames == 3 and board.frames_copied == 2 and board.seq == 2
    fv = board.frame_copy()
    assert fv.image_id == 2 and fv.frame_id == 7 and np.array_equal(fv.image, COUNTS)
    assert len(fv.x_px) == len(ctx.columns) > 50 and fv.class_names == ("Mo", "S2", "S1", "vacancy")
    st = board.state()
    assert st["frame"]["n_columns"] == len(ctx.columns) and st["counters"]["frames"] == 3
    json.dumps(st, allow_nan=False)


def test_board_trace_and_dwells():
    board = MonitorBoard(trace_samples=10, clock=Clock())
    t = Target(3.0, 4.0, 0.1, 0.2, 5, 0)
    board.dwell_started(t, 0.1, 0.2)
    board.dwell_block(np.arange(6, dtype=np.uint16))
    board.dwell_block(np.arange(6, 12, dtype=np.uint16), decision=8)
    samples, decision = board.trace()
    assert np.array_equal(samples, np.arange(2, 12)) and samples[decision] == 8
    board.dwell_started(t, 0.1, 0.2)  # the next dwell: the view shows its samples only
    board.dwell_block(np.array([100, 101, 102], np.uint16))
    samples, decision = board.trace()
    assert np.array_equal(samples, [100, 101, 102]) and decision == -1
    board.dwell_block(np.arange(200, 209, dtype=np.uint16), decision=1)  # wraps the ring of 10
    samples, decision = board.trace()
    assert np.array_equal(samples, [102, *range(200, 209)]) and decision == -1  # its decision sample is gone

    class Res:
        target, reason, trigger_at, trigger_sample, samples = t, "trigger", "service", 8, 12

    board.dwell_ended(Res)
    st = board.state()
    assert st["probe"]["active"] is False and st["probe"]["x_px"] == 3.0
    assert st["dwells"][-1]["reason"] == "trigger" and st["counters"]["triggers"] == 1
    assert not board.stop_requested and board.interrupt() == 0
    board.request_stop()
    assert board.interrupt() == signal.SIGINT


def test_board_refuses_bad_settings():
    with pytest.raises(ValueError, match="min_interval_s"):
        MonitorBoard(min_interval_s=float("nan"))
    with pytest.raises(ValueError, match="trace_samples"):
        MonitorBoard(trace_samples=0)


# metrics ------------------------------------------------------------------------------------------------------
def test_metrics_histogram_counts_known_samples():
    rec = LatencyRecorder(("find",))
    for ns in (1500, 3000, 3000, 5000, 1 << 20):
        rec.add("find", ns)
    board = MonitorBoard(latency=rec, counters=lambda: {"rejected": 4, "not_a_counter": 9})
    fams = {f.name: f for f in text_string_to_metric_families(render(registry_of(board)).decode())}
    assert fams["beamloop_rejected"].samples[0].value == 4 and "beamloop_not_a_counter" not in fams
    h = {(s.name, s.labels.get("le")): s.value for s in fams["beamloop_stage_latency_seconds"].samples
         if s.labels["stage"] == "find"}
    assert h[("beamloop_stage_latency_seconds_bucket", "1.024e-06")] == 0
    assert h[("beamloop_stage_latency_seconds_bucket", "2.048e-06")] == 1
    assert h[("beamloop_stage_latency_seconds_bucket", "4.096e-06")] == 3
    assert h[("beamloop_stage_latency_seconds_bucket", "8.192e-06")] == 4
    assert h[("beamloop_stage_latency_seconds_bucket", "0.001048576")] == 4  # below 2**20 ns, not at it
    assert h[("beamloop_stage_latency_seconds_bucket", "0.002097152")] == 5
    assert h[("beamloop_stage_latency_seconds_bucket", "+Inf")] == 5
    assert h[("beamloop_stage_latency_seconds_count", None)] == 5
    assert h[("beamloop_stage_latency_seconds_sum", None)] == pytest.approx((12500 + (1 << 20)) / 1e9)


def scrape(url):
    """``curl URL`` (urllib where curl is missing): the body."""
    if shutil.which("curl"):
        return subprocess.run(["curl", "-sf", url], capture_output=True, check=True, timeout=60).stdout
    return get(url)[2]


def frames_total(body: bytes) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return fams["beamloop_frames"].samples[0].value


def test_metrics_endpoint_counts_frames_while_they_flow(fed):
    feed, service = fed
    server = start_monitor(service, ("127.0.0.1", 0), min_interval_s=0.0)
    try:
        feed.frames(3)
        for _ in range(3):
            assert service.next_frame(10_000) is not None
        first = frames_total(scrape(server.url + "metrics"))
        feed.frames(4, frame_id=8)
        done = threading.Event()

        def work():
            for _ in range(4):
                service.next_frame(10_000)
            done.set()

        th = threading.Thread(target=work)
        th.start()
        th.join(60)
        assert done.is_set()
        body = scrape(server.url + "metrics")
        assert first == 3 and frames_total(body) == 7
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
        counts = {s.labels["stage"]: s.value for s in fams["beamloop_stage_latency_seconds"].samples
                  if s.name.endswith("_count")}
        assert counts["find"] == 7 and counts["decode"] == 7
        assert fams["beamloop_frames_received"].samples[0].value == 7
        status, ctype, png = get(server.url + "api/frame.png")
        assert status == 200 and ctype == "image/png"
        from PIL import Image

        assert Image.open(io.BytesIO(png)).size == (SHAPE[1], SHAPE[0])
        st = json.loads(get(server.url + "api/state")[2])
        assert st["frame"]["frame_id"] == 8 and st["counters"]["frames"] == 7 and "find" in st["latency"]
    finally:
        server.stop()


def test_live_images_are_served():
    from beamloop.edge.analysis import live4d

    imager = live4d.LiveImager((4, 5), {"bf": live4d.disk_mask((8, 8), 2.0)})
    frames = np.random.default_rng(3).poisson(5, (10, 8, 8)).astype(np.uint16)
    imager.update(frames, np.arange(10))
    server = serve_live_images(("127.0.0.1", 0), lambda: imager.images, lambda: {"frames_received": 10})
    try:
        st = json.loads(get(server.url + "api/state")[2])
        assert st["images"]["bf"] == [4, 5]
        from PIL import Image

        im = np.asarray(Image.open(io.BytesIO(get(server.url + "api/image/bf")[2])))
        assert im.shape == (4, 5) and (im[2:] == 0).all() and im[:2].max() == 255  # rows not scanned: black
        bf = imager.images["bf"]
        assert np.argmax(im[:2]) == np.nanargmax(bf[:2]) and np.argmin(im[:2]) == np.nanargmin(bf[:2])
        with pytest.raises(urllib.error.HTTPError) as e:
            get(server.url + "api/image/nope")
        assert e.value.code == 404
        assert st["counters"]["frames_received"] == 10 and st["frame"] is None
    finally:
        server.stop()


def test_png_contrast_round_trip():
    from PIL import Image

    a = np.linspace(0, 1000, 200, dtype=np.float32).reshape(10, 20)
    a[0, 0] = np.nan
    g = np.asarray(Image.open(io.BytesIO(png_of(a, 0, 100))))
    assert g.dtype == np.uint8 and g.shape == (10, 20) and g[0, 0] == 0 and g[-1, -1] == 255
    assert np.all(np.diff(g.ravel()[1:].astype(int)) >= 0)
    with pytest.raises(ValueError, match="2-D"):
        png_of(np.zeros(5))


# authentication ----------------------------------------------------------------------------------------------
def test_token_rule():
    with pytest.raises(MonitorAuthError, match="beyond loopback"):
        MonitorServer(MonitorBoard(), "0.0.0.0", 0)
    with MonitorServer(MonitorBoard(), "127.0.0.1", 0, token="s3cret") as server:
        base = server.url.split("?")[0]
        for path in ("", "api/state", "metrics"):
            with pytest.raises(urllib.error.HTTPError) as e:
                get(base + path)
            assert e.value.code == 401
            with pytest.raises(urllib.error.HTTPError):
                get(base + path, token="wrong")
            assert get(base + path, token="s3cret")[0] == 200
        assert get(server.url)[0] == 200  # ?token= in the page's own address


def test_token_from_key_files(tmp_path):
    from beamloop.edge.control.keys import ClientKeys, create_key_pair

    _, sec_a = create_key_pair(tmp_path, "a")
    pub_b, sec_b = create_key_pair(tmp_path, "b")
    keys = ClientKeys.load(sec_a, pub_b)
    t = token_from_key_file(sec_a)
    assert t == token_from_secret(keys.secret) and len(t) == 32 and int(t, 16) >= 0
    assert t != token_from_key_file(sec_b)
    with pytest.raises(ValueError, match="no secret key"):
        token_from_key_file(pub_b)
    with pytest.raises(ValueError, match="no secret key"):
        token_from_secret(b"")


def test_parse_http():
    assert parse_http("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:", "host:99999", ":80", "h:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_http(bad)


def test_cli_refuses_a_public_view_without_keys(capsys):
    from beamloop.edge.cli import EXIT_USAGE, main

    assert main(["serve", "--http", "0.0.0.0:0", "--max-frames", "0"]) == EXIT_USAGE
    assert "beyond loopback" in capsys.readouterr().err
    assert main(["run", "--http", "192.0.2.1:8080"]) == EXIT_USAGE


# the stop button ----------------------------------------------------------------------------------------------
MICROSCOPE = {"seed": 9, "max_park_s": 3.0}


def test_stop_button_blanks_the_beam(microscope):
    from beamloop.edge.control.client import BridgeClient

    rx = FrameReceiver(microscope.frames_endpoint)
    bridge = BridgeClient(microscope.control_endpoint, timeout_ms=5000)
    service = EdgeService(rx, frame_path("classical", "MoS2"), bridge)
    server = start_monitor(service, ("127.0.0.1", 0))
    try:
        scan = bridge.acquire_frame((64, 64), (1.0, 1.0), 5.0)
        bridge.set_probe(0.5, 0.5, scan.frame_id)
        bridge.blank(False)
        assert bridge.get_state()["blanked"] is False  # the beam is on
        status, _, body = get(server.url + "api/stop", method="POST")
        reply = json.loads(body)
        assert status == 200 and reply["stopped"] is True and reply["blanked"] is True
        assert bridge.get_state()["blanked"] is True  # blanked at the controller, before the service noticed
        with pytest.raises(Interrupted) as e:
            service.check_interrupt()
        assert e.value.signum == signal.SIGINT
        st = json.loads(get(server.url + "api/state")[2])
        assert st["stopped"] is True and st["controller"]["blanked"] is True
    finally:
        server.stop()
        bridge.close()
        rx.close()


def test_service_publishes_its_dwells(microscope):
    from beamloop.edge.control.client import BridgeClient

    rx = FrameReceiver(microscope.frames_endpoint)
    bridge = BridgeClient(microscope.control_endpoint, timeout_ms=5000)
    service = EdgeService(rx, frame_path("classical", "MoS2"), bridge, trigger_at="service")
    board = MonitorBoard(min_interval_s=0.0, trace_samples=1 << 16)
    service.monitor = board
    try:
        scan = bridge.acquire_frame((64, 64), (1.0, 1.0), 5.0)
        _, ctx, got_scan = service.next_frame(10_000)
        assert board.frames == 1 and board.frame_copy().frame_id == scan.frame_id == got_scan.frame_id
        res = service.dwell(Target(32.0, 20.0, 0.5, 20.5 / 64, scan.frame_id, 0), max_dwell_s=0.3)
        assert res.reason in ("trigger", "max_dwell") and res.samples > 0
        st = board.state()
        assert st["dwells"][-1]["reason"] == res.reason and st["dwells"][-1]["samples"] == res.samples
        assert st["probe"] == {"x_px": 32.0, "y_px": 20.0, "fx": 0.5, "fy": 20.5 / 64, "frame_id": scan.frame_id,
                               "active": False}
        samples, decision = board.trace()
        assert len(samples) == res.samples  # every parked-probe sample the trigger saw
        assert decision == (res.trigger_sample if res.reason == "trigger" else -1)
    finally:
        bridge.close()
        rx.close()


# the page in a real browser -----------------------------------------------------------------------------------
def test_page_in_headless_chromium(fed, tmp_path):
    from beamloop.edge.monitor.browser import HeadlessChromium, find_chromium

    if find_chromium() is None:
        pytest.skip("no chromium binary on PATH (make system-deps installs it with apt-get)")
    feed, service = fed
    server = start_monitor(service, ("127.0.0.1", 0), min_interval_s=0.0)
    try:
        feed.frames(2, frame_id=11)
        for _ in range(2):
            _, ctx, _ = service.next_frame(10_000)
        cols = ctx.columns
        with HeadlessChromium(window=(1280, 1000)) as browser:
            browser.goto(server.url)
            assert browser.wait_for("window.beamloop && window.beamloop.drawnSeq", timeout_s=60) == 2
            assert browser.evaluate("document.getElementById('frame-id').textContent") == "11"
            assert browser.evaluate("document.getElementById('n-columns').textContent") == str(len(cols))
            assert browser.evaluate("document.getElementById('counter-frames').textContent") == "2"
            assert browser.evaluate("window.beamloop.errors") == 0
            # the first Mo column is painted in the Mo colour (#42a5f5) on the canvas
            i = int(np.flatnonzero(cols.cls == cols.class_names.index("Mo"))[0])
            k = 512 / SHAPE[1]
            rgb = browser.evaluate(f"Array.from(document.getElementById('view').getContext('2d').getImageData("
                                   f"{int((cols.x[i] + 0.5) * k)}, {int((cols.y[i] + 0.5) * k)}, 1, 1).data)")
            assert rgb[:3] == [0x42, 0xA5, 0xF5]
            assert "find" in browser.evaluate("document.getElementById('latency').textContent")
            shot = browser.screenshot(tmp_path / "view.png")
        from PIL import Image

        assert Image.open(shot).size == (1280, 1000)
    finally:
        server.stop()
