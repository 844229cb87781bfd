"""Training decoder-only (Llama-style) backbones: the :class:`suite.backbones.BackboneFamily`
of causal LMs, with the vanilla, CALM and LayerSkip objectives.

Data: each example is the prompt then the target (the prompt's continuation, EOS last;
:mod:`suite.prompts`); ``labels`` equal the input ids on the target and ``-100`` on the
prompt and padding, in Hugging Face's convention (position ``p`` predicts token ``p + 1``).
Every exit's cross-entropy is over the target tokens only, its logits the model's own exit
head (:func:`suite.backbones.decoder_only.causal_exit_logits`: final norm, LM head).

Objectives (``L`` decoder layers, ``CE_i`` the mean cross-entropy of layer ``i``'s exit):

- ``vanilla``: ``CE_L`` (Hugging Face's own loss with ``labels``).
- ``calm``: ``sum_i w_i CE_i``, ``w_i = i / sum_j j`` (as for T5).
- ``layerskip`` (Elhoushi et al. 2024; the recipe is not in facebookresearch/LayerSkip,
  whose README.md:166-167 points to torchtune's implementation): during training
  **layer dropout** skips layer ``l`` (0-based) for each sequence of the batch with
  probability ``p_l = p_max * (exp(l ln 2 / (L - 1)) - 1)``, rising from 0 at the first
  layer to ``p_max`` at the last (torchtune ``modules/layer_dropout.py``, ``get_scale``
  ``EXP`` and ``create_layer_dropout_modules``); the **early-exit loss** is
  ``sum_{i in E_t} s_i CE_i`` over the layers ``E_t`` the curriculum enables at step
  ``t``, with ``s_i`` proportional to ``i`` (``linear_l_loss_scale``; early layers
  multiplied by ``e_scale``) and normalised over ``E_t`` (torchtune
  ``modules/early_exit_loss.py``); the **gradual curriculum** enables layer ``i``
  (0-based) once ``(t - 2) / T >= 0.5 (L - i) / L`` (``GradualEarlyExitCurriculum.step``
  runs after each step, so step 1 and 2 use the last layer only), the last layer always
  (``train_last_layer``). LayerSkip's own settings, from torchtune's
  ``recipes/dev/7B_full_early_exit.yaml:18`` (the LayerSkip command):
  ``layer_dropout.prob=0.2 layer_dropout.scale=exp early_exit_loss.scale=1.0
  early_exit_loss.curriculum=gradual scale_type=linear_l_loss_scale``. These are the
  defaults here. Each ``CE_i`` is a token mean, as torchtune's (sum over unpadded labels
  divided by their count).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from suite.errors import ExitbenchError

IGNORE_INDEX = -100
LAYERSKIP_DEFAULTS = {"layer_dropout": 0.2, "early_exit_scale": 1.0, "curriculum": "gradual"}
"""LayerSkip's settings in torchtune's recipe (recipes/dev/7B_full_early_exit.yaml:18)."""
CURRICULA = ("gradual", "none")


def layer_dropout_rates(num_layers: int, p_max: float) -> np.ndarray:
    """``[L]`` LayerSkip's per-layer dropout probabilities, exponential in depth."""
    if num_layers == 1:
        return np.array([p_max])  # torchtune: a scale period of 0 gives scale 1
    layers = np.arange(num_layers)
    return p_max * (np.exp(layers * math.log(2) / (num_layers - 1)) - 1)


def curriculum_layers(step: int, total_steps: int, num_layers: int,
                      curriculum: str = "gradual") -> np.ndarray:
    """``[L]`` booleans: the exits whose loss counts at optimiser step ``step`` (1-based)."""
    if curriculum not in CURRICULA:
        raise ExitbenchError(f"unknown early-exit curriculum {curriculum!r}; use one of "
                             f"{', '.join(CURRICULA)}")
    enabled = np.ones(num_layers, bool)
    if curriculum == "gradual":
        fraction = max(step - 2, -1) / total_steps  # step 1: the initial all-off state
        index = np.arange(num_layers)
        enabled = (fraction >= 0.5 * (num_layers - index) / num_layers) & (step >= 2)
    enabled[-1] = True
    return enabled


def linear_loss_scales(layers: np.ndarray, num_layers: int, e_scale: float) -> np.ndarray:
    """torchtune's ``linear_l_loss_scale`` for the enabled 0-based ``layers``."""
    scales = (layers + 1.0) * np.where(layers < num_layers - 1, e_scale, 1.0)
    return scales / scales.sum()


