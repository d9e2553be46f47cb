"""Faults end cleanly (the CLI, the experiments, the run file): signals blank the beam first and write what was
recorded; a lost controller, a failed blank or no frames stop the experiment with an exit status that says
so (edge/cli/__init__.py); a full disk is an error naming the file and the run file stays readable; invalid
options are one-line errors that start nothing; frame endpoints stay on loopback.

Subprocess tests wait with generous guards against hanging; none of them measures real time.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from beamloop.edge.cli import (
    EXIT_CONTROLLER_LOST,
    EXIT_ERROR,
    EXIT_NO_FRAMES,
    EXIT_OUTPUT,
    EXIT_SIGNAL,
    main,
    worst_status,
)
from beamloop.edge.control.client import BridgeClient
from beamloop.edge.control.keys import InsecureBindError, check_bind
from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.io import runlog
from beamloop.edge.io.runlog import RunLog, RunLogError, write_text_file

PY = sys.executable


def beamloop(*args, **kw):
    return subprocess.Popen([PY, "-m", "beamloop.edge.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def wait_for(cond, timeout_s=60.0):
    """Whether ``cond()`` holds within ``timeout_s`` (a guard against hanging, not a limit under test)."""
    t_end = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < t_end:
        time.sleep(0.05)
    return cond()


def children(pid):
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


# exit codes ------------------------------------------------------------------------------------------------
def test_the_most_severe_status_wins():
    assert worst_status() == 0 and worst_status(0, 0) == 0
    assert worst_status(EXIT_NO_FRAMES, 5, EXIT_OUTPUT) == 5
    assert worst_status(EXIT_NO_FRAMES, EXIT_SIGNAL + 2) == 130
    assert worst_status(EXIT_OUTPUT, EXIT_CONTROLLER_LOST) == EXIT_CONTROLLER_LOST
    assert worst_status(EXIT_ERROR, EXIT_NO_FRAMES) == EXIT_NO_FRAMES


# invalid options ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, text", [
    (["--shape", "4096x4096"], "outside the simulator's 16 .. 2048"),
    (["--dose", "1e-30"], "needs a pixel dwell"),
    (["--pixel-size", "1e-9"], "outside 0.001 .. 100 A"),
    (["--pixel-size", "5"], "more than the simulated specimen"),
    (["--max-dwell", "60"], "parked-beam limit"),
])
def test_invalid_run_options_are_one_line_errors_that_start_nothing(options, text, tmp_path, capsys, monkeypatch):
    from beamloop.edge.experiments import closed_loop

    monkeypatch.setattr(closed_loop, "start_simulator", lambda *a, **k: pytest.fail("a simulator was started"))
    assert main(["run", "--quiet", "--out", str(tmp_path / "r"), *options]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [
    ["run", "--rounds", "-1"], ["run", "--targets", "-3"], ["sim", "--block-samples", "0"],
    ["sim", "--block-samples", "-5"], ["sim", "--sample-time-us", "1e-9"], ["sim", "--distortion-scale", "nan"],
    ["sim", "--max-point-electrons", "0"], ["serve", "--rounds", "-2"],
])
def test_invalid_options_are_refused_by_the_parser(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_frame_endpoints_stay_on_loopback(tmp_path, capsys):
    with pytest.raises(InsecureBindError, match="--insecure"):
        check_bind("tcp://0.0.0.0:5555", None, what="frame stream", insecure_option="--insecure")
    check_bind("tcp://127.0.0.1:5555", None, what="frame stream")
    assert main(["sim", "--frames", "tcp://0.0.0.0:0", "--control", "tcp://127.0.0.1:0", "--duration", "0.1"]) == 1
    assert "refusing to bind the frame stream to tcp://0.0.0.0:0" in capsys.readouterr().err
    assert main(["serve", "--bind", "--frames", "tcp://*:0", "--out", str(tmp_path)]) == 1
    assert "pass --insecure" in capsys.readouterr().err


def test_a_port_in_use_is_a_one_line_error(capsys):
    import zmq

    s = zmq.Context.instance().socket(zmq.PULL)
    s.bind("tcp://127.0.0.1:*")
    try:
        ep = s.getsockopt_string(zmq.LAST_ENDPOINT)
        assert main(["sim", "--frames", ep, "--control", "tcp://127.0.0.1:0", "--duration", "0.1"]) == 1
        err = capsys.readouterr().err
        assert "Address already in use" in err and "Traceback" not in err
    finally:
        s.close(linger=0)


# serve: no frames, a second consumer, an unauthorised key -----------------------------------------------------
def test_serve_without_frames_exits_3_and_leaves_a_readable_file(tmp_path):
    assert main(["serve", "--frames", "tcp://127.0.0.1:1", "--idle-timeout", "0.3", "--out", str(tmp_path)]) \
        == EXIT_NO_FRAMES
    with h5py.File(tmp_path / "serve.h5") as f:
        assert len(f["frames"]) == 0 and not f.attrs["complete"] and f.attrs["stopped"] == "no frame arrived"
    assert not (tmp_path / "serve.h5.part").exists()


def test_a_second_consumer_stops_the_experiment_and_is_named(run_microscope, tmp_path, capsys):
    from beamloop.streams.native.receiver import FrameReceiver

    with run_microscope(seed=2, drain=False) as mic, FrameReceiver(mic.frames_endpoint) as rogue:
        stop = threading.Event()

        def take():
            while not stop.is_set():
                try:
                    rogue.recv(10)
                except Exception:  # noqa: BLE001 - the rogue only takes messages
                    pass

        th = threading.Thread(target=take, daemon=True)
        th.start()
        try:
            rc = main(["serve", "--frames", mic.frames_endpoint, "--bridge", mic.control_endpoint, "--experiment",
                       "vacancy-line", "--rounds", "1", "--targets", "1", "--out", str(tmp_path)])
        finally:
            stop.set()
            th.join()
        assert mic.blanked is True
    out = capsys.readouterr()
    assert rc == EXIT_NO_FRAMES, out.err
    assert "no_frames" in out.err and "another consumer" in out.err + out.out


@pytest.mark.skipif(not __import__("zmq").has("curve"), reason="this libzmq has no CURVE support")
def test_serve_with_an_unauthorised_key_stops_instead_of_hanging(run_microscope, tmp_path, capsys):
    from beamloop.edge.control.keys import ServerKeys, authorize, create_key_pair
    from beamloop.edge.sim.microscope import MicroscopeConfig

    for name in ("server", "client", "rogue"):
        create_key_pair(tmp_path, name)
    authorize(tmp_path / "client.key", tmp_path / "authorized")
    keys = ServerKeys.load(tmp_path / "server.key_secret", tmp_path / "authorized")
    cfg = MicroscopeConfig(frames="tcp://127.0.0.1:*", control="tcp://127.0.0.1:*", keys=keys, seed=1)
    with run_microscope(cfg, drain=True) as mic:
        rc = main(["serve", "--frames", mic.frames_endpoint, "--bridge", mic.control_endpoint, "--experiment",
                   "vacancy-line", "--rounds", "1", "--keys", str(tmp_path / "rogue.key_secret"), "--server-key",
                   str(tmp_path / "server.key"), "--bridge-timeout-ms", "500", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == EXIT_CONTROLLER_LOST and "refused this client's CURVE key" in err


# signals ---------------------------------------------------------------------------------------------------------
def test_sigint_mid_dwell_blanks_through_the_bridge_and_writes_the_frames(tmp_path):
    """SIGINT to ``serve`` in the middle of a dwell: the service blanks (the controller's watchdog never has
    to), writes the frame with the dwells done, and exits 130."""
    sim = beamloop("sim", "--announce", "--frames", "tcp://127.0.0.1:*", "--control", "tcp://127.0.0.1:*",
                   "--seed", "9", "--max-park", "10")
    try:
        ends = json.loads(sim.stdout.readline().split(" ", 1)[1])
        serve = beamloop("serve", "--frames", ends["frames"], "--bridge", ends["control"], "--experiment",
                         "vacancy-line", "--rounds", "2", "--targets", "3", "--out", str(tmp_path))
        lines = []
        for line in serve.stdout:  # wait until the first dwell started
            lines.append(line)
            if " targets" in line and line.startswith("frame 0"):
                break
        time.sleep(0.05)
        serve.send_signal(signal.SIGINT)
        out, err = serve.communicate(timeout=120)
        assert serve.returncode == EXIT_SIGNAL + signal.SIGINT, err
        assert "Traceback" not in err and "experiment stopped (interrupted)" in err
        with BridgeClient(ends["control"]) as monitor:
            st = monitor.get_state()
        assert st["blanked"] is True and st["safety"]["counters"]["watchdog_trips"] == 0
        with h5py.File(tmp_path / "serve.h5") as f:
            assert len(f["frames"]) == 1 and f.attrs["stopped"].startswith("interrupted")
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.communicate(timeout=60)
    assert sim.returncode == EXIT_SIGNAL + signal.SIGTERM  # the simulator too: blanked and closed on SIGTERM


def test_run_notices_its_simulator_died(tmp_path):
    """SIGKILL of ``run``'s simulator child: ``run`` stops at once (the bridge client polls the child), says
    so, writes its report and the frames so far, and exits 4."""
    run = beamloop("run", "--rounds", "4", "--targets", "2", "--shape", "128x128", "--out", str(tmp_path))
    seen = []

    def read_progress():  # the progress bar's text (stderr, carriage returns, no newlines)
        while chunk := os.read(run.stderr.fileno(), 4096):
            seen.append(chunk.decode(errors="replace"))

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: "targets" in "".join(seen), 180), "".join(seen)  # the first frame is in
        sim_pid = children(run.pid)[0]
        os.kill(sim_pid, signal.SIGKILL)
        run.wait(timeout=120)
        reader.join(30)
        err = "".join(seen)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == EXIT_CONTROLLER_LOST, err
    assert "simulator process exited" in err and "Traceback" not in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["outcome"]["reason"] == "controller_lost" and report["bridge_counters"]["timeouts"] == 0
    with h5py.File(tmp_path / "run.h5") as f:
        assert not f.attrs["complete"]


# disk full ---------------------------------------------------------------------------------------------------------
FILL = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
    from beamloop.edge.frame.columns import ColumnTable
    from beamloop.edge.io.runlog import RunLog, RunLogError
    rng = np.random.default_rng(0)
    try:
        with RunLog(sys.argv[1]) as rl:
            for k in range(100):
                rl.add_frame(rng.integers(0, 65535, (128, 128), dtype=np.uint16), ColumnTable.empty())
    except RunLogError as exc:
        print(exc)
        sys.exit(6)
""")


