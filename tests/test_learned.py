"""Learned measures: AUROC, training on a separable problem, labels, determinism, the cache."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from measure_fixtures import make_traces, separable_traces

from suite.errors import ExitbenchError
from suite.learned import auroc, compare_auroc, will_not_change_auroc
from suite.measures import get_measure

# tiny data needs bigger steps than the defaults, which suit real traces (~1e5 tokens)
FAST = {"batch_size": 32, "learning_rate": 1e-2}
LEARNED = ("classifier_single", "classifier_three_hidden", "classifier_lstm")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # the networks here are tiny: thread start-up and spinning cost more than they save,
    # most of all on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_traces():
    return separable_traces(seed=0)


@pytest.fixture(scope="module")
def heldout_traces():
    return separable_traces(seed=1)


# -- AUROC ----------------------------------------------------------------------------------
def test_auroc_hand_computed():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1.0, 1.0, 2.0], [0, 1, 1]) == 0.75  # the tie counts one half
    assert auroc([0.5] * 4, [0, 1, 0, 1]) == 0.5
    assert auroc([-np.inf, 0.2], [0, 1]) == 1.0  # -inf ranks lowest
    assert auroc([0.9, 0.1], [0, 1]) == 0.0
    assert np.isnan(auroc([0.1, 0.2], [1, 1]))


def test_auroc_matches_pairwise_counting_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    positives, negatives = scores[labels], scores[~labels]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(positives, negatives)]
    assert auroc(scores, labels) == pytest.approx(np.mean(pairs))


def test_auroc_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, np.nan], [0, 1])


def test_will_not_change_auroc_uses_layers_but_the_last():
    traces = make_traces([[0.9, 0.2, 0.5], [0.1, 0.8, 0.5]], top1_id=[[1, 2, 1], [3, 4, 4]],
                         final_id=[1, 4])
    # positives (prediction final): (0,0) and (1,1); negatives: (1,0) and (0,1)
    result = will_not_change_auroc(traces.top1_prob, traces)
    assert result.auroc == 1.0 and result.num_pairs == 4 and result.positive_fraction == 0.5
    assert result.per_layer[:2] == (1.0, 1.0) and np.isnan(result.per_layer[2])
    flipped = will_not_change_auroc(-traces.top1_prob.astype(float), traces)
    assert flipped.auroc == 0.0


# -- training -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", LEARNED)
def test_learned_measure_separates_a_separable_problem(name, train_traces, heldout_traces):
    measure = get_measure(name)(**FAST)
    result = measure.fit(train_traces)
    assert result.epochs == 5 and not result.reused and result.losses[-1] < result.losses[0]
    scores = measure.scores(heldout_traces)
    assert scores.shape == heldout_traces.top1_id.shape
    checked = measure.checked_layers(heldout_traces.num_layers)
    assert np.all(np.isneginf(scores[:, :measure.first_scored_layer]))
    assert np.all((scores[:, checked] >= 0) & (scores[:, checked] <= 1))
    evaluation = will_not_change_auroc(scores, heldout_traces, checked)
    assert evaluation.auroc > 0.8, evaluation


def test_compare_auroc_puts_learned_next_to_softmax_margin(train_traces, heldout_traces):
    classifier = get_measure("classifier_single")(**FAST)
    classifier.fit(train_traces)
    table = compare_auroc({"classifier_single": classifier,
                           "softmax_margin": get_measure("softmax_margin")()}, heldout_traces)
    assert table["classifier_single"].auroc > 0.8
    # the fixture's probabilities are random: the softmax measure is at chance here
    assert abs(table["softmax_margin"].auroc - 0.5) < 0.1


def test_gold_labels_train_on_reference_tokens():
    traces = separable_traces(seed=0, gold=True)
    measure = get_measure("classifier_single")(label="gold", **FAST)
    result = measure.fit(traces)
    assert result.num_pairs == traces.num_tokens * (traces.num_layers - 1)
    with pytest.raises(ExitbenchError, match="reference-forced"):
        get_measure("classifier_single")(label="gold").fit(separable_traces(seed=0))


def test_fit_is_seeded(train_traces):
    def fitted_scores(seed):
        measure = get_measure("classifier_lstm")(hidden_size=8, epochs=1, seed=seed, **FAST)
        measure.fit(train_traces)
        return measure.scores(train_traces)

    assert np.array_equal(fitted_scores(3), fitted_scores(3))
    assert not np.array_equal(fitted_scores(3), fitted_scores(4))


def test_learned_measures_explain_what_is_missing(train_traces):
    measure = get_measure("classifier_single")()
    with pytest.raises(ExitbenchError, match="not fitted"):
        measure.scores(train_traces)
    without_hidden = dataclasses.replace(train_traces, hidden=None)
    with pytest.raises(ExitbenchError, match="carry none"):
        measure.fit(without_hidden)
    with pytest.raises(ExitbenchError, match="epochs=0"):
        get_measure("classifier_lstm")(epochs=0)
    with pytest.raises(ExitbenchError, match="head='conv'"):
        get_measure("classifier_single")(head="conv")
    one_class = make_traces([[0.5, 0.5]] * 4, hidden=np.ones((4, 2, 3)))
    with pytest.raises(ExitbenchError, match="only one class"):
        measure.fit(one_class)


# -- the weight cache -----------------------------------------------------------------------
def test_cache_reuses_weights_and_refits_when_data_or_options_change(tmp_path, train_traces):
    def fit(traces, **options):
        measure = get_measure("classifier_single")(head="mlp", hidden_size=8, cache_dir=tmp_path,
                                                   **FAST)
        result = measure.fit(traces, **options)
        return measure, result

    first, first_result = fit(train_traces)
    assert not first_result.reused and len(list(tmp_path.glob("*.pt"))) == 1

    again, again_result = fit(train_traces)
    assert again_result.reused and again_result.key == first_result.key
    assert again_result.losses == first_result.losses
    np.testing.assert_array_equal(again.scores(train_traces), first.scores(train_traces))

    changed_hidden = train_traces.hidden.copy()
    changed_hidden[0, 0, 0] += 1.0
    changed = dataclasses.replace(train_traces, hidden=changed_hidden)
    _, changed_result = fit(changed)
    assert not changed_result.reused and changed_result.key != first_result.key

    _, other_epochs = fit(train_traces, epochs=2)
    assert not other_epochs.reused and other_epochs.epochs == 2
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_damaged_cache_file_is_retrained(tmp_path, train_traces):
    measure = get_measure("classifier_single")(cache_dir=tmp_path, **FAST)
    result = measure.fit(train_traces)
    path = tmp_path / result.path.rsplit("/", 1)[-1]
    path.write_bytes(b"not a checkpoint")
    retrained = get_measure("classifier_single")(cache_dir=tmp_path, **FAST)
    assert not retrained.fit(train_traces).reused
    assert get_measure("classifier_single")(cache_dir=tmp_path, **FAST).fit(train_traces).reused


def test_per_layer_balance_is_calms():
    # t5x loss_fn_meta_cls: per layer, pos_weight = 1 - pos/(pos+neg), neg_weight = 1 - neg/(...)
    from suite.learned import pair_weights

    labels = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 0]], dtype=bool)
    trainable = np.array([[True, True, False]] * 4)
    weights = pair_weights(labels, trainable, "per_layer")
    # layer 0: 3 positives of 4 -> positives 1/4, negatives 3/4; layer 1 likewise
    np.testing.assert_allclose(weights[:, 0], [0.25, 0.25, 0.75, 0.25])
    np.testing.assert_allclose(weights[:, 1], [0.75, 0.25, 0.25, 0.25])
    assert (weights[:, 2] == 0).all()  # not trained there
    overall = pair_weights(labels, trainable, "classes")  # 6 positives, 2 negatives of 8
    np.testing.assert_allclose(overall[:, 0], [8 / 12, 8 / 12, 8 / 4, 8 / 12])
    assert get_measure("classifier_single")().training.balance == "per_layer"
    assert get_measure("classifier_lstm")().training.balance == "classes"
    with pytest.raises(ExitbenchError, match="balance"):
        get_measure("classifier_single")(balance="none")
