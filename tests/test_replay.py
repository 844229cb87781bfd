"""Replay's vectorised exit rule against a plain loop, and its statistics."""

import numpy as np
import pytest

from suite.replay import (
    ScoreCache,
    exit_layers,
    exit_statistics,
    replay,
    replayed_tokens,
    sequences_by_example,
)
from suite.traces import TraceArrays


def loop_exit_layers(scores, thresholds, min_layer):
    """The exit rule written the obvious way."""
    num_tokens, num_layers = scores.shape
    out = np.empty((len(thresholds), num_tokens), dtype=np.int64)
    for k, threshold in enumerate(thresholds):
        for t in range(num_tokens):
            out[k, t] = num_layers - 1
            for layer in range(min_layer, num_layers):
                if scores[t, layer] >= threshold:
                    out[k, t] = layer
                    break
    return out


@pytest.mark.parametrize("min_layer", [0, 2])
def test_exit_layers_equal_a_plain_loop_on_random_scores(min_layer):
    rng = np.random.default_rng(min_layer)
    scores = rng.random((300, 7))
    scores[rng.random((300, 7)) < 0.1] = -np.inf
    scores[:5] = np.round(scores[:5], 1)  # ties with thresholds
    thresholds = rng.permutation(np.r_[np.linspace(0, 1, 21), [0.35, 1.5, -1.0]])
    expected = loop_exit_layers(scores, thresholds, min_layer)
    assert np.array_equal(exit_layers(scores, thresholds, min_layer), expected)


def test_exit_layers_chunks_agree(monkeypatch):
    import suite.replay as replay
    rng = np.random.default_rng(3)
    scores = rng.random((1000, 5))
    thresholds = np.linspace(0, 1, 11)
    whole = exit_layers(scores, thresholds)
    monkeypatch.setattr(replay, "TOKEN_CHUNK", 64)
    assert np.array_equal(exit_layers(scores, thresholds), whole)


def test_nan_never_exits_and_bad_min_layer_is_rejected():
    scores = np.array([[np.nan, 0.9, 0.1]])
    assert exit_layers(scores, [0.5]).tolist() == [[1]]
    with pytest.raises(ValueError, match="min_layer"):
        exit_layers(scores, [0.5], min_layer=3)


def make_traces():
    # two examples: 3 tokens and 2 tokens, 3 layers; EOS id 1
    top1 = np.array([[5, 7, 7], [4, 8, 8], [1, 9, 1], [6, 6, 6], [1, 2, 1]], dtype=np.int32)
    zeros = np.zeros(top1.shape, np.float32)
    return TraceArrays(example_id=np.array(["a", "a", "a", "b", "b"], dtype=object),
                       position=np.array([0, 1, 2, 0, 1], np.int32),
                       final_id=top1[:, -1].copy(), gold_id=-np.ones(5, np.int32), top1_id=top1,
                       top1_prob=zeros, top2_prob=zeros, cos_prev=zeros, cos_last=zeros,
                       final_prob=zeros)


def test_replayed_tokens_statistics_and_sequences():
    traces = make_traces()
    # scores that exit everything at the last layer for threshold 2.0 and give
    # exits [0, 1, 0, 0, 0] for threshold 0.5
    scores = np.array([[0.9, 0, 0], [0.1, 0.6, 0], [0.7, 0, 0], [0.5, 0, 0], [0.8, 0, 0]])
    result = replay(scores, [2.0, 0.5])
    exits = result.exits
    assert exits.tolist() == [[2, 2, 2, 2, 2], [0, 1, 0, 0, 0]]
    tokens = replayed_tokens(traces, exits)
    assert tokens.tolist() == [[7, 8, 1, 6, 1], [5, 8, 1, 6, 1]]
    stats = exit_statistics(traces, result)
    assert stats.mean_layers_used.tolist() == pytest.approx([3.0, 1.2])
    assert stats.exit_histogram[1].tolist() == pytest.approx([0.8, 0.2, 0.0])
    assert stats.token_agreement.tolist() == pytest.approx([1.0, 0.8])
    # an early EOS ends the replayed output there
    early = np.array([0, 1, 0, 0, 0], dtype=np.int16)
    assert sequences_by_example(traces, replayed_tokens(traces, early[None])[0], 1) == \
        [[5, 8], [6]]


def test_score_cache_counts_hits_and_persists(tmp_path):
    cache = ScoreCache(tmp_path / "scores.json")
    calls = []
    for _ in range(3):
        cache.get_or_compute("k", lambda: calls.append(1) or {"f1": 1.0})
    assert (cache.hits, cache.misses, len(calls)) == (2, 1, 1)
    cache.save()
    assert ScoreCache(tmp_path / "scores.json").get_or_compute("k", lambda: {"f1": 0}) == \
        {"f1": 1.0}


