"""Threshold schedules: CALM's decay against a hand computation of t5x's formula, and the
engine's scheduled replay against a direct per-position computation of the exit rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
from measure_fixtures import make_traces

from suite.config import MeasureConfig, ScheduleConfig
from suite.errors import ExitbenchError
from suite.replay import exit_statistics, replay
from suite.schedules import (
    CalmDecaySchedule,
    ConstantSchedule,
    build_schedule,
    replay_scheduled,
    schedule_scores,
)


def t5x_threshold(conf_threshold: float, i: float, position_temp: float,
                  max_decode_length: int) -> float:
    """t5x/contrib/calm/models.py, correct_by_pos, by hand with math.exp."""
    return (conf_threshold * math.exp(-position_temp * i / max_decode_length) / 10
            + 9 * conf_threshold / 10)


@pytest.mark.parametrize("position", [0, 1, 5, 15, 29, 30, 100])
@pytest.mark.parametrize("base", [0.0, 0.5, 0.9, 1.0])
def test_decay_equals_t5x_formula(position, base):
    schedule = CalmDecaySchedule(tau=4.0, max_length=30)
    value = schedule.thresholds(np.array([base]), np.array([position]))[0, 0]
    assert value == pytest.approx(t5x_threshold(base, position, 4.0, 30), rel=0, abs=1e-15)


def test_decay_hand_values():
    # lambda 0.9, tau 4, N 30: t = 0 keeps 0.9; t = 15 gives 0.9 e^-2 / 10 + 0.81
    schedule = CalmDecaySchedule(tau=4.0, max_length=30)
    values = schedule.thresholds(np.array([0.9]), np.array([0, 15, 30]))[:, 0]
    np.testing.assert_allclose(values, [0.9, 0.9 * math.exp(-2) / 10 + 0.81,
                                        0.9 * math.exp(-4) / 10 + 0.81], atol=1e-15)
    assert values[0] > values[1] > values[2] > 0.81
    # FREE's pos_time starts at 1: the offset shifts t
    free = CalmDecaySchedule(tau=4.0, max_length=30, position_offset=1)
    assert free.thresholds(np.array([0.9]), np.array([0]))[0, 0] == \
        schedule.thresholds(np.array([0.9]), np.array([1]))[0, 0]


def test_build_schedule_takes_n_from_the_task_budget():
    schedule = build_schedule(ScheduleConfig(kind="calm_decay", tau=2), max_new_tokens=128)
    assert schedule == CalmDecaySchedule(tau=2.0, max_length=128)
    assert isinstance(build_schedule(None, 30), ConstantSchedule)
    assert build_schedule(ScheduleConfig(kind="calm_decay", max_length=64), 30).max_length == 64
    with pytest.raises(ExitbenchError, match="tau"):
        CalmDecaySchedule(tau=float("nan"))


def direct_exits(scores, positions, thresholds, schedule, min_layer=0, min_position=0):
    """The exit rule token by token: first l >= min_layer with s >= threshold_t(lambda)."""
    num_tokens, num_layers = scores.shape
    exits = np.full((len(thresholds), num_tokens), num_layers - 1)
    for k, base in enumerate(thresholds):
        for t in range(num_tokens):
            if positions[t] < min_position:
                continue
            threshold = schedule.thresholds(np.array([base]), np.array([positions[t]]))[0, 0]
            for layer in range(min_layer, num_layers - 1):
                if scores[t, layer] >= threshold:  # NaN compares False
                    exits[k, t] = layer
                    break
    return exits


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scheduled_replay_equals_the_direct_rule(dtype):
    rng = np.random.default_rng(0)
    num_tokens, num_layers = 300, 6
    positions = rng.integers(0, 40, num_tokens)
    schedule = CalmDecaySchedule(tau=4.0, max_length=40)
    thresholds = np.array([0.9, 0.2, 0.5, 0.95, 0.0, 1.0, 0.5, 0.7])  # unsorted, a duplicate
    scores = rng.uniform(0, 1, (num_tokens, num_layers)).astype(dtype)
    # exact ties: some scores equal to the scheduled threshold itself (as float64 and as the
    # float32 nearest to it), and NaN / -inf entries
    table = schedule.thresholds(thresholds, positions)  # [T, K]
    tie_rows = rng.choice(num_tokens, 60, replace=False)
    for row in tie_rows:
        scores[row, rng.integers(0, num_layers)] = table[row, rng.integers(0, len(thresholds))]
    scores[rng.choice(num_tokens, 20), rng.integers(0, num_layers, 20)] = np.nan
    scores[rng.choice(num_tokens, 20), rng.integers(0, num_layers, 20)] = -np.inf
    for min_layer, min_position in ((0, 0), (2, 0), (0, 5), (1, 3)):
        traces = make_traces(np.zeros((num_tokens, num_layers)), position=positions)
        got = replay_scheduled(traces, scores, thresholds, schedule, min_layer,
                               min_position).exits
        expected = direct_exits(scores.astype(np.float64), positions, thresholds, schedule,
                                min_layer, min_position)
        np.testing.assert_array_equal(got, expected)


def test_constant_schedule_is_the_engines_replay():
    rng = np.random.default_rng(1)
    scores = rng.uniform(0, 1, (200, 5))
    positions = rng.integers(0, 10, 200)
    thresholds = [0.3, 0.6, 0.9]
    traces = make_traces(np.zeros((200, 5)), position=positions)
    plain = replay(scores, thresholds, 1)
    scheduled = replay_scheduled(traces, scores, thresholds, ConstantSchedule(), 1)
    np.testing.assert_array_equal(scheduled.exits, plain.exits)
    np.testing.assert_array_equal(scheduled.statistics.mean_layers_used,
                                  exit_statistics(traces, plain).mean_layers_used)
    # through the transform (min_position > 0 forces it): the same exits from position 2 on
    shifted = replay_scheduled(traces, scores, thresholds, ConstantSchedule(), 1, 2).exits
    late = positions >= 2
    np.testing.assert_array_equal(shifted[:, late], plain.exits[:, late])
    assert (shifted[:, ~late] == 4).all()


def test_transformed_scores_are_sweep_values():
    scores = np.array([[0.5, 0.85, 0.95]])
    schedule = CalmDecaySchedule(tau=4.0, max_length=10)
    out = schedule_scores(scores, np.array([10]), [0.9, 0.5], schedule)
    # threshold at t = 10 is 0.9 e^-4 / 10 + 0.81 = 0.8116...: 0.85 reaches it, 0.5 reaches 0.5
    np.testing.assert_array_equal(out, [[0.5, 0.9, 0.9]])


def test_a_schedule_decreasing_in_the_base_is_refused():
    class Backwards(ConstantSchedule):
        def thresholds(self, base, positions):
            return -super().thresholds(base, positions)

    with pytest.raises(ExitbenchError, match="non-decreasing"):
        schedule_scores(np.zeros((2, 3)), np.array([0, 1]), [0.1, 0.2], Backwards())


def test_display_name_labels_the_decayed_variant():
    decayed = MeasureConfig(name="softmax_margin", schedule={"kind": "calm_decay", "tau": 4})
    assert decayed.display_name == "softmax_margin (decay tau=4)"
    assert MeasureConfig(name="softmax_margin").display_name == "softmax_margin"
    assert MeasureConfig(name="softmax_margin", label="x",
                         schedule={"kind": "calm_decay"}).display_name == "x"
