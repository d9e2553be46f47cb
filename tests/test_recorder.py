"""The lossless recorder: bit-exact HDF5 in the DECTRIS layout, replay, and crash safety under SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from beamloop.streams.dectris import codecs
from beamloop.streams.dectris.receiver import DetectorReceiver
from beamloop.streams.dectris.recorder import Recorder, data_files, iter_chunks, read_frames, record, recording_info
from beamloop.streams.dectris.series import FrameStack, SeriesEnd
from beamloop.streams.dectris.simplon import SimplonSender
from beamloop.streams.dectris.stream_v2 import Stream2Sender

pytest.importorskip("hdf5plugin", reason="hdf5plugin not installed (pip install '.[detector]')")

SHAPE = (32, 40)
REPO = Path(__file__).resolve().parents[1]


def make_frames(n, dtype=np.uint16, seed=0):
    return np.random.default_rng(seed).poisson(3.0, (n, *SHAPE)).astype(dtype)


def record_series(tmp_path, sender, frames, ids=None, **rec_kw):
    """Send ``frames`` through ``sender`` and record them with a receiver that does not decode."""
    flushes = []
    with DetectorReceiver(sender.endpoint, protocol="stream2" if isinstance(sender, Stream2Sender) else "simplon1",
                          decode=False, stack_size=8) as rx:
        time.sleep(0.05)
        sender.start_series(SHAPE, frames.dtype, len(frames))
        for k, f in enumerate(frames):
            if isinstance(sender, Stream2Sender):
                sender.send_frame(f, image_id=None if ids is None else ids[k])
            else:
                sender.send_frame(f, frame_id=None if ids is None else ids[k])
        sender.end_series()
        masters = record(rx, lambda s: Recorder(tmp_path, "scan", on_flush=lambda n, i: flushes.append(n),
                                                **rec_kw), idle_ms=100)
    return masters, flushes


@pytest.mark.parametrize("encoding", ["bslz4", "lz4<", "<"])
def test_simplon_series_recorded_bit_exact(tmp_path, encoding):
    frames = make_frames(53)
    with SimplonSender("tcp://127.0.0.1:0", encoding=encoding) as tx:
        masters, flushes = record_series(tmp_path, tx, frames, frames_per_file=20)
    assert masters == [tmp_path / "scan_master.h5"]
    got, ids = read_frames(masters[0])
    assert np.array_equal(got, frames) and np.array_equal(ids, np.arange(53))
    assert flushes == [20, 40, 53]
    info = recording_info(masters[0])
    assert info["shape"] == SHAPE and info["dtype"] == np.uint16 and info["complete"] and info["nimages"] == 53
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan_data_000001.h5", "scan_data_000002.h5",
                                                          "scan_data_000003.h5", "scan_master.h5"]


def test_layout_a_dectris_user_recognises_and_chunks_are_the_stream_blobs(tmp_path):
    frames = make_frames(12, np.uint32)
    with Stream2Sender("tcp://127.0.0.1:0", compression="bslz4") as tx:
        masters, _ = record_series(tmp_path, tx, frames, ids=[0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13],
                                   frames_per_file=5)
    master = masters[0]
    with h5py.File(master, "r") as f:
        assert f["entry"].attrs["NX_class"] == "NXentry"
        assert f["entry/data"].attrs["NX_class"] == "NXdata"
        det = f["entry/instrument/detector"]
        assert det.attrs["NX_class"] == "NXdetector" and det["bit_depth_image"][()] == 32
        assert det["detectorSpecific/x_pixels_in_detector"][()] == SHAPE[1]
        assert det["detectorSpecific/y_pixels_in_detector"][()] == SHAPE[0]
        links = sorted(k for k in f["entry/data"])
        assert links == ["data_000001", "data_000002", "data_000003"]
        assert isinstance(f["entry/data"].get("data_000002", getlink=True), h5py.ExternalLink)
        d2 = f["entry/data/data_000002"]  # resolves through the external link, as DECTRIS masters do
        assert d2.shape == (5, *SHAPE) and d2.attrs["image_nr_low"] == 6 and d2.attrs["image_nr_high"] == 10
        assert d2.chunks == (1, *SHAPE)
        flt = d2.id.get_create_plist().get_filter(0)
        assert flt[0] == 32008 and flt[2][-1] == 2  # bitshuffle, LZ4 mode
    got, ids = read_frames(master)
    assert np.array_equal(got, frames) and ids.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13]
    # bslz4 frames are stored as the very bytes that were streamed
    codec = codecs.Codec(codecs.BSLZ4, 4)
    for (_, blob), f in zip(iter_chunks(master), frames):
        assert blob == codecs.encode(f, codec)


def test_replay_of_a_recording_is_bit_exact(tmp_path):
    frames = make_frames(30)
    with SimplonSender("tcp://127.0.0.1:0") as tx:
        masters, _ = record_series(tmp_path / "a", tx, frames)
    # replay the stored chunks as a Stream V2 series and record that again
    with Stream2Sender("tcp://127.0.0.1:0") as tx2, DetectorReceiver(tx2.endpoint, protocol="stream2") as rx:
        time.sleep(0.05)
        tx2.start_series(SHAPE, np.uint16, 30)
        for _, blob in iter_chunks(masters[0]):
            tx2.send_blobs({"threshold_1": blob})
        tx2.end_series()
        got = []
        while True:
            ev = rx.recv(2000)
            assert ev is not None
            if isinstance(ev, FrameStack):
                got.append(ev.frames.copy())
            if isinstance(ev, SeriesEnd):
                break
    assert np.array_equal(np.concatenate(got), frames)


def test_recorder_refuses_to_overwrite(tmp_path):
    (tmp_path / "scan_master.h5").write_bytes(b"")
    with pytest.raises(FileExistsError):
        Recorder(tmp_path, "scan")


def _beamloop(*args):
    code = "import sys; from beamloop.edge.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, *args]


def test_sigkill_mid_series_leaves_every_flushed_frame_intact(tmp_path):
    """Kill `beamloop record` with SIGKILL in the middle of a series: every frame it reported as flushed is
    readable from the master and bit-exact."""
    n = 4000
    frames = np.random.default_rng(7).poisson(3.0, (n, 64, 64)).astype(np.uint16)
    out = tmp_path / "rec"
    with SimplonSender("tcp://127.0.0.1:0", sndhwm=100000) as tx:
        proc = subprocess.Popen(_beamloop("record", tx.endpoint, "--out", str(out), "--frames-per-file", "37",
                                          "--max-file-seconds", "0.05"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        reported = []
        listening = threading.Event()

        def read_lines():
            for line in proc.stdout:
                ev = json.loads(line)
                if ev["event"] == "listening":
                    listening.set()
                if ev["event"] == "flushed":
                    reported.append(ev["frames"])

        reader = threading.Thread(target=read_lines, daemon=True)
        reader.start()
        assert listening.wait(30), proc.stderr.read() if proc.poll() is not None else "recorder did not start"
        time.sleep(0.3)
        tx.start_series((64, 64), np.uint16, n)
        killed_at = None
        for i, f in enumerate(frames):
            tx.send_frame(f)
            if i % 50 == 0:
                time.sleep(0.01)  # a steady stream, so files roll over while frames keep coming
            if killed_at is None and reported and reported[-1] >= 300:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = i
                break
        proc.wait(30)
        reader.join(5)
        proc.stdout.close()
        proc.stderr.close()
    assert killed_at is not None and killed_at < n - 1, "the recorder was not killed mid-series"
    assert proc.returncode == -signal.SIGKILL
    flushed = reported[-1]
    got, ids = read_frames(out / "series_master.h5")
    assert len(got) >= flushed
    assert np.array_equal(ids, np.arange(len(got)))
    assert np.array_equal(got, frames[:len(got)])  # every frame the master lists is intact, not only the reported
    info = recording_info(out / "series_master.h5")
    assert not info["complete"] and info["frames_recorded"] == len(got)
    assert all(p.suffix == ".h5" for p in data_files(out / "series_master.h5"))


# --- every channel, HDF5 and Zarr ------------------------------------------------------------------------------

CHANNELS = ("threshold_1", "threshold_2", "difference")


def multichannel_frames(n, dtype, seed=3):
    """Two thresholds and their difference, as an EIGER2 sends them (threshold_2 counts fewer photons)."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    t1 = rng.poisson(4.0, (n, *SHAPE)).astype(np.int64)
    t2 = rng.binomial(t1, 0.5)
    t1[:, 0, 0] = top  # the full range of the type survives
    t2[:, 0, 0] = top // 2
    return {"threshold_1": t1.astype(dtype), "threshold_2": t2.astype(dtype), "difference": (t1 - t2).astype(dtype)}


