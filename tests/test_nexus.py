"""The run file (edge/io/runlog.py) and detector recordings (streams/dectris/recorder.py) carry NeXus NXdata
attributes: read back through RosettaSciIO's NeXus reader (and HyperSpy when installed), data, axes scales
and units are those written."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.io.runlog import RunLog


def _frame(rows=24, cols=32, seed=0):
    return np.random.default_rng(seed).integers(0, 4000, (rows, cols)).astype(np.uint16)


def _nexus(path, where):
    pytest.importorskip("rsciio")
    import hdf5plugin  # noqa: F401  bitshuffle chunks of recordings
    from rsciio.nexus import file_reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return file_reader(str(path), nxdata_only=True, dataset_path=[where])


def _run_file(tmp_path):
    a, b = _frame(seed=1), _frame(seed=2)
    cols = ColumnTable(np.array([3.5], np.float32), np.array([4.0], np.float32), np.ones(1, np.float32),
                       np.ones(1, np.float32), np.zeros(1, np.int8))
    with RunLog(tmp_path / "run.h5") as rl:
        rl.add_frame(a, cols, pixel_size_A=0.15)
        rl.add_frame(b, cols)  # no pixel size
    return tmp_path / "run.h5", a, b


def test_run_file_frames_are_nxdata_with_nm_axes(tmp_path):
    path, a, b = _run_file(tmp_path)
    s = _nexus(path, "/frames/000000")
    assert len(s) == 1
    np.testing.assert_array_equal(s[0]["data"], a)
    axes = s[0]["axes"]
    assert [ax["name"] for ax in axes] == ["y", "x"] and [ax["size"] for ax in axes] == [24, 32]
    assert all(not ax["navigate"] for ax in axes)  # an image, not a stack
    for ax in axes:
        assert ax["units"] == "nm" and ax["scale"] == pytest.approx(0.015) and ax["offset"] == 0


def test_run_file_frame_without_pixel_size_has_pixel_axes(tmp_path):
    path, a, b = _run_file(tmp_path)
    s = _nexus(path, "/frames/000001")
    np.testing.assert_array_equal(s[0]["data"], b)
    assert [(ax["size"], ax["scale"], ax["units"], ax["navigate"]) for ax in s[0]["axes"]] == [
        (24, 1, "", False), (32, 1, "", False)]


def test_run_file_nexus_attributes_and_layout_kept(tmp_path):
    path, a, _ = _run_file(tmp_path)
    with h5py.File(path) as f:
        assert f.attrs["NX_class"] == "NXroot" and f.attrs["default"] == "frames"
        assert f["frames"].attrs["NX_class"] == "NXentry" and f["frames"].attrs["default"] == "000000"
        g = f["frames/000000"]
        assert g.attrs["NX_class"] == "NXdata" and g.attrs["signal"] == "image"
        assert list(g.attrs["axes"]) == ["y", "x"] and g.attrs["y_indices"] == 0 and g.attrs["x_indices"] == 1
        assert g["image"].attrs["units"] == "counts" and g["image"].attrs["long_name"] == "detector counts"
        np.testing.assert_allclose(g["x"][()], np.arange(32) * 0.015)
        # the datasets other code reads are where they were
        np.testing.assert_array_equal(g["image"][()], a)
        assert g["columns"][0]["x_px"] == 3.5 and g.attrs["pixel_size_A"] == 0.15
        assert list(f["frames/000001"].attrs["axes"]) == [".", "."] and "x" not in f["frames/000001"]
        assert len(f["frames"]) == 2


def test_run_file_opens_in_hyperspy(tmp_path):
    hs = pytest.importorskip("hyperspy.api")
    path, a, _ = _run_file(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = hs.load(path, reader="nxs", nxdata_only=True, dataset_path="/frames/000000")
    np.testing.assert_array_equal(s.data, a)
    assert s.axes_manager.signal_dimension == 2
    x = s.axes_manager.signal_axes[0]
    assert x.units == "nm" and x.scale == pytest.approx(0.015) and x.size == 32


def _recording(tmp_path, frames, ids):
    from beamloop.streams.dectris import codecs
    from beamloop.streams.dectris.recorder import Recorder
    from beamloop.streams.dectris.series import ChannelStack, DetectorSeries, FrameStack

    series = DetectorSeries(protocol="test", series_id=3, series_unique_id="nx", channels=("threshold_1",),
                            shape=frames.shape[1:], dtype=frames.dtype, number_of_images=len(frames),
                            count_time=1e-3, frame_time=1e-3)
    zero = np.zeros(len(frames), np.int64)
    chan = ChannelStack(frames, np.zeros(0, np.uint8), zero, zero, codecs.Codec(codecs.NONE, frames.dtype.itemsize))
    stack = FrameStack(series, np.asarray(ids, np.int64), np.zeros((len(frames), 3), np.int64),
                       {"threshold_1": chan}, 0, 0)
    with Recorder(tmp_path, "scan") as rec:
        rec.start(series)
        rec.write(stack)
        rec.end(len(frames))
    return rec.master_path


def test_recording_data_file_reads_as_a_stack_of_frames(tmp_path):
    frames = np.stack([_frame(16, 20, seed=k) for k in range(3)])
    master = _recording(tmp_path, frames, [0, 1, 2])
    s = _nexus(tmp_path / "scan_data_000001.h5", "/entry/data")
    assert len(s) == 1
    np.testing.assert_array_equal(s[0]["data"], frames)
    nav, y, x = s[0]["axes"]
    assert nav["name"] == "image_id" and nav["navigate"] and nav["size"] == 3 and nav["scale"] == 1
    assert not y["navigate"] and not x["navigate"] and (y["size"], x["size"]) == (16, 20)
    with h5py.File(tmp_path / "scan_data_000001.h5") as f:
        d = f["entry/data"]
        assert d.attrs["signal"] == "data" and list(d.attrs["axes"]) == ["image_id", ".", "."]
        assert d["threshold_1"].attrs["units"] == "counts" and d["data"].attrs["interpretation"] == "image"
        assert d["threshold_1"].attrs["long_name"] == "detector counts (threshold_1)"
    with h5py.File(master) as f:
        assert f["entry/data"].attrs["signal"] == "data_000001"
        assert f["entry/data"].attrs["interpretation"] == "image"


def test_recording_master_reads_through_its_link(tmp_path):
    frames = np.stack([_frame(8, 12, seed=k) for k in range(2)])
    master = _recording(tmp_path, frames, [5, 6])
    s = _nexus(master, "/entry/data")
    np.testing.assert_array_equal(s[0]["data"], frames)
    assert [ax["navigate"] for ax in s[0]["axes"]] == [True, False, False]


def test_recording_readers_unchanged(tmp_path):
    """The NeXus attributes leave the recording's own readers' view as it was."""
    from beamloop.streams.dectris.recorder import read_frames, recording_info

    frames = np.stack([_frame(8, 12, seed=k) for k in range(2)])
    master = _recording(tmp_path, frames, [5, 6])
    got, ids = read_frames(master)
    np.testing.assert_array_equal(got, frames)
    assert ids.tolist() == [5, 6] and recording_info(master)["frames_recorded"] == 2


def test_recording_opens_in_hyperspy_as_a_stack(tmp_path):
    hs = pytest.importorskip("hyperspy.api")
    import hdf5plugin  # noqa: F401

    frames = np.stack([_frame(8, 12, seed=k) for k in range(4)])
    _recording(tmp_path, frames, [0, 1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = hs.load(tmp_path / "scan_data_000001.h5", reader="nxs", nxdata_only=True, dataset_path="/entry/data")
    np.testing.assert_array_equal(s.data, frames)
    assert s.axes_manager.signal_shape == (12, 8) and s.axes_manager.navigation_shape == (4,)
    assert s.axes_manager.navigation_axes[0].name == "image_id"
