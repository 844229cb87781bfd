"""``exitbench leaderboard build|serve``: the static leaderboard site of a run."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "leaderboard", help="build the static leaderboard site of a run, or serve it",
        description="Build a self-contained static site (Pareto fronts per task and hardware "
                    "profile, rankings, measure and profile pages, provenance) from a run's "
                    "results, or serve a built site on 127.0.0.1.")
    actions = parser.add_subparsers(dest="leaderboard_action", metavar="ACTION")
    build = actions.add_parser("build", help="build the site from a run's results")
    build.add_argument("--results", required=True, metavar="DIR",
                       help="run directory (holding results/results.json) or results directory "
                            "(holding results.json)")
    build.add_argument("--out", required=True, metavar="SITE",
                       help="folder to write the site to (replaced when it holds a site built "
                            "earlier; any other non-empty folder is refused)")
    build.add_argument("--within-latency-limits", action="store_true",
                       help="rank only the points within their profile's latency_limits "
                            "(MLPerf-style TTFT / TPOT percentiles)")
    serve = actions.add_parser("serve", help="serve a built site on 127.0.0.1")
    serve.add_argument("--site", required=True, metavar="SITE", help="folder of a built site")
    serve.add_argument("--port", type=int, default=8000,
                       help="port on 127.0.0.1 (default 8000; 0 picks a free one)")
    parser.set_defaults(func=run, _leaderboard_parser=parser)


def run(args: argparse.Namespace) -> int:
    from leaderboard.serve import serve
    from leaderboard.site import build_site_report

    if args.leaderboard_action == "build":
        site = build_site_report(args.results, args.out,
                                 within_latency_limits=args.within_latency_limits)
        print(f"leaderboard  {site.index.resolve()}")
        print(f"  {site.num_rows} result rows, {site.num_panels} panels (task x model x "
              f"profile x batch size), {len(site.pages)} pages")
        if site.notes:
            print("  missing or worth knowing:")
            for note in site.notes:
                print(f"    - {note}")
        print(f"  open {site.index.resolve().as_uri()}")
        print(f"  or   exitbench leaderboard serve --site {args.out}")
        return 0
    if args.leaderboard_action == "serve":
        serve(args.site, args.port)
        return 0
    args._leaderboard_parser.print_help()
    return 2
