"""``beamloop stream`` / ``receive`` / ``record`` (beamloop.streams.cli) end to end over real sockets.

The commands are registered as the ``beamloop`` command registers them, with edge's live imager and 4D-STEM
simulator (beamloop.edge.cli.stream4d). The simulated scan is sent as a detector would, received with live
virtual images, and the images are checked against a plain numpy reduction of the very frames that were sent;
a recording is replayed in the other protocol and received bit-exact. Registered without those providers, the
commands refuse ``--scan`` and ``sim4d`` with a message.
"""

import argparse
import json
import signal
import socket
import threading

import numpy as np
import pytest

from beamloop.edge.analysis import live4d
from beamloop.edge.cli import build_parser, stream4d
from beamloop.streams import cli
from beamloop.streams.dectris.recorder import read_frames

SCAN = (4, 5)
DET = 32


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """cmd_receive/cmd_record install SIGINT/SIGTERM handlers (to stop cleanly); give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


def parse(argv, providers=True):
    """Parse as the ``beamloop`` command does (its own parser), or with streams' commands alone."""
    if providers:
        return build_parser().parse_args(argv)
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers())
    return p.parse_args(argv)


def sent_frames(sargs):
    """The frames ``stream sim4d`` sent (the same seed gives the same frames)."""
    return stream4d.sim4d_frames(sargs.scan, sargs.detector, sargs.electrons, sargs.seed)


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def in_thread(args) -> tuple[threading.Thread, list]:
    rc = []
    t = threading.Thread(target=lambda: rc.append(args.func(args)), daemon=True)
    t.start()
    return t, rc


def sim_args(endpoint, protocol, compression="bslz4"):
    return parse(["stream", "sim4d", "--bind", endpoint, "--protocol", protocol, "--compression", compression,
                  "--scan", f"{SCAN[0]}x{SCAN[1]}", "--detector", str(DET), "--wait", "0.5", "--seed", "3"])


def receive(endpoint, protocol, out):
    args = parse(["receive", endpoint, "--protocol", protocol, "--scan", f"{SCAN[0]}x{SCAN[1]}", "--out", str(out),
                  "--quiet", "--duration", "60"])
    assert args.func(args) == 0
    return json.loads((out / "counters.json").read_text())


def expected_images(frames):
    """BF and ADF by numpy, with the detectors cmd_receive uses by default (disk of a sixth of the detector,
    annulus from 1.25 x that to the edge, centred)."""
    centre = ((DET - 1) / 2, (DET - 1) / 2)
    bf = live4d.disk_mask((DET, DET), DET / 6, centre)
    adf = live4d.annulus_mask((DET, DET), DET / 6 * 1.25, DET / 2, centre)
    f = frames.astype(np.float64)
    return {"bf": (f * bf).sum((1, 2)).reshape(SCAN), "adf": (f * adf).sum((1, 2)).reshape(SCAN)}


@pytest.mark.parametrize("protocol, compression", [("simplon1", "bslz4"), ("stream2", "bslz4"), ("stream2", "lz4"),
                                                   ("simplon1", "none"), ("merlin", "none")])
def test_stream_sim4d_and_receive_live_images(tmp_path, protocol, compression):
    ep = free_endpoint()
    sargs = sim_args(ep, protocol, compression)
    t, rc = in_thread(sargs)
    counters = receive(ep, protocol, tmp_path)
    t.join(30)
    assert rc == [0]
    n = SCAN[0] * SCAN[1]
    assert counters["frames"] == n and counters["decoded"] == n and counters["rejected"] == 0
    assert counters["series_ended"] == 1 and counters["missing_frames"] == 0
    want = expected_images(sent_frames(sargs))
    for name, img in want.items():
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), img, rtol=1e-12)
    assert np.load(tmp_path / "com_row.npy").shape == SCAN and (tmp_path / "virtual_images.png").stat().st_size


@pytest.mark.slow
def test_record_then_replay_in_the_other_protocol(tmp_path, capsys):
    """Record a SIMPLON v1 stream to HDF5, replay the recording as Stream V2: the frames survive bit-exact."""
    ep = free_endpoint()
    sargs = sim_args(ep, "simplon1")
    t, rc = in_thread(sargs)
    rec = parse(["record", ep, "--out", str(tmp_path / "rec"), "--prefix", "scan"])
    assert rec.func(rec) == 0
    t.join(30)
    assert rc == [0]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "done" and events[-1]["counters"]["frames"] == SCAN[0] * SCAN[1]
    master = tmp_path / "rec" / "scan_master.h5"
    frames = sent_frames(sargs)
    stored, ids = read_frames(master)
    assert np.array_equal(stored, frames) and ids.tolist() == list(range(len(frames)))

    ep2 = free_endpoint()
    t, rc = in_thread(parse(["stream", str(master), "--bind", ep2, "--protocol", "stream2", "--wait", "0.5"]))
    counters = receive(ep2, "stream2", tmp_path / "replay")
    t.join(30)
    assert rc == [0] and counters["frames"] == SCAN[0] * SCAN[1] and counters["rejected"] == 0
    for name, img in expected_images(frames).items():
        np.testing.assert_allclose(np.load(tmp_path / "replay" / f"{name}.npy"), img, rtol=1e-12)


