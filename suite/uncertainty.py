"""Uncertainty of the numbers: bootstrap over examples, intervals and paired comparisons.

Every quality figure is a statistic of a finite set of examples; resampling the examples with
replacement (the bootstrap) says how much it would move on another draw of the same size.
Replay makes this cheap: each point's per-example outputs are held already, so a point's
``B`` replicates are ``B`` re-aggregations of its per-example statistics, no re-decoding.

- **Resamples** (:func:`resample_indices`): ``B`` rows of ``E`` example indices drawn with
  replacement from ``numpy.random.default_rng(seed)``, exactly as sacreBLEU draws them
  (``sacrebleu.significance._paired_bs_test``). One index matrix serves every point of a
  (task, model), so points of different measures are resampled together: comparisons between
  them are *paired* on the same examples.
- **Per-example statistics** (:func:`example_stats`), per metric, computed with the metric's
  own library: SQuAD EM and F1 per example; rouge-score's F-measures per example; sacreBLEU's
  sufficient statistics per segment (``_extract_corpus_statistics``). The corpus value is
  their mean (SQuAD, ROUGE) or sacreBLEU's score of their sum (BLEU), equal to
  :mod:`suite.metrics`.
- **Intervals**, each by its library's own rule: BLEU by sacreBLEU's paired bootstrap
  resampling (the resampled corpus scores from ``_compute_score_from_stats`` over the summed
  float32 statistics, and ``estimate_ci``: the bootstrap mean plus/minus half the distance
  between the 2.5% and 97.5% order statistics); ROUGE by rouge-score's
  ``BootstrapAggregator`` (percentiles of the resampled means), fed the shared resamples;
  every other statistic (SQuAD, best speedup within 1%, area over the static baseline) by the
  numpy percentile bootstrap with the same percentiles. The standard error is the standard
  deviation of the replicates (``ddof=1``).
- **Paired comparisons** (:func:`paired_bootstrap`): the difference ``d = a - b`` of two
  statistics on the same examples, its replicates ``d_b``, a percentile interval, and the
  two-sided p-value of "no difference" by the shift method:
  ``p = (#{|d_b - d| >= |d|} + 1) / (B + 1)`` (identical systems give ``p = 1``; systems of
  equal quality give p-values close to uniform; a better one a small p-value).

Quality replicates only are resampled: tokens/s is the cost model's price of the task's whole
request set, held fixed, so a speedup's interval is the uncertainty of which points stay
within 1% of full depth, not of throughput.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
SIGNIFICANCE_LEVEL = 0.05
"""A paired difference with a p-value at or above this is marked not significant."""

METHOD_NUMPY = "numpy percentile bootstrap"
METHOD_SACREBLEU = "sacrebleu paired bootstrap resampling (estimate_ci)"
METHOD_ROUGE = "rouge-score BootstrapAggregator"


@dataclass(frozen=True)
class BootstrapSettings:
    """How examples are resampled (recorded in every row and in the aggregated JSON)."""

    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self) -> None:
        if self.resamples < 2:
            raise ValueError(f"bootstrap resamples must be at least 2, got {self.resamples}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")

    @property
    def percentiles(self) -> np.ndarray:
        tail = (1 - self.confidence) / 2
        return 100 * np.array([tail, 1 - tail])


# -- resamples -----------------------------------------------------------------------------------
def resample_indices(num_examples: int, settings: BootstrapSettings) -> np.ndarray:
    """``[B, E]`` example indices drawn with replacement (sacreBLEU's draw for its seed)."""
    if num_examples < 1:
        raise ValueError("the bootstrap needs at least one example")
    rng = np.random.default_rng(settings.seed)
    return rng.choice(num_examples, size=(settings.resamples, num_examples), replace=True)


def resample_counts(indices: np.ndarray) -> np.ndarray:
    """``[B, E]`` how often each example is drawn in each resample (float64): a resample's
    sum of per-example values ``v`` is ``counts @ v``."""
    resamples, num_examples = indices.shape
    flat = (np.arange(resamples)[:, None] * num_examples + indices).reshape(-1)
    return np.bincount(flat, minlength=resamples * num_examples).reshape(
        resamples, num_examples).astype(np.float64)


@dataclass
class Resampler:
    """The shared resamples of one set of examples (one per task and model)."""

    num_examples: int
    settings: BootstrapSettings = field(default_factory=BootstrapSettings)

    def __post_init__(self) -> None:
        self.indices = resample_indices(self.num_examples, self.settings)
        self.counts = resample_counts(self.indices)

    def means(self, values: np.ndarray) -> np.ndarray:
        """Replicates of the mean of per-example ``values`` (``[E]`` -> ``[B]``,
        ``[E, S]`` -> ``[B, S]``)."""
        return self.counts @ np.asarray(values, np.float64) / self.num_examples

    def sums(self, values: np.ndarray) -> np.ndarray:
        return self.counts @ np.asarray(values, np.float64)


# -- intervals -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A statistic with its bootstrap standard error and confidence interval."""

    estimate: float
    stderr: float
    low: float
    high: float
    resamples: int
    confidence: float
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stderr(replicates: np.ndarray) -> float:
    finite = replicates[np.isfinite(replicates)]
    return float(np.std(finite, ddof=1)) if finite.size > 1 else float("nan")


def percentile_interval(estimate: float, replicates: np.ndarray,
                        settings: BootstrapSettings, method: str = METHOD_NUMPY) -> Interval:
    """Percentile interval of ``replicates`` (NaN replicates, e.g. resamples where no point
    stays within 1% of full depth, count as below every finite one)."""
    replicates = np.asarray(replicates, np.float64)
    if replicates.size == 0 or not np.isfinite(replicates).any():
        low = high = float("nan")
    else:
        ranked = np.where(np.isnan(replicates), -np.inf, replicates)
        low, high = (float(v) for v in np.percentile(ranked, settings.percentiles))
        low = float("nan") if not np.isfinite(low) else low
    return Interval(estimate=float(estimate), stderr=_stderr(replicates), low=low, high=high,
                    resamples=int(replicates.size), confidence=settings.confidence,
                    method=method)


# -- paired comparisons --------------------------------------------------------------------------
@dataclass(frozen=True)
class PairedComparison:
    """``a - b`` of one statistic on the same resampled examples."""

    statistic: str
    difference: float
    stderr: float
    low: float
    high: float
    p_value: float
    """Two-sided p-value of "no difference" (shift method, +1 smoothed)."""
    resamples: int

    @property
    def significant(self) -> bool:
        return bool(np.isfinite(self.p_value) and self.p_value < SIGNIFICANCE_LEVEL)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def paired_bootstrap(estimate_a: float, estimate_b: float, replicates_a: np.ndarray,
                     replicates_b: np.ndarray, settings: BootstrapSettings,
                     statistic: str = "quality") -> PairedComparison:
    """Paired bootstrap of ``a - b``: replicates of both come from the same resamples."""
    replicates_a = np.asarray(replicates_a, np.float64)
    replicates_b = np.asarray(replicates_b, np.float64)
    if replicates_a.shape != replicates_b.shape:
        raise ValueError("paired replicates must come from the same resamples")
    difference = float(estimate_a) - float(estimate_b)
    deltas = replicates_a - replicates_b
    usable = np.isfinite(deltas)
    if not np.isfinite(difference) or usable.sum() < 2:
        nan = float("nan")
        return PairedComparison(statistic, difference, nan, nan, nan, nan, int(deltas.size))
    deltas = deltas[usable]
    extreme = np.abs(deltas - difference) >= abs(difference) - 1e-12
    p_value = (int(extreme.sum()) + 1) / (deltas.size + 1)
    low, high = np.percentile(deltas, settings.percentiles)
    return PairedComparison(statistic=statistic, difference=difference,
                            stderr=float(np.std(deltas, ddof=1)), low=float(low),
                            high=float(high), p_value=float(min(1.0, p_value)),
                            resamples=int(deltas.size))


# -- per-example statistics of each metric --------------------------------------------------------
STAT_NAMES: dict[str, tuple[str, ...]] = {
    "squad": ("exact_match", "f1"),
    "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"),
    "bleu": ("sys_len", "ref_len", "correct_1", "correct_2", "correct_3", "correct_4",
             "total_1", "total_2", "total_3", "total_4"),
}
"""Columns of each metric's per-example statistics (percent for SQuAD and ROUGE; sacreBLEU's
sufficient statistics for BLEU)."""

