"""Online early-exit decoding (suite/online.py) and the fidelity helpers (suite/fidelity.py).

A random tiny T5 (random weights, test use only) whose layers disagree, so that exits at
different layers give different tokens and the checks below can fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import hf_forward

from suite.backbones.t5 import T5Adapter, random_t5, t5_exit_logits
from suite.decoding import greedy_decode, pad_batch, traced_greedy_decode
from suite.errors import ExitbenchError
from suite.fidelity import cut_at_eos, divergence, online_thresholds
from suite.measures import get_measure
from suite.online import ExitPolicy, decode_examples, online_greedy_decode

TINY = {"vocab_size": 512, "d_model": 64, "d_ff": 128, "num_layers": 4, "num_decoder_layers": 4,
        "num_heads": 4, "d_kv": 16}
STEPS = 20
IDS = list("abcd")


@pytest.fixture(scope="module")
def setup():
    adapter = T5Adapter(random_t5(seed=1, **TINY))
    generator = torch.Generator().manual_seed(0)
    sources = [torch.randint(2, 512, (n,), generator=generator).tolist() + [1]
               for n in (5, 9, 7, 12)]
    ids, mask = pad_batch(sources, 0)
    traces = traced_greedy_decode(adapter, ids, mask, IDS, STEPS)
    return {"adapter": adapter, "sources": sources, "ids": ids, "mask": mask, "traces": traces}


def policy(name, threshold, min_layer=0, **options):
    return ExitPolicy(get_measure(name)(**options), threshold, min_layer)


@pytest.mark.parametrize("name,options", [("softmax_margin", {}), ("hidden_state_saturation", {}),
                                          ("free_shallow_deep", {"shallow_layer": 1}),
                                          ("top1_rising_heuristic", {})])
def test_a_threshold_that_never_exits_reproduces_full_depth_greedy_output(setup, name, options):
    reference = greedy_decode(setup["adapter"], setup["ids"], setup["mask"], STEPS)
    out = online_greedy_decode(setup["adapter"], setup["ids"], setup["mask"], IDS, STEPS,
                               policy(name, float("inf"), **options))
    assert np.array_equal(out.decoded.token_ids, reference.token_ids)
    assert np.all(out.traces.exit_layer == TINY["num_decoder_layers"] - 1)
    assert np.array_equal(out.traces.final_id, setup["traces"].final_id)


# thresholds chosen (from the traces' score quantiles) so that exits are mixed across layers
@pytest.mark.parametrize("name,threshold,options", [
    ("softmax_margin", 0.02, {}), ("free_shallow_deep", 0.03, {"shallow_layer": 1}),
    ("free_shallow_deep", 0.005, {"shallow_layer": 0}), ("hidden_state_saturation", 0.85, {})])
def test_batched_and_batch_1_decoding_agree(setup, name, threshold, options):
    exit_policy = policy(name, threshold, **options)
    batched = online_greedy_decode(setup["adapter"], setup["ids"], setup["mask"], IDS, STEPS,
                                   exit_policy)
    exits = np.bincount(batched.traces.exit_layer, minlength=4)
    assert exits[-1] > 0 and exits[:-1].sum() > 0, f"exits not mixed: {exits}"
    for row, source in enumerate(setup["sources"]):
        ids, mask = pad_batch([source], 0)
        single = online_greedy_decode(setup["adapter"], ids, mask, [IDS[row]], STEPS,
                                      exit_policy)
        mine = batched.traces.example_id == IDS[row]
        assert single.decoded.rows()[0].tolist() == batched.decoded.rows()[row].tolist()
        assert np.array_equal(single.traces.exit_layer, batched.traces.exit_layer[mine])
    # and the early exits changed the output (otherwise this test would prove little)
    assert not np.array_equal(batched.traces.final_id, setup["traces"].final_id)


def _hf_states(adapter, ids, mask, tokens):
    """HF's own teacher-forced pass over ``tokens``: hidden states and logits."""
    decoder_inputs = torch.tensor([[adapter.decoder_start_token_id, *tokens[:-1]]])
    out, _ = hf_forward(adapter.model, ids, mask, decoder_inputs)
    return out.decoder_hidden_states, out.logits


