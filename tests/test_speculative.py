"""Self-speculative decoding: replay from traces (suite/speculative/replay.py), the online
decoder (suite/speculative/online.py), the adapter's rollback, and the cost of a cycle
schedule (suite/cost.py).

Models here have random weights (test use only) whose layers disagree, so drafts are
rejected often and at different places in different rows; EOS is set to a token the model
emits mid-sequence so rows end at different cycles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from measure_fixtures import make_traces

from suite.backbones.t5 import T5Adapter, random_t5
from suite.cost import speculative_cost
from suite.decoding import greedy_decode, pad_batch, traced_greedy_decode
from suite.errors import ExitbenchError
from suite.measures import CheckCost, ModelDims, get_measure
from suite.speculative.method import DraftStop, SelfSpeculation, draft_layer_view
from suite.speculative.online import CycleLog, self_speculative_decode
from suite.speculative.replay import emitted_tokens, replay_speculation, replay_statistics

TINY = {"vocab_size": 300, "d_model": 64, "d_ff": 128, "num_layers": 4, "num_decoder_layers": 4,
        "num_heads": 4, "d_kv": 16}
STEPS = 20


# -- replay on hand-built traces ---------------------------------------------------------------
def _two_examples():
    """Example a (EOS=1 at the end): final 5 6 7 8 9 1, draft layer 1 says 5 6 0 8 9 1;
    example b (no EOS, 4 = max_new_tokens tokens): every draft right."""
    final_a, draft_a = [5, 6, 7, 8, 9, 1], [5, 6, 0, 8, 9, 1]
    final_b, draft_b = [2, 3, 4, 5], [2, 3, 4, 5]
    final = np.array(final_a + final_b)
    top1 = np.stack([np.zeros(10), np.array(draft_a + draft_b), final], 1)
    prob = np.full((10, 3), 0.9)
    prob[3, 1] = 0.3  # example a's token 3: the draft is unsure
    traces = make_traces(prob, top1_id=top1, final_id=final)
    traces.example_id = np.array(["a"] * 6 + ["b"] * 4, dtype=object)
    traces.position = np.r_[np.arange(6), np.arange(4)].astype(np.int32)
    return traces


def test_replay_walks_cycles_by_hand():
    traces = _two_examples()
    result = replay_speculation(traces, SelfSpeculation(draft_depth=2, draft_length=2), 6)
    # a: p=0 drafts 5 6, both accepted, + 7; p=3 drafts 8 9, accepted, + EOS. b: p=0 drafts
    # 2 3 + 4; p=3: budget 6 - 3 = 3 allows 2 drafts but one token is left
    assert result.example_index.tolist() == [0, 0, 1, 1]
    assert result.position.tolist() == [0, 3, 0, 3]
    assert result.accepted.tolist() == [2, 2, 2, 1]
    assert result.emitted.tolist() == [3, 3, 3, 1]
    assert result.drafted_low.tolist() == result.drafted_high.tolist() == [2, 2, 2, 2]
    assert result.exact
    np.testing.assert_array_equal(emitted_tokens(traces, result), traces.final_id)

    longer = replay_speculation(traces, SelfSpeculation(2, 8), 10)
    # a at p=3: 8 9 EOS all drafted right: the accepted EOS ends it (no bonus token);
    # b: its 4 tokens drafted right and accepted
    assert longer.position.tolist() == [0, 3, 0]
    assert longer.accepted.tolist() == [2, 3, 4]
    assert longer.emitted.tolist() == [3, 3, 4]
    assert longer.drafted_high.tolist() == [8, 6, 8]  # min(k, budget - 1): 10 - 3 - 1 = 6
    stats = replay_statistics(longer)
    assert stats.mean_accepted_tokens == pytest.approx(10 / 3)
    assert stats.mean_cycles == pytest.approx(1.5)
    assert stats.acceptance_rate_low == pytest.approx(9 / 22)
    assert stats.acceptance_histogram[2:5] == pytest.approx([1 / 3] * 3)

    # example b alone, recorded up to a budget of 4 tokens: 3 drafts at most, then the
    # full model's 4th token
    only_b = traces.take(np.arange(6, 10))
    budget = replay_speculation(only_b, SelfSpeculation(2, 8), 4)
    assert budget.accepted.tolist() == [3] and budget.emitted.tolist() == [4]
    assert budget.drafted_high.tolist() == [3]


def test_replay_gives_bounds_where_the_stopping_rule_leaves_the_trace():
    traces = _two_examples()
    stop = DraftStop(get_measure("softmax_max")(), 0.5, "softmax_max")
    result = replay_speculation(traces, SelfSpeculation(2, 5, stop), 10)
    a = result.example_index == 0
    # p=0: drafts 0, 1 match, 2 is rejected but sure, so drafting goes on past the trace:
    # at least 4 drafts, at most 5; p=3: the first draft is unsure, drafting stops after
    # it (exact); p=5: EOS drafted and accepted, then the draft reads EOS (not recorded)
    assert result.position[a].tolist() == [0, 3, 5]
    assert result.accepted[a].tolist() == [2, 1, 1]
    assert result.emitted[a].tolist() == [3, 2, 1]
    assert result.drafted_low[a].tolist() == [4, 1, 2]
    assert result.drafted_high[a].tolist() == [5, 1, 4]
    assert not result.exact
    np.testing.assert_array_equal(emitted_tokens(traces, result), traces.final_id)


def test_stop_at_eos_stops_the_draft_where_the_trace_shows_an_eos():
    traces = _two_examples()
    result = replay_speculation(traces, SelfSpeculation(2, 8, stop_at_eos=True), 10,
                                eos_token_id=1)
    a = result.example_index == 0
    # p=0: no EOS drafted up to the first rejection (2): the draft goes on off the trace;
    # p=3: 8 9 EOS drafted and accepted: drafting stops after the EOS, exactly
    assert result.accepted[a].tolist() == [2, 3]
    assert result.drafted_low[a].tolist() == [4, 3]
    assert result.drafted_high[a].tolist() == [8, 3]
    with pytest.raises(ValueError, match="eos_token_id"):
        replay_speculation(traces, SelfSpeculation(2, 8, stop_at_eos=True), 10)


def test_draft_layer_view_hides_every_other_layer():
    traces = _two_examples()
    view = draft_layer_view(traces, 1)
    assert np.all(view.top1_id[:, [0, 2]] == -1) and np.all(np.isnan(view.top1_prob[:, [0, 2]]))
    np.testing.assert_array_equal(view.top1_prob[:, 1], traces.top1_prob[:, 1])
    assert np.all(view.final_id == -1) and np.all(np.isnan(view.cos_last))


def test_settings_that_do_not_fit_are_refused():
    traces = _two_examples()
    with pytest.raises(ExitbenchError, match="draft_depth 3 is outside 1..2"):
        replay_speculation(traces, SelfSpeculation(3, 2), 6)
    with pytest.raises(ExitbenchError, match="draft_length 0"):
        replay_speculation(traces, SelfSpeculation(1, 0), 6)
    with pytest.raises(ExitbenchError, match="max_new_tokens"):
        replay_speculation(traces, SelfSpeculation(1, 2), 5)  # example a has 6 tokens
    oracle = DraftStop(get_measure("oracle")(), 0.5, "oracle")
    with pytest.raises(ExitbenchError, match="not deployable"):
        replay_speculation(traces, SelfSpeculation(1, 2, oracle), 6)
    static = DraftStop(get_measure("free_shallow_deep")(), 0.5, "free_shallow_deep")
    with pytest.raises(ExitbenchError, match="makes no check at layer 1"):
        replay_speculation(traces, SelfSpeculation(2, 2, static), 6)


# -- the cost of a schedule ------------------------------------------------------------------
class LinearCosts:
    """A test double: every operation's seconds are a small linear formula, so the schedule
    can be priced by hand."""

    name = "linear"

    def decoder_layer(self, batch_size, context_len, source_len, query_len=1):
        return 1.0 + 0.1 * np.asarray(batch_size) * np.asarray(query_len) \
            + 0.01 * np.asarray(context_len) + 0.0 * np.asarray(source_len)

    def lm_head(self, batch_size):
        return 0.5 * np.asarray(batch_size, np.float64)

    def kv_fill(self, batch_size):
        return 0.0 * np.asarray(batch_size, np.float64)

    def measure_check(self, check_cost, batch_size, measure_name=None):
        return 0.05 * np.asarray(batch_size, np.float64)

    def encoder_prefill(self, batch_size, source_len):
        return 2.0 + 0.0 * np.asarray(batch_size, np.float64)

    def fixed_step(self):
        return 0.2

    def rollback(self, batch_size, context_len):
        return 0.3 + 0.0 * np.asarray(batch_size, np.float64)


DIMS = ModelDims(num_layers=4, d_model=8, d_ff=16, num_heads=2, d_kv=4, vocab_size=10)


def test_cost_of_a_hand_built_schedule_equals_the_hand_computation():
    costs = LinearCosts()
    # one example, draft depth E = 1 of L = 4: cycle 0 at S = 0 drafts 2, cycle 1 at S = 3
    # drafts none (a full-depth step)
    cost = speculative_cost(costs, DIMS, 1, [0, 0], [0, 3], [2, 0], [5], 1, num_tokens=4)
    draft = (0.2 + 1.11 + 0.5) + (0.2 + 1.12 + 0.5)  # fixed + E layers at S+i+1 keys + head
    verify0 = 0.2 + 1.13 + 3 * (1 + 0.1 * 3 + 0.03) + 0.5 * 3  # c + 1 = 3 queries, 3 keys
    verify1 = 0.2 + 1.14 + 3 * 1.14 + 0.5
    assert cost.draft_seconds == pytest.approx(draft)
    assert cost.verify_seconds == pytest.approx(verify0 + verify1)
    assert cost.rollback_seconds == pytest.approx(0.3)  # only the cycle that drafted
    assert cost.seconds == pytest.approx(draft + verify0 + verify1 + 0.3 + 2.0)
    assert cost.draft_steps == 2 and cost.num_cycles == 2

    # two examples in one batch run their cycles in lockstep: cycle j drafts as many steps
    # as its slowest row, at its longest row's context. Example 0: (S, c) = (0, 2), (3, 0);
    # example 1: (0, 1), (1, 1), (2, 0). With the stopping check priced per draft step.
    check = CheckCost(flops=1.0, bytes=1.0, needs_lm_head=True)
    batched = speculative_cost(costs, DIMS, 2, [0, 0, 1, 1, 1], [0, 3, 0, 1, 2],
                               [2, 0, 1, 1, 0], [5, 7], 2, num_tokens=7, stop_check=check,
                               stop_measure="softmax_max")
    layer = costs.decoder_layer
    # batch cycle 0: R = 2, c = 2, S = 0; cycle 1: R = 2, c = 1, S = 3; cycle 2: R = 1, c = 0
    draft = sum(0.2 + 2 * layer(2, s + i + 1, 0) + 0.5 * 2 + 0.05 * 2
                for s, c in ((0, 2), (3, 1)) for i in range(c))
    verify = (0.2 + 2 * layer(2, 3, 0) + 2 * layer(2, 3, 0, 3) + 0.5 * 6) \
        + (0.2 + 2 * layer(2, 5, 0) + 2 * layer(2, 5, 0, 2) + 0.5 * 4) \
        + (0.2 + 2 * layer(1, 3, 0) + 2 * layer(1, 3, 0) + 0.5)
    assert batched.draft_seconds == pytest.approx(draft)
    assert batched.verify_seconds == pytest.approx(verify)
    assert batched.rollback_seconds == pytest.approx(0.6)
    assert batched.prefill_seconds == pytest.approx(2.0)  # one batch
    assert batched.num_cycles == 3 and batched.draft_steps == 3


class SetupCosts(LinearCosts):
    """With the two measured-only terms: a step's position bias and a verification's set-up."""

    def position_bias(self, batch_size):
        return 0.6 + 0.0 * np.asarray(batch_size, np.float64)

    def verify_setup(self, batch_size, query_len):
        return 0.1 * np.asarray(query_len, np.float64) + 0.0 * np.asarray(batch_size)


def test_shallow_passes_pay_the_rest_of_the_position_bias_and_verifications_their_set_up():
    plain = speculative_cost(LinearCosts(), DIMS, 1, [0, 0], [0, 3], [2, 0], [5], 1, 4)
    setup = speculative_cost(SetupCosts(), DIMS, 1, [0, 0], [0, 3], [2, 0], [5], 1, 4)
    # E = 1 of 4 layers: each draft step and the verification's one-token pass pay 3/4 of
    # the 0.6 s bias; the verification of c = 2 drafts its set-up for 3 queries (0.3 s); the
    # full-depth step of cycle 1 neither
    assert setup.draft_seconds - plain.draft_seconds == pytest.approx(2 * 0.75 * 0.6)
    assert setup.verify_seconds - plain.verify_seconds == pytest.approx(0.75 * 0.6 + 0.3)


def test_cost_refuses_cycles_out_of_order():
    with pytest.raises(ExitbenchError, match="example order"):
        speculative_cost(LinearCosts(), DIMS, 1, [1, 0], [0, 0], [1, 1], [5, 5], 1, 2)
    with pytest.raises(ExitbenchError, match="draft_depth 4"):
        speculative_cost(LinearCosts(), DIMS, 4, [0], [0], [1], [5], 1, 2)


# -- online on random models ---------------------------------------------------------------
def _decode_all(adapter, sources, ids, max_new_tokens, spec, batch_size):
    rows, logs = [], []
    for start in range(0, len(sources), batch_size):
        input_ids, mask = pad_batch(sources[start:start + batch_size], 0)
        out = self_speculative_decode(adapter, input_ids, mask, ids[start:start + batch_size],
                                      max_new_tokens, spec)
        rows += [r.tolist() for r in out.decoded.rows()]
        logs.append(out.cycles.shifted(start))
    return rows, CycleLog.concat(logs)


def _by_example(log: CycleLog) -> CycleLog:
    order = np.argsort(log.row, kind="stable")
    return CycleLog(*(getattr(log, f)[order] for f in ("row", "position", "drafted",
                                                      "accepted", "emitted")))


def _setup(model, vocab, lengths, steps, seed=0):
    adapter = T5Adapter(model)
    generator = torch.Generator().manual_seed(seed)
    sources = [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in lengths]
    ids = [f"ex{i}" for i in range(len(sources))]
    input_ids, mask = pad_batch(sources, 0)
    first = greedy_decode(adapter, input_ids, mask, steps)
    # EOS := the token emitted most often after the first few steps: rows end mid-way
    values, counts = np.unique(np.concatenate([r[2:] for r in first.rows()]), return_counts=True)
    adapter.eos_token_id = int(values[np.argmax(counts)])
    full = [r.tolist() for r in greedy_decode(adapter, input_ids, mask, steps).rows()]
    traces = traced_greedy_decode(adapter, input_ids, mask, ids, steps)
    return {"adapter": adapter, "sources": sources, "ids": ids, "full": full, "traces": traces}


@pytest.fixture(scope="module")
def tiny():
    return _setup(random_t5(seed=0, **TINY), 300, (7, 12, 5, 9, 4), STEPS)


def test_rows_end_at_different_cycles(tiny):
    lengths = [len(r) for r in tiny["full"]]
    assert len(set(lengths)) > 1 and min(lengths) < STEPS  # EOS mid-way in some rows


@pytest.mark.parametrize("depth,length", [(1, 1), (1, 4), (2, 2), (3, 1), (3, 3), (3, 8)])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_online_equals_full_depth_and_replay(tiny, depth, length, batch_size):
    spec = SelfSpeculation(depth, length)
    rows, log = _decode_all(tiny["adapter"], tiny["sources"], tiny["ids"], STEPS, spec,
                            batch_size)
    assert rows == tiny["full"]  # lossless, token for token
    replayed = replay_speculation(tiny["traces"], spec, STEPS)
    log = _by_example(log)
    np.testing.assert_array_equal(log.row, replayed.example_index)
    np.testing.assert_array_equal(log.position, replayed.position)
    np.testing.assert_array_equal(log.accepted, replayed.accepted)  # exactly, cycle by cycle
    np.testing.assert_array_equal(log.emitted, replayed.emitted)
    np.testing.assert_array_equal(log.drafted, replayed.drafted_high)  # no stop rule: exact


def test_some_drafts_are_accepted_and_some_rejected(tiny):
    replayed = replay_speculation(tiny["traces"], SelfSpeculation(3, 4), STEPS)
    assert 0 < replayed.accepted.sum() < replayed.drafted_high.sum()
    assert len(set(replayed.accepted.tolist())) > 2


@pytest.mark.parametrize("measure,threshold,at_eos", [
    ("softmax_max", 0.05, False), ("softmax_margin", 0.02, False),
    ("hidden_state_saturation", 0.5, True), (None, None, True)])
@pytest.mark.parametrize("batch_size", [1, 5])
def test_online_drafts_lie_within_replay_bounds(tiny, measure, threshold, at_eos, batch_size):
    stop = DraftStop(get_measure(measure)(), threshold, measure) if measure else None
    spec = SelfSpeculation(3, 6, stop, stop_at_eos=at_eos)
    rows, log = _decode_all(tiny["adapter"], tiny["sources"], tiny["ids"], STEPS, spec,
                            batch_size)
    assert rows == tiny["full"]
    replayed = replay_speculation(tiny["traces"], spec, STEPS,
                                  eos_token_id=tiny["adapter"].eos_token_id)
    log = _by_example(log)
    np.testing.assert_array_equal(log.accepted, replayed.accepted)
    assert np.all(replayed.drafted_low <= log.drafted)
    assert np.all(log.drafted <= replayed.drafted_high)
    assert np.any(log.drafted < 6)  # the rule stopped some drafts


def test_rollback_keeps_rows_right_aligned(tiny):
    adapter = tiny["adapter"]
    input_ids, mask = pad_batch(tiny["sources"][:2], 0)
    with torch.inference_mode():
        state = adapter.start(input_ids, mask)
        hidden = adapter.begin_step(state, torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]]))
        for layer in range(adapter.num_layers):
            hidden = adapter.run_layer(state, layer, hidden)
        keys = state.cache.self_attention_cache.layers[2].keys.clone()
        adapter.rollback(state, torch.tensor([1, 3]))  # row 0 keeps 3 positions, row 1 one
        kept = state.cache.self_attention_cache.layers[2].keys
        assert kept.shape[2] == 3
        assert state.decoder_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        torch.testing.assert_close(kept[0], keys[0, :, :3])
        torch.testing.assert_close(kept[1, :, 2], keys[1, :, 0])
        with pytest.raises(ValueError, match="outside"):
            adapter.rollback(state, torch.tensor([0, 4]))


# -- online on a random t5-small architecture ----------------------------------------------
@pytest.mark.slow
def test_t5_small_architecture_online_equals_full_depth_and_replay():
    steps = 12
    setup = _setup(random_t5(seed=3), 32000, (9, 14, 6), steps)
    for depth, length in ((2, 2), (5, 4)):
        spec = SelfSpeculation(depth, length)
        replayed = replay_speculation(setup["traces"], spec, steps)
        for batch_size in (1, 3):
            rows, log = _decode_all(setup["adapter"], setup["sources"], setup["ids"], steps,
                                    spec, batch_size)
            assert rows == setup["full"]
            np.testing.assert_array_equal(_by_example(log).accepted, replayed.accepted)


def test_profile_measures_the_verification_pass_and_the_rollback():
    from suite.cost import MeasuredCosts, rollback_seconds, verification_layer_seconds
    from suite.profiles import parse_profile
    from suite.profiling import ProfileSettings, measure_profile

    adapter = T5Adapter(random_t5(seed=1, **{**TINY, "num_layers": 2, "num_decoder_layers": 2}))
    settings = ProfileSettings(batch_sizes=(1, 3), contexts=(4, 12, 16), source_len=8,
                               source_lens=(8,), repeats=1, warmup=0, min_run_seconds=0.0,
                               measures=("softmax_max",))
    assert settings.query_lens == (2, 3, 5, 9)  # the defaults that fit below context 12
    run = measure_profile(adapter, settings, model_id="tiny-2", name="tiny2")
    tables = run.data["tables"]
    verify = tables["verify_layer_seconds"]
    assert verify["query_lens"] == [2, 3, 5, 9] and verify["context_len"] == 12
    assert len(verify["seconds"]) == 2 and all(t > 0 for row in verify["seconds"] for t in row)
    assert all(t > 0 for t in tables["rollback_seconds"]["seconds"])
    assert all(t > 0 for row in verify["setup_seconds"] for t in row)
    assert all(t > 0 for t in tables["position_bias_seconds"]["seconds"])
    profile = parse_profile(run.data, name="tiny2")
    costs = MeasuredCosts(profile, adapter.dims)
    one = verification_layer_seconds(costs, 1, 12, 8, 1)
    assert one == pytest.approx(costs.decoder_layer(1, 12, 8))  # one query: a decoder step
    assert verification_layer_seconds(costs, 1, 12, 8, 5) == pytest.approx(
        verify["seconds"][0][2])  # at the table's context: the table itself
    assert rollback_seconds(costs, 3, 12) == pytest.approx(tables["rollback_seconds"]["seconds"][1])
    with pytest.raises(ExitbenchError, match="does not fit below the middle context"):
        ProfileSettings(contexts=(4, 8), query_lens=(9,))
