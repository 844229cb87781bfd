"""FREE's adaptive threshold: the beta mixture recovers known parameters from sampled
data, the threshold follows FREE's rule (util/bmm.py predict_proba), and the replay
simulation equals a token-by-token walk through FREE's deploying loop."""

from __future__ import annotations

import numpy as np
import pytest
from measure_fixtures import make_traces
from scipy import stats as scipy_stats

from suite.adaptive import (
    AdaptiveSettings,
    AdaptiveThreshold,
    PairStatistics,
    fit_beta_mixture,
    mixture_threshold,
)
from suite.measures import get_measure
from suite.schedules import replay_scheduled


def test_mixture_recovers_known_parameters():
    rng = np.random.default_rng(0)
    inconsistent = rng.beta(2.0, 5.0, 40_000)  # y = 0
    consistent = rng.beta(6.0, 2.0, 40_000)  # y = 1
    stats = PairStatistics.empty()
    stats.add(np.r_[inconsistent, consistent], np.r_[np.zeros(40_000), np.ones(40_000)])
    alphas, betas = fit_beta_mixture(stats)
    np.testing.assert_allclose(alphas, [2.0, 6.0], rtol=0.05)
    np.testing.assert_allclose(betas, [5.0, 2.0], rtol=0.05)


def hand_threshold(alphas, betas, zeta=0.4):
    """FREE's rule written out: grid linspace(0.3, 0.9, 10); i = component of larger mean;
    count the grid points whose posterior ratio exceeds zeta; x[min(max(0, 10 - n), 9)]."""
    grid = np.linspace(0.3, 0.9, 10)
    i = int(np.argmax(np.asarray(alphas) / (np.asarray(alphas) + np.asarray(betas))))
    count = 0
    for x in grid:
        mine = scipy_stats.beta.pdf(x, alphas[i], betas[i])
        other = scipy_stats.beta.pdf(x, alphas[1 - i], betas[1 - i])
        count += bool(mine / (mine + other) > zeta)
    return grid[min(max(0, 10 - count), 9)]


@pytest.mark.parametrize("alphas,betas", [((2.0, 6.0), (5.0, 2.0)), ((1.5, 3.0), (1.5, 1.0)),
                                          ((8.0, 9.0), (2.0, 1.0)), ((5.0, 1.0), (1.0, 5.0)),
                                          ((1.0, 1.0), (1.0, 1.0))])
def test_threshold_follows_free_rule(alphas, betas):
    got = mixture_threshold(np.array(alphas), np.array(betas))
    assert got == pytest.approx(hand_threshold(alphas, betas))
    # vectorised over leading axes: each row on its own
    both = mixture_threshold(np.array([alphas, (2.0, 6.0)]), np.array([betas, (5.0, 2.0)]))
    assert both[0] == pytest.approx(got)


def test_threshold_of_a_separated_mixture_sits_between_the_classes():
    # inconsistent ~ Beta(2, 5) (mean 0.29), consistent ~ Beta(6, 2) (mean 0.75): the ratio
    # passes 0.4 around x = 0.5
    threshold = float(mixture_threshold(np.array([2.0, 6.0]), np.array([5.0, 2.0])))
    grid = np.linspace(0.3, 0.9, 10)
    assert threshold in grid and 0.4 < threshold < 0.6


def test_degenerate_fit_gives_the_top_of_the_grid():
    stats = PairStatistics.empty()
    stats.add(np.array([0.7]), np.array([True]))  # one pair: zero variance
    assert float(mixture_threshold(*fit_beta_mixture(stats))) == pytest.approx(0.9)


def test_online_state_refits_before_each_sequence_up_to_the_limit():
    state = AdaptiveThreshold(threshold=0.8, settings=AdaptiveSettings(max_refits=2))
    assert state.start_sequence() == 0.8  # no pairs yet: the configured threshold
    rng = np.random.default_rng(1)
    state.add_pairs(np.r_[rng.beta(2, 5, 500), rng.beta(6, 2, 500)], np.r_[[0] * 500, [1] * 500])
    first = state.start_sequence()
    assert state.refits == 1 and first != 0.8
    state.start_sequence()
    state.add_pairs(np.full(1000, 0.99), np.ones(1000))
    assert state.refits == 2 and state.start_sequence() == state.threshold  # limit reached
    assert state.refits == 2


