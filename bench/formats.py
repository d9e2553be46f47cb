"""The formats microscopes write: one small file of each, made by the format's own library where one can
write it, read back through :func:`beamloop.edge.io.imageio.read_image` (RosettaSciIO for the microscope
formats) and checked against the image that was written and its pixel size.

Every sample holds the same 40 x 48 (rows x cols, not square, so a transposed read shows) ``uint16`` image
of Gaussian columns (:func:`truth_image`), each with a known pixel size. Makers:

- ``.hspy``, ``.zspy``: HyperSpy (``Signal2D.save``); ``.tif``: tifffile (ImageJ resolution and unit);
- ``.mrc``: mrcfile (CCP-EM's reference implementation of MRC2014), voxel size in Angstrom;
- Berkeley ``.emd``: ncempy (NCEM, the authors of the EMD format), ``put_emdgroup`` with dims in nm;
- ``.dm3`` / ``.dm4``: nionswift-io's DigitalMicrograph writer (Nion, Apache-2.0; Gatan publishes no writer);
- ``.ser``: written here from FEI's TIA series-file layout (C. Boothroyd's description, as RosettaSciIO's
  ``rsciio.tia`` and ncempy's ``ncempy.io.ser`` read it; TIA stores image rows from the bottom, and both
  readers flip them), with no ``.emi`` beside it;
- Velox ``.emd``: written here (:func:`write_velox`) in the layout RosettaSciIO and ncempy read;
- ``.mib``: :func:`beamloop.streams.merlin.mib.write_mib` (Quantum Detectors' MIB layout; the stream
  receiver's own encoder), which holds no pixel size;
- ``run.h5`` (:class:`beamloop.edge.io.runlog.RunLog`) and a detector recording
  (:class:`beamloop.streams.dectris.recorder.Recorder`), read through RosettaSciIO's NeXus reader.

A public sample a package ships is read where it is installed: nionswift-io's reference image
``ref_F_0_2.dm3`` (a 3 x 2 float32 image of 0..5, axes calibrated in the non-length units ``µ`` and
``µn``). No Velox-made ``.emd`` is tested: only Velox writes it, and no PyPI package ships one (RosettaSciIO's
own test files are downloaded from its repository at test time); ``image_velox.emd`` is written here in the
layout the two open readers (RosettaSciIO, ncempy) read.

Writes ``bench/results/formats.md``. Run: ``nice python -m beamloop.bench.formats [--make tests/data/formats]``
(``--make`` writes the sample files there, the ones the tests read, plus ``truth.npy``).
"""

from __future__ import annotations

import argparse
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
SHAPE = (40, 48)
"""Rows, columns of the sample image."""

PIXEL_A = {"dm3": 0.213, "dm4": 0.213, "hspy": 0.213, "zspy": 0.213, "tif": 0.213, "ser": 0.213, "mrc": 0.75,
           "emd": 1.5, "velox": 1.5, "mib": None}
"""Pixel size written into each sample, Angstrom (None: the format holds none)."""


def truth_image() -> np.ndarray:
    """The sample image: (40, 48) uint16, Gaussian columns (sigma 1.5 px, height 1000) on 8 px centres from
    (4, 4), over a background of 100."""
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    img = np.full(SHAPE, 100.0)
    for cy in range(4, SHAPE[0], 8):
        for cx in range(4, SHAPE[1], 8):
            img += 1000.0 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 1.5**2))
    img[2, 30] += 77  # one marked pixel off every symmetry: flips and transposes show
    return img.astype(np.uint16)


# --- writers, one per format: (folder, image) -> (file, maker) ---------------------------------------------

def _hyperspy(folder: Path, img: np.ndarray, suffix: str) -> tuple[Path, str]:
    import hyperspy
    import hyperspy.api as hs

    s = hs.signals.Signal2D(img)
    s.metadata.General.title = "HAADF"
    for ax, name in zip(s.axes_manager.signal_axes, "xy"):
        ax.name, ax.scale, ax.units = name, PIXEL_A["hspy"] / 10, "nm"
    path = folder / f"image.{suffix}"
    if path.is_dir():
        shutil.rmtree(path)
    s.save(path, overwrite=True)
    return path, f"HyperSpy {hyperspy.__version__}"


