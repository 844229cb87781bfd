"""The ``exitbench`` command line: one subcommand per action, each a thin layer over
library functions that the tests call directly.

Subcommands live in ``suite/commands/<name>.py``; each module defines
``register(subparsers)`` which adds its parser and sets ``func``. They are found
by listing that package, so adding a command touches no shared file.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

# OpenMP's default spin-waiting made torch steps up to ~8x slower on a shared 2-core
# machine (measured); it must be set before torch is imported, and Ray workers inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from suite import __version__
from suite import commands as commands_pkg
from suite.errors import ExitbenchError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exitbench",
        description="Benchmark early-exit confidence measures: record traces once, replay "
                    "every measure offline, price it on hardware profiles, publish Pareto fronts.")
    parser.add_argument("--version", action="version", version=f"exitbench {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands_pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ExitbenchError as exc:
        summary = getattr(exc, "summary", None)
        if summary is not None:
            print(summary.format())
        print(f"exitbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"exitbench {args.command}: interrupted; finished work is kept and a rerun "
              f"resumes from it", file=sys.stderr)
        return 130
    except OSError as exc:  # a write outside the atomic helpers (a library's own file)
        from suite.atomic import storage_error

        print(f"exitbench {args.command}: error: {storage_error(exc, exc.filename or '?')}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
