"""Point measurements through the control bridge: ``queue_points`` ``detectors`` (ADF, EELS, diffraction pattern)
on the simulated microscope, their wire encoding, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from beamloop.edge.analysis.scalarize import energy_axis
from beamloop.edge.control.protocol import (
    MAX_POINT_REPLY_BYTES,
    BridgeError,
    check_detectors,
    decode_array,
    encode_array,
)
from beamloop.edge.experiments.dkl import bind_for_material

MICROSCOPE = {"cross_section_barn": 0.0, "sample_time_us": 1000.0, "block_samples": 64, "seed": 3}
FRAME = dict(shape=(64, 64), fov_nm=(2.0, 2.0), dwell_us=10.0)
POINTS = [[0.3, 0.3], [0.5, 0.55], [0.7, 0.4]]
DWELL_US = 32000.0  # 32 ADF samples of 1 ms; 1e7 electrons at 50 pA


def _measure(client, clock, detectors, points=POINTS):
    scan = client.acquire_frame(FRAME["shape"], FRAME["fov_nm"], FRAME["dwell_us"])

    def tick(_s):
        clock.t += 0.004  # the controller paces the parked samples by its clock; move it by hand

    got = client.measure_points(points, DWELL_US, scan.frame_id, tuple(detectors), sleep=tick)
    return scan, got


def _truth(client, scan, detector, points=POINTS):
    r = client.call("sim_point_truth", points=points, frame_id=scan.frame_id, detector=detector, dwell_us=DWELL_US)
    return np.array(decode_array(r["truth"]))


def test_array_encoding_round_trips_and_refuses_malformed_maps():
    a = np.arange(24, dtype=">u4").reshape(2, 3, 4)  # big-endian in, little-endian on the wire
    d = encode_array(a)
    assert d["dtype"] == "<u4" and d["shape"] == [2, 3, 4] and len(d["data"]) == 96
    assert np.array_equal(decode_array(d), a)
    with pytest.raises(BridgeError, match="needs 96 bytes") as e:
        decode_array({**d, "data": d["data"][:-4]})
    assert e.value.code == "bad_request"
    with pytest.raises(BridgeError, match="dtype"):
        decode_array({**d, "dtype": "|O"})
    with pytest.raises(ValueError, match="dtype"):
        encode_array(np.zeros(3, np.int8))


def test_detector_names_and_reply_size_are_checked():
    caps = {"adf": {"channel": "haadf"}, "eels": {"channels": 512, "dtype": "<u4"}}
    assert check_detectors(["EELS", "adf"], caps, 10) == ("eels", "adf")
    for bad, code in ((["eels", "eels"], "bad_request"), ("eels", "bad_request"), ([], "bad_request"),
                      (["xray"], "bad_request"), (["pattern"], "out_of_range")):
        with pytest.raises(BridgeError) as e:
            check_detectors(bad, caps, 10)
        assert e.value.code == code
    most = MAX_POINT_REPLY_BYTES // 2048
    assert check_detectors(["eels"], caps, most) == ("eels",)
    with pytest.raises(BridgeError, match=f"at most {most} points") as e:
        check_detectors(["eels"], caps, most + 1)
    assert e.value.code == "out_of_range"


def test_adf_detector_gives_the_mean_counts_of_a_plain_queue(run_microscope, clock, bridge_client):
    """``detectors=["adf"]`` is the old point queue bit for bit (same seed, same points), and its mean counts
    agree with the simulator's expected ADF counts per sample."""
    means = []
    for detectors in (None, ["adf"]):
        with run_microscope(clock=clock, drain=True, **MICROSCOPE) as mic:
            client = bridge_client(mic.control_endpoint, timeout_ms=10000)
            scan = client.acquire_frame(FRAME["shape"], FRAME["fov_nm"], FRAME["dwell_us"])
            q = client.queue_points(POINTS, DWELL_US, scan.frame_id, detectors=detectors)
            assert q["samples_per_point"] == 32
            while (r := client.fetch_points(q["queue_id"]))["state"] == "running":
                clock.t += 0.004
            assert r["state"] == "done" and "measurements" not in r
            means.append(r["mean_counts"])
            truth = _truth(client, scan, "adf")
    assert means[0] == means[1]
    m = np.array(means[0])
    assert np.all(np.abs(m - truth) < 5 * np.sqrt(truth / 32))  # Poisson mean of 32 samples