def write_hspy(folder: Path, img: np.ndarray) -> tuple[Path, str]:
    """``image.hspy`` by HyperSpy (axes in nm)."""
    return _hyperspy(folder, img, "hspy")


def write_zspy(folder: Path, img: np.ndarray) -> tuple[Path, str]:
    """``image.zspy`` (a Zarr folder) by HyperSpy; needs a zarr that RosettaSciIO's zspy plugin supports."""
    return _hyperspy(folder, img, "zspy")


def write_tif(folder: Path, img: np.ndarray) -> tuple[Path, str]:
    """``image.tif`` by tifffile, ImageJ metadata: resolution in pixels per nm, unit ``nm``."""
    import tifffile

    path = folder / "image.tif"
    res = 10.0 / PIXEL_A["tif"]
    tifffile.imwrite(path, img, imagej=True, resolution=(res, res), metadata={"unit": "nm"})
    return path, f"tifffile {tifffile.__version__}"


def write_mrc(folder: Path, img: np.ndarray) -> tuple[Path, str]:
    """``image.mrc`` by mrcfile (int16 image, voxel size in Angstrom, as MRC2014 defines it)."""
    import mrcfile

    path = folder / "image.mrc"
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(img.astype(np.int16))
        m.voxel_size = PIXEL_A["mrc"]
    return path, f"mrcfile {mrcfile.__version__}"


def write_emd(folder: Path, img: np.ndarray) -> tuple[Path, str]:
    """``image_berkeley.emd`` by ncempy (Berkeley EMD v0.2; dims ``y``, ``x`` in ncempy's ``[n_m]``)."""
    from importlib.metadata import version

    import ncempy.io.emd as nemd

    path = folder / "image_berkeley.emd"
    path.unlink(missing_ok=True)
    step = PIXEL_A["emd"] / 10
    with nemd.fileEMD(str(path), readonly=False) as f:
        f.put_emdgroup("haadf", img, ((np.arange(SHAPE[0]) * step, "y", "[n_m]"),
                                      (np.arange(SHAPE[1]) * step, "x", "[n_m]")))
    return path, f"ncempy {version('ncempy')}"


def write_dm(folder: Path, img: np.ndarray, version: int) -> tuple[Path, str]:
    """``image.dm3`` / ``image.dm4`` by nionswift-io's DigitalMicrograph writer (calibrated in nm)."""
    from importlib.metadata import version as pkg_version

    from nion.data import Calibration, DataAndMetadata
    from nionswift_plugin.DM_IO import dm3_image_utils

    cal = Calibration.Calibration(0.0, PIXEL_A[f"dm{version}"] / 10, "nm")
    xdata = DataAndMetadata.new_data_and_metadata(img, dimensional_calibrations=[cal, cal],
                                                  intensity_calibration=Calibration.Calibration(0, 1, "counts"))
    path = folder / f"image.dm{version}"
    with path.open("wb") as f:
        dm3_image_utils.save_image(xdata, f, version)
    return path, f"nionswift-io {pkg_version('nionswift-io')}"


SER_DTYPES = {"uint8": 1, "uint16": 2, "uint32": 3, "int8": 4, "int16": 5, "int32": 6, "float32": 7, "float64": 8}
"""TIA series file: numpy dtype name -> DataType code of a data element."""


