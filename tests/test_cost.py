"""The cost model: hand-computed schedules on a synthetic profile, the roofline's regimes,
measured-table interpolation, and the speedup's reference point."""

from __future__ import annotations

import time

import numpy as np
import pytest

from suite.cost import (
    CostModelError,
    MeasuredCosts,
    OperationCosts,
    SimulatedCosts,
    decode_cost,
    decode_seconds,
    example_index_from_ids,
    full_depth_seconds,
    interpolate_1d,
    interpolate_2d,
    operation_costs,
    price_replay,
    schedule_steps,
)
from suite.measures import CheckCost, ModelDims
from suite.profiles import ProfileError, example_measured_profile, get_profile, parse_profile

MS = 1e-3
DIMS4 = ModelDims(num_layers=4, d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=100)
T5_BASE = ModelDims(num_layers=12, d_model=768, d_ff=3072, num_heads=12, d_kv=64,
                    vocab_size=32128)
CHECK = CheckCost(flops=0.0, bytes=0.0, needs_lm_head=False)
CHECK_WITH_HEAD = CheckCost(flops=0.0, bytes=0.0, needs_lm_head=True)
EVERY_LAYER_BUT_LAST = np.array([True, True, True, False])


class ToyCosts:
    """Round numbers: layer 1 ms (+0.25 ms per extra query token of a FREE deferred pass),
    LM head 0.5 ms, check 0.1 ms, K/V fill 0.2 ms per row, fixed 0.3 ms, prefill 2 ms."""

    name = "toy"

    def decoder_layer(self, batch_size, context_len, source_len, query_len=1):
        shape = np.broadcast(np.asarray(batch_size), np.asarray(context_len),
                             np.asarray(source_len), np.asarray(query_len)).shape
        return np.broadcast_to(1.0 * MS + 0.25 * MS * (np.asarray(query_len) - 1), shape)

    def lm_head(self, batch_size):
        return np.full(np.shape(batch_size), 0.5 * MS)

    def kv_fill(self, batch_size):
        return 0.2 * MS * np.asarray(batch_size, float)

    def measure_check(self, check_cost, batch_size, measure_name=None):
        return np.full(np.shape(batch_size), 0.1 * MS)

    def encoder_prefill(self, batch_size, source_len):
        return np.full(np.shape(batch_size), 2.0 * MS)

    def fixed_step(self):
        return 0.3 * MS


def toy_decode(exits, example_index, position, batch_size, propagation="calm",
               check=CHECK, checked=EVERY_LAYER_BUT_LAST, min_layer=0, num_examples=None):
    num_examples = num_examples or (max(example_index) + 1)
    return decode_seconds(ToyCosts(), DIMS4, np.asarray(exits), np.asarray(example_index),
                          np.asarray(position), np.full(num_examples, 10), batch_size, check,
                          checked, min_layer, propagation)


def test_toy_costs_satisfy_the_protocol():
    assert isinstance(ToyCosts(), OperationCosts)


def test_calm_batch_one_by_hand():
    # one example, exits 1, 3, 0 in a 4-layer model; checks at layers 0..2
    # step 0: fixed .3 + 2 layers + 2 checks .2 + head .5 + fill 2 layers .4 = 3.4
    # step 1: .3 + 4 + 3 checks .3 + .5 + 0 = 5.1
    # step 2: .3 + 1 + .1 + .5 + fill 3 layers .6 = 2.5;  + prefill 2
    seconds = toy_decode([[1, 3, 0]], [0, 0, 0], [0, 1, 2], batch_size=1)
    assert seconds == pytest.approx([13.0 * MS])
    # min_layer 1 drops the check at layer 0 at every step
    seconds = toy_decode([[1, 3, 0]], [0, 0, 0], [0, 1, 2], batch_size=1, min_layer=1)
    assert seconds == pytest.approx([(13.0 - 0.3) * MS])
    # no propagation: no fill (.4 + .6)
    seconds = toy_decode([[1, 3, 0]], [0, 0, 0], [0, 1, 2], batch_size=1, propagation="none")
    assert seconds == pytest.approx([12.0 * MS])