@pytest.mark.parametrize("min_layer", [0, 1, 2])
def test_always_exiting_at_min_layer_matches_a_hand_built_reference(setup, min_layer):
    """Every token exits at min_layer: the output is the greedy output of the first
    min_layer + 1 layers and the exit head, and each skipped layer's cache holds its own K/V
    projections of the exited (propagated) state."""
    adapter = setup["adapter"]
    ids, mask = pad_batch([setup["sources"][1]], 0)
    out = online_greedy_decode(adapter, ids, mask, ["b"], STEPS,
                               policy("static_layer", 0.0, min_layer))
    tokens = out.decoded.rows()[0].tolist()
    assert np.all(out.traces.exit_layer == min_layer)
    # reference: grow the output one token at a time with HF's parallel pass, reading the
    # state after block min_layer (un-normed: not the last entry) through the exit head
    reference = []
    for _ in range(len(tokens)):
        states, _ = _hf_states(adapter, ids, mask, [*reference, 0])
        with torch.inference_mode():
            logits = t5_exit_logits(adapter.model, states[min_layer + 1][0, -1])
        reference.append(int(logits.argmax()))
        if reference[-1] == adapter.eos_token_id:
            break
    assert tokens == reference
    # propagation: the cache of every skipped layer j holds k_j(norm_j(h_min_layer))
    states, _ = _hf_states(adapter, ids, mask, tokens)
    exited = states[min_layer + 1][0]  # [T, d]
    cache = out.state.cache.self_attention_cache
    for layer in range(min_layer + 1, TINY["num_decoder_layers"]):
        attention = adapter.blocks[layer].layer[0]
        with torch.inference_mode():
            keys = attention.SelfAttention.k(attention.layer_norm(exited))
        cached = cache.layers[layer].keys[0].transpose(0, 1).reshape(len(tokens), -1)
        torch.testing.assert_close(cached, keys, rtol=1e-4, atol=1e-5)


def test_free_outputs_match_a_full_parallel_pass_over_the_emitted_tokens(setup):
    """FREE's synchronized parallel decoding gives skipped tokens their real deep K/V before
    a deep token reads them, so every token equals HF's parallel pass over the emitted
    prefix: the shallow layer's prediction where it exited, the last layer's elsewhere."""
    adapter, shallow, last = setup["adapter"], 1, TINY["num_decoder_layers"] - 1
    mixed = 0
    for source in setup["sources"]:
        ids, mask = pad_batch([source], 0)
        for threshold in (0.03, 0.05):
            out = online_greedy_decode(adapter, ids, mask, ["x"], STEPS,
                                       policy("free_shallow_deep", threshold,
                                              shallow_layer=shallow))
            tokens = out.decoded.rows()[0].tolist()
            exits = out.traces.exit_layer
            assert set(exits.tolist()) <= {shallow, last}
            mixed += len(set(exits.tolist())) == 2
            states, logits = _hf_states(adapter, ids, mask, tokens)
            with torch.inference_mode():
                shallow_pred = t5_exit_logits(adapter.model, states[shallow + 1][0]).argmax(-1)
            expected = torch.where(torch.from_numpy(exits == shallow), shallow_pred,
                                   logits[0].argmax(-1))
            assert tokens == expected.tolist()
    assert mixed >= 2, "too few decodes mixed shallow and deep tokens to test catch-up"


@pytest.mark.parametrize("name,threshold,options", [
    ("softmax_margin", 0.02, {}), ("softmax_max", 0.05, {}), ("hidden_state_saturation", 0.85, {}),
    ("top1_rising_heuristic", 0.03, {}), ("free_shallow_deep", 0.03, {"shallow_layer": 1}),
    ("static_layer", 0.5, {})])
