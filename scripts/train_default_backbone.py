"""Reproduce the offline quickstart's default backbone (``backbones/tiny-t5-squad``).

    make default-backbone          # = .venv/bin/python scripts/train_default_backbone.py

A tiny T5 (the ``tiny`` preset: 6+6 layers, d_model 128) trained by exitbench's own
``train`` in two stages, all examples in SQuAD's layout (:mod:`suite.cloze`):

1. **pre-training** from scratch, vanilla objective: copying exercises
   (``reconstruction_record``), cloze questions (``cloze_question``) and the SQuAD
   sample's 764 training questions (``validation[200:]``) with contexts cut to a few
   sentences around the answer (``windowed_record``);
2. **fine-tuning** from stage 1 (``--init``), CALM objective: cloze questions and the
   training questions, windowed and with their whole contexts.

The text is the English of the bundled samples outside the slices other configs
evaluate: the SQuAD sample's paragraphs outside ``validation[:200]``, the CNN/DM
sample's articles outside ``validation[:100]`` and the WMT sample's English sentences
outside ``validation[:200]``. The SentencePiece tokenizer is trained on the same text. The weights are stored in
float16 (rounded from the float32 result; the suite loads them as float32) to keep the
repository small. Everything is seeded: on the same torch build and thread count the run
reproduces the same weights (``--check`` compares their hash with the shipped one).
"""

from __future__ import annotations

import argparse
import json
import os
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


def mixture(texts: list[str], real: list[dict], total: int, shares: dict[str, float],
            seed: int) -> list[dict]:
    """``total`` records in SQuAD's layout, drawn by ``shares`` from: ``reconstruct``
    (copying), ``cloze``, ``window`` (a real question, its context cut around the answer)
    and ``whole`` (a real question as it is)."""
    import random

    from suite.cloze import ClozeSettings, cloze_question, reconstruction_record, windowed_record

    rng = random.Random(seed)
    settings = ClozeSettings(seed=seed)
    kinds, weights = zip(*shares.items())
    records: list[dict] = []
    while len(records) < total:
        kind = rng.choices(kinds, weights)[0]
        if kind == "reconstruct":
            record = reconstruction_record(texts[rng.randrange(len(texts))], rng)
        elif kind == "cloze":
            record = cloze_question(texts[rng.randrange(len(texts))], rng, settings)
        elif kind == "window":
            record = windowed_record(real[rng.randrange(len(real))], rng)
        else:
            record = dict(real[rng.randrange(len(real))])
        if record is not None:
            record = {k: v for k, v in record.items() if k not in ("id", "title")}
            records.append({"id": f"{kind}-{len(records)}", "title": kind, **record})
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "backbones" / "tiny-t5-squad"))
    parser.add_argument("--work", default=str(REPO / "runs" / "default-backbone"),
                        help="tokenizer, generated data and the float32 model")
    parser.add_argument("--pretrain-steps", type=int, default=6000)
    parser.add_argument("--finetune-steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true",
                        help="compare the weights' SHA-256 with the one recorded in --out")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

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

    data_dir = work / "data"
    (data_dir / "squad").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SAMPLES / "squad_v1.1_dev_sample.jsonl", data_dir / "squad" / "validation.jsonl")
    real = [dict(r) for r in squad]
    stages = {
        "pretrain": (args.pretrain_steps, {"reconstruct": 0.3, "cloze": 0.5, "window": 0.2}),
        "finetune": (args.finetune_steps, {"cloze": 0.4, "window": 0.3, "whole": 0.3}),
    }
    counts_by_stage = {}
    for stage, (steps, shares) in stages.items():
        records = mixture(texts, real, steps * args.batch_size, shares, seed=len(counts_by_stage))
        counts_by_stage[stage] = {kind: sum(r["id"].startswith(kind) for r in records)
                                  for kind in shares}
        with open(data_dir / "squad" / f"{stage}.jsonl", "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    common = dict(preset="tiny", tasks=("squad",), max_source_tokens=256,
                  batch_size=args.batch_size, warmup_steps=300, seed=0)
    pretrained = train(TrainSettings(objective="vanilla", split="pretrain",
                                     steps=args.pretrain_steps,
                                     learning_rate=args.pretrain_lr, **common),
                       tokenizer_dir, work / "stage1-pretrained", data_dir=data_dir,
                       eval_split=HELD_OUT["squad"], checkpoint_every=250,
                       threads=args.threads)
    print(f"stage 1: {pretrained.steps} steps, held-out CE per layer "
          + " ".join(f"{v:.3f}" for v in pretrained.eval_layer_ce or ()), flush=True)
    common.pop("preset")
    result = train(TrainSettings(objective="calm", init=str(work / "stage1-pretrained"),
                                 split="finetune", steps=args.finetune_steps,
                                 learning_rate=args.finetune_lr, **common),
                   None, work / "model-fp32", data_dir=data_dir, eval_split=HELD_OUT["squad"],
                   checkpoint_every=250, threads=args.threads)

    from transformers import T5ForConditionalGeneration

    from suite.backbones import copy_tokenizer
    from suite.training import _write_folder

    metadata = dict(result.metadata)
    metadata["label"] = (
        "tiny T5 (6+6 layers, d_model 128) trained by exitbench: pre-trained on copying and "
        "cloze questions cut from the bundled samples' English text, then fine-tuned with "
        "the CALM objective on cloze and the SQuAD sample's 764 training questions "
        f"({args.pretrain_steps} + {args.finetune_steps} steps); weights in float16; not a "
        "published checkpoint")
    metadata["recipe"] = {"command": "make default-backbone", "script":
                          "scripts/train_default_backbone.py", "arguments": vars(args) | {
                              "out": "backbones/tiny-t5-squad", "work": "runs/default-backbone"},
                          "passages": counts, "examples": counts_by_stage,
                          "stage1": {"steps": pretrained.steps, "objective": "vanilla",
                                     "held_out_layer_ce": pretrained.eval_layer_ce,
                                     "seconds": pretrained.metadata.get("train_seconds")},
                          "stored_dtype": "float16"}

    def fill(folder: Path) -> None:
        model = T5ForConditionalGeneration.from_pretrained(work / "model-fp32").half()
        model.save_pretrained(folder)
        copy_tokenizer(work / "model-fp32", folder)
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
