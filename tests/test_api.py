"""The public Python API: ``import beamloop`` in a fresh interpreter, its names, and the doctests."""

import doctest
import subprocess
import sys

import numpy as np
import pytest

import beamloop
from beamloop.edge import api


def test_import_beamloop_is_cheap_and_names_resolve_lazily():
    code = ("import sys, beamloop; assert 'numba' not in sys.modules, 'import beamloop pulled in numba'; "
            "print(beamloop.__version__, callable(beamloop.find_columns))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [beamloop.__version__, "True"]
    assert set(api.__all__) <= set(dir(beamloop))


def test_api_doctests():
    res = doctest.testmod(api, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 4 and res.failed == 0


def test_find_columns_on_a_simulated_frame_matches_the_truth():
    from beamloop.edge.analysis.scoring import score_frame

    fr = beamloop.simulated_frame(shape=(160, 160), pixel_size_A=0.15, seed=11)
    cols = beamloop.find_columns(fr.counts, pixel_size_A=0.15, material="MoS2")
    s = score_frame(cols.xy, cols.cls, fr.truth_xy, fr.truth_cls, cols.class_names, 0.15, frame_shape=(160, 160))
    assert s.recall >= 0.99 and s.precision >= 0.99


def test_find_in_file_gives_a_table_per_frame(tmp_path):
    fr = beamloop.simulated_frame(shape=(96, 96), seed=2)
    stack = np.stack([fr.counts, fr.counts[::-1].copy()])
    np.save(tmp_path / "stack.npy", stack)
    tables = beamloop.find_in_file(tmp_path / "stack.npy", pixel_size_A=0.15, material="MoS2")
    one = beamloop.find_columns(fr.counts, pixel_size_A=0.15, material="MoS2")
    assert len(tables) == 2 and len(one) > 30 and np.array_equal(tables[0].x, one.x)


def test_service_settings_after_the_material_are_taken_by_name_only():
    """A setting added to ServiceConfig later cannot shift a caller's positional arguments."""
    from beamloop.edge.app import ServiceConfig

    with pytest.raises(TypeError):
        ServiceConfig("MoS2", "unet")
    assert ServiceConfig("MoS2", method="unet").method == "unet"
