"""Pareto dominance and the summary scores on constructed points."""

import numpy as np
import pytest

from suite.pareto import area_over_baseline, best_speedup_within, pareto_mask


def test_pareto_mask_on_constructed_points():
    speed = np.array([1.0, 2.0, 3.0, 2.0, 1.5, 3.0, 0.5])
    quality = np.array([90, 85, 70, 80, 85, 60, 95])
    # (2,80) is dominated by (2,85); (1.5,85) by (2,85); (3,60) by (3,70)
    assert pareto_mask(speed, quality).tolist() == [True, True, True, False, False, False, True]


def test_duplicates_keep_one_and_empty_input():
    mask = pareto_mask(np.array([1.0, 1.0]), np.array([5.0, 5.0]))
    assert mask.sum() == 1
    assert pareto_mask(np.array([]), np.array([])).tolist() == []


def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(0)
    speed = rng.integers(0, 10, 200).astype(float)
    quality = rng.integers(0, 10, 200).astype(float)
    mask = pareto_mask(speed, quality)
    for i in range(200):
        dominated = np.any((speed >= speed[i]) & (quality >= quality[i]) &
                           ((speed > speed[i]) | (quality > quality[i])))
        if dominated:
            assert not mask[i]
    # every non-dominated distinct point is kept exactly once
    distinct = {(s, q) for s, q, m in zip(speed, quality, mask) if m}
    assert len(distinct) == mask.sum()


def test_best_speedup_within_one_percent():
    speedup = np.array([1.0, 1.5, 2.0, 3.0])
    quality = np.array([80.0, 79.5, 79.3, 70.0])
    assert best_speedup_within(speedup, quality, 80.0) == 2.0   # 79.2 is the floor
    assert best_speedup_within(speedup, quality, 80.0, 0.001) == 1.0
    assert np.isnan(best_speedup_within(speedup, quality, 100.0))


def test_area_over_baseline_hand_computed():
    # baseline: q=80 up to speedup 1, 60 up to 2, 40 up to 3
    base_s, base_q = np.array([1.0, 2.0, 3.0]), np.array([80.0, 60.0, 40.0])
    # measure: 78 up to speedup 2, 50 up to 4
    meas_s, meas_q = np.array([2.0, 4.0]), np.array([78.0, 50.0])
    # on (1,2]: 78-60 = 18; on (2,3]: 50-40 = 10; upper limit min(4,3)=3
    assert area_over_baseline(meas_s, meas_q, base_s, base_q) == pytest.approx(28.0)
    assert area_over_baseline(base_s, base_q, base_s, base_q) == pytest.approx(0.0)
