"""Bootstrap intervals and paired comparisons against known distributions and the metric
libraries' own bootstrap."""

import numpy as np
import pytest

from suite.metrics import bleu_metric, rouge_metric, squad_metric
from suite.uncertainty import (
    BootstrapSettings,
    ExampleStatsCache,
    Resampler,
    corpus_value,
    example_stats,
    paired_bootstrap,
    percentile_interval,
    quality_interval,
    quality_replicates,
    resample_counts,
    resample_indices,
)

PREDICTIONS = ["the cat sat on the mat", "a dog barked loudly at night", "hello world",
               "rain falls in the plain of spain", "one two three four five", "nothing here"]
REFERENCES = [["the cat is on the mat"], ["the dog barked at night", "a dog barks"],
              ["hello there world"], ["the rain in spain falls mainly on the plain"],
              ["one two three four"], ["something else entirely"]]


def test_interval_covers_the_true_mean_at_close_to_the_nominal_rate():
    # exponential per-example scores (skewed), true mean 2; 400 independent data sets
    settings = BootstrapSettings(resamples=400, seed=1)
    rng = np.random.default_rng(0)
    covered = 0
    trials = 400
    for trial in range(trials):
        values = rng.exponential(2.0, size=200)
        resampler = Resampler(len(values), BootstrapSettings(resamples=400, seed=trial))
        interval = percentile_interval(values.mean(), resampler.means(values), settings)
        covered += interval.low <= 2.0 <= interval.high
        if trial == 0:
            # the standard error matches sigma / sqrt(n) of an exponential (sigma = mean)
            assert interval.stderr == pytest.approx(values.std() / np.sqrt(200), rel=0.15)
    rate = covered / trials
    # nominal 95%; the percentile bootstrap runs slightly under on a skewed mean at n=200
    assert 0.91 <= rate <= 0.98, rate


def test_resamples_are_sacrebleus_draw_and_counts_sum_them():
    settings = BootstrapSettings(resamples=50, seed=7)
    indices = resample_indices(9, settings)
    expected = np.random.default_rng(7).choice(9, size=(50, 9), replace=True)
    assert np.array_equal(indices, expected)
    counts = resample_counts(indices)
    values = np.arange(9.0) ** 2
    assert np.allclose(counts @ values, values[indices].sum(axis=1))


@pytest.mark.parametrize("metric,function", [("squad", squad_metric), ("rouge", rouge_metric),
                                             ("bleu", bleu_metric)])
def test_corpus_value_from_example_stats_equals_the_metric(metric, function):
    stats = example_stats(metric, PREDICTIONS, REFERENCES)
    result = function(PREDICTIONS, REFERENCES)
    assert corpus_value(metric, stats) == pytest.approx(result.scores[result.primary], abs=1e-9)


def test_bleu_interval_equals_sacrebleus_own_for_the_same_resamples(monkeypatch):
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import _bootstrap_resample, estimate_ci

    settings = BootstrapSettings(resamples=200, seed=11)
    resampler = Resampler(len(PREDICTIONS), settings)
    stats = example_stats("bleu", PREDICTIONS, REFERENCES)
    interval = quality_interval("bleu", stats, resampler)

    monkeypatch.setenv("SACREBLEU_SEED", "11")
    bleu = BLEU()
    references = [[r[0] for r in REFERENCES], [r[-1] for r in REFERENCES]]
    library_stats = bleu._extract_corpus_statistics(PREDICTIONS, references)
    _, scores = _bootstrap_resample(library_stats, bleu, n_samples=200)
    mean, half = estimate_ci(np.array([s.score for s in scores]))
    assert np.allclose(quality_replicates("bleu", stats, resampler), [s.score for s in scores])
    assert interval.low == pytest.approx(mean - half)
    assert interval.high == pytest.approx(mean + half)
    assert interval.resamples == 200 and "sacrebleu" in interval.method


