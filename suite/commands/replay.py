"""``exitbench replay``: replay every measure of a config over its recorded traces."""

from __future__ import annotations

import argparse

from suite.lock import add_wait_argument, run_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "replay", help="validate, fit, replay, score and price the config's measures over "
                       "recorded traces; write results (Parquet + JSON) and fronts")
    parser.add_argument("--config", required=True, help="suite config (YAML)")
    parser.add_argument("--no-ray", action="store_true", help="replay in this process")
    parser.add_argument("--no-leaderboard", action="store_true", help="skip building the site")
    parser.add_argument("--no-progress", action="store_true")
    add_wait_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suite.config import load_config
    from suite.runner import replay_suite

    config = load_config(args.config)
    with run_lock(config.output_dir, wait=not args.no_wait):
        summary = replay_suite(config, args.config, progress=not args.no_progress,
                               use_ray=not args.no_ray,
                               build_leaderboard=False if args.no_leaderboard else None)
    print(summary.format())
    print(f"  results: {config.output_dir}/results/results.parquet, results.json, fronts.json")
    return 0
