"""Serving the learned finder (edge/segment.py): providers, tiling, column extraction, the shipped ensemble,
and its use by the pipeline and `beamloop find`."""

import json
import math

import numpy as np
import pytest

from edge import segment
from edge.pipeline import FramePipeline
from edge.preprocess import FrameError
from edge.scoring import score_frame
from edge.segment import SEG_CLASSES, ModelError, UNetFinder, normalise_frame, select_providers, tile_origins
from edge.sim.frames import mos2_frame


# --- providers -------------------------------------------------------------------------------------------
def test_provider_selection_order_and_errors():
    cpu, cuda, trt = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    assert select_providers("auto", [cpu]) == [cpu]
    assert select_providers("auto", [trt, cuda, cpu]) == [trt, cuda, cpu]
    assert select_providers("auto", [cuda, cpu]) == [cuda, cpu]
    assert select_providers("cpu", [trt, cuda, cpu]) == [cpu]
    assert select_providers("cuda", [trt, cuda, cpu]) == [cuda, cpu]
    assert select_providers("tensorrt", [trt, cuda, cpu]) == [trt, cuda, cpu]
    with pytest.raises(ModelError, match="gpu"):
        select_providers("cuda", [cpu])
    with pytest.raises(ModelError, match="TensorrtExecutionProvider"):
        select_providers("tensorrt", [cuda, cpu])
    with pytest.raises(ModelError, match="unknown device"):
        select_providers("tpu", [cpu])


# --- tiling ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, tile, overlap", [(256, 256, 32), (100, 256, 32), (1024, 256, 32), (300, 64, 16),
                                              (65, 64, 8)])
def test_tile_cores_partition_the_frame(n, tile, overlap):
    origins = tile_origins(n, tile, overlap)
    assert origins[0] == 0 and (n <= tile or origins[-1] == n - tile)
    assert all(b - a <= tile - overlap for a, b in zip(origins, origins[1:]))
    owned = np.zeros(n, int)
    for k in range(len(origins)):
        lo, hi = segment._core(origins, k, n, tile)
        assert origins[k] <= lo < hi <= origins[k] + tile
        owned[lo:hi] += 1
    assert (owned == 1).all()
    with pytest.raises(ValueError):
        tile_origins(n, tile, tile)