def write_ser(folder: Path, img: np.ndarray) -> tuple[Path, str]:
    """``image_1.ser``: one 2-D data element in FEI TIA's series layout (version 0x0220: 8-byte offsets),
    calibration in metres, rows stored from the bottom, a time-only tag; no ``.emi`` file."""
    rows, cols = img.shape
    pixel_m = PIXEL_A["ser"] * 1e-10
    desc, units = b"Number", b""
    dim = struct.pack("<iddi", 1, 0.0, 1.0, 0) + struct.pack("<i", len(desc)) + desc + struct.pack("<i", 0) + units
    head_len = 3 * 2 + 4 * 4 + 8 + 4
    offsets_at = head_len + len(dim)
    data_at = offsets_at + 16
    element = (struct.pack("<ddiddihii", 0.0, pixel_m, 0, 0.0, pixel_m, 0, SER_DTYPES[img.dtype.name], cols, rows)
               + np.ascontiguousarray(img[::-1], img.dtype.newbyteorder("<")).tobytes())
    tag_at = data_at + len(element)
    blob = (struct.pack("<hhhiiii", 0x4949, 0x0197, 0x0220, 0x4122, 0x4152, 1, 1) + struct.pack("<q", offsets_at)
            + struct.pack("<i", 1) + dim + struct.pack("<qq", data_at, tag_at) + element
            + struct.pack("<HHI", 0x4152, 0, 0))
    path = folder / "image_1.ser"
    path.write_bytes(blob)
    return path, "beamloop (TIA series layout)"


def write_velox(folder: Path, img: np.ndarray) -> tuple[Path, str]:
    """``image_velox.emd``: one HAADF image in the Velox EMD layout as RosettaSciIO's ``rsciio.emd`` and ncempy's
    ``ncempy.io.emdVelox`` read it (``/Version`` JSON, ``/Data/Image/<uuid>/Data`` (rows, cols, frames) and
    ``Metadata``, the JSON as a NUL-padded uint8 column; pixel size in metres). Thermo Fisher publishes no
    specification, so this tests the reading path, not Velox's own output."""
    import json

    import h5py

    pixel_m = PIXEL_A["emd"] * 1e-10
    md = {"BinaryResult": {"PixelSize": {"width": repr(pixel_m), "height": repr(pixel_m)}, "PixelUnitX": "m",
                           "PixelUnitY": "m", "Offset": {"x": "0", "y": "0"}, "Detector": "HAADF",
                           "DetectorIndex": "0"},
          "Detectors": {"Detector-0": {"DetectorName": "HAADF", "DetectorType": "ScanningDetector"}},
          "Acquisition": {"AcquisitionStartDatetime": {"DateTime": "1700000000"}},
          "Scan": {"DwellTime": "2e-06", "FrameTime": "0.004"}, "Stage": {}, "CustomProperties": {}, "Optics": {},
          "Instrument": {}}
    raw = np.frombuffer(json.dumps(md).encode(), np.uint8)
    path = folder / "image_velox.emd"
    with h5py.File(path, "w") as f:
        f.create_dataset("Version", data=np.array([json.dumps({"format": "Velox", "version": "11"}).encode()]))
        g = f.create_group("Data/Image/3b8e4f0c2d1a4e6f9a7b5c3d1e0f2a4b")
        g.create_dataset("Data", data=img[:, :, None])
        meta = np.zeros((len(raw) + 16, 1), np.uint8)
        meta[:len(raw), 0] = raw
        g.create_dataset("Metadata", data=meta)
    return path, "beamloop (Velox layout as rsciio and ncempy read it)"


def write_mib(folder: Path, img: np.ndarray) -> tuple[Path, str]:
    """``image.mib`` (+ ``image.hdr``) by the Merlin encoder of :mod:`beamloop.streams.merlin.mib`, U16, 12 bit."""
    from beamloop.streams.merlin.mib import write_mib as encode

    _, path = encode(folder / "image", img[None].astype(np.uint16), "U16", 12)
    return path, "beamloop.streams.merlin (MIB layout)"


WRITERS = {
    "Gatan DigitalMicrograph 3": lambda d, i: write_dm(d, i, 3),
    "Gatan DigitalMicrograph 4": lambda d, i: write_dm(d, i, 4),
    "Berkeley EMD (NCEM)": write_emd,
    "Velox EMD": write_velox,
    "FEI TIA .ser": write_ser,
    "MRC 2014": write_mrc,
    "Quantum Detectors Merlin .mib": write_mib,
    "HyperSpy .hspy": write_hspy,
    "HyperSpy .zspy": write_zspy,
    "TIFF (ImageJ)": write_tif,
}
"""Format name -> its sample writer."""

