"""Serve a built site on 127.0.0.1 only (``http.server``), for viewing and browser tests."""

from __future__ import annotations

import functools
import http.server
from pathlib import Path

from leaderboard.inputs import LeaderboardError

HOST = "127.0.0.1"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        if self.server.log_requests:  # type: ignore[attr-defined]
            super().log_message(format, *args)


def make_server(site_dir: str | Path, port: int = 8000,
                log_requests: bool = True) -> http.server.ThreadingHTTPServer:
    """A server for ``site_dir`` bound to 127.0.0.1 (``port`` 0 picks a free port); call
    ``serve_forever()`` on it, ``shutdown()`` to stop."""
    site_dir = Path(site_dir)
    if not (site_dir / "index.html").is_file():
        raise LeaderboardError(f"--site {site_dir}: no index.html; build the site first with "
                               f"`exitbench leaderboard build --results RUN --out {site_dir}`")
    handler = functools.partial(_QuietHandler, directory=str(site_dir.resolve()))
    try:
        server = http.server.ThreadingHTTPServer((HOST, port), handler)
    except OSError as exc:
        raise LeaderboardError(f"--port {port}: cannot listen on {HOST}:{port} ({exc.strerror}); "
                               f"choose another port, or --port 0 for any free one") from exc
    server.log_requests = log_requests  # type: ignore[attr-defined]
    server.daemon_threads = True
    return server


def url_of(server: http.server.HTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/index.html"


def serve(site_dir: str | Path, port: int = 8000) -> None:
    """Serve until interrupted, printing the URL first."""
    server = make_server(site_dir, port)
    print(f"serving {Path(site_dir).resolve()} at {url_of(server)} (127.0.0.1 only; Ctrl-C "
          f"stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
