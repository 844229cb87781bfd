"""Fine-tuning a pretrained checkpoint (``--init``): strict loading, the first step's loss
and the fine-tuned model's losses against hand computations, provenance, gradient
accumulation, checkpointing and mixed precision, and a hub id resolved from a local cache
with the hub offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from backbone_helpers import hand_calm_loss, hand_layer_ce, save_in_hub_cache
from transformers import T5ForConditionalGeneration

from suite.backbones import T5Family
from suite.backbones.t5 import random_t5
from suite.cli import main
from suite.errors import ExitbenchError
from suite.models import weights_sha256
from suite.tasks import get_task, load_examples
from suite.tokenizer import copy_tokenizer_files, load_tokenizer, spiece_sha256
from suite.training import (
    MODEL_METADATA_FILE,
    BatchPlan,
    Objective,
    TrainSettings,
    collate,
    encode_examples,
    objective_loss,
    train,
)

SPLIT, EVAL_SPLIT = "validation[200:216]", "validation[216:224]"
LIMITS = {"max_source_tokens": 48, "max_target_tokens": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(random_backbone):
    return random_backbone.parent / "tokenizer"


@pytest.fixture(scope="module")
def t5_small(tmp_path_factory, tokenizer_dir):
    """A folder holding a random-weight model of t5-small's architecture (6+6 layers,
    d_model 512; the vocabulary is the test tokenizer's) and its tokenizer."""
    folder = tmp_path_factory.mktemp("t5-small-random")
    model = random_t5(seed=1, vocab_size=len(load_tokenizer(tokenizer_dir)))
    model.save_pretrained(folder)
    copy_tokenizer_files(tokenizer_dir, folder)
    return folder, model


def _settings(init, **overrides):
    base = dict(objective="calm", init=str(init), tasks=("squad",), split=SPLIT, steps=2,
                batch_size=4, learning_rate=1e-3, warmup_steps=0, dropout_rate=0.0, seed=0,
                **LIMITS)
    return TrainSettings(**{**base, **overrides})


def _encoded(tokenizer_dir, samples_dir, split):
    examples = load_examples(get_task("squad"), split, samples_dir)
    return encode_examples(load_tokenizer(tokenizer_dir), examples, **LIMITS)


