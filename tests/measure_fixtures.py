"""Small constructed traces and helpers shared by the measure, learned and validation tests."""

from __future__ import annotations

import numpy as np

from suite.traces import TraceArrays

BUILTIN_MEASURES = ("classifier_lstm", "classifier_single", "classifier_three_hidden",
                    "free_shallow_deep", "hidden_state_saturation", "oracle", "softmax_margin",
                    "softmax_max", "static_layer", "top1_rising_heuristic")


def make_traces(top1_prob, top2_prob=None, top1_id=None, final_id=None, cos_prev=None,
                gold_id=None, hidden=None, position=None, example_id=None) -> TraceArrays:
    """Traces from small nested lists ``[tokens][layers]``; unspecified fields get neutral
    values (one example, positions 0..T-1, predictions already final)."""
    top1_prob = np.asarray(top1_prob, dtype=np.float32)
    num_tokens, num_layers = top1_prob.shape
    zeros = np.zeros((num_tokens, num_layers), dtype=np.float32)
    if final_id is None:
        final_id = np.zeros(num_tokens, dtype=np.int32)
    final_id = np.asarray(final_id, dtype=np.int32)
    if top1_id is None:
        top1_id = np.broadcast_to(final_id[:, None], (num_tokens, num_layers))
    return TraceArrays(
        example_id=np.array(["ex0"] * num_tokens, dtype=object) if example_id is None
        else np.asarray(example_id, dtype=object),
        position=np.arange(num_tokens, dtype=np.int32) if position is None
        else np.asarray(position, np.int32),
        final_id=final_id,
        gold_id=np.full(num_tokens, -1, np.int32) if gold_id is None
        else np.asarray(gold_id, np.int32),
        top1_id=np.array(top1_id, dtype=np.int32),
        top1_prob=top1_prob,
        top2_prob=zeros.copy() if top2_prob is None else np.asarray(top2_prob, np.float32),
        cos_prev=zeros.copy() if cos_prev is None else np.asarray(cos_prev, np.float32),
        cos_prev_normed=zeros.copy() if cos_prev is None else np.asarray(cos_prev, np.float32),
        cos_last=zeros.copy(),
        final_prob=zeros.copy(),
        hidden=None if hidden is None else np.asarray(hidden, np.float32))


def exit_layer(scores: np.ndarray, threshold: float, min_layer: int = 0) -> np.ndarray:
    """The shared exit rule, written out for the tests: the first layer ``l >= min_layer``
    whose score reaches the threshold, else the last layer."""
    scores = np.asarray(scores, dtype=np.float64)
    reached = scores >= threshold
    reached[:, :min_layer] = False
    reached[:, -1] = True
    return reached.argmax(axis=1)


def separable_traces(num_tokens: int = 300, num_layers: int = 4, d_model: int = 8,
                     seed: int = 0, gold: bool = False) -> TraceArrays:
    """Traces whose labels ("the layer's prediction is final") are written into the hidden
    states: each state is noise plus +2 or -2 along a fixed direction, by its label. A learned
    measure that reads the state can separate the classes; the layer index alone cannot."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(1234).normal(size=d_model)  # the same for every seed
    direction /= np.linalg.norm(direction)
    final_id = rng.integers(0, 20, size=num_tokens)
    is_final = rng.random((num_tokens, num_layers)) < 0.5
    is_final[:, -1] = True
    wrong = (final_id[:, None] + 1 + rng.integers(0, 19, size=(num_tokens, num_layers))) % 20
    top1_id = np.where(is_final, final_id[:, None], wrong)
    sign = np.where(is_final, 2.0, -2.0)
    hidden = rng.normal(size=(num_tokens, num_layers, d_model)) + sign[..., None] * direction
    traces = make_traces(top1_prob=rng.uniform(0.1, 0.9, size=(num_tokens, num_layers)),
                         top1_id=top1_id, final_id=final_id, hidden=hidden,
                         gold_id=final_id if gold else None)
    return traces
