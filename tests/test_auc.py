"""ROC curves and AUC with tied scores (quantized logits tie a lot): known answers."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from beamloop.quantize.data import NO_EVENT
from beamloop.quantize.evaluate import binary_roc, roc, window_accuracy
from beamloop.quantize.fourd import _roc as fourd_roc


def _pair_count_auc(y, s):
    """P(s_pos > s_neg) + P(s_pos = s_neg) / 2 over every positive-negative pair (the definition)."""
    pos, neg = s[y > 0.5], s[y <= 0.5]
    d = pos[:, None] - neg[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size


@pytest.mark.parametrize("positives_first", [True, False])
def test_all_tied_scores_give_one_half_wherever_the_positives_are(positives_first):
    y = np.r_[np.ones(30), np.zeros(70)] if positives_first else np.r_[np.zeros(70), np.ones(30)]
    s = np.full(100, 3.0)
    fpr, tpr, auc = binary_roc(y, s)
    assert auc == 0.5 and fpr.tolist() == [0.0, 1.0] and tpr.tolist() == [0.0, 1.0]
    assert window_accuracy(None, y.astype(np.float32), s)["auc"] == 0.5
    assert fourd_roc(s, y)[2] == 0.5


def test_small_case_with_ties_by_hand():
    # negatives 1, 2, 2, 3; positives 2, 3, 4. Pairs won: pos 2 -> 1 + 2 * 0.5; pos 3 -> 3 + 0.5; pos 4 -> 4;
    # 9.5 of 12 pairs = 19/24. Curve (thresholds 4, 3, 2, 1): (0, 1/3), (1/4, 2/3), (3/4, 1), (1, 1)
    y = np.array([0, 0, 0, 0, 1, 1, 1])
    s = np.array([1, 2, 2, 3, 2, 3, 4])
    fpr, tpr, auc = binary_roc(y, s, drop_intermediate=False)
    assert auc == pytest.approx(19 / 24, abs=1e-15)
    assert fpr.tolist() == [0.0, 0.0, 0.25, 0.75, 1.0]
    assert tpr == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0], abs=1e-15)
    assert fourd_roc(s.astype(float), y)[2] == pytest.approx(19 / 24, abs=1e-15)
    assert window_accuracy(None, y.astype(np.float32), s)["auc"] == pytest.approx(19 / 24, abs=1e-15)


@pytest.mark.parametrize("seed,levels", [(0, 3), (1, 8), (2, 40)])
def test_agrees_with_the_pair_count_and_scikit_learn_on_coarse_integer_scores(seed, levels):
    rng = np.random.default_rng(seed)
    y = rng.random(600) < 0.3
    s = rng.integers(0, levels, 600) + y * rng.integers(0, 2, 600)  # few distinct values: many ties
    auc = binary_roc(y, s)[2]
    assert auc == pytest.approx(_pair_count_auc(y, s.astype(float)), abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-15)


def test_dwell_roc_picks_positives_after_the_event_and_handles_ties():
    # two dwells with the event at sample 4 and one without; roc_delay 2 -> positive at event + 1
    inf = -np.inf
    scores = [np.array([inf, 1.0, 2.0, 2.0, 0.0, 2.0, 9.0]),  # negatives 1, 2, 2; positive s[5] = 2
              np.array([inf, 0.0, 1.0, 1.0, 5.0, 3.0]),  # negatives 0, 1, 1; positive s[5] = 3
              np.array([inf, 4.0, 0.0])]  # no event: negatives 4, 0
    events = np.array([4, 4, NO_EVENT])
    # negatives 1, 2, 2, 0, 1, 1, 4, 0 (8); positive 2 beats 1, 0, 1, 1, 0 and ties 2, 2 -> 6 of 8;
    # positive 3 beats all but 4 -> 7 of 8; AUC = 13 / 16
    assert roc(scores, events, 2)[2] == pytest.approx(13 / 16, abs=1e-15)
    # a positive without enough history (-inf) counts as the lowest score
    scores[1][5] = inf
    assert roc(scores, events, 2)[2] == pytest.approx(6 / 16, abs=1e-15)
    flat = [np.full(len(s), 1.0) for s in scores]
    assert roc(flat, events, 2)[2] == 0.5
    with pytest.raises(ValueError, match="positive and negative"):
        roc(scores, np.array([NO_EVENT] * 3), 2)


def test_one_class_only_is_an_error():
    with pytest.raises(ValueError):
        binary_roc(np.zeros(5), np.arange(5.0))
