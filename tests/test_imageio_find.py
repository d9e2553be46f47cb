"""Reading image files and `beamloop find` on them (simulated frames with ground truth, and the examples)."""

import csv
from importlib import resources

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image as PILImage

from beamloop.edge.analysis.scoring import score_frame
from beamloop.edge.cli import main
from beamloop.edge.frame.columns import read_csv
from beamloop.edge.io.imageio import ImageReadError, read_image
from beamloop.edge.sim.frames import mos2_frame

EXAMPLES = resources.files("beamloop.edge") / "data" / "examples"


def write_hspy(path, data, scale, units):
    with h5py.File(path, "w") as f:
        g = f.create_group("Experiments/__unnamed__")
        g.create_dataset("data", data=data)
        for k, n in enumerate(data.shape):
            a = g.create_group(f"axis-{k}")
            a.attrs.update({"scale": scale, "offset": 0.0, "size": n, "navigate": k < data.ndim - 2})
            if units is not None:
                a.attrs["units"] = units


def test_read_formats_and_pixel_sizes(tmp_path):
    img = (np.arange(48 * 40) % 251).reshape(48, 40).astype(np.uint16)
    np.save(tmp_path / "a.npy", img)
    tifffile.imwrite(tmp_path / "a.tif", img, imagej=True, resolution=(1 / 0.015, 1 / 0.015), metadata={"unit": "nm"})
    PILImage.fromarray(img.astype(np.uint8)).save(tmp_path / "a.png")
    PILImage.fromarray(np.stack([img.astype(np.uint8)] * 3, -1)).save(tmp_path / "rgb.png")
    write_hspy(tmp_path / "a.hspy", img.astype(np.float16), 0.0093, "nm")
    write_hspy(tmp_path / "nounits.hdf5", img.astype(np.float32), 0.0093, None)
    write_hspy(tmp_path / "stack.hspy", np.stack([img, img + 1]).astype(np.float32), 0.02, "nm")

    assert np.array_equal(read_image(tmp_path / "a.npy").data, img)
    t = read_image(tmp_path / "a.tif")
    assert np.array_equal(t.data, img) and t.pixel_size_A == pytest.approx(0.15)
    assert np.array_equal(read_image(tmp_path / "a.png").data, img.astype(np.uint8))
    assert np.array_equal(read_image(tmp_path / "rgb.png").data, img.astype(np.uint8))
    h = read_image(tmp_path / "a.hspy")
    assert h.pixel_size_A == pytest.approx(0.093) and h.data.shape == (48, 40)
    assert h.data.dtype == np.float32 and np.array_equal(h.data, img.astype(np.float16).astype(np.float32))
    assert read_image(tmp_path / "nounits.hdf5").pixel_size_A is None  # no units: no guess
    s = read_image(tmp_path / "stack.hspy")
    assert s.frames.shape == (2, 48, 40) and s.pixel_size_A == pytest.approx(0.2)


def test_read_errors_name_the_problem(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageReadError, match="cannot read"):
        read_image(tmp_path / "broken.png")
    np.save(tmp_path / "vec.npy", np.zeros(5))
    with pytest.raises(ImageReadError, match="2-D frame or a 3-D stack"):
        read_image(tmp_path / "vec.npy")


