"""The automated search experiment: montage grid, region ranking, the run with its baselines and records."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from beamloop.edge.analysis.fewshot import ChipMap
from beamloop.edge.experiments import search

SMALL = {"overview_px": 512, "chip_px": 16, "zoom_px": 128}
"""A quick run: the montage at half the pixels (the chips cover the same 125 nm)."""


def test_montage_grid_known_answer():
    grid = search.montage_grid({"x_um": [-4.0, 4.0], "y_um": [-4.0, 4.0]}, 4000.0)
    assert grid == [(-2.0, -2.0), (2.0, -2.0), (2.0, 2.0), (-2.0, 2.0)]  # serpentine
    assert len(search.montage_grid({"x_um": [-4.0, 4.0], "y_um": [-4.0, 4.0]}, 600.0)) == 14 * 14


def test_find_regions_groups_and_ranks():
    labels = np.zeros((8, 8), np.int64)
    conf = np.full((8, 8), 0.9, np.float32)
    labels[1:3, 1:3] = 1  # a 4-chip region, best chip 0.8
    conf[1:3, 1:3] = [[0.6, 0.7], [0.7, 0.8]]
    labels[6, 6] = 2  # a 1-chip region of the other target, 0.95
    conf[6, 6] = 0.95
    labels[4, 0] = 1  # below the confidence floor
    conf[4, 0] = 0.3
    proba = np.zeros((8, 8, 3), np.float32)
    cm = ChipMap(labels, conf, proba, ("monolayer", "defect_cluster", "particle"), 10)
    f = {"frame_id": 1, "fov_nm": 800.0, "shape": [80, 80], "stage_um": [1.0, -1.0]}
    regions = search.find_regions([(f, cm)], ("defect_cluster", "particle"), 0.5)
    assert [(q.rank, q.cls, q.chips) for q in regions] == [(1, "particle", 1), (2, "defect_cluster", 4)]
    # chip (6, 6) centre is pixel (65, 65) of 80 at 10 nm/px: 25 px = 0.25 um right of and below the centre
    assert regions[0].x_um == pytest.approx(1.25) and regions[0].y_um == pytest.approx(-0.75)
    assert regions[1].score == pytest.approx(0.8)


def test_options_refused_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="budget"):
        search.run(tmp_path, budget_moves=0, quiet=True)
    with pytest.raises(ValueError, match="strategy"):
        search.run(tmp_path, strategy="spiral", quiet=True)
    with pytest.raises(ValueError, match="montage needs 4"):
        search.run(tmp_path, budget_moves=4, quiet=True, compare=False, **SMALL)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    return out, search.run(out, seed=0, budget_moves=10, quiet=True, **SMALL)


def test_search_report_and_baselines(report):
    out, rep = report
    assert rep["outcome"]["complete"] and not rep["outcome"]["output_errors"]
    st = rep["search"]["strategies"]
    assert set(st) == {"search", "raster", "random"}
    assert all(v["moves_used"] == 10 for v in st.values())  # the same stage-move budget
    assert st["search"]["rare_found"] >= 3  # the seed-0 specimen has 16 rare regions
    assert rep["search"]["ratio_vs_raster"] == pytest.approx(
        st["search"]["rare_per_move"] / max(st["raster"]["rare_per_move"], 0.5 / 10))
    assert rep["search"]["ratio_vs_raster"] >= 3
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["search"]["strategies"] == json.loads(json.dumps(st))
    visited = [q for q in rep["search"]["regions"] if q["visited"]]
    assert len(visited) == 10 - 4 and all(q["rank"] >= 1 for q in visited)
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_run_file_records_moves_frames_and_chips(report):
    out, rep = report
    with h5py.File(out / "run.h5") as h5:
        g = h5["search"]
        moves = g["stage_moves"][()]
        assert len(moves) == 10 and [m.decode() for m in moves["purpose"][:4]] == ["montage"] * 4
        assert len(g["frames"]) == 10
        kinds = sorted(g["frames"][k].attrs["kind"] for k in g["frames"])
        assert kinds.count("overview") == 4
        assert len(g["chips"]) == 4 * 32 * 32  # every chip decision of the montage
        assert len(h5["raster"]["stage_moves"]) == 10 and len(h5["raster"]["chips"]) == 0
        assert json.loads(h5.attrs["config"])["budget_moves"] == 10


def test_interrupt_stops_cleanly(tmp_path):
    calls = {"n": 0}

    def interrupt() -> int:
        calls["n"] += 1
        return 15 if calls["n"] > 3 else 0

    rep = search.run(tmp_path, seed=0, budget_moves=8, quiet=True, interrupt=interrupt, **SMALL)
    assert rep["outcome"]["reason"] == "interrupted" and rep["outcome"]["signum"] == 15
    assert not rep["outcome"]["complete"]
    assert json.loads((tmp_path / "report.json").read_text())["outcome"]["reason"] == "interrupted"
    with h5py.File(tmp_path / "run.h5") as h5:
        assert len(h5["search"]["stage_moves"]) == 2  # move, frame, move, frame: stopped at the third step


def test_run_experiment_search_is_the_search(tmp_path):
    import json

    from beamloop.edge.cli import main

    out = tmp_path / "run"
    assert main(["run", "--experiment", "search", "--budget-moves", "6", "--quiet", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    s = rep["search"]
    assert not rep["outcome"]["reason"]
    st = s["strategies"]
    assert st["search"]["moves_used"] == st["raster"]["moves_used"] == 6  # the same stage-move budget
    raster = max(st["raster"]["rare_found"], 0.5)  # a baseline that found none counts as half a region
    assert s["ratio_vs_raster"] == pytest.approx(st["search"]["rare_found"] / raster)
    assert (out / "run.h5").exists() and (out / "report.html").exists()