def test_first_tokens_exit_where_replay_says(setup, name, threshold, options):
    """Until an early exit has changed a state, online decoding follows the recorded
    trajectory, so its scores must agree with replay's: in every example, each token up to
    and including the first one that exits early exits where replay says."""
    from suite.replay import exit_layers

    traces = setup["traces"]
    exit_policy = policy(name, threshold, **options)
    replayed = exit_layers(exit_policy.measure.scores(traces), [threshold])[0]
    out = online_greedy_decode(setup["adapter"], setup["ids"], setup["mask"], IDS, STEPS,
                               exit_policy)
    compared, early = first_tokens_follow_replay(out, traces, replayed)
    assert early >= 1 and compared >= 4


def first_tokens_follow_replay(out, traces, replayed) -> tuple[int, int]:
    """Assert that in every example the tokens up to the first early exit exit where replay
    says; returns (tokens compared, examples with an early exit)."""
    last = TINY["num_decoder_layers"] - 1
    compared = early = 0
    for example in IDS:
        online_exits = out.traces.exit_layer[out.traces.example_id == example]
        replay_exits = replayed[traces.example_id == example]
        early_positions = np.flatnonzero(online_exits < last)
        upto = early_positions[0] + 1 if early_positions.size else online_exits.size
        assert online_exits[:upto].tolist() == replay_exits[:upto].tolist()
        compared += upto
        early += bool(early_positions.size)
    return compared, early


def test_online_traces_hold_what_was_computed(setup):
    out = online_greedy_decode(setup["adapter"], setup["ids"], setup["mask"], IDS, STEPS,
                               policy("softmax_margin", 0.02))
    traces = out.traces
    traces.validate()
    rows = np.arange(traces.num_tokens)
    exited_early = traces.exit_layer < 3
    # at the exit layer the head ran: the emitted token is its top-1
    assert np.array_equal(traces.top1_id[rows, traces.exit_layer][exited_early],
                          traces.final_id[exited_early])
    assert np.all(np.isnan(traces.cos_last)) and np.all(np.isnan(traces.final_prob))


def test_decode_examples_batches_and_full_depth_baseline(setup):
    adapter, sources = setup["adapter"], setup["sources"]
    full = decode_examples(adapter, sources, IDS, 3, STEPS, None)
    online = decode_examples(adapter, sources, IDS, 3, STEPS, policy("softmax_margin", 9.0))
    assert np.array_equal(full.traces.final_id, online.traces.final_id)
    assert full.traces.example_ids() == IDS and full.seconds > 0
    assert full.num_tokens == setup["traces"].num_tokens


def test_paired_decoding_gives_the_same_outputs_as_separate_runs(setup):
    from suite.online import decode_paired

    adapter, sources = setup["adapter"], setup["sources"]
    exit_policy = policy("softmax_margin", 0.02)
    full, online = decode_paired(adapter, sources, IDS, 3, STEPS, exit_policy)
    alone = decode_examples(adapter, sources, IDS, 3, STEPS, exit_policy)
    assert np.array_equal(online.traces.final_id, alone.traces.final_id)
    assert np.array_equal(online.traces.exit_layer, alone.traces.exit_layer)
    assert np.array_equal(full.traces.final_id, setup["traces"].final_id)
    assert full.seconds > 0 and online.seconds > 0


def test_policies_that_cannot_run_online_say_why():
    with pytest.raises(ExitbenchError, match="not deployable"):
        policy("oracle", 0.5).check(4)
    with pytest.raises(ExitbenchError, match="min_layer 4"):
        policy("softmax_margin", 0.5, min_layer=4).check(4)


