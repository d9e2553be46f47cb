"""The benchmark's peer finders and comparison machinery, against known answers (no timings)."""

import numpy as np
import pytest

from beamloop.bench import peers
from beamloop.bench.atomfinding import TOLERANCE, agreement, f1, goal, score


def _spots(shape, centres, sigma=1.5, height=100.0):
    yy, xx = np.indices(shape, dtype=float)
    img = np.zeros(shape)
    for x, y in centres:
        img += height * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return img


def test_centre_of_mass_of_symmetric_spot_is_its_centre():
    img = _spots((32, 40), [(17.3, 12.6)])
    got = peers.centre_of_mass(img, np.array([[13, 17]]), radius_px=6.0)
    assert got.shape == (1, 2)
    assert got[0] == pytest.approx([17.3, 12.6], abs=0.01)


def test_centre_of_mass_clips_at_the_edge_and_keeps_empty_peaks():
    img = np.zeros((10, 10))
    img[0, 0] = 4.0
    img[0, 1] = 4.0
    got = peers.centre_of_mass(img, np.array([[0, 0], [7, 7]]), radius_px=2.0)
    assert got[0] == pytest.approx([0.5, 0.0])  # two equal pixels, outside-frame ones left out
    assert got[1] == pytest.approx([7.0, 7.0])  # no weight: the peak pixel itself


def test_trackpy_diameter_is_odd_and_at_least_three():
    assert [peers.trackpy_diameter(s) for s in (0.2, 1.0, 2.2, 3.0)] == [3, 5, 9, 13]


def test_plm_com_finds_a_grid_of_spots():
    pytest.importorskip("skimage")
    centres = [(10.4 + 12 * i, 9.7 + 12 * j) for i in range(4) for j in range(4)]
    img = _spots((60, 60), centres)
    got = peers.plm_com(img, sigma_px=1.0, min_distance_px=4, threshold=0.2, com_radius_px=5.0)
    res = agreement(got, np.array(centres), 1.0)
    assert res["matched"] == 16 and res["n"] == 16
    assert res["rms_px"] < 0.06
    # a small window pulls the centre of mass towards the peak pixel (the baseline's known bias)
    small = agreement(peers.plm_com(img, 1.0, 4, 0.2, com_radius_px=2.0), np.array(centres), 1.0)
    assert small["matched"] == 16 and small["rms_px"] > 0.2


def test_atomap_refine_must_be_known():
    with pytest.raises(ValueError, match="refine"):
        peers.atomap_find(np.zeros((8, 8)), 3, refine="fourier")


def test_agreement_known_answer():
    ref = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    xy = np.array([[0.0, 0.3], [10.4, 0.0], [50.0, 50.0], [60.0, 60.0]])
    a = agreement(xy, ref, 1.0)
    assert a["matched"] == 2 and a["n"] == 4 and a["n_ref"] == 3
    assert a["of_ref"] == pytest.approx(2 / 3) and a["of_own"] == pytest.approx(0.5)
    assert a["rms_px"] == pytest.approx(np.sqrt((0.09 + 0.16) / 2))


def test_score_and_f1_on_a_simulated_frame():
    from beamloop.edge.sim.frames import mos2_frame

    fr = mos2_frame((64, 64), 0.15, 1e5, seed=3, distortion_scale=0.0)
    cols = fr.truth_cls != fr.class_names.index("vacancy")
    s = score(fr.truth_xy[cols], None, fr)  # the truth itself: perfect
    assert s.recall == 1.0 and s.precision == 1.0 and s.rms_pm == 0.0 and f1(s) == 1.0
    half = fr.truth_xy[cols][::2]
    s = score(np.concatenate([half, half + 30.0]), None, fr)  # half the columns, plus as many wrong ones
    assert 0.4 < s.recall < 0.6 and s.precision < 0.8 and 0.0 < f1(s) < 0.7


def _cell(b_ms, b_find, p_ms, b_acc, p_acc):
    acc = lambda r, p, e: {"recall": r, "precision": p, "rms_pm": e, "frames": 1}  # noqa: E731
    return {"1024x1024@1e+05": {"beamloop_classical": {"time": {"p50_ms": b_ms, "find_only_p50_ms": b_find},
                                                       "accuracy": acc(*b_acc)},
                                "plm_com": {"time": {"p50_ms": p_ms}, "accuracy": acc(*p_acc)}}}


def test_goal_met_and_not_met():
    g = goal(_cell(10.0, 8.0, 60.0, (1.0, 1.0, 6.0), (1.0, 1.0, 7.0)))
    assert g["met"] and g["speed_ratio"] == pytest.approx(6.0) and g["speed_ratio_find_only"] == pytest.approx(7.5)
    assert g["accuracy_equal_or_better_strict"]
    assert not goal(_cell(20.0, 8.0, 60.0, (1.0, 1.0, 6.0), (1.0, 1.0, 7.0)))["met"]  # only 3x faster
    g = goal(_cell(10.0, 8.0, 60.0, (0.99, 1.0, 6.0), (1.0, 1.0, 7.0)))  # 1 % lower recall
    assert not g["met"] and not g["accuracy_equal_or_better"]
    r = 1.0 - TOLERANCE["recall"] / 2  # a difference within the tolerance
    g = goal(_cell(10.0, 8.0, 60.0, (r, 1.0, 6.0), (1.0, 1.0, 7.0)))
    assert g["met"] and not g["accuracy_equal_or_better_strict"]
    assert "skipped" in goal({})


def test_time_method_repeats_fast_methods_and_not_slow_ones(monkeypatch):
    from beamloop.bench import atomfinding
    from beamloop.bench.atomfinding import Method, time_method

    calls = []
    m = Method("fake", lambda im: calls.append(im) or (np.zeros((0, 2)), None, None))
    images = [1, 2, 3]
    monkeypatch.setattr(atomfinding, "SLOW_CALL_S", float("inf"))  # every call fast: all repeats
    got = time_method(m, images, repeats=4, budget_s=1e9)
    assert calls == [1] * 4 + [2] * 4 + [3] * 4 and len(got["times_s"]) == 12 and len(got["outputs"]) == 3
    calls.clear()
    monkeypatch.setattr(atomfinding, "SLOW_CALL_S", -1.0)  # every call slow: once per frame
    got = time_method(m, images, repeats=4, budget_s=1e9)
    assert calls == [1, 2, 3] and len(got["outputs"]) == 3
