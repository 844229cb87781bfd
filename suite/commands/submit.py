"""``exitbench submit``: validate a researcher's measure in the sandbox, store it in the run,
and replay it over the run's stored traces, adding its rows to the run's results and site.

The measure's file is never imported by this process: validation, fitting and scoring run in
the sandbox (:mod:`suite.sandbox`). A stored submission stays in the run
(``<output_dir>/submissions/``): later runs, replays and leaderboard builds include it.
Exits 0 only when the measure passed validation and produced result rows; otherwise 1, with
the reason (a failed check, a failure on the real traces, no traces recorded yet)."""

from __future__ import annotations

import argparse
import time

from suite.commands.validate_measure import parse_options
from suite.lock import add_wait_argument
from suite.sandbox import add_sandbox_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit", help="validate a measure file in the sandbox, store it in the run and "
                       "replay it over the run's stored traces")
    parser.add_argument("path", help="a .py file defining a Measure, or package.module:Class")
    parser.add_argument("--config", required=True,
                        help="the suite config whose traces to replay over (already recorded "
                             "by `exitbench run`)")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a constructor option (value parsed as YAML: 3, 0.5, mlp, null); "
                             "repeat for several")
    parser.add_argument("--replace", action="store_true",
                        help="replace a stored submission of the same name (other code or "
                             "options)")
    add_sandbox_argument(parser)
    add_wait_argument(parser)
    parser.add_argument("--no-leaderboard", action="store_true")
    parser.set_defaults(func=run)


def _step(text: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    from suite.config import MeasureConfig, load_config
    from suite.lock import run_lock
    from suite.runner import (
        _part_path,
        describe_measure_class,
        read_part,
        replay_suite,
        validate_configured,
        with_submissions,
    )
    from suite.sandbox import configure
    from suite.submissions import SubmissionStore
    from suite.validate import ValidationReport, load_measure

    started = time.perf_counter()
    config = load_config(args.config)
    if args.sandbox:
        config = config.model_copy(update={"sandbox": config.sandbox.model_copy(
            update={"mode": args.sandbox})})
    options = parse_options(args.option)
    sandbox = config.sandbox.settings()
    configure(sandbox)
    with run_lock(config.output_dir, wait=not args.no_wait):
        _step(f"loading {args.path} in the sandbox ({sandbox.mode})", started)
        loaded = load_measure(args.path, sandbox)
        measure_cls = loaded.measure_cls
        name = str(getattr(measure_cls, "name", "") or "")
        measure = MeasureConfig(name=name or "unnamed", options=options)
        _step(f"validating {name or args.path}", started)
        data, _ = validate_configured(config, measure, measure_cls)
        report = ValidationReport.from_dict(data)
        print(report.format())
        if not report.passed:
            measure_cls.session.close()
            print("submission rejected: fix the failing checks above; nothing was stored or "
                  "replayed")
            return 1
        declared = describe_measure_class(measure_cls, measure, config)
        measure_cls.session.close()
        source_text = submitted_source(measure_cls, args.path)
        store = SubmissionStore(config.output_dir)
        submission, outcome = store.add(name, source_text, options, str(args.path), declared,
                                        replace=args.replace)
        _step(f"submission {name!r} {outcome} in {submission.folder}", started)
        _step("replaying it over the run's traces (and every measure not replayed yet)",
              started)
        summary = replay_suite(config, args.config, use_ray=False,
                               build_leaderboard=False if args.no_leaderboard else None)
        print(summary.format())
        config = with_submissions(config)
        rows, reasons = 0, []
        for task in config.tasks:
            for model in config.models:
                part = read_part(_part_path(config.output_dir, task.name, model.name, name))
                if part is None:
                    reasons.append(f"{task.name}/{model.name}: not replayed (see the summary)")
                elif "failed" in part:
                    reasons.append(f"{task.name}/{model.name}: {part['failed']}")
                else:
                    rows += len(part.get("rows", []))
    if rows == 0:
        print(f"submission {name!r} produced no result rows: " + "; ".join(reasons)
              + ". It stays stored; fix the measure and submit it again with --replace")
        return 1
    where = f"; leaderboard: {summary.site_index}" if summary.site_index else ""
    failed = f" (failed on {'; '.join(reasons)})" if reasons else ""
    _step(f"{name!r}: {rows} result rows{failed}{where}", started)
    return 0


def submitted_source(measure_cls, path: str) -> str:
    """The text of the submitted file, as the sandbox loaded it (an importable
    ``module:Class`` cannot be stored in a run: install it as a plugin instead)."""
    from suite.errors import ExitbenchError

    code = getattr(measure_cls, "code", None)
    if code is None or code.kind != "file":
        raise ExitbenchError(f"{path}: only a .py file can be submitted into a run (it is "
                             f"stored there); an installed plugin is included through its "
                             f"entry point instead")
    return code.source_text
