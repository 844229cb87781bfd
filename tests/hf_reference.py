"""Hugging Face's own forward pass, the reference the suite's layer-by-layer decoders are
checked against."""

from __future__ import annotations

import torch


def hf_forward(model, ids, mask, decoder_inputs):
    """HF's outputs (logits, hidden states) for a teacher-forced pass, plus the last block's
    un-normed output (HF's ``decoder_hidden_states[-1]`` is already normed, so a hook reads
    the raw one)."""
    captured = {}

    def keep_output(module, args, output) -> None:  # returning a value would replace it
        captured["last"] = output[0]

    hook = model.decoder.block[-1].register_forward_hook(keep_output)
    try:
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs,
                        output_hidden_states=True, use_cache=False)
    finally:
        hook.remove()
    return out, captured["last"]
