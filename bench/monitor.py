"""The live view's cost on the frame path: p50/p99 per frame with and without the page open.

The service (classical MoS2 path, 256 x 256 frames at 0.15 A, 1e5 e-/A^2, the main job's defaults) takes
frames from a native-protocol stream (queued ahead of each block, so the time measured is decode + frame path
+ publication, not waiting) under four conditions, interleaved block by block so that the shared machine's
load falls on all of them alike:

- ``off``: no monitor (``service.monitor`` None), as before the live view existed;
- ``board``: ``--http`` on (:func:`beamloop.edge.app.start_monitor`): the board copies a frame at most every
  0.2 s, the server runs, no client;
- ``page``: the page open in headless Chromium (:class:`beamloop.edge.monitor.browser.HeadlessChromium`),
  polling the state at 4 Hz and loading each new frame's PNG, as an operator's browser does;
- ``scrape``: the page open and ``/metrics`` scraped 10 times a second by a second process (``curl``).

Per frame: the wall time of :meth:`beamloop.edge.service.EdgeService.next_frame` (perf_counter_ns). Also: the
cost of one :meth:`~beamloop.edge.monitor.board.MonitorBoard.publish_frame` (copying and not), and of one
:meth:`~beamloop.edge.frame.latency.LatencyRecorder.add`. A screenshot of the page is kept
(``monitor_view.png``), and one of the main job's page (:func:`closed_loop_view`, ``monitor_run_view.png``:
dwells, trigger decisions, the parked-probe signal). Results: ``bench/results/monitor.json``.

    python -m beamloop.bench.monitor [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (256, 256)
PIXEL_SIZE_A = 0.15
CONDITIONS = ("off", "board", "page", "scrape")
BLOCKS = {False: 8, True: 3}
"""Blocks per condition (interleaved)."""
FRAMES_PER_BLOCK = {False: 150, True: 60}


def _percentiles(ns: np.ndarray) -> dict:
    us = np.asarray(ns, np.float64) / 1e3
    if not len(us):
        return {"n": 0}
    p50, p99, p999 = np.percentile(us, [50, 99, 99.9])
    return {"n": int(len(us)), "p50_us": float(p50), "p99_us": float(p99), "p999_us": float(p999),
            "max_us": float(us.max()), "mean_us": float(us.mean())}


class _Feed:
    def __init__(self, image: np.ndarray) -> None:
        import zmq

        from beamloop.edge.frame.scanframe import ScanFrame
        from beamloop.streams.native import protocol

        self.protocol = protocol
        self.push = zmq.Context.instance().socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 100_000)
        self.push.bind("tcp://127.0.0.1:*")
        self.endpoint = self.push.getsockopt_string(zmq.LAST_ENDPOINT)
        self.image = image
        scan = ScanFrame(1, image.shape, (image.shape[0] * PIXEL_SIZE_A / 10, image.shape[1] * PIXEL_SIZE_A / 10))
        self.series = protocol.new_series(1, ["haadf"], image.shape, image.dtype, number_of_images=1 << 30,
                                          user_data={"kind": "frame", "scan": scan.as_dict(),
                                                     "pixel_size_A": PIXEL_SIZE_A})
        self.k = 0
        self.blob = protocol.encode_blob(image, "raw")

    def start(self) -> None:
        """Send the series start once the receiver is connected (a PUSH socket blocks without a peer)."""
        import zmq

        if not self.push.poll(30_000, zmq.POLLOUT):
            raise RuntimeError("the benchmark's receiver did not connect")
        self.push.send(self.protocol.encode_start(self.series))

    def send(self, n: int) -> None:
        p = self.protocol
        for _ in range(n):
            head = p.encode_image_header(self.series, self.k, [("raw", self.image.nbytes)],
                                         user_data={"sent_ns": time.monotonic_ns()})
            self.push.send_multipart([head, self.blob])
            self.k += 1

    def close(self) -> None:
        self.push.close()


def _micro() -> dict:
    """Cost of one publish_frame (due and not due) and one LatencyRecorder.add, ns (median of repeats)."""
    from beamloop.edge.frame.columns import ColumnTable
    from beamloop.edge.frame.latency import LatencyRecorder
    from beamloop.edge.monitor.board import MonitorBoard

    class Ctx:
        columns = ColumnTable.empty(("Mo", "S2", "S1", "vacancy"))
        targets: list = []
        extras: dict = {}
        meta = None

    img = np.zeros(SHAPE, np.uint16)
    out = {}
    for label, interval in (("publish_frame_copy_ns", 0.0), ("publish_frame_not_due_ns", 1e9)):
        board = MonitorBoard(min_interval_s=interval)
        board.publish_frame(img, Ctx)
        n = 2000
        t0 = time.perf_counter_ns()
        for _ in range(n):
            board.publish_frame(img, Ctx)
        out[label] = (time.perf_counter_ns() - t0) / n
    rec = LatencyRecorder(("a",))
    n = 200_000
    t0 = time.perf_counter_ns()
    for i in range(n):
        rec.add("a", 1000 + i)
    out["latency_add_ns"] = (time.perf_counter_ns() - t0) / n
    return out


def _scraper(url: str, hz: float) -> subprocess.Popen:
    """A child process fetching ``url`` ``hz`` times a second (curl in a shell loop, or Python's urllib)."""
    period = 1.0 / hz
    if shutil.which("curl"):
        cmd = ["sh", "-c", f"while :; do curl -s -o /dev/null '{url}'; sleep {period}; done"]
    else:
        cmd = [sys.executable, "-c", f"import time,urllib.request as u\nwhile 1:\n u.urlopen({url!r}).read()\n"
               f" time.sleep({period!r})"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def run(quick: bool = False, out: Path = RESULTS) -> dict:
    """Measure (module docstring) and write ``out/monitor.json`` and ``out/monitor_view.png``; returns the
    results.

    Raises
    ------
    RuntimeError
        A frame did not arrive, or the page did not show one.
    """
    import signal

    from beamloop.edge.app import start_monitor, warm_up
    from beamloop.edge.monitor.browser import HeadlessChromium, find_chromium, version
    from beamloop.edge.path import frame_path
    from beamloop.edge.service import EdgeService
    from beamloop.edge.sim.frames import mos2_frame
    from beamloop.streams.native.receiver import FrameReceiver

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image = mos2_frame(shape=SHAPE, pixel_size_A=PIXEL_SIZE_A, dose_e_per_A2=1e5, seed=5).counts.astype(np.uint16)
    blocks, per = BLOCKS[quick], FRAMES_PER_BLOCK[quick]
    times: dict[str, list[int]] = {c: [] for c in CONDITIONS}
    per_block: dict[str, list[dict]] = {c: [] for c in CONDITIONS}
    have_browser = find_chromium() is not None
    conditions = CONDITIONS if have_browser else ("off", "board")
    feed = _Feed(image)
    browser = scraper = None
    snapshots = {}
    try:
        with FrameReceiver(feed.endpoint) as rx:
            service = EdgeService(rx, frame_path("classical", "MoS2"), None)
            warm_up(service.path, None, shape=SHAPE, pixel_size_A=PIXEL_SIZE_A, dtypes=(np.uint16,))
            feed.start()
            feed.send(5)
            for _ in range(5):
                if service.next_frame(10_000) is None:
                    raise RuntimeError("no frame arrived from the benchmark's own stream")
            server = start_monitor(service, ("127.0.0.1", 0))
            board = service.monitor
            if have_browser:
                browser = HeadlessChromium(window=(1280, 1000))
            try:
                for b in range(blocks):
                    for cond in conditions[b % len(conditions):] + conditions[:b % len(conditions)]:
                        service.monitor = None if cond == "off" else board
                        if browser is not None:
                            browser.goto(server.url if cond in ("page", "scrape") else "about:blank")
                        if cond == "scrape":
                            scraper = _scraper(server.url + "metrics", 10.0)
                        feed.send(per)
                        time.sleep(0.3)  # the page loads; the frames are queued
                        block = np.empty(per, np.int64)
                        for i in range(per):
                            t0 = time.perf_counter_ns()
                            got = service.next_frame(10_000)
                            block[i] = time.perf_counter_ns() - t0
                            if got is None:
                                raise RuntimeError("a frame did not arrive")
                        times[cond].extend(block.tolist())
                        per_block[cond].append(_percentiles(block))
                        per_block[cond][-1]["load_1min"] = os.getloadavg()[0]
                        if scraper is not None:
                            os.killpg(scraper.pid, signal.SIGTERM)
                            scraper.wait(10)
                            scraper = None
                snapshots = {"server_snapshots": server.snapshots, "server_requests": server.requests,
                             "frames_copied": board.frames_copied, "frames_published": board.frames}
                if browser is not None:
                    service.monitor = board
                    browser.goto(server.url)
                    feed.send(3)
                    for _ in range(3):
                        service.next_frame(10_000)
                    browser.wait_for(f"window.beamloop && window.beamloop.drawnSeq >= {board.seq}", timeout_s=60)
                    browser.screenshot(out / "monitor_view.png")
            finally:
                if scraper is not None:
                    os.killpg(scraper.pid, signal.SIGTERM)
                if browser is not None:
                    browser.close()
                server.stop()
    finally:
        feed.close()
    res = {"config": {"shape": list(SHAPE), "pixel_size_A": PIXEL_SIZE_A, "dose_e_per_A2": 1e5, "path": "classical",
                      "blocks": blocks, "frames_per_block": per, "conditions": list(conditions),
                      "view_min_interval_s": 0.2, "page_poll_hz": 4, "scrape_hz": 10.0,
                      "browser": version() if have_browser else None, "quick": quick},
           "machine": {"cpus": os.cpu_count(), "load_average": list(os.getloadavg())},
           "next_frame": {c: _percentiles(np.asarray(times[c])) for c in conditions},
           "blocks": {c: per_block[c] for c in conditions},
           "median_of_blocks": {c: {k: float(np.median([b[k] for b in per_block[c]])) for k in ("p50_us", "p99_us")}
                                for c in conditions},
           "server": snapshots, "micro": _micro()}
    base = res["next_frame"]["off"]
    res["ratio_to_off"] = {c: {"p50": res["next_frame"][c]["p50_us"] / base["p50_us"],
                               "p99": res["next_frame"][c]["p99_us"] / base["p99_us"]} for c in conditions}
    mb = res["median_of_blocks"]
    res["block_ratio_to_off"] = {c: {k: mb[c][k] / mb["off"][k] for k in ("p50_us", "p99_us")} for c in conditions}
    res["files"] = ["monitor.json"] + (["monitor_view.png"] if have_browser else [])
    if have_browser:
        res["closed_loop_view"] = closed_loop_view(out)
        res["files"] += res["closed_loop_view"]["files"]
    (out / "monitor.json").write_text(json.dumps(res, indent=1))
    return res


def bench_summary_md(res: dict) -> str:
    """One paragraph for ``summary.md``: the frame path's p50/p99 per condition."""
    nf = res["next_frame"]
    parts = [f"{c} p50 {nf[c]['p50_us'] / 1e3:.2f} ms / p99 {nf[c]['p99_us'] / 1e3:.2f} ms" for c in nf]
    m = res["micro"]
    mb = res["median_of_blocks"]
    blocks = "; ".join(f"{c} {mb[c]['p50_us'] / 1e3:.2f} / {mb[c]['p99_us'] / 1e3:.2f} ms" for c in mb)
    return (f"live view (`--http`), frame path (next_frame, {res['config']['shape'][0]}x{res['config']['shape'][1]} "
            f"classical, {nf['off']['n']} frames per condition, load average {res['machine']['load_average'][0]:.1f} "
            f"on {res['machine']['cpus']} cores): " + "; ".join(parts)
            + f"; median over blocks of {res['config']['frames_per_block']} frames, p50 / p99: " + blocks
            + f". publish_frame {m['publish_frame_copy_ns'] / 1e3:.1f} us when it copies, "
              f"{m['publish_frame_not_due_ns'] / 1e3:.2f} us otherwise; LatencyRecorder.add "
              f"{m['latency_add_ns'] / 1e3:.2f} us")



def closed_loop_view(out: Path = RESULTS, rounds: int = 3, targets: int = 3) -> dict:
    """The main job (:func:`beamloop.edge.experiments.closed_loop.run`, 192 x 192 frames) with ``--http`` on, the
    page open in headless Chromium: a screenshot (``monitor_run_view.png``) once dwells show, and ``/metrics``
    scraped at the end. Returns the page's counters, the dwells it showed and the run's outcome.

    Raises
    ------
    RuntimeError
        No Chromium, or the page never showed a dwell.
    """
    import socket
    import threading

    from beamloop.edge.experiments import closed_loop
    from beamloop.edge.monitor.browser import HeadlessChromium, find_chromium

    if find_chromium() is None:
        raise RuntimeError("no chromium binary")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    report: dict = {}
    runner = threading.Thread(target=lambda: report.update(closed_loop.run(
        Path(out) / "monitor_run", rounds=rounds, shape=(192, 192), targets_per_frame=targets, quiet=True,
        http=("127.0.0.1", port))), daemon=True)
    runner.start()
    url = f"http://127.0.0.1:{port}/"
    shown: dict = {}
    with HeadlessChromium(window=(1280, 1000)) as browser:
        import urllib.request

        t_end = time.monotonic() + 300
        while time.monotonic() < t_end and runner.is_alive():
            try:
                urllib.request.urlopen(url + "api/state", timeout=5).read()
                break
            except OSError:  # the server is not up yet
                time.sleep(0.3)
        browser.goto(url)
        browser.wait_for("window.beamloop && window.beamloop.state && window.beamloop.state.dwells.length >= "
                         f"{targets + 1} && window.beamloop.drawnSeq > 1", timeout_s=300)
        browser.screenshot(Path(out) / "monitor_run_view.png")
        shown = browser.evaluate("({counters: window.beamloop.state.counters, dwells: window.beamloop.state.dwells"
                                 ".map(d => d.reason), frame: window.beamloop.state.frame.frame_id})")
    runner.join(600)
    import shutil as _sh

    _sh.rmtree(Path(out) / "monitor_run", ignore_errors=True)
    return {"page": shown, "outcome": report.get("outcome"), "files": ["monitor_run_view.png"]}


if __name__ == "__main__":
    r = run(quick="--quick" in sys.argv[1:])
    print(bench_summary_md(r))
