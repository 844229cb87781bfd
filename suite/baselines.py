"""Trivial answers a backbone's quality must clearly beat.

- SQuAD: the **best constant answer**: the one string that, given as the answer to every
  question, scores the highest mean F1 on the evaluated questions themselves (chosen with
  the references in hand, so it is an upper bound for any constant answer). Candidates are
  every gold answer and every word of one.
- Summaries (CNN/DM): **lead-3**, the first three sentences of the article.

Scores use the tasks' own metrics (:mod:`suite.metrics`)."""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from dataclasses import dataclass

from suite.metrics import normalize_squad_answer

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ConstantAnswer:
    answer: str
    f1: float
    """Mean F1 over the questions, in percent (as :func:`suite.metrics.squad_metric`)."""


def best_constant_answer(references: Sequence[Sequence[str]]) -> ConstantAnswer:
    """The constant answer with the highest mean SQuAD F1 over ``references`` (one list
    of gold answers per question)."""
    golds = [[normalize_squad_answer(g).split() for g in refs] for refs in references]
    candidates = {" ".join(tokens) for refs in golds for tokens in refs if tokens}
    candidates |= {token for refs in golds for tokens in refs for token in tokens}
    gold_counts = [[collections.Counter(tokens) for tokens in refs] for refs in golds]
    best = ConstantAnswer(answer="", f1=0.0)
    for candidate in sorted(candidates):
        tokens = candidate.split()
        counter = collections.Counter(tokens)
        total = 0.0
        for refs, counts in zip(golds, gold_counts):
            best_here = 0.0
            for gold, gold_counter in zip(refs, counts):
                same = sum((counter & gold_counter).values())
                if same:
                    precision, recall = same / len(tokens), same / len(gold)
                    best_here = max(best_here, 2 * precision * recall / (precision + recall))
            total += best_here
        f1 = 100.0 * total / max(len(golds), 1)
        if f1 > best.f1:
            best = ConstantAnswer(answer=candidate, f1=f1)
    return best


def lead_sentences(text: str, count: int = 3) -> str:
    """The first ``count`` sentences of ``text``, newline-separated (how ROUGE-Lsum reads
    the references)."""
    sentences = [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]
    return "\n".join(sentences[:count])
