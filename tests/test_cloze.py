"""Cloze pre-training questions and the trivial baselines a backbone must beat."""

from __future__ import annotations

import random

import pytest

from suite.baselines import best_constant_answer, lead_sentences
from suite.cloze import (
    RECONSTRUCT_QUESTION,
    ClozeSettings,
    cloze_question,
    cloze_records,
    passages_of,
    random_cloze_record,
    random_copy_record,
    windowed_record,
    word_vocabulary,
)
from suite.metrics import squad_metric
from suite.tasks import format_example, get_task, load_records

PASSAGE = ("Super Bowl 50 was an American football game. The American Football Conference "
           "champion Denver Broncos defeated the National Football Conference champion "
           "Carolina Panthers 24 to 10. The game was played on February 7, 2016, at Levi's "
           "Stadium in the San Francisco Bay Area.")


def test_cloze_answers_are_spans_of_their_context_and_questions_ask_for_them():
    settings = ClozeSettings(seed=0, word_dropout=0.0)
    rng = random.Random(0)
    for _ in range(50):
        record = cloze_question(PASSAGE, rng, settings)
        answer = record["answers"]["text"][0]
        start = record["answers"]["answer_start"][0]
        assert record["context"][start:start + len(answer)] == answer
        question = record["question"]
        assert question.endswith("?")
        assert any(wh in question.lower() for wh in ("who", "what", "which", "when", "how many"))
        # without dropout, the question is the sentence with the answer replaced
        sentence = next(s for s in PASSAGE.split(". ") if answer in s)
        words = [w for w in sentence.split() if w not in answer.split()]
        assert sum(w.strip(".,") in question for w in words) >= len(words) - 2


def test_cloze_records_are_reproducible_and_read_as_squad(samples_dir):
    task = get_task("squad")
    records_a = cloze_records([PASSAGE] * 3, 20, ClozeSettings(seed=4))
    records_b = cloze_records([PASSAGE] * 3, 20, ClozeSettings(seed=4))
    assert records_a == records_b and len(records_a) == 20
    assert records_a != cloze_records([PASSAGE] * 3, 20, ClozeSettings(seed=5))
    example = format_example(task, records_a[0], 0)
    assert example.source.startswith("question: ") and " context: " in example.source
    assert example.target == records_a[0]["answers"]["text"][0]
    articles, _ = load_records(get_task("cnn_dailymail"), "validation[:3]", samples_dir)
    passages = passages_of(articles["article"], sentences_per_passage=5)
    assert len(passages) > 3 and all(len(p.split()) > 10 for p in passages)


def test_best_constant_answer_is_the_best_single_string_under_the_official_metric():
    references = [["Denver Broncos"], ["Denver"], ["the Carolina Panthers", "Carolina"]]
    best = best_constant_answer(references)
    for candidate in ("denver", "denver broncos", "carolina", "panthers", "broncos"):
        f1 = squad_metric([candidate] * 3, references).scores["f1"]
        assert f1 <= best.f1 + 1e-9
    assert best.f1 == pytest.approx(squad_metric([best.answer] * 3, references).scores["f1"])
    assert best.answer == "denver"


def test_lead_three_takes_the_first_three_sentences():
    assert lead_sentences("One. Two! Three? Four.") == "One.\nTwo!\nThree?"


def test_windowed_records_keep_the_question_and_an_answer_span(samples_dir):
    records, _ = load_records(get_task("squad"), "validation[200:230]", samples_dir)
    rng = random.Random(0)
    shorter = 0
    for record in records:
        window = windowed_record(dict(record), rng)
        answer, start = window["answers"]["text"][0], window["answers"]["answer_start"][0]
        assert window["question"] == record["question"]
        assert window["context"][start:start + len(answer)] == answer
        assert window["context"] in record["context"]
        shorter += len(window["context"]) < len(record["context"])
    assert shorter > len(records) // 2


def test_word_vocabulary_keeps_frequent_alphabetic_words_without_the_question_word():
    text = "What the Broncos did: the Broncos won, 24 to 10. What a game! the end"
    assert word_vocabulary([text], size=3) == ["the", "broncos"]  # "what" (2nd) is left out
    assert word_vocabulary([text])[:3] == ["the", "broncos", "did"]


def test_random_word_exercises_ask_for_spans_of_their_context():
    vocabulary = word_vocabulary([PASSAGE])
    rng = random.Random(3)
    for _ in range(200):
        copy = random_copy_record(vocabulary, rng, (3, 8))
        assert copy["question"] == RECONSTRUCT_QUESTION
        assert copy["answers"]["text"] == [copy["context"]]
        assert 3 <= len(copy["context"].split()) <= 8
        cloze = random_cloze_record(vocabulary, rng, (8, 30))
        answer, start = cloze["answers"]["text"][0], cloze["answers"]["answer_start"][0]
        assert cloze["context"][start:start + len(answer)] == answer
        assert cloze["context"][start - 1:start] in ("", " ")
        # the question is the context's window with the answer replaced by "what"
        before, after = cloze["question"][:-1].split("what")
        window = (before + answer + after).strip()
        assert window in cloze["context"] and 1 <= len(answer.split()) <= 3
    again = random.Random(3)
    assert random_copy_record(vocabulary, again, (3, 8)) == random_copy_record(
        vocabulary, random.Random(3), (3, 8))