def test_stream_refuses_a_missing_recording(tmp_path, capsys):
    args = parse(["stream", str(tmp_path / "nothing_master.h5"), "--bind", free_endpoint(), "--wait", "0"])
    assert args.func(args) == 2
    assert "cannot read recording" in capsys.readouterr().err


def test_without_providers_scan_and_sim4d_are_refused(capsys):
    """streams.cli registered on its own (no edge): ``receive --scan`` and ``stream sim4d`` exit 2 and say why."""
    args = parse(["receive", free_endpoint(), "--scan", "4x5", "--duration", "0.1"], providers=False)
    assert args.func(args) == 2 and "no live imager registered" in capsys.readouterr().err
    args = parse(["stream", "sim4d", "--bind", free_endpoint(), "--wait", "0"], providers=False)
    assert args.func(args) == 2 and "no simulator registered" in capsys.readouterr().err


def test_record_a_merlin_stream_to_zarr(tmp_path, capsys):
    """``stream --protocol merlin`` (a Merlin's data port) recorded with ``record --protocol merlin --format zarr``."""
    pytest.importorskip("zarr")
    ep = free_endpoint()
    sargs = sim_args(ep, "merlin")
    t, rc = in_thread(sargs)
    rec = parse(["record", ep, "--protocol", "merlin", "--format", "zarr", "--out", str(tmp_path), "--prefix", "m"])
    assert rec.func(rec) == 0
    t.join(30)
    assert rc == [0]
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert events[0] == {"event": "listening", "endpoint": ep, "protocol": "merlin", "format": "zarr"}
    assert events[-1]["event"] == "done" and events[-1]["masters"] == [str(tmp_path / "m.zarr")]
    stored, ids = read_frames(tmp_path / "m.zarr")
    assert np.array_equal(stored, sent_frames(sargs)) and ids.tolist() == list(range(SCAN[0] * SCAN[1]))


def test_receive_assembles_live_images_of_every_channel(tmp_path):
    """A two-threshold Stream V2 series: ``receive --scan`` writes the virtual images of each channel."""
    from beamloop.streams.dectris.stream_v2 import Stream2Sender

    frames = stream4d.sim4d_frames(SCAN, DET, 2000.0, 5)
    high = (frames // 2).astype(frames.dtype)
    ep = free_endpoint()

    def send():
        with Stream2Sender(ep.replace("127.0.0.1", "*")) as tx:
            import time

            time.sleep(0.5)
            tx.start_series((DET, DET), frames.dtype, len(frames), channels=("threshold_1", "threshold_2"))
            for f, h in zip(frames, high):
                tx.send_frame({"threshold_1": f, "threshold_2": h})
            tx.end_series()

    t = threading.Thread(target=send, daemon=True)
    t.start()
    counters = receive(ep, "stream2", tmp_path)
    t.join(30)
    assert counters["frames"] == len(frames) and counters["rejected"] == 0
    for ch, sent in (("threshold_1", frames), ("threshold_2", high)):
        for name, img in expected_images(sent).items():
            np.testing.assert_allclose(np.load(tmp_path / f"{ch}_{name}.npy"), img, rtol=1e-12)


def test_receive_http_serves_the_live_images_and_counters(tmp_path):
    import urllib.request

    pytest.importorskip("aiohttp")
    ep = free_endpoint()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sargs = sim_args(ep, "simplon1")
    rargs = parse(["receive", ep, "--protocol", "simplon1", "--scan", f"{SCAN[0]}x{SCAN[1]}", "--quiet",
                   "--series", "2", "--duration", "6", "--http", f"127.0.0.1:{port}"])
    n = SCAN[0] * SCAN[1]
    seen: dict = {}

    def poll() -> None:  # the page's view while receive runs (in the main thread: it installs signal handlers)
        for _ in range(400):
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                line = [ln for ln in text.splitlines() if ln.startswith("beamloop_frames_received_total")]
                if line and int(float(line[0].split()[-1])) == n:
                    seen["frames"] = n
                    seen["png"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/image/adf", timeout=5).read()
                    return
            except OSError:
                pass
            threading.Event().wait(0.02)

    st, src = in_thread(sargs)
    pt = threading.Thread(target=poll, daemon=True)
    pt.start()
    assert rargs.func(rargs) == 0
    st.join(30)
    pt.join(30)
    assert src == [0]
    assert seen.get("frames") == n and seen["png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_receive_http_refuses_a_public_address_and_without_a_view(capsys):
    args = parse(["receive", free_endpoint(), "--http", "0.0.0.0:0", "--duration", "0.2", "--quiet"])
    with pytest.raises(ValueError, match="loopback"):
        args.func(args)
    bare = parse(["receive", free_endpoint(), "--http", "127.0.0.1:0", "--duration", "0.2"], providers=False)
    assert bare.func(bare) == 2
    assert "no live view registered" in capsys.readouterr().err