def test_divergence_counts_positions_first_differences_and_changed_decisions():
    online = [[1, 2, 3], [4, 5], [7, 8, 9]]
    replayed = [[1, 2, 3], [4, 6, 6], [7, 0, 9]]
    exits_online = [[0, 0, 0], [1, 1], [2, 3, 3]]
    exits_replay = [[0, 0, 0], [1, 1, 1], [2, 2, 3]]
    gap = divergence(online, replayed, exits_online, exits_replay)
    assert gap.token_rate == pytest.approx(3 / 9)  # [4,5] vs [4,6,6]: 2; [7,8,9] vs [7,0,9]: 1
    assert gap.examples_diverged == pytest.approx(2 / 3)
    assert gap.first_positions == [1, 1]
    assert gap.causes == {}  # no full-depth tokens: no causes
    # causes: example 2 parts at 1 with the same input (4 = recorded) and exit: state;
    # example 3 parts at 1, its input 7 differs from the recorded 2: fed back
    full_depth = [[1, 2, 3], [4, 6, 6], [2, 0, 9]]
    gap = divergence(online, replayed, exits_online, exits_replay, full_depth)
    assert gap.causes == {"fed_back": 0.5, "decision": 0.0, "state": 0.5}
    exits_online[1] = [1, 2]  # example 2 now exits elsewhere at its first difference
    gap = divergence(online, replayed, exits_online, exits_replay, full_depth)
    assert gap.causes == {"fed_back": 0.5, "decision": 0.5, "state": 0.0}
    assert divergence([[1]], [[1, 2]]).first_positions == [1]
    assert [c.tolist() for c in cut_at_eos([np.array([3, 1, 4]), np.array([5])], 1)] == [[3], [5]]


def test_online_thresholds_spread_over_the_sweep():
    from suite.config import parse_config

    config = parse_config({"tasks": [{"name": "squad"}], "online": {"num_thresholds": 3}})
    measure = get_measure("static_layer")()
    from suite.config import MeasureConfig

    picked = online_thresholds(config, MeasureConfig(name="static_layer"), measure, 6)
    assert picked == [1 / 6, 4 / 6, 1.0] or picked == pytest.approx([1 / 6, 0.5, 1.0]) \
        or len(picked) == 3 and picked[0] == pytest.approx(1 / 6) and picked[-1] == 1.0


