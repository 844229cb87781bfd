"""``exitbench calibrate``: thresholds with a statistical guarantee (CALM's Learn-then-Test)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="choose each calibration target's threshold by Learn-then-Test on "
                          "the calibration split; report test risk, speedup and validity",
        description="For every target of the config's `calibration:` section and every task "
                    "with a calibration_split: the most aggressive threshold whose risk "
                    "(textual or risk consistency with the full model) is at most epsilon "
                    "with probability at least 1 - delta, by fixed-sequence testing from the "
                    "safest threshold down. Trains and records what is missing first. The "
                    "chosen points join the results (and the leaderboard) as their own "
                    "series; calibration/calibration.md holds the report.")
    parser.add_argument("--config", required=True, help="suite config (YAML)")
    parser.add_argument("--no-leaderboard", action="store_true", help="skip building the site")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from suite.calibration import format_report, run_calibration
    from suite.config import ConfigError, load_config
    from suite.runner import (
        ensure_backbones,
        init_ray,
        publish_results,
        run_record_stage,
        run_validate_stage,
    )

    config = load_config(args.config)
    if config.calibration is None:
        raise ConfigError(f"{args.config}: calibration: the config has no `calibration:` "
                          f"section; add targets, e.g. `calibration: {{targets: [{{measure: "
                          f"softmax_margin, risk: consistency_01, epsilon: 0.1, delta: 0.1}}]}}` "
                          f"and tasks[].calibration_split")
    progress = not args.no_progress
    print(ensure_backbones(config, progress=progress).line())
    started = init_ray(config.ray.address, config.ray.num_cpus)
    try:
        print(run_record_stage(config, progress=progress).line())
    finally:
        if started:
            import ray

            ray.shutdown()
    validated, config = run_validate_stage(config)
    print(validated.line())
    report = run_calibration(config)
    print(format_report(report), end="")
    rows = publish_results(config)
    print(f"calibration: {report.done} calibrated, {report.reused} reused, "
          f"{len(report.errors)} failed, {report.seconds:.1f} s; report "
          f"{config.output_dir}/calibration/calibration.md; results {rows} rows")
    if not args.no_leaderboard and config.leaderboard:
        from leaderboard import build_site

        index = build_site(Path(config.output_dir), Path(config.output_dir) / "site")
        print(f"leaderboard: open {index}")
    return 1 if report.errors and not (report.done or report.reused) else 0
