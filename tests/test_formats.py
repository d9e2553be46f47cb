"""Reading the formats microscopes write (edge/io/formats.py through RosettaSciIO, edge/io/imageio.py):
the sample files of tests/data/formats against the image and pixel size written into them."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from beamloop.edge.io.imageio import ImageReadError, image_files, length_to_A, read_image

DATA = Path(__file__).parent / "data" / "formats"
TRUTH = np.load(DATA / "truth.npy")

# file, pixel size written (Angstrom; None: the format holds none), units as the file writes them, reader
SAMPLES = [
    ("image.dm3", 0.213, "nm", "rsciio.digitalmicrograph"),
    ("image.dm4", 0.213, "nm", "rsciio.digitalmicrograph"),
    ("image_berkeley.emd", 1.5, "nm", "rsciio.emd"),
    ("image_velox.emd", 1.5, "nm", "rsciio.emd"),  # metres in the file; RosettaSciIO picks a compact unit
    ("image_1.ser", 0.213, "nm", "rsciio.tia"),
    ("image.mrc", 0.75, "nm", "rsciio.mrc"),
    ("image.mib", None, None, "rsciio.quantumdetector"),
    ("image.hspy", 0.213, "nm", ""),
    ("image.tif", 0.213, "nm", ""),
]


def _quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **kw)


@pytest.mark.parametrize("name,pixel_A,units,reader", SAMPLES)
def test_sample_reads_back_as_written(name, pixel_A, units, reader):
    if reader:
        pytest.importorskip("rsciio")
    img = _quiet(read_image, DATA / name)
    assert img.data.shape == TRUTH.shape  # rows x cols, not transposed
    np.testing.assert_array_equal(img.data, TRUTH)  # no flip either (the marked pixel is off every symmetry)
    assert img.data.dtype.isnative
    if pixel_A is None:
        assert img.pixel_size_A is None
    else:
        assert img.pixel_size_A == pytest.approx(pixel_A, rel=1e-9)
    assert img.units == units and img.reader == reader


@pytest.mark.parametrize("name", ["image.hspy", "image.tif", "image.dm3"])
def test_rsciio_and_own_readers_agree_on_pixels(name):
    pytest.importorskip("rsciio")
    from beamloop.edge.io.formats import read_with_rsciio

    img = _quiet(read_with_rsciio, DATA / name)
    np.testing.assert_array_equal(img.data, TRUTH)


def test_rsciio_raw_orientations_are_undone():
    """RosettaSciIO hands back the Berkeley EMD transposed (labelled x, y) and the MIB flipped upside down;
    the reader's output above equals the truth, so both were undone, and here is what it undid."""
    pytest.importorskip("rsciio")
    from rsciio.emd import file_reader as emd_reader
    from rsciio.quantumdetector import file_reader as mib_reader

    emd = _quiet(emd_reader, str(DATA / "image_berkeley.emd"))[0]
    assert [a["name"] for a in emd["axes"]] == ["x", "y"]
    np.testing.assert_array_equal(emd["data"], TRUTH.T)
    mib = _quiet(mib_reader, str(DATA / "image.mib"))[0]
    np.testing.assert_array_equal(mib["data"], TRUTH[::-1])


def test_ser_writer_agrees_with_ncempy():
    """The TIA file is written here; a second, independent reader (NCEM's) gives the same image and calibration."""
    ser = pytest.importorskip("ncempy.io.ser")
    with ser.fileSER(str(DATA / "image_1.ser")) as f:
        data, meta = f.getDataset(0)
    np.testing.assert_array_equal(data, TRUTH)
    assert meta["Calibration"][0]["CalibrationDelta"] == pytest.approx(0.213e-10)


def test_velox_layout_agrees_with_ncempy():
    """The Velox file is written here; NCEM's Velox reader gives the same image and pixel size."""
    ev = pytest.importorskip("ncempy.io.emdVelox")
    with ev.fileEMDVelox(str(DATA / "image_velox.emd")) as f:
        data, meta = f.get_dataset(f.list_data[0])
    np.testing.assert_array_equal(data, TRUTH)
    assert meta["pixelSize"] == pytest.approx((0.15, 0.15)) and meta["pixelUnit"] == ["nm", "nm"]


def test_mib_sample_matches_the_stream_decoder():
    """The .mib pixels decode to the truth with beamloop's own Merlin decoder (the file's raster order)."""
    from beamloop.streams.merlin import mib

    raw = (DATA / "image.mib").read_bytes()
    hdr = mib.parse_frame_header(raw[:384])
    out = np.empty((1, *TRUTH.shape), np.uint16)
    mib.decode_frames(np.frombuffer(raw, np.uint8)[hdr.header_nbytes:], 1, hdr, out)
    np.testing.assert_array_equal(out[0], TRUTH)


def _nxs(path: Path, data: np.ndarray, scales: tuple[float, float] | None, units: str = "nm") -> Path:
    with h5py.File(path, "w") as f:
        e = f.create_group("entry")
        e.attrs["NX_class"] = "NXentry"
        d = e.create_group("data")
        d.attrs.update({"NX_class": "NXdata", "signal": "signal", "interpretation": "image" if data.ndim >= 2
                        else "spectrum"})
        d["signal"] = data
        if scales is not None:
            names = ["y", "x"][-data.ndim:]
            for k, (n, s) in enumerate(zip(names, scales[-data.ndim:])):
                d[n] = np.arange(data.shape[k]) * s
                d[n].attrs["units"] = units
                d.attrs[f"{n}_indices"] = k
            d.attrs["axes"] = names
    return path


