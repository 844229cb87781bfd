"""``exitbench profile``: time a model's decoding operations on this device and write a
``kind: measured`` hardware profile (see :mod:`suite.profiling` and docs/cost_model.md)."""

from __future__ import annotations

import argparse

from suite.errors import ExitbenchError


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers "
                                         f"(e.g. 1,8,32)") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one integer")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    from suite.profiling import (
        DEFAULT_BATCH_SIZES,
        DEFAULT_CONTEXTS,
        DEFAULT_QUERY_LENS,
        DEFAULT_REPEATS,
        DEFAULT_SOURCE_LEN,
        DEFAULT_WARMUP,
    )

    def csv(values) -> str:
        return ",".join(str(v) for v in values)

    parser = subparsers.add_parser(
        "profile", help="measure a hardware profile (timed operation tables) on this device",
        description="Time the operations of T5 decoding through the suite's own layer loop on "
                    "this device, for one model: a decoder-layer step by batch size and "
                    "context length, LM head + softmax, the K/V fill of a skipped layer, each "
                    "measure's check, the encoder prefill by batch size and source length, "
                    "self-speculation's verification pass by query length and its rollback, "
                    "and the fixed per-step cost. Writes a `kind: measured` profile YAML that "
                    "the cost model prices replays with (valid for that model's sizes only).")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--model", required=True,
                        help="a local model folder (save_pretrained) or a hub id")
    parser.add_argument("--dtype", default="float32",
                        choices=["float32", "tf32", "bfloat16", "float16"],
                        help="compute dtype (default float32; tf32 on CUDA only)")
    parser.add_argument("--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES),
                        metavar="B,B,...", help=f"default {csv(DEFAULT_BATCH_SIZES)}")
    parser.add_argument("--contexts", type=_int_list, default=list(DEFAULT_CONTEXTS),
                        metavar="C,C,...",
                        help=f"decoder keys per step, current token included; >= 2 "
                             f"(default {csv(DEFAULT_CONTEXTS)})")
    parser.add_argument("--source-len", type=int, default=DEFAULT_SOURCE_LEN,
                        help=f"encoder keys of the decoder-layer table (default "
                             f"{DEFAULT_SOURCE_LEN})")
    parser.add_argument("--source-lens", type=_int_list, default=None, metavar="S,S,...",
                        help="source lengths of the encoder-prefill table (default: a "
                             "quarter, a half and all of --source-len)")
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS,
                        help=f"timed runs per entry; the median is kept (default "
                             f"{DEFAULT_REPEATS})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed runs per entry first (default {DEFAULT_WARMUP})")
    parser.add_argument("--query-lens", type=_int_list, default=None, metavar="Q,Q,...",
                        help="positions per row of the timed verification passes of "
                             "self-speculative decoding, k + 1 (default: those of "
                             f"{csv(DEFAULT_QUERY_LENS)} below the middle context)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads while timing (default: torch's own choice)")
    parser.add_argument("--measures", default="all", metavar="all|NAME,FILE.py,...",
                        help="measures whose checks are timed: registered names, measure "
                             "files (loaded in the sandbox; timed by a stand-in of their "
                             "declared kind of check) or package.module:Class (default all "
                             "registered)")
    parser.add_argument("--out", required=True, metavar="PATH.yaml",
                        help="profile file to write; its stem is the profile's name "
                             "(hardware_profiles/NAME.yaml makes it a built-in)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suite.profiling import ProfileSettings, profile_model

    measures = None if args.measures.strip() == "all" else tuple(
        name.strip() for name in args.measures.split(",") if name.strip())
    if measures is not None and not measures:
        raise ExitbenchError("--measures: give 'all' or a comma-separated list of measure "
                             "names (see `exitbench ls measures`)")
    settings = ProfileSettings(
        device=args.device, dtype=args.dtype, batch_sizes=tuple(args.batch_sizes),
        contexts=tuple(args.contexts), source_len=args.source_len,
        source_lens=tuple(args.source_lens) if args.source_lens else None,
        repeats=args.repeats, warmup=args.warmup, measures=measures, threads=args.threads,
        query_lens=tuple(args.query_lens) if args.query_lens else None)
    profile, result = profile_model(args.model, args.out, settings, log=print)
    env = profile.environment
    print("fixed step by batch size: " + ", ".join(
        f"B={b} {1e6 * t:.0f} us" for b, t in result.fixed_step_by_batch.items())
        + f" (stored: median {1e6 * profile.tables.fixed_step_seconds:.0f} us)")
    for name, how in sorted(result.check_methods.items()):
        seconds = profile.tables.measure_check_seconds[name].seconds
        print(f"check {name}: " + ", ".join(f"{1e6 * t:.1f} us" for t in seconds)
              + f"  [{how}]")
    verify = profile.tables.verify_layer_seconds
    if verify is not None:
        print(f"verification pass per layer at {verify.context_len} keys: " + "; ".join(
            f"B={b} " + ", ".join(f"q={q} {1e6 * t:.0f} us" for q, t in zip(verify.query_lens, row))
            for b, row in zip(verify.batch_sizes, verify.seconds)))
    if result.skipped_measures:
        print(f"no check table (these measures make no check on a model of this depth): "
              f"{', '.join(result.skipped_measures)}")
    print(f"profile {profile.name!r}: {env.device_name}, {env.dtype}, {env.threads} threads, "
          f"model {profile.model.id} ({result.seconds:.1f} s) -> {args.out}")
    return 0
