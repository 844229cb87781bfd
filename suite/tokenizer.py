"""SentencePiece tokenizers trained on task text, in the T5 layout.

A tokenizer folder holds:

- ``spiece.model``: the SentencePiece model (T5 ids: pad 0, eos 1, unk 2, no BOS);
- ``tokenizer.json`` / ``tokenizer_config.json``: what ``save_pretrained`` writes, so
  that ``transformers.AutoTokenizer.from_pretrained(folder)`` works as well as
  ``T5Tokenizer.from_pretrained(folder)``;
- ``exitbench_tokenizer.json``: how it was made (corpus tasks and splits, vocabulary
  size, held-out unknown-token rate, SHA-256 of ``spiece.model``, probe texts).

Two traps shape this module (both verified with sentencepiece 0.2.3 and
transformers 5.24):

1. SentencePiece's trainer silently skips input lines longer than its
   ``max_sentence_length`` (4192 bytes by default). Whole CNN/DailyMail articles,
   one per line, are mostly over that limit, so a naive corpus trains a vocabulary
   from a fraction of the text. :func:`corpus_lines` splits long texts at line and
   sentence boundaries (then words, then characters) so no line is over the limit,
   and counts what was split and what would still be skipped (always 0).
2. ``T5Tokenizer(vocab_file=...)`` builds a tokenizer that maps every word to
   ``<unk>``, while ``T5Tokenizer.from_pretrained(folder)`` loads the same model
   correctly. We only ever load through ``from_pretrained`` on the folder, and
   :func:`load_tokenizer` checks a round trip against SentencePiece itself.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from suite.atomic import atomic_write_json, temp_dir_beside
from suite.errors import ExitbenchError
from suite.traces import sha256_file

SPIECE_FILE = "spiece.model"
METADATA_FILE = "exitbench_tokenizer.json"
TOKENIZER_FORMAT_VERSION = 1
SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES = 4192
"""SentencePiece's own default ``max_sentence_length``; longer input lines are skipped."""
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
"""T5's conventions; there is no BOS."""
NUM_PROBES = 8
"""Held-out texts stored in the metadata and re-encoded on every load as a round-trip check."""


@dataclass(frozen=True)
class TokenizerSettings:
    """How to train a tokenizer. Everything here is recorded in the metadata."""

    vocab_size: int = 4000
    """SentencePiece pieces (pad, eos and unk included). T5 sentinels come on top."""
    model_type: str = "unigram"
    """``unigram`` (T5's choice) or ``bpe``."""
    character_coverage: float = 1.0
    """1.0 keeps every character of the corpus: small corpora need all of them to keep
    the unknown-token rate low (SentencePiece's default, 0.9995, drops rare letters)."""
    extra_ids: int = 100
    """T5 sentinel tokens ``<extra_id_N>`` appended after the pieces (T5's default 100)."""
    max_sentence_bytes: int = SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES
    """Passed to SentencePiece as ``max_sentence_length``; corpus lines are cut below it."""
    seed: int = 0
    max_unk_rate: float = 0.01
    """Fail when more than this fraction of held-out tokens is ``<unk>``."""

    def __post_init__(self) -> None:
        if self.model_type not in ("unigram", "bpe"):
            raise ExitbenchError(f"tokenizer model type {self.model_type!r} is not supported; "
                                 f"use 'unigram' (T5's) or 'bpe'")
        if self.vocab_size < 16:
            raise ExitbenchError(f"vocabulary size {self.vocab_size} is too small; use at least "
                                 f"16 (a few thousand for real text)")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ExitbenchError(f"character coverage {self.character_coverage} must be in (0, 1]")
        if not 0.0 <= self.max_unk_rate <= 1.0:
            raise ExitbenchError(f"max unknown-token rate {self.max_unk_rate} must be in [0, 1]")
        if self.max_sentence_bytes < 64:
            raise ExitbenchError(f"max sentence bytes {self.max_sentence_bytes} is too small; "
                                 f"keep SentencePiece's default {SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES}")


