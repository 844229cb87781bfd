"""Small T5 backbones trained here, with early-exit objectives.

Three objectives, each a pure function of (model, batch) -> :class:`LossParts`
(:func:`objective_loss`), so tests can compare them with a hand computation:

- ``vanilla``: cross-entropy of the last layer; equals Hugging Face's own loss with
  ``labels``.
- ``calm`` (Schuster et al. 2022): ``L = sum_i w_i CE_i`` over all ``L`` decoder
  layers, ``w_i = i / sum_j j`` (``i = 1..L``), each ``CE_i`` computed on
  :func:`suite.backbones.t5.t5_exit_logits` of layer ``i``'s hidden state: the shared LM
  head after the final norm and T5's ``d_model ** -0.5`` scaling.
- ``free`` (Bae et al. 2023, as in their released code ``util/losses.py``):
  ``L = (k CE_k + L CE_L) / (k + L) + alpha * KD`` with the shallow exit ``k``
  (default :func:`default_shallow_layer`, ``L / 4``: FREE's scripts train 6 of 24 layers)
  and ``alpha = kd_weight`` (default 0.5, FREE's ``distill_layer_alpha``). The distillation
  term compares the normed states of the shallow layers ``1..k`` (students) with those of
  the ``k`` teacher layers :func:`teacher_layers` (FREE's ``TEACHER_LAYERS`` table where it
  has the depth, else ``round(i L / k)``), by the ``layer_map`` (FREE's
  ``intermediate_loss_fn``): ``dyna`` (FREE's default in every script,
  ``shallowdeep_kd_dyna``): each teacher is matched, from the last teacher down, to the
  closest student (lowest MSE) below the student matched to the teacher after it
  (:func:`dyna_alignment`), and KD is the mean MSE over the matched pairs; ``uniform``
  (``shallowdeep_kd_unif``): student ``i`` with teacher ``i``; ``last``
  (``shallowdeep_kd_last``): student ``k`` with the last layer. ``norm`` is the decoder's
  final norm (FREE distils normed states), the teacher side is detached (FREE detaches it),
  and each MSE is a mean over the elements at target positions (FREE averages over every
  position, padding included; we leave padding out).

Which hidden states: HF's ``decoder_hidden_states`` has ``L + 1`` entries (``[0]`` is
the embedding output); entries ``1..L-1`` are raw block outputs, the last is already
final-normed (verified against transformers 5.24: ``hs[-1]`` equals
``final_layer_norm(last block output)`` and gives ``outputs.logits``), so the last
layer's logits are HF's own ``outputs.logits``.

:func:`train` runs AdamW over a deterministic, length-bucketed batch order, writes a
checkpoint (``save_pretrained`` + optimizer, scheduler, step and RNG state) every N
steps into ``<out>.checkpoints/``, resumes from the newest one when rerun with the
same settings (different settings are an error that names them), and finally
renames a complete model folder into ``<out>``: the model, the tokenizer files and
``exitbench_model.json``.

CPU threads: on a 2-core machine shared with other work, OpenMP's default spin-waiting
made each step up to ~8x slower for the tiny preset and ~100x for the micro one
(measured); ``OMP_WAIT_POLICY=PASSIVE`` in the environment (it must be set before torch
is imported) or ``--threads 1`` avoids it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from suite.atomic import atomic_write_json, temp_dir_beside
from suite.errors import ExitbenchError
from suite.train_loop import TRAINER_STATE_FILE  # noqa: F401 - re-exported

if TYPE_CHECKING:
    import torch

    from suite.measures import Backbone

# torch (and suite.models, which imports it) are imported inside the functions that use
# them: the CLI imports this module to build its parser, and every `exitbench` command
# would otherwise pay torch's import time.

OBJECTIVES = ("vanilla", "calm", "free", "layerskip")
LAYER_MAPS = ("dyna", "uniform", "last")
"""FREE's layer mappings for the distillation term (``shallowdeep_kd_<map>`` in FREE)."""
FREE_TEACHER_LAYERS: dict[int, dict[int, tuple[int, ...]]] = {
    24: {12: (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24),
         10: (3, 6, 8, 11, 13, 16, 18, 20, 22, 24),
         8: (3, 6, 9, 12, 15, 18, 21, 24),
         6: (4, 8, 12, 16, 20, 24),
         4: (6, 12, 18, 24)},
    12: {3: (4, 8, 12)},
}
"""FREE's ``TEACHER_LAYERS`` (``util/losses.py``, ``compute_layerwise_distillation_loss``):
depth -> shallow layers -> the teacher layer of each shallow layer, here 1-based (FREE's
table holds 0-based indices into the layers' normed outputs: ``[3, 7, ...]`` for 6 of 24)."""
MODEL_METADATA_FILE = "exitbench_model.json"
RUN_FILE = "exitbench_train.json"
IGNORE_INDEX = -100
OPTIMIZERS = ("adamw", "adafactor")
LR_SCHEDULES = ("linear", "cosine", "constant")
MODEL_FORMAT_VERSION = 1