WRITER_LIBRARY = {"HyperSpy .zspy": "HyperSpy", "HyperSpy .hspy": "HyperSpy", "MRC 2014": "mrcfile",
                  "Berkeley EMD (NCEM)": "ncempy", "TIFF (ImageJ)": "tifffile",
                  "Gatan DigitalMicrograph 3": "nionswift-io", "Gatan DigitalMicrograph 4": "nionswift-io"}
"""Format name -> the library its writer needs (named in the table when the writer fails)."""


NOTES = {
    "Berkeley EMD (NCEM)": "RosettaSciIO hands it back transposed, axes labelled x, y; the reader transposes it back",
    "FEI TIA .ser": "rows stored bottom-up; RosettaSciIO and ncempy both flip them and agree (tests/test_formats.py)",
    "Quantum Detectors Merlin .mib": "RosettaSciIO flips MIB frames upside down; the reader flips them back to "
                                     "raster order (as streams.merlin and LiberTEM)",
    "Velox EMD": "no Velox-made sample (none in a PyPI package); layout from the two open readers, which agree",
    "TIFF (ImageJ) via RosettaSciIO": "rsciio.tiff reads the scale (0.0213) but not ImageJ's unit text; beamloop "
                                      "reads .tif with its own reader",
    "Gatan DigitalMicrograph 3 (shipped sample)": "axes in the non-length units µ and µn: no pixel size",
    "Gatan DigitalMicrograph 4 (shipped sample)": "axes in the non-length units µ and µn: no pixel size",
    "NeXus detector recording": "detector axes in pixels (a recording knows no camera length); image_id axis",
}
"""Format row -> what the table should say about it."""


