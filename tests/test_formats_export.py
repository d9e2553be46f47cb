"""Column export for atomap and TEMUL (edge/io/columns_export.py): files read back by the other tool's own
loaders give the positions written."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

from beamloop.edge.frame.columns import ColumnTable
from beamloop.edge.io.columns_export import EXPORT_FORMATS, export_columns, write_atomap, write_temul

NAMES = ("Mo", "S2", "S1", "vacancy")


def _table():
    x = np.array([4.25, 12.0, 20.5, 30.125], np.float32)
    y = np.array([4.0, 4.5, 12.0, 30.75], np.float32)
    return ColumnTable(x, y, np.array([900, 400, 210, 5], np.float32), np.array([30, 12, 7, 2], np.float32),
                       np.array([0, 1, 2, 3], np.int8), NAMES)


def test_atomap_csv_and_npz_round_trip(tmp_path):
    cols = _table()
    files = write_atomap(tmp_path / "f", cols, pixel_size_A=0.2)
    assert [p.name for p in files] == ["f_atomap.csv", "f_atomap.npz"]
    xy = np.loadtxt(files[0], delimiter=",", skiprows=1, usecols=(0, 1))  # as the module docstring says
    np.testing.assert_allclose(xy, cols.xy, atol=5e-5)
    with files[0].open() as f:
        assert [r["class"] for r in csv.DictReader(f)] == list(NAMES)
    z = np.load(files[1])
    np.testing.assert_array_equal(z["atom_positions"], cols.xy)
    np.testing.assert_array_equal(z["positions_S2"], [[12.0, 4.5]])
    assert z["class_names"].tolist() == list(NAMES) and float(z["pixel_size_A"]) == 0.2
    assert np.isnan(np.load(write_atomap(tmp_path / "g", cols)[1])["pixel_size_A"])


def test_atom_lattice_loads_in_atomap(tmp_path):
    am = pytest.importorskip("atomap.api")
    cols = _table()
    image = np.random.default_rng(0).random((40, 48))
    files = write_atomap(tmp_path / "f", cols, image=image)
    assert files[-1].name == "f_atom_lattice.hdf5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lattice = am.load_atom_lattice_from_hdf5(str(files[-1]), construct_zone_axes=False)
    got = {s.name: s.atom_positions for s in lattice.sublattice_list}
    assert list(got) == list(NAMES)
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(got[name], cols.xy[cols.cls == i])
    np.testing.assert_allclose(lattice.image, image)


def test_temul_csv(tmp_path):
    cols = _table()
    (path,) = write_temul(tmp_path / "f", cols, pixel_size_A=0.2)
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["elements"] for r in rows] == ["Mo_1", "S_2", "S_1", ""]
    assert [r["z_height"] for r in rows] == ["0.5", "0.25,0.75", "0.25", ""]
    assert [float(r["pixel_x"]) for r in rows] == pytest.approx(cols.x.tolist(), abs=5e-5)
    assert [float(r["x_A"]) for r in rows] == pytest.approx((cols.x * 0.2).tolist(), abs=5e-5)
    (plain,) = write_temul(tmp_path / "g", cols)
    assert "x_A" not in plain.read_text().splitlines()[0]


def test_export_dispatch_and_errors(tmp_path):
    cols = _table()
    assert EXPORT_FORMATS == ("atomap", "temul")
    assert export_columns("temul", tmp_path / "f", cols)[0].name == "f_temul.csv"
    with pytest.raises(ValueError, match="unknown export format 'xyz'"):
        export_columns("xyz", tmp_path / "f", cols)
    with pytest.raises(ValueError, match="pixel size must be a positive number of Angstrom, got -1"):
        write_atomap(tmp_path / "f", cols, pixel_size_A=-1.0)
    with pytest.raises(ValueError, match=r"image must be 2-D \(rows, cols\), got shape \(2, 3, 4\)"):
        write_atomap(tmp_path / "f", cols, image=np.zeros((2, 3, 4)))
    with pytest.raises(TypeError, match="columns must be a ColumnTable, got ndarray"):
        write_temul(tmp_path / "f", cols.xy)


def test_empty_table_exports(tmp_path):
    cols = ColumnTable.empty(("column",))
    files = write_atomap(tmp_path / "e", cols, image=np.ones((8, 8)))  # no lattice: atomap cannot save one empty
    assert [p.name for p in files] == ["e_atomap.csv", "e_atomap.npz"]
    assert np.load(files[1])["atom_positions"].shape == (0, 2)
    assert write_temul(tmp_path / "e", cols)[0].read_text().count("\n") == 1


def test_find_command_exports_what_it_found(tmp_path, capsys):
    from beamloop.edge.cli import main

    src = np.load(__import__("pathlib").Path(__file__).parent / "data" / "formats" / "truth.npy")
    img = tmp_path / "frame.npy"
    np.save(img, src)
    assert main(["find", str(img), "--out", str(tmp_path / "o"), "--export", "atomap"]) == 0
    found = list(csv.DictReader((tmp_path / "o" / "frame_columns.csv").open()))
    exported = list(csv.DictReader((tmp_path / "o" / "frame_atomap.csv").open()))
    assert len(found) == len(exported) > 0
    assert [float(r["x"]) for r in exported] == pytest.approx([float(r["x_px"]) for r in found], abs=1e-3)
    assert "frame_atomap.npz" in capsys.readouterr().out
