"""Fuzzing image files (edge/imageio.read_image) with hypothesis: arbitrary bytes and damaged copies of good
TIFF, PNG, NumPy and HyperSpy files.

Property: ``read_image`` returns a 2-D frame or 3-D stack of real numbers, or raises
:class:`ImageReadError` naming the file; nothing else comes out. HDF5 parsing happens in the HDF5 C
library, where a damaged file could crash the process: those cases run in a child process, so that a
crash is reported as a failure instead of ending the test run. Default runs are short; ``_long``
variants (``-m slow``) run 5,000 examples per format.
"""

import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beamloop.edge.io.imageio import ImageReadError, read_image

FAST = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
LONG = settings(max_examples=int(os.environ.get("BEAMLOOP_FUZZ_EXAMPLES", "5000")), deadline=None,
                suppress_health_check=list(HealthCheck))
"""The ``_long`` runs: 5_000 examples, or ``BEAMLOOP_FUZZ_EXAMPLES`` when set (counts are printed by pytest's
``--hypothesis-show-statistics``)."""
FRAME = (np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 37) % 4099


def good_tiff() -> bytes:
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, FRAME, imagej=True, resolution=(1 / 0.015, 1 / 0.015), metadata={"unit": "nm"})
    return buf.getvalue()


def good_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((FRAME % 256).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def good_npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, FRAME.astype(np.float32))
    return buf.getvalue()


def good_hspy() -> bytes:
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        g = f.create_group("Experiments/frame")
        g.create_dataset("data", data=FRAME)
        for k in range(2):
            a = g.create_group(f"axis-{k}")
            a.attrs.update(scale=0.015, units="nm", navigate=False)
    return buf.getvalue()


GOOD = {".tif": good_tiff(), ".png": good_png(), ".npy": good_npy(), ".hspy": good_hspy()}


@st.composite
def damaged(draw, suffix):
    """A good file of that type with bytes flipped, cut, inserted or overwritten."""
    data = bytearray(GOOD[suffix])
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "overwrite", "truncate"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[i: i + draw(st.integers(1, 64))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif op == "overwrite":
            chunk = draw(st.sampled_from([b"\xff\xff\xff\x7f", b"\x00\x00\x00\x00", b"\xff" * 8,
                                          (2**31 - 1).to_bytes(4, "little"), (2**16).to_bytes(4, "big")])
                         | st.binary(min_size=1, max_size=16))
            data[i: i + len(chunk)] = chunk
        elif op == "truncate":
            del data[i:]
    return bytes(data)


CHECKED: dict[str, int] = {}
"""Files read per suffix in this process (the HDF5 child reports its count)."""


def check_read(suffix: str, payload: bytes) -> None:
    CHECKED[suffix] = CHECKED.get(suffix, 0) + 1
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{suffix}"
        path.write_bytes(payload)
        try:
            img = read_image(path)
        except ImageReadError as exc:
            assert str(path) in str(exc)
            return
        assert img.data.ndim in (2, 3) and img.data.dtype.kind in "uif" and min(img.data.shape) > 0
        assert img.pixel_size_A is None or isinstance(img.pixel_size_A, float)


def test_good_files_read_back():
    for suffix in GOOD:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"good{suffix}"
            path.write_bytes(GOOD[suffix])
            img = read_image(path)
            expect = FRAME % 256 if suffix == ".png" else FRAME
            assert np.array_equal(img.data, expect), suffix
            if suffix in (".tif", ".hspy"):
                assert img.pixel_size_A == pytest.approx(0.15)


def _in_process(suffix, n):
    strategy = st.one_of(damaged(suffix), st.binary(max_size=400))
    return settings(FAST if n == "fast" else LONG)(given(payload=strategy)(lambda payload: check_read(suffix, payload)))


@pytest.mark.parametrize("suffix", [".tif", ".png", ".npy"])
def test_read_image_fuzz(suffix):
    before = CHECKED.get(suffix, 0)
    _in_process(suffix, "fast")()
    print(f"{suffix}: {CHECKED[suffix] - before} files read")  # shown with pytest -s


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".tif", ".png", ".npy"])
def test_read_image_fuzz_long(suffix):
    before = CHECKED.get(suffix, 0)
    _in_process(suffix, "long")()
    print(f"{suffix}: {CHECKED[suffix] - before} files read")


CHILD = """
import sys
sys.path.insert(0, {tests!r})
import test_fuzz_imageio as t
t._in_process(".hspy", {n!r})()
print("SURVIVED", t.CHECKED.get(".hspy", 0))
"""


def _hdf5_in_child(n: str) -> None:
    code = CHILD.format(tests=str(Path(__file__).parent), n=n)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and "SURVIVED" in proc.stdout, (
        f"the HDF5 fuzz child ended with status {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(proc.stdout.strip().splitlines()[-1], "HDF5 files read")  # shown with pytest -s


def test_read_image_fuzz_hdf5():
    _hdf5_in_child("fast")


@pytest.mark.slow
def test_read_image_fuzz_hdf5_long():
    _hdf5_in_child("long")