def test_lm_head_of_a_check_is_paid_per_check_and_reused_at_the_exit():
    # a check needing the LM head costs .1 + .5; the exit's head is then already computed
    # step 0 (D=1): .3 + 2 + 2 x .6 + 0 + .4 = 3.9; step 1 (D=3, unchecked last layer):
    # .3 + 4 + 3 x .6 + .5 = 6.6; step 2 (D=0): .3 + 1 + .6 + 0 + .6 = 2.5; + prefill 2
    seconds = toy_decode([[1, 3, 0]], [0, 0, 0], [0, 1, 2], batch_size=1, check=CHECK_WITH_HEAD)
    assert seconds == pytest.approx([15.0 * MS])


def test_batch_runs_to_its_slowest_token_and_finished_rows_drop_out():
    # example 0: exits 1, 3, 0; example 1 (shorter): exits 2, 0; one batch of 2
    # step 0 (2 rows, D=2): .3 + 3 + .3 + .5 + 1 layer x 2 rows x .2 = 4.5
    # step 1 (2 rows, D=3): .3 + 4 + .3 + .5 = 5.1
    # step 2 (example 1 done: 1 row, D=0): .3 + 1 + .1 + .5 + 3 x 1 x .2 = 2.5; + prefill 2
    exits, examples, positions = [[1, 3, 0, 2, 0]], [0, 0, 0, 1, 1], [0, 1, 2, 0, 1]
    assert toy_decode(exits, examples, positions, batch_size=2) == pytest.approx([14.1 * MS])
    schedule = schedule_steps(examples, positions, [10, 30], 2)
    assert schedule.active_rows.tolist() == [2, 2, 1]
    assert schedule.context_len.tolist() == [1, 2, 3]
    assert schedule.source_len.tolist() == [30, 30, 30]  # sources padded to the batch's longest
    # batch 1: the two examples run alone, each with its own prefill
    # example 0 as above 13.0; example 1: (.3+3+.3+.5+.2) + (.3+1+.1+.5+.6) + 2 = 8.8
    assert toy_decode(exits, examples, positions, batch_size=1) == pytest.approx([21.8 * MS])


def test_free_deferred_pass_by_hand():
    # exits 1, 0, 3, 2 in a 4-layer model, batch 1
    # step 0 (D=1): .3 + 2 + .2 + .5 = 3.0; layers 2, 3 now pending one token
    # step 1 (D=0): .3 + 1 + .1 + .5 = 1.9; pending: layer 1: 1, layers 2-3: 2
    # step 2 (D=3): layer 0 1 + layer 1 (2 queries) 1.25 + layers 2, 3 (3 queries) 1.5 each
    #               -> .3 + 5.25 + .3 + .5 = 6.35
    # step 3 (D=2): nothing pending: .3 + 3 + .3 + .5 = 4.1; + prefill 2 = 17.35
    seconds = toy_decode([[1, 0, 3, 2]], [0] * 4, [0, 1, 2, 3], 1, propagation="free")
    assert seconds == pytest.approx([17.35 * MS])


def test_free_pending_tokens_do_not_cross_batches():
    # batch of 2 examples, then a batch of 1; in the second, step 0 exits at 0 and step 1
    # goes to layer 3 with one pending token on layers 1-3 (not the first batch's)
    # batch A (rows a: exits 0, 0; b: exits 0): steps (.3+1+.1+.5) x 2 = 3.8, + prefill 2
    # batch B (exits 0, 3): step 0 1.9; step 1 .3 + 1 + 3 x 1.25 + .3 + .5 = 5.85; + prefill 2
    exits = [[0, 0, 0, 0, 3]]
    seconds = toy_decode(exits, [0, 0, 1, 2, 2], [0, 1, 0, 0, 1], 2, propagation="free")
    assert seconds == pytest.approx([(3.8 + 2 + 1.9 + 5.85 + 2) * MS])


