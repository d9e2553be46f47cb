"""Recordings on a cluster: chunked reading (streams/chunks.py), the 4D reductions and ``find`` on Dask
(edge/dask_runner.py), on Dask's threads and on a distributed.LocalCluster."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytest

from beamloop.edge.dask_runner import DaskRunner, check_scheduler, reduce_recording
from beamloop.edge.fanout_worker import FourDReducer
from beamloop.edge.frame.scanframe import ScanFrame
from beamloop.edge.sim import lattice
from beamloop.edge.sim.fourd import FourDConfig, FourDMicroscope
from beamloop.streams.chunks import Partition, partitions, read_partition
from beamloop.streams.dectris.receiver import DetectorReceiver
from beamloop.streams.dectris.recorder import make_recorder, read_frames, record
from beamloop.streams.dectris.stream_v2 import Stream2Sender

pytest.importorskip("hdf5plugin", reason="hdf5plugin not installed (pip install '.[detector]')")

DET = 16
SCAN = (24, 24)


def write_recording(folder, frames, fmt="hdf5", ids=None, frames_per_file=200):
    """Stream ``frames`` (Stream V2, bitshuffle-LZ4) into the recorder; returns the master / store path."""
    with Stream2Sender("tcp://127.0.0.1:0") as tx, \
            DetectorReceiver(tx.endpoint, protocol="stream2", decode=False, stack_size=32) as rx:
        time.sleep(0.05)
        tx.start_series(frames.shape[1:], frames.dtype, len(frames) if ids is None else 0)
        for k, f in enumerate(frames):
            tx.send_frame(f, image_id=None if ids is None else int(ids[k]))
        tx.end_series()
        (master,) = record(rx, lambda s: make_recorder(fmt, folder, "scan", frames_per_file=frames_per_file),
                           idle_ms=100)
    return master


@pytest.fixture(scope="module")
def patterns():
    """Two scan frames of MoS2 (24 x 24 probe positions 0.3 A apart) on a 16 x 16 detector, uint16 counts."""
    rng = np.random.default_rng(5)
    spec = lattice.mos2((-15, 15, -15, 15))
    cfg = FourDConfig(detector_shape=(DET, DET), disk_radius_px=DET / 6, df_width_px=DET / 4)
    mic = FourDMicroscope(spec, cfg)
    scan = ScanFrame(0, SCAN, (0.72, 0.72))
    one = mic.scan(scan, 3000.0, rng).reshape(-1, DET, DET)
    return np.concatenate([one, mic.scan(scan, 3000.0, rng).reshape(-1, DET, DET)])


@pytest.fixture(scope="module")
def recording(tmp_path_factory, patterns):
    return write_recording(tmp_path_factory.mktemp("rec"), patterns, frames_per_file=500)


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_partitions_read_every_frame_once_in_order(tmp_path, fmt):
    frames = np.random.default_rng(0).poisson(2.0, (23, 8, 10)).astype(np.uint16)
    master = write_recording(tmp_path, frames, fmt, frames_per_file=10)
    parts = partitions(master, 4)
    if fmt == "hdf5":  # 3 data files (10, 10, 3 frames), partitions never cross them
        assert [len(p) for p in parts] == [4, 4, 2, 4, 4, 2, 3]
    else:
        assert [len(p) for p in parts] == [4, 4, 4, 4, 4, 3]
    assert [p.index for p in parts] == list(range(len(parts)))
    got = [read_partition(p) for p in parts]
    assert np.array_equal(np.concatenate([g[0] for g in got]), frames)
    assert np.array_equal(np.concatenate([g[1] for g in got]), np.arange(23))
    ref, ids = read_frames(master)
    assert np.array_equal(ref, frames) and np.array_equal(ids, np.arange(23))


def test_partition_errors(tmp_path, recording):
    with pytest.raises(ValueError, match="frames_per_partition"):
        partitions(recording, 0)
    with pytest.raises(KeyError, match="no channel 'nope'"):
        partitions(recording, 8, channel="nope")
    with pytest.raises(FileNotFoundError, match="no recording"):
        partitions(tmp_path / "absent_master.h5")
    assert isinstance(partitions(recording, 64)[0], Partition)


def test_reduction_on_threads_equals_one_reducer_over_all_frames(recording, patterns):
    with DaskRunner("threads", workers=2) as runner:
        res = reduce_recording(recording, SCAN, runner=runner, frames_per_partition=100)
    ref = FourDReducer().reduce_frames(patterns)
    assert res.frames == len(patterns) and res.partitions == 12  # 1152 frames in tasks of 100
    names = ("bf", "adf", "com_sum", "com_row", "com_col")
    assert tuple(res.images) == names
    for k, name in enumerate(names):
        assert res.images[name].shape == (2, *SCAN)
        assert np.array_equal(res.images[name].reshape(-1), ref[:, k]), name
    assert np.array_equal(res.sum_pattern, patterns.sum(axis=0, dtype=np.float64))


def test_missing_frames_are_nan_at_their_probe_positions(tmp_path, patterns):
    ids = np.delete(np.arange(len(patterns)), [3, 700])
    master = write_recording(tmp_path, patterns[ids], ids=ids)
    res = reduce_recording(master, SCAN, frames_per_partition=256)
    adf = res.images["adf"].reshape(-1)
    assert np.isnan(adf[[3, 700]]).all() and np.isfinite(np.delete(adf, [3, 700])).all()


def test_reduction_on_a_distributed_local_cluster(recording, patterns):
    """Two worker processes of a distributed.LocalCluster read their partitions of the HDF5 themselves."""
    with DaskRunner("local", workers=2) as runner:
        assert len(runner.client.scheduler_info()["workers"]) == 2
        res = reduce_recording(recording, SCAN, runner=runner, frames_per_partition=300)
    ref = FourDReducer().reduce_frames(patterns)
    assert np.array_equal(res.images["adf"].reshape(-1), ref[:, 1])
    assert np.array_equal(res.images["com_col"].reshape(-1), ref[:, 4])


def test_find_command_on_a_recording_with_a_scheduler(recording, tmp_path, capsys):
    """``beamloop find REC_master.h5 --scan 24x24 --scheduler threads``: the reductions written, the columns of
    both scan frames' virtual ADF images found and written."""
    from beamloop.edge.cli import find

    parser = argparse.ArgumentParser()
    find.register(parser.add_subparsers())
    out = tmp_path / "out"
    a = parser.parse_args(["find", str(recording), "--scan", "24x24", "--pixel-size", "0.3", "--material", "MoS2",
                           "--scheduler", "threads", "--workers", "2", "--out", str(out), "--no-progress"])
    assert a.func(a) == 0
    text = capsys.readouterr().out
    assert "1152 frames in 5 partitions" in text
    with np.load(out / "scan_4d.npz") as z:
        assert z["adf"].shape == (2, *SCAN) and z["sum_pattern"].shape == (DET, DET)
    csvs = sorted(p.name for p in out.glob("*_columns.csv"))
    assert csvs == ["scan_adf_0000_columns.csv", "scan_adf_0001_columns.csv"]
    from beamloop.edge.batch_find import find_columns

    with np.load(out / "scan_4d.npz") as z:
        adf = z["adf"][0].astype(np.float32)
    cols, _ = find_columns(adf, 0.3, "MoS2", background="on")  # the same finder in this process
    rows = np.loadtxt(out / csvs[0], delimiter=",", skiprows=1, usecols=(0, 1), ndmin=2)
    assert len(rows) == len(cols) >= 4
    assert np.allclose(rows, np.stack([cols.x, cols.y], 1), atol=2e-3)  # the CSV keeps 3 decimals


def test_find_refuses_a_recording_without_scan_and_a_bad_scheduler(recording, tmp_path, capsys):
    from beamloop.edge.cli import find

    parser = argparse.ArgumentParser()
    find.register(parser.add_subparsers())
    a = parser.parse_args(["find", str(recording), "--out", str(tmp_path)])
    assert a.func(a) == 2
    assert "needs --scan" in capsys.readouterr().err
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        check_scheduler("cluster")
    assert check_scheduler("tcp://10.0.0.1:8786") == "tcp://10.0.0.1:8786"
    with pytest.raises(ValueError, match="workers"):
        DaskRunner("threads", workers=0)


def test_process_pool_keeps_its_workers_between_maps():
    import os

    with DaskRunner("processes", workers=1) as runner:
        first = runner.map(_pid, [0, 1])
        second = runner.map(_pid, [2])
    assert len(set(first + second)) == 1 and first[0] != os.getpid()


def _pid(_) -> int:
    import os

    return os.getpid()


def test_progress_bar_on_stderr(capsys):
    with DaskRunner("threads", workers=1, progress=True) as runner:
        assert runner.map(abs, [-3, 4]) == [3, 4]
    assert "100%" in capsys.readouterr().err