def test_rouge_interval_equals_rouge_scores_bootstrap_aggregator(monkeypatch):
    import rouge_score.scoring as scoring
    from rouge_score import rouge_scorer

    settings = BootstrapSettings(resamples=300, seed=5)
    resampler = Resampler(len(PREDICTIONS), settings)
    stats = example_stats("rouge", PREDICTIONS, REFERENCES)
    interval = quality_interval("rouge", stats, resampler)

    # the library's own aggregator, drawing the same resamples in the same order
    draws = iter(resampler.indices)
    monkeypatch.setattr(scoring.np.random, "choice", lambda *a, **k: next(draws))
    aggregator = scoring.BootstrapAggregator(confidence_interval=0.95, n_samples=300)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for prediction, refs in zip(PREDICTIONS, REFERENCES):
        scores = scorer.score_multi(refs, prediction) if len(refs) > 1 else \
            scorer.score(refs[0], prediction)
        aggregator.add_scores(scores)
    result = aggregator.aggregate()["rougeL"]
    assert interval.low == pytest.approx(100 * result.low.fmeasure, rel=1e-9)
    assert interval.high == pytest.approx(100 * result.high.fmeasure, rel=1e-9)
    assert interval.estimate == pytest.approx(rouge_metric(PREDICTIONS, REFERENCES).scores["rougeL"])


def test_paired_test_is_uniform_for_equal_systems_and_small_for_a_better_one():
    settings = BootstrapSettings(resamples=300)
    rng = np.random.default_rng(3)
    p_values = []
    for trial in range(300):
        difficulty = rng.normal(0, 1, 150)  # shared per-example difficulty: paired data
        a = difficulty + rng.normal(0, 1, 150)
        b = difficulty + rng.normal(0, 1, 150)
        resampler = Resampler(150, BootstrapSettings(resamples=300, seed=trial))
        comparison = paired_bootstrap(a.mean(), b.mean(), resampler.means(a),
                                      resampler.means(b), settings)
        p_values.append(comparison.p_value)
    p_values = np.array(p_values)
    # close to uniform: each decile holds about a tenth, and the 5% level rejects about 5%
    deciles = np.histogram(p_values, bins=10, range=(0, 1))[0] / len(p_values)
    assert np.all(np.abs(deciles - 0.1) < 0.06), deciles
    assert 0.01 <= np.mean(p_values < 0.05) <= 0.10

    difficulty = rng.normal(0, 1, 150)
    better = difficulty + 1.0 + rng.normal(0, 1, 150)
    worse = difficulty + rng.normal(0, 1, 150)
    resampler = Resampler(150, settings)
    comparison = paired_bootstrap(better.mean(), worse.mean(), resampler.means(better),
                                  resampler.means(worse), settings)
    assert comparison.p_value < 0.01 and comparison.significant
    assert comparison.low > 0

    same = paired_bootstrap(a.mean(), a.mean(), resampler.means(a[:150]),
                            resampler.means(a[:150]), settings)
    assert same.p_value == 1.0 and not same.significant


def test_example_stats_cache_scores_each_distinct_prediction_once():
    cache = ExampleStatsCache("squad")
    ids = ["a", "b", "c"]
    refs = [["x y"], ["z"], ["w"]]
    first = cache.stats(ids, ["x y", "q", "w"], refs)
    assert cache.computed == 3
    second = cache.stats(ids, ["x y", "z", "w"], refs)
    assert cache.computed == 4  # only example b's new prediction
    assert first[0].tolist() == second[0].tolist() == [100.0, 100.0]
    assert second[1].tolist() == [100.0, 100.0] and first[1].tolist() == [0.0, 0.0]


def test_settings_are_checked():
    with pytest.raises(ValueError, match="resamples"):
        BootstrapSettings(resamples=1)
    with pytest.raises(ValueError, match="confidence"):
        BootstrapSettings(confidence=1.5)
