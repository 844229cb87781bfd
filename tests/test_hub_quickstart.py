"""The hub quickstart's path without a network: ``configs/quickstart_hub.yaml`` run end to
end with its hub id resolved from a local Hugging Face cache (a small random-weight T5
saved there under ``google-t5/t5-small``; random weights, tests only) and the hub
offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from backbone_helpers import save_in_hub_cache

from suite.models import weights_sha256

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_hub_quickstart_config_runs_from_the_cache_offline(random_backbone, tmp_path, samples_dir):
    config = yaml.safe_load((REPO / "configs" / "quickstart_hub.yaml").read_text())
    hub_id = config["models"][0]["path"]
    assert hub_id == "google-t5/t5-small"
    cache = tmp_path / "hf" / "hub"
    save_in_hub_cache(random_backbone, hub_id, cache)
    # The shipped config, cut down to one small task, two measures and one profile.
    config.update(output_dir=str(tmp_path / "run"), data_dir=str(samples_dir),
                  measures=["softmax_margin", "static_layer"], profiles=["generic_cpu"],
                  batch_sizes=[1], leaderboard=False, shard_size=8, record_batch_size=8)
    config["tasks"] = [{"name": "squad", "split": "validation[:8]", "max_source_tokens": 64,
                        "max_new_tokens": 4}]
    config["ray"] = {"record_workers": 1, "cpus_per_worker": 1, "num_cpus": 2}
    path = tmp_path / "hub.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "suite.cli", "run", "--config", str(path),
                           "--no-progress"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backbone t5-small: google-t5/t5-small from the Hugging Face hub" in done.stdout
    manifest = json.loads((tmp_path / "run" / "traces" / "squad" / "t5-small" / "generated"
                           / "manifest.json").read_text())
    assert manifest["model_id"] == hub_id
    assert manifest["model_hash"] == weights_sha256(random_backbone)
    rows = json.loads((tmp_path / "run" / "results" / "results.json").read_text())
    assert {row["measure"] for row in rows["rows"]} == {"softmax_margin", "static_layer"}
