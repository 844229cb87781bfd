"""Result rows round-trip through the results files."""

import pandas as pd

from suite.results import ResultRow, read_results, write_results


def make_row(**changes):
    row = dict(task="squad", model="tiny-calm", model_label="tiny T5 trained here",
               measure="softmax_margin", measure_options="{}", deployable=True, threshold=0.5,
               min_layer=0, profile="a100_sxm_80gb", profile_kind="simulated", batch_size=8,
               mode="replay", metric="f1", quality=42.0, quality_full_depth=43.0,
               scores={"f1": 42.0, "exact_match": 30.0}, mean_layers_used=3.5, num_layers=6,
               token_agreement=0.9, exit_histogram=[0.5, 0, 0, 0, 0, 0.5], tokens_per_s=900.0,
               full_depth_tokens_per_s=600.0, speedup=1.5, num_examples=10, num_tokens=50,
               traces_hash="ab" * 32, measure_code_hash="cd" * 32)
    row.update(changes)
    return ResultRow(**row)


def test_results_round_trip(tmp_path):
    rows = [make_row(), make_row(threshold=0.9, measure="<script>alert(1)</script>")]
    write_results(tmp_path, rows, {"run": "test"})
    assert read_results(tmp_path) == rows
    frame = pd.read_parquet(tmp_path / "results.parquet")
    assert list(frame["threshold"]) == [0.5, 0.9]
    assert frame["measure"][1] == "<script>alert(1)</script>"