def test_a_full_disk_stops_the_run_file_cleanly(tmp_path):
    path = tmp_path / "run.h5"
    p = subprocess.run([PY, "-c", FILL, str(path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 6, p.stderr
    assert str(path) in p.stdout and "no space left" in p.stdout
    with h5py.File(path) as f:  # readable, with every frame written before the disk was full
        n = len(f["frames"])
        assert 10 < n < 100 and f.attrs["frames_written"] == n and not f.attrs["complete"]
        assert f["frames/000000/image"].shape == (128, 128)
    assert not (tmp_path / "run.h5.part").exists()


def test_a_write_that_fails_anyway_keeps_a_readable_file(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    rl = RunLog(path)
    rl.add_frame(np.zeros((32, 32), np.uint16), ColumnTable.empty())
    real = rl._frames.create_group

    def full(name):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rl._frames, "create_group", full, raising=False)
    with pytest.raises(RunLogError) as err:
        rl.add_frame(np.zeros((32, 32), np.uint16), ColumnTable.empty())
    assert err.value.errno == errno.ENOSPC and str(path) in str(err.value)
    with pytest.raises(RunLogError):  # nothing more is written after a failure
        rl.write_text("events", [])
    monkeypatch.setattr(rl._frames, "create_group", real, raising=False)
    rl.close()
    with h5py.File(path) as f:
        assert len(f["frames"]) == 1


def test_a_report_is_never_left_truncated(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_text("old")

    def no_space(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(RunLogError, match=str(target)):
        write_text_file(target, "{}")
    monkeypatch.undo()
    assert target.read_text() == "old" and not (tmp_path / "report.json.part").exists()


def test_serve_on_a_full_disk_exits_6_naming_the_file(tmp_path, monkeypatch, capsys):
    from beamloop.edge.sim.frames import mos2_frame
    from beamloop.streams.native.sender import FrameSender

    counts = mos2_frame(shape=(96, 96), pixel_size_A=0.15, dose_e_per_A2=1e5, seed=1).counts.astype(np.uint16)
    sender = FrameSender("tcp://127.0.0.1:*", bind=True, send_timeout_ms=5000)
    stop = threading.Event()

    def send():
        while not stop.is_set():
            try:
                sender.start_series(["haadf"], counts.shape, counts.dtype, user_data={"kind": "frame",
                                                                                      "pixel_size_A": 0.15})
                sender.send_frame({"haadf": counts})
                sender.end_series()
            except TimeoutError:
                pass
            time.sleep(0.05)

    calls = {"n": 0}

    def left(folder, file=None):
        calls["n"] += 1
        return 1 << 30 if calls["n"] <= 2 else 300 * 1024  # the file and its header fit; the first frame not

    monkeypatch.setattr(runlog, "space_left", left)
    th = threading.Thread(target=send, daemon=True)
    th.start()
    try:
        rc = main(["serve", "--frames", sender.endpoint, "--max-frames", "3", "--out", str(tmp_path)])
    finally:
        stop.set()
        th.join()
        sender.close()
    err = capsys.readouterr().err
    assert rc == EXIT_OUTPUT and str(tmp_path / "serve.h5") in err and "no space left" in err
    with h5py.File(tmp_path / "serve.h5") as f:
        assert len(f["frames"]) == 0 and not f.attrs["complete"]


def test_a_failed_blank_stops_the_experiment(run_microscope):
    """The controller cannot blank (its blanker fails): the dwell reports blank_failed and the experiment stops
    at once (beam_unsafe), keeping the frame; it does not go on to the next target."""
    from beamloop.edge.experiments.vacancy_line import ExperimentConfig, ExperimentStopped, vacancy_line
    from beamloop.edge.path import frame_path
    from beamloop.edge.service import EdgeService
    from beamloop.edge.stages.policy import VacancyLinePolicy
    from beamloop.streams.native.receiver import FrameReceiver

    with run_microscope(seed=9, max_park_s=3.0) as mic, FrameReceiver(mic.frames_endpoint) as rx, \
            BridgeClient(mic.control_endpoint, timeout_ms=5000) as bridge:
        real = mic.backend.set_blanked

        def broken(on):
            if on:
                raise RuntimeError("blanker does not answer")
            return real(on)

        service = EdgeService(rx, frame_path("classical", "MoS2", VacancyLinePolicy(3)), bridge)
        cfg = ExperimentConfig(rounds=1, shape=(192, 192), fov_nm=192 * 0.15 / 10, dwell_us=14.4, targets_per_frame=3)
        mic.backend.set_blanked = broken
        try:
            with pytest.raises(ExperimentStopped) as stop:
                vacancy_line(service, cfg)
        finally:
            mic.backend.set_blanked = real
        assert stop.value.reason == "beam_unsafe" and "could not be blanked" in stop.value.message
        rec = stop.value.records
        assert len(rec) == 1 and len(rec[0].dwells) == 1 and rec[0].dwells[0].reason == "blank_failed"
        assert service.stats.blank_failures >= 2
        assert wait_for(lambda: mic.blanked, 30)  # the controller keeps trying, and blanks once it can
