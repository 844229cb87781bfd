"""Decoder-only backbones: Hugging Face causal LMs with Llama-style blocks, decoded one
layer at a time behind :class:`suite.models.DecoderAdapter`.

Families that fit (:data:`DECODER_ONLY_MODEL_TYPES`): Llama (Llama 2, Llama 3, Llama 3.2,
CodeLlama and LayerSkip's ``facebook/layerskip-*`` checkpoints), Mistral (its sliding
window honoured), Qwen2 (q/k/v biases, per-layer ``layer_types``) and Qwen3 (q/k norms).
They share one block layout: ``model.embed_tokens``, ``model.layers[i]`` with
``input_layernorm`` and ``self_attn.{q,k,v,o}_proj``, ``model.norm``, ``model.rotary_emb``
and ``lm_head`` (tied to the embeddings where the config says so). Any other
``model_type`` is refused with the reason (e.g. Gemma scales its embeddings and caps its
logits in ways the layer loop would also have to copy; GPT-2 has learned positions).

How the protocol maps onto a causal LM:

- ``start`` takes the suite's right-padded prompts, re-aligns them to the left (as
  ``generate`` wants decoder-only batches), prefills every prompt token but the last
  through the model's own forward pass into its own ``DynamicCache``, and returns the
  last prompt token as ``first_input_ids``: step 0 predicts the first new token through
  the layer loop, so it is traced like every later step.
- ``begin_step`` builds the step's masks with the same ``transformers`` mask functions
  the model's forward uses (full causal, or sliding window, per layer type), over the
  2-D padding mask that grows by one column per step, and the rotary embeddings at
  positions ``cumsum(mask) - 1`` (``generate``'s position ids).
- ``run_layer`` calls the checkpoint's own decoder layer module.
- ``exit_logits`` is the model's final norm then its LM head, then any logit scaling or
  soft-capping the config declares (:func:`causal_exit_logits`).
- ``fill_layer`` (CALM's propagation) appends to a skipped layer's cache the K/V its
  attention would compute from the exited state: input norm, K/V projections, the
  attention's own key norm where it has one (Qwen3), rotary embedding of the token's
  position.
- ``begin_catch_up`` (FREE; self-speculation's verification) sets masks and rotary
  embeddings for a multi-position pass through the deep layers, whose caches lack the last
  ``num_queries`` positions.
- ``rollback`` (self-speculation) drops rejected draft positions per row, keeping rows
  right-aligned and masking the freed slots like left padding.

Hidden states passed in and out are the un-normed residual stream; HF's
``hidden_states[-1]`` is the final-normed one, the others are the layers' raw outputs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from suite.errors import ExitbenchError
from suite.measures import ModelDims
from suite.models import (
    DecodeState,
    resolve_device,
    resolve_dtype,
    resolve_model_folder,
    rollback_plan,
)

DECODER_ONLY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""``config.model_type`` values whose blocks fit the layer loop. Tested on random-weight
models of each architecture (``tests/test_decoder_only.py``)."""

_REFUSED = {
    "gemma": "Gemma multiplies the embeddings by sqrt(hidden_size) and its RMSNorm adds 1",
    "gemma2": "Gemma 2 scales embeddings, has post-attention norms and soft-caps logits",
    "gemma3": "Gemma 3 scales embeddings, has post-attention norms and local/global RoPE",
    "gpt2": "GPT-2 has learned absolute positions and fused QKV projections",
    "phi": "Phi runs attention and MLP in parallel with partial rotary embeddings",
    "phi3": "Phi-3 fuses the QKV and gate/up projections",
    "falcon": "Falcon runs attention and MLP in parallel",
    "gpt_neox": "GPT-NeoX has parallel residuals and fused QKV",
    "olmo2": "OLMo 2 norms after attention and MLP, not before",
    "cohere": "Cohere runs attention and MLP in parallel",
}


def check_decoder_only_config(config, where: str = "") -> None:
    """Raise naming the architecture when ``config`` is not one the adapter decodes."""
    model_type = getattr(config, "model_type", None)
    where = where or "the checkpoint"
    if getattr(config, "is_encoder_decoder", False):
        raise ExitbenchError(f"{where}: model_type {model_type!r} is an encoder-decoder; the "
                             f"decoder-only adapter takes causal LMs "
                             f"({', '.join(DECODER_ONLY_MODEL_TYPES)})")
    if model_type not in DECODER_ONLY_MODEL_TYPES:
        reason = _REFUSED.get(model_type, "its blocks are not known to fit the Llama layout")
        raise ExitbenchError(f"{where}: model_type {model_type!r} is not supported by the "
                             f"decoder-only adapter ({reason}); supported: "
                             f"{', '.join(DECODER_ONLY_MODEL_TYPES)}")


