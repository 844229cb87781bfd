"""Decoder-only training (suite/backbones/causal_training.py): LayerSkip's layer dropout,
curriculum and loss scales as torchtune implements them, the objectives against hand
computations, and training from scratch and from a checkpoint through the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from suite.backbones.causal_training import (
    CausalLMFamily,
    curriculum_layers,
    layer_dropout_rates,
    linear_loss_scales,
)
from suite.backbones.decoder_only import DecoderOnlyAdapter, random_causal_lm
from suite.training import MODEL_METADATA_FILE, EncodedData, Objective

FAMILY = CausalLMFamily()


def test_layer_dropout_rises_exponentially_from_zero_to_the_maximum():
    rates = layer_dropout_rates(4, 0.2)
    expected = [0.2 * (math.exp(i * math.log(2) / 3) - 1) for i in range(4)]
    assert rates.tolist() == pytest.approx(expected)
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.2) and np.all(np.diff(rates) > 0)


def test_gradual_curriculum_enables_exits_from_the_last_layer_down():
    # layer i (0-based) of 4 joins once (t - 2) / 10 >= 0.5 (4 - i) / 4
    first_step = {i: next(t for t in range(1, 30) if curriculum_layers(t, 10, 4)[i])
                  for i in range(4)}
    assert first_step == {3: 1, 2: 5, 1: 6, 0: 7}
    assert curriculum_layers(1, 10, 4).tolist() == [False, False, False, True]
    assert curriculum_layers(1, 10, 4, "none").all()


def test_linear_loss_scales_grow_with_depth_and_sum_to_one():
    scales = linear_loss_scales(np.array([1, 3]), 4, e_scale=0.5)
    assert scales.tolist() == pytest.approx([1.0 / 5, 4.0 / 5])  # (2 * 0.5, 4 * 1) / 5


@pytest.fixture(scope="module")
def model_and_batch():
    model = random_causal_lm("llama", seed=3, initializer_range=0.1, vocab_size=64,
                             num_hidden_layers=4)
    data = EncodedData(sources=((5, 6, 7, 8), (9, 10)), targets=((11, 12, 2), (13, 2)),
                       example_ids=("a", "b"))
    return model, FAMILY.collate(data, [0, 1])


def _hand_states(model, batch, skip: dict[int, torch.Tensor]):
    """Every layer's output by hand: the model's own layers one after another, a skipped
    sequence's state passed through unchanged."""
    from transformers.masking_utils import create_causal_mask

    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden = model.model.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    causal = create_causal_mask(config=model.config, inputs_embeds=hidden,
                                attention_mask=mask, cache=None, position_ids=positions)
    rotary = model.model.rotary_emb(hidden, positions)
    states = []
    for index, layer in enumerate(model.model.layers):
        output = layer(hidden, attention_mask=causal, position_embeddings=rotary,
                       position_ids=positions)
        if index in skip:
            output = torch.where(skip[index][:, None, None], hidden, output)
        hidden = output
        states.append(hidden)
    return states


def _hand_ce(model, state, batch):
    labels = batch["labels"][:, 1:]
    logits = model.lm_head(model.model.norm(state))[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


def test_layerskip_loss_equals_a_hand_computation(model_and_batch):
    model, batch = model_and_batch
    model.train()  # layer dropout acts in training only (attention dropout is 0)
    step, total, seed, p_max, e_scale = 6, 10, 1, 0.6, 0.5  # seed 1: rows differ
    objective = Objective("layerskip", layer_dropout=p_max, early_exit_scale=e_scale,
                          curriculum="gradual").at_step(step, total, seed)
    with torch.no_grad():
        ours = FAMILY.loss(model, batch, objective)
        # the same draws, by hand: one Bernoulli per sequence for each layer with p_l > 0
        generator = torch.Generator().manual_seed(10_007 * seed + step)
        rates = [p_max * (2 ** (i / 3) - 1) for i in range(4)]
        skip = {i: torch.bernoulli(torch.full((2,), r), generator=generator).bool()
                for i, r in enumerate(rates) if r > 0}
        states = _hand_states(model, batch, skip)
        enabled = [i for i in range(4) if i == 3 or (step - 2) / total >= 0.5 * (4 - i) / 4]
        assert enabled == [1, 2, 3]
        raw = [(i + 1) * (e_scale if i < 3 else 1.0) for i in enabled]
        expected = sum(r / sum(raw) * _hand_ce(model, states[i], batch)
                       for r, i in zip(raw, enabled))
    model.eval()
    assert any(bool(s.any()) and not bool(s.all()) for s in skip.values()), \
        "no layer skipped for one sequence and run for the other"
    assert float(ours.total) == pytest.approx(float(expected), rel=1e-5)
    assert ours.parts["exits_trained"] == 3


def test_vanilla_is_hf_loss_and_calm_weights_every_exit(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        vanilla = FAMILY.loss(model, batch, Objective("vanilla"))
        hf = model(**batch).loss
        calm = FAMILY.loss(model, batch, Objective("calm"))
        states = _hand_states(model, batch, {})
        hand = sum((i + 1) / 10 * _hand_ce(model, states[i], batch) for i in range(4))
    assert float(vanilla.total) == pytest.approx(float(hf), rel=1e-5)
    assert float(calm.total) == pytest.approx(float(hand), rel=1e-5)
    with pytest.raises(Exception, match="not implemented for decoder-only"):
        FAMILY.loss(model, batch, Objective("free"))


@pytest.mark.slow
def test_train_from_scratch_and_fine_tune_a_decoder_only_model_through_the_cli(
        random_backbone, tmp_path, samples_dir):
    from suite.cli import main
    from suite.models import load_adapter, weights_sha256

    tokenizer = random_backbone.parent / "tokenizer"
    common = ["train", "--task", "squad", "--split", "validation[:24]", "--data-dir",
              str(samples_dir), "--max-source-tokens", "64", "--batch-size", "4",
              "--no-progress"]
    fresh = tmp_path / "fresh"
    assert main([*common, "--tokenizer", str(tokenizer), "--preset", "llama-micro",
                 "--objective", "layerskip", "--steps", "3", "--out", str(fresh)]) == 0
    meta = json.loads((fresh / MODEL_METADATA_FILE).read_text())
    assert "Llama-style decoder-only model (layerskip objective)" in meta["label"]
    assert meta["layerskip"]["layer_dropout"] == 0.2
    assert meta["layerskip"]["curriculum"] == "gradual"
    assert meta["architecture"]["family"] == "llama"
    adapter = load_adapter(str(fresh))
    assert isinstance(adapter, DecoderOnlyAdapter) and adapter.num_layers == 3

    tuned = tmp_path / "tuned"
    assert main([*common, "--init", str(fresh), "--objective", "calm", "--steps", "2",
                 "--out", str(tuned)]) == 0
    meta = json.loads((tuned / MODEL_METADATA_FILE).read_text())
    assert meta["init"]["weights_sha256"] == weights_sha256(fresh)
    assert meta["architecture"]["model_type"] == "llama"
    assert weights_sha256(tuned) != weights_sha256(fresh)
    # LayerSkip's objective is for decoder-only models
    assert main([*common, "--tokenizer", str(tokenizer), "--preset", "micro", "--objective",
                 "layerskip", "--steps", "1", "--out", str(tmp_path / "t5")]) == 2
