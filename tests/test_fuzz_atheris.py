"""Coverage-guided fuzzing with atheris (libFuzzer for Python) of the decoders that take bytes from outside.

Each target runs in a child process (``python tests/test_fuzz_atheris.py TARGET -runs=N``), so that a crash
or a leak is reported as a failed test, not as the end of the test run. A target fails when anything but
the decoder's documented error comes out. The default runs are short (2,000 inputs per decoder, 300
image files, which go through the file system); the ``_long`` variants (``-m slow``) run 100,000. Skipped when atheris is not installed (it is in the
``safety`` extra; wheels exist for CPython on x86-64 Linux).
"""

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None
TARGETS = ("native_header", "bridge_request", "bridge_reply", "image_file")
SHORT_RUNS = {"image_file": 300}


def _targets():
    """Build the fuzz targets (called in the child, after atheris has instrumented the imports)."""
    import atheris

    with atheris.instrument_imports(include=["streams", "edge"]):
        from edge.bridge import BridgeError, decode_envelope, decode_reply
        from edge.imageio import ImageReadError, read_image
        from streams.errors import MalformedMessage
        from streams.native import decode_header

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

    return {"native_header": native_header, "bridge_request": bridge_request, "bridge_reply": bridge_reply,
            "image_file": image_file}


def _fuzz(target: str, runs: int) -> int:
    """Run one target in a child process; return the number of inputs it survived."""
    proc = subprocess.run([sys.executable, __file__, target, f"-runs={runs}", "-max_len=4096", "-rss_limit_mb=4096",
                           "-seed=1"], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"atheris found a failing input for {target}:\n{out[-4000:]}"
    done = re.findall(r"Done (\d+) runs", out)
    assert done, out[-2000:]
    return int(done[-1])


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (pip install -e '.[safety]')")
@pytest.mark.parametrize("target", TARGETS)
def test_atheris(target):
    runs = SHORT_RUNS.get(target, 2_000)
    assert _fuzz(target, runs) == runs


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (pip install -e '.[safety]')")
@pytest.mark.parametrize("target", TARGETS)
def test_atheris_long(target):
    assert _fuzz(target, 100_000) == 100_000


if __name__ == "__main__":
    import atheris

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    fn = _targets()[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], fn)
    atheris.Fuzz()
