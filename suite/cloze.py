"""Cloze questions made from plain text: pre-training data for the offline default backbone.

A tiny T5 trained from scratch on a few hundred SQuAD questions never learns to find an
answer in its context (it repeats one token). Extractive QA is mostly *find the sentence
the question paraphrases, copy the span it asks for*, and that skill can be taught from any
English text: take a sentence of a passage, cut a span out of it (a name, a number, or a
few words), put a question word where the span was, and ask for the span with the passage
as context::

    question: The American Football Conference champion who defeated the National
              Football Conference champion Carolina Panthers 24-10?
    context:  ... champion Denver Broncos defeated the National Football ...
    answer:   Denver Broncos

Questions drop a share of their words at random, so the model learns to match partly, as
real questions paraphrase. Records come out in SQuAD's layout (``context``, ``question``,
``answers.text``, ``answers.answer_start``), so the ``squad`` task's template, limits and
loader read them like real questions. Everything is a pure function of the text and a
seed (Python's ``random.Random``, stable across platforms).

Cloze alone does not get a model from scratch off the plateau either: language lets it
lower the loss without looking at the context. Exercises over *random* words
(:func:`random_copy_record`, :func:`random_cloze_record`) leave no such shortcut, so the
loss falls only once cross-attention copies; the default backbone's recipe
(``scripts/train_default_backbone.py``) starts with them."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_STRIP = ",.;:!?\"'()[]"
_STOP_WORDS = frozenset(
    "a an the of in on at to and or for with by from as is was were are be been being that "
    "this these those which it its their his her he she they we you i not no but if then "
    "than so such into over under about after before during".split())
YEAR = re.compile(r"1[0-9]{3}|20[0-9]{2}")


@dataclass(frozen=True)
class ClozeSettings:
    """How cloze questions are cut (recorded with the data they make)."""

    seed: int = 0
    context_sentences: tuple[int, int] = (1, 5)
    """Sentences of context around the question's sentence: from ``min`` to ``max`` in all."""
    min_sentence_words: int = 6
    max_sentence_words: int = 40
    word_dropout: float = 0.15
    """Share of the question's words (other than its question word) left out."""
    random_span_share: float = 0.3
    """Share of questions whose answer is a random content-word span rather than a name or
    number."""


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


def _named_spans(words: Sequence[str]) -> list[tuple[int, int]]:
    """Runs of capitalised words or numbers (not the sentence's first word): the names,
    dates and quantities SQuAD answers mostly are."""
    spans, i = [], 1
    while i < len(words):
        word = words[i].strip(_STRIP)
        if word and (word[0].isupper() or word[0].isdigit()):
            j = i
            while j + 1 < len(words) and j - i < 3 and words[j + 1].strip(_STRIP)[:1].isupper():
                j += 1
            spans.append((i, j + 1))
            i = j + 1
        else:
            i += 1
    return spans


def _question_word(span: str, rng: random.Random) -> str:
    first = span.split()[0]
    if YEAR.fullmatch(first):
        return "when"
    if first[0].isdigit():
        return "how many"
    if first[0].isupper():
        return rng.choice(("who", "what", "which"))
    return "what"


def cloze_question(passage: str, rng: random.Random, settings: ClozeSettings
                   ) -> dict[str, Any] | None:
    """One cloze question over ``passage`` (SQuAD layout without an id), or ``None`` when
    the passage has no usable sentence."""
    parts = sentences(passage)
    usable = [k for k, s in enumerate(parts)
              if settings.min_sentence_words <= len(s.split()) <= settings.max_sentence_words]
    if not usable:
        return None
    k = usable[rng.randrange(len(usable))]
    words = parts[k].split()
    spans = _named_spans(words)
    if not spans or rng.random() < settings.random_span_share:
        content = [i for i, w in enumerate(words)
                   if i > 0 and w.strip(_STRIP) and w.strip(_STRIP).lower() not in _STOP_WORDS]
        if not content:
            return None
        start = content[rng.randrange(len(content))]
        spans = [(start, min(len(words), start + rng.choice((1, 1, 2, 3))))]
    first, end = spans[rng.randrange(len(spans))]
    answer = " ".join(words[first:end]).strip(_STRIP)
    if not answer:
        return None
    wh = _question_word(answer, rng)
    asked = words[:first] + [wh] + words[end:]
    kept = [w for i, w in enumerate(asked) if i == first or rng.random() >= settings.word_dropout]
    question = " ".join(kept).rstrip(_STRIP) + "?"
    question = question[0].upper() + question[1:]
    low, high = settings.context_sentences
    size = rng.randint(low, high)
    begin = max(0, min(k - rng.randint(0, size - 1), len(parts) - size))
    context = " ".join(parts[begin:begin + size])
    offset = len(" ".join(parts[begin:k])) + (1 if k > begin else 0)
    start = context.find(answer, offset)
    if start < 0:
        start = context.find(answer)
    if start < 0:
        return None
    return {"context": context, "question": question,
            "answers": {"text": [answer], "answer_start": [start]}}


