"""The offline default backbone shipped in ``backbones/tiny-t5-squad`` (the quickstart's):
its folder is what its record says, and it answers questions, not one token for all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from suite.models import load_tokenizer, weights_sha256
from suite.tasks import get_task, load_examples
from suite.training import MODEL_METADATA_FILE

FOLDER = Path(__file__).resolve().parent.parent / "backbones" / "tiny-t5-squad"


def test_shipped_weights_are_the_recorded_ones():
    metadata = json.loads((FOLDER / MODEL_METADATA_FILE).read_text())
    assert weights_sha256(FOLDER) == metadata["weights_sha256"]
    assert metadata["recipe"]["command"] == "make default-backbone"
    assert [s["stage"]["name"] for s in metadata["recipe"]["stages"]] == [
        "copy", "match", "finetune"]
    assert "not a published checkpoint" in metadata["label"]
    assert "/work/" not in json.dumps(metadata)  # no path of the machine that trained it


@pytest.fixture(scope="module")
def answers(samples_dir):
    """Greedy answers to 32 held-out SQuAD questions (the quickstart's split)."""
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(FOLDER, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(FOLDER))
    examples = load_examples(get_task("squad"), "validation[:200]", samples_dir)[::6][:32]
    enc = tokenizer([e.source for e in examples], truncation=True, max_length=256,
                    padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1)
    return examples, [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]


def test_default_backbone_answers_depend_on_the_question(answers):
    examples, predicted = answers
    assert len(set(predicted)) >= len(predicted) // 2, predicted  # not one answer for all
    # most answers are words of their own context (it learned to copy, not to babble)
    copied = sum(all(w in e.source for w in p.split()) for e, p in zip(examples, predicted) if p)
    assert copied >= len(predicted) // 2, list(zip(predicted, [e.references[0] for e in examples]))


def test_rows_and_summaries_name_a_backbone_by_its_folders_label_when_the_config_has_none(tmp_path):
    from suite.config import ModelConfig
    from suite.training import model_label

    recorded = json.loads((FOLDER / MODEL_METADATA_FILE).read_text())["label"]
    assert model_label(ModelConfig(name="tiny-t5-squad", path=str(FOLDER))) == recorded
    assert model_label(ModelConfig(name="m", path=str(FOLDER), label="mine")) == "mine"
    assert model_label(ModelConfig(name="m", path=str(tmp_path / "absent"))) == "m"
