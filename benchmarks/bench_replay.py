"""Replay benchmark: 10 measures x 100 thresholds over synthetic traces of 1M tokens x 24 layers.

Prints, per measure, the time to compute its scores, the exit layer of every token at every
threshold (the replay proper), and the exit statistics (histogram, mean layers used, token
agreement with full depth); then the totals. Target (issue): the whole sweep under 10 s on the 2-core development machine.

Synthetic traces: top-1 probabilities rise over layers with noise, top-2 below them,
predictions settle at a random layer. The three learned measures need hidden states, which
a 1M x 24 x d_model array would not fit in memory; their scores are replaced by random
arrays of the same shape, so their line times the replay, not their networks.

    .venv/bin/python benchmarks/bench_replay.py [--tokens N] [--layers L] [--thresholds K]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from suite.measures import MEASURES
from suite.replay import exit_statistics, replay
from suite.traces import TraceArrays

LEARNED = ("classifier_single", "classifier_three_hidden", "classifier_lstm")


def synthetic_traces(num_tokens: int, num_layers: int, seed: int = 0) -> TraceArrays:
    rng = np.random.default_rng(seed)
    depth = np.linspace(0.1, 1.0, num_layers, dtype=np.float32)[None, :]
    top1_prob = np.clip(depth * rng.uniform(0.5, 1.0, (num_tokens, 1)).astype(np.float32)
                        + rng.normal(0, 0.05, (num_tokens, num_layers)).astype(np.float32),
                        0.01, 1.0)
    top2_prob = (top1_prob * rng.uniform(0.0, 1.0, (num_tokens, num_layers))
                 .astype(np.float32)).clip(0, 1 - top1_prob)
    settle = rng.integers(0, num_layers, num_tokens)
    final_id = rng.integers(0, 32000, num_tokens).astype(np.int32)
    noise_id = rng.integers(0, 32000, (num_tokens, num_layers)).astype(np.int32)
    layer = np.arange(num_layers)[None, :]
    top1_id = np.where(layer >= settle[:, None], final_id[:, None], noise_id)
    cos_prev = np.clip(depth + rng.normal(0, 0.05, (num_tokens, num_layers)), -1, 1)
    examples = np.arange(num_tokens) // 100
    return TraceArrays(example_id=examples.astype(str).astype(object),
                       position=(np.arange(num_tokens) % 100).astype(np.int32),
                       final_id=final_id, gold_id=-np.ones(num_tokens, np.int32),
                       top1_id=top1_id.astype(np.int32), top1_prob=top1_prob,
                       top2_prob=top2_prob.astype(np.float32),
                       cos_prev=cos_prev.astype(np.float32),
                       cos_last=cos_prev.astype(np.float32),
                       final_prob=top1_prob)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--thresholds", type=int, default=100)
    args = parser.parse_args()

    made = time.perf_counter()
    traces = synthetic_traces(args.tokens, args.layers)
    print(f"synthetic traces: {args.tokens:,} tokens x {args.layers} layers "
          f"({time.perf_counter() - made:.1f} s to make)")
    rng = np.random.default_rng(1)
    totals = np.zeros(3)
    print(f"{'measure':<26}{'scores s':>10}{'exits s':>10}{'stats s':>16}")
    for name in MEASURES.names():
        measure = MEASURES.get(name)()
        t0 = time.perf_counter()
        if name in LEARNED:
            scores = rng.random((args.tokens, args.layers), dtype=np.float32)
        else:
            scores = measure.scores(traces)
        low, high = np.nanmin(np.where(np.isfinite(scores), scores, np.nan)), \
            np.nanmax(np.where(np.isfinite(scores), scores, np.nan))
        thresholds = np.linspace(low, high, args.thresholds)
        t1 = time.perf_counter()
        result = replay(scores, thresholds)
        t2 = time.perf_counter()
        exit_statistics(traces, result)
        t3 = time.perf_counter()
        parts = np.array([t1 - t0, t2 - t1, t3 - t2])
        totals += parts
        print(f"{name:<26}{parts[0]:>10.2f}{parts[1]:>10.2f}{parts[2]:>16.2f}")
    print(f"{'total':<26}{totals[0]:>10.2f}{totals[1]:>10.2f}{totals[2]:>16.2f}")
    print(f"scores + exit layers: {totals[0] + totals[1]:.1f} s; with statistics: "
          f"{totals.sum():.1f} s (target for the sweep: 10 s)")


if __name__ == "__main__":
    main()
