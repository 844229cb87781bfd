"""Isolation of submitted code: measures that are not built in run in a sandbox process.

The engine never imports a submitted measure (a file given to ``submit`` or
``validate-measure``, a submission stored in a run, a plugin from the ``exitbench.measures``
entry points). :func:`isolated_measure_class` starts a :class:`SandboxSession` -- one worker
process (:mod:`suite.sandbox.worker`) per measure class -- and returns a :class:`Measure`
subclass whose attributes are the submitted class's and whose methods (building an instance,
``fit``, ``scores``, ``thresholds_for``, ``checked_layers``, ``check_cost``) are requests to
that worker. Validation, fitting and replay use that class like any other, so every check the
engine makes on a measure (validation, the real-trace checks of the replay stage) is made by
the engine on what the worker sends back.

What the sandbox guarantees (``mode: bwrap``, the default; bubblewrap from Debian's package
``bubblewrap``, which ``scripts/setup.sh`` installs):

- **files**: the whole file system is mounted read-only; the home folder is hidden (only the
  Python installation and the suite are mounted back, read-only); ``/tmp`` is an empty private
  tmpfs; the session's scratch folder is the one writable place, and the input folder (the
  traces sent for one request) is read-only. Nothing outside the scratch folder can be
  created, changed or deleted; the scratch folder is removed when the session ends.
- **network**: a new, empty network namespace (no interface but a down loopback), and the
  ``socket`` system call is denied.
- **processes**: a new PID namespace; ``fork``, ``vfork``, ``execve`` and ``clone`` without
  ``CLONE_THREAD`` are denied by a seccomp filter (threads are allowed); the worker dies with
  the engine (``--die-with-parent``); no capabilities; a new session (no terminal access).
- **resources**: address space (``memory_bytes``), CPU time (``cpu_seconds``), size of any file
  written (``file_bytes``) by ``setrlimit``, and a wall-clock limit per request
  (``call_seconds``), after which the worker is killed. A request that runs long reports its
  progress every :data:`PROGRESS_SECONDS` seconds.
- **environment**: a cleared environment (no tokens or credentials of the user's leak in).

What it does not: it does not stop a measure from reading files that every user of the
machine may read, from using the CPU up to its limits, or from returning wrong scores (the
engine checks shape, dtype and finiteness of what comes back, and validation checks
causality and determinism on what comes back).

On a machine without bubblewrap, submitted code is refused with :class:`SandboxUnavailable`,
which says how to install it. ``mode: process`` (config ``sandbox: {mode: process}``, or
``--sandbox process``) runs the worker as a plain subprocess with the same resource limits,
cleared environment and system-call filter (so no new processes and no sockets), but
**without** the file-system and namespace isolation: the measure can then write wherever the
user can. Choose it only for code you trust.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from suite.errors import ExitbenchError
from suite.measures import CheckCost, Measure, ModelDims

logger = logging.getLogger(__name__)

PROGRESS_SECONDS = 15.0
"""A request running longer says so this often (with its limit)."""
STDERR_TAIL_LINES = 40


class SandboxUnavailable(ExitbenchError):
    """The sandbox cannot run on this machine (bubblewrap missing or not working)."""


class SandboxedError(ExitbenchError):
    """A request to a sandboxed measure failed: the measure raised, broke a limit, or its
    worker ended. Subclasses are named after the measure's own exception type (``ValueError``
    ...), so reports read as they would in-process."""


class SandboxLimitError(SandboxedError):
    """The measure broke a wall-clock, CPU-time or memory limit and its worker was stopped."""


@dataclass(frozen=True)
class SandboxSettings:
    """How submitted code is isolated (config ``sandbox:``; ``docs/measures.md``)."""

    mode: Literal["bwrap", "process"] = "bwrap"
    memory_bytes: int = 8 << 30
    """Address-space limit of the worker (``RLIMIT_AS``); numpy raises MemoryError past it."""
    cpu_seconds: int = 3600
    """CPU-time limit of the worker over its whole life (``RLIMIT_CPU``)."""
    call_seconds: float = 600.0
    """Wall-clock limit of one request (``scores`` over a split's traces, one fit, ...)."""
    validation_call_seconds: float = 120.0
    """Wall-clock limit of one request during validation (synthetic traces are small)."""
    file_bytes: int = 2 << 30
    """Largest file the worker may write in its scratch folder (``RLIMIT_FSIZE``)."""
    threads: int = 1
    """``OMP_NUM_THREADS`` and friends inside the worker."""


@dataclass(frozen=True)
class MeasureCode:
    """Submitted code to run in a sandbox: a ``.py`` file's text, or an importable class."""

    kind: Literal["file", "import"]
    origin: str
    """Where it came from, for reports: a path, ``submission:<path>``, ``plugin:<dist>``."""
    source_text: str | None = None
    """The ``.py`` file's text (``kind == "file"``)."""
    file_name: str = "measure.py"
    import_spec: str | None = None
    """``package.module:Class`` (``kind == "import"``), imported inside the sandbox."""

    @property
    def sha256(self) -> str:
        """The code's hash, which result rows and stored work are keyed by."""
        if self.kind == "file":
            return hashlib.sha256((self.source_text or "").encode("utf-8")).hexdigest()
        return _import_spec_hash(self.import_spec or "")

    @staticmethod
    def from_file(path: str | Path, origin: str | None = None) -> MeasureCode:
        path = Path(path)
        if not path.is_file():
            raise ExitbenchError(f"measure file {path} does not exist; give the path of a .py "
                                 f"file or a registered name (see `exitbench ls measures`)")
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ExitbenchError(f"measure file {path} cannot be read as UTF-8 text ({exc})"
                                 ) from exc
        return MeasureCode(kind="file", origin=origin or str(path), source_text=text,
                           file_name=path.name if path.suffix == ".py" else "measure.py")


_default_settings = SandboxSettings()


def default_settings() -> SandboxSettings:
    """The settings plugins are sandboxed with in this process (:func:`configure`)."""
    return _default_settings


def configure(settings: SandboxSettings) -> None:
    """Set :func:`default_settings` (the runner does, from the config's ``sandbox:``)."""
    global _default_settings
    _default_settings = settings


def add_sandbox_argument(parser) -> None:
    """``--sandbox bwrap|process`` on a command that loads submitted code."""
    parser.add_argument("--sandbox", choices=["bwrap", "process"], default=None,
                        help="isolation of submitted code (default: the config's sandbox.mode, "
                             "bwrap); 'process' keeps the limits and the system-call filter "
                             "but does not isolate files: only for code you trust")


def _import_spec_hash(spec: str) -> str:
    """SHA-256 of the file that defines ``package.module`` (found without importing it)."""
    import importlib.util

    module = spec.partition(":")[0]
    digest = hashlib.sha256(spec.encode("utf-8"))
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is not None and found.origin and os.path.isfile(found.origin):
        digest.update(Path(found.origin).read_bytes())
    return digest.hexdigest()


# -- the sandbox command -----------------------------------------------------------------------
def bwrap_path() -> str | None:
    return shutil.which("bwrap")


_checked: dict[str, str | None] = {}


def sandbox_problem(settings: SandboxSettings) -> str | None:
    """Why submitted code cannot run with ``settings`` here (``None``: it can)."""
    if settings.mode == "process":
        return None
    if settings.mode != "bwrap":
        return f"unknown sandbox mode {settings.mode!r}; use bwrap or process"
    binary = bwrap_path()
    if binary is None:
        return ("bubblewrap (bwrap) is not installed, and submitted measures run only inside "
                "it. Install it (Debian/Ubuntu: `apt-get install bubblewrap`; "
                "scripts/setup.sh does this), or, for code you trust, choose the weaker "
                "`sandbox: {mode: process}` (docs/measures.md says what it does not protect)")
    if binary not in _checked:
        try:
            probe = subprocess.run([binary, "--ro-bind", "/", "/", "--dev", "/dev", "--proc",
                                    "/proc", "--unshare-all", "--die-with-parent", "--",
                                    "/bin/true"], capture_output=True, text=True, timeout=30)
            _checked[binary] = None if probe.returncode == 0 else (
                f"bubblewrap ({binary}) does not run here: {probe.stderr.strip()[:300]}. On a "
                f"machine that forbids unprivileged namespaces, run as a user allowed to create "
                f"them, or choose `sandbox: {{mode: process}}` for code you trust")
        except (OSError, subprocess.TimeoutExpired) as exc:
            _checked[binary] = f"bubblewrap ({binary}) could not be started: {exc}"
    return _checked[binary]


def _python_roots() -> list[str]:
    """Folders the worker needs to import the suite, Python and its packages."""
    import suite

    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)),
             str(Path(suite.__file__).resolve().parents[1])}
    roots.update(p for p in sys.path if p and os.path.isdir(p))
    return sorted({os.path.realpath(r) for r in roots} | roots)


