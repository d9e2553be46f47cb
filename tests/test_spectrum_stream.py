"""Spectra in the native stream (a series of 1-D spectra with their energy calibration in the header) and in the
recorder (the HyperSpy layout, read back by RosettaSciIO)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from beamloop.streams.dectris.recorder import SpectrumRecorder, read_spectra, record_spectra
from beamloop.streams.errors import MalformedMessage
from beamloop.streams.events import SeriesEnd, SeriesStart
from beamloop.streams.native import protocol
from beamloop.streams.native.receiver import FrameReceiver, ImageEvent
from beamloop.streams.native.sender import FrameSender

AXIS = protocol.EnergyAxis(130.0, 0.25, 512, 0.8)


def _spectra(n: int = 4) -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.poisson(1000.0, (n, AXIS.channels)).astype(np.uint32)


def test_energy_axis_round_trips_through_the_header_and_bad_ones_are_refused():
    series = protocol.spectrum_series(3, ["eels"], AXIS, np.uint32, user_data={"material": "MoS2"})
    assert series.shape == (1, 512) and series.user_data["kind"] == "spectrum"
    back = protocol.decode_header(protocol.encode_start(series))
    assert protocol.energy_axis(back) == AXIS and back.user_data["material"] == "MoS2"
    e = AXIS.energy_eV
    assert e[0] == 130.0 and e[140] == 165.0 and e[-1] == 130.0 + 0.25 * 511
    assert protocol.energy_axis(protocol.new_series(1, ["haadf"], (8, 8), np.uint16)) is None
    for bad in ({"offset_eV": 130.0, "dispersion_eV": 0.0, "channels": 512},
                {"offset_eV": 130.0, "dispersion_eV": 0.25, "channels": 256},  # not the frame width
                {"offset_eV": float("nan"), "dispersion_eV": 0.25, "channels": 512},
                {"dispersion_eV": 0.25, "channels": 512}, "130 eV"):
        hdr = protocol.new_series(1, ["eels"], (1, 512), np.uint32, user_data={"kind": "spectrum", "energy": bad})
        with pytest.raises(MalformedMessage, match="spectrum series"):
            protocol.decode_header(protocol.encode_start(hdr))
    with pytest.raises(ValueError, match="dispersion_eV"):
        protocol.EnergyAxis(130.0, -0.25, 512)


def test_spectra_stream_from_sender_to_receiver_bit_for_bit():
    spectra = _spectra()
    with FrameSender("tcp://127.0.0.1:*", send_timeout_ms=2000) as tx, FrameReceiver(tx.endpoint, ring=8) as rx:
        tx.start_spectrum_series(AXIS, ["eels"], np.uint32, number_of_images=len(spectra))
        for i, s in enumerate(spectra):
            tx.send_spectrum(s, user_data={"probe_position": [0.1 * i, 0.5]})
        tx.end_series()
        with pytest.raises(RuntimeError, match="spectrum series"):
            tx.send_spectrum(spectra[0])
        start = rx.recv(2000)
        assert isinstance(start, SeriesStart) and protocol.energy_axis(start.series) == AXIS
        got = []
        for _ in spectra:
            ev = rx.recv(2000)
            assert isinstance(ev, ImageEvent)
            got.append(ev.spectrum().copy())
            assert ev.header.user_data["probe_position"][1] == 0.5
        assert isinstance(rx.recv(2000), SeriesEnd)
    assert np.array_equal(np.stack(got), spectra)


def test_send_spectrum_refuses_a_spectrum_of_the_wrong_length():
    with FrameSender("tcp://127.0.0.1:*", send_timeout_ms=2000) as tx, FrameReceiver(tx.endpoint):
        tx.start_spectrum_series(AXIS)
        with pytest.raises(ValueError, match="shape"):
            tx.send_spectrum(np.zeros(511, np.uint32))
        with pytest.raises(ValueError, match="1-D"):
            tx.send_spectrum(np.zeros((2, 512), np.uint32))


def test_recorder_writes_spectra_that_rosettasciio_reads_with_their_energy_axis(tmp_path):
    hspy = pytest.importorskip("rsciio.hspy")
    spectra = _spectra(5)
    path = tmp_path / "points.hspy"
    with SpectrumRecorder(path, AXIS.offset_eV, AXIS.dispersion_eV, AXIS.channels, resolution_eV=0.8,
                          user_data={"frame_id": 7}) as rec:
        for i, s in enumerate(spectra):
            rec.write(s, (0.1 * i, 0.2))
    assert path.exists() and not (tmp_path / "points.hspy.part").exists()
    (sig,) = hspy.file_reader(str(path))
    assert np.array_equal(sig["data"], spectra)
    nav, energy = sig["axes"]
    assert energy["units"] == "eV" and energy["navigate"] is False and energy["size"] == 512
    assert (energy["offset"], energy["scale"]) == (130.0, 0.25)
    assert nav["navigate"] is True and nav["size"] == 5
    assert sig["metadata"]["Signal"]["signal_type"] == "EELS"
    assert sig["metadata"]["Acquisition_instrument"]["TEM"]["Detector"]["EELS"]["resolution_eV"] == 0.8
    assert np.allclose(sig["original_metadata"]["probe_positions"][:, 0], 0.1 * np.arange(5))
    data, e, meta = read_spectra(path)
    assert np.array_equal(data, spectra) and np.array_equal(e, AXIS.energy_eV) and meta["user_data"] == {"frame_id": 7}
    with pytest.raises(ValueError, match="channels"):
        SpectrumRecorder(tmp_path / "x.hspy", 130.0, 0.25, 512).write(np.zeros(10))


def test_a_streamed_spectrum_series_is_recorded_whole(tmp_path):
    spectra = _spectra(6)
    path = tmp_path / "stream.hspy"
    with FrameSender("tcp://127.0.0.1:*", send_timeout_ms=2000) as tx, FrameReceiver(tx.endpoint, ring=8) as rx:
        done = threading.Event()
        result = {}

        def rec():
            result["path"] = record_spectra(rx, path, timeout_ms=3000)
            done.set()

        th = threading.Thread(target=rec, daemon=True)
        th.start()
        tx.start_series(["haadf"], (4, 4), np.uint16)  # a frame series first: skipped
        tx.send_frame(np.zeros((4, 4), np.uint16))
        tx.start_spectrum_series(AXIS, ["eels"], np.uint32)
        for s in spectra:
            tx.send_spectrum(s)
        tx.end_series()
        th.join(10)
    assert done.is_set() and result["path"] == path
    data, e, _ = read_spectra(path)
    assert np.array_equal(data, spectra) and e[0] == 130.0 and e[1] - e[0] == 0.25
