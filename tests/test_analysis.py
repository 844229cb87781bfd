"""The study's analyses (suite/analysis.py) on constructed traces whose answers are worked
out by hand in the comments, the figures and tables they write, and `exitbench analyze` end
to end on a micro T5 the command trains itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

from suite.analysis import (
    AnalysisError,
    AnalysisSettings,
    analyse_traces,
    analysis_tables,
    layer_stats,
    nondecreasing_from,
    scaled_start_layers,
    sequence_saturation,
    split_easy_difficult,
    stable_prediction_fraction,
    strictly_increasing_from,
    write_analysis,
    write_figures,
)
from suite.traces import TraceArrays


def make_traces(example_ids, *, top1_id=None, final_prob=None, cos_last=None,
                num_layers=None) -> TraceArrays:
    """Traces of the given per-token rows; fields not given are filled with harmless values."""
    given = next(a for a in (top1_id, final_prob, cos_last) if a is not None)
    shape = np.asarray(given).shape if num_layers is None else (len(example_ids), num_layers)
    n, layers = shape

    def arr(values, fill, dtype):
        return np.asarray(values, dtype=dtype) if values is not None else np.full(shape, fill,
                                                                                  dtype)

    top1 = arr(top1_id, 7, np.int32)
    cos = arr(cos_last, 1.0, np.float32)
    probs = arr(final_prob, 0.5, np.float32)
    position = np.zeros(n, np.int32)
    return TraceArrays(example_id=np.asarray(example_ids, dtype=object), position=position,
                       final_id=top1[:, -1].copy(), gold_id=np.full(n, -1, np.int32),
                       top1_id=top1, top1_prob=probs.copy(), top2_prob=probs / 2,
                       cos_prev=np.ones(shape, np.float32), cos_last=cos, final_prob=probs,
                       cos_prev_normed=np.ones(shape, np.float32), cos_last_normed=cos.copy())


# -- monotonicity of predictions and confidence ----------------------------------------------------
PREDICTIONS = make_traces(
    ["a", "a", "b", "b"],
    top1_id=[[5, 5, 5],    # stable everywhere
             [1, 2, 2],    # stable from layer 1
             [2, 1, 2],    # layer 0 equals the last but layer 1 does not: stable only at 2
             [3, 3, 4]],   # stable only at the last layer
    final_prob=[[0.2, 0.5, 0.9],   # rising: non-decreasing from every layer
                [0.5, 0.4, 0.6],   # dips after layer 0: non-decreasing from 1
                [0.3, 0.3, 0.3],   # flat: ties count as non-decreasing
                [0.9, 0.8, 0.7]])  # falling: only the last layer


def test_stable_prediction_fraction():
    np.testing.assert_allclose(stable_prediction_fraction(PREDICTIONS), [1 / 4, 2 / 4, 1.0])


def test_confidence_mean_std_and_nondecreasing_share():
    stats = layer_stats(PREDICTIONS)
    np.testing.assert_allclose(stats.final_prob_mean, [0.475, 0.5, 0.625], atol=1e-7)
    # layer 0: deviations -.275, .025, -.175, .425; squares sum to .2875; / 4 (ddof 0)
    assert stats.final_prob_std[0] == pytest.approx(np.sqrt(0.2875 / 4), abs=1e-7)
    # layer 2: .9 .6 .3 .7, mean .625; squares .075625 .000625 .105625 .005625 -> .1875 / 4
    assert stats.final_prob_std[2] == pytest.approx(np.sqrt(0.1875 / 4), abs=1e-7)
    np.testing.assert_allclose(stats.nondecreasing_share, [2 / 4, 3 / 4, 1.0])
    np.testing.assert_allclose(stats.stable_fraction, [1 / 4, 2 / 4, 1.0])


def test_order_helpers_treat_ties_as_required():
    rows = np.array([[1.0, 1.0, 2.0], [1.0, 2.0, 3.0], [3.0, 2.0, 2.0]])
    np.testing.assert_array_equal(nondecreasing_from(rows),
                                  [[1, 1, 1], [1, 1, 1], [0, 1, 1]])
    np.testing.assert_array_equal(strictly_increasing_from(rows),
                                  [[0, 1, 1], [1, 1, 1], [0, 0, 1]])


# -- hidden-state saturation ----------------------------------------------------------------------
# Four layers (compared layers 0..2; the last, whose similarity is 1, is left out), threshold
# 0.875; every value is exact in binary, so `>=` at the threshold is tested exactly.
THRESHOLD = 0.875
SATURATION = make_traces(
    ["A", "A", "B", "C", "C", "C", "D"],
    cos_last=[[0.5, 0.9375, 0.875, 1.0],      # A: curve .625 .875 .90625 -> first 1, 2 layers
              [0.75, 0.8125, 0.9375, 1.0],    #    mean 2.40625 / 3
              [0.25, 0.25, 0.5, 1.0],         # B: never saturated, mean 1/3, tie at 0 -> 1
              [0.9375, 0.96875, 0.9375, 1.0],  # C: first 0, 3 layers, mean 2.84375 / 3
              [0.9375, 0.96875, 0.9375, 1.0],
              [0.9375, 0.96875, 0.9375, 1.0],
              [0.5, 0.75, 0.875, 1.0]])        # D: first 2 (== threshold), 1 layer, 2.125 / 3


def test_sequence_saturation_table():
    sat = sequence_saturation(SATURATION, THRESHOLD)
    assert list(sat.example_id) == ["A", "B", "C", "D"]
    np.testing.assert_array_equal(sat.length_tokens, [2, 1, 3, 1])
    np.testing.assert_allclose(sat.curve[0], [0.625, 0.875, 0.90625])
    np.testing.assert_allclose(sat.mean_similarity,
                               [2.40625 / 3, 1 / 3, 2.84375 / 3, 2.125 / 3])
    np.testing.assert_array_equal(sat.first_saturated_layer, [1, -1, 0, 2])
    np.testing.assert_array_equal(sat.num_saturated_layers, [2, 0, 3, 1])
    # per token: a0 first 1 (2 layers), a1 first 2 (1), b0 never, c* first 0 (3), d0 first 2
    np.testing.assert_array_equal(sat.token_first_saturated_layer, [1, 2, -1, 0, 0, 0, 2])
    np.testing.assert_array_equal(sat.token_num_saturated_layers, [2, 1, 0, 3, 3, 3, 1])
    # strictly increasing curves: A rises, B ties at 0, C falls after 1, D rises
    np.testing.assert_array_equal(sat.increasing, [[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(sat.token_increasing[:3], [[0, 0, 1], [1, 1, 1], [0, 1, 1]])


def test_easy_difficult_selection_and_k_capping():
    sat = sequence_saturation(SATURATION, THRESHOLD)  # means: C > A > D > B
    one = split_easy_difficult(sat.mean_similarity, 1)
    assert (one.k, list(one.easy), list(one.difficult)) == (1, [2], [1])
    capped = split_easy_difficult(sat.mean_similarity, 1000)
    assert (capped.k_requested, capped.k) == (1000, 2)  # half of 4 sequences
    assert list(capped.easy) == [2, 0] and list(capped.difficult) == [1, 3]
    # equal means: one ranking decides both ends, so the groups never share a sequence
    ties = split_easy_difficult(np.full(5, 0.5), 10)
    assert ties.k == 2 and list(ties.easy) == [0, 1] and list(ties.difficult) == [4, 3]
    assert split_easy_difficult(np.array([0.3]), 5).k == 0
    with pytest.raises(AnalysisError):
        split_easy_difficult(sat.mean_similarity, 0)


def test_group_statistics_and_increasing_shares():
    settings = AnalysisSettings(saturation_threshold=THRESHOLD, top_k=10,
                                increasing_from=(0, 12))  # 12 of 24 -> layer 2 of 4
    a = analyse_traces(SATURATION, settings, model="m", kind="forced", task="t")
    assert a.start_layers == (0, 2) and a.split.k == 2
    every = a.groups["all"]
    assert (every.num_sequences, every.num_tokens) == (4, 7)
    assert every.mean_first_saturated_layer == pytest.approx(1.0)  # A 1, C 0, D 2; B never
    assert every.share_never_saturated == pytest.approx(0.25)
    assert every.mean_num_saturated_layers == pytest.approx(6 / 4)
    assert every.token_mean_first_saturated_layer == pytest.approx(5 / 6)
    assert every.token_share_never_saturated == pytest.approx(1 / 7)
    assert every.increasing_sequences == pytest.approx((0.5, 1.0))   # A, D from 0
    assert every.increasing_tokens == pytest.approx((2 / 7, 1.0))    # a1, d0 from 0
    easy, hard = a.groups["easy"], a.groups["difficult"]              # {C, A} and {B, D}
    assert easy.mean_similarity == pytest.approx((2.84375 + 2.40625) / 6)
    assert hard.mean_similarity == pytest.approx((1 + 2.125) / 6)
    assert easy.mean_length_tokens == pytest.approx(2.5) and hard.num_tokens == 2
    np.testing.assert_allclose(easy.curve, [(0.9375 + 0.625) / 2, (0.96875 + 0.875) / 2,
                                            (0.9375 + 0.90625) / 2])
    assert hard.share_never_saturated == pytest.approx(0.5)
    assert hard.mean_first_saturated_layer == pytest.approx(2.0)
    assert easy.increasing_sequences == pytest.approx((0.5, 1.0))    # A yes, C no


@pytest.mark.parametrize(("num_layers", "expected"), [
    (24, (0, 4, 8)), (32, (0, 4, 8)), (12, (0, 2, 4)), (6, (0, 1, 2)), (3, (0, 1)), (2, (0,)),
])
def test_start_layers_scale_with_depth(num_layers, expected):
    assert scaled_start_layers([0, 4, 8], num_layers) == expected


def test_too_few_layers_or_tokens_are_clear_errors():
    one_layer = make_traces(["a"], cos_last=[[1.0]])
    with pytest.raises(AnalysisError, match="at least 2"):
        analyse_traces(one_layer)
    empty = make_traces([], num_layers=3, cos_last=np.zeros((0, 3)))
    with pytest.raises(AnalysisError, match="no tokens"):
        analyse_traces(empty)
    with pytest.raises(AnalysisError, match="negative"):
        scaled_start_layers([-1], 6)


# -- outputs ----------------------------------------------------------------------------------------
def _analyses():
    rng = np.random.default_rng(0)
    out = []
    for model in ("tiny-vanilla", "tiny-calm"):
        for kind in ("generated", "forced"):
            ids = np.repeat([f"ex{i}" for i in range(6)], 4)
            cos = np.sort(rng.uniform(0.2, 1.0, (24, 4)), axis=1)
            cos[:, -1] = 1.0
            traces = make_traces(ids, cos_last=cos,
                                 top1_id=rng.integers(0, 3, (24, 4)),
                                 final_prob=rng.uniform(0, 1, (24, 4)))
            out.append(analyse_traces(traces, AnalysisSettings(top_k=2), model=model,
                                      kind=kind, task="cnn_dailymail",
                                      model_label=f"{model} <trained here>"))
    return out


def test_tables_and_figures_are_written(tmp_path):
    analyses = _analyses()
    tables = analysis_tables(analyses)
    assert len(tables["layers"]) == 4 * 4 and len(tables["sequences"]) == 4 * 6
    assert set(tables["groups"]["group"]) == {"all", "easy", "difficult"}
    assert (tables["sequences"]["group"] == "easy").sum() == 4 * 2
    summary = write_analysis(analyses, tmp_path / "out", header="tiny models trained here")
    for item in summary["figures"]:
        for suffix in ("png", "svg"):
            path = tmp_path / "out" / item[suffix]
            assert path.is_file() and path.stat().st_size > 1000, path
        assert (tmp_path / "out" / item["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (tmp_path / "out" / item["svg"]).read_bytes()[:2000]
    for item in summary["tables"]:
        table = json.loads((tmp_path / "out" / item["json"]).read_text("utf-8"))
        assert table["rows"] and set(table["columns"]) == set(table["rows"][0])
        assert (tmp_path / "out" / item["csv"]).read_text("utf-8").startswith("task,model,kind")
    saved = json.loads((tmp_path / "out" / "summary.json").read_text("utf-8"))
    assert len(saved["analyses"]) == 4 and saved["analyses"][0]["k"] == 2
    assert "tiny-calm" in (tmp_path / "out" / "README.md").read_text("utf-8")
    # a second write of the same analyses gives the same SVG bytes (no timestamps)
    svg = (tmp_path / "out" / "confidence.svg").read_bytes()
    write_figures(analyses, tmp_path / "out")
    assert (tmp_path / "out" / "confidence.svg").read_bytes() == svg


# -- the command ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_analyze_command_trains_records_and_writes(tmp_path, samples_dir, capsys):
    import yaml

    from suite.cli import main

    out = tmp_path / "run"
    train = {"objective": "calm", "preset": "micro", "tasks": ["squad"],
             "split": "validation[:40]", "max_source_tokens": 32, "max_target_tokens": 6,
             "steps": 3, "batch_size": 8}
    config = {
        "name": "analyze-test", "output_dir": str(out), "data_dir": str(samples_dir),
        "tokenizer": {"path": str(out / "tokenizer"), "tasks": ["squad"],
                      "split": "validation[:40]", "heldout_split": "validation[40:50]",
                      "vocab_size": 300, "max_unk_rate": 1.0},
        "models": [{"name": "micro-calm", "path": str(out / "models/micro-calm"),
                    "label": "micro T5 trained here", "train": train},
                   {"name": "micro-vanilla", "path": str(out / "models/micro-vanilla"),
                    "label": "micro T5 trained here",
                    "train": {**train, "objective": "vanilla"}}],
        "tasks": [{"name": "squad", "split": "validation[100:106]", "max_source_tokens": 32,
                   "max_target_tokens": 6, "max_new_tokens": 4}],
        "analysis": {"top_k": 2},
        "record_batch_size": 3, "shard_size": 3, "leaderboard": False}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["analyze", "--config", str(path), "--no-progress"]) == 0
    folder = out / "analysis" / "squad"
    summary = json.loads((folder / "summary.json").read_text("utf-8"))
    assert {(a["model"], a["kind"]) for a in summary["analyses"]} == {
        (m, k) for m in ("micro-calm", "micro-vanilla") for k in ("generated", "forced")}
    assert all(a["num_layers"] == 3 and a["k"] == 2 and a["start_layers"] == [0, 1]
               for a in summary["analyses"])
    assert (folder / "stable_predictions.png").is_file()
    assert (out / "traces/squad/micro-calm/forced/manifest.json").is_file()
    assert "analysis squad" in capsys.readouterr().out
    # a rerun records nothing new
    assert main(["analyze", "--config", str(path), "--no-progress", "--model",
                 "micro-calm"]) == 0
    assert "0 shard(s) recorded" in capsys.readouterr().out

    config["models"] = []
    path.write_text(yaml.safe_dump(config))
    assert main(["analyze", "--config", str(path)]) == 2
    assert "no models" in capsys.readouterr().err


def test_prefix_length_statistics_by_hand():
    import dataclasses

    # two sequences of three tokens; similarity rises with the prefix length
    cos = [[0.1, 0.2, 1.0], [0.5, 0.6, 1.0], [0.9, 0.95, 1.0],
           [0.2, 0.2, 1.0], [0.6, 0.4, 1.0], [0.92, 0.9, 1.0]]
    traces = dataclasses.replace(make_traces(["a"] * 3 + ["b"] * 3, cos_last=cos),
                                 position=np.array([0, 1, 2, 0, 1, 2], np.int32))
    result = analyse_traces(traces, AnalysisSettings(top_k=2, saturation_threshold=0.9))
    prefix = result.prefix
    assert prefix.prefix_length.tolist() == [0, 1, 2] and prefix.num_tokens.tolist() == [2, 2, 2]
    np.testing.assert_allclose(prefix.mean_similarity, [(0.15 + 0.2) / 2, (0.55 + 0.5) / 2,
                                                        (0.925 + 0.91) / 2], atol=1e-6)
    np.testing.assert_allclose(prefix.share_never_saturated, [1.0, 1.0, 0.0])
    assert prefix.spearman > 0.9  # longer prefixes are easier here
    assert (prefix.k, prefix.mean_prefix_easy, prefix.mean_prefix_difficult) == (2, 2.0, 0.0)
    assert prefix.mean_prefix_all == 1.0
    table = analysis_tables([result])["prefix"]
    assert table["prefix_length"].tolist() == [0, 1, 2]


def test_saturation_uses_normed_states_by_default_and_raw_by_option():
    import dataclasses

    cos = [[0.1, 0.2, 1.0], [0.5, 0.6, 1.0]]
    normed = [[0.8, 0.9, 1.0], [0.9, 0.95, 1.0]]
    traces = dataclasses.replace(make_traces(["a", "a"], cos_last=cos),
                                 cos_last_normed=np.asarray(normed, np.float32))
    study = analyse_traces(traces, AnalysisSettings(top_k=1))
    np.testing.assert_allclose(study.layers.similarity_mean[:2], [0.85, 0.925], atol=1e-6)
    raw = analyse_traces(traces, AnalysisSettings(top_k=1, states="raw"))
    np.testing.assert_allclose(raw.layers.similarity_mean[:2], [0.3, 0.4], atol=1e-6)
    with pytest.raises(AnalysisError, match="states"):
        AnalysisSettings(states="final")
    with pytest.raises(Exception, match="cos_last_normed"):
        analyse_traces(dataclasses.replace(traces, cos_last_normed=None))
