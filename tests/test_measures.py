"""Built-in measures: hand-computed scores on small constructed traces, the exit they imply,
thresholds, checked layers and declared costs."""

from __future__ import annotations

import numpy as np
import pytest
from measure_fixtures import BUILTIN_MEASURES, exit_layer, make_traces

from suite.commands.ls import describe
from suite.errors import ExitbenchError
from suite.measures import MEASURES, CheckCost, Measure, ModelDims, code_hash, get_measure

NEG = -np.inf
# 3 tokens x 4 layers
TOP1 = [[0.2, 0.5, 0.7, 0.9],
        [0.6, 0.4, 0.8, 0.95],
        [0.3, 0.35, 0.4, 0.3]]
TOP2 = [[0.1, 0.3, 0.2, 0.05],
        [0.3, 0.3, 0.1, 0.01],
        [0.25, 0.3, 0.35, 0.2]]
COS_PREV = [[0.1, 0.8, 0.9, 0.99],
            [0.2, 0.7, 0.95, 0.97],
            [0.3, 0.6, 0.5, 0.99]]
TOP1_ID = [[5, 7, 7, 7],
           [3, 3, 4, 3],
           [1, 2, 2, 2]]
FINAL_ID = [7, 3, 2]
DIMS = ModelDims(num_layers=6, d_model=512, d_ff=2048, num_heads=8, d_kv=64, vocab_size=32000)


@pytest.fixture
def traces():
    return make_traces(TOP1, TOP2, top1_id=TOP1_ID, final_id=FINAL_ID, cos_prev=COS_PREV)


def scores_of(name, traces, **options):
    return get_measure(name)(**options).scores(traces)


def test_registry_lists_all_ten_builtins():
    rows = describe("measures")
    assert tuple(name for name, _, _ in rows) == BUILTIN_MEASURES
    assert all(source == "builtin" for _, source, _ in rows)
    assert "not deployable" in dict((n, d) for n, _, d in rows)["oracle"]


@pytest.mark.parametrize("name", BUILTIN_MEASURES)
def test_builtin_declares_the_contract(name):
    cls = MEASURES.get(name)
    assert issubclass(cls, Measure) and cls.name == name and cls.description
    assert isinstance(cls.reads, frozenset) and cls.reads
    assert isinstance(cls().check_cost(DIMS), CheckCost)


def test_softmax_margin_is_top1_minus_top2(traces):
    expected = np.array(TOP1, np.float32).astype(float) - np.array(TOP2, np.float32).astype(float)
    np.testing.assert_allclose(scores_of("softmax_margin", traces), expected)
    np.testing.assert_allclose(scores_of("softmax_margin", traces)[0], [0.1, 0.2, 0.5, 0.85],
                               atol=1e-6)


def test_softmax_max_is_top1(traces):
    np.testing.assert_allclose(scores_of("softmax_max", traces), TOP1, atol=1e-7)


def test_saturation_is_cos_prev_and_never_exits_at_layer_zero(traces):
    scores = scores_of("hidden_state_saturation", traces)
    assert np.all(scores[:, 0] == NEG)
    np.testing.assert_allclose(scores[:, 1:], np.array(COS_PREV)[:, 1:], atol=1e-7)
    # COS_PREV[*][0] is high for no token, but even a threshold of 0 cannot exit at layer 0
    assert exit_layer(scores, 0.0).tolist() == [1, 1, 1]
    assert get_measure("hidden_state_saturation")().checked_layers(4).tolist() == \
        [False, True, True, False]


def test_top1_rising_heuristic_needs_three_strictly_rising_layers(traces):
    scores = scores_of("top1_rising_heuristic", traces)
    expected = [[NEG, NEG, 0.7, 0.9],
                [NEG, NEG, NEG, 0.95],  # 0.6 > 0.4: not rising at layer 2
                [NEG, NEG, 0.4, NEG]]  # 0.4 > 0.3: not rising at layer 3
    np.testing.assert_allclose(scores, expected, atol=1e-7)
    # the study's threshold 0.9: token 0 waits for layer 3, token 2 never reaches it
    assert exit_layer(scores, 0.9).tolist() == [3, 3, 3]
    assert exit_layer(scores, 0.5).tolist() == [2, 3, 3]


