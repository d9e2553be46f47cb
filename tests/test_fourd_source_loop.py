"""The main job's vacancy-line experiment on a pixelated detector: the simulated microscope's 4D mode
(edge/fourd_detector.py) streams Stream V2 patterns, the 4D frame source assembles the virtual ADF frames
(edge/fourd_source.py), and the service, unchanged, finds the columns, parks the beam and writes vacancies."""

from __future__ import annotations

import numpy as np
import pytest

from beamloop.edge.app import ServiceConfig, build_path, build_service
from beamloop.edge.control.client import BridgeClient
from beamloop.edge.experiments.vacancy_line import ExperimentConfig, vacancy_line
from beamloop.edge.fourd_detector import FourDBackend
from beamloop.edge.fourd_source import STAGES_4D, FourDFrameSource
from beamloop.edge.frame.latency import LatencyRecorder
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.service import latency_keys
from beamloop.streams.native.receiver import FrameReceiver
from beamloop.streams.receivers import open_receiver

MICROSCOPE = {"seed": 9, "max_park_s": 3.0}
"""The ``microscope`` fixture's options (tests/conftest.py): the seed of tests/test_closed_loop.py."""

SHAPE = (96, 96)


def test_vacancy_line_on_the_4d_stream(microscope):
    detector = FourDBackend.attach(microscope, detector_px=16)
    cfg = ServiceConfig("MoS2", targets_per_frame=2)
    latency = LatencyRecorder(latency_keys(build_path(cfg)) + STAGES_4D)
    source = FourDFrameSource(open_receiver(detector.endpoint, protocol="stream2"), ScanFrame(0, SHAPE, (1.44, 1.44)),
                              latency=latency, point_stream=FrameReceiver(microscope.frames_endpoint))
    bridge = BridgeClient(microscope.control_endpoint, timeout_ms=20000)
    try:
        service = build_service(source, cfg, bridge, latency=latency)
        source.warm_up()
        service.choose_trigger_at(bridge.get_capabilities())
        exp = ExperimentConfig(rounds=1, shape=SHAPE, fov_nm=SHAPE[0] * 0.15 / 10, dwell_us=14.4, targets_per_frame=2,
                               max_dwell_s=3.0)
        records = vacancy_line(service, exp)
    finally:
        bridge.close()
        source.close()
        detector.close()
    assert len(records) == 2  # one working frame, one verification frame, both from the 4D stream
    assert source.stats.frames == 2 and source.stats.native_frames_skipped == 2 and detector.dropped == 0
    assert [r.scan.frame_id for r in records] == [1, 2]  # the controller's frame ids, stated by the 4D series
    first, last = records
    assert len(first.dwells) == 2 and all(d.reason == "trigger" for d in first.dwells)
    s_el = microscope.specimen.elements.index("S")
    hit = [e["column"] for e in microscope.events if e["type"] == "ejection" and e["cause"] == "parked"]
    assert len(hit) == 2 and all(microscope.specimen.counts[c, s_el] == 1 for c in hit)
    for d in first.dwells:  # the verification frame, assembled from the 4D stream, shows the targets as S1
        x, y = last.scan.pixel_of_fraction(d.target.fx, d.target.fy)
        k = np.argmin(np.hypot(last.columns.x - x, last.columns.y - y))
        assert last.columns.class_labels()[k] == "S1"
    summary = service.latency.summary()
    assert summary["assemble4d"]["n"] == 2 and summary["reduce4d"]["n"] == source.stats.stacks


@pytest.mark.slow
def test_main_job_runs_on_the_simulated_4d_detector(tmp_path):
    """``beamloop run --detector sim4d`` (once run, sim and closed_loop take the option): the main job completes on
    the 4D stream, writes its S vacancies, and its report has the 4D stage latencies."""
    import inspect
    import json

    from beamloop.edge.experiments import closed_loop

    if "detector" not in inspect.signature(closed_loop.run).parameters:
        pytest.skip("closed_loop.run has no detector option yet (the wiring of run --detector sim4d)")
    report = closed_loop.run(tmp_path, rounds=1, shape=(96, 96), targets_per_frame=2, seed=9, quiet=True,
                             detector="sim4d", detector_px=16)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert report["outcome"]["complete"] and saved["config"]["detector"] == "sim4d"
    assert report["atoms_removed"]["parked"] >= 1
    lat = report["latency_us"]
    assert lat["assemble4d"]["n"] == 2 and lat["reduce4d"]["n"] >= 2
    assert report["accuracy"]["recall"] > 0.9 and report["accuracy"]["precision"] > 0.9
