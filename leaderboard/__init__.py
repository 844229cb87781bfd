"""The static leaderboard: build a self-contained site from a run's results, and serve it.

``build_site(results_dir, out_dir)`` is the library entry point (the quickstart ends with it);
``exitbench leaderboard build|serve`` is the command line. See ``docs/leaderboard.md``.
"""

from leaderboard.serve import make_server, serve
from leaderboard.site import build_site, build_site_report

__all__ = ["build_site", "build_site_report", "make_server", "serve"]
