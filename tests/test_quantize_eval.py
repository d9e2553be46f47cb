"""Training/evaluation streams, the classical triggers' statistics and the sequential scoring (no torch)."""

import numpy as np
import pytest

from beamloop.edge.trigger.classical import CusumTrigger, WindowTrigger
from beamloop.quantize.baselines import cusum_statistic, window_statistic
from beamloop.quantize.data import NO_EVENT, StreamConditions, dwell_streams, training_segments
from beamloop.quantize.evaluate import calibrate, candidate_thresholds, roc, sweep


def test_clean_stream_matches_the_microscopes_physics():
    st = dwell_streams(6, StreamConditions.clean(), seed=4)
    # ~7.5 counts per sample on an S2 column at 50 pA and 10 us; an S atom leaving about halves it
    assert np.all((st.rate0 > 7.0) & (st.rate0 < 8.0))
    assert np.all((st.drop > 0.45) & (st.drop < 0.56))
    for counts, ev, r0 in zip(st.counts, st.event, st.rate0):
        assert counts.dtype == np.uint16 and len(counts) == ev + 2000 and ev >= 256
        assert counts[:ev].mean() == pytest.approx(r0, rel=0.05)
        assert counts[ev:].mean() == pytest.approx(r0 * 0.51, rel=0.08)


def test_training_segments_have_events_where_labelled():
    cond = StreamConditions()
    segs = training_segments(200, 300, (150, 300), 0.5, cond, seed=2)
    has = segs.event != NO_EVENT
    assert 60 < has.sum() < 140 and np.all((segs.event[has] >= 150) & (segs.event[has] < 300))
    assert set(segs.kind) == {"none", "eject", "hop"}
    assert np.all(segs.drop[~has] == 1.0) and np.median(segs.drop[has]) < 0.7
    with pytest.raises(ValueError, match="event range"):
        training_segments(1, 100, (50, 200), 0.5, cond, seed=0)


def test_cusum_statistic_fires_where_the_trigger_fires():
    rng = np.random.default_rng(11)
    for seed in range(5):
        x = np.concatenate([rng.poisson(7.5, 2000 + 100 * seed), rng.poisson(3.7, 300)]).astype(np.uint16)
        for h in (6.0, 14.0):
            t = CusumTrigger(h=h)
            t.start()
            t.update(x)
            s = cusum_statistic(x)
            assert t.trigger_sample == int(np.flatnonzero(s > h)[0])


def test_window_statistic_fires_where_the_trigger_fires():
    rng = np.random.default_rng(12)
    x = np.concatenate([rng.poisson(7.5, 3000), rng.poisson(3.7, 300)]).astype(np.uint16)
    for fraction in (0.6, 0.72):
        t = WindowTrigger(window=16, fraction=fraction)
        t.start()
        t.update(x)
        s = window_statistic(x, window=16)
        assert np.all(np.isinf(s[:128 + 15]))
        assert t.trigger_sample == int(np.flatnonzero(s > 1 - fraction)[0])


def test_sweep_counts_false_triggers_exposure_and_delay_by_hand():
    inf = -np.inf
    scores = [np.array([inf, 1, 5, 2, 2, 9, 9, 9.0]),  # event at 4: pre max 5, post first >= 9 at index 5
              np.array([inf, 0, 1, 1, 7, 1.0]),  # no event
              np.array([inf, 2, 3, 3, 8.0])]  # event at 3, post reaches 8 at index 4 only
    events = np.array([4, NO_EVENT, 3])
    sw = sweep(scores, events, np.array([3.0, 6.0, 8.5]), sample_time_us=10.0)
    # thr 3: stream 0 fires at 2 (3 samples), stream 1 at 4 (5 samples), stream 2 at 2 (3 samples)
    assert sw.false_triggers.tolist() == [3, 1, 0]
    assert sw.exposure_s.tolist() == pytest.approx([11e-5, (4 + 5 + 3) * 1e-5, (4 + 6 + 3) * 1e-5])
    # thr 6: stream 0 detects at index 5 = 2 lowered samples, stream 2 at index 4 = 2; thr 8.5: stream 2 misses
    assert sw.delay_p50[1] == 2 and sw.missed[1] == 0
    assert sw.delay_p50[2] == 2 and sw.missed[2] == 0.5
    assert calibrate(sw, 0.0) == 8.5 and calibrate(sw, 2e4) == 6.0
    thr = candidate_thresholds(scores, events)
    assert np.all(np.diff(thr) > 0) and thr[0] > 1.0


def test_roc_of_a_perfect_and_a_useless_score():
    rng = np.random.default_rng(0)
    events = np.full(50, 100)
    good = [np.concatenate([rng.random(100), 2 + rng.random(50)]) for _ in events]
    bad = [rng.random(150) for _ in events]
    assert roc(good, events, 5)[2] == pytest.approx(1.0)
    assert roc(bad, events, 5)[2] == pytest.approx(0.5, abs=0.1)


def test_service_thresholds_fire_where_the_service_triggers_fire():
    from beamloop.edge.trigger import make_trigger
    from beamloop.edge.trigger.model import ModelTrigger
    from beamloop.quantize.evaluate import method_scores, service_thresholds

    model = ModelTrigger()
    thr = service_thresholds(model)
    st = dwell_streams(12, StreamConditions(), seed=77)
    checked = 0
    for m in ("model", "cusum", "window"):
        scores = method_scores(st, m, trigger=model)
        for counts, s in zip(st.counts, scores):
            t = make_trigger(m)
            t.start()
            t.update(counts)
            hit = np.flatnonzero(s >= thr[m])
            assert t.trigger_sample == (int(hit[0]) if hit.size else -1)
            checked += t.trigger_sample >= 0
    assert checked >= 30
