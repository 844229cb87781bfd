"""Reproduce the offline quickstart's default backbone (``backbones/tiny-t5-squad``).

    make default-backbone          # = .venv/bin/python scripts/train_default_backbone.py

A tiny T5 (the ``tiny`` preset: 6+6 layers, d_model 128, 3.3M parameters) trained by
exitbench's own ``train`` in three stages, each started from the one before (``--init``),
every example in SQuAD's layout (:mod:`suite.cloze`):

1. ``copy`` (vanilla objective, from scratch): copy 3-8 random words. A T5 this small
   trained from scratch on extractive questions sits on the unigram plateau (one token for
   every input) for thousands of steps; random-word copying has no language to lean on, so
   the loss falls only once cross-attention copies, and it does within 1,500 steps --
   at learning rate 1e-3 (at 2e-3 it had not within 1,200 steps; at 3e-3 a copy task
   never moves: docs/finetuning.md lists what was tried);
2. ``match`` (vanilla): random-word cloze (find a window of random words, copy the words it
   left out), random-word copying, cloze questions cut from the samples' English text with
   1-3 sentences of context, and the SQuAD sample's training questions with 1-2 sentences of
   context around the answer;
3. ``finetune`` (CALM objective): cloze questions with 1-5 sentences of context, and the
   training questions windowed (1-5 sentences) and whole.

The text is the English of the bundled samples outside the slices other configs
evaluate: the SQuAD sample's paragraphs outside ``validation[:200]``, the CNN/DM
sample's articles outside ``validation[:100]`` and the WMT sample's English sentences
outside ``validation[:200]``; the SQuAD training questions are ``validation[200:]`` (764).
The SentencePiece tokenizer is trained on the same text. The weights are stored in
float16 (rounded from the float32 result; the suite loads them as float32) to keep the
repository small. Everything is seeded: on the same torch build and thread count the run
reproduces the same weights (``--check`` compares their hash with the shipped one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
HELD_OUT = {"squad": "validation[:200]", "cnn_dailymail": "validation[:100]",
            "wmt15_en_fr": "validation[:200]"}
TRAIN_SPLITS = {"squad": "validation[200:]", "cnn_dailymail": "validation[100:]",
                "wmt15_en_fr": "validation[200:]"}


def passages(data_dir: Path) -> tuple[list[str], dict[str, int]]:
    """English passages of the bundled samples outside the held-out slices."""
    from suite.cloze import passages_of
    from suite.tasks import get_task, load_records

    squad, _ = load_records(get_task("squad"), TRAIN_SPLITS["squad"], data_dir)
    held, _ = load_records(get_task("squad"), HELD_OUT["squad"], data_dir)
    unseen = set(held["context"])
    found = {"squad": [c for c in dict.fromkeys(squad["context"]) if c not in unseen]}
    cnn, _ = load_records(get_task("cnn_dailymail"), TRAIN_SPLITS["cnn_dailymail"], data_dir)
    found["cnn_dailymail"] = passages_of(cnn["article"])
    wmt, _ = load_records(get_task("wmt15_en_fr"), TRAIN_SPLITS["wmt15_en_fr"], data_dir)
    documents: dict[str, list[str]] = {}
    for record_id, pair in zip(wmt["id"], wmt["translation"]):
        documents.setdefault(record_id.rsplit(".", 1)[0], []).append(pair["en"])
    found["wmt15_en_fr"] = passages_of(" ".join(d) for d in documents.values())
    return [p for ps in found.values() for p in ps], {k: len(v) for k, v in found.items()}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage of the recipe: its examples (a mixture, ``shares`` by kind) and
    the settings ``train`` gets."""

    name: str
    objective: str
    steps: int
    shares: dict[str, float]
    """Kinds: ``rcopy`` (copy random words), ``rcloze`` (cloze over random words), ``cloze``
    (over the samples' text), ``window`` (a training question, its context cut around the
    answer), ``whole`` (a training question as it is)."""
    learning_rate: float
    lr_schedule: str
    warmup_steps: int
    batch_size: int
    max_source_tokens: int
    data_seed: str
    """Seeds the mixture's ``random.Random`` (the names of the stages in the experiment
    that found this recipe)."""
    copy_words: tuple[int, int] = (3, 8)
    random_cloze_words: tuple[int, int] = (8, 30)
    cloze_sentences: tuple[int, int] = (1, 2)
    window_sentences: int = 1


