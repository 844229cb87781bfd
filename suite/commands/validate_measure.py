"""``exitbench validate-measure PATH|NAME ...``: check a measure before the suite uses it."""

from __future__ import annotations

import argparse

import yaml

from suite.errors import ExitbenchError
from suite.sandbox import add_sandbox_argument


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate-measure",
        help="check measures (API, finite scores, determinism, causality, declared cost)",
        description="Validate exit measures on random synthetic traces: API conformance, "
                    "declared reads, shape, finiteness, determinism, causality over layers and "
                    "tokens, thresholds and declared cost. Learned measures are fitted first. "
                    "Exits 1 when any check fails.")
    parser.add_argument("measures", nargs="*", metavar="PATH|NAME",
                        help="a .py file defining a Measure subclass (or MEASURE), a registered "
                             "name (see `exitbench ls measures`), or package.module:Class")
    parser.add_argument("--all", action="store_true", help="validate every registered measure")
    parser.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                        help="a constructor option (value parsed as YAML: 3, 0.5, mlp, null); "
                             "repeat for several")
    parser.add_argument("--layers", type=int, default=6,
                        help="decoder layers of the synthetic traces (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic traces and fits")
    parser.add_argument("--json", metavar="PATH", help="also write the reports as JSON")
    parser.add_argument("--config", metavar="CONFIG",
                        help="take the sandbox's settings (limits, mode) from this suite "
                             "config's `sandbox:` section")
    add_sandbox_argument(parser)
    parser.set_defaults(func=run)


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ExitbenchError(f"--option {item!r} is not KEY=VALUE; write e.g. "
                                 f"--option hidden_size=32")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ExitbenchError(f"--option {item!r}: the value is not valid YAML ({exc})") from exc
    return options


def run(args: argparse.Namespace) -> int:
    from suite.atomic import atomic_write_json
    from suite.measures import MEASURES
    from suite.validate import validate_spec

    specs = list(args.measures) + (MEASURES.names() if args.all else [])
    if not specs:
        raise ExitbenchError("name a measure to validate (a .py file or a registered name), or "
                             "pass --all")
    if args.layers < 3:
        raise ExitbenchError(f"--layers {args.layers} is too shallow to test causality; use 3 "
                             f"or more")
    options = parse_options(args.option)
    sandbox = sandbox_settings(args)
    reports = []
    for spec in specs:
        report = validate_spec(spec, options, seed=args.seed, num_layers=args.layers,
                               sandbox=sandbox)
        print(report.format())
        reports.append(report)
    if len(reports) > 1:
        failed = [r.measure for r in reports if not r.passed]
        print(f"\n{len(reports) - len(failed)} of {len(reports)} measures passed"
              + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.json:
        atomic_write_json(args.json, {"passed": all(r.passed for r in reports),
                                      "reports": [r.to_dict() for r in reports]})
    return 0 if all(r.passed for r in reports) else 1


def sandbox_settings(args: argparse.Namespace):
    """The sandbox settings of ``--config`` (default ones without it), ``--sandbox`` applied."""
    from suite.config import SandboxConfig, load_config
    from suite.sandbox import configure

    section = load_config(args.config).sandbox if args.config else SandboxConfig()
    if args.sandbox:
        section = section.model_copy(update={"mode": args.sandbox})
    settings = section.settings()
    configure(settings)
    return settings