@dataclass(frozen=True)
class CorpusStats:
    """What went into SentencePiece."""

    num_texts: int
    """Texts given (sources and targets)."""
    num_lines: int
    """Distinct lines after splitting (duplicates, e.g. a context shared by many
    questions, are fed once so that they do not dominate the piece statistics)."""
    num_bytes: int
    num_split_texts: int
    """Texts that had a line over the byte limit and were cut at sentence boundaries."""
    num_skipped_lines: int
    """Lines still over SentencePiece's ``max_sentence_length``, which it would skip. 0 by
    construction; recorded so that the metadata proves it."""


@dataclass(frozen=True)
class UnkReport:
    """Unknown tokens when encoding held-out text with the tokenizer as the model sees it."""

    num_texts: int
    num_tokens: int
    """Tokens, EOS excluded."""
    num_unk: int
    top_unknown: tuple[tuple[str, int], ...] = ()
    """The most frequent input spans that became ``<unk>``, with counts."""

    @property
    def rate(self) -> float:
        return self.num_unk / self.num_tokens if self.num_tokens else 0.0


@dataclass(frozen=True)
class TokenizerReport:
    """The outcome of :func:`train_tokenizer`."""

    folder: str
    vocab_size: int
    """Tokens the model must embed (``len(tokenizer)``: pieces plus sentinels)."""
    corpus: CorpusStats
    heldout: UnkReport
    spiece_sha256: str
    seconds: float


class HighUnkRateError(ExitbenchError):
    """The held-out unknown-token rate is over the allowed maximum."""