def test_fidelity_command_writes_report_rows_and_reuses_finished_measures(
        random_backbone, samples_dir, tmp_path, capsys):
    import json

    import yaml

    from suite.cli import main
    from suite.results import read_results

    out = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "name": "fidelity-test", "output_dir": str(out), "data_dir": str(samples_dir),
        "models": [{"name": "random", "path": str(random_backbone), "label": "random weights"}],
        "tasks": [{"name": "squad", "split": "validation[:6]", "max_new_tokens": 8}],
        "measures": ["softmax_margin", "static_layer"], "profiles": ["generic_cpu"],
        "online": {"batch_sizes": [1, 4], "num_thresholds": 2, "threads": 1},
        "leaderboard": False}))
    assert main(["fidelity", "--config", str(config), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "online: 2 measure(s) decoded, 0 reused" in printed
    report = json.loads((out / "fidelity" / "fidelity.json").read_text())
    assert len(report["points"]) == 2 * 2 * 2  # measures x thresholds x batch sizes
    never = [p for p in report["points"] if p["measure"] == "softmax_margin"
             and p["threshold"] == 1.0]
    for point in never:  # full depth: online = replay exactly, no divergence
        assert point["online_quality"] == point["replay_quality"]
        assert point["divergence"]["token_rate"] == 0.0
        assert point["predicted_speedup"] > 0 and point["online_tokens_per_s"] > 0
    from suite.traces import read_shard

    for point in report["points"]:  # each point's emitted tokens, in the trace format
        traces = read_shard(point["traces"], point["traces_sha256"])
        assert traces.exit_layer is not None and traces.num_tokens == point["online_tokens"]
    rows = read_results(out / "results")
    online_rows = [r for r in rows if r.mode == "online"]
    assert len(online_rows) == 8 and {r.mode for r in rows} == {"online", "replay"}
    # replayed rows of every threshold of the same measures sit beside them
    assert {r.measure for r in rows if r.mode == "replay"} == {"softmax_margin", "static_layer"}
    assert (out / "fidelity" / "fidelity.md").read_text().count("| squad |") >= 8
    # a rerun reuses the stored measures
    assert main(["online", "--config", str(config), "--no-progress",
                 "--no-leaderboard"]) == 0
    assert "0 measure(s) decoded, 2 reused" in capsys.readouterr().out


@pytest.mark.parametrize("name,threshold,options", [
    ("softmax_margin", 0.03, {}), ("free_shallow_deep", 0.03, {"shallow_layer": 1})])
def test_decayed_threshold_exits_where_scheduled_replay_says(setup, name, threshold, options):
    """CALM's decay online and in replay: the same thresholds per position, so the first
    tokens of each example (up to the first early exit) exit where replay says, and the
    decay makes some token exit that the constant threshold keeps."""
    from suite.schedules import CalmDecaySchedule, replay_scheduled

    traces = setup["traces"]
    schedule = CalmDecaySchedule(tau=4.0, max_length=STEPS)
    measure = get_measure(name)(**options)
    exit_policy = ExitPolicy(measure, threshold, 0, schedule)
    replayed = replay_scheduled(traces, measure.scores(traces), [threshold], schedule,
                                measure=measure).exits[0]
    constant = replay_scheduled(traces, measure.scores(traces), [threshold]).exits[0]
    assert (replayed <= constant).all() and (replayed < constant).any()
    out = online_greedy_decode(setup["adapter"], setup["ids"], setup["mask"], IDS, STEPS,
                               exit_policy)
    assert first_tokens_follow_replay(out, traces, replayed)[0] >= 4


def test_no_exit_before_min_position_online(setup):
    exit_policy = ExitPolicy(get_measure("static_layer")(), 0.0, 0, None, min_position=3)
    out = online_greedy_decode(setup["adapter"], setup["ids"], setup["mask"], IDS, STEPS,
                               exit_policy)
    early = out.traces.position < 3
    assert (out.traces.exit_layer[early] == TINY["num_decoder_layers"] - 1).all()
    assert (out.traces.exit_layer[~early] == 0).all()


def test_free_adaptive_pairs_are_the_parallel_passes_predictions(setup):
    """FREE's pairs online: for each deep token with pending shallow tokens, every such token's
    shallow confidence and whether its shallow prediction equals the deep one. Checked against
    HF's parallel pass over the emitted tokens (which FREE's catch-up reproduces), walked
    token by token; the next batch starts with a refitted threshold."""
    from suite.adaptive import AdaptiveSettings, PairStatistics

    adapter, shallow, last = setup["adapter"], 0, TINY["num_decoder_layers"] - 1
    measure = get_measure("free_shallow_deep")(shallow_layer=shallow)
    exit_policy = ExitPolicy(measure, 0.005, 0, AdaptiveSettings()).fresh()
    ids, mask = pad_batch([setup["sources"][2]], 0)  # deep tokens after shallow ones (random
    # weights: few inputs mix them)
    out = online_greedy_decode(adapter, ids, mask, ["d"], STEPS, exit_policy)
    tokens, exits = out.decoded.rows()[0].tolist(), out.traces.exit_layer
    assert set(exits.tolist()) == {shallow, last}
    states, logits = _hf_states(adapter, ids, mask, tokens)
    with torch.inference_mode():
        probs = torch.softmax(t5_exit_logits(adapter.model, states[shallow + 1][0]), -1)
    top2 = probs.topk(2, -1)
    confidence = (top2.values[:, 0] - top2.values[:, 1]).numpy()
    same = (top2.indices[:, 0] == logits[0].argmax(-1)).numpy()
    expected = PairStatistics.empty()
    pending = []
    for t, layer in enumerate(exits):
        if layer == shallow:
            pending.append(t)
        else:
            if pending:
                chosen = [*pending, t]
                expected.add(confidence[chosen], same[chosen])
            pending = []
    got = exit_policy.adaptive.stats
    assert got.count.sum() > 0
    np.testing.assert_array_equal(got.count, expected.count)
    np.testing.assert_allclose(got.total, expected.total, rtol=1e-5)
    assert exit_policy.adaptive.refits == 0  # refits come before the next sequence
    online_greedy_decode(adapter, ids, mask, ["d"], STEPS, exit_policy)
    assert exit_policy.adaptive.refits == 1
    assert exit_policy.adaptive.threshold in np.linspace(0.3, 0.9, 10).tolist()
