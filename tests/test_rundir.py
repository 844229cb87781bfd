"""The run directory under faults and bad input, through the CLI (issue: a lock, clean
interrupts, disk full, corruption that never empties results, resumable replay, errors that
name the field): every case runs the real `exitbench` command on a small real run over the
random-weight backbone of conftest.py.

A reference run is made once for the module; cases that damage or interrupt a run work on a
fresh directory or a copy of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitted_measures as sm
from run_fixtures import rows_by_measure, shard_hashes, write_config

from suite.cli import main

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
MEASURES = ["softmax_margin", "static_layer", "softmax_max", "hidden_state_saturation"]
SLOW = sm.measure_source("SlowTop1", "slow_top1", '''
import time
if real(traces):
    time.sleep(4)''', description="sleeps 4 s on real traces (a slow submitted measure)")
SLOWER = SLOW.replace("SlowTop1", "SlowerTop1").replace("slow_top1", "slower_top1")


def environment() -> dict[str, str]:
    """The commands' environment as a user's shell has it: without the RAY_AUTH_MODE that an
    in-process Ray of an earlier test module may have set (so Ray announces its token
    authentication, which must go to the run's log, not the terminal)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}


def cli(*args: str, cwd: Path = REPO_ROOT, umask: int | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "suite.cli", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, env=environment(),
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "suite.cli", *args], cwd=REPO_ROOT,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=environment())


def wait_for(condition, timeout: float = 300, what: str = "the condition") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def manifest_shards(run: Path) -> int:
    path = run / "traces" / "squad" / "tiny-random" / "generated" / "manifest.json"
    try:
        return len(json.loads(path.read_text())["shards"])
    except (OSError, ValueError):
        return 0