# -- architecture ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A named T5 size. Encoder and decoder always have the same depth: HF ``generate``
    sizes its cache by ``num_layers`` and fails (IndexError) when the decoder is deeper
    (verified with transformers 5.24)."""

    name: str
    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    num_layers: int
    dropout_rate: float
    description: str
    family: str = "t5"
    """The model family built from it: ``t5`` or ``llama`` (a Llama-style decoder-only model
    of ``num_layers`` layers, ``d_model`` wide, ``d_ff`` FFN, ``num_heads`` heads of ``d_kv``)."""


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("micro", d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=3, dropout_rate=0.0,
           description="for tests: trains in seconds, learns little"),
    Preset("tiny", d_model=128, d_ff=512, num_heads=4, d_kv=32, num_layers=6, dropout_rate=0.1,
           description="quickstart size: ~3.5M parameters with a 4k vocabulary; minutes on 2 CPU cores"),
    Preset("small", d_model=256, d_ff=1024, num_heads=4, d_kv=64, num_layers=8, dropout_rate=0.1,
           description="~15M parameters; for a GPU or a long CPU run"),
    Preset("llama-micro", d_model=32, d_ff=64, num_heads=2, d_kv=16, num_layers=3,
           dropout_rate=0.0, family="llama",
           description="decoder-only Llama for tests: trains in seconds, learns little"),
    Preset("llama-tiny", d_model=128, d_ff=384, num_heads=4, d_kv=32, num_layers=6,
           dropout_rate=0.0, family="llama",
           description="decoder-only Llama, ~1.7M parameters with a 4k vocabulary; minutes on "
                       "2 CPU cores"),
)}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        from suite.registry import closest_names

        close = closest_names(name, list(PRESETS))
        raise ExitbenchError(f"unknown model preset {name!r}"
                             + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def build_config(preset: Preset, vocab_size: int, dropout_rate: float | None = None):
    """A T5 config for ``preset``: T5's relu FFN, tied embeddings (so the LM head input is
    scaled by ``d_model ** -0.5``), pad 0 = decoder start, eos 1."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size, d_model=preset.d_model, d_ff=preset.d_ff, d_kv=preset.d_kv,
        num_heads=preset.num_heads, num_layers=preset.num_layers,
        num_decoder_layers=preset.num_layers, feed_forward_proj="relu",
        dropout_rate=preset.dropout_rate if dropout_rate is None else dropout_rate,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        is_encoder_decoder=True)


def build_model(preset: Preset, vocab_size: int, *, seed: int = 0,
                dropout_rate: float | None = None):
    """A freshly initialised ``T5ForConditionalGeneration``; the same seed gives the same
    weights."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(build_config(preset, vocab_size, dropout_rate))
    _set_generation_defaults(model)
    return model


def _set_generation_defaults(model) -> None:
    generation = model.generation_config
    generation.decoder_start_token_id = 0
    generation.pad_token_id = 0
    generation.eos_token_id = 1


# -- objectives ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """A training objective with its parameters (see the module docstring)."""

    name: str = "calm"
    shallow_layer: int | None = None
    """FREE's shallow exit, 1-based; ``None`` means :func:`default_shallow_layer` (``L / 4``)."""
    kd_weight: float = 0.5
    """FREE's ``alpha``: weight of the layer-wise distillation term."""
    layer_map: str = "dyna"
    """FREE's mapping of shallow to teacher layers in the distillation term (``LAYER_MAPS``)."""
    layer_dropout: float | None = None
    """LayerSkip: the last layer's dropout rate ``p_max`` (``None``: 0.2, LayerSkip's)."""
    early_exit_scale: float | None = None
    """LayerSkip: ``e_scale`` of the early exits' losses (``None``: 1.0)."""
    curriculum: str | None = None
    """LayerSkip: ``gradual`` or ``none`` (``None``: gradual)."""
    step: int = 0
    """The optimiser step (1-based) the loss is for: LayerSkip's curriculum and dropout draw."""
    total_steps: int = 0
    seed: int = 0

    def layerskip_options(self) -> dict[str, Any]:
        return {"layer_dropout": self.layer_dropout, "early_exit_scale": self.early_exit_scale,
                "curriculum": self.curriculum}

    def at_step(self, step: int, total_steps: int, seed: int = 0) -> Objective:
        """The objective at optimiser step ``step`` of ``total_steps``."""
        return dataclasses.replace(self, step=step, total_steps=total_steps, seed=seed)

    def __post_init__(self) -> None:
        if self.layer_dropout is not None and not 0.0 <= self.layer_dropout < 1.0:
            raise ExitbenchError(f"layer dropout {self.layer_dropout} must be in [0, 1)")
        if self.curriculum is not None and self.curriculum not in ("gradual", "none"):
            raise ExitbenchError(f"unknown curriculum {self.curriculum!r}; use gradual or none")
        if self.name not in OBJECTIVES:
            raise ExitbenchError(f"unknown objective {self.name!r}; use one of "
                                 f"{', '.join(OBJECTIVES)}")
        if self.kd_weight < 0:
            raise ExitbenchError(f"kd weight {self.kd_weight} must be >= 0")
        if self.layer_map not in LAYER_MAPS:
            raise ExitbenchError(f"unknown layer map {self.layer_map!r}; use one of "
                                 f"{', '.join(LAYER_MAPS)} (FREE's default is dyna)")

    def resolved(self, num_layers: int) -> Objective:
        """A copy with FREE's shallow layer filled in and checked against the depth."""
        if self.name != "free":
            return dataclasses.replace(self, shallow_layer=None)
        k = default_shallow_layer(num_layers) if self.shallow_layer is None else self.shallow_layer
        if not 1 <= k < num_layers:
            raise ExitbenchError(f"shallow layer {k} is out of range: FREE needs 1 <= k < "
                                 f"{num_layers} (the decoder's depth); pass --shallow-layer "
                                 f"between 1 and {num_layers - 1}")
        return dataclasses.replace(self, shallow_layer=k)


