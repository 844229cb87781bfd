"""T5-family backbones (t5, t5-v1_1, flan-t5, mt5): the exit head as the checkpoint computes
its last layer (:func:`t5_exit_logits`, the one definition shared by training, traced and
online decoding) and :class:`T5Adapter`, the :class:`suite.models.DecoderAdapter` that
decodes a T5 layer by layer. It calls the checkpoint's own ``T5Block`` modules with the
masks built by the same ``transformers`` functions ``T5Stack.forward`` uses, so exiting at
the last layer reproduces the checkpoint's logits and greedy output. The decoder-only
family is :mod:`suite.backbones.decoder_only`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from suite.errors import ExitbenchError
from suite.measures import ModelDims
from suite.models import (
    SUPPORTED_MODEL_TYPES,
    DecodeState,
    resolve_device,
    resolve_dtype,
    resolve_model_folder,
    rollback_plan,
)


# -- the exit head (shared with training) ---------------------------------------------------
def scales_decoder_outputs(config) -> bool:
    """Whether the checkpoint multiplies the normed decoder output by ``d_model ** -0.5``
    before the LM head (T5 with tied embeddings does; t5-v1_1 / flan-t5 do not).

    transformers 5.x stores the switch as ``config.scale_decoder_outputs`` for T5 (it
    forces ``tie_word_embeddings=True`` and keeps the serialised value only as this flag);
    its mT5 never scales; older versions read ``tie_word_embeddings`` directly."""
    if hasattr(config, "scale_decoder_outputs"):
        return bool(config.scale_decoder_outputs)
    if getattr(config, "model_type", None) == "mt5":
        return False
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


# -- T5 ---------------------------------------------------------------------------------------
@dataclass
class T5DecodeState(DecodeState):
    """T5's decode state: encoder output, masks and the relative position biases of the
    current step (computed by block 0 and shared by the later blocks, as ``T5Stack`` does)."""

    encoder_hidden: torch.Tensor = None  # type: ignore[assignment]
    encoder_attention_mask: torch.Tensor = None  # type: ignore[assignment]
    self_mask: Any = None
    cross_mask: Any = None
    position_bias: torch.Tensor | None = None
    cross_position_bias: torch.Tensor | None = None
    decoder_mask: torch.Tensor | None = None
    """``[B, S]`` 1 for the self-attention cache slots that hold a position, 0 for slots a
    :meth:`T5Adapter.rollback` freed at the front of a row; ``None`` when every slot holds
    one (always at batch 1)."""
    _cross_masks: dict[int, Any] = field(default_factory=dict)


class T5Adapter:
    """A T5-family ``*ForConditionalGeneration`` model decoded layer by layer.

    Dtype and device live here: the model is moved once on construction (float32 by
    default; ``bfloat16`` halves memory and is what GPUs run). Call the decoding methods
    under ``torch.inference_mode()``; the adapter does not switch grad mode itself."""

    def __init__(self, model, *, model_id: str = "", device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32"):
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ExitbenchError(
                f"model {model_id or type(model).__name__}: model_type {model_type!r} is not "
                f"supported by the T5 adapter (supported: {', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"umT5 has a relative bias in every layer and decoder-only models need their "
                f"own adapter")
        blocks = list(model.decoder.block)
        if any(block.layer[0].SelfAttention.has_relative_attention_bias for block in blocks[1:]):
            raise ExitbenchError(f"model {model_id}: decoder layers after the first have their "
                                 f"own relative attention bias; the T5 adapter shares block "
                                 f"0's bias as T5 does, so it cannot run this model")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        # ``_keep_in_fp32_modules`` (the FFN's ``wo``) is honoured by from_pretrained; a
        # plain .to(dtype) would cast it too, so only cast when the dtype differs.
        if next(model.parameters()).dtype != self.dtype:
            model = model.to(dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.model_id = model_id or getattr(config, "name_or_path", "") or "t5"
        self.blocks = blocks
        self.decoder_config = model.decoder.config
        self.num_layers = len(blocks)
        self.dims = ModelDims(num_layers=self.num_layers, d_model=config.d_model,
                              d_ff=config.d_ff, num_heads=config.num_heads, d_kv=config.d_kv,
                              vocab_size=config.vocab_size)
        self.pad_token_id = int(config.pad_token_id if config.pad_token_id is not None else 0)
        eos = config.eos_token_id
        self.eos_token_id = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        # T5 starts decoding from the pad token; configs written by transformers 5 may lack
        # the attribute, generation_config usually has it.
        start = getattr(model.generation_config, "decoder_start_token_id", None)
        if start is None:
            start = getattr(config, "decoder_start_token_id", None)
        self.decoder_start_token_id = int(start if start is not None else self.pad_token_id)
        self.scales_outputs = scales_decoder_outputs(config)

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, *, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = "float32") -> T5Adapter:
        """Load a checkpoint from a local folder or a hub id (cached copy when offline)."""
        from transformers import AutoConfig, AutoModelForSeq2SeqLM
        from transformers.utils import logging as hf_logging

        folder = resolve_model_folder(path)
        torch_dtype = resolve_dtype(dtype)
        device = resolve_device(device)
        try:
            config = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ExitbenchError(f"model {path!r}: {folder} has no readable config.json "
                                 f"({exc}); point the config at a folder written by "
                                 f"save_pretrained") from exc
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise ExitbenchError(f"model {path!r}: model_type {config.model_type!r} is not a "
                                 f"T5-family encoder-decoder ({', '.join(SUPPORTED_MODEL_TYPES)})")
        # Our own progress bars say what is happening; HF's per-file bars only add noise.
        hf_logging.disable_progress_bar()
        model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch_dtype)
        return cls(model, model_id=path, device=device, dtype=torch_dtype)

    # -- the protocol ----------------------------------------------------------------------
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
              use_cache: bool = True) -> T5DecodeState:
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        encoder_hidden = self.model.encoder(input_ids=input_ids,
                                            attention_mask=attention_mask).last_hidden_state
        cache = None
        if use_cache:
            # The decoder's own config: its num_layers is num_decoder_layers. (HF generate
            # builds the cache from the top-level config, i.e. the encoder depth, and so
            # fails on models with more decoder than encoder layers.)
            cache = EncoderDecoderCache(DynamicCache(config=self.decoder_config),
                                        DynamicCache(config=self.decoder_config))
        first = torch.full((input_ids.shape[0], 1), self.decoder_start_token_id,
                           dtype=torch.long, device=self.device)
        return T5DecodeState(first_input_ids=first, cache=cache, encoder_hidden=encoder_hidden,
                             encoder_attention_mask=attention_mask)

    def begin_step(self, state: T5DecodeState, input_ids: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        embeds = self.model.decoder.embed_tokens(input_ids.to(self.device))
        self_cache = state.cache.self_attention_cache if state.cache is not None else None
        # Built before any layer updates the cache, exactly as T5Stack.forward does: the
        # mask's key length is the cached length plus this step's tokens. No decoder
        # padding mask: rows are right-padded, so causality already hides the padding
        # (only slots freed by a rollback are masked).
        state.self_mask = create_causal_mask(
            config=self.decoder_config, inputs_embeds=embeds,
            attention_mask=_slot_mask(state, _cached(self_cache, 0) + embeds.shape[1]),
            cache=self_cache)
        query_length = embeds.shape[1]
        if query_length not in state._cross_masks:  # the same for every step of a decode
            state._cross_masks[query_length] = create_bidirectional_mask(
                config=self.decoder_config, inputs_embeds=embeds,
                attention_mask=state.encoder_attention_mask,
                encoder_hidden_states=state.encoder_hidden)
        state.cross_mask = state._cross_masks[query_length]
        state.position_bias = None  # recomputed by block 0 for this step's positions
        state.cross_position_bias = None
        return embeds

    def run_layer(self, state: T5DecodeState, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        hidden, self_bias, cross_bias = self.blocks[layer](
            hidden, state.self_mask, state.position_bias, state.encoder_hidden,
            state.cross_mask, state.cross_position_bias, cache=state.cache)
        if state.position_bias is None:  # only block 0 has the relative attention bias
            state.position_bias = self_bias
            state.cross_position_bias = cross_bias
        return hidden

    def exit_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # One shared head for every layer, so ``layer`` is unused here; adapters of models
        # with per-layer heads would use it.
        return t5_exit_logits(self.model, hidden)

    def exit_norm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.decoder.final_layer_norm(hidden)

    def fill_layer(self, state: T5DecodeState, layer: int, hidden: torch.Tensor) -> None:
        attention_layer = self.blocks[layer].layer[0]
        attention = attention_layer.SelfAttention
        normed = attention_layer.layer_norm(hidden)
        shape = (*hidden.shape[:-1], -1, attention.key_value_proj_dim)
        keys = attention.k(normed).view(shape).transpose(1, 2)
        values = attention.v(normed).view(shape).transpose(1, 2)
        state.cache.self_attention_cache.update(keys, values, layer)

    def begin_catch_up(self, state: T5DecodeState, first_layer: int, num_queries: int) -> None:
        from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

        self_cache = state.cache.self_attention_cache
        past = self_cache.get_seq_length(first_layer)
        expected = self_cache.get_seq_length(0) - past  # layer 0 already holds this step
        if num_queries != expected:
            raise ValueError(f"layer {first_layer} lacks {expected} position(s) of this step "
                             f"and before; a catch-up of {num_queries} cannot fill them")
        shape = (state.first_input_ids.shape[0], num_queries, self.dims.d_model)
        probe = torch.empty(shape, dtype=self.dtype, device=self.device)
        state.self_mask = create_causal_mask(config=self.decoder_config, inputs_embeds=probe,
                                             attention_mask=_slot_mask(state,
                                                                       past + num_queries),
                                             cache=self_cache, layer_idx=first_layer)
        if num_queries not in state._cross_masks:
            state._cross_masks[num_queries] = create_bidirectional_mask(
                config=self.decoder_config, inputs_embeds=probe,
                attention_mask=state.encoder_attention_mask,
                encoder_hidden_states=state.encoder_hidden)
        state.cross_mask = state._cross_masks[num_queries]
        # Block 0 holds T5's only relative attention bias; the deferred queries sit at
        # positions past..past + num_queries - 1.
        state.position_bias = self.blocks[0].layer[0].SelfAttention.compute_bias(
            num_queries, past + num_queries, device=self.device, past_seen_tokens=past)
        state.cross_position_bias = None  # the first block run computes its zeros

    def rollback(self, state: T5DecodeState, num_rejected: torch.Tensor) -> None:
        layers = state.cache.self_attention_cache.layers
        plan = rollback_plan(layers, num_rejected, self.device)
        mask = _slot_mask(state, plan.length)
        if plan.is_crop:  # every row drops the same count (always at batch 1)
            if mask is not None:
                state.decoder_mask = mask[:, :plan.kept]
        else:
            if mask is None:
                mask = torch.ones(plan.source.shape[0], plan.length, dtype=torch.long,
                                  device=self.device)
            state.decoder_mask = mask.gather(1, plan.source) * plan.holds
        plan.gather(layers)
        self._drop_free_front(state)

    @staticmethod
    def _drop_free_front(state: T5DecodeState) -> None:
        """Remove the leading slots that are free in every row (holds stay a right-aligned
        run per row, so what is free is a prefix), and the mask once nothing is free."""
        if state.decoder_mask is None:
            return
        free_front = int((state.decoder_mask.shape[1] - state.decoder_mask.sum(1)).min())
        if free_front:
            for layer in state.cache.self_attention_cache.layers:
                layer.keys = layer.keys[..., free_front:, :]
                layer.values = layer.values[..., free_front:, :]
            state.decoder_mask = state.decoder_mask[:, free_front:]
        if bool(state.decoder_mask.all()):
            state.decoder_mask = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Decoder input embeddings (what layer 0 reads; T5 does not scale them)."""
        return self.model.decoder.embed_tokens(input_ids.to(self.device))