def test_thresholds_are_priced_together_as_one_by_one():
    rng = np.random.default_rng(0)
    num_examples, length = 5, 7
    examples = np.repeat(np.arange(num_examples), length)
    positions = np.tile(np.arange(length), num_examples)
    exits = rng.integers(0, 4, size=(6, examples.size))
    for propagation in ("calm", "free", "none"):
        together = toy_decode(exits, examples, positions, 2, propagation)
        one_by_one = [toy_decode(row[None], examples, positions, 2, propagation)[0]
                      for row in exits]
        assert together == pytest.approx(one_by_one)
        # token order does not matter
        shuffle = rng.permutation(examples.size)
        shuffled = toy_decode(exits[:, shuffle], examples[shuffle], positions[shuffle], 2,
                              propagation)
        assert shuffled == pytest.approx(together)


def test_all_exits_at_the_last_layer_is_exactly_full_depth():
    examples = np.repeat(np.arange(9), [3, 5, 1, 4, 4, 2, 6, 1, 3])
    positions = np.concatenate([np.arange(n) for n in np.bincount(examples)])
    sources = np.arange(9) * 7 + 5
    last = np.full((1, examples.size), T5_BASE.num_layers - 1)
    no_checks = np.zeros(T5_BASE.num_layers, bool)
    for name in ("a100_sxm_80gb", "t4", "generic_cpu"):
        costs = operation_costs(get_profile(name), T5_BASE, "float16")
        for batch_size in (1, 8, 32):
            for propagation in ("calm", "free", "none"):
                priced = price_replay(costs, T5_BASE, last, examples, positions, sources,
                                      batch_size, CHECK, no_checks, propagation=propagation)
                assert priced.speedup[0] == 1.0
    # checks that never let a token out only add cost
    costs = operation_costs(get_profile("h100_sxm"), T5_BASE, "bfloat16")
    checked = np.ones(T5_BASE.num_layers, bool)
    checked[-1] = False
    priced = price_replay(costs, T5_BASE, last, examples, positions, sources, 8,
                          CheckCost(2.0 * T5_BASE.vocab_size, 4.0 * T5_BASE.vocab_size, True),
                          checked)
    assert priced.speedup[0] < 1.0
    assert priced.seconds[0] == pytest.approx(
        priced.full_depth_seconds + priced.breakdown.check_seconds[0])


def test_early_exit_speeds_up_and_bigger_batches_raise_throughput():
    examples = np.repeat(np.arange(64), 20)
    positions = np.tile(np.arange(20), 64)
    sources = np.full(64, 128)
    exits = np.stack([np.full(examples.size, layer) for layer in (2, 6, 11)])
    checked = np.ones(12, bool)
    checked[-1] = False
    costs = operation_costs(get_profile("a100_sxm_80gb"), T5_BASE, "bfloat16")
    throughput = []
    for batch_size in (1, 8, 32):
        priced = price_replay(costs, T5_BASE, exits, examples, positions, sources, batch_size,
                              CHECK_WITH_HEAD, checked)
        assert priced.speedup[0] > priced.speedup[1] > priced.speedup[2]
        assert priced.tokens_per_s == pytest.approx(examples.size / priced.seconds)
        throughput.append(priced.tokens_per_s[0])
    assert throughput[0] < throughput[1] < throughput[2]


def test_roofline_is_memory_bound_small_and_compute_bound_big():
    costs = SimulatedCosts(get_profile("a100_sxm_80gb"), T5_BASE, "bfloat16")
    small = costs.decoder_layer_roofline(1, 16, 16)
    big = costs.decoder_layer_roofline(4096, 1, 1)
    assert not small.compute_bound and big.compute_bound
    # a long KV cache keeps even big batches memory-bound (attention reads every key)
    assert not costs.decoder_layer_roofline(4096, 512, 512).compute_bound
    # the terms by hand for the K/V fill of one skipped layer, batch 8
    d, inner, rows = 768, 768, 8
    fill = costs.kv_fill_roofline(rows)
    assert fill.compute_seconds == pytest.approx(rows * 4 * d * inner / (312e12 * 0.7))
    assert fill.memory_seconds == pytest.approx(
        (2 * d * inner + d + rows * (d + 2 * inner)) * 2 / (2.039e12 * 0.85))
    assert fill.overhead_seconds == pytest.approx(8 * 5e-6)
    # float32 moves twice the bytes of bfloat16
    fp32 = SimulatedCosts(get_profile("a100_sxm_80gb"), T5_BASE, "float32")
    assert fp32.kv_fill_roofline(rows).memory_seconds == pytest.approx(2 * fill.memory_seconds)
    # a gated FFN (t5-v1_1) reads a third matrix
    gated = SimulatedCosts(get_profile("a100_sxm_80gb"), T5_BASE, "bfloat16", gated_ffn=True)
    extra = gated.decoder_layer_roofline(1, 16, 16).memory_seconds - small.memory_seconds
    assert extra == pytest.approx((768 * 3072 + 768 + 3072) * 2 / (2.039e12 * 0.85))


