"""The Ray runner on a two-node cluster started on this machine (every node on 127.0.0.1):
shards spread over both nodes, a rerun does no work, a killed worker or a killed driver
still ends with traces and results equal to an uninterrupted run's.

Ray starts once for the module; the backbone is a small random-weight T5 with a tokenizer
trained on the SQuAD sample (fast to decode; the runner does not care what it predicts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(random_backbone):
    return random_backbone


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    two_nodes = Cluster(initialize_head=True,
                        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    two_nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    ray.init(address=two_nodes.address, log_to_driver=False)
    yield two_nodes
    ray.shutdown()
    two_nodes.shutdown()


def make_config(output_dir: Path, model_dir: Path, samples_dir: Path):
    from suite.config import parse_config

    return parse_config({
        "name": "runner-test", "output_dir": str(output_dir), "data_dir": str(samples_dir),
        "tasks": [{"name": "squad", "split": "validation[:16]", "max_new_tokens": 6,
                   "max_source_tokens": 96}],
        "models": [{"name": "tiny-random", "path": str(model_dir),
                    "label": "random-weight T5 for runner tests"}],
        "measures": ["softmax_margin", "static_layer"],
        "profiles": ["a100_sxm_80gb"], "batch_sizes": [1, 4],
        "record_batch_size": 2, "shard_size": 2, "leaderboard": False,
        "ray": {"record_workers": 2, "cpus_per_worker": 1, "max_retries": 2},
    })


def shard_hashes(output_dir: Path) -> dict[str, str]:
    manifest = output_dir / "traces" / "squad" / "tiny-random" / "generated" / "manifest.json"
    return {s["file"]: s["sha256"] for s in json.loads(manifest.read_text())["shards"]}


def results_rows(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "results" / "results.json").read_text())["rows"]


def stage(summary, name):
    return next(s for s in summary.stages if s.name == name)


@pytest.fixture(scope="module")
def clean_run(cluster, model_dir, samples_dir, tmp_path_factory):
    from suite.runner import run_suite

    output = tmp_path_factory.mktemp("clean")
    summary = run_suite(make_config(output, model_dir, samples_dir), progress=False)
    return output, summary


def test_shards_spread_over_both_nodes(clean_run):
    output, summary = clean_run
    assert len(shard_hashes(output)) == 8
    assert stage(summary, "record").done == 8
    assert len(set(summary.shard_nodes.values())) == 2, summary.shard_nodes
    assert len(results_rows(output)) > 0
    manifest = json.loads((output / "run_manifest.json").read_text())
    assert manifest["traces"] and all(t["shards"] for t in manifest["traces"].values())
    assert manifest["versions"]["ray"] != "not installed"


def test_rerun_of_a_finished_run_does_no_work(clean_run, model_dir, samples_dir):
    from suite.runner import run_suite

    output, _ = clean_run
    before = results_rows(output)
    summary = run_suite(make_config(output, model_dir, samples_dir), progress=False)
    assert stage(summary, "record").done == 0 and stage(summary, "record").skipped == 8
    assert stage(summary, "replay").done == 0 and stage(summary, "replay").skipped == 2
    assert stage(summary, "validate").done == 0
    assert results_rows(output) == before


def record_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ray::RecordWorker" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_killed_worker_still_gives_complete_hash_equal_traces(clean_run, model_dir,
                                                              samples_dir, tmp_path):
    from suite.runner import run_suite

    reference, _ = clean_run
    killed: list[int] = []

    def kill_a_worker():
        deadline = time.time() + 60
        while time.time() < deadline and not killed:
            pids = record_worker_pids()
            if pids:
                time.sleep(0.3)
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    summary = run_suite(make_config(tmp_path, model_dir, samples_dir), progress=False)
    killer.join(timeout=5)
    assert killed, "no recording worker was found to kill"
    assert stage(summary, "record").retried >= 1
    assert shard_hashes(tmp_path) == shard_hashes(reference)
    assert results_rows(tmp_path) == results_rows(reference)


def test_killed_driver_resumes_and_ends_equal_to_a_clean_run(clean_run, cluster, model_dir,
                                                             samples_dir, tmp_path):
    import yaml

    from suite.runner import run_suite

    reference, _ = clean_run
    config = make_config(tmp_path / "run", model_dir, samples_dir)
    config_path = tmp_path / "suite.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-m", "suite.cli", "run", "--config",
                               str(config_path), "--address", cluster.address, "--no-progress"],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    manifest = tmp_path / "run" / "traces" / "squad" / "tiny-random" / "generated" / \
        "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        if driver.poll() is not None:
            break
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = len(json.loads(manifest.read_text())["shards"])
    assert 2 <= done_before < 8, f"the driver was killed after {done_before} of 8 shards"
    summary = run_suite(config, progress=False)
    assert stage(summary, "record").skipped == done_before
    assert shard_hashes(tmp_path / "run") == shard_hashes(reference)
    assert results_rows(tmp_path / "run") == results_rows(reference)