def test_float32_scores_at_threshold_boundaries():
    # scores exactly on, just below and just above an evenly spaced grid, in float32
    grid = np.linspace(0, 1, 41)
    values = np.concatenate([grid, np.nextafter(grid, -1), np.nextafter(grid, 2)])
    scores = np.stack([values, values, values], axis=1).astype(np.float32)
    expected = loop_exit_layers(scores.astype(np.float64), grid, 0)
    assert np.array_equal(exit_layers(scores, grid), expected)
    uneven = np.r_[grid[:-1], 0.999]
    assert np.array_equal(exit_layers(scores, uneven),
                          loop_exit_layers(scores.astype(np.float64), uneven, 0))


def test_statistics_equal_direct_computation_on_random_traces():
    rng = np.random.default_rng(7)
    num_tokens, num_layers = 500, 6
    top1 = rng.integers(0, 4, (num_tokens, num_layers)).astype(np.int32)
    zeros = np.zeros(top1.shape, np.float32)
    traces = TraceArrays(example_id=np.array(["e"] * num_tokens, dtype=object),
                         position=np.arange(num_tokens, dtype=np.int32), final_id=top1[:, -1].copy(),
                         gold_id=-np.ones(num_tokens, np.int32), top1_id=top1, top1_prob=zeros,
                         top2_prob=zeros, cos_prev=zeros, cos_last=zeros,
                         final_prob=zeros)
    scores = rng.random((num_tokens, num_layers))
    thresholds = rng.permutation(np.linspace(0, 1.1, 17))
    result = replay(scores, thresholds, min_layer=1)
    stats = exit_statistics(traces, result)
    exits = result.exits.astype(int)
    tokens = replayed_tokens(traces, exits)
    for k in range(len(thresholds)):
        histogram = np.bincount(exits[k], minlength=num_layers) / num_tokens
        assert np.allclose(stats.exit_histogram[k], histogram)
        assert stats.mean_layers_used[k] == pytest.approx(exits[k].mean() + 1)
        assert stats.token_agreement[k] == pytest.approx(np.mean(tokens[k] == traces.final_id))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("min_layer", [0, 3])
def test_numba_kernels_equal_the_reference_path(dtype, min_layer):
    rng = np.random.default_rng(min_layer + (dtype == np.float32))
    num_tokens, num_layers = 5000, 9
    scores = rng.random((num_tokens, num_layers)).astype(dtype)
    scores[rng.random(scores.shape) < 0.05] = np.nan
    scores[rng.random(scores.shape) < 0.05] = -np.inf
    scores[:200] = np.round(scores[:200], 1)  # ties with thresholds
    thresholds = rng.permutation(np.r_[np.linspace(0, 1, 41), [-np.inf, 0.35, 2.0, -1.0]])
    fast = replay(scores, thresholds, min_layer, engine="numba")
    slow = replay(scores, thresholds, min_layer, engine="reference")
    assert fast.exits.dtype == slow.exits.dtype
    assert np.array_equal(fast.exits, slow.exits)
    assert np.array_equal(fast.reached, slow.reached)
    assert np.array_equal(fast.order, slow.order)
    assert np.array_equal(fast.exits, loop_exit_layers(np.nan_to_num(scores, nan=-np.inf),
                                                        thresholds, min_layer))
    top1 = rng.integers(0, 4, (num_tokens, num_layers)).astype(np.int32)
    zeros = np.zeros(top1.shape, np.float32)
    traces = TraceArrays(example_id=np.array(["e"] * num_tokens, dtype=object),
                         position=np.arange(num_tokens, dtype=np.int32), final_id=top1[:, -1],
                         gold_id=-np.ones(num_tokens, np.int32), top1_id=top1, top1_prob=zeros,
                         top2_prob=zeros, cos_prev=zeros, cos_last=zeros, final_prob=zeros)
    a = exit_statistics(traces, fast, engine="numba")
    b = exit_statistics(traces, slow, engine="reference")
    assert np.allclose(a.exit_histogram, b.exit_histogram)
    assert np.allclose(a.token_agreement, b.token_agreement)
    assert np.allclose(a.mean_layers_used, b.mean_layers_used)


def test_unknown_engine_is_a_clear_error(monkeypatch):
    from suite.errors import ExitbenchError

    with pytest.raises(ExitbenchError, match="replay engine 'fast'"):
        replay(np.zeros((2, 3)), [0.5], engine="fast")
    monkeypatch.setenv("EXITBENCH_REPLAY_ENGINE", "reference")
    assert replay(np.zeros((2, 3)), [0.5]).exits.tolist() == [[2, 2]]
