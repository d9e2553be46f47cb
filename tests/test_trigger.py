"""Ejection triggers on known sample sequences."""

import numpy as np
import pytest

from beamloop.edge.trigger import make_trigger
from beamloop.edge.trigger.classical import CusumTrigger, WindowTrigger


def test_cusum_fires_exactly_where_the_llr_sum_crosses_h():
    # known rate 10, drop to 5: each zero count adds baseline_rate (1 - rho) = 5 nats; h = 14 -> third zero
    t = CusumTrigger(drop_ratio=0.5, h=14.0)
    t.start(expected_rate=10.0)
    x = np.array([10, 10, 10, 0, 0, 0, 10], np.uint16)
    assert t.update(x) == 5 and t.trigger_sample == 5 and t.triggered


def test_cusum_floor_at_zero_forgets_old_evidence():
    t = CusumTrigger(drop_ratio=0.5, h=14.0)
    t.start(expected_rate=10.0)
    assert t.update(np.array([0, 0, 30, 30, 0, 0], np.uint16)) == -1  # 10, then reset by high counts, 10 again


def test_block_splitting_does_not_change_the_decision():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.poisson(8, 500), rng.poisson(4, 200)]).astype(np.uint16)
    whole = CusumTrigger()
    whole.start()
    whole.update(x)
    split = CusumTrigger()
    split.start()
    for k in range(0, len(x), 37):
        split.update(x[k:k + 37])
    assert whole.trigger_sample == split.trigger_sample and 500 <= whole.trigger_sample < 560


def test_no_alarm_on_a_steady_rate():
    rng = np.random.default_rng(5)
    t = CusumTrigger()
    t.start()
    assert t.update(rng.poisson(8, 20000).astype(np.uint16)) == -1
    assert t.baseline_rate == pytest.approx(8, rel=0.1)


def test_window_trigger():
    t = WindowTrigger(window=4, fraction=0.5)
    t.start(expected_rate=10.0)
    # limit = 0.5 * 4 * 10 = 20; window sums after samples 3..6: 40, 30, 20, 10 -> first below 20 at index 6
    assert t.update(np.array([10, 10, 10, 10, 0, 0, 0], np.uint16)) == 6


def test_bad_input_and_parameters():
    t = CusumTrigger()
    t.start(expected_rate=5.0)
    with pytest.raises(ValueError, match="non-finite"):
        t.update(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="positive"):
        t.start(expected_rate=float("nan"))
    with pytest.raises(ValueError):
        CusumTrigger(drop_ratio=1.5)
    with pytest.raises(ValueError, match="unknown trigger"):
        make_trigger("magic")


def test_expected_delay_matches_simulation():
    rng = np.random.default_rng(1)
    t = CusumTrigger()
    delays = []
    for _ in range(200):
        t.start(expected_rate=7.5)
        x = rng.poisson(3.75, 500).astype(np.uint16)
        delays.append(t.update(x))
    assert abs(np.mean(delays) - t.expected_delay(7.5)) < 3.0


def test_baseline_rate_is_the_mean_of_the_baseline_samples_or_the_expected_rate():
    t = WindowTrigger(window=4, fraction=0.5, baseline_samples=4)
    t.start()
    assert np.isnan(t.baseline_rate)
    assert t.update(np.array([6, 8, 10], np.uint16)) == -1 and np.isnan(t.baseline_rate)
    t.update(np.array([12], np.uint16))
    assert t.baseline_rate == 9.0 and t.samples_seen == 4
    t.start(expected_rate=2.5)
    assert t.baseline_rate == 2.5 and t.samples_seen == 0 and t.trigger_sample == -1


def test_make_trigger_still_importable_from_classical_for_one_release():
    import beamloop.edge.trigger.classical as classical

    with pytest.warns(DeprecationWarning, match="moved"):
        factory = classical.make_trigger
    assert isinstance(factory("cusum", h=6.0), CusumTrigger)