def cloze_records(passages: Sequence[str], count: int, settings: ClozeSettings,
                  id_prefix: str = "cloze") -> list[dict[str, Any]]:
    """``count`` cloze questions, each over a passage drawn at random (with replacement)."""
    rng = random.Random(settings.seed)
    records: list[dict[str, Any]] = []
    usable = [p for p in passages if p.strip()]
    if not usable:
        return records
    attempts = 0
    while len(records) < count and attempts < 20 * count:
        attempts += 1
        passage_index = rng.randrange(len(usable))
        record = cloze_question(usable[passage_index], rng, settings)
        if record is not None:
            records.append({"id": f"{id_prefix}-{len(records)}", "title": f"passage-{passage_index}",
                            **record})
    return records


def passages_of(texts: Iterable[str], sentences_per_passage: int = 8) -> list[str]:
    """Long texts (news articles) cut into passages of a few sentences."""
    found = []
    for text in texts:
        parts = sentences(text)
        found.extend(" ".join(parts[i:i + sentences_per_passage])
                     for i in range(0, len(parts), sentences_per_passage))
    return found


RECONSTRUCT_QUESTION = "What does the context say, word for word?"
"""The question of copying records (:func:`random_copy_record`)."""


def windowed_record(record: dict[str, Any], rng: random.Random,
                    max_sentences: int = 5) -> dict[str, Any]:
    """A SQuAD record whose context is cut to 1..``max_sentences`` sentences around its
    first answer (the whole context when the answer spans a sentence boundary): the same
    question, a shorter (cheaper) input."""
    context = record["context"]
    answer = record["answers"]["text"][0]
    start = record["answers"]["answer_start"][0]
    parts = sentences(context)
    offsets, position = [], 0
    for part in parts:
        position = context.find(part, position)
        offsets.append(position)
        position += len(part)
    k = max((i for i, o in enumerate(offsets) if o <= start), default=0)
    size = rng.randint(1, max_sentences)
    begin = max(0, min(k - rng.randint(0, size - 1), len(parts) - size))
    window = " ".join(parts[begin:begin + size])
    found = window.find(answer)
    if found < 0:
        return dict(record)
    return {**record, "context": window,
            "answers": {"text": [answer], "answer_start": [found]}}


def word_vocabulary(texts: Iterable[str], size: int = 3000) -> list[str]:
    """The alphabetic words among the ``size`` most frequent words of ``texts`` (lower-cased,
    outer punctuation stripped; most frequent first, ties in first-seen order), without
    "what" (the random cloze questions' question word): the words random-word exercises
    draw from."""
    from collections import Counter

    counts = Counter(w.strip(",.;:!?\"'()").lower() for text in texts for w in text.split())
    return [w for w, _ in counts.most_common(size) if w.isalpha() and w != "what"]


def random_copy_record(vocabulary: Sequence[str], rng: random.Random,
                       words: tuple[int, int] = (3, 10)) -> dict[str, Any]:
    """A copying exercise over random words (SQuAD layout): the context is ``words[0]`` to
    ``words[1]`` words drawn uniformly from ``vocabulary``, the answer is the context. With
    no language to lean on, the loss falls only once the model copies through its
    cross-attention: the skill every extractive answer needs (learned in 1,500 steps by the
    default backbone's recipe)."""
    text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(*words)))
    return {"context": text, "question": RECONSTRUCT_QUESTION,
            "answers": {"text": [text], "answer_start": [0]}}


def random_cloze_record(vocabulary: Sequence[str], rng: random.Random,
                        words: tuple[int, int] = (8, 30)) -> dict[str, Any]:
    """A matching exercise over random words (SQuAD layout): the context is random words;
    the question is a window of it with a span of 1-3 words replaced by "what"; the answer
    is that span. The model must find the window in the context and copy what it left out:
    cloze questions' skill without the shortcut of guessing from language."""
    context = [rng.choice(vocabulary) for _ in range(rng.randint(*words))]
    size = min(len(context), rng.choice((1, 1, 2, 3)))
    start = rng.randrange(len(context) - size + 1)
    low = max(0, start - rng.randint(2, 5))
    high = min(len(context), start + size + rng.randint(2, 5))
    question = " ".join(context[low:start] + ["what"] + context[start + size:high]) + "?"
    offset = len(" ".join(context[:start])) + (1 if start else 0)
    return {"context": " ".join(context), "question": question,
            "answers": {"text": [" ".join(context[start:start + size])],
                        "answer_start": [offset]}}