def make_samples(folder: str | Path) -> list[dict]:
    """Write every sample into ``folder`` (and ``truth.npy``); one record per format: ``format``, ``file``,
    ``made_by`` and ``error`` (empty, or why the writer failed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    img = truth_image()
    np.save(folder / "truth.npy", img)
    out = []
    for name, writer in WRITERS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                path, maker = writer(folder, img)
            out.append({"format": name, "file": path, "made_by": maker, "error": ""})
        except Exception as exc:  # noqa: BLE001 - a writer that fails is a row of the table, not a crash
            text = str(exc).splitlines()[0] if str(exc) else ""
            if "NestedDirectoryStore" in text:
                import zarr

                text = (f"RosettaSciIO's zspy plugin needs zarr 2 (NestedDirectoryStore); zarr {zarr.__version__} "
                        "is installed (the detector extra needs zarr 3)")
            else:
                text = f"{type(exc).__name__}: {text}"
            out.append({"format": name, "file": None, "made_by": WRITER_LIBRARY.get(name, ""), "error": text})
    return out


def _suffix_key(path: Path) -> str:
    return "velox" if "velox" in path.name else path.suffix.lower().lstrip(".").replace("tiff", "tif")


def check_file(path: Path, truth: np.ndarray, pixel_A: float | None, reader=None) -> dict:
    """Read ``path`` (default :func:`beamloop.edge.io.imageio.read_image`) and compare with the truth: record
    with ``shape``, ``pixel_size_A``, ``units``, ``reader``, ``data_ok``, ``pixel_ok``, ``ok``, ``error``."""
    from beamloop.edge.io.imageio import ImageReadError, read_image

    reader = reader or read_image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = reader(path)
    except ImageReadError as exc:
        return {"shape": None, "pixel_size_A": None, "units": None, "reader": "", "data_ok": False,
                "pixel_ok": False, "ok": False, "error": str(exc)}
    data = im.data
    data_ok = data.shape == truth.shape and np.array_equal(data.astype(np.int64), truth.astype(np.int64))
    if pixel_A is None:
        pixel_ok = im.pixel_size_A is None
    else:
        pixel_ok = im.pixel_size_A is not None and abs(im.pixel_size_A - pixel_A) <= 1e-6 * pixel_A
    return {"shape": tuple(data.shape), "pixel_size_A": im.pixel_size_A, "units": im.units,
            "reader": im.reader or "beamloop", "data_ok": bool(data_ok), "pixel_ok": bool(pixel_ok),
            "ok": bool(data_ok and pixel_ok), "error": ""}


def nexus_rows(folder: Path) -> list[dict]:
    """A run file and a detector recording written by beamloop, read through ``rsciio.nexus``: one record
    each (``format``, ``file``, ``made_by``, ``shape``, ``pixel_size_A``, ``units``, ``ok``, ``error``)."""
    from beamloop.edge.frame.columns import ColumnTable
    from beamloop.edge.io.runlog import RunLog

    img = truth_image()
    rows = []
    run = folder / "run.h5"
    with RunLog(run) as rl:
        rl.add_frame(img, ColumnTable.empty(), pixel_size_A=0.213)
    rows.append(_read_nexus("NeXus run file (run.h5)", run, "beamloop RunLog", img, 0.213, "/frames/000000"))
    rec_master = _record(folder, img)
    data_file = rec_master.with_name(rec_master.name.replace("_master", "_data_000001"))
    rows.append(_read_nexus("NeXus detector recording", data_file, "beamloop Recorder (DECTRIS layout)",
                            img[None], None, "/entry/data"))
    return rows


def _record(folder: Path, img: np.ndarray) -> Path:
    """A one-frame detector recording of ``img`` by :class:`beamloop.streams.dectris.recorder.Recorder`."""
    from beamloop.streams.dectris import codecs
    from beamloop.streams.dectris.recorder import Recorder
    from beamloop.streams.dectris.series import ChannelStack, DetectorSeries, FrameStack

    series = DetectorSeries(protocol="test", series_id=1, series_unique_id="formats", channels=("data",),
                            shape=img.shape, dtype=img.dtype, number_of_images=1, count_time=1e-3,
                            frame_time=1e-3)
    zero = np.zeros(1, np.int64)
    chan = ChannelStack(img[None], np.zeros(0, np.uint8), zero, zero, codecs.Codec(codecs.NONE, img.dtype.itemsize))
    stack = FrameStack(series, np.array([0], np.int64), np.zeros((1, 3), np.int64), {"data": chan}, 0, 0)
    with Recorder(folder, "rec") as rec:
        rec.start(series)
        rec.write(stack)
        rec.end(1)
    return rec.master_path


def _read_nexus(fmt: str, path: Path, maker: str, truth: np.ndarray, pixel_A: float | None, where: str) -> dict:
    import hdf5plugin  # noqa: F401  the recording's bitshuffle chunks
    from rsciio.nexus import file_reader

    row = {"format": fmt, "file": path, "made_by": maker, "reader": "rsciio.nexus", "shape": None,
           "pixel_size_A": None, "units": None, "data_ok": False, "pixel_ok": False, "ok": False, "error": ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sigs = file_reader(str(path), nxdata_only=True, dataset_path=[where])
    except Exception as exc:  # noqa: BLE001
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    if not sigs:
        row["error"] = f"no NXdata at {where}"
        return row
    s = sigs[0]
    sig_axes = [a for a in s["axes"] if not a.get("navigate")]
    from beamloop.edge.io.imageio import length_to_A

    x = sig_axes[-1] if sig_axes else {}
    factor = length_to_A(x.get("units"))
    size = float(x["scale"]) * factor if factor else None
    row.update(shape=tuple(np.shape(s["data"])), units=x.get("units") or None, pixel_size_A=size,
               data_ok=bool(np.array_equal(np.asarray(s["data"]), truth)) and len(sig_axes) == 2,
               pixel_ok=(size is None) if pixel_A is None else (size is not None and abs(size - pixel_A) < 1e-9))
    row["ok"] = row["data_ok"] and row["pixel_ok"]
    return row


def shipped_rows() -> list[dict]:
    """Public samples that installed packages ship: nionswift-io's ``ref_F_0_2.dm3`` / ``.dm4`` when present."""
    out = []
    try:
        import nionswift_plugin.DM_IO as dm_io
    except ImportError:
        return out
    truth = np.arange(6, dtype=np.float32).reshape(3, 2)
    for v in (3, 4):
        path = Path(dm_io.__file__).parent / "test" / "resources" / f"ref_F_0_2.dm{v}"
        if path.is_file():
            r = check_file(path, truth, None)
            out.append({"format": f"Gatan DigitalMicrograph {v} (shipped sample)", "file": path,
                        "made_by": "nionswift-io test resource", **r})
    return out


