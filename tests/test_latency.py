"""Per-request TTFT / TPOT: the cost model's schedule against a hand computation, emissions
from online decoding, and profile latency limits."""

import numpy as np
import pytest

from suite.cost import NO_CHECK, decode_cost, request_latency
from suite.latency import from_emissions, meets_limits
from suite.measures import ModelDims

DIMS = ModelDims(num_layers=2, d_model=8, d_ff=16, num_heads=2, d_kv=4, vocab_size=10)


class HandCosts:
    """Test double: round numbers so the schedule can be priced by hand."""

    name = "hand"

    def decoder_layer(self, batch_size, context_len, source_len, query_len=1):
        return 1.0 * np.asarray(batch_size, np.float64)  # 1 s per layer per active row

    def lm_head(self, batch_size):
        return 0.25 + 0.0 * np.asarray(batch_size, np.float64)

    def kv_fill(self, batch_size):
        return 0.0 * np.asarray(batch_size, np.float64)

    def measure_check(self, check_cost, batch_size, measure_name=None):
        return 0.0 * np.asarray(batch_size, np.float64)

    def encoder_prefill(self, batch_size, source_len):
        return 10.0 + 0.0 * np.asarray(batch_size, np.float64)

    def fixed_step(self):
        return 0.5


def test_ttft_and_tpot_percentiles_of_a_hand_built_schedule():
    # examples 0 (2 tokens) and 1 (3 tokens) in batch 0, example 2 (1 token) in batch 1
    example_index = np.array([0, 0, 1, 1, 1, 2])
    position = np.array([0, 1, 0, 1, 2, 0])
    full = np.full((1, 6), 1)  # every token at the last of 2 layers
    early = np.array([[0, 1, 0, 0, 1, 0]])  # exits at layer 0 for some tokens
    cost = decode_cost(HandCosts(), DIMS, np.vstack([full, early]), example_index, position,
                       np.array([4, 4, 4]), 2, NO_CHECK, np.zeros(2, bool), propagation="none")
    latency = request_latency(cost, example_index)
    # full depth, batch 0: steps with 2, 2, 1 active rows cost 0.5 + 2 x rows + 0.25
    #   = 4.75, 4.75, 2.75; example 0 emits at 10 + 4.75 = 14.75 and 19.5;
    #   example 1 at 14.75, 19.5, 22.25; batch 1: example 2 at 10 + 2.75 = 12.75
    assert latency.ttft_seconds[0].tolist() == [14.75, 14.75, 12.75]
    assert latency.tpot_seconds[0][:2].tolist() == [4.75, 3.75]
    assert np.isnan(latency.tpot_seconds[0][2])  # one token: no TPOT
    # early exits: batch 0 deepest exits per step 0, 1, 1 -> layers 1, 2, 2:
    #   0.5 + 2 + 0.25 = 2.75, 4.75, then one row 0.5 + 2 + 0.25 = 2.75
    #   example 2: layer 0 only: 0.5 + 1 + 0.25 = 1.75
    assert latency.ttft_seconds[1].tolist() == [12.75, 12.75, 11.75]
    assert latency.tpot_seconds[1][:2].tolist() == [4.75, (20.25 - 12.75) / 2]
    p = latency.percentiles()
    # numpy's linear percentiles over the requests
    assert p[0]["ttft_p50_seconds"] == 14.75
    assert p[0]["ttft_p90_seconds"] == 14.75
    assert p[0]["tpot_p50_seconds"] == pytest.approx(4.25)
    assert p[0]["tpot_p90_seconds"] == pytest.approx(3.75 + 0.9 * 1.0)
    assert p[0]["tpot_p99_seconds"] == pytest.approx(3.75 + 0.99 * 1.0)
    assert p[1]["ttft_p50_seconds"] == 12.75
    # the per-step seconds add up to the decode cost
    assert np.allclose(cost.step_seconds.sum(axis=1) + cost.prefill_seconds, cost.seconds)


def test_emissions_give_ttft_and_tpot_per_request():
    # online-style: token times since each batch's start
    latency = from_emissions(np.array([1, 1, 1, 0]), np.array([0, 1, 2, 0]),
                             np.array([0.3, 0.5, 0.9, 0.2]), 2)
    assert latency.ttft_seconds[0].tolist() == [0.2, 0.3]
    assert np.isnan(latency.tpot_seconds[0][0])
    assert latency.tpot_seconds[0][1] == pytest.approx(0.3)


def test_profiles_declare_latency_limits_and_points_are_checked_against_them():
    from suite.errors import ConfigError
    from suite.profiles import get_profile, parse_profile

    data = get_profile("a100_sxm_80gb").model_dump(mode="json", exclude={"path"})
    data["latency_limits"] = {"percentile": 99, "ttft_seconds": 2.0, "tpot_seconds": 0.2,
                              "source": "assumption: MLPerf Inference v4.1 Llama-2 server"}
    profile = parse_profile(data)
    fast = {"ttft_p99_seconds": 1.5, "tpot_p99_seconds": 0.1}
    slow = {"ttft_p99_seconds": 1.5, "tpot_p99_seconds": 0.3}
    assert meets_limits(fast, profile.latency_limits) is True
    assert meets_limits(slow, profile.latency_limits) is False
    assert meets_limits(fast, None) is None
    data["latency_limits"] = {"percentile": 99}
    with pytest.raises(ConfigError, match="ttft_seconds, tpot_seconds or both"):
        parse_profile(data)
    data["latency_limits"] = {"percentile": 95, "ttft_seconds": 1.0}
    with pytest.raises(ConfigError, match="percentile"):
        parse_profile(data)
