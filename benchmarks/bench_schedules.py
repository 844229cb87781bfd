"""Schedules and calibration benchmark, side by side in one run over synthetic traces.

Prints, for softmax_margin's scores over T tokens x L layers at K thresholds (positions
0..P-1, examples of P tokens): the engine's constant replay, the same replay under CALM's
decay (the score transform plus the constant replay), FREE's adaptive threshold (the
sequential simulation over examples), and Learn-then-Test over S random calibration/test
splits of per-example losses; each with its ratio to the constant replay.

    .venv/bin/python benchmarks/bench_schedules.py [--tokens N] [--layers L] [--thresholds K]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_replay import synthetic_traces

from suite.adaptive import AdaptiveSettings
from suite.calibration import split_validity
from suite.measures import get_measure
from suite.replay import exit_statistics, replay
from suite.schedules import CalmDecaySchedule, replay_scheduled


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--thresholds", type=int, default=100)
    parser.add_argument("--positions", type=int, default=128)
    parser.add_argument("--splits", type=int, default=1000)
    args = parser.parse_args()
    traces = synthetic_traces(args.tokens, args.layers)
    # examples of `positions` tokens each, in decoding order
    traces.position = (np.arange(args.tokens) % args.positions).astype(np.int32)
    traces.example_id = np.asarray([f"e{i}" for i in np.arange(args.tokens) // args.positions],
                                   dtype=object)
    thresholds = np.linspace(0.0, 1.0, args.thresholds)
    scores = get_measure("softmax_margin")().scores(traces)

    def constant():
        result = replay(scores, thresholds)
        return exit_statistics(traces, result)

    _, base = timed(constant)
    decay = CalmDecaySchedule(tau=4.0, max_length=args.positions)
    _, decayed = timed(lambda: replay_scheduled(traces, scores, thresholds, decay))
    free = get_measure("free_shallow_deep")()
    free_scores = free.scores(traces)
    few = thresholds[:: max(1, args.thresholds // 20)]
    _, adaptive = timed(lambda: replay_scheduled(traces, free_scores, few, AdaptiveSettings(),
                                                 measure=free))
    examples = args.tokens // args.positions
    rng = np.random.default_rng(0)
    losses = (rng.random(examples)[None, :] < np.linspace(0.3, 0.0, args.thresholds)[:, None]
              ).astype(float)
    _, validity = timed(lambda: split_validity(losses, thresholds, 0.1, 0.1, True, args.splits))
    print(f"{args.tokens} tokens x {args.layers} layers, {args.thresholds} thresholds, "
          f"{args.positions} positions, {examples} examples")
    print(f"  constant replay + statistics      {base:8.2f} s   1.00x")
    print(f"  CALM decay (transform + replay)   {decayed:8.2f} s   {decayed / base:.2f}x")
    print(f"  FREE adaptive, {len(few)} thresholds      {adaptive:8.2f} s   {adaptive / base:.2f}x")
    print(f"  Learn-then-Test, {args.splits} splits     {validity:8.2f} s   "
          f"{validity / base:.2f}x")


if __name__ == "__main__":
    main()
