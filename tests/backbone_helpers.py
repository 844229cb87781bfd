"""Test helpers for backbones: losses written out by hand (independent of
``suite.training``) and a Hugging Face hub cache filled without a network."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F


def hand_exit_logits(model, hidden: torch.Tensor, normed: bool) -> torch.Tensor:
    """A T5 exit head by hand: final RMS norm, ``d_model ** -0.5`` when the embeddings are
    tied, then the LM head."""
    if not normed:
        norm = model.decoder.final_layer_norm
        variance = hidden.float().pow(2).mean(-1, keepdim=True)
        hidden = norm.weight * (hidden * torch.rsqrt(variance + norm.variance_epsilon))
    if getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings):
        hidden = hidden * model.config.d_model ** -0.5
    return model.lm_head(hidden)


def hand_layer_ce(model, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Cross-entropy of every decoder layer's exit (layer 1 first), each a mean over the
    target tokens, from one Hugging Face forward pass."""
    out = model(**batch, output_hidden_states=True)
    states = out.decoder_hidden_states
    num_layers = len(states) - 1
    losses = []
    for i in range(1, num_layers + 1):
        logits = hand_exit_logits(model, states[i], normed=(i == num_layers))
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                      batch["labels"].reshape(-1), ignore_index=-100))
    return losses


def hand_calm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """CALM's ``sum_i (i / sum_j j) CE_i``."""
    losses = hand_layer_ce(model, batch)
    weight_sum = sum(range(1, len(losses) + 1))
    return sum((i + 1) / weight_sum * ce for i, ce in enumerate(losses))


def save_in_hub_cache(folder: Path, repo_id: str, cache: Path, commit: str = "0" * 40) -> Path:
    """Lay ``folder``'s files out as the hub cache keeps a downloaded snapshot of
    ``repo_id`` (``models--org--name/{refs/main, snapshots/<commit>/}``), so that
    ``HF_HUB_CACHE=cache HF_HUB_OFFLINE=1`` resolves the id to them."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in Path(folder).iterdir():
        if path.is_file():
            shutil.copyfile(path, snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot
