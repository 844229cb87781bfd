"""SentencePiece tokenizers trained on task text: loading, the long-line guard, the unk check."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from suite.cli import main
from suite.errors import ExitbenchError
from suite.tasks import get_task, load_examples
from suite.tokenizer import (
    METADATA_FILE,
    SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES,
    SPIECE_FILE,
    HighUnkRateError,
    TokenizerSettings,
    corpus_lines,
    count_unknown,
    load_tokenizer,
    sha256_file,
    split_long_line,
    task_texts,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def squad_texts(samples_dir):
    train, _ = task_texts(["squad"], "validation[200:]", samples_dir)
    heldout, _ = task_texts(["squad"], "validation[:200]", samples_dir)
    return train, heldout


@pytest.fixture(scope="module")
def squad_tokenizer(tmp_path_factory, squad_texts):
    train, heldout = squad_texts
    out = tmp_path_factory.mktemp("tok") / "squad"
    report = train_tokenizer(train, heldout, out, TokenizerSettings(vocab_size=2000),
                             provenance={"train": "squad validation[200:]"})
    return out, report


def test_trained_tokenizer_loads_via_from_pretrained(squad_tokenizer, squad_texts):
    import sentencepiece as spm
    from transformers import AutoTokenizer, T5Tokenizer

    out, report = squad_tokenizer
    _, heldout = squad_texts
    assert report.heldout.rate < 0.01
    assert report.vocab_size == 2000 + 100  # pieces + T5 sentinels
    processor = spm.SentencePieceProcessor(model_file=str(out / SPIECE_FILE))
    text = heldout[0]
    for tokenizer in (T5Tokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(out)),
                      load_tokenizer(out)):
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
        assert tokenizer.bos_token_id is None
        ids = tokenizer(text)["input_ids"]
        assert ids == [*processor.encode(text), 1]  # same ids as SentencePiece, then EOS
        assert tokenizer.decode(ids, skip_special_tokens=True).split() == text.split()
    assert count_unknown(load_tokenizer(out), heldout).rate == pytest.approx(report.heldout.rate)


def test_metadata_records_corpus_rate_and_hash(squad_tokenizer):
    out, report = squad_tokenizer
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["spiece_sha256"] == sha256_file(out / SPIECE_FILE) == report.spiece_sha256
    assert meta["vocab_size"] == 2100
    assert meta["special_ids"] == {"pad": 0, "eos": 1, "unk": 2, "bos": None}
    assert meta["provenance"] == {"train": "squad validation[200:]"}
    assert meta["heldout"]["num_tokens"] > 10_000
    assert meta["heldout"]["rate"] == pytest.approx(report.heldout.rate)
    assert meta["corpus"]["num_skipped_lines"] == 0


def test_training_is_deterministic(tmp_path, squad_tokenizer, squad_texts):
    out, report = squad_tokenizer
    train, heldout = squad_texts
    again = train_tokenizer(train, heldout, tmp_path / "again", TokenizerSettings(vocab_size=2000))
    assert again.spiece_sha256 == report.spiece_sha256


def test_split_long_line_keeps_text_and_respects_byte_limit():
    sentence = "Le château était très beau. " * 40 + "x" * 300 + " fin?"
    parts = split_long_line(sentence.strip(), 200)
    assert len(parts) > 1
    assert all(len(p.encode("utf-8")) <= 200 for p in parts)
    assert "".join(parts).replace(" ", "") == sentence.replace(" ", "")
    # sentence boundaries are preferred: the first part ends a sentence
    assert parts[0].endswith(".")


def test_long_lines_are_split_so_nothing_is_skipped(tmp_path, samples_dir):
    """Whole documents over SentencePiece's 4192-byte line limit, one per line: fed as they
    are, SentencePiece skips every one and trains nothing; our corpus guard splits them."""
    import sentencepiece as spm

    examples = load_examples(get_task("squad"), "validation[200:]", samples_dir)
    contexts = list(dict.fromkeys(e.source.split(" context: ", 1)[1] for e in examples))
    documents, current = [], ""
    for context in contexts:
        current = f"{current} {context.replace(chr(10), ' ')}".strip()
        if len(current.encode("utf-8")) > 5000:
            documents.append(current)
            current = ""
    assert len(documents) >= 10
    assert all(len(d.encode("utf-8")) > SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES for d in documents)

    with pytest.raises(RuntimeError):  # the trap: every line skipped, nothing to train on
        spm.SentencePieceTrainer.train(sentence_iterator=iter(documents), model_writer=io.BytesIO(),
                                       vocab_size=500, minloglevel=2)

    lines, stats = corpus_lines(documents)
    assert stats.num_split_texts == len(documents) and stats.num_skipped_lines == 0
    assert max(len(line.encode("utf-8")) for line in lines) <= SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES
    heldout = [e.source for e in load_examples(get_task("squad"), "validation[:50]", samples_dir)]
    report = train_tokenizer(documents, heldout, tmp_path / "long", TokenizerSettings(vocab_size=1000))
    assert report.corpus.num_skipped_lines == 0
    assert report.heldout.rate < 0.01


def test_high_unk_rate_fails_loudly_and_writes_nothing(tmp_path, squad_texts):
    train, _ = squad_texts
    # Held-out text in scripts the English corpus never shows.
    heldout = ["Η Ελλάδα είναι χώρα της νοτιοανατολικής Ευρώπης.",
               "Москва является столицей России.", "東京は日本の首都です。"]
    out = tmp_path / "tok"
    with pytest.raises(HighUnkRateError) as info:
        train_tokenizer(train[:400], heldout, out, TokenizerSettings(vocab_size=1000))
    message = str(info.value)
    assert "<unk>" in message and "--max-unk-rate" in message and "Nothing was written" in message
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary folder left behind either
    # The threshold is configurable.
    report = train_tokenizer(train[:400], heldout, out,
                             TokenizerSettings(vocab_size=1000, max_unk_rate=1.0))
    assert report.heldout.rate > 0.1
    assert report.heldout.top_unknown  # names what became <unk>


def test_load_tokenizer_rejects_mismatched_files(tmp_path, squad_tokenizer, squad_texts):
    out, _ = squad_tokenizer
    train, heldout = squad_texts
    other = tmp_path / "other"
    train_tokenizer(train[:600], heldout, other, TokenizerSettings(vocab_size=800))

    # A tokenizer.json that does not belong to spiece.model: the round trip catches it.
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.copyfile(other / "tokenizer.json", broken / "tokenizer.json")
    with pytest.raises(ExitbenchError, match="differently from SentencePiece"):
        load_tokenizer(broken)

    # A spiece.model changed after training: the recorded hash catches it.
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    shutil.copyfile(other / SPIECE_FILE, swapped / SPIECE_FILE)
    with pytest.raises(ExitbenchError, match="SHA-256"):
        load_tokenizer(swapped)

    with pytest.raises(ExitbenchError, match="train-tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_vocabulary_too_large_names_the_fix(tmp_path):
    with pytest.raises(ExitbenchError, match="--vocab-size"):
        train_tokenizer(["a tiny corpus with few words"] * 3, ["a tiny"], tmp_path / "t",
                        TokenizerSettings(vocab_size=5000))


def test_cli_trains_and_refuses_overlapping_heldout(tmp_path, samples_dir, capsys):
    out = tmp_path / "tok"
    code = main(["train-tokenizer", "--task", "wmt15_en_fr", "--split", "validation[300:]",
                 "--heldout-split", "validation[:300]", "--vocab-size", "1500",
                 "--data-dir", str(samples_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "held-out <unk>" in printed and "0 line(s) skipped" in printed
    meta = json.loads((out / METADATA_FILE).read_text())
    assert meta["provenance"]["train"][0] == {"task": "wmt15_en_fr", "split": "validation[300:]",
                                              "num_examples": 1198}
    assert load_tokenizer(out)("Le chat est là.")["input_ids"][-1] == 1

    code = main(["train-tokenizer", "--task", "squad", "--split", "validation",
                 "--heldout-split", "validation[:100]", "--data-dir", str(samples_dir),
                 "--out", str(tmp_path / "overlap")])
    err = capsys.readouterr().err
    assert code == 2 and "also in --split" in err and "Traceback" not in err
