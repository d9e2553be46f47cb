"""The service-side integer trigger model (edge/trigger/model.py): features, integer arithmetic, streaming,
bit-exactness of the shipped model with its plain-ONNX graph, and the trigger interface."""

import json

import numpy as np
import pytest

from beamloop.edge.trigger import make_trigger
from beamloop.edge.trigger.model import (
    MODEL_DIR,
    NO_SCORE,
    FeatureSpec,
    IntegerMLP,
    ModelTrigger,
    load_manifest,
    prefill_counts,
    rate_word,
    window_features,
)


def test_features_by_hand():
    spec = FeatureSpec(window=3, blocks=2, block=2, shift=1, input_bits=4)
    x = np.array([1, 2, 3, 4, 5, 6, 20, 8], np.uint16)  # history = 3 + 2 * 2 = 7
    f = window_features(x, spec)
    # decision at sample 6: window x[4..6] = 5, 6, 20 -> 20 saturates at 15; blocks x[0..1], x[2..3] -> 3>>1, 7>>1
    # decision at sample 7: window 6, 20, 8 -> 6, 15, 8; blocks x[1..2] = 5 -> 2, x[3..4] = 9 -> 4
    assert f.tolist() == [[5, 6, 15, 1, 3], [6, 15, 8, 2, 4]]
    assert window_features(x, spec, np.array([7])).tolist() == [[6, 15, 8, 2, 4]]
    with pytest.raises(ValueError, match="history"):
        window_features(x, spec, np.array([5]))
    with pytest.raises(ValueError, match="integer"):
        window_features(x.astype(float), spec)


