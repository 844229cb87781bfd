"""``exitbench record``: record per-layer traces for the config's tasks x models."""

from __future__ import annotations

import argparse
import time

from suite.lock import add_wait_argument, holding_run_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "record", help="record full-depth per-layer traces for the config's tasks and models",
        description="Greedy-decode (generated) or teacher-force the gold target (forced) "
                    "every example of each task with each model, observing every decoder "
                    "layer; writes <output_dir>/traces/<task>/<model>/<kind>/. Finished "
                    "shards are kept, so a rerun resumes.")
    parser.add_argument("--config", required=True, help="suite config (YAML)")
    parser.add_argument("--kind", choices=["generated", "forced", "both"], default="generated",
                        help="generated: the model's own greedy output (default); forced: the "
                             "gold target; both")
    parser.add_argument("--task", action="append", default=None, metavar="NAME",
                        help="only this task of the config (repeatable)")
    parser.add_argument("--model", action="append", default=None, metavar="NAME",
                        help="only this model of the config (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_wait_argument(parser)
    parser.set_defaults(func=run)


def select_named(items, names, what: str, config_path: str):
    """The config items (tasks or models) named on the command line; all when none is;
    an unknown name is a ConfigError with the closest one."""
    from suite.errors import ConfigError
    from suite.registry import closest_names

    if not names:
        return list(items)
    known = [item.name for item in items]
    for name in names:
        if name not in known:
            close = closest_names(name, known, n=1)
            raise ConfigError(f"{config_path}: no {what} named {name!r} in the config"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; it has {', '.join(known) or 'none'}")
    return [item for item in items if item.name in names]


@holding_run_lock
def run(args: argparse.Namespace) -> int:
    from suite.config import ConfigError, load_config
    from suite.record import record_task, trace_dir_for

    config = load_config(args.config)
    if not config.models:
        raise ConfigError(f"{args.config}: models: the config lists no models to record; add "
                          f"e.g. `models: [{{name: tiny, path: runs/models/tiny}}]`")
    tasks = select_named(config.tasks, args.task, "task", args.config)
    models = select_named(config.models, args.model, "model", args.config)
    kinds = ["generated", "forced"] if args.kind == "both" else [args.kind]
    start = time.perf_counter()
    totals = {"written": 0, "skipped": 0, "repaired": 0, "tokens": 0}
    for model in models:
        for task in tasks:
            for kind in kinds:
                summary = record_task(
                    task, model, kind, trace_dir_for(config.output_dir, task.name, model.name,
                                                     kind),
                    data_dir=config.data_dir, device=config.device, dtype=config.dtype,
                    seed=config.seed, batch_size=config.record_batch_size,
                    shard_size=config.shard_size, progress=not args.no_progress)
                repaired = (f", {summary.shards_repaired} corrupted and re-recorded"
                            if summary.shards_repaired else "")
                print(f"{task.name}/{model.name}/{kind}: {summary.shards_written} shard(s) "
                      f"written, {summary.shards_skipped} already done{repaired}; "
                      f"{summary.tokens_written} tokens in {summary.seconds:.1f} s "
                      f"({summary.tokens_per_s:.1f} tokens/s) -> {summary.trace_dir}")
                totals["written"] += summary.shards_written
                totals["skipped"] += summary.shards_skipped
                totals["repaired"] += summary.shards_repaired
                totals["tokens"] += summary.tokens_written
    print(f"record: {totals['written']} shard(s) written, {totals['skipped']} skipped, "
          f"{totals['repaired']} repaired, {totals['tokens']} tokens, "
          f"{time.perf_counter() - start:.1f} s")
    return 0