# -- corpus --------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SPACE = re.compile(r"\s+")


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def _pack(pieces: Iterable[str], max_bytes: int, joiner: str = " ") -> list[str]:
    """Greedily join consecutive pieces into chunks of at most ``max_bytes`` UTF-8 bytes.
    A piece that is alone over the limit is returned as is (the caller splits it finer)."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current}{joiner}{piece}" if current else piece
        if _utf8_len(candidate) <= max_bytes:
            current = candidate
        else:
            if current:
                chunks.append(current)
            current = piece
    if current:
        chunks.append(current)
    return chunks


def _cut_bytes(text: str, max_bytes: int) -> list[str]:
    """Cut at character boundaries so each part has at most ``max_bytes`` UTF-8 bytes."""
    parts, current, size = [], [], 0
    for char in text:
        width = _utf8_len(char)
        if size + width > max_bytes and current:
            parts.append("".join(current))
            current, size = [], 0
        current.append(char)
        size += width
    if current:
        parts.append("".join(current))
    return parts


def split_long_line(line: str, max_bytes: int) -> list[str]:
    """Parts of ``line`` of at most ``max_bytes`` bytes: sentences packed together, a
    sentence over the limit cut between words, a word over the limit between characters."""
    if _utf8_len(line) <= max_bytes:
        return [line]
    parts: list[str] = []
    for chunk in _pack(_SENTENCE_END.split(line), max_bytes):
        if _utf8_len(chunk) <= max_bytes:
            parts.append(chunk)
            continue
        for words in _pack(chunk.split(" "), max_bytes):
            parts.extend([words] if _utf8_len(words) <= max_bytes else _cut_bytes(words, max_bytes))
    return parts


def corpus_lines(texts: Iterable[str], max_bytes: int = SENTENCEPIECE_DEFAULT_MAX_SENTENCE_BYTES
                 ) -> tuple[list[str], CorpusStats]:
    """The training lines for SentencePiece: every text split at newlines, long lines cut
    below ``max_bytes`` (see :func:`split_long_line`), whitespace runs collapsed,
    duplicates dropped (first occurrence kept, so the order is deterministic)."""
    seen: dict[str, None] = {}
    num_texts = num_split = 0
    for text in texts:
        num_texts += 1
        was_split = False
        for raw in text.splitlines():
            line = _SPACE.sub(" ", raw).strip()
            if not line:
                continue
            parts = split_long_line(line, max_bytes)
            was_split |= len(parts) > 1
            for part in parts:
                seen.setdefault(part.strip(), None)
        num_split += was_split
    lines = [line for line in seen if line]
    skipped = sum(_utf8_len(line) > max_bytes for line in lines)
    stats = CorpusStats(num_texts=num_texts, num_lines=len(lines),
                        num_bytes=sum(_utf8_len(line) for line in lines),
                        num_split_texts=num_split, num_skipped_lines=skipped)
    return lines, stats


# -- training ------------------------------------------------------------------------------
def _train_sentencepiece(lines: list[str], settings: TokenizerSettings) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(settings.seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model,
            vocab_size=settings.vocab_size, model_type=settings.model_type,
            character_coverage=settings.character_coverage,
            max_sentence_length=settings.max_sentence_bytes,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
            # The model bytes depend on the thread count (verified): one thread keeps
            # the same corpus and seed giving the same spiece.model everywhere.
            num_threads=1, shuffle_input_sentence=False, minloglevel=2)
    except RuntimeError as exc:
        message = str(exc)
        hint = ""
        limit = re.search(r"<= (\d+)", message)
        if "Vocabulary size too high" in message and limit:
            hint = (f" The corpus supports at most {limit.group(1)} pieces: pass a smaller "
                    f"--vocab-size or add text (more tasks or a larger split).")
        raise ExitbenchError(f"SentencePiece could not train a {settings.vocab_size}-piece "
                             f"{settings.model_type} model on {len(lines)} lines: "
                             f"{message.splitlines()[-1]}.{hint}") from exc
    return model.getvalue()


def count_unknown(tokenizer, texts: Sequence[str], spiece_path: str | Path | None = None,
                  top: int = 5) -> UnkReport:
    """Encode ``texts`` with ``tokenizer`` (EOS excluded) and count ``<unk>`` ids. With
    ``spiece_path``, also name the input spans that became ``<unk>`` (for the error)."""
    unk_id = tokenizer.unk_token_id
    eos_id = tokenizer.eos_token_id
    num_tokens = num_unk = 0
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids = [i for i in ids if i != eos_id]
        num_tokens += len(ids)
        num_unk += sum(i == unk_id for i in ids)
    top_unknown: tuple[tuple[str, int], ...] = ()
    if num_unk and spiece_path is not None:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=str(spiece_path))
        spans: Counter[str] = Counter()
        for text in texts:
            for piece in processor.encode(text, return_type="proto").pieces:
                if piece.id == UNK_ID:
                    spans[piece.surface] += 1
        top_unknown = tuple(spans.most_common(top))
    return UnkReport(num_texts=len(texts), num_tokens=num_tokens, num_unk=num_unk,
                     top_unknown=top_unknown)


def train_tokenizer(texts: Sequence[str], heldout: Sequence[str], out: str | Path,
                    settings: TokenizerSettings = TokenizerSettings(),
                    provenance: dict[str, Any] | None = None) -> TokenizerReport:
    """Train a T5-style SentencePiece tokenizer on ``texts`` and write its folder ``out``.

    The folder is built beside ``out`` and renamed into place only after the held-out
    unknown-token rate passed, so ``out`` either holds a checked tokenizer or is left
    untouched. ``provenance`` (tasks, splits) goes into the metadata as is.

    Raises :class:`HighUnkRateError` when more than ``settings.max_unk_rate`` of the
    held-out tokens are ``<unk>``, and :class:`ExitbenchError` for an empty corpus or
    held-out set, or an ``out`` that exists and is not a tokenizer folder.
    """
    start = time.perf_counter()
    out = Path(out)
    if not texts:
        raise ExitbenchError("the tokenizer corpus is empty: no texts to train on; check the "
                             "task and split")
    if not heldout:
        raise ExitbenchError("no held-out texts: the unknown-token rate must be measured on "
                             "text the tokenizer was not trained on (e.g. --heldout-split "
                             "'validation[:200]' when training on 'validation[200:]')")
    if out.exists() and not (out.is_dir() and (not any(out.iterdir())
                                               or (out / METADATA_FILE).is_file())):
        raise ExitbenchError(f"{out} exists and is not a tokenizer folder written by exitbench; "
                             f"choose another --out or remove it")

    lines, stats = corpus_lines(texts, settings.max_sentence_bytes)
    if stats.num_skipped_lines:  # pragma: no cover - corpus_lines guarantees 0
        raise AssertionError(f"{stats.num_skipped_lines} corpus lines over the byte limit")
    model_bytes = _train_sentencepiece(lines, settings)

    tmp = temp_dir_beside(out)
    try:
        (tmp / SPIECE_FILE).write_bytes(model_bytes)
        import transformers

        # Load through from_pretrained on the folder (never T5Tokenizer(vocab_file=...),
        # which maps every word to <unk> in transformers 5.24), then let it write its own
        # files so that AutoTokenizer finds the class.
        tokenizer = transformers.T5Tokenizer.from_pretrained(str(tmp), extra_ids=settings.extra_ids)
        tokenizer.save_pretrained(str(tmp))
        tokenizer = _load_checked(tmp, probes=list(heldout[:NUM_PROBES]))
        unk = count_unknown(tokenizer, heldout, tmp / SPIECE_FILE)
        if unk.rate > settings.max_unk_rate:
            shown = ", ".join(f"{span!r} x{n}" for span, n in unk.top_unknown)
            raise HighUnkRateError(
                f"the tokenizer maps {unk.rate:.2%} of held-out tokens to <unk> ({unk.num_unk} of "
                f"{unk.num_tokens} in {unk.num_texts} texts), over the allowed "
                f"{settings.max_unk_rate:.2%}; most frequent unknown spans: {shown or 'n/a'}. "
                f"Train on more or closer text (add tasks, widen the split), keep "
                f"--character-coverage 1.0, or raise --max-unk-rate if this is expected. "
                f"Nothing was written to {out}.")
        digest = sha256_file(tmp / SPIECE_FILE)
        report = TokenizerReport(folder=str(out), vocab_size=len(tokenizer), corpus=stats,
                                 heldout=unk, spiece_sha256=digest,
                                 seconds=time.perf_counter() - start)
        metadata = {
            "format_version": TOKENIZER_FORMAT_VERSION,
            "kind": "sentencepiece-t5",
            "label": "SentencePiece tokenizer trained by exitbench on task text; not a "
                     "published tokenizer",
            "vocab_size": report.vocab_size,
            "sentencepiece_pieces": settings.vocab_size,
            "special_ids": {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID, "bos": None},
            "settings": asdict(settings),
            "provenance": provenance or {},
            "corpus": asdict(stats),
            "heldout": {**asdict(unk), "rate": unk.rate,
                        "top_unknown": [list(t) for t in unk.top_unknown]},
            "spiece_sha256": digest,
            "probe_texts": list(heldout[:NUM_PROBES]),
        }
        atomic_write_json(tmp / METADATA_FILE, metadata)
        if out.exists():
            shutil.rmtree(out)  # a previous tokenizer folder (checked above) is replaced whole
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# -- loading -------------------------------------------------------------------------------
def read_metadata(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as exc:
        raise ExitbenchError(f"{path} is not valid JSON ({exc}); retrain the tokenizer with "
                             f"`exitbench train-tokenizer`") from exc


def spiece_sha256(folder: str | Path) -> str:
    """The identity of a tokenizer folder: the SHA-256 of its ``spiece.model``."""
    return sha256_file(Path(folder) / SPIECE_FILE)


def _default_probes(processor) -> list[str]:
    """Text made of the model's own pieces: encodes with no ``<unk>`` when loaded right."""
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
              if not (processor.is_control(i) or processor.is_unknown(i)
                      or processor.is_unused(i) or processor.is_byte(i))]
    words = [p for p in pieces if p.startswith("\u2581") and len(p) > 2][:64]
    return [" ".join(w.lstrip("\u2581") for w in words[i:i + 16]) for i in range(0, len(words), 16)]