def run(folder: Path) -> list[dict]:
    """Make the samples in ``folder``, read each back; the table's rows."""
    rows = []
    truth = truth_image()
    for rec in make_samples(folder):
        if rec["file"] is None:
            rows.append({**rec, "shape": None, "pixel_size_A": None, "units": None, "reader": "", "ok": False})
            continue
        pixel = PIXEL_A[_suffix_key(rec["file"])]
        rows.append({**rec, **check_file(rec["file"], truth, pixel)})
        if rec["file"].suffix.lower() in (".hspy", ".tif"):  # read by beamloop's own reader; RosettaSciIO too
            from beamloop.edge.io.formats import read_with_rsciio

            rows.append({**rec, "format": f"{rec['format']} via RosettaSciIO",
                         **check_file(rec["file"], truth, pixel, read_with_rsciio)})
    rows += shipped_rows()
    rows += nexus_rows(folder)
    return rows


def markdown(rows: list[dict], base: Path | None = None) -> str:
    """The table of ``rows`` (:func:`run`) as Markdown."""
    lines = ["# Formats read", "",
             "Each file holds the same 40 x 48 uint16 image and a known pixel size (`bench/formats.py`); "
             "`ok`: the pixels read equal the pixels written (no flip, no transpose) and the pixel size read "
             "equals the one written (none for formats that hold none).", "",
             "| format | file | made by | reader | shape | pixel size read (A) | units | ok | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = NOTES.get(r["format"], "")
        if note:
            r["error"] = f"{r['error']}; {note}" if r.get("error") else note
        if not r["ok"] and not r.get("error"):
            r["error"] = ("pixels differ from those written" if not r.get("data_ok") else
                          f"pixel size {r.get('pixel_size_A')} A read (units {r.get('units')!r}), "
                          "another written")
        f = r["file"]
        name = "" if f is None else (Path(f).name if base is None else str(Path(f).relative_to(base))
                                     if Path(f).is_relative_to(base) else Path(f).name)
        size = "" if r.get("pixel_size_A") is None else f"{r['pixel_size_A']:.4g}"
        shape = "" if r.get("shape") is None else " x ".join(map(str, r["shape"]))
        lines.append(f"| {r['format']} | {name} | {r['made_by']} | {r.get('reader', '')} | {shape} | {size} | "
                     f"{r.get('units') or ''} | {'yes' if r['ok'] else 'no'} | {r.get('error', '')} |")
    try:
        import rsciio

        versions = f"RosettaSciIO {rsciio.__version__}"
    except ImportError:
        versions = "RosettaSciIO not installed"
    lines += ["", f"{versions}; made by `nice python -m beamloop.bench.formats` (the sample files the tests read: "
              "`tests/data/formats`, made with `--make tests/data/formats`)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line (module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--make", type=Path, default=None, help="write the sample files into this folder and stop")
    p.add_argument("--out", type=Path, default=RESULTS / "formats.md")
    a = p.parse_args(argv)
    if a.make is not None:
        for rec in make_samples(a.make):
            print(f"{rec['format']}: {rec['file'] or rec['error']}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(Path(tmp))
        text = markdown(rows)
    a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