PRIMARY = {"squad": "f1", "rouge": "rougeL", "bleu": "bleu"}


def _squad_stats(predictions, references) -> np.ndarray:
    from suite.metrics import squad_exact_match, squad_f1

    return np.array([[100.0 * max(squad_exact_match(p, g) for g in refs),
                      100.0 * max(squad_f1(p, g) for g in refs)]
                     for p, refs in zip(predictions, references)], np.float64).reshape(-1, 2)


def _rouge_stats(predictions, references) -> np.ndarray:
    from rouge_score import rouge_scorer

    from suite.metrics import ROUGE_TYPES

    logging.getLogger("absl").setLevel(logging.WARNING)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    rows = []
    for prediction, refs in zip(predictions, references):  # as suite.metrics.rouge_metric
        scores = scorer.score_multi(list(refs), prediction) if len(refs) > 1 else \
            scorer.score(refs[0], prediction)
        rows.append([100.0 * scores[key].fmeasure for key in ROUGE_TYPES])
    return np.array(rows, np.float64).reshape(-1, len(ROUGE_TYPES))


def _bleu(references: Sequence[Sequence[str]]):
    from sacrebleu.metrics import BLEU

    n_refs = max((len(r) for r in references), default=1)
    # as suite.metrics.bleu_metric: ragged reference lists padded with their first reference
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references]
               for i in range(n_refs)]
    return BLEU(), streams


def _bleu_stats(predictions, references) -> np.ndarray:
    bleu, streams = _bleu(references)
    stats = bleu._extract_corpus_statistics(list(predictions), streams)
    return np.array(stats, np.float64).reshape(-1, len(STAT_NAMES["bleu"]))


