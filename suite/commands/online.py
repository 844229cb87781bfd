"""``exitbench online``: real early-exit decoding of the config's measures, measured."""

from __future__ import annotations

import argparse

from suite.lock import add_wait_argument, holding_run_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "online", help="decode the config's tasks with real early exits per measure and "
                       "threshold; measure quality and tokens/s on the config's device",
        description="For each task, model and measure: greedy decoding that exits each token "
                    "at the first layer whose score reaches the threshold (CALM or FREE state "
                    "propagation), timed beside full-depth decoding of the same examples. "
                    "Rows (mode: online) join the run's results; finished measures are reused "
                    "on a rerun. Settings: the config's `online:` section.")
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `online` and `fidelity` share."""
    parser.add_argument("--config", required=True, help="suite config (YAML)")
    parser.add_argument("--no-leaderboard", action="store_true", help="skip building the site")
    parser.add_argument("--no-progress", action="store_true")
    add_wait_argument(parser)


@holding_run_lock
def run(args: argparse.Namespace) -> int:
    from suite.config import load_config
    from suite.fidelity import run_online
    from suite.speculative.sweep import run_methods_online

    config = load_config(args.config)
    report = run_online(config, progress=not args.no_progress)
    run_methods_online(config, report, progress=not args.no_progress)
    print(publish(config, report, build_site=not args.no_leaderboard))
    return 1 if report.errors and not report.parts_done and not report.parts_reused else 0


def publish(config, report, *, build_site: bool) -> str:
    """Merge the online rows into the run's results (and site); a summary of what ran."""
    from pathlib import Path

    from suite.fidelity import fidelity_entries
    from suite.runner import publish_results

    rows = publish_results(config)
    lines = [f"online: {report.parts_done} measure(s) decoded, {report.parts_reused} reused, "
             f"{len(report.errors or {})} failed, {report.seconds:.1f} s"]
    for label, error in (report.errors or {}).items():
        lines.append(f"  failed {label}: {error}")
    lines.append(f"{'task':<14} {'measure':<24} {'thr':>8} {'batch':>5} {'quality':>8} "
                 f"{'tokens/s':>9} {'speedup':>8} {'layers':>6}")
    for e in fidelity_entries(config):
        lines.append(f"{e['task']:<14} {e['measure']:<24} {e['threshold']:>8.4g} "
                     f"{e['batch_size']:>5} {e['online_quality']:>8.2f} "
                     f"{e['online_tokens_per_s']:>9.1f} {e['realised_speedup']:>8.2f} "
                     f"{e['online_mean_layers']:>6.2f}")
    lines.append(f"  results: {config.output_dir}/results/results.json ({rows} rows, online "
                 f"ones with mode: online)")
    if build_site and config.leaderboard:
        from leaderboard import build_site as build

        index = build(Path(config.output_dir), Path(config.output_dir) / "site")
        lines.append(f"  leaderboard: {index}")
    return "\n".join(lines)