def _cached(cache, layer: int) -> int:
    return cache.get_seq_length(layer) if cache is not None else 0


def _slot_mask(state: T5DecodeState, key_length: int) -> torch.Tensor | None:
    """The 2-D padding mask ``[B, key_length]`` of the self-attention keys a step attends
    to: the holds of the slots a rollback left (:attr:`T5DecodeState.decoder_mask`), then
    ones for every slot appended since and this step's queries; ``None`` when no slot is
    free."""
    if state.decoder_mask is None:
        return None
    mask = state.decoder_mask
    return torch.cat([mask, mask.new_ones(mask.shape[0], key_length - mask.shape[1])], dim=1)


T5_SMALL_ARCHITECTURE: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 512, "d_ff": 2048, "num_layers": 6,
    "num_decoder_layers": 6, "num_heads": 8, "d_kv": 64, "feed_forward_proj": "relu",
    "tie_word_embeddings": True, "decoder_start_token_id": 0}
"""google-t5/t5-small's architecture (its config.json), for tests and benchmarks offline."""


def random_t5(seed: int = 0, residual_gain: float = 4.0, **config_overrides: Any):
    """A randomly initialised ``T5ForConditionalGeneration`` (t5-small's architecture unless
    overridden), in eval mode. Labelled by what it is: random weights, for tests and
    benchmarks only.

    ``residual_gain`` multiplies every attention output projection (``o``) and FFN output
    (``wo``): with HF's default init the input embedding (std 1) dominates the residual
    stream and every layer of a random t5-small predicts its own input token, so greedy
    decoding emits the start token forever and exactness tests would compare constants."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(**{**T5_SMALL_ARCHITECTURE, **config_overrides}))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith((".o.weight", ".wo.weight")):
                parameter.mul_(residual_gain)
    return model.eval()