def walk_free(confidence, consistent, example_ids, initial, settings, allowed=None):
    """FREE's deploying loop token by token, batch 1: refit before each example when pairs
    exist and refits remain; a token exits when its confidence reaches the threshold; a deep
    token with pending tokens adds pairs for them and for itself; pending tokens left at the
    end of an example add nothing."""
    allowed = np.ones(len(confidence), bool) if allowed is None else allowed
    xs, ys = [], []
    threshold, refits = initial, 0
    exits = np.zeros(len(confidence), bool)
    used = np.zeros(len(confidence))
    previous = None
    pending = []
    for t, example in enumerate(example_ids):
        if example != previous:
            pending = []
            if xs and refits < settings.max_refits:
                stats = PairStatistics.empty()
                stats.add(np.array(xs), np.array(ys))
                threshold = float(mixture_threshold(*fit_beta_mixture(stats), settings))
                refits += 1
            previous = example
        used[t] = threshold
        if allowed[t] and confidence[t] >= threshold:
            exits[t] = True
            pending.append(t)
        else:
            if pending:
                for i in [*pending, t]:
                    xs.append(confidence[i])
                    ys.append(consistent[i])
            pending = []
    return exits, used


@pytest.mark.parametrize("max_refits", [300, 3])
def test_replay_simulation_equals_free_token_walk(max_refits):
    rng = np.random.default_rng(2)
    num_examples, num_layers, shallow = 40, 6, 1
    lengths = rng.integers(1, 15, num_examples)
    example_id = np.repeat([f"e{i}" for i in range(num_examples)], lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    n = len(example_id)
    top1 = rng.uniform(0.3, 1.0, (n, num_layers))
    top2 = top1 * rng.uniform(0, 1, (n, num_layers))
    final_id = rng.integers(0, 5, n)
    top1_id = np.where(rng.random((n, num_layers)) < 0.6, final_id[:, None],
                       rng.integers(0, 5, (n, num_layers)))
    traces = make_traces(top1, top2, top1_id=top1_id, final_id=final_id, position=position,
                         example_id=example_id)
    measure = get_measure("free_shallow_deep")(shallow_layer=shallow)
    scores = measure.scores(traces)
    settings = AdaptiveSettings(max_refits=max_refits)
    thresholds = [0.1, 0.5, 0.9]
    for min_position in (0, 2):
        result = replay_scheduled(traces, scores, thresholds, settings, 0, min_position, measure)
        consistent = traces.top1_id[:, shallow] == traces.final_id
        for k, initial in enumerate(thresholds):
            exits, used = walk_free(scores[:, shallow], consistent, example_id, initial,
                                    settings, allowed=position >= min_position)
            np.testing.assert_array_equal(result.exits[k], np.where(exits, shallow,
                                                                    num_layers - 1))
            np.testing.assert_allclose(result.thresholds_used[k], used)
        mean_layers = 1 + np.where(result.exits == shallow, shallow, num_layers - 1)
        np.testing.assert_allclose(result.statistics.mean_layers_used, mean_layers.mean(axis=1))
        # the statistics are the engine's for the same exits
        from suite.replay import exit_statistics, replay
        for k in range(len(thresholds)):
            hits = (np.arange(num_layers) == shallow)[None, :] & (result.exits[k] == shallow)[:, None]
            engine = exit_statistics(traces, replay(np.where(hits, 1.0, -np.inf), [1.0]))
            np.testing.assert_allclose(result.statistics.exit_histogram[k],
                                       engine.exit_histogram[0])
            np.testing.assert_allclose(result.statistics.token_agreement[k],
                                       engine.token_agreement[0])
    # refits move the threshold onto FREE's grid after the first example with pairs
    assert set(np.round(result.thresholds_used[0, lengths[0]:], 6)) <= \
        set(np.round(np.linspace(0.3, 0.9, 10), 6)) | {0.1}


def test_adaptive_schedule_needs_the_free_measure():
    from suite.errors import ExitbenchError

    traces = make_traces([[0.5, 0.6, 0.7]])
    scores = get_measure("softmax_max")().scores(traces)
    with pytest.raises(ExitbenchError, match="shallow exit"):
        replay_scheduled(traces, scores, [0.5], AdaptiveSettings(), 0, 0,
                         get_measure("softmax_max")())
