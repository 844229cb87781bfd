"""Submitted code runs isolated (suite/sandbox): through `exitbench validate-measure` and
`exitbench submit`, a measure that writes, deletes, opens a socket, forks, starts a program,
sleeps or eats memory is stopped and named, and nothing outside its scratch folder changes.
The sandbox is bubblewrap (scripts/setup.sh installs it) plus a seccomp filter and rlimits;
`mode: process` keeps the filter and the limits without the file-system isolation."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import submitted_measures as sm
import yaml

from suite.cli import main
from suite.sandbox import SandboxSettings, sandbox_problem

pytestmark = pytest.mark.skipif(sandbox_problem(SandboxSettings()) is not None,
                                reason="bubblewrap is missing: scripts/setup.sh installs it")


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def guarded():
    """A folder outside /tmp (which the sandbox hides behind a private tmpfs), visible but
    read-only inside the sandbox, with a file a measure will try to touch."""
    import shutil
    import tempfile

    (REPO_ROOT / "runs").mkdir(exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="sandbox-guard-", dir=REPO_ROOT / "runs"))
    (folder / "precious.txt").write_text("keep me")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def config_file(tmp_path: Path, **sandbox) -> Path:
    path = tmp_path / "sandbox.yaml"
    path.write_text(yaml.safe_dump({"tasks": [{"name": "squad"}], "output_dir": "run",
                                    "sandbox": sandbox}))
    return path


def validate(tmp_path, source: str, capsys, *extra: str) -> tuple[int, str]:
    path = tmp_path / "submitted.py"
    path.write_text(source)
    code = main(["validate-measure", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_a_measure_that_writes_outside_is_stopped_and_nothing_changes(tmp_path, guarded,
                                                                      capsys):
    before = snapshot(guarded)
    code, out = validate(tmp_path, sm.writer(guarded / "written.txt"), capsys)
    assert code == 1
    assert re.search(r"FAIL\s+shape\s+the measure raised OSError: \[Errno 30\] Read-only "
                     r"file system", out), out
    assert "sandboxed (bwrap)" in out
    assert snapshot(guarded) == before


def test_a_measure_that_deletes_is_stopped_and_the_file_stays(tmp_path, guarded, capsys):
    code, out = validate(tmp_path, sm.deleter(guarded / "precious.txt"), capsys)
    assert code == 1 and "Read-only file system" in out, out
    assert (guarded / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("source, what", [(sm.SOCKET, "socket"), (sm.FORK, "fork"),
                                          (sm.SUBPROCESS, "program")])
@pytest.mark.parametrize("mode", ["bwrap", "process"])
def test_sockets_forks_and_programs_are_denied_in_both_modes(tmp_path, capsys, source, what,
                                                              mode):
    code, out = validate(tmp_path, source, capsys, "--sandbox", mode)
    assert code == 1, out
    assert re.search(r"FAIL\s+shape\s+the measure raised PermissionError: \[Errno 1\] "
                     r"Operation not permitted", out), (what, out)


def test_a_sleeping_measure_is_stopped_at_its_limit_and_named(tmp_path, capsys):
    config = config_file(tmp_path, validation_call_seconds=3)
    started = time.monotonic()
    code, out = validate(tmp_path, sm.SLEEPER, capsys, "--config", str(config))
    assert code == 1
    assert time.monotonic() - started < 60  # not the hour it asked for
    assert re.search(r"FAIL\s+shape\s+.*measure 'sleeper': scores\(\) ran for more than 3 s "
                     r"\(the sandbox's wall-clock limit per request\) and was stopped", out), out
    assert "its sandbox was stopped earlier" in out  # the later checks say why they cannot run


def test_a_measure_that_eats_memory_is_stopped_and_named(tmp_path, capsys):
    config = config_file(tmp_path, memory_bytes=2 << 30)
    code, out = validate(tmp_path, sm.MEMORY_EATER, capsys, "--config", str(config))
    assert code == 1
    assert re.search(r"FAIL\s+shape\s+the measure raised (MemoryError|_ArrayMemoryError)", out), out


def test_the_environment_is_cleared(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EXITBENCH_TEST_SECRET", "hunter2")
    code, out = validate(tmp_path, sm.ENV_READER, capsys)
    assert code == 0, out


def test_submit_refuses_a_hostile_measure_and_stores_nothing(tmp_path, guarded, capsys):
    config = config_file(tmp_path)
    path = tmp_path / "writer.py"
    path.write_text(sm.writer(guarded / "written.txt"))
    before = snapshot(guarded)
    code = main(["submit", str(path), "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 1 and "submission rejected" in out
    assert not (tmp_path / "run" / "submissions").exists()
    assert snapshot(guarded) == before


def test_the_engine_never_imports_the_submitted_file(tmp_path, capsys):
    import sys

    marker = tmp_path / "imported-in-the-engine"
    source = sm.GOOD + f"\nopen({str(marker)!r}, 'w').close()\n"
    code, out = validate(tmp_path, source, capsys)
    # the import-time write fails inside the sandbox (read-only), so the file cannot load
    assert code == 2 and "could not be imported" in out, out
    assert not marker.exists()
    assert not any(name.startswith("exitbench_user_measure_") for name in sys.modules)