class CausalLMFamily:
    """Llama-style causal LMs (Llama, Mistral, Qwen2, Qwen3) for the training loop."""

    name = "decoder-only"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def fresh(self, preset, vocab_size, *, seed, dropout_rate):
        """A Llama of ``preset`` (d_model, d_ff, heads, head size, layers), embeddings tied,
        pad 0 and EOS 1 as the suite's SentencePiece tokenizers have them, no BOS."""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=preset.d_model, intermediate_size=preset.d_ff,
            num_hidden_layers=preset.num_layers, num_attention_heads=preset.num_heads,
            num_key_value_heads=preset.num_heads, head_dim=preset.d_kv,
            max_position_embeddings=2048, tie_word_embeddings=True,
            attention_dropout=preset.dropout_rate if dropout_rate is None else dropout_rate,
            pad_token_id=0, eos_token_id=1, bos_token_id=None)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 1
        model.generation_config.bos_token_id = None
        return model

    def pretrained(self, folder: Path, *, dropout_rate):
        from transformers import AutoConfig, AutoModelForCausalLM

        from suite.backbones import check_loading_info
        from suite.backbones.decoder_only import check_decoder_only_config

        config = AutoConfig.from_pretrained(folder)
        check_decoder_only_config(config, f"--init {folder}")
        if dropout_rate is not None:
            config.attention_dropout = dropout_rate
        model, info = AutoModelForCausalLM.from_pretrained(folder, config=config,
                                                           output_loading_info=True)
        check_loading_info(folder, info)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = (config.pad_token_id
                                                    if config.pad_token_id is not None else 0)
        return model

    def collate(self, data, indices):
        """Prompt + target, right-padded; labels on the target only."""
        import torch

        rows = [(data.sources[i], data.targets[i]) for i in indices]
        width = max(len(s) + len(t) for s, t in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (source, target) in enumerate(rows):
            n = len(source) + len(target)
            input_ids[row, :n] = torch.tensor([*source, *target])
            labels[row, len(source):n] = torch.tensor(target)
            attention[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def num_layers(self, model):
        return int(model.config.num_hidden_layers)

    def architecture(self, model):
        config = model.config
        return {"model_type": config.model_type, "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
                "num_hidden_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "head_dim": getattr(config, "head_dim", None), "vocab_size": config.vocab_size,
                "tie_word_embeddings": config.tie_word_embeddings}

    # -- losses ------------------------------------------------------------------------------
    def layer_losses(self, model, batch):
        """``[L]`` every exit's mean cross-entropy over the target tokens, layer 1 first."""
        return exit_losses(model, batch, np.ones(self.num_layers(model), bool))[1]

    def loss(self, model, batch, objective):
        from suite.training import LossParts, calm_layer_weights

        layers = self.num_layers(model)
        name = objective.name
        if name == "vanilla":
            enabled = np.zeros(layers, bool)
            enabled[-1] = True
            _, per_layer = exit_losses(model, batch, enabled)
            total = per_layer[-1]
            return LossParts(total=total, parts={"ce_last": float(total.detach())})
        if name == "calm":
            _, per_layer = exit_losses(model, batch, np.ones(layers, bool))
            total = (calm_layer_weights(layers).to(per_layer) * per_layer).sum()
            parts = {f"ce_layer_{i + 1}": float(v) for i, v in enumerate(per_layer.detach())}
            parts["ce_last"] = parts[f"ce_layer_{layers}"]
            return LossParts(total=total, parts=parts)
        if name == "layerskip":
            return layerskip_loss(model, batch, objective)
        raise ExitbenchError(f"objective {name!r} is not implemented for decoder-only models "
                             f"(vanilla, calm, layerskip); FREE's is for T5")


def exit_losses(model, batch, enabled: np.ndarray, dropout_rates: np.ndarray | None = None,
                generator=None):
    """``(outputs, [L] losses)``: each enabled exit's mean cross-entropy over the target
    tokens (``nan`` where not enabled), from one forward pass; with ``dropout_rates`` each
    sequence skips layer ``l`` with probability ``dropout_rates[l]`` (LayerSkip's layer
    dropout: the layer's output is its input for that sequence)."""
    import torch
    import torch.nn.functional as F

    from suite.backbones.decoder_only import causal_exit_logits

    hooks = []
    if dropout_rates is not None and model.training:
        batch_size = batch["input_ids"].shape[0]
        for layer, rate in zip(model.model.layers, dropout_rates):
            if rate <= 0:
                continue
            skip = torch.bernoulli(torch.full((batch_size,), float(rate)),
                                   generator=generator).bool()
            if not bool(skip.any()):
                continue

            def drop(module, args, output, skip=skip):
                hidden_in = args[0]
                hidden_out = output[0] if isinstance(output, tuple) else output
                mixed = torch.where(skip.to(hidden_in.device)[:, None, None], hidden_in,
                                    hidden_out)
                return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

            hooks.append(layer.register_forward_hook(drop))
    try:
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, return_dict=True)
    finally:
        for hook in hooks:
            hook.remove()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels[mask]
    states = outputs.hidden_states  # embeddings, raw layer outputs, the last one normed
    num_layers = len(states) - 1
    losses = []
    for index in range(num_layers):
        if not enabled[index]:
            losses.append(torch.full((), float("nan"), device=targets.device))
            continue
        if index == num_layers - 1:
            logits = outputs.logits[:, :-1][mask]
        else:
            logits = causal_exit_logits(model, states[index + 1][:, :-1][mask])
        losses.append(F.cross_entropy(logits.float(), targets))
    return outputs, torch.stack(losses)


def layerskip_loss(model, batch, objective):
    """LayerSkip's objective on one batch (see the module docstring)."""
    import torch

    from suite.training import LossParts

    layers = int(model.config.num_hidden_layers)
    options = {**LAYERSKIP_DEFAULTS, **{k: v for k, v in objective.layerskip_options().items()
                                        if v is not None}}
    enabled = curriculum_layers(max(1, objective.step), max(1, objective.total_steps), layers,
                                options["curriculum"])
    rates = layer_dropout_rates(layers, options["layer_dropout"])
    generator = torch.Generator().manual_seed(10_007 * objective.seed + objective.step)
    _, per_layer = exit_losses(model, batch, enabled, rates, generator)
    chosen = np.flatnonzero(enabled)
    scales = torch.as_tensor(linear_loss_scales(chosen, layers, options["early_exit_scale"]),
                             dtype=per_layer.dtype, device=per_layer.device)
    total = (scales * per_layer[torch.as_tensor(chosen, device=per_layer.device)]).sum()
    parts: dict[str, Any] = {f"ce_layer_{i + 1}": float(per_layer[i].detach()) for i in chosen}
    parts["ce_last"] = parts[f"ce_layer_{layers}"]
    parts["exits_trained"] = float(len(chosen))
    return LossParts(total=total, parts=parts)
