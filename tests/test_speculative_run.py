"""Self-speculative decoding through the command line: `exitbench run` replays and prices
it beside the exit measures and builds the site; `exitbench fidelity` decodes it online and
sets it beside replay. On a micro T5 the suite trains itself (a tiny model trained for a
few steps: test use only)."""

from __future__ import annotations

import pytest


# -- through the command line, on a micro T5 the suite trains itself ---------------------------
@pytest.mark.slow
def test_run_and_fidelity_put_self_speculation_beside_the_measures(tmp_path, samples_dir,
                                                                    capsys):
    import json

    import yaml

    from suite.cli import main
    from suite.results import read_results

    out = tmp_path / "run"
    train = {"objective": "calm", "preset": "micro", "tasks": ["squad"],
             "split": "validation[:60]", "max_source_tokens": 48, "max_target_tokens": 8,
             "steps": 30, "batch_size": 8}
    config = {
        "name": "speculative-test", "output_dir": str(out), "data_dir": str(samples_dir),
        "tokenizer": {"path": str(out / "tokenizer"), "tasks": ["squad"],
                      "split": "validation[:60]", "heldout_split": "validation[60:70]",
                      "vocab_size": 300, "max_unk_rate": 1.0},
        "models": [{"name": "micro", "path": str(out / "models/micro"),
                    "label": "micro T5 trained here (test)", "train": train}],
        "tasks": [{"name": "squad", "split": "validation[100:106]", "max_source_tokens": 48,
                   "max_new_tokens": 10}],
        "measures": ["softmax_max", "static_layer"],
        "methods": [{"name": "self_speculative", "draft_lengths": [1, 3],
                     "online_draft_lengths": [3]},
                    {"name": "self_speculative", "label": "self_speculative+stop",
                     "draft_depths": [2], "draft_lengths": [4],
                     "stop": {"measure": "softmax_max", "thresholds": [0.05, 0.5]}}],
        "profiles": ["generic_cpu", "a100_sxm_80gb"], "batch_sizes": [1, 4],
        "online": {"batch_sizes": [1, 4], "threads": 1, "measures": []}, "record_batch_size": 3,
        "shard_size": 3, "ray": {"num_cpus": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path), "--no-progress"]) == 0
    rows = read_results(out / "results")
    methods = [r for r in rows if r.method == "self_speculative"]
    # 3 layers: E in 1..2, k in {1, 3}: 4 points; the stopping entry: 2 thresholds
    assert len(methods) == (4 + 2) * 2 * 2  # x profiles x batch sizes
    assert {r.measure for r in methods} == {"self_speculative", "self_speculative+stop"}
    for row in methods:
        assert row.quality == row.quality_full_depth and row.token_agreement == 1.0
        assert row.speedup > 0 and row.mean_accepted_tokens >= 1.0
        options = json.loads(row.method_options)
        assert set(options) >= {"draft_depth", "draft_length"}
        low, high = row.extra["speedup_bounds"]
        assert low == row.speedup and high >= low
    assert {r.method for r in rows if r.measure == "softmax_max"} == {"early_exit"}
    fronts = json.loads((out / "results" / "fronts.json").read_text())
    spec_fronts = [f for f in fronts if f["measure"] == "self_speculative"]
    assert spec_fronts and all(f["mean_accepted_tokens"] >= 1 for f in spec_fronts)
    assert all(f["speedup_at_no_loss"] == f["best_speedup_within_1pct"] for f in spec_fronts)
    site = (out / "site" / "index.html").read_text()
    assert "Mean accepted tokens" in site and "self_speculative+stop" in site

    assert main(["fidelity", "--config", str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "Self-speculative decoding: online beside replay" in printed
    report = json.loads((out / "fidelity" / "fidelity.json").read_text())
    points = [p for p in report["points"] if p.get("method") == "self_speculative"]
    assert len(points) == (2 + 2) * 2  # online points (E x k=3; stop thresholds) x batches
    for point in points:
        assert point["lossless_token_divergence"] == 0.0  # online = full depth
        assert point["cycles"]["accepted_equal"]  # online accepted counts = replay's
        assert point["cycles"]["drafted_within_bounds"] == 1.0
        assert point["online_quality"] == point["replay_quality"]
        assert point["predicted_speedup"] > 0 and point["realised_speedup"] > 0
    after = read_results(out / "results")
    online = [r for r in after if r.method == "self_speculative" and r.mode == "online"]
    assert len(online) == len(points) and all(r.quality == r.quality_full_depth for r in online)
    assert not [r for r in after if r.method == "early_exit" and r.mode == "online"]  # measures: []
    # a rerun reuses every stored part
    assert main(["fidelity", "--config", str(path), "--no-progress"]) == 0
    assert "0 measure(s) decoded" in capsys.readouterr().out
