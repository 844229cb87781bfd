"""Small real runs for the submission and run-directory tests: a config file written where a
user would keep it (its paths relative to its own folder), run by the real CLI over the
random-weight backbone of conftest.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MEASURES = ["softmax_margin", "static_layer"]


def write_config(root: Path, model_dir: Path, samples_dir: Path, *, name: str = "suite",
                 measures: list[Any] | None = None, profiles: list[str] | None = None,
                 examples: int = 12, **overrides: Any) -> Path:
    """``root/configs/<name>.yaml`` whose output_dir is ``root/run`` (written ``../run``)."""
    folder = root / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "name": name, "output_dir": "../run", "data_dir": str(samples_dir),
        "tasks": [{"name": "squad", "split": f"validation[:{examples}]", "max_new_tokens": 5,
                   "max_source_tokens": 96}],
        "models": [{"name": "tiny-random", "path": str(model_dir),
                    "label": "random-weight T5 (tests only)"}],
        "measures": measures if measures is not None else list(MEASURES),
        "profiles": profiles if profiles is not None else ["a100_sxm_80gb"],
        "batch_sizes": [1, 4], "record_batch_size": 4, "shard_size": 4, "leaderboard": True,
        "ray": {"record_workers": 1, "cpus_per_worker": 1, "num_cpus": 2},
        **overrides,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def results(run: Path) -> dict[str, Any]:
    return json.loads((run / "results" / "results.json").read_text())


def rows_by_measure(run: Path) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for row in results(run)["rows"]:
        found.setdefault(row["measure"], []).append(row)
    return found


def shard_hashes(run: Path) -> dict[str, str]:
    manifest = run / "traces" / "squad" / "tiny-random" / "generated" / "manifest.json"
    return {s["file"]: s["sha256"] for s in json.loads(manifest.read_text())["shards"]}
