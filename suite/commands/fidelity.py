"""``exitbench fidelity``: replay-predicted against online-measured, side by side."""

from __future__ import annotations

import argparse

from suite.lock import holding_run_lock


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fidelity", help="how far replay can be trusted: replay-predicted and online-measured "
                         "quality and tokens/s side by side, token divergence and where "
                         "replay and online part",
        description="Records the generated traces when missing, replays every measure "
                    "(as `exitbench replay`), decodes online (as "
                    "`exitbench online`, reusing finished measures), sets beside each online "
                    "point the replay of the same "
                    "measures and thresholds over the traces, prices them on the profile of "
                    "`online.profile` (default: the first of `profiles`) and writes "
                    "<output_dir>/fidelity/fidelity.json and fidelity.md.")
    from suite.commands.online import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=run)


@holding_run_lock
def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from suite.commands.online import publish
    from suite.config import load_config
    from suite.fidelity import run_online, write_fidelity_report
    from suite.record import record_task
    from suite.runner import ensure_backbones, record_jobs, replay_suite
    from suite.speculative.sweep import run_methods_online

    config = load_config(args.config)
    ensure_backbones(config, progress=not args.no_progress)
    for job in record_jobs(config):  # the evaluated split, and the fit split if needed
        record_task(job.task, job.model, "generated", job.directory, data_dir=config.data_dir,
                    device=config.device, dtype=config.dtype, seed=config.seed,
                    batch_size=config.record_batch_size, shard_size=config.shard_size,
                    progress=not args.no_progress)
    # the replayed rows of every threshold, so the site sets online points beside them
    replay_suite(config, args.config, progress=not args.no_progress, use_ray=False,
                 build_leaderboard=False)
    report = run_online(config, progress=not args.no_progress)
    run_methods_online(config, report, progress=not args.no_progress)
    print(publish(config, report, build_site=not args.no_leaderboard))
    path = write_fidelity_report(config, Path(config.output_dir) / "fidelity")
    print(path.read_text("utf-8"))
    print(f"  report: {path} (and fidelity.json)")
    return 1 if report.errors and not report.parts_done and not report.parts_reused else 0
