"""A prepared device check for decoder-only tracing: a random-weight model of Llama 3.2 1B's
architecture (``suite.backbones.decoder_only.LLAMA_3_2_1B_ARCHITECTURE``, 16 layers,
d_model 2048, vocab 128256; no hub access needed) traced on the accelerator in bf16 against
the CPU float32 trace of the same inputs: per-token agreement of the final tokens and of
every layer's top-1, the largest top-1 probability difference, and the traced vs untraced
time ratio on each device.

    .venv/bin/python benchmarks/gpu_decoder_only_check.py --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/gpu_decoder_only_check.py --device cpu --dtype float32 \\
        --small   # a 2-layer shape: checks the script itself on a CPU

The weights are scaled as HF initialises them with ``initializer_range=0.1`` (random layers
that disagree; the default 0.02 makes every layer repeat one token)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from suite.backbones.decoder_only import (  # noqa: E402
    LLAMA_3_2_1B_ARCHITECTURE,
    DecoderOnlyAdapter,
    random_causal_lm,
)
from suite.decoding import greedy_decode, pad_batch, traced_greedy_decode  # noqa: E402

SMALL = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
         "vocab_size": 1024, "bos_token_id": 1, "eos_token_id": 2}


def timed(function, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--small", action="store_true", help="a 2-layer shape (script check)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    shape = {**LLAMA_3_2_1B_ARCHITECTURE, **(SMALL if args.small else {})}
    model = random_causal_lm("llama", seed=0, initializer_range=0.1, **shape)
    never = shape["vocab_size"] - 1  # no row stops early: every run does the same steps
    model.config.eos_token_id = model.generation_config.eos_token_id = never
    generator = torch.Generator().manual_seed(1)
    lengths = np.linspace(args.prompt_tokens // 2, args.prompt_tokens, args.batch).astype(int)
    prompts = [torch.randint(3, shape["vocab_size"] - 1, (int(n),), generator=generator).tolist()
               for n in lengths]
    ids, mask = pad_batch(prompts, 0)
    example_ids = [str(i) for i in range(args.batch)]

    reference = DecoderOnlyAdapter(model, device="cpu", dtype="float32")
    cpu_seconds, cpu = timed(lambda: traced_greedy_decode(reference, ids, mask, example_ids,
                                                          args.new_tokens), reference.device)
    device_model = random_causal_lm("llama", seed=0, initializer_range=0.1, **shape)
    device_model.config.eos_token_id = device_model.generation_config.eos_token_id = never
    adapter = DecoderOnlyAdapter(device_model, device=args.device, dtype=args.dtype)
    traced_decode = lambda: traced_greedy_decode(adapter, ids, mask, example_ids,  # noqa: E731
                                                 args.new_tokens)
    timed(traced_decode, adapter.device)  # warm-up
    traced_seconds, traced = timed(traced_decode, adapter.device)
    plain_seconds, _ = timed(lambda: greedy_decode(adapter, ids, mask, args.new_tokens),
                             adapter.device)

    # compare position by position while both runs still agree on the tokens fed back
    same_final = cpu.final_id == traced.final_id if cpu.num_tokens == traced.num_tokens \
        else np.zeros(0, bool)
    prefix = []
    for example in example_ids:
        a = cpu.final_id[cpu.example_id == example]
        b = traced.final_id[traced.example_id == example]
        diverge = np.flatnonzero(a[:len(b)] != b[:len(a)])
        prefix.append(int(diverge[0]) + 1 if diverge.size else min(len(a), len(b)))
    rows = np.concatenate([np.flatnonzero(cpu.example_id == e)[:n]
                           for e, n in zip(example_ids, prefix)])
    other = np.concatenate([np.flatnonzero(traced.example_id == e)[:n]
                            for e, n in zip(example_ids, prefix)])
    report = {
        "device": args.device, "dtype": args.dtype, "shape": "small" if args.small else
        "Llama-3.2-1B architecture, random weights", "batch": args.batch,
        "new_tokens": args.new_tokens,
        "final_token_agreement": float(same_final.mean()) if same_final.size else None,
        "tokens_before_first_divergence": prefix,
        "layer_top1_agreement": float((cpu.top1_id[rows] == traced.top1_id[other]).mean()),
        "max_top1_prob_difference": float(np.abs(cpu.top1_prob[rows]
                                                 - traced.top1_prob[other]).max()),
        "cpu_float32_traced_seconds": cpu_seconds,
        "device_traced_seconds": traced_seconds, "device_untraced_seconds": plain_seconds,
        "device_traced_over_untraced": traced_seconds / plain_seconds,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