STAGES = (
    Stage("copy", "vanilla", 1500, {"rcopy": 1.0}, 1e-3, "constant", 100, 32, 48, "P"),
    Stage("match", "vanilla", 1500, {"rcopy": 0.15, "rcloze": 0.35, "cloze": 0.3,
                                     "window": 0.2}, 1e-3, "linear", 50, 32, 128, "Q",
          copy_words=(3, 12), random_cloze_words=(8, 40), cloze_sentences=(1, 3),
          window_sentences=2),
    Stage("finetune", "calm", 1000, {"cloze": 0.4, "window": 0.3, "whole": 0.3}, 5e-4,
          "linear", 50, 16, 256, "R", cloze_sentences=(1, 5), window_sentences=5),
)


def stage_records(stage: Stage, texts: list[str], real: list[dict],
                  vocabulary: list[str]) -> list[dict]:
    """``stage.steps * stage.batch_size`` records in SQuAD's layout, drawn by ``shares``."""
    from suite.cloze import (
        ClozeSettings,
        cloze_question,
        random_cloze_record,
        random_copy_record,
        windowed_record,
    )

    rng = random.Random(stage.data_seed)
    settings = ClozeSettings(context_sentences=stage.cloze_sentences)
    kinds, weights = zip(*stage.shares.items())
    records: list[dict] = []
    while len(records) < stage.steps * stage.batch_size:
        kind = rng.choices(kinds, weights)[0]
        if kind == "rcopy":
            record = random_copy_record(vocabulary, rng, stage.copy_words)
        elif kind == "rcloze":
            record = random_cloze_record(vocabulary, rng, stage.random_cloze_words)
        elif kind == "cloze":
            record = cloze_question(texts[rng.randrange(len(texts))], rng, settings)
        elif kind == "window":
            record = windowed_record(real[rng.randrange(len(real))], rng,
                                     max_sentences=stage.window_sentences)
        else:
            record = dict(real[rng.randrange(len(real))])
        if record is not None:
            record = {k: v for k, v in record.items() if k not in ("id", "title")}
            records.append({"id": f"{kind}-{len(records)}", "title": kind, **record})
    return records


