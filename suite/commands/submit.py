"""``exitbench submit``: validate a researcher's measure, then replay it over the stored
traces of a run, adding its rows (with its code hash) to the run's results."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit", help="validate a measure file and replay it over a run's stored traces")
    parser.add_argument("path", help="a .py file defining a Measure, or package.module:Class")
    parser.add_argument("--config", required=True,
                        help="the suite config whose traces to replay over (already recorded)")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a constructor option (value parsed as JSON, else a string)")
    parser.add_argument("--no-leaderboard", action="store_true")
    parser.set_defaults(func=run)


def parse_options(pairs: list[str]) -> dict:
    from suite.errors import ExitbenchError

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ExitbenchError(f"option {pair!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run(args: argparse.Namespace) -> int:
    from suite.config import MeasureConfig, load_config
    from suite.errors import ExitbenchError
    from suite.measures import MEASURES
    from suite.runner import replay_suite
    from suite.validate import load_measure, validate_measure

    loaded = load_measure(args.path)
    options = parse_options(args.option)
    report = validate_measure(loaded.measure_cls, options, source=loaded.source,
                              expected_name=loaded.expected_name)
    print(report.format())
    if not report.passed:
        print("submission rejected: fix the failing checks above; nothing was replayed")
        return 1
    name = loaded.measure_cls.name
    if name not in MEASURES:
        MEASURES.register(name, loaded.measure_cls, source=f"submission:{loaded.source}")
    elif MEASURES.get(name) is not loaded.measure_cls:
        raise ExitbenchError(f"a measure named {name!r} is already registered; give yours "
                             f"another name")
    config = load_config(args.config)
    measures = [m for m in config.measures if m.name != name] + \
        [MeasureConfig(name=name, options=options)]
    config = config.model_copy(update={"measures": measures})
    # in-process: Ray workers would not know a measure loaded from a file
    summary = replay_suite(config, args.config, use_ray=False,
                           build_leaderboard=False if args.no_leaderboard else None)
    print(summary.format())
    return 0