def test_static_layer_thresholds_select_each_layer(traces):
    measure = get_measure("static_layer")()
    scores = measure.scores(traces)
    np.testing.assert_array_equal(scores, np.tile([0.25, 0.5, 0.75, 1.0], (3, 1)))
    thresholds = measure.thresholds_for(4)
    assert thresholds == (0.25, 0.5, 0.75, 1.0)
    for k, threshold in enumerate(thresholds):
        assert exit_layer(scores, threshold).tolist() == [k, k, k]
    assert len(measure.thresholds_for(12)) == 12
    assert not measure.checked_layers(4).any()
    assert measure.check_cost(DIMS) == CheckCost(0.0, 0.0, False)


def test_oracle_exits_at_the_first_layer_agreeing_with_the_final_token(traces):
    measure = get_measure("oracle")()
    scores = measure.scores(traces)
    expected = [[NEG, 1.0, 1.0, 1.0],
                [1.0, 1.0, NEG, 1.0],  # agrees at layers 0-1, changes at 2, back at 3
                [NEG, 1.0, 1.0, 1.0]]
    np.testing.assert_array_equal(scores, expected)
    exits = exit_layer(scores, measure.thresholds_for(4)[0])
    assert exits.tolist() == [1, 0, 1]  # CALM's oracle: the first agreeing layer, not 3
    replayed = np.asarray(TOP1_ID)[np.arange(3), exits]
    assert replayed.tolist() == FINAL_ID  # every replayed token is the full-depth one
    assert measure.deployable is False


def test_oracle_on_the_issue_example_exits_at_layer_zero():
    # top-1 [7, 3, 7, 7] with final token 7 (t5x oracle_tok_consistency: argmax == top layer)
    traces = make_traces([[0.5] * 4], [[0.1] * 4], top1_id=[[7, 3, 7, 7]], final_id=[7])
    scores = get_measure("oracle")().scores(traces)
    assert exit_layer(scores, 1.0).tolist() == [0]
    # min_layer still applies: from layer 1 on, the first agreeing layer is 2
    from suite.replay import replay
    assert replay(scores, [1.0], min_layer=1).exits[0].tolist() == [2]


def test_free_shallow_deep_scores_top1_minus_top2_at_the_shallow_layer(traces):
    # FREE's softmax_confidence (util/skip_conf.py): top_2[..., 0] - top_2[..., 1]
    scores = scores_of("free_shallow_deep", traces, shallow_layer=1)
    expected = np.full((3, 4), NEG)
    expected[:, 1] = np.float32([0.5, 0.4, 0.35]).astype(float) - \
        np.float32([0.3, 0.3, 0.3]).astype(float)
    np.testing.assert_array_equal(scores, expected)
    assert exit_layer(scores, 0.15).tolist() == [1, 3, 3]
    measure = get_measure("free_shallow_deep")(shallow_layer=1)
    assert measure.checked_layers(4).tolist() == [False, True, False, False]
    top1 = scores_of("free_shallow_deep", traces, shallow_layer=1, confidence="max")
    np.testing.assert_allclose(top1[:, 1], [0.5, 0.4, 0.35], atol=1e-7)


@pytest.mark.parametrize("num_layers,expected", [(4, 0), (6, 1), (8, 1), (12, 2), (24, 5)])
def test_free_shallow_deep_default_layer_is_a_quarter_of_depth(num_layers, expected):
    assert get_measure("free_shallow_deep")().exit_layer(num_layers) == expected


def test_free_shallow_deep_takes_the_trained_layer_from_the_backbone(traces):
    from suite.measures import Backbone

    trained = Backbone(path="runs/m", objective="free", shallow_layer=3)  # layers 1..3
    measure = get_measure("free_shallow_deep")()
    measure.adapt_to(trained)
    assert measure.exit_layer(6) == 2 and measure.checked_layers(6).tolist() == \
        [False, False, True, False, False, False]
    same = get_measure("free_shallow_deep")(shallow_layer=2)
    same.adapt_to(trained)  # naming the trained layer is fine
    with pytest.raises(ExitbenchError, match="trained with FREE's objective to exit at layer 2"):
        get_measure("free_shallow_deep")(shallow_layer=1).adapt_to(trained)
    other = get_measure("free_shallow_deep")()
    other.adapt_to(Backbone(path="hub/t5", objective="calm", shallow_layer=None))
    assert other.exit_layer(6) == 1  # not FREE-trained: FREE's L/4 default