def _identity_model(folder, tile=64, members=2):
    """A stand-in network that returns its input as every member's heat and every class channel."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 1, tile, tile])
    heat = helper.make_tensor_value_info("heat", TensorProto.FLOAT, [1, members, tile, tile])
    cls = helper.make_tensor_value_info("classes", TensorProto.FLOAT, [1, len(SEG_CLASSES), tile, tile])
    nodes = [helper.make_node("Concat", ["image"] * members, ["heat"], axis=1),
             helper.make_node("Concat", ["image"] * len(SEG_CLASSES), ["classes"], axis=1)]
    model = helper.make_model(helper.make_graph(nodes, "identity", [x], [heat, cls]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(folder / "id.onnx"))
    (folder / "manifest.json").write_text(json.dumps({"files": {"fp32": "id.onnx"}, "tile": tile, "members": members,
                                                      "classes": list(SEG_CLASSES)}))
    return folder


@pytest.mark.parametrize("shape", [(150, 203), (40, 50), (64, 64)])
def test_tiles_stitch_back_exactly(tmp_path, shape):
    finder = UNetFinder(_identity_model(tmp_path), device="cpu", overlap=16)
    assert finder.providers == ["CPUExecutionProvider"] and finder.session.tile == 64
    frame = np.random.default_rng(0).poisson(50, shape).astype(np.uint16)
    res = finder.find(frame)
    assert np.array_equal(res.heat, normalise_frame(frame))
    assert not res.heat_map_std.any()
    assert set(res.timings_ns) == {"normalise", "network", "extract"}


def test_model_and_frame_errors(tmp_path):
    with pytest.raises(ModelError, match="manifest"):
        UNetFinder(tmp_path, device="cpu")
    _identity_model(tmp_path)
    with pytest.raises(ModelError, match="int8"):
        UNetFinder(tmp_path, "int8", device="cpu")
    with pytest.raises(ModelError, match="precision"):
        UNetFinder(tmp_path, "fp8", device="cpu")
    finder = UNetFinder(tmp_path, device="cpu")
    bad = np.ones((80, 80), np.float32)
    bad[3, 4] = np.nan
    for frame, msg in ((bad, "non-finite"), (np.ones((4, 80)), "too small"), (np.ones((2, 80, 80)), "2-D"),
                       (np.ones((80, 80), np.float16), "dtype")):
        with pytest.raises(FrameError, match=msg):
            finder.find(frame)
    with pytest.raises(ValueError, match="material"):
        finder.find(np.ones((80, 80)), "graphene")


def test_columns_from_heat_maps(tmp_path):
    """Gaussian heat maps of known sub-pixel centres: positions, member spread, classes, scores."""
    finder = UNetFinder(_identity_model(tmp_path, members=2), device="cpu", threshold=0.4)
    shape = (48, 60)
    finder._allocate(shape)
    truth = np.array([[10.3, 12.6], [30.0, 20.45], [45.7, 33.2], [20.0, 40.0]])
    shift = 0.1  # member 0 sees every column 0.1 px to the left, member 1 to the right
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    s2 = 2 * segment.HEAT_SIGMA_PX ** 2
    finder._heat[:] = 0
    finder._cls[:] = 0
    for k, d in enumerate((-shift, shift)):
        for c, (x, y) in enumerate(truth):
            g = np.exp(-((xx - x - d) ** 2 + (yy - y) ** 2) / s2) * (0.9 if c < 3 else 0.3)
            finder._heat[k] = np.maximum(finder._heat[k], g)
    for c, (x, y) in enumerate(truth):
        finder._cls[c % 3, int(round(y)), int(round(x))] = 1.0
    res = finder._extract(np.zeros(shape, np.uint16), "MoS2")
    cols = res.columns
    assert len(cols) == 3  # the fourth peaks at 0.3 < threshold
    order = np.argsort(cols.x)
    # the mean of two shifted Gaussians peaks at the truth; log-parabola refinement is exact for one Gaussian
    assert np.allclose(cols.xy[order], truth[:3], atol=0.02)
    assert np.allclose(res.position_std_px, shift, atol=0.01)
    assert list(cols.cls[order]) == [0, 1, 2] and cols.class_names[:3] == ("Mo", "S2", "S1")
    assert ((cols.score > 0.8) & (cols.score <= 0.9)).all() and (res.heat_std < 0.05).all()  # heat at the peak pixel
    gen = finder._extract(np.zeros(shape, np.uint16), "generic").columns
    assert gen.class_names == ("column",) and (gen.cls == 0).all()


# --- the shipped ensemble ----------------------------------------------------------------------------------
shipped = pytest.mark.skipif(not (segment.default_model_dir() / "manifest.json").is_file(),
                             reason="no shipped model in edge/models/unet (run `beamloop train`)")


@pytest.fixture(scope="module")
def finders():
    return {p: UNetFinder(precision=p, device="cpu") for p in segment.PRECISIONS}


def _score(finder, frames):
    from edge.scoring import combine

    return combine([_score_one(finder, f) for f in frames])


def _score_one(finder, f):
    cols = finder.find(f.counts, "MoS2").columns
    return score_frame(cols.xy, cols.cls, f.truth_xy, f.truth_cls, f.class_names, f.pixel_size_A,
                       frame_shape=f.counts.shape)


@shipped
def test_shipped_manifest_names_its_files_and_metrics():
    man = segment.load_manifest()
    assert man["members"] >= 3 and man["tile"] == 256 and man["opset"] >= 17
    import hashlib

    for prec, name in man["files"].items():
        data = (segment.default_model_dir() / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == man["sha256"][prec]
    assert sum(man["size_bytes"].values()) < 8e6
    assert {"fp32", "fp16", "int8", "classical"} <= set(man["metrics"])


@shipped
@pytest.mark.parametrize("dose, recall, precision, rms", [(1e4, 0.99, 0.99, 8.0), (1e5, 0.99, 0.99, 5.0)])
def test_shipped_model_on_held_out_mos2(finders, dose, recall, precision, rms):
    """The issue's bar on held-out simulated MoS2 (seeds never trained on), 256 x 256 at 0.15 A/px."""
    frames = [mos2_frame(dose_e_per_A2=dose, seed=200_000 + k) for k in range(2)]
    s = _score(finders["fp32"], frames)
    assert s.recall >= recall and s.precision >= precision and s.rms_pm <= rms
    for prec in ("fp16", "int8"):
        q = _score(finders[prec], frames)
        assert abs(q.rms_pm - s.rms_pm) <= 1.0 and abs(q.recall - s.recall) <= 0.005


