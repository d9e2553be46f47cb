"""Coverage-guided fuzzing with atheris (libFuzzer for Python) of the decoders that take bytes from outside.

Targets: the native stream's header decoder, the bridge's request and reply decoders, image files, the
Stream V2 message decoder, and a DECTRIS detector receiver for each protocol (SIMPLON v1, Stream V2) fed
multipart messages over an in-process socket. A receiver input holds several messages, split at
:data:`MSG_SEP`, each split into parts at :data:`PART_SEP`; libFuzzer starts from a good series of that
protocol (a seed corpus) and mutates it. A receiver may raise only :class:`ProtocolError`, and each one
must be counted.

Each target runs in a child process (``python tests/test_fuzz_atheris.py TARGET -runs=N``), so that a crash
or a leak is reported as a failed test, not as the end of the test run. A target fails when anything but
the decoder's documented error comes out. The default runs are short (2,000 inputs per decoder, 300
image files, which go through the file system, 500 inputs per receiver); the ``_long`` variants (``-m slow``)
run 100,000, or ``BEAMLOOP_ATHERIS_RUNS`` when set. Skipped when atheris is not installed (it is in the ``fuzz`` extra;
wheels exist for CPython on x86-64 Linux).
"""

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
TARGETS = ("native_header", "bridge_request", "bridge_reply", "image_file", "stream_v2_message",
           "simplon1_receiver", "stream2_receiver")
SHORT_RUNS = {"image_file": 300, "simplon1_receiver": 500, "stream2_receiver": 500}
NUMBA_MODULES = ("beamloop.streams.dectris.codecs", "beamloop.streams.dectris.receiver",
                 "beamloop.streams.dectris.zmqfast")
"""Modules with numba-compiled functions; instrumenting them breaks their compilation."""
LONG_RUNS = int(os.environ.get("BEAMLOOP_ATHERIS_RUNS", "100000"))
MSG_SEP = b"\n==msg==\n"
PART_SEP = b"\n--part--\n"


def _good_series(protocol: str) -> bytes:
    """A good series (start, two 8x6 uint16 frames, end) of a detector protocol as one fuzz input."""
    import datetime

    import numpy as np

    frames = (np.arange(96, dtype=np.uint16).reshape(2, 8, 6) * 131) % 1000
    if protocol == "simplon1":
        from beamloop.streams.dectris import simplon

        msgs = [[bytes(memoryview(p).cast("B")) for p in m] for m in simplon.series_messages(frames, series=3)]
    else:
        from beamloop.streams.dectris import stream_v2
        from beamloop.streams.dectris.series import DetectorSeries

        s = DetectorSeries("stream2", 1, "atheris", ("threshold_1",), frames.shape[1:], frames.dtype, len(frames))
        date = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
        msgs = [[stream_v2.encode_start(s)]]
        msgs += [[stream_v2.encode_image(s, i, {"threshold_1": stream_v2.image_array(f.tobytes(), f.shape, f.dtype,
                                                                                     "none")}, series_date=date)]
                 for i, f in enumerate(frames)]
        msgs.append([stream_v2.encode_end(s)])
    return MSG_SEP.join(PART_SEP.join(parts) for parts in msgs)


def _seeds(target: str) -> list[bytes]:
    if target.endswith("_receiver"):
        return [_good_series(target.split("_")[0])]
    if target == "stream_v2_message":
        return _good_series("stream2").split(MSG_SEP)
    return []


