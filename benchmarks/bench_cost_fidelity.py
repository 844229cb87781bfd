"""Cost-model fidelity: predicted vs measured full-depth greedy decoding throughput on CPU.

A measured hardware profile (``exitbench profile``) predicts what full-depth greedy decoding
of real inputs costs (:func:`suite.cost.full_depth_seconds` over the batch schedule of the
lengths actually generated); the suite's untraced greedy loop
(:func:`suite.decoding.greedy_decode`) then decodes the same inputs and is timed. Prints
predicted and measured tokens/s and the relative error per batch size (target: within 10%).

Two schedules, because the loop and the cost model batch differently:

- **loop schedule** (the like-for-like comparison): ``greedy_decode`` keeps finished rows in
  the batch (fed the pad token) until the last row ends, so every step of a batch runs at
  the full batch size. Priced by giving every row of a batch the batch's longest length;
  tokens/s still counts only the real tokens.
- **cost-model schedule**: what the suite prices replays with: finished rows leave the batch
  (operations at the number of active rows). Shown for reference; it is faster than this
  loop can be whenever lengths differ within a batch.

Two profiles, because this shared 2-core VM's speed drifts by up to 2x over seconds to
minutes (other processes, other tenants; a step timed every 0.5 s for 24 s ranged 440-885
us per layer on one thread and 590-1700 us on two):

- **committed**: ``--profile`` (default hardware_profiles/cpu_measured_tiny.yaml, when it was
  timed on a model of these sizes), measured at some earlier moment;
- **paired** (unless ``--no-paired``): the examples are decoded in chunks of
  ``--chunk`` (8), and right before each chunk a small profile of that batch size
  (contexts 2-32, prefill at the chunk's source lengths, no checks, 3 repeats) is timed in
  this process and prices that chunk. Prediction and measurement then share the machine's
  state of the same few seconds, which separates the cost model's own error from the drift.

Inputs: the first ``--examples`` questions of the SQuAD sample (``data/samples``), encoded
with the model's tokenizer and cut to ``--max-source-tokens`` (256, as the quickstart), at
most ``--max-new-tokens`` (30) new tokens. Timing: ``--repeats`` rounds, each decoding all
examples at every batch size in turn (interleaved); the median over rounds is kept.

    .venv/bin/python benchmarks/bench_cost_fidelity.py [--model DIR] [--profile YAML]
        [--examples 32] [--batch-sizes 1,8] [--repeats 5] [--chunk 8] [--threads N]

``--model`` defaults to runs/quickstart/models/tiny-calm (written by the quickstart), else a
random-weight T5 of the ``tiny`` preset's sizes with a tokenizer trained on the SQuAD
sample.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see suite/cli.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICKSTART_MODEL = REPO_ROOT / "runs" / "quickstart" / "models" / "tiny-calm"
DEFAULT_PROFILE = REPO_ROOT / "hardware_profiles" / "cpu_measured_tiny.yaml"
PAIRED_CONTEXTS = (2, 8, 16, 32)
"""Decoder contexts of the paired profiles: answers are at most 30 tokens."""


def random_tiny_model(root: Path) -> Path:
    """A random-weight T5 of the tiny preset's sizes with a SQuAD-sample tokenizer (the
    record benchmark's default model)."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_record import default_model

    return default_model(root)


