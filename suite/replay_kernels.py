"""Compiled (numba) kernels of the replay engine: one pass over ``[tokens, layers]``.

:mod:`suite.replay` calls these when numba is installed (a declared dependency) and keeps
its array path (numpy/torch operations, no compiled code) as the reference that the tests
compare with and that runs where numba cannot (``EXITBENCH_REPLAY_ENGINE=reference``).

Why a kernel: the array path makes several full passes over ``[T, L]`` and ``[T, K]``
temporaries (bucketize, running max, scatter, cumulative sum, transpose) and the
statistics make two bincounts per layer. Profiled on the replay benchmark (py-spy, 1M tokens
x 24 layers x 100 thresholds), those passes were 80% of the sweep. Here each token is read
once: its running-max score walks the sorted thresholds from the count already reached (a
merge of two sorted sequences, O(layers + thresholds) per token, with few mispredicted
branches; a binary search per layer was twice as slow), each layer adds one to a
``[thresholds reached, token]`` table of the block, and a cumulative sum down that table gives
the exit layer of every threshold row by row, so the ``[K, T]`` result is written once,
contiguously (writing it token by token, column-wise, was the slowest part). Blocks of tokens
run in parallel.

Semantics are the engine's: a token exits for threshold ``t`` at the first layer
``l >= min_layer`` whose score reaches ``t`` (compared in float64, so a float32 score is
compared exactly), else at the last layer; NaN never reaches a threshold.
"""

from __future__ import annotations

import numba
import numpy as np

BLOCK = 2048
"""Tokens per parallel block (the block buffer is ``thresholds x BLOCK`` layer indices)."""


@numba.njit(parallel=True, cache=True, nogil=True)
def replay_kernel(scores, boundaries, row_of_sorted, min_layer, exits, reached):  # pragma: no cover - compiled
    """Fill ``exits [K, T]`` (row ``row_of_sorted[k]`` for sorted threshold ``k``) and
    ``reached [T, L - 1]`` (sorted thresholds reached by each layer's running-max score)."""
    num_tokens, num_layers = scores.shape
    num_thresholds = boundaries.shape[0]
    checked = num_layers - 1
    num_blocks = (num_tokens + BLOCK - 1) // BLOCK
    for block in numba.prange(num_blocks):
        start = block * BLOCK
        stop = min(start + BLOCK, num_tokens)
        width = stop - start
        # layers per (thresholds reached, token); exit(k) = layers reaching at most k
        layers_at = np.zeros((num_thresholds + 1, width), exits.dtype)
        for j in range(width):
            t = start + j
            count = 0
            running = -np.inf
            for layer in range(checked):
                if layer >= min_layer:
                    value = np.float64(scores[t, layer])
                    if value > running:  # NaN compares false: never exits here
                        running = value
                    # the running max only grows: walk the sorted thresholds on from count
                    while count < num_thresholds and boundaries[count] <= running:
                        count += 1
                reached[t, layer] = count
                layers_at[count, j] += 1
        exit_row = np.zeros(width, exits.dtype)
        for k in range(num_thresholds):  # a cumulative sum over thresholds, row by row
            counts = layers_at[k]
            for j in range(width):
                exit_row[j] += counts[j]
            exits[row_of_sorted[k], start:stop] = exit_row


@numba.njit(parallel=True, cache=True, nogil=True)
def statistics_kernel(reached, top1_id, final_id, num_thresholds, num_parts):  # pragma: no cover - compiled
    """Per (layer, sorted threshold): tokens exiting there and those agreeing with the
    final token, as ``[L, K]`` int64 counts. Token ``t`` exits at layer ``l`` for the sorted
    thresholds in ``[reached[l-1], reached[l])``: a +1/-1 pair in a difference array over
    thresholds, summed at the end (each part of the tokens has its own table)."""
    num_tokens, checked = reached.shape
    num_layers = checked + 1
    width = num_thresholds + 1
    counts = np.zeros((num_parts, num_layers, width), np.int64)
    agreeing = np.zeros((num_parts, num_layers, width), np.int64)
    size = (num_tokens + num_parts - 1) // num_parts
    for part in numba.prange(num_parts):
        for t in range(part * size, min((part + 1) * size, num_tokens)):
            lower = 0
            final = final_id[t]
            for layer in range(num_layers):
                upper = reached[t, layer] if layer < checked else num_thresholds
                if upper != lower:
                    counts[part, layer, lower] += 1
                    counts[part, layer, upper] -= 1
                    if top1_id[t, layer] == final:
                        agreeing[part, layer, lower] += 1
                        agreeing[part, layer, upper] -= 1
                lower = upper
    total_counts = np.zeros((num_layers, num_thresholds), np.int64)
    total_agreeing = np.zeros((num_layers, num_thresholds), np.int64)
    for layer in range(num_layers):
        running_count = 0
        running_agree = 0
        for k in range(num_thresholds):
            for part in range(num_parts):
                running_count += counts[part, layer, k]
                running_agree += agreeing[part, layer, k]
            total_counts[layer, k] = running_count
            total_agreeing[layer, k] = running_agree
    return total_counts, total_agreeing
