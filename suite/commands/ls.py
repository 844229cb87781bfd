"""``exitbench ls tasks|measures|profiles``: what the registries hold."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ls", help="list registered tasks, measures or hardware profiles")
    parser.add_argument("what", choices=["tasks", "measures", "profiles"])
    parser.set_defaults(func=run)


def describe(what: str) -> list[tuple[str, str, str]]:
    """Rows of (name, source, one-line description)."""
    rows = []
    if what == "tasks":
        from suite.tasks import TASKS
        for name in TASKS.names():
            task = TASKS.get(name)
            rows.append((name, TASKS.source(name), f"[{task.metric}] {task.description}"))
    elif what == "measures":
        from suite.measures import MEASURES
        for name in MEASURES.names():
            measure = MEASURES.get(name)
            flag = "" if measure.deployable else " (not deployable)"
            rows.append((name, MEASURES.source(name), measure.description + flag))
    else:
        from suite.profiles import PROFILES
        for name in PROFILES.names():
            profile = PROFILES.get(name)
            rows.append((name, PROFILES.source(name), f"[{profile.kind}] {profile.description}"))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = describe(args.what)
    if not rows:
        print(f"no {args.what} registered")
        return 0
    width = max(len(r[0]) for r in rows)
    for name, source, text in rows:
        print(f"{name:<{width}}  {text}" + ("" if source == "builtin" else f"  ({source})"))
    return 0