@dataclass(frozen=True)
class LossParts:
    """An objective's value on one batch: ``total`` (differentiable) and named parts
    (floats, for logs and tests)."""

    total: torch.Tensor
    parts: dict[str, float]


def default_shallow_layer(num_layers: int) -> int:
    """FREE's shallow model size for a decoder of ``num_layers`` layers: a quarter of the
    depth, half rounded up (FREE's scripts train 6 of T5-large's 24), at least 1 and at
    most ``L - 1``. The one default of training and of the ``free_shallow_deep`` measure
    (whose 0-based exit layer is this minus one)."""
    return max(1, min(num_layers - 1, math.floor(num_layers / 4 + 0.5)))


def calm_layer_weights(num_layers: int) -> torch.Tensor:
    """CALM's ``w_i = i / sum_j j`` for ``i = 1..L`` (they sum to 1)."""
    import torch
    index = torch.arange(1, num_layers + 1, dtype=torch.float32)
    return index / index.sum()


def uniform_layer_map(shallow_layer: int, num_layers: int) -> list[int]:
    """The uniform mapping: shallow layer ``i`` (1-based) learns from deep layer
    ``round(i * L / k)``; the shallow exit ``k`` maps to the last layer ``L``."""
    return [round(i * num_layers / shallow_layer) for i in range(1, shallow_layer + 1)]


def teacher_layers(shallow_layer: int, num_layers: int) -> list[int]:
    """The teacher layer (1-based) of each shallow layer ``1..k``: FREE's table where it
    has ``(L, k)`` (:data:`FREE_TEACHER_LAYERS`; it differs from the uniform rule for 10 of
    24 layers), else :func:`uniform_layer_map`."""
    table = FREE_TEACHER_LAYERS.get(num_layers, {}).get(shallow_layer)
    return list(table) if table is not None else uniform_layer_map(shallow_layer, num_layers)


def dyna_alignment(losses: torch.Tensor) -> list[int]:
    """FREE's dynamic layer mapping (``shallowdeep_kd_dyna``): ``losses[t, s]`` is the MSE of
    teacher ``t`` and student ``s`` (both 0-based over the lists); from the last teacher
    down, each teacher takes the student of lowest loss among those below the student the
    next teacher took (the last teacher may take any); a teacher with no such student takes
    the same student as the next one. Returns the student of each teacher."""
    import torch

    num_teachers, num_students = losses.shape
    below = num_students  # FREE starts from len(all_hidden_states), above every student
    alignment = []
    for teacher in range(num_teachers - 1, -1, -1):
        order = torch.argsort(losses[teacher].detach(), stable=True)
        candidates = order[order < below]
        below = int(candidates[0]) if len(candidates) else below
        alignment.append(below)
    alignment.reverse()
    return alignment


def _forward(model, batch: dict[str, torch.Tensor], hidden: bool):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 labels=batch["labels"], output_hidden_states=hidden, return_dict=True)


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy per leading index: ``logits [n, N, V]``, ``targets [N]`` -> ``[n]``."""
    import torch.nn.functional as F
    n, num, vocab = logits.shape
    ce = F.cross_entropy(logits.reshape(n * num, vocab), targets.repeat(n), reduction="none")
    return ce.view(n, num).mean(dim=1)


def layer_losses(model, batch: dict[str, torch.Tensor], outputs=None) -> torch.Tensor:
    """Cross-entropy of every decoder layer's exit, ``[L]`` (layer 1 first), each the mean
    over the batch's target tokens (as HF's loss is). Logits are computed only at target
    positions: the norm and head act per position, so this equals slicing full logits."""
    import torch

    from suite.backbones.t5 import t5_exit_logits

    if outputs is None:
        outputs = _forward(model, batch, hidden=True)
    mask = batch["labels"] != IGNORE_INDEX
    targets = batch["labels"][mask]
    states = outputs.decoder_hidden_states
    num_layers = len(states) - 1
    # Entries 1..L-1 are raw block outputs (normed by t5_exit_logits); the last layer's
    # logits are HF's own (its hidden state is already normed).
    inner = torch.stack([states[i][mask] for i in range(1, num_layers)]) if num_layers > 1 else None
    last = outputs.logits[mask].unsqueeze(0)
    logits = last if inner is None else torch.cat([t5_exit_logits(model, inner), last])
    return _masked_ce(logits, targets)


def _normed_state(model, states, layer: int) -> torch.Tensor:
    """Layer ``layer``'s (1-based) hidden state after the final norm."""
    if layer == len(states) - 1:
        return states[layer]  # HF's last entry is already normed
    return model.decoder.final_layer_norm(states[layer])