def _targets():
    """Build the fuzz targets (called in the child, after atheris has instrumented the imports)."""
    import atheris

    # numba compiles from bytecode, which atheris' instrumentation changes: its modules stay uninstrumented
    # (atheris matches ``include`` on the top-level package: everything of beamloop imported here)
    with atheris.instrument_imports(include=["beamloop"], exclude=list(NUMBA_MODULES)):
        from beamloop.edge.control.protocol import BridgeError, decode_envelope, decode_reply
        from beamloop.edge.io.imageio import ImageReadError, read_image
        from beamloop.streams.dectris import (
            receiver,  # noqa: F401 - instrumented for the receiver targets
            simplon,  # noqa: F401 - instrumented for the receiver targets
            stream_v2,  # noqa: F401 - instrumented for the receiver targets
        )
        from beamloop.streams.errors import MalformedMessage
        from beamloop.streams.native.protocol import decode_header

    def native_header(data: bytes) -> None:
        try:
            decode_header(data)
        except MalformedMessage:
            pass

    def bridge_request(data: bytes) -> None:
        try:
            decode_envelope(data)
        except BridgeError as exc:
            assert exc.code == "bad_request"

    def bridge_reply(data: bytes) -> None:
        try:
            decode_reply(data, "fuzz")
        except BridgeError:
            pass

    folder = Path(tempfile.mkdtemp(prefix="beamloop-atheris-"))
    suffixes = (".tif", ".png", ".npy", ".hspy")

    def image_file(data: bytes) -> None:
        if not data:
            return
        path = folder / f"fuzz{suffixes[data[0] % len(suffixes)]}"
        path.write_bytes(data[1:])
        try:
            img = read_image(path)
        except ImageReadError:
            return
        assert img.data.ndim in (2, 3)

    def stream_v2_message(data: bytes) -> None:
        try:
            msg = stream_v2.loads(data)
            if msg.get("type") == "start":
                stream_v2.series_from_start(msg)
        except MalformedMessage:
            pass

    return {"native_header": native_header, "bridge_request": bridge_request, "bridge_reply": bridge_reply,
            "image_file": image_file, "stream_v2_message": stream_v2_message,
            "simplon1_receiver": _receiver("simplon1"), "stream2_receiver": _receiver("stream2")}


def _receiver(protocol: str):
    """Target: the messages of one input into a DetectorReceiver; only counted ProtocolErrors may come out."""
    import zmq

    from beamloop.streams.dectris.receiver import DetectorReceiver
    from beamloop.streams.errors import ProtocolError

    state = {}

    def target(data: bytes) -> None:
        if not state:  # sockets are made on first use, after libFuzzer has started
            ctx = zmq.Context.instance()
            state["rx"] = DetectorReceiver(f"inproc://atheris-{protocol}", protocol=protocol, bind=True, stack_size=2,
                                           stacks=2, context=ctx)
            tx = state["tx"] = ctx.socket(zmq.PUSH)
            tx.setsockopt(zmq.LINGER, 0)
            tx.connect(f"inproc://atheris-{protocol}")
        rx, tx = state["rx"], state["tx"]
        for msg in data.split(MSG_SEP)[:8]:
            tx.send_multipart(msg.split(PART_SEP)[:6])
        for _ in range(100):  # read until nothing is left
            before = rx.counters.rejected
            try:
                if rx.recv(0) is None:
                    break
            except ProtocolError as exc:
                assert rx.counters.rejected > before, f"uncounted {type(exc).__name__}: {exc}"
        else:
            raise AssertionError("the receiver returned events without end")

    return target


def _fuzz(target: str, runs: int) -> int:
    """Run one target in a child process; return the number of inputs it survived."""
    crashes = tempfile.mkdtemp(prefix=f"beamloop-atheris-{target}-crash-")  # libFuzzer writes failing inputs here
    proc = subprocess.run([sys.executable, __file__, target, f"-runs={runs}", "-max_len=4096", "-rss_limit_mb=4096",
                           "-seed=1", f"-artifact_prefix={crashes}/"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"atheris found a failing input for {target} (saved in {crashes}):\n{out[-4000:]}"
    done = re.findall(r"Done (\d+) runs", out)
    assert done, out[-2000:]
    return int(done[-1])


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (pip install -e '.[fuzz]')")
@pytest.mark.parametrize("target", TARGETS)
def test_atheris(target):
    runs = SHORT_RUNS.get(target, 2_000)
    assert _fuzz(target, runs) == runs


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (pip install -e '.[fuzz]')")
@pytest.mark.parametrize("target", TARGETS)
def test_atheris_long(target):
    assert _fuzz(target, LONG_RUNS) == LONG_RUNS


if __name__ == "__main__":
    import atheris

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    name = sys.argv[1]
    fn = _targets()[name]
    corpus = []
    if _seeds(name):  # libFuzzer starts from these and adds what it finds to the folder
        folder = Path(tempfile.mkdtemp(prefix=f"beamloop-atheris-{name}-"))
        for k, seed in enumerate(_seeds(name)):
            (folder / f"seed{k}").write_bytes(seed)
        corpus = [str(folder)]
    atheris.Setup([sys.argv[0], *sys.argv[2:], *corpus], fn)
    atheris.Fuzz()