def _tiny(tmp_path, spec: FeatureSpec, seed: int = 0, threshold: int = 0):
    """A random integer network in its own model folder (no training needed for arithmetic tests)."""
    rng = np.random.default_rng(seed)
    n = spec.n_features
    mlp = IntegerMLP([rng.integers(-31, 32, (6, n)), rng.integers(-31, 32, (4, 6)), rng.integers(-31, 32, (1, 4))],
                     [rng.integers(-500, 500, 6), rng.integers(-500, 500, 4), rng.integers(-500, 500, 1)],
                     np.array([-4, -3]), np.array([255, 63]), 2.0 ** -7, spec.input_max)
    mlp.save(tmp_path / "tiny_int.npz")
    manifest = {"format": 1, "models": {"tiny": {"files": {"integer": "tiny_int.npz"}, "features": spec.as_dict(),
                                                  "threshold": {"score": threshold}}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return mlp


def test_integer_mlp_by_hand():
    # 2 inputs (0..15) -> 2 hidden (shift -1, 3-bit activations) -> 1 output
    mlp = IntegerMLP([np.array([[3, -1], [1, 1]]), np.array([[2, -5]])], [np.array([1, -20]), np.array([7])],
                     np.array([-1]), np.array([7]), 0.25, 15)
    x = np.array([[4, 2], [10, 0], [0, 9], [4, 40]])
    # [4,2]: acc = 11, -14 -> a = 5, 0 -> 2*5 + 7 = 17; [10,0]: 31 -> 15 saturates at 7, -10 -> 0 -> 21;
    # [0,9]: -8 -> 0, -11 -> 0 -> 7; [4,40] is read as [4,15]: -2 -> 0, -1 -> 0 -> 7
    assert mlp.scores(x).tolist() == [17, 21, 7, 7]
    with pytest.raises(ValueError, match="length 2"):
        mlp.scores(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="chain"):
        IntegerMLP([np.zeros((2, 2)), np.zeros((1, 3))], [np.zeros(2), np.zeros(1)], np.array([0]), np.array([1]), 1.0,
                   15)


def test_streaming_equals_batch_and_block_splitting(tmp_path):
    spec = FeatureSpec(window=8, blocks=3, block=4, shift=1)
    mlp = _tiny(tmp_path, spec)
    rng = np.random.default_rng(3)
    x = rng.poisson(9, 3000).astype(np.uint16)
    t = ModelTrigger("tiny", model_dir=tmp_path)
    scores = t.stream_scores(x)
    ref = mlp.scores(window_features(x, spec))
    assert np.array_equal(scores[spec.history - 1:], ref)
    assert np.all(scores[:spec.history - 1] < -(2 ** 61))
    # the trigger fires at the first score >= threshold, however the samples are split into blocks
    thr = int(np.sort(ref)[-20])
    expect = int(np.flatnonzero(ref >= thr)[0]) + spec.history - 1
    for block in (1, 7, 100, 3000):
        t = ModelTrigger("tiny", model_dir=tmp_path, threshold=thr)
        fired = [k for k in (t.update(x[a:a + block]) for a in range(0, len(x), block)) if k >= 0]
        assert len(fired) == 1 and t.trigger_sample == expect and t.triggered
    assert t.baseline_rate == pytest.approx(x[:spec.history].mean())


def _numpy_scores(mlp: IntegerMLP, x: np.ndarray) -> np.ndarray:
    """Reference: the integer arithmetic of the module docstring with numpy int64 matrix products."""
    a = np.clip(x.astype(np.int64), 0, mlp.input_max)
    for k, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
        z = a @ w.T + b
        if k == len(mlp.weights) - 1:
            return z[:, 0]
        e = int(mlp.shifts[k])
        z = np.maximum(z, 0)
        a = np.minimum(z << e if e >= 0 else z >> -e, mlp.act_max[k])


@pytest.mark.parametrize("big", [False, True])
def test_int32_and_int64_kernels_match_numpy(big):
    # 12-bit inputs, 10-bit activations; big biases push the accumulator bound past int32 -> the int64 kernel
    rng = np.random.default_rng(5 if big else 6)
    w = [rng.integers(-511, 512, (20, 40)), rng.integers(-3, 4, (7, 20)), rng.integers(-511, 512, (1, 7))]
    b = [rng.integers(-5000, 5000, 20), rng.integers(-500, 500, 7), np.array([2 ** 31 - 5 if big else -123])]
    # layer 0: floor(acc / 2**14) into 10 bits; layer 1: acc * 2 into 16 bits (both shift directions)
    mlp = IntegerMLP(w, b, np.array([-14, 1]), np.array([1023, 65535]), 1.0, 4095)
    assert mlp.dtype == (np.int64 if big else np.int32) and (mlp.acc_bound >= 2 ** 31) == big
    x = rng.integers(-100, 5000, (3000, 40))  # out-of-range values are clipped as the input quantiser does
    ref = _numpy_scores(mlp, x)
    assert np.array_equal(mlp.scores(x), ref) and len(np.unique(ref)) > 1000


def test_huge_counts_and_negative_blocks(tmp_path):
    spec = FeatureSpec(window=8, blocks=3, block=4, shift=2)
    mlp = _tiny(tmp_path, spec)
    rng = np.random.default_rng(9)
    x = rng.integers(0, 65536, 2000).astype(np.uint16)  # far above the input range: features saturate exactly
    t = ModelTrigger("tiny", model_dir=tmp_path, threshold=2 ** 40)
    assert np.array_equal(t.stream_scores(x)[spec.history - 1:], mlp.scores(window_features(x, spec)))
    t.update(x[:50].astype(np.int32))
    before = t.history()
    with pytest.raises(ValueError, match="negative"):
        t.update(np.array([3, -1, 4], np.int32))
    assert np.array_equal(t.history(), before) and t.samples_seen == 50  # the bad block changed nothing


def test_expected_rate_prefills_history(tmp_path):
    spec = FeatureSpec(window=8, blocks=3, block=4, shift=0)
    _tiny(tmp_path, spec, threshold=-(2 ** 40))  # fires on the first decided sample
    t = ModelTrigger("tiny", model_dir=tmp_path)
    t.start(expected_rate=2.5)
    assert t.baseline_rate == 2.5
    hist = t.history()  # the h - 1 samples before the first decision; their running sum follows the rate
    assert len(hist) == spec.history - 1
    assert np.array_equal(np.cumsum(hist), np.floor(np.arange(2, spec.history + 1) * 2.5) - 2)
    assert t.update(np.array([3, 3], np.uint16)) == 0 and t.trigger_sample == 0
    t.start()
    assert t.update(np.full(spec.history - 1, 3, np.uint16)) == -1  # not enough history yet
    assert t.update(np.array([3], np.uint16)) == 0 and t.trigger_sample == spec.history - 1


def test_rate_word_and_prefill_by_hand():
    assert rate_word(None) == 0
    assert rate_word(2.5) == 163840 and rate_word(7.5) == 491520  # exact in 16 fractional bits
    assert rate_word(1 / 3) == 21845  # 21845.33 rounds down
    assert rate_word(2.0 ** -17) == 1 and rate_word(1e-9) == 1  # half an LSB rounds up; never 0 ("none")
    assert rate_word(1e12) == 2 ** 32 - 1
    with pytest.raises(ValueError, match="positive"):
        rate_word(-1.0)
    # word 2.5: floor(k * 2.5) for k = 1..6 is 2, 5, 7, 10, 12, 15 -> counts for j = 1..5: 3, 2, 3, 2, 3
    assert prefill_counts(163840, 6).tolist() == [3, 2, 3, 2, 3]
    # one third: floor(k / 3) for k = 0..7 steps at 3 and 6 -> counts for j = 1..6: 0, 1, 0, 0, 1, 0
    assert prefill_counts(21845, 7).tolist() == [0, 0, 1, 0, 0, 1]  # 21845 / 2**16 is just below 1/3
    assert prefill_counts(21846, 7).tolist() == [0, 1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="word"):
        prefill_counts(0, 5)


def test_expected_rate_uses_the_integer_word(tmp_path):
    spec = FeatureSpec(window=4, blocks=2, block=4, shift=1)
    _tiny(tmp_path, spec)
    t = ModelTrigger("tiny", model_dir=tmp_path)
    t.start(expected_rate=1 / 3)
    assert t.rate_word == 21845 and t.baseline_rate == 1 / 3
    assert np.array_equal(t.history(), prefill_counts(21845, spec.history))
    t.start()
    assert t.rate_word == 0 and len(t.history()) == 0


def test_update_scores_rearm_and_history_after_firing(tmp_path):
    spec = FeatureSpec(window=8, blocks=3, block=4, shift=1)
    mlp = _tiny(tmp_path, spec)
    rng = np.random.default_rng(4)
    x = rng.poisson(9, 2500).astype(np.uint16)
    ref = ModelTrigger("tiny", model_dir=tmp_path).stream_scores(x)
    assert np.all(ref[:spec.history - 1] == NO_SCORE)
    assert np.array_equal(ref[spec.history - 1:], mlp.scores(window_features(x, spec)))
    thr = int(np.sort(ref)[-40])
    fires = np.flatnonzero(ref >= thr)
    t = ModelTrigger("tiny", model_dir=tmp_path, threshold=thr)
    got, firsts = [], []
    for a in range(0, len(x), 97):  # blocks across the firing sample; scores continue while latched
        k, sc = t.update_scores(x[a:a + 97])
        got.append(sc)
        if k >= 0:
            firsts.append(a + k)
            t.rearm()  # rearm at once: the next score >= threshold fires again
    assert np.array_equal(np.concatenate(got), ref)
    # rearmed after each block: every block with a score >= threshold fires at its first such sample
    blocks = [fires[(fires >= a) & (fires < a + 97)] for a in range(0, len(x), 97)]
    assert firsts == [int(b[0]) for b in blocks if len(b)] and len(firsts) > 3
    # latched: update returns -1 but the history keeps filling, so a rearm later decides as the logic does
    t = ModelTrigger("tiny", model_dir=tmp_path, threshold=thr)
    u = ModelTrigger("tiny", model_dir=tmp_path, threshold=2 ** 40)  # never fires
    first = fires[0]
    assert t.update(x[:first + 1]) == first and t.update(x[first + 1:first + 300]) == -1
    u.update(x[:first + 300])
    assert np.array_equal(t.history(), u.history()) and t.samples_seen == u.samples_seen == first + 300
    t.rearm()
    later = fires[fires >= first + 300]
    k = t.update(x[first + 300:])
    assert k == (later[0] - first - 300 if len(later) else -1)
    assert t.trigger_sample == (later[0] if len(later) else -1)


def test_logic_latency_from_the_manifest(tmp_path):
    spec = FeatureSpec(window=4, blocks=0)
    _tiny(tmp_path, spec)
    t = ModelTrigger("tiny", model_dir=tmp_path)
    assert t.logic_latency_cycles is None and np.isnan(t.logic_latency_ns)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["models"]["tiny"]["logic"] = {"latency_cycles": 9, "latency_ns": 90.0}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    t = ModelTrigger("tiny", model_dir=tmp_path)
    assert t.logic_latency_cycles == 9 and t.logic_latency_ns == 90.0


def test_bad_input(tmp_path):
    _tiny(tmp_path, FeatureSpec(window=4, blocks=0))
    t = ModelTrigger("tiny", model_dir=tmp_path)
    with pytest.raises(ValueError, match="non-finite"):
        t.update(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="negative"):
        t.update(np.array([1, -2]))
    with pytest.raises(ValueError, match="positive"):
        t.start(expected_rate=0.0)
    with pytest.raises(FileNotFoundError, match="manifest"):
        ModelTrigger(model_dir=tmp_path / "nowhere")
    with pytest.raises(KeyError):
        ModelTrigger("absent", model_dir=tmp_path)


# the shipped model -------------------------------------------------------------------------------------------

def _shipped_inputs(name: str = "ejection", n_sim: int = 3000, n_random: int = 2000):
    from beamloop.quantize.data import StreamConditions, training_segments

    entry = load_manifest()["models"][name]
    spec = FeatureSpec(**entry["features"])
    segs = training_segments(60, spec.history + 64, (spec.history - 40, spec.history + 64), 0.5, StreamConditions(), 7)
    sim = np.concatenate([window_features(c, spec) for c in segs.counts])[:n_sim]
    rnd = np.random.default_rng(8).integers(0, spec.input_max + 1, (n_random, spec.n_features))
    return entry, np.concatenate([sim, rnd]).astype(np.int64)


@pytest.mark.parametrize("name", ["ejection", "ejection_h16"])
def test_shipped_model_is_bit_exact_with_its_plain_onnx_graph(name):
    import onnxruntime as ort

    entry, x = _shipped_inputs(name)
    mlp = IntegerMLP.load(MODEL_DIR / entry["files"]["integer"])
    sess = ort.InferenceSession(str(MODEL_DIR / entry["files"]["plain_onnx"]), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0].reshape(-1)
    ref = mlp.scores(x).astype(np.float64) * mlp.output_scale
    assert len(x) == 5000 and np.array_equal(y.astype(np.float64), ref)


def test_shipped_model_detects_an_ejection_on_the_main_jobs_stream():
    from beamloop.quantize.data import StreamConditions, dwell_streams

    st = dwell_streams(20, StreamConditions.clean(), seed=31)
    t = make_trigger("model")
    assert isinstance(t, ModelTrigger) and t.name == "model"
    fired = 0
    for counts, ev in zip(st.counts, st.event):
        t.start()
        for a in range(0, len(counts), 100):  # blocks of 100 samples, as the microscope sends them
            if t.update(counts[a:a + 100]) >= 0:
                break
        assert t.triggered and t.trigger_sample >= ev, "false trigger before the ejection"
        assert t.trigger_sample - ev < 100
        assert t.baseline_rate == pytest.approx(7.5, rel=0.1)
        fired += 1
    assert fired == 20


def test_shipped_4d_stem_trigger_is_bit_exact_with_its_plain_onnx_graph():
    import onnxruntime as ort

    from beamloop.quantize.fourd import exactness_inputs

    entry = load_manifest()["models"]["fourd_column"]
    x = exactness_inputs(entry["input"]["shape"][0], entry["input"]["input_bits"], seed=21)
    mlp = IntegerMLP.load(MODEL_DIR / entry["files"]["integer"])
    sess = ort.InferenceSession(str(MODEL_DIR / entry["files"]["plain_onnx"]), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0].reshape(-1)
    scores = mlp.scores(x)
    assert len(x) >= 4000 and np.array_equal(y.astype(np.float64), scores * mlp.output_scale)
    assert 0.05 < np.mean(scores >= entry["threshold"]["score"]) < 0.95  # it does tell patterns apart