def _load_checked(folder: Path, probes: list[str] | None = None):
    import sentencepiece as spm
    import transformers

    tokenizer = transformers.T5Tokenizer.from_pretrained(str(folder))
    problems = []
    for name, want in (("pad", PAD_ID), ("eos", EOS_ID), ("unk", UNK_ID)):
        got = getattr(tokenizer, f"{name}_token_id")
        if got != want:
            problems.append(f"{name} id is {got}, T5 needs {want}")
    processor = spm.SentencePieceProcessor(model_file=str(folder / SPIECE_FILE))
    probes = [p for p in (probes or []) if p.strip()] or _default_probes(processor)
    for text in probes:
        expected = processor.encode(text)
        got = tokenizer(text)["input_ids"]
        if got != [*expected, EOS_ID]:
            unk_share = sum(i == UNK_ID for i in got) / max(len(got), 1)
            problems.append(f"the transformers tokenizer encodes {text[:60]!r} differently from "
                            f"SentencePiece ({unk_share:.0%} <unk>; first ids {got[:8]} vs "
                            f"{expected[:8]})")
            break
    if problems:
        raise ExitbenchError(f"tokenizer folder {folder} does not load correctly: "
                             f"{'; '.join(problems)}. Retrain it with `exitbench train-tokenizer` "
                             f"or check the transformers version")
    return tokenizer