def logit_transform(config):
    """The transformation a config declares between the LM head and the logits, or ``None``:
    Cohere-style ``logit_scale`` (multiplied), Granite-style ``logits_scaling`` (divided),
    Gemma-2-style ``final_logit_softcapping`` (``cap * tanh(logits / cap)``)."""
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if scale is None and divide is None and cap is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def causal_exit_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of a decoder layer's un-normed hidden state, computed as a causal LM computes
    its last layer: final norm, LM head (tied or not, as loaded), then the config's logit
    scaling or soft-capping. Shared with training."""
    logits = model.lm_head(model.model.norm(hidden))
    transform = logit_transform(model.config)
    return transform(logits) if transform is not None else logits


def layer_mask_types(config) -> list[str]:
    """The attention kind of each layer, as the model's forward chooses its mask: the
    config's ``layer_types`` (Qwen2, Qwen3), else a sliding window for every layer when the
    config has one (Mistral), else full causal attention (Llama)."""
    layers = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)[:layers]
    if getattr(config, "sliding_window", None) is not None and getattr(
            config, "model_type", "") == "mistral":
        return ["sliding_attention"] * layers
    return ["full_attention"] * layers


@dataclass
class CausalDecodeState(DecodeState):
    """A causal LM's decode state: the 2-D padding mask over every cached position and the
    current step's, each row's next position id, and the step's masks and rotary
    embeddings (shared by every layer, as the model's forward shares them)."""

    attention_mask: torch.Tensor = None  # type: ignore[assignment]
    """``[B, positions]`` 1 for real tokens, 0 for left padding; covers the cache and, after
    ``begin_step``, the step's own positions."""
    next_position: torch.Tensor = None  # type: ignore[assignment]
    """``[B]`` the position id the next input token gets."""
    position_ids: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    masks: dict[str, Any] = field(default_factory=dict)


class DecoderOnlyAdapter:
    """A Llama-style ``*ForCausalLM`` decoded layer by layer (see the module docstring).
    Call the decoding methods under ``torch.inference_mode()``."""

    is_decoder_only = True

    def __init__(self, model, *, model_id: str = "", device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32"):
        config = model.config
        check_decoder_only_config(config, f"model {model_id or type(model).__name__}")
        missing = [name for name in ("model.embed_tokens", "model.layers", "model.norm",
                                     "model.rotary_emb", "lm_head") if not _has(model, name)]
        if missing:
            raise ExitbenchError(f"model {model_id}: {type(model).__name__} lacks "
                                 f"{', '.join(missing)}; load it as a *ForCausalLM")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if next(model.parameters()).dtype != self.dtype:
            model = model.to(dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.config = config
        self.model_id = model_id or getattr(config, "name_or_path", "") or config.model_type
        self.layers = list(model.model.layers)
        self.num_layers = len(self.layers)
        self.mask_types = layer_mask_types(config)
        head_dim = int(getattr(config, "head_dim", None)
                       or config.hidden_size // config.num_attention_heads)
        self.dims = ModelDims(num_layers=self.num_layers, d_model=int(config.hidden_size),
                              d_ff=int(config.intermediate_size),
                              num_heads=int(config.num_attention_heads), d_kv=head_dim,
                              vocab_size=int(config.vocab_size))
        self.stop_token_ids = eos_token_ids(model)
        if not self.stop_token_ids:
            raise ExitbenchError(f"model {self.model_id}: neither its config nor its "
                                 f"generation config names an EOS token")
        self.eos_token_id = self.stop_token_ids[0]
        pad = getattr(model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = config.pad_token_id
        # generate feeds finished rows the pad token, EOS when the model has none
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)
        self._rotary_fn = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str, *, device: str | torch.device = "cpu",
             dtype: str | torch.dtype = "float32") -> DecoderOnlyAdapter:
        """Load a causal LM from a local folder or a hub id (cached copy when offline)."""
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        folder = resolve_model_folder(path)
        torch_dtype = resolve_dtype(dtype)
        config = AutoConfig.from_pretrained(folder)
        check_decoder_only_config(config, f"model {path!r}")
        hf_logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        return cls(model, model_id=path, device=device, dtype=torch_dtype)

    # -- the protocol ----------------------------------------------------------------------
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
              use_cache: bool = True) -> CausalDecodeState:
        """Prefill right-padded prompts ``[B, S]`` but their last token. The prompt always
        sits in the cache (``use_cache=False`` only says the caller makes one parallel pass
        over its decoder inputs after it)."""
        from transformers.cache_utils import DynamicCache

        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        left_ids, left_mask = left_align(input_ids, attention_mask, self.pad_token_id)
        cache = DynamicCache(config=self.config)
        prefix_mask = left_mask[:, :-1]
        if prefix_mask.shape[1] > 0:
            self.model.model(input_ids=left_ids[:, :-1], attention_mask=prefix_mask,
                             position_ids=generation_positions(prefix_mask), cache=cache,
                             use_cache=True)
        return CausalDecodeState(first_input_ids=left_ids[:, -1:], cache=cache,
                                 attention_mask=prefix_mask,
                                 next_position=left_mask.sum(1) - 1)

    def begin_step(self, state: CausalDecodeState, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.model.model.embed_tokens(input_ids.to(self.device))
        queries = embeds.shape[1]
        state.attention_mask = torch.cat(
            [state.attention_mask, state.attention_mask.new_ones(embeds.shape[0], queries)], 1)
        positions = state.next_position[:, None] + torch.arange(queries, device=self.device)
        # built before any layer updates the cache, as the model's forward builds them
        self._set_step(state, embeds, positions, layer_idx=None)
        state.next_position = state.next_position + queries
        return embeds

    def run_layer(self, state: CausalDecodeState, layer: int, hidden: torch.Tensor
                  ) -> torch.Tensor:
        output = self.layers[layer](hidden, attention_mask=state.masks[self.mask_types[layer]],
                                    position_embeddings=state.position_embeddings,
                                    position_ids=state.position_ids, cache=state.cache,
                                    use_cache=True)
        return output[0] if isinstance(output, tuple) else output

    def exit_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        # one shared head after every layer (LayerSkip's checkpoints too)
        return causal_exit_logits(self.model, hidden)

    def exit_norm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The normed state the exit head reads (the final norm, before the LM head): what
        trace format 3's normed cosines compare (issue 13's protocol addition)."""
        return self.model.model.norm(hidden)

    def fill_layer(self, state: CausalDecodeState, layer: int, hidden: torch.Tensor) -> None:
        block = self.layers[layer]
        attention = block.self_attn
        normed = block.input_layernorm(hidden)
        shape = (*hidden.shape[:-1], -1, attention.head_dim)
        keys = attention.k_proj(normed).view(shape)
        if hasattr(attention, "k_norm"):  # Qwen3 norms each key head before the rotation
            keys = attention.k_norm(keys)
        keys = keys.transpose(1, 2)
        values = attention.v_proj(normed).view(shape).transpose(1, 2)
        cos, sin = state.position_embeddings
        keys, _ = self._rotary_fn(keys, keys, cos[:, -hidden.shape[1]:], sin[:, -hidden.shape[1]:])
        state.cache.update(keys, values, layer)

    def begin_catch_up(self, state: CausalDecodeState, first_layer: int,
                       num_queries: int) -> None:
        past = state.cache.get_seq_length(first_layer)
        expected = state.cache.get_seq_length(0) - past
        if num_queries != expected:
            raise ValueError(f"layer {first_layer} lacks {expected} position(s) of this step "
                             f"and before; a catch-up of {num_queries} cannot fill them")
        batch = state.first_input_ids.shape[0]
        probe = torch.empty((batch, num_queries, self.dims.d_model), dtype=self.dtype,
                            device=self.device)
        positions = state.next_position[:, None] - num_queries + torch.arange(
            num_queries, device=self.device)
        self._set_step(state, probe, positions, layer_idx=first_layer)

    def rollback(self, state: CausalDecodeState, num_rejected: torch.Tensor) -> None:
        """Drop the last ``num_rejected[b]`` positions of row ``b`` from every layer's cache
        (self-speculation's rejected drafts). Rows that drop different counts stay
        right-aligned: the slots freed at the front of a row are masked in the 2-D padding
        mask, as its left padding is, and each row's next position id moves back by its
        own count, so rotary positions stay those of the kept tokens."""
        layers = state.cache.layers
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise ExitbenchError(f"model {self.model_id}: its sliding-window cache has "
                                 f"already dropped old positions; a rollback cannot restore "
                                 f"them (self-speculation needs full-attention layers)")
        plan = rollback_plan(layers, num_rejected, self.device)
        state.attention_mask = (state.attention_mask[:, :plan.kept] if plan.is_crop else
                                state.attention_mask.gather(1, plan.source) * plan.holds)
        plan.gather(layers)
        state.next_position = state.next_position - plan.rejected
        # slots free in every row are attended by none: drop them
        free_front = int((state.attention_mask.cumsum(1) == 0).all(0).sum())
        if free_front:
            state.attention_mask = state.attention_mask[:, free_front:]
            for layer in layers:
                layer.keys = layer.keys[..., free_front:, :]
                layer.values = layer.values[..., free_front:, :]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (what layer 0 reads)."""
        return self.model.model.embed_tokens(input_ids.to(self.device))

    # -- helpers ---------------------------------------------------------------------------
    def _set_step(self, state: CausalDecodeState, embeds: torch.Tensor,
                  positions: torch.Tensor, layer_idx: int | None) -> None:
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        builders = {"full_attention": create_causal_mask,
                    "sliding_attention": create_sliding_window_causal_mask}
        state.masks = {kind: builders[kind](config=self.config, inputs_embeds=embeds,
                                            attention_mask=state.attention_mask,
                                            cache=state.cache, position_ids=positions,
                                            layer_idx=layer_idx)
                       for kind in set(self.mask_types)}
        state.position_ids = positions
        state.position_embeddings = self.model.model.rotary_emb(embeds, positions)


def _has(model, dotted: str) -> bool:
    value = model
    for part in dotted.split("."):
        if not hasattr(value, part):
            return False
        value = getattr(value, part)
    return True


def eos_token_ids(model) -> tuple[int, ...]:
    """Every EOS id the checkpoint names (Llama 3 has several): the generation config's, then
    the config's, in order, without repeats."""
    return _eos_ids(model.generation_config, model.config)


def _eos_ids(*sources) -> tuple[int, ...]:
    ids: list[int] = []
    for source in sources:
        value = getattr(source, "eos_token_id", None)
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if item is not None and int(item) not in ids:
                ids.append(int(item))
    return tuple(ids)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows ``[B, S]`` moved to the right edge (left padding), as batched
    decoder-only generation lays them out."""
    width = input_ids.shape[1]
    lengths = attention_mask.long().sum(1)
    source = torch.arange(width, device=input_ids.device)[None, :] - (width - lengths)[:, None]
    valid = source >= 0
    ids = torch.where(valid, input_ids.gather(1, source.clamp(min=0)), pad_id)
    return ids, valid.long()


def generation_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``generate``'s position ids of a left-padded batch: ``cumsum(mask) - 1``, padding 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def decoder_only_info(config, model_path: str = ""):
    """What replay and the cost model need to know of a causal LM (:class:`suite.sweep.ModelInfo`):
    its sizes, a gated (SwiGLU) FFN, the prompt prefill through its own layers, its EOS ids."""
    from suite.sweep import ModelInfo

    check_decoder_only_config(config, f"model {model_path!r}" if model_path else "")
    layers = int(config.num_hidden_layers)
    head_dim = int(getattr(config, "head_dim", None)
                   or config.hidden_size // config.num_attention_heads)
    dims = ModelDims(num_layers=layers, d_model=int(config.hidden_size),
                     d_ff=int(config.intermediate_size),
                     num_heads=int(config.num_attention_heads), d_kv=head_dim,
                     vocab_size=int(config.vocab_size))
    generation = None
    if model_path:
        from transformers import GenerationConfig

        from suite.models import resolve_model_folder

        folder = resolve_model_folder(model_path)
        if (folder / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(folder)
    eos_ids = _eos_ids(generation, config)
    if not eos_ids:
        raise ExitbenchError(f"model {model_path!r}: its config names no eos_token_id")
    return ModelInfo(dims=dims, gated_ffn=True, num_encoder_layers=layers,
                     eos_token_id=eos_ids[0], decoder_only=True, eos_token_ids=eos_ids)


# -- random-weight models for tests and benchmarks ----------------------------------------------
TINY_LLAMA_ARCHITECTURE: dict[str, Any] = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "pad_token_id": 0}
"""A small Llama-style shape (grouped-query attention: 4 query heads, 2 K/V heads)."""

LLAMA_3_2_1B_ARCHITECTURE: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "bos_token_id": 128000,
    "eos_token_id": 128001,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
"""meta-llama/Llama-3.2-1B's architecture (its config.json; facebook/layerskip-llama3.2-1B
shares it), for benchmarks offline."""

CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config"}


def random_causal_lm(model_type: str = "llama", seed: int = 0, **config_overrides: Any):
    """A randomly initialised ``*ForCausalLM`` of a supported architecture (the tiny shape
    unless overridden), in eval mode. Random weights: for tests and benchmarks only."""
    import transformers
    from transformers import AutoModelForCausalLM

    if model_type not in CONFIG_CLASSES:
        raise ExitbenchError(f"model_type {model_type!r}: random models exist for "
                             f"{', '.join(CONFIG_CLASSES)}")
    config_class = getattr(transformers, CONFIG_CLASSES[model_type])
    config = config_class(**{**TINY_LLAMA_ARCHITECTURE, **config_overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()