@shipped
def test_shipped_model_classifies_mos2_columns(finders):
    f = mos2_frame(dose_e_per_A2=1e5, seed=200_010)
    s = _score_one(finders["fp32"], f)
    assert s.per_class["Mo"]["correct"] >= 0.98 and s.per_class["S2"]["correct"] >= 0.95


@shipped
def test_pipeline_unet_method_and_vacancies(finders):
    f = mos2_frame(dose_e_per_A2=1e5, seed=200_020)
    pipe = FramePipeline("MoS2", method="unet", unet=finders["fp32"])
    res = pipe.process(f.counts, f.pixel_size_A)
    seg = res.segment
    assert seg is not None and len(res.columns) >= len(seg.columns)
    assert res.columns.class_names == ("Mo", "S2", "S1", "vacancy")
    assert set(res.timings_ns) == {"preprocess", "find", "classify", "policy"}
    # inferred vacancy sites lie on true vacancy sites
    vac_true = f.truth_xy[f.truth_cls == 3]
    vac_found = res.columns.xy[res.columns.cls == 3]
    if len(vac_found):
        from scipy.spatial import cKDTree

        d, _ = cKDTree(vac_true).query(vac_found)
        assert np.mean(d < 0.5 / f.pixel_size_A) >= 0.5
    assert len(seg.uncertainty) == len(seg.columns) and np.isfinite(seg.uncertainty).all()


@shipped
def test_find_files_unet_writes_tables_overlays_and_uncertainty(tmp_path, finders):
    from importlib import resources

    from edge.findfiles import find_files

    ex = resources.files("edge") / "data" / "examples" / "si110_haadf_atomsegnet.png"
    out = find_files([ex], tmp_path, method="unet", device="cpu", precision="int8")
    o = out[0]
    assert not o.error and len(o.columns) > 100
    for p in (o.csv, o.overlay, o.uncertainty, tmp_path / "si110_haadf_atomsegnet_uncertainty.csv"):
        assert p.is_file() and p.stat().st_size > 0
    rows = np.loadtxt(tmp_path / "si110_haadf_atomsegnet_uncertainty.csv", delimiter=",", skiprows=1)
    assert rows.shape == (len(o.columns), 5)


def test_pipeline_estimates_the_scale_of_uncalibrated_frames():
    """No pixel size and no fixed configuration: the first frame's lattice sets the finder; a flat frame
    gives a FrameError (the service counts and skips it) rather than a crash."""
    f = mos2_frame(dose_e_per_A2=1e5, seed=3)
    pipe = FramePipeline("generic")
    with pytest.raises(FrameError, match="scale"):
        pipe.process(np.full((128, 128), 5, np.uint16))
    res = pipe.process(f.counts)
    s = score_frame(res.columns.xy, np.zeros(len(res.columns), np.int8), f.truth_xy[f.truth_cls < 3],
                    np.zeros(int((f.truth_cls < 3).sum()), np.int8), ("column",), f.pixel_size_A,
                    frame_shape=f.counts.shape)
    assert s.recall > 0.95 and s.precision > 0.95
    cfg = pipe.finder_for(None).config  # cached: later frames reuse the estimate
    assert math.isclose(cfg.min_distance_px, pipe.finder_for(None, np.zeros((3, 3))).config.min_distance_px)
    with pytest.raises(ValueError, match="no pixel size"):
        FramePipeline("generic").finder_for(None)
    with pytest.raises(ValueError, match="method"):
        FramePipeline("MoS2", method="deep")