def _environment(scratch: Path, settings: SandboxSettings) -> dict[str, str]:
    threads = str(settings.threads)
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(scratch), "LANG": "C.UTF-8",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1",
            "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
            "OPENBLAS_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE",
            "TOKENIZERS_PARALLELISM": "false", "EXITBENCH_SANDBOX": "1",
            "EXITBENCH_SANDBOX_SCRATCH": str(scratch)}


def sandbox_command(session_dir: Path, settings: SandboxSettings) -> list[str]:
    """The command line that starts a worker for ``session_dir`` (``in/`` read-only,
    ``scratch/`` writable)."""
    worker = [sys.executable, "-I", "-m", "suite.sandbox.worker"]
    if settings.mode == "process":
        return worker
    inputs, scratch = session_dir / "in", session_dir / "scratch"
    command = [bwrap_path() or "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc",
               "/proc", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop",
               "ALL"]
    # /tmp and the home folder are hidden behind empty tmpfs; what the worker needs to run
    # (Python, its packages, the suite) is mounted back read-only where it lies inside them
    hidden = ["/tmp"]
    home = os.path.realpath(os.path.expanduser("~"))
    if home not in ("/", "", "/tmp") and os.path.isdir(home) and not home.startswith("/tmp/"):
        hidden.append(home)
    for folder in hidden:
        command += ["--tmpfs", folder]
    for root in _python_roots():
        if any(root.startswith(folder + os.sep) for folder in hidden):
            command += ["--ro-bind", root, root]
    command += ["--ro-bind", str(inputs), str(inputs), "--bind", str(scratch), str(scratch),
                "--chdir", str(scratch), "--clearenv"]
    for key, value in _environment(scratch, settings).items():
        command += ["--setenv", key, value]
    return command + ["--"] + worker


