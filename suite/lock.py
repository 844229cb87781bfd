"""The run directory's lock: one writer at a time.

Every command that writes a run directory (``run``, ``record``, ``replay``, ``submit``,
``online``, ``fidelity``, ``analyze``, ...) holds an exclusive lock on
``<output_dir>/.exitbench.lock`` while it works. The lock is an ``flock`` on that file, so
the kernel releases it when its holder exits, however it exits (a SIGKILL included): a lock
can never be left behind by a dead process. The file also names its holder (pid, host,
command, start time), so a second writer says who it is waiting for; when the named holder is
gone (a stale record), the new holder says so and takes over.

A second writer waits by default (printing the holder once, then every minute) or, with
``wait=False`` (``--no-wait`` on the command line), stops at once with
:class:`RunLockedError`. The lock is re-entrant within a process: a library call that takes it
inside a command that already holds it (``submit`` -> ``replay_suite``) just goes on.
Shared files that several commands merge into (``results/``, ``submissions/``) are only ever
read, merged and written under this lock, so no writer's work is lost.

Processes a holder starts (Ray workers, sandboxes) do not inherit the lock (Python opens files
close-on-exec), so a worker that outlives a killed driver never keeps the directory locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from suite.errors import ExitbenchError

LOCK_FILE = ".exitbench.lock"
WAIT_NOTICE_SECONDS = 60.0
"""How often a waiting writer repeats who it is waiting for."""
POLL_SECONDS = 0.2


class RunLockedError(ExitbenchError):
    """Another process holds the run directory's lock and the caller would not wait."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a run directory's lock, as its lock file says."""

    pid: int
    host: str
    command: str
    started_at: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (`{self.command}`, since {self.started_at})"

    def alive(self) -> bool | None:
        """Whether the process still runs; ``None`` when it ran on another host."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


_held: dict[str, tuple[int, int]] = {}
"""Real path of a lock file -> (file descriptor, depth) of the locks this process holds."""


def read_holder(path: Path) -> LockHolder | None:
    try:
        data = json.loads(path.read_text("utf-8"))
        return LockHolder(pid=int(data["pid"]), host=str(data["host"]),
                          command=str(data["command"]), started_at=str(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _command_line() -> str:
    program = os.path.basename(sys.argv[0]) if sys.argv else "python"
    if program in ("exitbench", "cli.py", "__main__.py"):  # the console script or -m suite.cli
        program = "exitbench"
    return " ".join([program] + sys.argv[1:])[:300]


def _write_holder(fd: int) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)  # informational: no fsync needed


@contextlib.contextmanager
def run_lock(output_dir: str | Path, *, wait: bool = True,
             notify: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``output_dir`` (created if missing) for the ``with`` body.

    ``wait=False`` raises :class:`RunLockedError` naming the holder instead of waiting.
    ``notify`` receives the one-line notices (waiting, a stale holder taken over); by default
    they go to standard error."""
    from suite.atomic import storage_error

    say = notify or (lambda line: print(line, file=sys.stderr, flush=True))
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        key = os.path.realpath(path)
    except OSError as exc:
        raise storage_error(exc, folder) from exc
    if key in _held:  # re-entrant within this process
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield path
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise storage_error(exc, path) from exc
    try:
        _acquire(fd, path, wait, say)
        previous = read_holder(path)
        if previous is not None and previous.pid != os.getpid() and previous.alive() is False:
            say(f"exitbench: {folder}: the last holder of its lock, {previous.describe()}, "
                f"ended without releasing it (killed?); taking over. Its finished work is kept "
                f"and this command resumes from it")
        try:
            _write_holder(fd)
        except OSError as exc:
            raise storage_error(exc, path) from exc
        _held[key] = (fd, 1)
        try:
            yield path
        finally:
            del _held[key]
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # nobody holds it now
    finally:
        os.close(fd)  # releases the flock


def _acquire(fd: int, path: Path, wait: bool, say: Callable[[str], None]) -> None:
    started = time.monotonic()
    last_notice = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = read_holder(path)
        who = holder.describe() if holder else "another process (it has not named itself yet)"
        if not wait:
            raise RunLockedError(
                f"{path.parent} is in use by {who}; one command at a time may write a run "
                f"directory. Wait for it to finish (or rerun without --no-wait to wait), or "
                f"choose another output_dir")
        now = time.monotonic()
        if last_notice is None or now - last_notice >= WAIT_NOTICE_SECONDS:
            waited = "" if last_notice is None else f" (waited {now - started:.0f} s)"
            say(f"exitbench: {path.parent} is in use by {who}; waiting for it to finish"
                f"{waited}. Ctrl-C stops waiting; nothing is lost")
            last_notice = now
        time.sleep(POLL_SECONDS)


def add_wait_argument(parser) -> None:
    """``--no-wait`` on a command that writes a run directory."""
    parser.add_argument("--no-wait", action="store_true",
                        help="stop at once (exit 2, naming the holder) when another command "
                             "holds the run directory's lock, instead of waiting for it")


def holding_run_lock(command: Callable) -> Callable:
    """Decorate a subcommand's ``run(args)`` so it holds the lock of ``args.config``'s
    ``output_dir`` (honouring ``--no-wait``) while it runs."""
    import functools

    @functools.wraps(command)
    def locked(args) -> int:
        from suite.config import load_config

        config = load_config(args.config)
        with run_lock(config.output_dir, wait=not getattr(args, "no_wait", False)):
            return command(args)
    return locked
