"""``exitbench run``: the whole pipeline of a suite config on Ray (local or a cluster)."""

from __future__ import annotations

import argparse

from suite.lock import add_wait_argument, run_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run", help="run a suite config end to end (backbones, record, replay, results, site)",
        description="Run every stage of a suite config as Ray tasks and actors, resuming "
                    "whatever an earlier run finished. Ray starts in-process on 127.0.0.1 "
                    "unless --address (or ray.address in the config) names a cluster.")
    parser.add_argument("--config", required=True, help="suite config (YAML)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: 'auto' or HOST:PORT (overrides the config)")
    parser.add_argument("--workers", type=int, default=None,
                        help="recording workers (overrides ray.record_workers)")
    parser.add_argument("--no-leaderboard", action="store_true", help="skip building the site")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_wait_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suite.config import load_config
    from suite.runner import run_suite

    config = load_config(args.config)
    ray_changes = {}
    if args.address is not None:
        ray_changes["address"] = args.address
    if args.workers is not None:
        ray_changes["record_workers"] = args.workers
    if ray_changes:
        config = config.model_copy(update={"ray": config.ray.model_copy(update=ray_changes)})
    with run_lock(config.output_dir, wait=not args.no_wait):
        summary = run_suite(config, args.config, progress=not args.no_progress,
                            build_leaderboard=False if args.no_leaderboard else None)
    print(summary.format())
    return 0