def objective_loss(model, batch: dict[str, torch.Tensor], objective: Objective) -> LossParts:
    """The objective on one batch (``input_ids``, ``attention_mask``, ``labels`` with
    ``-100`` at padding). See the module docstring for the formulas."""

    from suite.backbones.t5 import t5_exit_logits

    num_layers = model.config.num_decoder_layers
    objective = objective.resolved(num_layers)
    if objective.name == "layerskip":
        raise ExitbenchError("the layerskip objective trains decoder-only models (a llama-* "
                             "preset or --init of a Llama, Mistral or Qwen checkpoint)")
    if objective.name == "vanilla":
        outputs = _forward(model, batch, hidden=False)
        mask = batch["labels"] != IGNORE_INDEX
        ce = _masked_ce(outputs.logits[mask].unsqueeze(0), batch["labels"][mask])[0]
        return LossParts(total=ce, parts={"ce_last": float(ce.detach())})

    outputs = _forward(model, batch, hidden=True)
    if objective.name == "calm":
        per_layer = layer_losses(model, batch, outputs)
        weights = calm_layer_weights(num_layers).to(per_layer)
        total = (weights * per_layer).sum()
        parts = {f"ce_layer_{i + 1}": float(v) for i, v in enumerate(per_layer.detach())}
        parts["ce_last"] = parts[f"ce_layer_{num_layers}"]
        return LossParts(total=total, parts=parts)

    # FREE: the shallow exit and the last layer, weighted by depth, plus distillation.
    k = int(objective.shallow_layer)
    states = outputs.decoder_hidden_states
    mask = batch["labels"] != IGNORE_INDEX
    targets = batch["labels"][mask]
    shallow_logits = t5_exit_logits(model, states[k][mask])
    ce_shallow = _masked_ce(shallow_logits.unsqueeze(0), targets)[0]
    ce_deep = _masked_ce(outputs.logits[mask].unsqueeze(0), targets)[0]
    ce = (k * ce_shallow + num_layers * ce_deep) / (k + num_layers)
    kd = distillation_loss(model, states, mask, k, objective.layer_map)
    total = ce + objective.kd_weight * kd
    return LossParts(total=total, parts={"ce_shallow": float(ce_shallow.detach()),
                                         "ce_deep": float(ce_deep.detach()),
                                         "ce_last": float(ce_deep.detach()),
                                         "kd": float(kd.detach())})


def distillation_loss(model, states, mask: torch.Tensor, shallow_layer: int,
                      layer_map: str) -> torch.Tensor:
    """FREE's layer-wise distillation term over HF's ``decoder_hidden_states`` (see the
    module docstring): MSE of normed student and (detached) teacher states at the target
    positions ``mask``, paired by ``layer_map``."""
    import torch
    import torch.nn.functional as F

    num_layers = len(states) - 1
    k = shallow_layer

    def student(i: int) -> torch.Tensor:
        return _normed_state(model, states, i)[mask]

    def teacher(i: int) -> torch.Tensor:
        return _normed_state(model, states, i)[mask].detach()

    if layer_map == "last":
        return F.mse_loss(student(k), teacher(num_layers))
    teachers = teacher_layers(k, num_layers)
    students = [student(i) for i in range(1, k + 1)]
    if layer_map == "uniform":
        return torch.stack([F.mse_loss(s, teacher(t)) for s, t in zip(students, teachers)]
                           ).mean()
    # dyna: every (teacher, student) pair, then FREE's alignment over the loss matrix
    losses = torch.stack([torch.stack([F.mse_loss(s, target) for s in students])
                          for target in (teacher(t) for t in teachers)])
    alignment = dyna_alignment(losses)
    return losses[torch.arange(len(teachers)), torch.tensor(alignment)].mean()


# -- data ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedData:
    """Token ids of training examples (EOS included, truncated to the limits)."""

    sources: tuple[tuple[int, ...], ...]
    targets: tuple[tuple[int, ...], ...]
    example_ids: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sources)


def encode_examples(tokenizer, examples, max_source_tokens: int,
                    max_target_tokens: int) -> EncodedData:
    """Tokenise sources and targets; truncation keeps the EOS (verified: the T5 tokenizer
    truncates the text, then appends EOS)."""
    sources = tokenizer([e.source for e in examples], truncation=True,
                        max_length=max_source_tokens)["input_ids"]
    targets = tokenizer([e.target for e in examples], truncation=True,
                        max_length=max_target_tokens)["input_ids"]
    return EncodedData(sources=tuple(tuple(s) for s in sources),
                       targets=tuple(tuple(t) for t in targets),
                       example_ids=tuple(e.id for e in examples))


def settings_decoder_only(settings: TrainSettings) -> bool:
    """Whether ``settings`` train a decoder-only model (a llama-* preset, or an init
    checkpoint whose config names a causal LM)."""
    if settings.init is None:
        return get_preset(settings.preset).family != "t5"
    from suite.models import is_decoder_only

    return is_decoder_only(settings.init)


def objective_needs_decoder_only(settings: TrainSettings) -> bool:
    return settings.objective == "layerskip"


def encode_causal_examples(tokenizer, examples, task) -> EncodedData:
    """Decoder-only training data: the task's plain prompt and its continuation, EOS last
    (:mod:`suite.prompts`, the same encoding traces use)."""
    from suite.prompts import PromptFormat, encode_prompts, encode_targets

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ExitbenchError("the tokenizer names no EOS token; decoder-only training needs one")
    fmt = PromptFormat(decoder_only=True, eos_token_id=int(eos), stop_token_ids=(int(eos),))
    from suite.prompts import prompt_text

    sources = encode_prompts(tokenizer, [prompt_text(tokenizer, e, fmt) for e in examples],
                             task.limits.max_source_tokens)
    targets = encode_targets(tokenizer, examples, fmt, task.limits.max_target_tokens)
    return EncodedData(sources=tuple(tuple(s) for s in sources),
                       targets=tuple(tuple(t) for t in targets),
                       example_ids=tuple(e.id for e in examples))


def layerskip_record(objective: Objective, num_layers: int) -> dict[str, Any]:
    """What a LayerSkip-trained folder records of its recipe."""
    from suite.backbones.causal_training import LAYERSKIP_DEFAULTS, layer_dropout_rates

    options = {**LAYERSKIP_DEFAULTS, **{k: v for k, v in objective.layerskip_options().items()
                                        if v is not None}}
    return {**options, "loss_scale": "linear_l",
            "layer_dropout_rates": layer_dropout_rates(num_layers,
                                                       options["layer_dropout"]).tolist()}