def test_find_on_simulated_frame_matches_ground_truth(tmp_path):
    fr = mos2_frame(dose_e_per_A2=1e5, seed=7)
    tifffile.imwrite(tmp_path / "mos2.tif", fr.counts, imagej=True, resolution=(1 / 0.015, 1 / 0.015),
                     metadata={"unit": "nm"})
    assert main(["find", str(tmp_path / "mos2.tif"), "--out", str(tmp_path / "out"), "--material", "MoS2"]) == 0
    table, header = read_csv(tmp_path / "out" / "mos2_columns.csv")
    assert header[:7] == ["x_px", "y_px", "intensity", "class", "score", "x_A", "y_A"] and "near_edge" in header
    cls = np.array([fr.class_names.index(n) for n in table.class_labels()])
    s = score_frame(table.xy, cls, fr.truth_xy, fr.truth_cls, fr.class_names, 0.15, frame_shape=fr.counts.shape)
    assert s.recall >= 0.99 and s.precision >= 0.99 and s.rms_pm <= 8.0
    with open(tmp_path / "out" / "mos2_columns.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["x_A"]) == pytest.approx(float(row["x_px"]) * 0.15, abs=1e-3)
    assert (tmp_path / "out" / "mos2_overlay.png").stat().st_size > 10_000


def test_find_generic_without_pixel_size_estimates_the_scale(tmp_path):
    """No pixel size: the lattice period comes from the autocorrelation; every column found once."""
    fr = mos2_frame(dose_e_per_A2=1e6, seed=8, defects=False)
    np.save(tmp_path / "frame.npy", fr.counts)
    assert main(["find", str(tmp_path / "frame.npy"), "--out", str(tmp_path)]) == 0
    table, header = read_csv(tmp_path / "frame_columns.csv")
    assert header[:5] == ["x_px", "y_px", "intensity", "class", "score"] and "near_edge" in header
    s = score_frame(table.xy, np.zeros(len(table), int), fr.truth_xy, np.zeros(len(fr.truth_xy), int), ("column",),
                    0.15, frame_shape=fr.counts.shape)
    assert s.recall >= 0.98 and s.precision >= 0.99


def test_find_on_shipped_examples(tmp_path):
    paths = [str(EXAMPLES / "si110_haadf_atomsegnet.png"), str(EXAMPLES / "au_grain_boundary_atomsegnet.png")]
    assert main(["find", *paths, "--out", str(tmp_path)]) == 0
    si, _ = read_csv(tmp_path / "si110_haadf_atomsegnet_columns.csv")
    au, _ = read_csv(tmp_path / "au_grain_boundary_atomsegnet_columns.csv")
    # Si [110]: ~14 x 14 dumbbells in the field, both columns of each (two-Gaussian refinement); Au: ~700 columns
    assert 340 <= len(si) <= 430 and 640 <= len(au) <= 760
    from scipy.spatial import cKDTree

    d_si = cKDTree(si.xy).query(si.xy, k=2)[0][:, 1]
    d_au = cKDTree(au.xy).query(au.xy, k=2)[0][:, 1]
    assert 11 < np.median(d_si) < 16  # each column's nearest neighbour is its dumbbell partner (1.36 A)
    assert np.percentile(d_si, 1) > 10 and np.mean(d_au < 10) < 0.05  # (almost) no doubled detections


def test_find_reports_bad_files_and_goes_on(tmp_path, capsys):
    bad = np.ones((64, 64), np.float32)
    bad[10, 10] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    good = mos2_frame(shape=(128, 128), seed=1).counts
    np.save(tmp_path / "good.npy", good)
    rc = main(["find", str(tmp_path / "nan.npy"), str(tmp_path / "missing.png"), str(tmp_path / "good.npy"),
               "--out", str(tmp_path / "o"), "--pixel-size", "0.15", "--material", "MoS2"])
    err = capsys.readouterr().err
    assert rc == 1 and "non-finite" in err and "no such file" in err
    assert (tmp_path / "o" / "good_columns.csv").exists()


def test_a_text_file_named_npy_is_named_as_not_npy(tmp_path):
    (tmp_path / "text.npy").write_text("x_px,y_px\n1,2\n")
    with pytest.raises(ImageReadError, match="not a NumPy .npy file"):
        read_image(tmp_path / "text.npy")


def test_inputs_with_the_same_stem_get_their_own_outputs(tmp_path, capsys):
    good = mos2_frame(shape=(96, 96), seed=1).counts.astype(np.uint16)
    for sub in ("A", "B2"):
        (tmp_path / sub).mkdir()
        PILImage.fromarray(good).save(tmp_path / sub / "img.png")
    tifffile.imwrite(tmp_path / "A" / "img.tif", good)
    files = [tmp_path / "A" / "img.png", tmp_path / "B2" / "img.png", tmp_path / "A" / "img.tif"]
    assert main(["find", *map(str, files), "--out", str(tmp_path / "o"), "--pixel-size", "0.15",
                 "--material", "MoS2"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "o").glob("*_columns.csv"))
    assert names == ["B2_img_columns.csv", "img_columns.csv", "img_tif_columns.csv"]
    assert "img.png: " in out and "B2_img_columns.csv" in out


def test_folders_without_images_are_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "adir.png").mkdir()
    assert main(["find", str(tmp_path / "empty"), str(tmp_path / "adir.png"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("a folder with no image files") == 2 and "adir.png" in err


def test_the_memory_budget_refuses_by_name_and_can_be_raised(tmp_path, capsys):
    np.save(tmp_path / "f.npy", mos2_frame(shape=(256, 256), seed=1).counts)
    args = ["find", str(tmp_path / "f.npy"), "--out", str(tmp_path / "o"), "--pixel-size", "0.15", "--material",
            "MoS2"]
    assert main(args + ["--memory-budget-mib", "1"]) == 1
    assert "over the budget of 1.0 MiB" in capsys.readouterr().err
    assert main(args + ["--memory-budget-mib", "64"]) == 0 and (tmp_path / "o" / "f_columns.csv").exists()


def test_a_failed_write_names_the_file_removes_the_partial_outputs_and_goes_on(tmp_path, capsys, monkeypatch):
    import errno

    from beamloop.edge.frame.columns import ColumnTable

    good = mos2_frame(shape=(96, 96), seed=1).counts
    np.save(tmp_path / "a.npy", good)
    np.save(tmp_path / "b.npy", good)
    real = ColumnTable.write_csv

    def full_disk_for_a(self, path, *a, **k):
        if path.name.startswith("a_"):
            path.write_text("x_px,y_")  # a partial file, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *a, **k)

    monkeypatch.setattr(ColumnTable, "write_csv", full_disk_for_a)
    rc = main(["find", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--out", str(tmp_path / "o"),
               "--pixel-size", "0.15", "--material", "MoS2"])
    err = capsys.readouterr().err
    assert rc == 1 and f"cannot write {tmp_path / 'o' / 'a_columns.csv'} (No space left on device)" in err
    assert not (tmp_path / "o" / "a_columns.csv").exists() and (tmp_path / "o" / "b_columns.csv").exists()
