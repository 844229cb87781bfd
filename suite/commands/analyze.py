"""``exitbench analyze``: the study's monotonicity and saturation analyses of a config's
backbones (figures and tables in ``<output_dir>/analysis/<task>/``)."""

from __future__ import annotations

import argparse

from suite.lock import add_wait_argument, holding_run_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze", help="monotonicity and hidden-state saturation analyses (figures, tables)",
        description="Train the config's missing backbones, record missing generated and "
                    "reference-forced traces (resumable), then compute per layer the share "
                    "of stable top-1 predictions, the confidence in the final prediction and "
                    "how often it is non-decreasing, and per sequence the hidden-state "
                    "saturation (easy vs difficult sequences, strictly increasing "
                    "similarity). Writes <output_dir>/analysis/<task>/: PNG and SVG figures "
                    "with every backbone on the same axes, CSV and JSON tables, summary.json "
                    "and README.md. Settings: the config's `analysis` section.")
    parser.add_argument("--config", required=True, help="suite config (YAML)")
    parser.add_argument("--model", action="append", default=None, metavar="NAME",
                        help="only this model of the config (repeatable; figures then show "
                             "only these)")
    parser.add_argument("--task", action="append", default=None, metavar="NAME",
                        help="only this task of the config (repeatable)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for training and recording (default: torch's "
                             "choice)")
    parser.add_argument("--no-leaderboard", action="store_true",
                        help="do not rebuild <output_dir>/site even when the run has results")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_wait_argument(parser)
    parser.set_defaults(func=run)


@holding_run_lock
def run(args: argparse.Namespace) -> int:
    from suite.analysis import analyse_config
    from suite.commands.record import select_named
    from suite.config import ConfigError, load_config

    config = load_config(args.config)
    if not config.models:
        raise ConfigError(f"{args.config}: models: the config lists no models to analyse; add "
                          f"e.g. `models: [{{name: tiny, path: runs/models/tiny}}]`")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    tasks = select_named(config.tasks, args.task, "task", args.config)
    models = select_named(config.models, args.model, "model", args.config)
    result = analyse_config(config, models=models, tasks=tasks, progress=not args.no_progress,
                            build_leaderboard=False if args.no_leaderboard else None)
    if result.backbones is not None and (result.backbones.done or result.backbones.notes):
        print(result.backbones.line())
    for record in result.records:
        print(f"traces {record.task}/{record.model}/{record.kind}: {record.shards_written} "
              f"shard(s) recorded, {record.shards_skipped} already there")
    for task, folder in result.task_dirs.items():
        print(f"analysis {task}: {folder}")
        for item in result.summaries[task]["analyses"]:
            groups = item["groups"]
            stable = item["stable_fraction"]
            print(f"  {item['model']:<16} {item['kind']:<9} stable top-1 at layer 0: "
                  f"{stable[0]:.2f}, at {len(stable) - 2}: {stable[-2]:.2f}; easy/difficult "
                  f"K={item['k']} mean similarity {groups['easy']['mean_similarity']} / "
                  f"{groups['difficult']['mean_similarity']}")
    if result.site_index is not None:
        print(f"leaderboard: open {result.site_index}")
    return 0