def test_free_shallow_deep_rejects_a_layer_without_deep_part(traces):
    with pytest.raises(ExitbenchError, match="shallow_layer <= 2"):
        scores_of("free_shallow_deep", traces, shallow_layer=3)
    with pytest.raises(ExitbenchError, match="confidence"):
        get_measure("free_shallow_deep")(confidence="entropy")


def test_declared_costs_follow_the_model_dimensions():
    v, d = DIMS.vocab_size, DIMS.d_model
    assert get_measure("softmax_margin")().check_cost(DIMS) == CheckCost(2.0 * v, 4.0 * v, True)
    assert get_measure("softmax_max")().check_cost(DIMS) == CheckCost(float(v), 4.0 * v, True)
    saturation = get_measure("hidden_state_saturation")().check_cost(DIMS)
    assert saturation == CheckCost(6.0 * d + 2, 8.0 * d, False)
    assert get_measure("oracle")().check_cost(DIMS).flops == 0.0


def test_learned_costs_count_their_networks():
    d, h = DIMS.d_model, 64
    linear = get_measure("classifier_single")().check_cost(DIMS)
    assert linear.flops == 3 * d + 2 * d * 2 + 6
    assert linear.bytes == 4 * ((d * 2 + 2) + d)  # weights + bias + the state read
    lstm = get_measure("classifier_lstm")(hidden_size=h, num_lstm_layers=2).check_cost(DIMS)
    per_step = 4 * 2 * (d + h) * h + 10 * h + 4 * 2 * (h + h) * h + 10 * h + 2 * h * 2
    assert lstm.flops == 3 * d + per_step + 6
    lstm_params = 4 * h * (d + h) + 8 * h + 4 * h * (2 * h) + 8 * h + 2 * h + 2
    assert lstm.bytes == 4 * (lstm_params + 2 * 2 * h + d)
    three = get_measure("classifier_three_hidden")(hidden_size=h).check_cost(DIMS)
    assert three.flops == 3 * d + 2 * (3 * d * h + 2 * h) + h + 6
    assert not (linear.needs_lm_head or lstm.needs_lm_head or three.needs_lm_head)


def test_code_hash_changes_with_the_source():
    margin, maximum = get_measure("softmax_margin"), get_measure("softmax_max")
    assert code_hash(margin) == code_hash(margin) and code_hash(margin) != code_hash(maximum)


def test_default_thresholds_for_returns_the_class_sweep():
    measure = get_measure("softmax_margin")()
    assert measure.thresholds_for(6) == tuple(measure.thresholds)
    assert measure.thresholds_for(6)[-1] == 1.0


def test_lstm_defaults_are_the_study_code():
    # Thiggel/Monotonic-Early-Exit src/models/modeling_t5.py: LSTMClassifier(d_model, 250)
    # with nn.LSTM(input_size, hidden_size, 1)
    lstm = get_measure("classifier_lstm")()
    assert (lstm.hidden_size, lstm.num_lstm_layers) == (250, 1)
    network = lstm.build_network(16)
    assert network.lstm.hidden_size == 250 and network.lstm.num_layers == 1


def test_saturation_on_normed_states_reads_the_normed_cosines(traces):
    import dataclasses

    normed = dataclasses.replace(traces, cos_prev_normed=np.full((3, 4), 0.5, np.float32))
    scores = get_measure("hidden_state_saturation")(states="normed").scores(normed)
    assert (scores[:, 1:] == 0.5).all() and (scores[:, 0] == NEG).all()
    raw = get_measure("hidden_state_saturation")().scores(normed)  # CALM's: un-normed states
    np.testing.assert_allclose(raw[:, 1:], np.array(COS_PREV)[:, 1:], atol=1e-7)
    with pytest.raises(ExitbenchError, match="cos_prev_normed"):
        get_measure("hidden_state_saturation")(states="normed").scores(
            dataclasses.replace(traces, cos_prev_normed=None))
    with pytest.raises(ExitbenchError, match="states"):
        get_measure("hidden_state_saturation")(states="layer")