def load_tokenizer(folder: str | Path):
    """Load a tokenizer folder (one written by ``train-tokenizer``, or a model folder
    written by ``train``) with ``T5Tokenizer.from_pretrained`` and check it: T5's
    special ids, the SHA-256 recorded in the metadata, and a round trip of the stored
    probe texts against SentencePiece itself. Raises :class:`ExitbenchError` naming
    what is wrong."""
    folder = Path(folder)
    if not (folder / SPIECE_FILE).is_file():
        raise ExitbenchError(f"{folder} has no {SPIECE_FILE}: it is not a tokenizer folder; "
                             f"train one with `exitbench train-tokenizer --out {folder} ...`")
    metadata = read_metadata(folder)
    if metadata is not None:
        digest = spiece_sha256(folder)
        if metadata.get("spiece_sha256") != digest:
            raise ExitbenchError(f"{folder / SPIECE_FILE} has SHA-256 {digest[:12]}..., but "
                                 f"{METADATA_FILE} records {str(metadata.get('spiece_sha256'))[:12]}"
                                 f"...: the file was changed after training; retrain it")
    probes = (metadata or {}).get("probe_texts") or None
    return _load_checked(folder, probes)


TOKENIZER_FILES = (SPIECE_FILE, "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", METADATA_FILE)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy a tokenizer folder's files into ``dst`` (a model folder), byte for byte, so the
    model folder loads with the same ``spiece.model`` hash. Returns the names copied."""
    src, dst = Path(src), Path(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


@dataclass(frozen=True)
class TextSource:
    """One (task, split) that contributes text."""

    task: str
    split: str
    num_examples: int = 0
    example_ids: tuple[str, ...] = field(default=(), repr=False)


def task_texts(tasks: Sequence[str], split: str, data_dir: str | os.PathLike | None = None,
               limit: int | None = None) -> tuple[list[str], list[TextSource]]:
    """Sources and targets of each task's split, in file order."""
    from suite.tasks import get_task, load_examples

    texts: list[str] = []
    sources: list[TextSource] = []
    for name in tasks:
        examples = load_examples(get_task(name), split, data_dir, limit)
        for ex in examples:
            texts.append(ex.source)
            texts.append(ex.target)
        sources.append(TextSource(task=name, split=split, num_examples=len(examples),
                                  example_ids=tuple(ex.id for ex in examples)))
    return texts, sources