def test_t4_bfloat16_is_an_error():
    with pytest.raises(ProfileError, match="no bfloat16 figure.*float16"):
        operation_costs(get_profile("t4"), T5_BASE, "bfloat16")
    assert operation_costs(get_profile("t4"), T5_BASE, "float16").lm_head(8) > 0


def test_measured_interpolation_by_hand():
    batches, contexts = [1, 8], [16, 64]
    table = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert interpolate_2d(4.5, 40, batches, contexts, table) == pytest.approx(2.5)
    assert interpolate_2d(1, 8, batches, contexts, table) == pytest.approx(1.0)  # clamped below
    # above the table: extrapolated from the last two batch sizes, (15 - 1) / 7 = 2 segments
    assert interpolate_2d(15, 16, batches, contexts, table) == pytest.approx(5.0)
    assert interpolate_1d([20, 64, 0.5], [1, 8, 32], [0.1, 0.3, 0.9]) == pytest.approx(
        [0.6, 1.7, 0.1])
    # a last segment that falls (noise) never extrapolates below the edge value
    assert interpolate_1d(100, [1, 8], [0.3, 0.2]) == pytest.approx(0.2)
    assert interpolate_1d(5, [4], [0.7]) == pytest.approx(0.7)


def test_measured_costs_read_the_tables():
    profile = parse_profile(example_measured_profile(), "toy_measured.yaml")
    costs = MeasuredCosts(profile, DIMS4, "float32")
    assert isinstance(costs, OperationCosts)
    assert costs.decoder_layer(4.5, 40, 999) == pytest.approx(2.5e-3)
    # FREE's pass of 2 rows x 4 queries is priced as 8 rows
    assert costs.decoder_layer(2, 16, 128, 4) == pytest.approx(3e-3)
    assert costs.lm_head(20) == pytest.approx(6e-4)
    assert costs.kv_fill(np.array([1, 32])) == pytest.approx([2e-4, 2e-4])
    assert costs.measure_check(CHECK, 11, "softmax_margin") == pytest.approx(2e-5)
    assert costs.encoder_prefill(8, 160) == pytest.approx(0.1)
    assert costs.fixed_step() == 5e-5
    assert costs.estimated_checks == set()
    # a measure without timings (a new submission) is priced from its declared cost at the
    # profile's own rates: LM head 2*32*100*64 FLOPs in 9e-4 s, its 100*64 float32 weights
    # in 1e-4 s, and the cheapest measured check (1e-5 s) as the fixed cost
    new = CheckCost(flops=1000.0, bytes=4000.0, needs_lm_head=True)
    flop_rate, byte_rate = 2 * 32 * 100 * 64 / 9e-4, 100 * 64 * 4 / 1e-4
    expected = 1e-5 + max(8 * 1000 / flop_rate, 8 * 4000 / byte_rate)
    assert costs.measure_check(new, 8, "my_new_measure") == pytest.approx(expected)
    assert costs.estimated_checks == {"my_new_measure"}
    with pytest.raises(ProfileError, match="d_model 64 \\(model has 768\\)"):
        MeasuredCosts(profile, T5_BASE)
    with pytest.raises(ProfileError, match="timed in float32, not bfloat16"):
        operation_costs(profile, DIMS4, "bfloat16")
    # a replay priced on it, by hand: one example, exits 1, 3 (context 1, 2), batch 1
    # fixed 5e-5 x 2; layers 2 x 1e-3 + 4 x 1e-3; checks (1e-5 + 1e-4 head) x (2 + 3);
    # exit head reused at step 0, paid at step 1 (1e-4); K/V fill 2 x 2e-4; prefill 1e-2
    seconds = decode_seconds(costs, DIMS4, [[1, 3]], [0, 0], [0, 1], [64], 1,
                             CHECK_WITH_HEAD, EVERY_LAYER_BUT_LAST,
                             measure_name="softmax_margin")
    expected = 1e-4 + 6e-3 + 5 * 1.1e-4 + 1e-4 + 4e-4 + 1e-2
    assert seconds == pytest.approx([expected])


