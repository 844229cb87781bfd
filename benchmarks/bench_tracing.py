"""What tracing every layer costs: traced decoding vs the suite's untraced loop vs HF generate.

Model: t5-small's architecture (60M parameters, 6 + 6 layers, vocabulary 32128) with
random weights (``suite.backbones.t5.random_t5``; no hub access here). Inputs: random token ids
of ``--source-tokens`` length. All three decoders run greedy search with a KV cache for
exactly ``--max-new-tokens`` steps (EOS is set to an id the model never emits, so no row
stops early and every method does the same number of steps); their outputs are checked
to be identical before timing.

Timing: the three methods are measured side by side in one process, interleaved (the
order rotates every repeat), after one warm-up call each; the median of ``--repeats``
is reported. FLOPs are counted analytically per decoding step (matmuls as 2 x MACs, the
softmax/top-k of the traced heads at 5 FLOPs per logit), so the FLOP ratio is
traced / untraced, the extra work being the LM heads of the non-final layers. On a CPU
that other jobs share, OpenMP threads that wait on each other make every time several
times longer and the ratios noisy; ``--threads 1`` gives stable numbers there. The check
``traced/untraced <= 1.15 x FLOP ratio`` says that tracing costs no more than its extra
arithmetic plus 15 %.

    .venv/bin/python benchmarks/bench_tracing.py                 # CPU, batch 1 and 8
    .venv/bin/python benchmarks/bench_tracing.py --threads 1     # a CPU shared with other jobs
    .venv/bin/python benchmarks/bench_tracing.py --profile       # where traced time goes
    .venv/bin/python benchmarks/bench_tracing.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from suite.backbones.t5 import T5Adapter, random_t5  # noqa: E402
from suite.decoding import greedy_decode, pad_batch, traced_greedy_decode  # noqa: E402

TOLERANCE = 1.15


def decoder_step_flops(config, context: int, source: int, *, traced: bool) -> float:
    """FLOPs of one decoding step for one row at decoder context length ``context``."""
    d, inner, d_ff, vocab = config.d_model, config.num_heads * config.d_kv, config.d_ff, \
        config.vocab_size
    layers = config.num_decoder_layers
    ffn_matrices = 3 if config.is_gated_act else 2
    per_layer = (2 * 4 * d * inner            # self-attention q, k, v, o
                 + 2 * 2 * d * inner          # cross-attention q, o (encoder K/V cached)
                 + 2 * 2 * inner * context    # self-attention scores and weighted sum
                 + 2 * 2 * inner * source     # cross-attention scores and weighted sum
                 + 2 * ffn_matrices * d * d_ff)
    head = 2 * d * vocab
    heads = layers if traced else 1
    softmax = 5 * vocab * layers if traced else vocab  # logsumexp, top-2, argmax vs argmax
    return layers * per_layer + heads * head + softmax


def flop_ratio(config, steps: int, source: int) -> float:
    traced = sum(decoder_step_flops(config, t + 1, source, traced=True) for t in range(steps))
    plain = sum(decoder_step_flops(config, t + 1, source, traced=False) for t in range(steps))
    return traced / plain


def make_inputs(batch: int, source_tokens: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (source_tokens - 1,), generator=generator).tolist() + [1]
            for _ in range(batch)]
    return pad_batch(rows, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_batch(adapter: T5Adapter, batch: int, steps: int, args: argparse.Namespace,
                ratio_flops: float) -> dict:
    """Time the three decoders at one batch size; print and return the row."""
    config = adapter.model.config
    never = adapter.eos_token_id
    ids, mask = make_inputs(batch, args.source_tokens, config.vocab_size, seed=batch)
    ids, mask = ids.to(adapter.device), mask.to(adapter.device)
    example_ids = [str(row) for row in range(batch)]

    def traced():
        return traced_greedy_decode(adapter, ids, mask, example_ids, steps)

    def untraced():
        return greedy_decode(adapter, ids, mask, steps)

    def hf():
        with torch.inference_mode():
            return adapter.model.generate(input_ids=ids, attention_mask=mask,
                                          max_new_tokens=steps, min_new_tokens=steps,
                                          do_sample=False, num_beams=1,
                                          eos_token_id=never, pad_token_id=0)

    methods = {"traced": traced, "untraced": untraced, "hf_generate": hf}
    outputs = {name: fn() for name, fn in methods.items()}  # warm-up, and the check
    traced_tokens = outputs["traced"].final_id.reshape(batch, steps)
    assert (traced_tokens == outputs["untraced"].token_ids).all(), "untraced != traced"
    assert (torch.as_tensor(traced_tokens) == outputs["hf_generate"][:, 1:].cpu()).all(), \
        "HF generate != traced"
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        traced()
        profiler.disable()
        print(f"\n-- cProfile of one traced decode, batch {batch} (top 12 by own time) --")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(12)
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    for repeat in range(args.repeats):
        for name in order[repeat % 3:] + order[: repeat % 3]:
            sync(adapter.device)
            start = time.perf_counter()
            methods[name]()
            sync(adapter.device)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    traced_vs_untraced = median["traced"] / median["untraced"]
    row = {"batch_size": batch, "steps": steps,
           **{f"{name}_s": round(value, 4) for name, value in median.items()},
           "tokens_per_s": {name: round(batch * steps / value, 1)
                            for name, value in median.items()},
           "traced_over_untraced": round(traced_vs_untraced, 3),
           "traced_over_hf_generate": round(median["traced"] / median["hf_generate"], 3),
           "untraced_over_hf_generate": round(median["untraced"] / median["hf_generate"], 3),
           "flop_ratio": round(ratio_flops, 3),
           "within_tolerance": traced_vs_untraced <= TOLERANCE * ratio_flops}
    print(f"\nbatch {batch}: traced {median['traced'] * 1e3:.0f} ms, untraced "
          f"{median['untraced'] * 1e3:.0f} ms, HF generate {median['hf_generate'] * 1e3:.0f} ms "
          f"({steps} steps)")
    print(f"  traced/untraced {traced_vs_untraced:.2f}  traced/HF {row['traced_over_hf_generate']:.2f}  "
          f"untraced/HF {row['untraced_over_hf_generate']:.2f}  FLOP ratio {ratio_flops:.2f}  "
          f"traced/untraced <= {TOLERANCE} x FLOP ratio: "
          f"{'yes' if row['within_tolerance'] else 'NO'}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--source-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one traced decode per batch size and print the top calls")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = random_t5(seed=0)
    adapter = T5Adapter(model, model_id="random-t5-small", device=args.device, dtype=args.dtype)
    config = adapter.model.config
    # An id the random model never emits: every method runs exactly max_new_tokens steps.
    never = config.vocab_size - 1
    adapter.eos_token_id = never
    steps = args.max_new_tokens
    ratio_flops = flop_ratio(config, steps, args.source_tokens)
    print(f"model: t5-small architecture, random weights ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"parameters, {adapter.num_layers} decoder layers, vocab {config.vocab_size}); "
          f"device {adapter.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}")
    print(f"inputs: random ids, {args.source_tokens} source tokens, {steps} new tokens, "
          f"median of {args.repeats} interleaved repeats")
    print(f"FLOP ratio traced/untraced per step (LM head at every layer): {ratio_flops:.2f}")

    results = [bench_batch(adapter, batch, steps, args, ratio_flops)
               for batch in args.batch_sizes]
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(adapter.device), "dtype": args.dtype,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
