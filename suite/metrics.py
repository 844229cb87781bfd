"""Task metrics, configured the way the early-exit literature configures them.

- ``squad``: exact match and F1 with the official SQuAD v1.1 answer
  normalisation (lower case, punctuation and articles removed, whitespace
  folded), maximum over all gold answers, in percent.
- ``bleu``: corpus BLEU from the ``sacrebleu`` package with its default
  settings (13a tokenisation, exponential smoothing), reported with its
  signature.
- ``rouge``: ROUGE-1/2/L/Lsum F-measure from ``rouge-score`` with the Porter
  stemmer; for Lsum, sentences are split on newlines (the CNN/DM highlights
  are newline-separated). Mean over examples, in percent.

Every metric takes predictions and, per example, a list of references.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MetricResult:
    """Scores of one metric over a corpus."""

    scores: dict[str, float]
    """Metric name -> value, in percent."""
    primary: str
    """The key of ``scores`` that ranks systems (the quality axis of the fronts)."""
    signature: str | None = None
    """The metric implementation's own reproducibility signature, when it has one."""
    details: dict[str, object] = field(default_factory=dict)


MetricFn = Callable[[Sequence[str], Sequence[Sequence[str]]], MetricResult]


# -- SQuAD v1.1 (official evaluation script's normalisation) ------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_squad_answer(text: str) -> str:
    """Lower case, remove punctuation, articles and extra whitespace (SQuAD v1.1)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, gold: str) -> float:
    return float(normalize_squad_answer(prediction) == normalize_squad_answer(gold))


def squad_f1(prediction: str, gold: str) -> float:
    prediction_tokens = normalize_squad_answer(prediction).split()
    gold_tokens = normalize_squad_answer(gold).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_metric(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    _check_lengths(predictions, references)
    exact = [max(squad_exact_match(p, g) for g in refs) for p, refs in zip(predictions, references)]
    f1 = [max(squad_f1(p, g) for g in refs) for p, refs in zip(predictions, references)]
    n = max(len(predictions), 1)
    return MetricResult(scores={"exact_match": 100.0 * sum(exact) / n, "f1": 100.0 * sum(f1) / n},
                        primary="f1", signature="squad-v1.1-official-normalisation")


# -- BLEU (sacrebleu defaults) ---------------------------------------------------
def bleu_metric(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    from sacrebleu.metrics import BLEU

    _check_lengths(predictions, references)
    n_refs = max((len(r) for r in references), default=1)
    # sacrebleu wants one stream per reference index; pad ragged lists with None? No:
    # sacrebleu requires equal counts, so repeat the first reference (harmless for BLEU's max).
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(n_refs)]
    bleu = BLEU()
    score = bleu.corpus_score(list(predictions), streams)
    return MetricResult(scores={"bleu": float(score.score)}, primary="bleu",
                        signature=str(bleu.get_signature()),
                        details={"precisions": list(score.precisions), "bp": score.bp,
                                 "sys_len": score.sys_len, "ref_len": score.ref_len})


# -- ROUGE (rouge-score with stemmer) ----------------------------------------------
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_metric(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> MetricResult:
    import logging

    from rouge_score import rouge_scorer

    # rouge-score logs "Using default tokenizer." at INFO (absl) for every scorer it builds
    logging.getLogger("absl").setLevel(logging.WARNING)
    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, refs in zip(predictions, references):
        # rouge-score's rougeLsum splits sentences on "\n"; score_multi keeps the best reference.
        scores = scorer.score_multi(list(refs), prediction) if len(refs) > 1 else \
            scorer.score(refs[0], prediction)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return MetricResult(scores={k: 100.0 * v / n for k, v in totals.items()}, primary="rougeL",
                        signature="rouge-score|stemmer:porter|lsum-split:newline|fmeasure|mean")


METRICS: dict[str, MetricFn] = {"squad": squad_metric, "bleu": bleu_metric, "rouge": rouge_metric}


def get_metric(name: str) -> MetricFn:
    from suite.errors import UnknownNameError
    from suite.registry import closest_names

    if name not in METRICS:
        close = closest_names(name, list(METRICS))
        raise UnknownNameError(f"unknown metric {name!r}; valid metrics: {', '.join(METRICS)}"
                               + (f" (did you mean {close[0]!r}?)" if close else ""))
    return METRICS[name]


def _check_lengths(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of strings")