def write_stage_data(stage: Stage, records: list[dict], folder: Path) -> None:
    """``folder/squad/stage.jsonl`` (the ``stage`` split) beside the sample's validation file."""
    (folder / "squad").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAMPLES / "squad_v1.1_dev_sample.jsonl", folder / "squad" / "validation.jsonl")
    with open(folder / "squad" / "stage.jsonl", "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "backbones" / "tiny-t5-squad"))
    parser.add_argument("--work", default=str(REPO / "runs" / "default-backbone"),
                        help="tokenizer, generated data and each stage's float32 model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-only", action="store_true",
                        help="write the tokenizer and every stage's examples, train nothing")
    parser.add_argument("--check", action="store_true",
                        help="compare the weights' SHA-256 with the one recorded in --out "
                        "(stages already finished in --work are reused, not retrained)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    from suite.cloze import word_vocabulary
    from suite.models import weights_sha256
    from suite.tasks import get_task, load_records
    from suite.tokenizer import TokenizerSettings, read_metadata, train_tokenizer
    from suite.training import MODEL_METADATA_FILE, TrainSettings, train

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work, out = Path(args.work), Path(args.out)
    texts, counts = passages(SAMPLES)
    squad, _ = load_records(get_task("squad"), TRAIN_SPLITS["squad"], SAMPLES)
    held, _ = load_records(get_task("squad"), HELD_OUT["squad"], SAMPLES)
    tokenizer_dir = work / "tokenizer"
    if read_metadata(tokenizer_dir) is None:
        train_tokenizer(texts + list(squad["question"]),
                        list(held["question"]) + list(held["context"]),
                        tokenizer_dir, TokenizerSettings(vocab_size=4000, seed=0),
                        {"passages": counts, "squad_questions": len(squad)})
    real = [dict(r) for r in squad]
    vocabulary = word_vocabulary(texts)
    examples: dict[str, dict[str, int]] = {}
    stage_results = []
    init: Path | None = None
    for stage in STAGES:
        records = stage_records(stage, texts, real, vocabulary)
        examples[stage.name] = {kind: sum(r["title"] == kind for r in records)
                                for kind in stage.shares}
        data_dir = work / "data" / stage.name
        write_stage_data(stage, records, data_dir)
        if args.data_only:
            continue
        folder = work / f"stage-{stage.name}"
        common = dict(objective=stage.objective, split="stage", steps=stage.steps,
                      learning_rate=stage.learning_rate, tasks=("squad",),
                      max_source_tokens=stage.max_source_tokens, batch_size=stage.batch_size,
                      warmup_steps=stage.warmup_steps, seed=0, dropout_rate=0.0,
                      lr_schedule=stage.lr_schedule)
        if init is None:
            settings, tokenizer = TrainSettings(preset="tiny", **common), tokenizer_dir
        else:
            settings, tokenizer = TrainSettings(preset=None, init=str(init), **common), None
        result = train(settings, tokenizer, folder, data_dir=data_dir,
                       eval_split=HELD_OUT["squad"], checkpoint_every=500, threads=args.threads)
        print(f"stage {stage.name}: {result.steps} steps, held-out CE per layer "
              + " ".join(f"{v:.3f}" for v in result.eval_layer_ce or ()), flush=True)
        stage_results.append({"stage": dataclasses.asdict(stage), "steps": result.steps,
                              "final_loss": result.final_loss,
                              "held_out_layer_ce": result.eval_layer_ce,
                              "seconds": result.metadata.get("train_seconds")})
        init = folder
    if args.data_only:
        print(f"{work}: tokenizer and data of {len(STAGES)} stages; examples {examples}")
        return 0

    from transformers import T5ForConditionalGeneration

    from suite.backbones import copy_tokenizer
    from suite.training import _write_folder

    metadata = dict(result.metadata)
    metadata["label"] = (
        "tiny T5 (6+6 layers, d_model 128) trained by exitbench from scratch on the bundled "
        "samples: random-word copying and cloze, cloze questions cut from the samples' English "
        "text, then the CALM objective on cloze and the SQuAD sample's 764 training questions "
        f"({' + '.join(str(s.steps) for s in STAGES)} steps; `make default-backbone`); "
        "weights in float16; not a published checkpoint")
    metadata["recipe"] = {"command": "make default-backbone",
                          "script": "scripts/train_default_backbone.py",
                          "threads": args.threads, "passages": counts, "examples": examples,
                          "stages": stage_results, "stored_dtype": "float16"}
    final = init  # the last stage's folder

    def fill(folder: Path) -> None:
        model = T5ForConditionalGeneration.from_pretrained(final).half()
        model.save_pretrained(folder)
        copy_tokenizer(final, folder)
        digest = weights_sha256(folder)
        metadata["weights_sha256"] = digest
        text = json.dumps(metadata, indent=1) + "\n"
        # The shipped record names the work folder as the command makes it, not this machine's.
        for local in (str(work.resolve()), str(work)):
            text = text.replace(json.dumps(local)[1:-1], "runs/default-backbone")
        (folder / MODEL_METADATA_FILE).write_text(text)

    if args.check:
        recorded = json.loads((out / MODEL_METADATA_FILE).read_text())["weights_sha256"]
        check = work / "check"
        _write_folder(check, fill)
        ours = weights_sha256(check)
        print(f"weights SHA-256 {ours} ({'equal to' if ours == recorded else 'differs from'} "
              f"the shipped {recorded})")
        return 0 if ours == recorded else 1
    _write_folder(out, fill)
    print(f"{out}: weights SHA-256 {metadata['weights_sha256']}; "
          f"{time.perf_counter() - started:.0f} s; held-out CE per layer "
          + " ".join(f"{v:.3f}" for v in result.eval_layer_ce or ()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