def schedule_of(lengths: np.ndarray, batch_size: int, *, loop: bool) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """``(example_index, position)`` of every decoding step of every row. ``loop=True``: each
    row runs until its batch's longest row ends (what ``greedy_decode`` computes)."""
    lengths = np.asarray(lengths, np.int64)
    if loop:
        starts = np.arange(0, lengths.size, batch_size)
        longest = np.maximum.reduceat(lengths, starts)
        lengths = np.repeat(longest, np.diff(np.r_[starts, lengths.size]))
    example_index = np.repeat(np.arange(lengths.size), lengths)
    first = np.cumsum(lengths) - lengths
    position = np.arange(int(lengths.sum())) - np.repeat(first, lengths)
    return example_index, position


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--profile", default=None, help="a measured profile YAML")
    parser.add_argument("--no-paired", action="store_true",
                        help="skip the paired profiles (only the committed one)")
    parser.add_argument("--chunk", type=int, default=8,
                        help="examples per paired chunk (a multiple of every batch size)")
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-source-tokens", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's own choice); the profile must "
                             "have been timed with the same number")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if any(args.chunk % b for b in batch_sizes) or args.examples % args.chunk:
        raise SystemExit(f"--chunk {args.chunk} must be a multiple of every batch size and "
                         f"divide --examples {args.examples}")

    from suite.cost import NO_CHECK, MeasuredCosts, decode_cost, full_depth_seconds
    from suite.decoding import greedy_decode, pad_batch
    from suite.models import load_adapter, load_tokenizer
    from suite.profiles import MeasuredProfile, load_profile, parse_profile
    from suite.profiling import ProfileSettings, measure_profile
    from suite.record import encode_texts
    from suite.tasks import get_task, load_examples

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model:
            model_path = Path(args.model)
        elif QUICKSTART_MODEL.is_dir():
            model_path = QUICKSTART_MODEL
        else:
            print("no quickstart model; using a random-weight T5 of the tiny preset's sizes")
            model_path = random_tiny_model(root)
        adapter = load_adapter(str(model_path))
        tokenizer = load_tokenizer(str(model_path))
        dims = adapter.dims

        profile_path = Path(args.profile) if args.profile else DEFAULT_PROFILE
        committed = None
        if profile_path.is_file():
            committed = load_profile(profile_path)
            sizes = ("num_layers", "d_model", "d_ff", "num_heads", "d_kv", "vocab_size")
            if not isinstance(committed, MeasuredProfile) or any(
                    getattr(committed.model, k) != getattr(dims, k) for k in sizes):
                if args.profile:
                    raise SystemExit(f"{profile_path} is not a measured profile of this "
                                     f"model's sizes; run `exitbench profile` for it")
                print(f"{profile_path} was timed on other model sizes; paired profiles only")
                committed = None
            elif committed.environment.threads != torch.get_num_threads():
                print(f"warning: {profile_path} was timed with "
                      f"{committed.environment.threads} threads, this process runs "
                      f"{torch.get_num_threads()}")
        if committed is None and args.no_paired:
            raise SystemExit("no profile to compare with: give --profile or drop --no-paired")

        examples = load_examples(get_task("squad"), f"validation[:{args.examples}]",
                                 REPO_ROOT / "data" / "samples")
        sources = encode_texts(tokenizer, [e.source for e in examples], args.max_source_tokens,
                               adapter.eos_token_id)
        source_len = np.array([len(s) for s in sources])
        chunks = [slice(i, i + args.chunk) for i in range(0, len(sources), args.chunk)]
        batches = {b: [[pad_batch(sources[i:i + b], adapter.pad_token_id)
                        for i in range(chunk.start, chunk.stop, b)] for chunk in chunks]
                   for b in batch_sizes}

        def decode_chunk(b: int, c: int) -> tuple[np.ndarray, float]:
            started = time.perf_counter()
            lengths = [greedy_decode(adapter, ids, mask, args.max_new_tokens).lengths
                       for ids, mask in batches[b][c]]
            return np.concatenate(lengths), time.perf_counter() - started

        # one untimed pass: the generated lengths (greedy is deterministic) and a warm-up
        lengths = {b: np.concatenate([decode_chunk(b, c)[0] for c in range(len(chunks))])
                   for b in batch_sizes}

        def full_depth(profile, b: int, which: slice, schedule: str) -> float:
            index, position = schedule_of(lengths[b][which], b, loop=schedule == "loop")
            return full_depth_seconds(MeasuredCosts(profile, dims, "float32"), dims, index,
                                      position, source_len[which], b)

        measured: dict[int, list[float]] = {b: [] for b in batch_sizes}
        paired: dict[int, list[float]] = {b: [] for b in batch_sizes}
        started_all = time.perf_counter()
        for _ in range(args.repeats):
            for b in batch_sizes:  # interleaved, so load from elsewhere hits all alike
                decoded, predicted = 0.0, 0.0
                for c, chunk in enumerate(chunks):
                    if not args.no_paired:  # tables timed right before this chunk's decode
                        settings = ProfileSettings(
                            batch_sizes=(b,), contexts=PAIRED_CONTEXTS,
                            source_len=args.max_source_tokens,
                            source_lens=tuple(sorted({int(source_len[chunk].min()),
                                                      int(source_len[chunk].max())})),
                            repeats=3, warmup=1, measures=())
                        run = measure_profile(adapter, settings, model_id=str(model_path),
                                              name="paired")
                        predicted += full_depth(parse_profile(run.data, "<paired>"), b, chunk,
                                                "loop")
                    again, seconds = decode_chunk(b, c)
                    assert np.array_equal(again, lengths[b][chunk]), "greedy is deterministic"
                    decoded += seconds
                measured[b].append(decoded)
                paired[b].append(predicted)
        wall = time.perf_counter() - started_all

        print(f"\nmodel {model_path} ({dims.num_layers}+{dims.num_layers} layers, d_model "
              f"{dims.d_model}, vocab {dims.vocab_size}); {len(examples)} SQuAD-sample inputs, "
              f"sources {source_len.min()}-{source_len.max()} tokens (mean "
              f"{source_len.mean():.0f}), at most {args.max_new_tokens} new tokens; "
              f"{torch.get_num_threads()} threads; {args.repeats} rounds in {wall:.0f} s; "
              f"load average (1 min) {os.getloadavg()[0]:.2f} at the end")
        if committed is not None:
            print(f"committed profile: {profile_path} ({committed.environment.device_name}, "
                  f"{committed.environment.threads} threads, measured {committed.measured_at})")
        if not args.no_paired:
            print(f"paired profiles: one per chunk of {args.chunk} examples, timed right "
                  f"before its decode (contexts {','.join(map(str, PAIRED_CONTEXTS))}, "
                  f"3 repeats)")
        print(f"{'batch':>5} {'tokens':>6} {'row-steps':>9} {'measured tok/s':>14} "
              f"{'committed: loop sched.':>22} {'cost-model sched.':>18} "
              f"{'paired: loop sched.':>19}")
        for b in batch_sizes:
            tokens = int(lengths[b].sum())
            rate = tokens / statistics.median(measured[b])

            def cell(predicted: float | None, width: int, rate: float = rate) -> str:
                if predicted is None:
                    return f"{'-':>{width}}"
                return f"{predicted:>{width - 9}.1f} ({(predicted - rate) / rate:+6.1%})"

            everything = slice(0, len(sources))
            loop_rate = tokens / full_depth(committed, b, everything, "loop") \
                if committed is not None else None
            active_rate = tokens / full_depth(committed, b, everything, "cost model") \
                if committed is not None else None
            paired_rate = tokens / statistics.median(paired[b]) if paired[b][0] else None
            row_steps = schedule_of(lengths[b], b, loop=True)[0].size
            print(f"{b:>5} {tokens:>6} {row_steps:>9} {rate:>14.1f} {cell(loop_rate, 22)} "
                  f"{cell(active_rate, 18)} {cell(paired_rate, 19)}")
            line = "      measured per round (s): " + ", ".join(f"{x:.3f}" for x in measured[b])
            if paired[b][0]:
                errors = [m / p - 1 for m, p in zip(measured[b], paired[b])]
                line += ("; paired prediction per round (s): "
                         + ", ".join(f"{x:.3f}" for x in paired[b])
                         + f"; per-round tok/s error: median {statistics.median(errors):+.1%}"
                         f", range {min(errors):+.1%} to {max(errors):+.1%}")
            print(line)
            if committed is not None:
                index, position = schedule_of(lengths[b], b, loop=True)
                parts = decode_cost(MeasuredCosts(committed, dims, "float32"), dims,
                                    np.full(index.size, dims.num_layers - 1, np.int64), index,
                                    position, source_len, b, NO_CHECK,
                                    np.zeros(dims.num_layers, bool), propagation="none")
                print(f"      committed loop-schedule prediction {float(parts.seconds[0]):.3f} "
                      f"s = prefill {float(parts.prefill_seconds[0]):.3f} + layers "
                      f"{float(parts.layer_seconds[0]):.3f} + LM head "
                      f"{float(parts.lm_head_seconds[0]):.3f} + fixed "
                      f"{float(parts.fixed_seconds[0]):.3f}")


if __name__ == "__main__":
    main()
