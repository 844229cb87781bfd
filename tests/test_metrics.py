"""Metrics against hand-worked cases and the reference packages' own numbers."""

import json

import pytest
import sacrebleu

from suite.metrics import (
    bleu_metric,
    normalize_squad_answer,
    rouge_metric,
    squad_exact_match,
    squad_f1,
    squad_metric,
)


def test_squad_normalisation_removes_articles_punctuation_and_case():
    assert normalize_squad_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_squad_answer("an apple, a pear") == "apple pear"
    # "a" inside a word is not an article
    assert normalize_squad_answer("Atlanta") == "atlanta"
    assert normalize_squad_answer("  Theatre  ") == "theatre"


def test_squad_f1_hand_worked():
    # prediction tokens: [denver, broncos, team]; gold: [denver, broncos]
    # precision 2/3, recall 1 -> F1 = 0.8
    assert squad_f1("the Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    assert squad_f1("Carolina", "Denver Broncos") == 0.0
    assert squad_exact_match("The Denver Broncos.", "denver broncos") == 1.0


def test_squad_metric_takes_maximum_over_gold_answers_in_percent():
    predictions = ["Santa Clara", "Broncos", "nothing"]
    references = [["Levi's Stadium", "Santa Clara, California"],  # F1 = 2*(1*2/3)/(1+2/3) = 0.8
                  ["Denver Broncos", "Broncos"],                    # exact via 2nd gold
                  ["something"]]
    result = squad_metric(predictions, references)
    assert result.scores["exact_match"] == pytest.approx(100 / 3)
    assert result.scores["f1"] == pytest.approx(100 * (0.8 + 1.0 + 0.0) / 3)
    assert result.primary == "f1"


def test_bleu_equals_sacrebleu_corpus_score_on_the_wmt_sample(samples_dir):
    refs, hyps = [], []
    with open(samples_dir / "wmt_en_fr_sample.jsonl", encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i == 60:
                break
            fr = json.loads(line)["translation"]["fr"]
            refs.append(fr)
            words = fr.split()
            # a degraded system output: drop every third word
            hyps.append(" ".join(w for j, w in enumerate(words) if j % 3 != 2))
    ours = bleu_metric(hyps, [[r] for r in refs])
    theirs = sacrebleu.corpus_bleu(hyps, [refs])
    assert ours.scores["bleu"] == pytest.approx(theirs.score, abs=1e-9)
    assert 5 < ours.scores["bleu"] < 95
    assert ours.signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


def test_rouge_known_pairs():
    # reference 6 tokens, prediction 3 tokens all matching: P=1, R=0.5, F=2/3
    result = rouge_metric(["the cat sat"], [["the cat sat on the mat"]])
    assert result.scores["rouge1"] == pytest.approx(100 * 2 / 3)
    # bigrams: ref 5, pred 2 all matching: P=1, R=0.4 -> F=4/7
    assert result.scores["rouge2"] == pytest.approx(100 * 4 / 7)


def test_rouge_uses_the_stemmer():
    result = rouge_metric(["running dogs"], [["run dog"]])
    assert result.scores["rouge1"] == pytest.approx(100.0)


def test_rouge_lsum_splits_reference_sentences_on_newlines():
    prediction = "the dog ran the cat sat"
    result = rouge_metric([prediction], [["the cat sat\nthe dog ran"]])
    assert result.scores["rougeL"] == pytest.approx(50.0)      # one LCS over the whole text
    assert result.scores["rougeLsum"] == pytest.approx(100.0)  # union LCS per sentence


def test_metrics_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        squad_metric(["a", "b"], [["a"]])