def test_inputs_that_do_not_fit_are_reported():
    with pytest.raises(CostModelError, match="exit layers must lie in 0..3"):
        toy_decode([[4]], [0], [0], 1)
    with pytest.raises(CostModelError, match="positions must be 0..n-1"):
        toy_decode([[0, 0]], [0, 0], [0, 2], 1)
    with pytest.raises(CostModelError, match="batch size 0"):
        toy_decode([[0]], [0], [0], 0)
    with pytest.raises(CostModelError, match="propagation 'deja'"):
        toy_decode([[0]], [0], [0], 1, propagation="deja")
    with pytest.raises(CostModelError, match="checked_layers"):
        toy_decode([[0]], [0], [0], 1, checked=np.ones(3, bool))


def test_breakdown_and_full_depth_by_hand():
    cost = decode_cost(ToyCosts(), DIMS4, [[1, 3, 0]], [0, 0, 0], [0, 1, 2], [10], 1, CHECK,
                       EVERY_LAYER_BUT_LAST)
    assert cost.fixed_seconds == pytest.approx([0.9 * MS])
    assert cost.layer_seconds == pytest.approx([7 * MS])
    assert cost.check_seconds == pytest.approx([0.6 * MS])
    assert cost.propagation_seconds == pytest.approx([1.0 * MS])
    assert cost.tokens_per_s == pytest.approx([3 / (13.0 * MS)])
    # full depth: 3 x (.3 + 4 + .5) + 2
    assert full_depth_seconds(ToyCosts(), DIMS4, [0, 0, 0], [0, 1, 2], [10], 1) == \
        pytest.approx(16.4 * MS)


def test_vectorised_schedule_is_fast():
    # 21 thresholds x 40k tokens, 24 layers, FREE (the [K, steps, layers] path) at batch 1
    rng = np.random.default_rng(1)
    dims = ModelDims(num_layers=24, d_model=1024, d_ff=4096, num_heads=16, d_kv=64,
                     vocab_size=32128)
    examples = np.repeat(np.arange(1000), 40)
    positions = np.tile(np.arange(40), 1000)
    exits = rng.integers(0, 24, size=(21, examples.size))
    costs = operation_costs(get_profile("h200"), dims, "bfloat16")
    checked = np.ones(24, bool)
    checked[-1] = False
    start = time.perf_counter()
    for propagation in ("calm", "free"):
        seconds = decode_seconds(costs, dims, exits, examples, positions,
                                 np.full(1000, 200), 1, CHECK_WITH_HEAD, checked,
                                 propagation=propagation)
        assert seconds.shape == (21,) and np.isfinite(seconds).all()
    assert time.perf_counter() - start < 20.0


def test_example_index_follows_first_appearance():
    ids = np.array(["q7", "q7", "a1", "a1", "a1", "z0"], dtype=object)
    assert example_index_from_ids(ids).tolist() == [0, 0, 1, 1, 1, 2]


def test_memory_size_bounds_the_batch():
    t4 = SimulatedCosts(get_profile("t4"), T5_BASE, "float16")
    assert t4.fits_in_memory(32, 128, 512)
    # t5-base weights alone: about 0.22 G parameters at 2 bytes
    assert 0.4e9 < t4.memory_required_bytes(1, 1, 1) < 0.5e9
    assert not t4.fits_in_memory(4096, 512, 2048)  # K/V caches of ~390 GB
