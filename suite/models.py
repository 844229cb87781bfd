"""Model adapters: the suite's view of a backbone.

The helpers here are the single place where an exit head is defined, so that
training objectives, traced decoding and online decoding compute a layer's
prediction the same way the checkpoint computes its last layer.
"""

from __future__ import annotations

import torch


def scales_decoder_outputs(config) -> bool:
    """Whether the checkpoint multiplies the normed decoder output by ``d_model ** -0.5``
    before the LM head (T5 with tied embeddings does; t5-v1_1 / flan-t5 do not)."""
    if hasattr(config, "scale_decoder_outputs"):
        return bool(config.scale_decoder_outputs)
    return bool(getattr(config, "tie_word_embeddings", True))


def t5_exit_logits(model, hidden: torch.Tensor, *, already_normed: bool = False) -> torch.Tensor:
    """Logits of a T5 decoder layer's hidden state, computed as the checkpoint computes its
    last layer: final norm, then the tied-embedding scaling where the config ties
    embeddings, then the shared LM head. ``already_normed`` is for the last entry of HF's
    ``decoder_hidden_states``, which HF has already passed through the final norm."""
    normed = hidden if already_normed else model.decoder.final_layer_norm(hidden)
    if scales_decoder_outputs(model.config):
        normed = normed * (model.config.d_model ** -0.5)
    return model.lm_head(normed)
