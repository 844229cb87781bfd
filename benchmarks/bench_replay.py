"""Replay benchmark: 10 measures x 100 thresholds over synthetic traces of 1M tokens x 24 layers.

Runs the whole sweep -- every measure's scores, the exit layer of every token at every
threshold (the replay proper) and the exit statistics (histogram, mean layers used, token
agreement with full depth) -- with the array path (``engine="reference"``, the
implementation before the compiled kernels) and with the kernels (``engine="numba"``), side by
side: per measure and per repeat the two run back to back, in alternating order, so a shared
machine's drift moves both alike. Prints per-measure medians, the totals, their ratio, and the
floor: the bytes the sweep must read once (each measure's trace fields, its scores, and the
top-1 and final ids the statistics read) at the bandwidth measured here. Target (issue 17):
the sweep at most 5 s on the 2-core development machine.

Synthetic traces: top-1 probabilities rise over layers with noise, top-2 below them,
predictions settle at a random layer. The three learned measures need hidden states, which
a 1M x 24 x d_model array would not fit in memory; their scores are random arrays of the same
shape made before timing, so their line times the replay, not their networks. Thresholds span
each measure's finite score range (computed before timing, on a strided sample).

    .venv/bin/python benchmarks/bench_replay.py [--tokens N] [--layers L] [--thresholds K]
                                                [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from suite.measures import MEASURES
from suite.replay import exit_statistics, replay
from suite.traces import TraceArrays

LEARNED = ("classifier_single", "classifier_three_hidden", "classifier_lstm")
ENGINES = ("reference", "numba")


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


def read_bandwidth_bytes_per_s(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Memory read bandwidth: the best of ``repeats`` parallel sums over ``size_bytes``
    (numba, every core), so the floor is a bound no implementation here can beat."""
    import numba

    @numba.njit(parallel=True, cache=False)
    def parallel_sum(values):
        total = 0.0
        for i in numba.prange(values.shape[0]):
            total += values[i]
        return total

    values = np.ones(size_bytes // 8)
    parallel_sum(values[:1024])  # compile
    best = np.inf
    for _ in range(repeats):
        started = time.perf_counter()
        parallel_sum(values)
        best = min(best, time.perf_counter() - started)
    return size_bytes / best


def field_bytes(traces: TraceArrays, names) -> int:
    return sum(np.asarray(getattr(traces, name)).nbytes for name in names
               if name != "hidden" and getattr(traces, name, None) is not None)


def one_sweep(measure, name: str, traces: TraceArrays, stand_in, thresholds, engine: str):
    """Seconds of scores, exit layers and statistics for one measure on one engine."""
    t0 = time.perf_counter()
    scores = stand_in if stand_in is not None else measure.scores(traces)
    t1 = time.perf_counter()
    result = replay(scores, thresholds, engine=engine)
    t2 = time.perf_counter()
    stats = exit_statistics(traces, result, engine=engine)
    t3 = time.perf_counter()
    return np.array([t1 - t0, t2 - t1, t3 - t2]), result, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--thresholds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")
    made = time.perf_counter()
    traces = synthetic_traces(args.tokens, args.layers)
    print(f"synthetic traces: {args.tokens:,} tokens x {args.layers} layers "
          f"({time.perf_counter() - made:.1f} s to make)")
    tiny = synthetic_traces(64, args.layers)
    compile_started = time.perf_counter()
    for dtype in (np.float32, np.float64):  # numba compiles (or loads its cache) per dtype
        exit_statistics(tiny, replay(tiny.top1_prob.astype(dtype), [0.5], engine="numba"),
                        engine="numba")
    print(f"numba kernels ready in {time.perf_counter() - compile_started:.1f} s "
          f"(compiled once, then cached on disk)")

    rng = np.random.default_rng(1)
    names = MEASURES.names()
    measures, stand_ins, thresholds, floor_bytes = {}, {}, {}, 0
    for name in names:
        measure = MEASURES.get(name)()
        stand_in = rng.random((args.tokens, args.layers), dtype=np.float32) \
            if name in LEARNED else None
        sample = stand_in if stand_in is not None else measure.scores(traces)
        finite = sample[::97][np.isfinite(sample[::97])]
        thresholds[name] = np.linspace(finite.min(), finite.max(), args.thresholds)
        reads = field_bytes(traces, measure.reads) if stand_in is None else stand_in.nbytes
        floor_bytes += reads + sample.nbytes + traces.top1_id.nbytes + traces.final_id.nbytes
        measures[name], stand_ins[name] = measure, stand_in
        del sample

    seconds = {engine: {name: [] for name in names} for engine in ENGINES}
    for repeat in range(args.repeats):
        for index, name in enumerate(names):
            order = ENGINES if (repeat + index) % 2 == 0 else ENGINES[::-1]
            outputs = {}
            for engine in order:
                parts, result, stats = one_sweep(measures[name], name, traces, stand_ins[name],
                                                 thresholds[name], engine)
                seconds[engine][name].append(parts)
                outputs[engine] = (result, stats)
            (ref, ref_stats), (new, new_stats) = outputs["reference"], outputs["numba"]
            if not (np.array_equal(ref.exits, new.exits)
                    and np.array_equal(ref.reached, new.reached)
                    and np.allclose(ref_stats.exit_histogram, new_stats.exit_histogram)
                    and np.allclose(ref_stats.token_agreement, new_stats.token_agreement)):
                raise SystemExit(f"{name}: the engines disagree")
            del outputs, ref, new

    medians = {engine: {name: np.median(np.stack(seconds[engine][name]), axis=0)
                        for name in names} for engine in ENGINES}
    print(f"\nmedians of {args.repeats} repeats, seconds (scores / exit layers / statistics)")
    print(f"{'measure':<26}{'reference':>24}{'numba':>24}")
    for name in names:
        ref, new = medians["reference"][name], medians["numba"][name]
        print(f"{name:<26}{ref[0]:>8.2f}{ref[1]:>8.2f}{ref[2]:>8.2f}"
              f"{new[0]:>8.2f}{new[1]:>8.2f}{new[2]:>8.2f}")
    totals = {engine: sum(medians[engine].values()) for engine in ENGINES}
    for engine in ENGINES:
        parts = totals[engine]
        print(f"{'total ' + engine:<26}scores {parts[0]:.2f}  exit layers {parts[1]:.2f}  "
              f"statistics {parts[2]:.2f}  sweep {parts.sum():.2f} s")
    bandwidth = read_bandwidth_bytes_per_s()
    floor = floor_bytes / bandwidth
    print(f"sweep: reference {totals['reference'].sum():.2f} s, numba "
          f"{totals['numba'].sum():.2f} s ({totals['reference'].sum() / totals['numba'].sum():.1f}x"
          f" faster; replay + statistics alone {totals['reference'][1:].sum() / totals['numba'][1:].sum():.1f}x); "
          f"target 5 s")
    print(f"floor: {floor_bytes / 1e9:.2f} GB read once at {bandwidth / 1e9:.1f} GB/s measured "
          f"= {floor:.2f} s (numba sweep = {totals['numba'].sum() / floor:.1f}x the floor)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