def test_init_loads_every_pretrained_weight_and_refuses_a_partial_checkpoint(t5_small, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, original = t5_small
    loaded = T5Family().pretrained(folder, dropout_rate=0.0)
    want, got = original.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[name], got[name]) for name in want)  # none re-initialised
    assert loaded.config.dropout_rate == 0.0 and loaded.config.num_decoder_layers == 6

    broken = tmp_path / "broken"
    broken.mkdir()
    for path in folder.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights["decoder.block.2.layer.1.EncDecAttention.q.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExitbenchError, match="missing.*decoder.block.2.layer.1.EncDecAttention"):
        T5Family().pretrained(broken, dropout_rate=None)


def test_fine_tune_first_step_loss_provenance_and_losses_by_hand(t5_small, tmp_path, samples_dir,
                                                                 tokenizer_dir):
    folder, original = t5_small
    out = tmp_path / "tuned"
    settings = _settings(folder)
    result = train(settings, None, out, data_dir=samples_dir, eval_split=EVAL_SPLIT,
                   progress=False, log_every=1)

    # The first step's loss is the CALM objective of the pretrained weights on step 1's batch.
    data = _encoded(tokenizer_dir, samples_dir, SPLIT)
    first = collate(data, BatchPlan([len(s) for s in data.sources], 4, seed=0).batch(1))
    with torch.no_grad():
        expected = hand_calm_loss(original.eval(), first)
    assert result.loss_curve[0][1] == pytest.approx(float(expected), rel=1e-5)

    meta = json.loads((out / MODEL_METADATA_FILE).read_text())
    assert meta["init"]["source"] == str(folder)
    assert meta["init"]["weights_sha256"] == weights_sha256(folder)
    assert meta["objective"] == "calm" and meta["shallow_layer"] is None
    assert meta["preset"] is None and meta["architecture"]["d_model"] == 512
    assert "fine-tuned by exitbench with the calm objective" in meta["label"]
    assert meta["settings"]["init_weights_sha256"] == weights_sha256(folder)
    assert spiece_sha256(out) == spiece_sha256(folder)  # the checkpoint's tokenizer travels

    tuned = T5ForConditionalGeneration.from_pretrained(out).eval()
    assert not torch.equal(tuned.shared.weight, original.shared.weight)
    held = _encoded(tokenizer_dir, samples_dir, EVAL_SPLIT)
    batch = collate(held, range(len(held)))
    with torch.no_grad():
        by_hand = hand_layer_ce(tuned, batch)
        ours = objective_loss(tuned, batch, Objective("calm"))
        assert float(ours.total) == pytest.approx(float(hand_calm_loss(tuned, batch)), rel=1e-5)
    assert meta["eval"]["layer_ce"] == pytest.approx([float(v) for v in by_hand], rel=1e-5)

    again = train(settings, None, out, data_dir=samples_dir, progress=False, log_every=1)
    assert again.already_done


def test_accumulation_and_checkpointing_keep_the_update(random_backbone, tmp_path, samples_dir):
    def weights(name, **overrides):
        train(_settings(random_backbone, **overrides), None, tmp_path / name,
              data_dir=samples_dir, progress=False, gradient_checkpointing=name == "recompute")
        return T5ForConditionalGeneration.from_pretrained(tmp_path / name).state_dict()

    whole = weights("whole")
    for other in (weights("accumulated", grad_accum_steps=2), weights("recompute")):
        assert all(torch.allclose(whole[k], other[k], atol=1e-6) for k in whole)
    for precision in ("bf16", "fp16"):  # autocast (and fp16's loss scaling) run; on a GPU
        low = weights(precision, precision=precision)  # they are the fast path
        assert all(torch.isfinite(v).all() for v in low.values())
        assert any(not torch.equal(whole[k], low[k]) for k in whole)


def test_cli_rejects_preset_with_init_and_tokenizer_with_init(random_backbone, tmp_path,
                                                             samples_dir, capsys):
    common = ["train", "--init", str(random_backbone), "--task", "squad", "--data-dir",
              str(samples_dir), "--out", str(tmp_path / "x")]
    assert main([*common, "--preset", "tiny"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main([*common, "--tokenizer", str(random_backbone)]) == 2
    assert "keeps its checkpoint's tokenizer" in capsys.readouterr().err


def test_hub_id_fine_tunes_from_the_local_cache_with_the_hub_offline(random_backbone, tmp_path,
                                                                     samples_dir):
    cache = tmp_path / "hf" / "hub"
    snapshot = save_in_hub_cache(random_backbone, "exitbench-test/tiny-t5", cache)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "tuned"
    command = [sys.executable, "-m", "suite.cli", "train", "--init", "exitbench-test/tiny-t5",
               "--task", "squad", "--split", "validation[200:208]", "--steps", "1",
               "--batch-size", "4", "--max-source-tokens", "32", "--max-target-tokens", "8",
               "--data-dir", str(samples_dir), "--out", str(out), "--no-progress",
               "--threads", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    meta = json.loads((out / MODEL_METADATA_FILE).read_text())
    assert meta["init"]["source"] == "exitbench-test/tiny-t5"
    assert meta["init"]["folder"] == str(snapshot.resolve())
    assert meta["init"]["weights_sha256"] == weights_sha256(random_backbone)
    assert "exitbench-test/tiny-t5 fine-tuned" in meta["label"]

    # An id the cache does not hold: a clear error, not a network call.
    command[command.index("exitbench-test/tiny-t5")] = "exitbench-test/absent"
    missing = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "hub cache" in missing.stderr