def parts(run: Path) -> list[Path]:
    folder = run / "results" / "parts" / "squad" / "tiny-random"
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, random_backbone, samples_dir):
    """A finished run made by one uninterrupted `exitbench run`."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root, random_backbone, samples_dir, measures=MEASURES)
    done = cli("run", "--config", str(config), "--no-progress")
    assert done.returncode == 0, done.stderr
    return root / "run", done


@pytest.fixture()
def fresh(tmp_path, random_backbone, samples_dir):
    """A config whose run directory does not exist yet."""
    return write_config(tmp_path, random_backbone, samples_dir, measures=MEASURES), \
        tmp_path / "run"


@pytest.fixture()
def copy(tmp_path, reference, random_backbone, samples_dir):
    """A config over a copy of the reference run."""
    run, _ = reference
    shutil.copytree(run, tmp_path / "run")
    return write_config(tmp_path, random_backbone, samples_dir, measures=MEASURES), \
        tmp_path / "run"


def test_ray_notices_stay_off_the_terminal(reference):
    run, done = reference
    assert "Token authentication" not in done.stderr + done.stdout
    assert "Token authentication" in (run / "logs" / "ray.log").read_text()


def test_concurrent_commands_wait_or_refuse_and_lose_nothing(fresh, reference, tmp_path):
    config, run = fresh
    first = start("run", "--config", str(config), "--no-progress")
    lock = run / ".exitbench.lock"
    wait_for(lambda: lock.is_file() and lock.read_text().strip(), what="the first run's lock")
    refused = cli("run", "--config", str(config), "--no-progress", "--no-wait")
    assert refused.returncode == 2
    assert re.search(rf"is in use by pid {first.pid} on .*\(`.*exitbench run --config "
                     rf"{re.escape(str(config))}", refused.stderr), refused.stderr
    measure = tmp_path / "slow_top1.py"
    measure.write_text(SLOW)
    submitter = start("submit", str(measure), "--config", str(config))
    second = start("run", "--config", str(config), "--no-progress")
    outputs = [p.communicate(timeout=600) for p in (first, submitter, second)]
    assert [p.returncode for p in (first, submitter, second)] == [0, 0, 0], outputs
    assert "waiting for it to finish" in outputs[1][1] + outputs[2][1]
    # nothing was recorded twice, and the submission is in the final results beside the run
    assert re.search(r"record\s+done\s+0\s+skipped\s+3", outputs[2][0]), outputs[2][0]
    assert shard_hashes(run) == shard_hashes(reference[0])
    found = rows_by_measure(run)
    assert set(found) == set(MEASURES) | {"slow_top1"}
    expected = rows_by_measure(reference[0])
    assert {m: found[m] for m in MEASURES} == expected


def test_ctrl_c_during_record_ends_in_one_line_and_resumes(tmp_path, random_backbone,
                                                           samples_dir):
    # one example per shard, so that a fast machine is still recording when the signal lands
    # (with three shards of four, CI once finished all three first); the uninterrupted run of
    # the same config is the reference
    fine = {"shard_size": 1, "record_batch_size": 1}
    expected_config = write_config(tmp_path / "whole", random_backbone, samples_dir,
                                   measures=MEASURES, **fine)
    assert cli("run", "--config", str(expected_config), "--no-progress").returncode == 0
    expected = tmp_path / "whole" / "run"
    shards = manifest_shards(expected)
    assert shards == 12
    config = write_config(tmp_path, random_backbone, samples_dir, measures=MEASURES, **fine)
    run = tmp_path / "run"
    driver = start("run", "--config", str(config), "--no-progress")
    wait_for(lambda: manifest_shards(run) >= 1 or driver.poll() is not None,
             what="a first shard")
    driver.send_signal(signal.SIGINT)
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "exitbench run: interrupted; finished work is kept and a rerun resumes from it")
    assert "Traceback" not in err and "ValueError" not in err
    kept = manifest_shards(run)
    assert 1 <= kept < shards
    resumed = cli("run", "--config", str(config), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(rf"record\s+done\s+{shards - kept}\s+skipped\s+{kept}", resumed.stdout)
    assert shard_hashes(run) == shard_hashes(expected)
    assert rows_by_measure(run) == rows_by_measure(expected)


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_replay_resumes_with_the_unfinished_measures(copy, tmp_path, how):
    config, run = copy
    for number, source in enumerate((SLOW, SLOWER)):
        path = tmp_path / f"slow{number}.py"
        path.write_text(source)
        assert cli("submit", str(path), "--config", str(config)).returncode == 0
    before = rows_by_measure(run)
    for part in parts(run):
        part.unlink()
    driver = start("replay", "--config", str(config), "--no-progress")
    wait_for(lambda: len(parts(run)) >= len(MEASURES) or driver.poll() is not None,
             what="the built-in measures' parts")
    driver.send_signal(how)
    _, err = driver.communicate(timeout=120)
    stored = len(parts(run))
    assert driver.returncode == (130 if how == signal.SIGINT else -signal.SIGKILL), err
    assert len(MEASURES) <= stored < len(MEASURES) + 2
    if how == signal.SIGINT:
        assert "Traceback" not in err and err.strip().endswith("a rerun resumes from it")
    for part in parts(run):
        json.loads(part.read_text())  # every stored part is whole
    resumed = cli("replay", "--config", str(config), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    left = len(MEASURES) + 2 - stored
    assert re.search(rf"replay\s+done\s+{left}\s+skipped\s+{stored}", resumed.stdout), \
        resumed.stdout
    assert rows_by_measure(run) == before


def test_a_corrupt_shard_never_empties_the_results(copy):
    config, run = copy
    shard = sorted((run / "traces" / "squad" / "tiny-random" / "generated").glob("*.arrow"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    saved = {name: (run / "results" / name).read_bytes()
             for name in ("results.json", "results.parquet")}
    # with its parts stored, replay has nothing to read the traces for: results unchanged
    kept = cli("replay", "--config", str(config), "--no-progress")
    assert kept.returncode == 0, kept.stderr
    assert all((run / "results" / n).read_bytes() == b for n, b in saved.items())
    # without them, replay must read the traces: it refuses, names the shard and the fix
    for part in parts(run):
        part.unlink()
    for extra in ([], ["--no-leaderboard"]):
        refused = cli("replay", "--config", str(config), "--no-progress", *extra)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert f"trace shard {shard.name} is corrupted" in refused.stderr
        assert "exitbench run --config" in refused.stderr and "left unchanged" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert all((run / "results" / n).read_bytes() == b for n, b in saved.items())
    repaired = cli("run", "--config", str(config), "--no-progress")
    assert repaired.returncode == 0, repaired.stderr
    assert f"repaired {shard}" in repaired.stdout
    assert re.search(r"record\s+done\s+1\s+skipped\s+2", repaired.stdout)
    assert (run / "results" / "results.json").read_bytes() == saved["results.json"]


def test_a_full_disk_ends_in_one_line_naming_the_path(fresh, tmp_path):
    config, run = fresh
    run.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(run)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); "
                    f"test_enospc_from_any_write_is_one_line covers the error path")
    try:
        full = cli("run", "--config", str(config), "--no-progress")
        assert full.returncode == 2, full.stdout + full.stderr
        last = full.stderr.strip().splitlines()[-1]
        assert re.fullmatch(rf"exitbench run: error: no space left on device at "
                            rf"{re.escape(str(run))}/\S+; finished work is kept.*", last), last
        assert "Traceback" not in full.stderr and "ValueError: force=True" not in full.stderr
        assert manifest_shards(run) >= 1  # the shards written before it filled are listed
    finally:
        subprocess.run(["umount", str(run)], check=False)


def test_enospc_from_any_write_is_one_line(copy, monkeypatch, capsys):
    import errno

    import suite.atomic

    config, run = copy
    saved = (run / "results" / "results.json").read_bytes()
    for part in parts(run)[:1]:
        part.unlink()
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(suite.atomic.os, "fsync", full)
    code = main(["replay", "--config", str(config), "--no-progress", "--no-ray"])
    monkeypatch.setattr(suite.atomic.os, "fsync", real_fsync)
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(r"exitbench replay: error: no space left on device at \S+\.json; "
                     r"finished work is kept", err), err
    assert (run / "results" / "results.json").read_bytes() == saved


@pytest.mark.parametrize("content, message", [
    (None, r"line 3: field 'question' is missing or null; the input template "
           r"'question: \{question\} context: \{context\}' needs it"),
    ("", r"validation\.jsonl is empty"),
    ('{"id": "a", "question": "q", "context": "c"}\n{"id": 1,, }\n',
     r"is not JSON Lines: line 2 is not valid JSON \(Expecting property name"),
])
def test_bad_data_files_name_the_file_line_and_field(tmp_path, random_backbone, samples_dir,
                                                     content, message):
    data = tmp_path / "data" / "squad"
    data.mkdir(parents=True)
    lines = (samples_dir / "squad_v1.1_dev_sample.jsonl").read_text().splitlines()[:12]
    if content is None:
        broken = json.loads(lines[2])
        del broken["question"]
        lines[2] = json.dumps(broken)
        content = "\n".join(lines) + "\n"
    (data / "validation.jsonl").write_text(content)
    config = write_config(tmp_path, random_backbone, tmp_path / "data")
    failed = cli("record", "--config", str(config), "--no-progress")
    assert failed.returncode == 2, failed.stdout + failed.stderr
    assert failed.stderr.count("exitbench record: error:") == 1
    assert f"task 'squad': {data / 'validation.jsonl'}" in failed.stderr
    assert re.search(message, failed.stderr), failed.stderr
    assert "Traceback" not in failed.stderr


def test_from_another_directory_with_umask_022(copy, tmp_path):
    """A config means the same from any directory (its paths are relative to its folder),
    and the files it writes follow the umask like any other tool's."""
    config, run = copy
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for part in parts(run)[:1]:
        part.unlink()
    done = cli("replay", "--config", str(config.resolve()), "--no-progress", cwd=elsewhere,
               umask=0o022)
    assert done.returncode == 0, done.stderr
    assert re.search(r"replay\s+done\s+1\s+skipped\s+3\s+failed\s+0", done.stdout), done.stdout
    assert list(elsewhere.iterdir()) == []  # nothing written where the command was run
    for path in (run / "results" / "results.json", run / "results" / "results.parquet",
                 parts(run)[0], run / "site" / "index.html"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for folder in (run / "site", run / "site" / "measures"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