def _limit_resources(settings: SandboxSettings):
    def apply() -> None:  # runs in the child, before exec
        resource.setrlimit(resource.RLIMIT_AS, (settings.memory_bytes, settings.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (settings.cpu_seconds, settings.cpu_seconds + 5))
        resource.setrlimit(resource.RLIMIT_FSIZE, (settings.file_bytes, settings.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


# -- a session -----------------------------------------------------------------------------------
class SandboxSession:
    """One worker process serving one submitted measure's requests, in order."""

    def __init__(self, code: MeasureCode, settings: SandboxSettings, label: str):
        problem = sandbox_problem(settings)
        if problem is not None:
            raise SandboxUnavailable(f"measure {label!r} ({code.origin}) is not built in, so it "
                                     f"must run isolated, but {problem}")
        self.code = code
        self.settings = settings
        self.mode = settings.mode
        self.label = label
        self.dir = Path(tempfile.mkdtemp(prefix="exitbench-sandbox-"))
        (self.dir / "in").mkdir()
        (self.dir / "scratch").mkdir()
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.dead: str | None = None
        self.call_seconds = settings.call_seconds
        self._counter = 0
        self._lock = threading.Lock()
        env = _environment(self.dir / "scratch", settings)
        self.process = subprocess.Popen(
            sandbox_command(self.dir, settings), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=self.dir / "scratch", env=env,
            preexec_fn=_limit_resources(settings), start_new_session=True)
        self._reader = threading.Thread(target=self._drain_stderr, daemon=True)
        self._reader.start()
        self._buffer = b""
        _SESSIONS.add(self)

    def _drain_stderr(self) -> None:
        for raw in iter(self.process.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            self.stderr_tail.append(line)
            logger.debug("sandbox %s: %s", self.label, line)

    # -- inputs --------------------------------------------------------------------------
    def input_folder(self) -> Path:
        if self.dead:
            raise SandboxedError(f"measure {self.label!r}: its sandbox was stopped earlier "
                                 f"({self.dead})")
        self._counter += 1
        folder = self.dir / "in" / f"request-{self._counter}"
        folder.mkdir()
        return folder

    def write_traces(self, traces, fields: set[str]) -> Path:
        """The listed fields of ``traces`` as ``.npy`` files in a new input folder."""
        folder = self.input_folder()
        for name in sorted(fields):
            value = getattr(traces, name, None)
            if value is None:
                continue
            array = np.asarray(value)
            if name == "example_id":
                array = array.astype(str)
            np.save(folder / f"{name}.npy", array, allow_pickle=False)
        return folder

    def read_array(self, reply: Any) -> Any:
        """An array the worker wrote, checked to be a plain ``.npy`` in its scratch folder;
        a marker object when it returned something else (the engine's checks report it)."""
        if not isinstance(reply, dict):
            raise SandboxedError(f"measure {self.label!r}: the sandbox sent {reply!r} instead "
                                 f"of an array")
        if "not_array" in reply:
            return _stand_in(str(reply["not_array"]))
        if "object_array" in reply:
            return np.empty(tuple(int(n) for n in reply["object_array"]), dtype=object)
        path = Path(str(reply.get("path", "")))
        scratch = (self.dir / "scratch").resolve()
        if path.resolve().parent != scratch or not path.is_file():
            raise SandboxedError(f"measure {self.label!r}: the sandbox named an output outside "
                                 f"its scratch folder ({path})")
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise SandboxedError(f"measure {self.label!r}: its output is not a plain array "
                                 f"({exc})") from exc
        finally:
            path.unlink(missing_ok=True)
        return array

    # -- requests ------------------------------------------------------------------------
    def call(self, op: str, **arguments: Any) -> Any:
        """Send one request and wait for its reply (with progress and the wall-clock limit);
        raise :class:`SandboxedError` when it fails."""
        with self._lock:
            try:
                return self._call(op, arguments)
            finally:
                for folder in (self.dir / "in").glob("request-*"):
                    shutil.rmtree(folder, ignore_errors=True)

    def _call(self, op: str, arguments: dict[str, Any]) -> Any:
        if self.dead:
            raise SandboxedError(f"measure {self.label!r}: its sandbox was stopped earlier "
                                 f"({self.dead}); {op}() cannot run")
        line = (json.dumps({"op": op, **arguments}) + "\n").encode("utf-8")
        try:
            self.process.stdin.write(line)
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._ended(op) from None
        started = time.monotonic()
        next_notice = started + PROGRESS_SECONDS
        limit = self.call_seconds
        out = self.process.stdout
        while b"\n" not in self._buffer:
            now = time.monotonic()
            if now - started > limit:
                self.stop(f"{op}() ran past the wall-clock limit of {limit:g} s")
                raise SandboxLimitError(f"measure {self.label!r}: {op}() ran for more than "
                                        f"{limit:g} s (the sandbox's wall-clock limit per "
                                        f"request) and was stopped")
            if now >= next_notice:
                logger.info("measure %s: %s() still running in the sandbox (%.0f s of its "
                            "%g s limit)", self.label, op, now - started, limit)
                next_notice = now + PROGRESS_SECONDS
            ready, _, _ = select.select([out], [], [], min(1.0, max(0.01, limit - (now - started))))
            if ready:
                chunk = os.read(out.fileno(), 1 << 16)
                if not chunk:
                    raise self._ended(op)
                self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\n")
        try:
            reply = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.stop("it sent a reply that is not JSON")
            raise SandboxedError(f"measure {self.label!r}: the sandbox's reply to {op}() is "
                                 f"garbled (the measure wrote to the engine's pipe?); stopped"
                                 ) from None
        if not isinstance(reply, dict):
            raise SandboxedError(f"measure {self.label!r}: the sandbox's reply to {op}() is "
                                 f"not an object")
        if reply.get("ok"):
            return reply.get("result")
        remote = str(reply.get("type") or "Error")
        error_type = type(remote if remote.isidentifier() else "Error", (SandboxedError,), {})
        error = error_type(str(reply.get("message") or "(no message)"))
        error.remote_traceback = str(reply.get("traceback") or "")
        raise error

    def _ended(self, op: str) -> SandboxedError:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        time.sleep(0.05)
        tail = " | ".join(line for line in list(self.stderr_tail)[-5:] if line)
        if code is not None and code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
            reason = (f"used up its CPU-time limit of {self.settings.cpu_seconds} s and was "
                      f"stopped")
            error: SandboxedError = SandboxLimitError(f"measure {self.label!r}: {op}() {reason}")
        elif code is not None and code in (-signal.SIGKILL, 128 + signal.SIGKILL):
            reason = "was killed (out of memory?)"
            error = SandboxLimitError(f"measure {self.label!r}: {op}() {reason}")
        else:
            reason = f"ended (exit status {code})"
            error = SandboxedError(f"measure {self.label!r}: the sandbox worker {reason} during "
                                   f"{op}()" + (f"; its last output: {tail}" if tail else ""))
        self.stop(reason)
        return error

    def stop(self, reason: str = "closed") -> None:
        """Kill the worker (its whole process group) and remove the session's folders."""
        if self.dead is None:
            self.dead = reason
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
        _SESSIONS.discard(self)

    @contextlib.contextmanager
    def validation_limits(self):
        """Requests in the ``with`` body get the (shorter) validation wall-clock limit."""
        previous = self.call_seconds
        self.call_seconds = self.settings.validation_call_seconds
        try:
            yield
        finally:
            self.call_seconds = previous

    def close(self) -> None:
        if self.dead is None and self.process.poll() is None:
            try:
                self._call("close", {})
            except SandboxedError:
                pass
        self.stop()


_SESSIONS: set[SandboxSession] = set()


@atexit.register
def _close_all() -> None:
    for session in list(_SESSIONS):
        session.stop()


def _stand_in(type_name: str, text: str | None = None) -> Any:
    """An object whose type is named like what a measure returned (instead of an array, a
    CheckCost, a number), so the engine's checks say what it was ("returned list")."""
    name = type_name if type_name.isidentifier() else "object"
    shown = text if text is not None else f"<{name}>"
    return type(name, (), {"__repr__": lambda self: shown})()


# -- the isolated measure class -------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """A worker's faithful JSON value back to Python (sets, sequences, numpy scalars; other
    objects as a stand-in whose repr is theirs)."""
    if isinstance(value, dict):
        if "set" in value:
            items = [_plain(v) for v in value["set"]]
            return frozenset(items) if value.get("type") == "frozenset" else set(items)
        if "sequence" in value:
            items = [_plain(v) for v in value["sequence"]]
            return tuple(items) if value.get("type") == "tuple" else items
        if "numpy" in value:  # a numpy scalar: its value (the checks accept numbers)
            return value["numpy"]
        if "repr" in value:
            return _stand_in(str(value.get("type", "object")), str(value["repr"]))
    return value


class IsolatedMeasure(Measure):
    """Base of the classes :func:`isolated_measure_class` makes: a submitted measure run in a
    sandbox. Its class attributes are the submitted class's; its methods are requests."""

    session: ClassVar[SandboxSession]
    code: ClassVar[MeasureCode]
    code_sha256: ClassVar[str]
    isolation_api_error: ClassVar[str | None] = None
    defines_fit: ClassVar[bool] = False
    source_kind: ClassVar[str] = "sandboxed"

    def __init__(self, **options: Any):
        try:
            json.dumps(options)
        except (TypeError, ValueError) as exc:
            raise ExitbenchError(f"options of sandboxed measure {self.name!r} must be plain "
                                 f"JSON values ({exc})") from exc
        self.options = dict(options)
        self.handle = self.session.call("new", options=self.options)

    def fit(self, traces, **options: Any) -> None:
        # a learned plugin cannot write a cache outside its sandbox: it refits each time
        options.pop("cache_dir", None)
        fields = set(self.reads) | set(self.fit_reads) | {"example_id", "position", "top1_id"}
        folder = self.session.write_traces(traces, fields)
        self.session.call("fit", handle=self.handle, traces=str(folder),
                          options={k: v for k, v in options.items()
                                   if isinstance(v, (int, float, str, bool, type(None)))})

    def scores(self, traces) -> Any:
        fields = set(self.reads) | {"example_id", "position", "top1_id"}
        folder = self.session.write_traces(traces, fields)
        return self.session.read_array(self.session.call("scores", handle=self.handle,
                                                         traces=str(folder)))

    def thresholds_for(self, num_layers: int) -> Any:
        return _plain(self.session.call("thresholds_for", handle=self.handle,
                                        num_layers=int(num_layers)))

    def checked_layers(self, num_layers: int) -> Any:
        return self.session.read_array(self.session.call("checked_layers", handle=self.handle,
                                                         num_layers=int(num_layers)))

    def check_cost(self, dims: ModelDims) -> Any:
        reply = self.session.call("check_cost", handle=self.handle,
                                  dims=dataclasses.asdict(dims))
        if "not_check_cost" in reply:
            return _stand_in(str(reply["not_check_cost"]))
        return CheckCost(flops=_plain(reply["flops"]), bytes=_plain(reply["bytes"]),
                         needs_lm_head=_plain(reply["needs_lm_head"]))


def isolated_measure_class(code: MeasureCode, settings: SandboxSettings | None = None,
                           label: str | None = None) -> type[IsolatedMeasure]:
    """Start a sandbox for ``code`` and return the class that stands for its measure there.
    An import error of the submitted file is an :class:`ExitbenchError` naming it; a class
    that breaks the measure API becomes a class the validator's ``api`` check fails."""
    settings = settings or default_settings()
    label = label or code.origin
    session = SandboxSession(code, settings, label)
    try:
        if code.kind == "file":
            path = session.input_folder() / code.file_name
            path.write_text(code.source_text or "", "utf-8")
            description = session.call("load", kind="file", path=str(path))
        else:
            description = session.call("load", kind="import", spec=code.import_spec)
    except SandboxedError as exc:
        session.stop()
        raise ExitbenchError(f"{code.origin}: {exc}") from exc
    attributes = {key: _plain(value)
                  for key, value in (description.get("attributes") or {}).items()}
    namespace: dict[str, Any] = {
        "session": session, "code": code, "code_sha256": code.sha256,
        "isolation_api_error": description.get("api_error"),
        "defines_fit": bool(description.get("defines_fit")),
        "__doc__": f"Sandboxed measure from {code.origin}.",
        "__module__": __name__,
    }
    for key in ("name", "description", "reads", "fit_reads", "needs_fit", "deployable",
                "propagation", "thresholds"):
        if key in attributes and attributes[key] is not None:
            namespace[key] = attributes[key]
    namespace.setdefault("name", label)
    if isinstance(namespace["name"], str) and namespace["name"]:
        session.label = namespace["name"]  # messages name the measure, not its file
    namespace.setdefault("description", "")
    namespace.setdefault("reads", frozenset())
    qualname = str(description.get("qualname") or "SubmittedMeasure")
    class_name = qualname.rsplit(".", 1)[-1]
    return type(class_name if class_name.isidentifier() else "SubmittedMeasure",
                (IsolatedMeasure,), namespace)