def collate(data: EncodedData, indices: Sequence[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded tensors for the examples at ``indices``; labels are ``-100`` at padding."""
    import torch

    src = [data.sources[i] for i in indices]
    tgt = [data.targets[i] for i in indices]
    input_ids = torch.full((len(src), max(map(len, src))), pad_id, dtype=torch.long)
    labels = torch.full((len(tgt), max(map(len, tgt))), IGNORE_INDEX, dtype=torch.long)
    for row, (s, t) in enumerate(zip(src, tgt)):
        input_ids[row, :len(s)] = torch.tensor(s)
        labels[row, :len(t)] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": (input_ids != pad_id).long(),
            "labels": labels}


BUCKET_BATCHES = 16
"""Batches whose examples are drawn from one length-sorted chunk: padding (and so CPU
time) shrinks, while the chunk itself is a random sample."""


def epoch_batches(source_lengths: Sequence[int], batch_size: int, seed: int,
                  epoch: int) -> list[np.ndarray]:
    """The batches of one epoch, a pure function of ``(seed, epoch)`` so that a resumed run
    sees the same order: a random permutation, cut into chunks of ``BUCKET_BATCHES``
    batches, each chunk sorted by source length and cut into batches, batches shuffled."""
    rng = np.random.default_rng([seed, epoch])
    lengths = np.asarray(source_lengths)
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    chunk = batch_size * BUCKET_BATCHES
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


class BatchPlan:
    """Step ``s`` (1-based) -> the example indices of its batch, across epochs."""

    def __init__(self, source_lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = list(source_lengths)
        self.batch_size = batch_size
        self.seed = seed
        self._epochs: dict[int, list[np.ndarray]] = {}
        self.batches_per_epoch = math.ceil(len(self.lengths) / batch_size)

    def batch(self, step: int) -> np.ndarray:
        epoch, index = divmod(step - 1, self.batches_per_epoch)
        if epoch not in self._epochs:
            self._epochs = {epoch: epoch_batches(self.lengths, self.batch_size, self.seed, epoch)}
        return self._epochs[epoch][index]


# -- settings and results ----------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights. A rerun into the same folder must
    agree on all of it (plus the tokenizer and the training examples)."""

    objective: str = "calm"
    preset: str | None = "tiny"
    """Size of a fresh model; ``None`` (set automatically) when ``init`` is given."""
    tasks: tuple[str, ...] = ("squad",)
    split: str = "validation"
    limit: int | None = None
    max_source_tokens: int | None = None
    """``None``: the task's limit (512 for SQuAD)."""
    max_target_tokens: int | None = None
    shallow_layer: int | None = None
    kd_weight: float = 0.5
    layer_map: str = "dyna"
    """FREE's distillation layer map (``dyna``, ``uniform``, ``last``)."""
    steps: int = 200
    batch_size: int = 16
    """The global batch: examples per optimiser step, over all workers and accumulation
    steps together."""
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    dropout_rate: float | None = None
    """``None``: the preset's (or the init checkpoint's)."""
    seed: int = 0
    init: str | None = None
    """Pretrained checkpoint to fine-tune (hub id or folder); ``None``: a fresh model."""
    optimizer: str = "adamw"
    """``adamw`` or ``adafactor`` (FREE's scripts; fixed learning rate)."""
    lr_schedule: str = "linear"
    """``linear`` or ``cosine`` decay after the warmup, or ``constant``."""
    final_lr_fraction: float = 0.1
    """Learning rate at the last step, as a fraction of the peak (linear and cosine)."""
    grad_accum_steps: int = 1
    """Micro-batches per worker per optimiser step."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast and dynamic loss scaling)."""
    layer_dropout: float | None = None
    """LayerSkip's maximum layer dropout (``None``: 0.2; only with ``objective=layerskip``)."""
    early_exit_scale: float | None = None
    curriculum: str | None = None

    def __post_init__(self) -> None:
        from suite.train_loop import PRECISIONS

        _ = self.objective_spec  # validates the name and the layer map
        if self.init is not None:
            object.__setattr__(self, "preset", None)  # the architecture is the checkpoint's
        elif self.preset is None:
            raise ExitbenchError("no model to train: give a preset (e.g. tiny) or --init")
        else:
            get_preset(self.preset)
        for name in ("steps", "batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ExitbenchError(f"{name.replace('_', '-')} must be at least 1, got "
                                     f"{getattr(self, name)}")
        if not self.tasks:
            raise ExitbenchError("no training task given; pass --task (e.g. --task squad)")
        if self.learning_rate <= 0:
            raise ExitbenchError(f"learning rate {self.learning_rate} must be positive")
        for name, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("lr schedule", self.lr_schedule, LR_SCHEDULES),
                                     ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ExitbenchError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ExitbenchError(f"final learning-rate fraction {self.final_lr_fraction} must "
                                 f"be in [0, 1]")

    @property
    def objective_spec(self) -> Objective:
        return Objective(self.objective, self.shallow_layer, self.kd_weight, self.layer_map,
                         layer_dropout=self.layer_dropout,
                         early_exit_scale=self.early_exit_scale, curriculum=self.curriculum)

    def identity(self) -> dict[str, Any]:
        """The settings as recorded with the model; LayerSkip's options only when set, so
        folders trained before they existed still match."""
        values = dataclasses.asdict(self)
        for name in ("layer_dropout", "early_exit_scale", "curriculum"):
            if values[name] is None:
                del values[name]
        return values


@dataclass(frozen=True)
class TrainResult:
    folder: str
    steps: int
    final_loss: float
    """Mean training loss (the objective's total) over the last logging window."""
    loss_curve: tuple[tuple[int, float], ...]
    """(step, mean objective loss over the window ending there)."""
    seconds: float
    """Training time in this process (not counting earlier runs that were resumed)."""
    resumed_from: int | None = None
    already_done: bool = False
    eval_layer_ce: tuple[float, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)


# -- the driver --------------------------------------------------------------------------------
def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def _checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoints")


def _write_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder beside ``target`` and rename it into place (replacing an old one)."""
    tmp = temp_dir_beside(target)
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_examples(settings: TrainSettings, split: str, data_dir, tokenizer) -> tuple[
        EncodedData, list[dict[str, Any]], int, int]:
    from suite.tasks import get_task, load_examples

    parts: list[EncodedData] = []
    described = []
    max_src = max_tgt = 0
    for name in settings.tasks:
        task = get_task(name).with_limits(max_source_tokens=settings.max_source_tokens,
                                          max_target_tokens=settings.max_target_tokens)
        examples = load_examples(task, split, data_dir, settings.limit)
        if settings_decoder_only(settings):
            parts.append(encode_causal_examples(tokenizer, examples, task))
        else:
            parts.append(encode_examples(tokenizer, examples, task.limits.max_source_tokens,
                                         task.limits.max_target_tokens))
        described.append({"task": name, "split": split, "num_examples": len(examples),
                          "max_source_tokens": task.limits.max_source_tokens,
                          "max_target_tokens": task.limits.max_target_tokens})
        max_src = max(max_src, task.limits.max_source_tokens)
        max_tgt = max(max_tgt, task.limits.max_target_tokens)
    data = EncodedData(sources=sum((p.sources for p in parts), ()),
                       targets=sum((p.targets for p in parts), ()),
                       example_ids=sum((tuple(f"{d['task']}/{i}" for i in p.example_ids)
                                        for p, d in zip(parts, described)), ()))
    return data, described, max_src, max_tgt


def evaluate_layer_losses(model, data: EncodedData, batch_size: int = 32) -> list[float]:
    """Per-layer cross-entropy over all target tokens of ``data`` (teacher-forced, eval
    mode), layer 1 first."""
    import torch

    with torch.no_grad():
        return _evaluate_layer_losses(model, data, batch_size)


def _evaluate_layer_losses(model, data: EncodedData, batch_size: int) -> list[float]:
    from suite.backbones import family_for

    family = family_for(model.config.model_type)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = None
    count = 0
    order = np.argsort([len(s) for s in data.sources], kind="stable")
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in family.collate(data, indices).items()}
        tokens = sum(len(data.targets[i]) for i in indices)
        losses = family.layer_losses(model, batch).double() * tokens
        totals = losses if totals is None else totals + losses
        count += tokens
    model.train(was_training)
    return [float(v) for v in totals / max(count, 1)]


def describe_data(described: list[dict[str, Any]]) -> str:
    names = {"squad": "SQuAD", "cnn_dailymail": "CNN/DailyMail", "wmt15_en_fr": "WMT EN-FR",
             "big_patent": "BigPatent"}
    return " + ".join(f"{names.get(d['task'], d['task'])} sample ({d['split']}, "
                      f"{d['num_examples']} examples)" for d in described)


@dataclass(frozen=True)
class Launch:
    """Where training runs: this process (``workers=None``) or ``workers`` Ray Train workers
    (PyTorch DDP) on the Ray instance at ``address`` (``None``: one started here on
    127.0.0.1)."""

    workers: int | None = None
    address: str | None = None
    device: str = "cpu"
    """``cpu`` or ``cuda`` (Ray workers then ask for one GPU each)."""
    cpus_per_worker: int = 1
    storage: str | None = None
    """Ray Train's storage for checkpoints; default ``<out>.checkpoints/ray``. On a
    multi-node cluster it must be shared by every node (NFS, S3)."""
    max_failures: int = 2
    """Times a failed worker group is restarted from the newest checkpoint."""

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ExitbenchError(f"--workers must be at least 1, got {self.workers}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ExitbenchError(f"device {self.device!r} is not one; use cpu or cuda")


def train(settings: TrainSettings, tokenizer_dir: str | Path | None, out: str | Path, *,
          data_dir: str | os.PathLike | None = None, eval_split: str | None = None,
          eval_every: int | None = None, checkpoint_every: int = 100, keep_checkpoints: int = 1,
          log_every: int = 10, progress: bool = True,
          on_step: Callable[[int, float], None] | None = None, launch: Launch | None = None,
          gradient_checkpointing: bool = False, threads: int | None = None) -> TrainResult:
    """Train a model (fresh from ``settings.preset`` with the tokenizer in
    ``tokenizer_dir``, or fine-tuned from ``settings.init`` with its own tokenizer) and
    write it to ``out`` (see the module docstring for the layout).

    Rerunning with the same settings resumes from the newest checkpoint in
    ``<out>.checkpoints`` or, when ``out`` is already complete, returns at once
    (``already_done``). ``on_step(step, loss)`` is called after every optimiser step, on
    every worker (tests use it to interrupt a run)."""
    import torch
    from transformers.utils import logging as hf_logging

    from suite import __version__
    from suite.backbones import copy_tokenizer, family_for, resolve_init
    from suite.models import load_tokenizer as load_any_tokenizer
    from suite.tokenizer import load_tokenizer, spiece_sha256
    from suite.traces import hash_strings
    from suite.train_loop import LocalCheckpoints, TrainJob, WorkerContext, run_training

    # Our bar shows training progress; HF's per-save and per-load bars would interleave.
    hf_logging.disable_progress_bar()
    launch = launch or Launch()
    out = Path(out)
    init = None
    if settings.init is not None:
        if tokenizer_dir is not None:
            raise ExitbenchError("--tokenizer and --init exclude each other: a fine-tuned "
                                 "model keeps its checkpoint's tokenizer")
        init = resolve_init(settings.init)
        tokenizer_dir = init.folder
        tokenizer = load_any_tokenizer(str(init.folder))
        tokenizer_hash = init.tokenizer_sha256
        depth = _config_depth(init.folder)
    else:
        if tokenizer_dir is None:
            raise ExitbenchError("training a fresh model needs a tokenizer folder (--tokenizer, "
                                 "from `exitbench train-tokenizer`), or --init to fine-tune")
        tokenizer_dir = Path(tokenizer_dir)
        tokenizer = load_tokenizer(tokenizer_dir)
        tokenizer_hash = spiece_sha256(tokenizer_dir)
        depth = get_preset(settings.preset).num_layers
    if objective_needs_decoder_only(settings) and not settings_decoder_only(settings):
        raise ExitbenchError(f"the {settings.objective} objective trains decoder-only models; "
                             f"use a llama-* preset or --init a Llama, Mistral or Qwen "
                             f"checkpoint")
    objective = settings.objective_spec.resolved(depth)
    data, described, max_src, max_tgt = _load_examples(settings, settings.split, data_dir,
                                                       tokenizer)
    identity = {**settings.identity(), "tasks": list(settings.tasks),
                "shallow_layer": objective.shallow_layer,
                "tokenizer_spiece_sha256": tokenizer_hash,
                "train_example_ids_sha256": hash_strings(list(data.example_ids)),
                "init_weights_sha256": init.weights_sha256 if init else None}
    if objective.name != "free":  # the layer map only shapes FREE's loss
        identity.pop("layer_map")

    # A finished model, or checkpoints of an earlier run: the same settings continue it.
    if out.exists():
        meta_path = out / MODEL_METADATA_FILE
        if not meta_path.is_file():
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            else:
                raise ExitbenchError(f"{out} exists and is not a model folder written by "
                                     f"`exitbench train`; choose another --out or remove it")
        else:
            metadata = json.loads(meta_path.read_text("utf-8"))
            differ = _differences(metadata.get("settings", {}), identity)
            if differ:
                raise ExitbenchError(f"{out} holds a model trained with other settings ("
                                     + "; ".join(differ) + "); choose another --out or "
                                     "delete that folder")
            # A crash between the final rename and the clean-up can leave checkpoints behind.
            shutil.rmtree(_checkpoint_dir(out), ignore_errors=True)
            return TrainResult(folder=str(out), steps=metadata["steps"],
                               final_loss=metadata["final_loss"],
                               loss_curve=tuple(tuple(x) for x in metadata["loss_curve"]),
                               seconds=0.0, already_done=True,
                               eval_layer_ce=tuple(metadata["eval"]["layer_ce"])
                               if metadata.get("eval") else None, metadata=metadata)
    ckpt_root = _checkpoint_dir(out)
    run_file = ckpt_root / RUN_FILE
    if run_file.is_file():
        differ = _differences(json.loads(run_file.read_text("utf-8")), identity)
        if differ:
            raise ExitbenchError(f"{ckpt_root} holds checkpoints of a run with other settings ("
                                 + "; ".join(differ) + f"); rerun with the same settings to "
                                 f"resume it, or delete {ckpt_root} to start over")
    else:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # no run file: nothing resumable
        atomic_write_json(run_file, identity)

    from suite.tasks import resolve_data_dir

    # Absolute paths: Ray Train workers do not run in this directory.
    data_folder = resolve_data_dir(data_dir)
    job = TrainJob(settings=settings, tokenizer_dir=str(Path(tokenizer_dir).resolve()),
                   init_folder=str(init.folder) if init else None,
                   data_dir=None if data_folder is None else str(data_folder.resolve()),
                   eval_split=eval_split,
                   eval_every=eval_every, checkpoint_every=checkpoint_every,
                   keep_checkpoints=keep_checkpoints, log_every=log_every, device=launch.device,
                   gradient_checkpointing=gradient_checkpointing,
                   threads=threads or (launch.cpus_per_worker if launch.workers else None),
                   on_step=on_step)
    if launch.workers is None:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=settings.steps, desc=f"train {settings.objective}", unit="step",
                       mininterval=1.0, dynamic_ncols=True)

        def on_log(step: int, mean_loss: float, parts: dict[str, float]) -> None:
            if bar is not None:
                bar.n = step
                bar.set_postfix(loss=f"{mean_loss:.3f}", last=f"{parts.get('ce_last', 0):.3f}",
                                refresh=False)
                bar.update(0)

        try:
            outcome = run_training(job, WorkerContext(device=launch.device),
                                   LocalCheckpoints(ckpt_root, keep_checkpoints), on_log=on_log)
        finally:
            if bar is not None:
                bar.close()
    else:
        from suite.ray_train import train_on_ray

        outcome = train_on_ray(job, launch, ckpt_root, progress=progress)
    model = outcome.model.to("cpu")
    family = family_for(model.config.model_type)
    num_layers = family.num_layers(model)
    loss_log = outcome.loss_log

    curve = [(min(i + log_every, len(loss_log)), float(np.mean(loss_log[i:i + log_every])))
             for i in range(0, len(loss_log), log_every)]
    eval_info = None
    eval_ce = None
    if eval_split is not None:
        eval_data, eval_described, _, _ = _load_examples(settings, eval_split, data_dir, tokenizer)
        eval_ce = evaluate_layer_losses(model, eval_data)
        eval_info = {"split": eval_split, "examples": eval_described, "layer_ce": eval_ce,
                     "curve": outcome.eval_curve}
    data_text = describe_data(described)
    if init is None:
        preset = get_preset(settings.preset)
        kind = "T5" if preset.family == "t5" else "Llama-style decoder-only model"
        label = (f"{settings.preset} {kind} ({objective.name} objective) trained by exitbench "
                 f"on the {data_text} for {settings.steps} steps; not a published checkpoint")
        architecture = dataclasses.asdict(preset) | {"vocab_size": len(tokenizer)}
        if preset.family == "t5":  # T5 folders' metadata as before
            del architecture["family"]
    else:
        label = (f"{init.source} fine-tuned by exitbench with the {objective.name} objective "
                 f"on the {data_text} for {settings.steps} steps")
        architecture = family.architecture(model)
    metadata = {
        "format_version": MODEL_FORMAT_VERSION,
        "label": label,
        "objective": objective.name,
        "preset": settings.preset,
        "architecture": architecture,
        "init": init.provenance() if init else None,
        "shallow_layer": objective.shallow_layer,
        "kd_weight": objective.kd_weight if objective.name == "free" else None,
        "layer_map": objective.layer_map if objective.name == "free" else None,
        **({"layerskip": layerskip_record(objective, num_layers)}
           if objective.name == "layerskip" else {}),
        "layer_weights": calm_layer_weights(num_layers).tolist()
        if objective.name == "calm" else None,
        "tasks": described,
        "max_source_tokens": max_src,
        "max_target_tokens": max_tgt,
        "steps": settings.steps,
        "seed": settings.seed,
        "final_loss": curve[-1][1] if curve else float("nan"),
        "initial_loss": curve[0][1] if curve else float("nan"),
        "loss_curve": curve,
        "eval": eval_info,
        "tokenizer": {"source": str(settings.init or tokenizer_dir),
                      "spiece_sha256": tokenizer_hash},
        "training": {"launcher": "ray_train" if launch.workers else "process",
                     "workers": launch.workers or 1, "device": launch.device,
                     "precision": settings.precision,
                     "grad_accum_steps": settings.grad_accum_steps,
                     "gradient_checkpointing": gradient_checkpointing,
                     "optimizer": settings.optimizer, "lr_schedule": settings.lr_schedule},
        "train_seconds": outcome.seconds,
        "train_seconds_last_run": outcome.seconds_this_run,
        "resumed_from_step": outcome.start_step or None,
        "settings": identity,
        "versions": {"exitbench": __version__, "torch": torch.__version__,
                     "transformers": _transformers_version()},
    }

    def fill_final(folder: Path) -> None:
        model.save_pretrained(str(folder))
        copy_tokenizer(Path(tokenizer_dir), folder)
        atomic_write_json(folder / MODEL_METADATA_FILE, metadata)

    _write_folder(out, fill_final)
    shutil.rmtree(ckpt_root, ignore_errors=True)
    return TrainResult(folder=str(out), steps=settings.steps, final_loss=metadata["final_loss"],
                       loss_curve=tuple(curve), seconds=outcome.seconds_this_run,
                       resumed_from=outcome.start_step or None,
                       eval_layer_ce=tuple(eval_ce) if eval_ce is not None else None,
                       metadata=metadata)


def _config_depth(folder: Path) -> int:
    """Decoder layers of the checkpoint in ``folder`` (from its config.json)."""
    config = json.loads((Path(folder) / "config.json").read_text("utf-8"))
    depth = config.get("num_decoder_layers") or config.get("num_layers") \
        or config.get("num_hidden_layers")
    if not depth:
        raise ExitbenchError(f"{folder}/config.json names no layer count")
    return int(depth)

def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def model_label(model) -> str:
    """What a backbone (a config's ``ModelConfig``) is, for result rows and the run's
    summary: the config's label, else the label its model folder records (a shipped or
    trained folder), else its name."""
    if model.label:
        return model.label
    try:
        return str(read_model_metadata(model.path).get("label") or model.name)
    except (ExitbenchError, OSError, ValueError):
        return model.name


def read_model_metadata(folder: str | Path) -> dict[str, Any]:
    """``exitbench_model.json`` of a model folder written by :func:`train`."""
    path = Path(folder) / MODEL_METADATA_FILE
    if not path.is_file():
        raise ExitbenchError(f"{folder} has no {MODEL_METADATA_FILE}: it is not a model folder "
                             f"written by `exitbench train`")
    return json.loads(path.read_text("utf-8"))


def read_backbone(path: str) -> Backbone:
    """What the model at ``path`` (a config's model path: folder or hub id) records about
    its training, for the measures and online decoders that depend on it (FREE's shallow
    layer). A checkpoint the suite did not train gives a :class:`Backbone` of ``None``s."""
    from suite.measures import Backbone

    local = Path(path).expanduser()
    meta_path = local / MODEL_METADATA_FILE
    if not meta_path.is_file():
        return Backbone(path=path)
    metadata = json.loads(meta_path.read_text("utf-8"))
    shallow = metadata.get("shallow_layer")
    return Backbone(path=path, objective=metadata.get("objective"),
                    shallow_layer=int(shallow) if shallow is not None else None)