def test_eels_spectra_have_their_edges_at_the_calibrated_energies(microscope, clock, bridge_client):
    client = bridge_client(microscope.control_endpoint, timeout_ms=10000)
    cal = client.get_capabilities()["point_detectors"]["eels"]
    assert (cal["offset_eV"], cal["dispersion_eV"], cal["channels"]) == (130.0, 0.25, 512)
    scan, got = _measure(client, clock, ("eels", "adf"))
    spectra = got.signals["eels"]
    assert spectra.shape == (3, 512) and spectra.dtype == np.uint32 and got.mean_counts.shape == (3,)
    truth = _truth(client, scan, "eels")
    # Poisson counts of the expectation: standardised residuals of mean 0 and spread 1
    z = (spectra - truth) / np.sqrt(truth)
    assert abs(z.mean()) < 0.1 and 0.9 < z.std() < 1.1
    e = energy_axis(cal["channels"], cal["offset_eV"], cal["dispersion_eV"])
    s_onset = bind_for_material("eels_onset", calibration=cal)
    onsets = [s_onset(t) for t in truth]
    assert abs(np.median(onsets) - 165.0) <= cal["dispersion_eV"]  # S L2,3 within a channel
    assert all(abs(s_onset(s) - 165.0) < 2.0 for s in spectra)  # measured: within the fine-structure shift
    # Mo M4,5 at 227 eV: the edge's counts above its onset exceed the power law fitted below it
    from beamloop.edge.analysis.scalarize import EDGES, edge_integral

    assert all(edge_integral(e, t, EDGES["Mo_M4,5"]) > 0.05 * t[(e > 225) & (e < 255)].sum() for t in truth)
    pre = (e > 215) & (e < 222)
    post = (e > 240) & (e < 250)
    assert all(t[post].mean() > t[pre].mean() * (222 / 245) ** 3 * 1.05 for t in truth)  # a rise, not the decay


def test_patterns_have_the_binned_shape_and_the_points_dose(microscope, clock, bridge_client):
    client = bridge_client(microscope.control_endpoint, timeout_ms=10000)
    cal = client.get_capabilities()["point_detectors"]["pattern"]
    assert cal["shape"] == [48, 48] and cal["binning"] == 2
    scan, got = _measure(client, clock, ("pattern",))
    p = got.signals["pattern"]
    # queue 1 again: progress alone, or the measurements from point 1 on
    light = client.fetch_points(1, measurements=False)
    assert "measurements" not in light and light["done"] == 3
    tail = client.fetch_points(1, start=1)
    assert np.array_equal(decode_array(tail["measurements"]["pattern"]), p[1:])
    assert p.shape == (3, 48, 48) and p.dtype == np.uint32
    electrons = microscope.electrons_per_s * DWELL_US * 1e-6
    sums = p.sum(axis=(1, 2), dtype=np.float64)
    assert np.all(np.abs(sums - electrons) < 5 * np.sqrt(electrons))  # every electron lands on the detector
    truth = _truth(client, scan, "pattern")
    assert np.allclose(truth.sum(axis=(1, 2)), electrons)
    # the bright-field disk (radius 8 binned pixels) holds most of them, centred on the detector
    yy, xx = np.mgrid[:48, :48]
    disk = np.hypot(yy - 23.5, xx - 23.5) <= cal["disk_radius_px"]
    assert np.all(p[:, disk].sum(axis=1) > 0.5 * sums)


def test_fetch_points_from_start_and_an_unfitted_detector(run_microscope, clock, bridge_client):
    with run_microscope(clock=clock, drain=True, point_detectors=False, **MICROSCOPE) as mic:
        client = bridge_client(mic.control_endpoint, timeout_ms=10000)
        assert client.get_capabilities()["point_detectors"] == {"adf": {"channel": "haadf"}}
        scan = client.acquire_frame(FRAME["shape"], FRAME["fov_nm"], FRAME["dwell_us"])
        for det in ("eels", "pattern"):
            with pytest.raises(BridgeError, match=f"detector {det} is not fitted") as e:
                client.queue_points(POINTS, DWELL_US, scan.frame_id, detectors=[det])
            assert e.value.code == "out_of_range"
        with pytest.raises(BridgeError, match="not fitted") as e:
            client.call("sim_point_truth", points=POINTS, frame_id=scan.frame_id, detector="eels")
        q = client.queue_points(POINTS, DWELL_US, scan.frame_id, detectors=["adf"])
        while (r := client.fetch_points(q["queue_id"]))["state"] == "running":
            clock.t += 0.004
        tail = client.fetch_points(q["queue_id"], start=2)
        assert tail["mean_counts"] == r["mean_counts"][2:] and tail["start"] == 2 and tail["done"] == 3
        with pytest.raises(BridgeError) as e:
            client.call("fetch_points", queue_id=q["queue_id"], start=-1)
        assert e.value.code == "bad_request"


def test_a_queue_too_large_for_one_reply_is_refused(microscope, bridge_client):
    client = bridge_client(microscope.control_endpoint, timeout_ms=10000)
    scan = client.acquire_frame(FRAME["shape"], FRAME["fov_nm"], FRAME["dwell_us"])
    per = 48 * 48 * 4
    n = MAX_POINT_REPLY_BYTES // per + 1
    with pytest.raises(BridgeError, match="queue at most") as e:
        client.queue_points([[0.5, 0.5]] * n, 100.0, scan.frame_id, detectors=["pattern"])
    assert e.value.code == "out_of_range"
    assert client.get_state()["blanked"] is True