def test_nexus_image_with_units(tmp_path):
    pytest.importorskip("rsciio")
    img = _quiet(read_image, _nxs(tmp_path / "a.nxs", TRUTH, (0.05, 0.05), "um"))
    np.testing.assert_array_equal(img.data, TRUTH)
    assert img.pixel_size_A == pytest.approx(500.0) and img.units == "um"


def test_non_square_pixels_give_no_pixel_size(tmp_path):
    pytest.importorskip("rsciio")
    img = _quiet(read_image, _nxs(tmp_path / "a.nxs", TRUTH, (0.05, 0.06)))
    assert img.pixel_size_A is None


def test_file_without_an_image_is_named(tmp_path):
    pytest.importorskip("rsciio")
    path = _nxs(tmp_path / "spectrum.nxs", np.arange(50.0), (0.1, 0.1))
    with pytest.raises(ImageReadError, match=r"spectrum\.nxs: no 2-D image in the file \(it holds .*\(50,\)"):
        _quiet(read_image, path)


def test_signal_choice_by_title(tmp_path):
    pytest.importorskip("rsciio")
    from beamloop.edge.io.formats import read_with_rsciio

    path = _nxs(tmp_path / "a.nxs", TRUTH, (0.05, 0.05))
    assert _quiet(read_with_rsciio, path, signal="DATA").data.shape == TRUTH.shape  # titles: the group name
    with pytest.raises(ImageReadError, match="no 2-D image titled like 'HAADF'"):
        _quiet(read_with_rsciio, path, signal="HAADF")


def test_missing_rosettasciio_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "rsciio", None)  # import rsciio now raises ImportError
    from beamloop.edge.io.formats import rsciio_available

    assert not rsciio_available()
    with pytest.raises(ImageReadError, match=r"image\.dm3: reading \.dm3 files needs RosettaSciIO.*pip install"):
        read_image(DATA / "image.dm3")
    img = read_image(DATA / "image.tif")  # formats with a reader of their own still read
    np.testing.assert_array_equal(img.data, TRUTH)


def test_unsupported_and_missing_files(tmp_path):
    from beamloop.edge.io.formats import read_with_rsciio

    (tmp_path / "a.xyz").write_text("1 2 3")
    with pytest.raises(ImageReadError, match=r"a\.xyz: unsupported file type '\.xyz' for RosettaSciIO"):
        read_with_rsciio(tmp_path / "a.xyz")
    with pytest.raises(ImageReadError, match=r"a\.xyz: unsupported file type '\.xyz'; expected one of"):
        read_image(tmp_path / "a.xyz")
    with pytest.raises(ImageReadError, match="no such file"):
        read_with_rsciio(tmp_path / "none.dm3")


def test_corrupt_file_is_named(tmp_path):
    pytest.importorskip("rsciio")
    bad = tmp_path / "bad.dm3"
    bad.write_bytes(b"\x00\x00\x00\x03" + b"garbage" * 10)
    with pytest.raises(ImageReadError, match=r"bad\.dm3: RosettaSciIO \(rsciio\.digitalmicrograph\) cannot read it"):
        _quiet(read_image, bad)


@pytest.mark.parametrize("unit,factor", [("nm", 10.0), ("NM", 10.0), ("Å", 1.0), ("\u212b", 1.0), ("A", 1.0),
                                         ("angstrom", 1.0), ("pm", 0.01), ("µm", 1e4), ("\u03bcm", 1e4),
                                         ("um", 1e4), ("m", 1e10), (b"nm", 10.0), (" nm ", 10.0)])
def test_length_units(unit, factor):
    assert length_to_A(unit) == factor


@pytest.mark.parametrize("unit", ["1/nm", "mrad", "", None, "px", "<undefined>", 3.0])
def test_not_length_units(unit):
    assert length_to_A(unit) is None


def test_zspy_store_is_a_file_for_image_files(tmp_path):
    (tmp_path / "scan.zspy").mkdir()
    (tmp_path / "scan.zspy" / ".zgroup").write_text("{}")
    (tmp_path / "a.dm4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    assert image_files([tmp_path]) == [tmp_path / "a.dm4", tmp_path / "scan.zspy"]
    assert image_files([tmp_path / "scan.zspy"]) == [tmp_path / "scan.zspy"]


def test_shipped_dm_reference_images():
    """nionswift-io ships reference images it wrote itself: a 3 x 2 float32 image of 0..5 whose axes are
    calibrated in the non-length units 'µ' and 'µn' (so no pixel size)."""
    pytest.importorskip("rsciio")
    dm_io = pytest.importorskip("nionswift_plugin.DM_IO")
    for v in (3, 4):
        img = _quiet(read_image, Path(dm_io.__file__).parent / "test" / "resources" / f"ref_F_0_2.dm{v}")
        np.testing.assert_array_equal(img.data, np.arange(6, dtype=np.float32).reshape(3, 2))
        assert img.pixel_size_A is None and img.units == "µn"


def test_samples_remade_by_their_writers_read_back(tmp_path):
    """The generator (bench/formats.py) remakes every sample with its library and each reads back as the truth."""
    pytest.importorskip("rsciio")
    from beamloop.bench import formats

    rows = formats.run(tmp_path)
    by = {r["format"]: r for r in rows}
    for name in formats.WRITERS:
        r = by[name]
        if r["file"] is None:  # a writer library is missing or incompatible (zspy with zarr 3): said in the row
            assert r["error"] and not r["ok"]
            continue
        assert r["ok"], r
    assert by["NeXus run file (run.h5)"]["ok"] and by["NeXus detector recording"]["ok"]