def record_multichannel(tmp_path, fmt, compression, dtype, n=23, decode=False, stack_size=8, **rec_kw):
    from beamloop.streams.dectris.recorder import make_recorder

    frames = multichannel_frames(n, dtype)
    with Stream2Sender("tcp://127.0.0.1:0", compression=compression) as tx, \
            DetectorReceiver(tx.endpoint, protocol="stream2", decode=decode, stack_size=stack_size) as rx:
        time.sleep(0.05)
        tx.start_series(SHAPE, dtype, n, channels=CHANNELS)
        for i in range(n):
            tx.send_frame({ch: frames[ch][i] for ch in CHANNELS})
        tx.end_series()
        masters = record(rx, lambda s: make_recorder(fmt, tmp_path, "multi", **{"frames_per_file": 10, **rec_kw}),
                         idle_ms=100)
    return frames, masters


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
@pytest.mark.parametrize("compression", ["bslz4", "lz4"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_every_channel_recorded_bit_exact(tmp_path, fmt, compression, dtype):
    from beamloop.streams.dectris.recorder import read_channels

    if fmt == "zarr":
        pytest.importorskip("zarr")
    frames, masters = record_multichannel(tmp_path, fmt, compression, dtype)
    got, ids = read_channels(masters[0])
    assert list(got) == list(CHANNELS) and np.array_equal(ids, np.arange(23))
    for ch in CHANNELS:
        assert got[ch].dtype == dtype and np.array_equal(got[ch], frames[ch]), ch
    first, _ = read_frames(masters[0])
    assert np.array_equal(first, frames["threshold_1"])
    assert np.array_equal(read_frames(masters[0], "difference")[0], frames["difference"])
    info = recording_info(masters[0])
    assert info["format"] == fmt and info["channels"] == list(CHANNELS) and info["complete"]
    assert info["frames_recorded"] == 23 and info["dtype"] == dtype and info["shape"] == SHAPE


def test_hdf5_layout_keeps_one_dataset_per_channel(tmp_path):
    frames, masters = record_multichannel(tmp_path, "hdf5", "bslz4", np.uint16)
    with h5py.File(masters[0], "r") as f:
        d = f["entry/data"]
        assert sorted(d) == sorted([f"{name}_{k:06d}" for k in (1, 2, 3)
                                    for name in ("data", *CHANNELS)])
        assert d["threshold_2_000002"].shape == (10, *SHAPE)
        assert np.array_equal(d["difference_000003"][()], frames["difference"][20:])
        assert np.array_equal(d["data_000001"][()], frames["threshold_1"][:10])  # DECTRIS tools read the first
    with h5py.File(data_files(masters[0])[0], "r") as f:
        assert f["entry/data/data"].id == f["entry/data/threshold_1"].id  # a hard link, no second copy
    # the bslz4 blobs of every channel are the streamed bytes
    codec = codecs.Codec(codecs.BSLZ4, 2)
    for (_, blob), f in zip(iter_chunks(masters[0], "threshold_2"), frames["threshold_2"]):
        assert blob == codecs.encode(f, codec)


def test_channel_names_that_are_not_link_names_round_trip(tmp_path):
    from beamloop.streams.dectris.recorder import dataset_names, read_channels

    names = dataset_names(("data", "a/b", "image_id", "."))
    assert names["data"] == "data" and names["a/b"] == "a%2Fb" and names["."] == "%2E"
    assert names["image_id"] != "image_id"  # the frame ids' name is reserved
    frames = make_frames(5, np.uint8)
    with Stream2Sender("tcp://127.0.0.1:0") as tx, DetectorReceiver(tx.endpoint, protocol="stream2",
                                                                    decode=False) as rx:
        time.sleep(0.05)
        tx.start_series(SHAPE, np.uint8, 5, channels=("x/y", "data"))
        for f in frames:
            tx.send_frame({"x/y": f, "data": f[::-1].copy()})
        tx.end_series()
        masters = record(rx, lambda s: Recorder(tmp_path, "odd"), idle_ms=100)
    got, _ = read_channels(masters[0])
    assert list(got) == ["x/y", "data"]
    assert np.array_equal(got["x/y"], frames) and np.array_equal(got["data"], frames[:, ::-1])


def test_zarr_recording_replays_and_refuses_to_overwrite(tmp_path):
    pytest.importorskip("zarr")
    from beamloop.streams.dectris.zarr_recorder import ZarrRecorder

    frames, masters = record_multichannel(tmp_path, "zarr", "bslz4", np.uint16, decode=True)
    assert masters == [tmp_path / "multi.zarr"]
    with pytest.raises(FileExistsError):
        ZarrRecorder(tmp_path, "multi")


def test_zarr_chunks_of_several_frames_across_stacks_and_flushes(tmp_path):
    """Chunks of 3 frames, stacks of up to 20 (more than the staging room) and flushes every 7 frames: the
    partly written chunks are rewritten as they fill, and every frame reads back bit-exact."""
    pytest.importorskip("zarr")
    from beamloop.streams.dectris.recorder import read_channels

    frames, masters = record_multichannel(tmp_path, "zarr", "lz4", np.uint16, n=61, stack_size=20, chunk_frames=3,
                                          frames_per_file=7)
    got, ids = read_channels(masters[0])
    assert np.array_equal(ids, np.arange(61)) and all(np.array_equal(got[ch], frames[ch]) for ch in CHANNELS)


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_stream_replays_every_channel_of_a_recording(tmp_path, fmt):
    """``beamloop stream RECORDING --protocol stream2`` sends every channel; received bit-exact."""
    import argparse
    import socket

    from beamloop.streams import cli

    if fmt == "zarr":
        pytest.importorskip("zarr")
    frames, masters = record_multichannel(tmp_path, fmt, "bslz4", np.uint32)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ep = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers())
    args = p.parse_args(["stream", str(masters[0]), "--bind", ep, "--protocol", "stream2", "--wait", "0.5"])
    rc = []
    t = threading.Thread(target=lambda: rc.append(args.func(args)), daemon=True)
    with DetectorReceiver(ep, protocol="stream2") as rx:
        t.start()
        got = {ch: [] for ch in CHANNELS}
        while True:
            ev = rx.recv(10_000)
            assert ev is not None
            if isinstance(ev, FrameStack):
                for ch in CHANNELS:
                    got[ch].append(ev.channels[ch].frames.copy())
            if isinstance(ev, SeriesEnd):
                break
    t.join(10)
    assert rc == [0] and ev.series.channels == CHANNELS
    for ch in CHANNELS:
        assert np.array_equal(np.concatenate(got[ch]), frames[ch]), ch


def test_a_full_disk_stops_the_recording_cleanly_and_keeps_what_fitted(tmp_path, monkeypatch):
    """The space left shrinks with what is written (a 400 kB disk): the recorder stops with an error naming the
    file before HDF5 meets the full disk, the frames before stay readable bit-exact, no part file is left."""
    from beamloop.streams.dectris import recorder as rec_mod

    disk = 400_000

    def space_left(folder, file=None):
        return disk - sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())

    monkeypatch.setattr(rec_mod, "space_left", space_left)
    frames = make_frames(400)
    with SimplonSender("tcp://127.0.0.1:0") as tx, pytest.raises(rec_mod.RecorderError, match="no space left") as err:
        record_series(tmp_path, tx, frames, frames_per_file=20, reserve_bytes=64_000)
    assert err.value.errno == 28 and "scan_data_" in str(err.value)
    got, ids = read_frames(tmp_path / "scan_master.h5")
    assert 0 < len(got) < 400 and np.array_equal(got, frames[: len(got)]) and np.array_equal(ids, np.arange(len(got)))
    assert not list(tmp_path.glob("*.part"))


def test_record_refuses_a_folder_it_cannot_write_before_listening(tmp_path, capsys):
    from beamloop.edge.cli import main

    (tmp_path / "a_file").write_text("")  # a folder under a file cannot be made (whoever runs the test)
    ro = tmp_path / "a_file" / "rec"
    assert main(["record", "tcp://127.0.0.1:1", "--out", str(ro)]) == 6
    assert "cannot write there" in capsys.readouterr().err