def example_stats(metric: str, predictions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> np.ndarray:
    """``[E, S]`` per-example statistics of ``metric`` (columns: :data:`STAT_NAMES`)."""
    compute = {"squad": _squad_stats, "rouge": _rouge_stats, "bleu": _bleu_stats}.get(metric)
    if compute is None:
        raise ValueError(f"no per-example statistics for metric {metric!r}; metrics: "
                         f"{', '.join(STAT_NAMES)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    return compute(predictions, references)


def corpus_value(metric: str, stats: np.ndarray) -> float:
    """The corpus value of the primary metric from per-example statistics."""
    stats = np.asarray(stats, np.float64)
    if metric == "bleu":
        bleu, _ = _bleu([["x"]])
        # integer sums, as sacreBLEU's corpus_score adds its segment statistics
        return float(bleu._compute_score_from_stats(
            [int(round(v)) for v in stats.sum(axis=0)]).score)
    return float(stats[:, STAT_NAMES[metric].index(PRIMARY[metric])].mean())


class _SharedResamplesAggregator:
    """rouge-score's ``BootstrapAggregator`` whose resamples are the shared ones (its
    aggregation and percentiles unchanged), so ROUGE points are paired like the others."""

    def __new__(cls, counts: np.ndarray, confidence: float):
        from rouge_score.scoring import BootstrapAggregator

        class Aggregator(BootstrapAggregator):
            def _bootstrap_resample(self, matrix):
                sample_mean = counts @ matrix / matrix.shape[0]
                percentile_delta = (1 - self._confidence_interval) / 2
                q = 100 * np.array([percentile_delta, 0.5, 1 - percentile_delta])
                return np.percentile(sample_mean, q, axis=0)

        return Aggregator(confidence_interval=confidence, n_samples=counts.shape[0])


def quality_replicates(metric: str, stats: np.ndarray, resampler: Resampler) -> np.ndarray:
    """``[B]`` replicates of the primary metric over the shared resamples."""
    stats = np.asarray(stats, np.float64)
    if metric == "bleu":
        bleu, _ = _bleu([["x"]])
        sums = resampler.sums(stats).astype(np.float32)  # sacreBLEU sums float32 statistics
        return np.array([bleu._compute_score_from_stats(row).score for row in sums])
    return resampler.means(stats[:, STAT_NAMES[metric].index(PRIMARY[metric])])


def quality_interval(metric: str, stats: np.ndarray, resampler: Resampler,
                     replicates: np.ndarray | None = None) -> Interval:
    """The primary metric's interval by its library's rule (see the module docstring)."""
    settings = resampler.settings
    estimate = corpus_value(metric, stats)
    if replicates is None:
        replicates = quality_replicates(metric, stats, resampler)
    if metric == "bleu":
        from sacrebleu.significance import estimate_ci

        if settings.confidence != 0.95:
            raise ValueError("sacreBLEU's estimate_ci is a 95% interval; use confidence 0.95")
        mean, half = estimate_ci(np.asarray(replicates))
        return Interval(estimate, _stderr(replicates), float(mean - half), float(mean + half),
                        len(replicates), settings.confidence, METHOD_SACREBLEU)
    if metric == "rouge":
        from collections import namedtuple

        column = STAT_NAMES[metric].index(PRIMARY[metric])
        aggregator = _SharedResamplesAggregator(resampler.counts, settings.confidence)
        fmeasure = namedtuple("FMeasure", ["fmeasure"])
        for value in stats[:, column]:
            aggregator.add_scores({"rougeL": fmeasure(value)})
        result = aggregator.aggregate()["rougeL"]
        return Interval(estimate, _stderr(replicates), float(result.low.fmeasure),
                        float(result.high.fmeasure), len(replicates), settings.confidence,
                        METHOD_ROUGE)
    return percentile_interval(estimate, replicates, settings)


# -- per-example statistics, computed once per distinct (example, prediction) --------------------
class ExampleStatsCache:
    """Per-example statistics keyed by (metric, example id, prediction, references): the
    outputs of most thresholds differ from each other in a few examples only, so each
    distinct prediction of an example is scored once for the whole sweep."""

    def __init__(self, metric: str):
        self.metric = metric
        self.entries: dict[str, np.ndarray] = {}
        self.computed = 0

    @staticmethod
    def _key(example_id: str, prediction: str, references: Sequence[str]) -> str:
        payload = "\x1f".join([example_id, prediction, *references])
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def stats(self, example_ids: Sequence[str], predictions: Sequence[str],
              references: Sequence[Sequence[str]]) -> np.ndarray:
        keys = [self._key(i, p, r) for i, p, r in zip(example_ids, predictions, references)]
        todo = [n for n, key in enumerate(keys) if key not in self.entries]
        todo = list({keys[n]: n for n in todo}.values())
        if todo:
            computed = example_stats(self.metric, [predictions[n] for n in todo],
                                     [references[n] for n in todo])
            for n, row in zip(todo, computed):
                self.entries[keys[n]] = row
            self.computed += len(todo)
        return np.stack([self.entries[key] for key in keys]) if keys else \
            np.zeros((0, len(STAT_NAMES[self.metric])))
