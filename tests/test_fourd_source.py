"""Scan frames assembled from a 4D-STEM stream (edge/fourd_source.py) and run through the service's frame path."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from beamloop.edge.app import ServiceConfig, build_path, build_service
from beamloop.edge.fanout_worker import HAADF_GEOMETRY, DetectorGeometry, FourDReducer
from beamloop.edge.fourd_source import STAGES_4D, FourDFrameSource
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.service import latency_keys
from beamloop.edge.sim import lattice
from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope
from beamloop.streams.dectris.series import ChannelStack, DetectorSeries, FrameStack, SeriesEnd, SeriesStart

DET = 16
FRAMES_GROUP = "frames"  # the run file's group of frames (edge/io/runlog.py)


class ListReceiver:
    """A receiver that replays events (SeriesStart, FrameStack, SeriesEnd), then times out."""

    def __init__(self, events) -> None:
        self.events = list(events)
        self.counters = None
        self.endpoint = "list://"
        self.closed = False

    def recv(self, timeout_ms=None):
        return self.events.pop(0) if self.events else None

    def close(self) -> None:
        self.closed = True


def stream_events(patterns: np.ndarray, ids: np.ndarray | None = None, stack: int = 50, config: dict | None = None):
    ids = np.arange(len(patterns)) if ids is None else np.asarray(ids)
    s = DetectorSeries("simplon1", 3, "simplon1-3", ("data",), patterns.shape[1:], patterns.dtype, len(ids),
                       1e-4, 1e-4, config or {})
    out = [SeriesStart(s, 0)]
    for a in range(0, len(ids), stack):
        sel = slice(a, a + stack)
        ch = ChannelStack(patterns[sel], np.empty(0, np.uint8), None, None, None)
        out.append(FrameStack(s, ids[sel].astype(np.int64), np.zeros((len(ids[sel]), 3), np.int64), {"data": ch},
                              time.monotonic_ns(), time.monotonic_ns()))
    out.append(SeriesEnd(s, len(ids), 0, 0))
    return out


@pytest.fixture(scope="module")
def mos2_scan():
    """A 4D scan of MoS2 (48 x 48 probe positions, 0.3 A apart, 16 x 16 detector) and its specimen."""
    rng = np.random.default_rng(1)
    spec = lattice.mos2((-20, 20, -20, 20))
    cfg = FourDConfig(detector_shape=(DET, DET), disk_radius_px=DET / 6, df_width_px=DET / 4)
    scan = ScanFrame(40, (48, 48), (1.44, 1.44))
    return spec, scan, FourDMicroscope(spec, cfg).scan(scan, 3000.0, rng).reshape(-1, DET, DET)


def test_adf_image_is_the_virtual_detector_of_each_probe_position(mos2_scan):
    _, scan, pats = mos2_scan
    two = np.concatenate([pats, pats[::-1]])  # two scan frames in one series
    src = FourDFrameSource(ListReceiver(stream_events(two)), scan)
    first, second = src.recv(1000), src.recv(1000)
    ref = FourDReducer(HAADF_GEOMETRY, sum_pattern=False).reduce_frames(two)[:, 1].astype(np.float32)
    assert np.array_equal(first.data["adf"], ref[:2304].reshape(48, 48))
    assert np.array_equal(second.data["adf"], ref[2304:].reshape(48, 48))
    ud = first.series.user_data
    assert ud["kind"] == "frame" and ud["pixel_size_A"] == pytest.approx(0.3) and ud["missing_positions"] == 0
    assert ud["scan"]["frame_id"] == 40 and second.series.user_data["scan"]["frame_id"] == 41
    assert first.series.series_unique_id != second.series.series_unique_id  # one scan frame per series
    assert src.recv(1000) is None and src.stats.frames == 2 and src.stats.patterns == 4608
    assert src.latency.count("reduce4d") == src.stats.stacks and src.latency.count("assemble4d") == 2


def test_missing_positions_are_filled_or_the_frame_dropped(mos2_scan):
    _, scan, pats = mos2_scan
    n = len(pats)
    keep = np.ones(2 * n, bool)
    keep[[7, 100]] = False  # 2 of 2304 lost in scan frame 0: filled (under 1 %)
    keep[n + 10:n + 300] = False  # 290 lost in scan frame 1: dropped
    ids = np.flatnonzero(keep)
    two = np.concatenate([pats, pats])[ids]
    src = FourDFrameSource(ListReceiver(stream_events(two, ids)), scan)
    ev = src.recv(1000)
    assert src.recv(1000) is None
    assert (src.stats.frames, src.stats.dropped, src.stats.filled_positions) == (1, 1, 2)
    img = ev.data["adf"].ravel()
    ref = FourDReducer(HAADF_GEOMETRY, sum_pattern=False).reduce_frames(pats)[:, 1].astype(np.float32)
    others = np.delete(np.arange(n), [7, 100])
    assert np.array_equal(img[others], ref[others])
    assert img[7] == img[100] == np.float32(ref[others].astype(np.float64).mean())
    assert ev.series.user_data["missing_positions"] == 2


def test_a_scan_stated_by_the_series_is_used(mos2_scan):
    _, scan, pats = mos2_scan
    stated = ScanFrame(900, (48, 48), (1.2, 1.2), center_nm=(0.1, 0.0), dwell_us=2.0)
    src = FourDFrameSource(ListReceiver(stream_events(pats, config={"user_data": {"scan": stated.as_dict()}})), scan)
    ev = src.recv(1000)
    assert ScanFrame.from_dict(ev.series.user_data["scan"]) == stated
    assert ev.series.user_data["pixel_size_A"] == pytest.approx(0.25)


def test_idpc_image_integrates_the_centre_of_mass(mos2_scan):
    from beamloop.edge.analysis.live4d import integrate_com

    _, scan, pats = mos2_scan
    src = FourDFrameSource(ListReceiver(stream_events(pats)), scan, signal="idpc")
    ev = src.recv(1000)
    v = FourDReducer().reduce_frames(pats)
    ref = integrate_com(v[:, 3].reshape(48, 48), v[:, 4].reshape(48, 48)).astype(np.float32)
    assert np.array_equal(ev.data["idpc"], ref)


def test_service_finds_the_columns_of_the_virtual_adf_image(mos2_scan):
    """The frame path of the service, unchanged, on the assembled image: the columns it finds lie on the
    specimen's sites, and the 4D stage latencies sit in the service's latency report."""
    spec, scan, pats = mos2_scan
    cfg = ServiceConfig("MoS2")
    lat = LatencyRecorder(latency_keys(build_path(cfg)) + STAGES_4D)
    src = FourDFrameSource(ListReceiver(stream_events(pats)), scan, latency=lat)
    service = build_service(src, cfg, latency=lat)
    ev, ctx, got_scan = service.next_frame(1000)
    assert got_scan == scan and ev.series.user_data["source"] == "4d"
    cols = ctx.columns
    fx, fy = scan.fraction_of_pixel(cols.x, cols.y)
    x, y = scan.specimen_of_fraction(fx, fy)
    from scipy.spatial import cKDTree

    d, _ = cKDTree(spec.xy).query(np.stack([x, y], 1))
    inner = (np.abs(x) < 6.0) & (np.abs(y) < 6.0)  # away from the frame edges
    assert inner.sum() >= 12  # a 12 x 12 A window of MoS2 holds about 30 columns (Mo and S2)
    assert np.median(d[inner]) < 0.3 and (d[inner] < 0.6).mean() >= 0.9
    summary = service.latency.summary()
    assert {"reduce4d", "assemble4d", "find"} <= set(summary)


def test_over_a_real_stream(mos2_scan):
    """SIMPLON v1 over ZeroMQ into the source: the same image as the reduction of the patterns sent."""
    from beamloop.streams.dectris.simplon import SimplonSender
    from beamloop.streams.receivers import open_receiver

    _, scan, pats = mos2_scan
    with SimplonSender("tcp://127.0.0.1:0") as tx, open_receiver(tx.endpoint, protocol="simplon1") as rx:
        src = FourDFrameSource(rx, scan)
        time.sleep(0.2)

        def send():
            tx.start_series((DET, DET), np.uint16, len(pats), series=1)
            for p in pats:
                tx.send_frame(p)
            tx.end_series()

        th = threading.Thread(target=send)
        th.start()
        ev = src.recv(30_000)
        th.join()
    ref = FourDReducer(HAADF_GEOMETRY, sum_pattern=False).reduce_frames(pats)[:, 1].astype(np.float32)
    assert np.array_equal(ev.data["adf"], ref.reshape(48, 48))
    assert src.counters.frames == len(pats)


def test_bad_arguments(mos2_scan):
    _, scan, _ = mos2_scan
    with pytest.raises(ValueError, match="signal"):
        FourDFrameSource(ListReceiver([]), scan, signal="haadf")
    with pytest.raises(ValueError, match="max_missing_fraction"):
        FourDFrameSource(ListReceiver([]), scan, max_missing_fraction=2)
    with pytest.raises(ValueError, match="BF radius"):
        DetectorGeometry(bf_radius=-1.0).resolve((16, 16))


def test_serve4d_command_runs_the_service_on_a_4d_stream(mos2_scan, tmp_path, capsys):
    """``beamloop serve4d`` (registered here as the CLI would) on a SIMPLON v1 stream: one scan frame through
    the frame path, the run file written, the 4D latencies in the printed table."""
    import argparse

    import h5py

    from beamloop.edge.cli import serve4d
    from beamloop.streams.dectris.simplon import SimplonSender

    _, scan, pats = mos2_scan
    parser = argparse.ArgumentParser()
    serve4d.register(parser.add_subparsers())
    with SimplonSender("tcp://127.0.0.1:0") as tx:
        a = parser.parse_args(["serve4d", "--detector", tx.endpoint, "--protocol", "simplon1", "--scan", "48x48",
                               "--fov-nm", "1.44", "--max-frames", "1", "--idle-timeout", "60",
                               "--out", str(tmp_path)])

        def send():
            time.sleep(1.0)
            tx.start_series((DET, DET), np.uint16, len(pats), series=1)
            for p in pats:
                tx.send_frame(p)
            tx.end_series()

        th = threading.Thread(target=send)
        th.start()
        rc = a.func(a)
        th.join()
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "processed 1 frames" in out and "reduce4d" in out and "assemble4d" in out
    assert "4D: 2304 patterns" in out
    ref = FourDReducer(HAADF_GEOMETRY, sum_pattern=False).reduce_frames(pats)[:, 1].astype(np.float32).reshape(48, 48)
    with h5py.File(tmp_path / "serve.h5", "r") as f:
        images = [g["image"][()] for g in f[FRAMES_GROUP].values()]
    assert len(images) == 1 and np.array_equal(images[0], ref)
