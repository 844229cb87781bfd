"""``exitbench run`` writes rows with intervals and latency, ``aggregated.json`` and
``samples.parquet`` that follow their documented schemas (docs/results.md,
docs/schemas/aggregated.schema.json), and a leaderboard that shows the intervals.

One run for the module (in-process Ray), on a random-weight 3-layer T5 with a tokenizer
trained on the SQuAD sample (its predictions are nonsense; the formats do not care)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(random_backbone, samples_dir, tmp_path_factory):
    from suite.cli import main

    out = tmp_path_factory.mktemp("formats")
    config = {
        "name": "formats-test", "output_dir": str(out / "run"), "data_dir": str(samples_dir),
        "tasks": [{"name": "squad", "split": "validation[:12]", "max_new_tokens": 5,
                   "max_source_tokens": 64}],
        "models": [{"name": "tiny-random", "path": str(random_backbone),
                    "label": "random-weight T5 for tests"}],
        "measures": ["softmax_margin", "static_layer",
                     {"name": "softmax_max", "thresholds": [0.0, 0.5, 2.0]}],
        "profiles": ["a100_sxm_80gb"], "batch_sizes": [1, 4],
        "record_batch_size": 4, "shard_size": 12,
        "uncertainty": {"resamples": 200},
        "ray": {"num_cpus": 1},
    }
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--no-progress"]) == 0
    return out / "run"


def test_rows_carry_intervals_and_latency(run_dir):
    rows = json.loads((run_dir / "results" / "results.json").read_text())["rows"]
    assert rows
    for row in rows:
        assert row["bootstrap_resamples"] == 200
        assert row["interval_method"] == "numpy percentile bootstrap"
        assert row["quality_ci_low"] <= row["quality"] + 1e-9 or row["quality_stderr"] == 0
        assert row["quality_ci_low"] <= row["quality_ci_high"]
        assert row["ttft_p50_seconds"] <= row["ttft_p90_seconds"] <= row["ttft_p99_seconds"]
        assert row["ttft_p50_seconds"] > 0
        if row["tpot_p50_seconds"] is not None:
            assert row["tpot_p50_seconds"] <= row["tpot_p99_seconds"]
        assert row["meets_latency_limits"] is None  # a100_sxm_80gb declares no limits


def test_aggregated_json_matches_its_schema(run_dir):
    import jsonschema

    schema = json.loads((REPO / "docs" / "schemas" / "aggregated.schema.json").read_text())
    document = json.loads((run_dir / "results" / "aggregated.json").read_text())
    jsonschema.validate(document, schema)
    entry = document["results"]["squad/tiny-random/softmax_margin/replay"]
    assert "best_speedup_within_1pct_stderr,a100_sxm_80gb@batch4" in entry
    assert document["bootstrap"] == {"resamples": 200, "seed": 0, "confidence": 0.95}
    assert document["comparisons"], "the ranking compares each measure with the one above"
    assert all(0 < c["ranking_statistic"]["p_value"] <= 1 for c in document["comparisons"]
               if c["ranking_statistic"]["p_value"] is not None)
    # a broken document is caught by the same schema
    document["results"]["squad/tiny-random/softmax_margin/replay"]["bogus"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, schema)


def documented_sample_columns() -> list[tuple[str, str]]:
    text = (REPO / "docs" / "results.md").read_text()
    section = text.split("## `samples.parquet`", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \| `([^`]+)` \|", section, flags=re.M)


def test_samples_parquet_matches_the_documented_schema(run_dir):
    import pyarrow.parquet as pq

    from suite.samples import decode_exit_layers

    table = pq.read_table(run_dir / "results" / "samples.parquet")
    # Arrow names a list's item field; Parquet calls it "element": the types are what count
    columns = [(f.name, re.sub(r"list<\w+: ", "list<", str(f.type))) for f in table.schema]
    assert columns == documented_sample_columns()
    frame = table.to_pandas()
    full = frame[frame["mode"] == "full_depth"]
    assert len(full) == 12 and full["threshold"].isna().all()
    # every replayed point has one sample per example
    replayed = frame[frame["mode"] == "replay"]
    assert (replayed.groupby(["measure", "threshold"]).size() == 12).all()
    # exit layers: one per trajectory token, within the model's 3 layers
    lengths = [decode_exit_layers(b).size for b in full["exit_layers"]]
    assert all(n >= 1 for n in lengths) and all(decode_exit_layers(b).max() == 2
                                                for b in full["exit_layers"])
    # the per-example scores reproduce the row's quality (SQuAD F1 is their mean)
    rows = json.loads((run_dir / "results" / "results.json").read_text())["rows"]
    row = next(r for r in rows if r["measure"] == "softmax_max" and r["threshold"] == 0.5)
    point = replayed[(replayed["measure"] == "softmax_max") & (replayed["threshold"] == 0.5)]
    assert np.mean(point["score"]) == pytest.approx(row["quality"])


def test_leaderboard_shows_intervals(run_dir):
    html = (run_dir / "site" / "index.html").read_text()
    assert 'class="error-bar' in html
    assert "95% CI" in html
