"""Self-speculative replay benchmark: every draft depth x draft length over synthetic
traces of 1M tokens x 24 layers (10,000 examples of 100 tokens), replayed and priced.

Prints, per draft length, the time to replay every draft depth (the cycles of every
example, vectorised over tokens, walked one vectorised step per cycle index), to check the
emitted tokens against the trace, and to price the cycles on a simulated profile at batch
sizes 1 and 32; then the totals. Replay stays linear in tokens: no loop per token or cycle.

Synthetic traces (benchmarks/bench_replay.py's): predictions settle on the final token
from a random layer on, so deeper drafts are accepted more often.

    .venv/bin/python benchmarks/bench_speculative_replay.py [--tokens N] [--layers L]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from bench_replay import synthetic_traces

from suite.cost import example_index_from_ids, operation_costs, speculative_cost
from suite.measures import ModelDims
from suite.profiles import get_profile
from suite.speculative.method import SelfSpeculation
from suite.speculative.replay import emitted_tokens, replay_speculation, replay_statistics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    traces = synthetic_traces(args.tokens, args.layers)
    dims = ModelDims(num_layers=args.layers, d_model=1024, d_ff=4096, num_heads=16, d_kv=64,
                     vocab_size=32128)
    costs = operation_costs(get_profile("a100_sxm_80gb"), dims, "bfloat16")
    example_index = example_index_from_ids(traces.example_id)
    source_len = np.full(int(example_index.max()) + 1, 256)
    print(f"{traces.num_tokens:,} tokens x {traces.num_layers} layers, "
          f"{source_len.size:,} examples")
    totals = {"replay": 0.0, "check": 0.0, "price": 0.0}
    for length in (1, 2, 4, 8):
        times = dict.fromkeys(totals, 0.0)
        accepted = []
        for depth in range(1, args.layers):
            spec = SelfSpeculation(depth, length)
            started = time.perf_counter()
            result = replay_speculation(traces, spec, 100)
            times["replay"] += time.perf_counter() - started
            started = time.perf_counter()
            emitted_tokens(traces, result)
            times["check"] += time.perf_counter() - started
            started = time.perf_counter()
            for batch_size in (1, 32):
                speculative_cost(costs, dims, depth, result.example_index, result.position,
                                 result.drafted_high, source_len, batch_size, traces.num_tokens)
            times["price"] += time.perf_counter() - started
            accepted.append(replay_statistics(result).mean_accepted_tokens)
        for key in totals:
            totals[key] += times[key]
        print(f"k={length}: {args.layers - 1} depths replayed in {times['replay']:.2f} s, "
              f"checked in {times['check']:.2f} s, priced (2 batch sizes) in "
              f"{times['price']:.2f} s; mean accepted tokens {min(accepted):.2f}.."
              f"{max(accepted):.2f}")
    points = 4 * (args.layers - 1)
    print(f"total {points} points: replay {totals['replay']:.2f} s "
          f"({totals['replay'] / points * 1e3:.0f} ms a point, "
          f"{traces.num_tokens * points / totals['replay'] / 1e6:.1f} M tokens/s), check "
          f"{totals['check']:.2f} s, price {totals['price']:.2f} s")


if __name__ == "__main__":
    main()
