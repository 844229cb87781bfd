"""Model families the training loop can build, load and train (this package also holds the
backbone adapters: :mod:`suite.backbones.decoder_only`).

The loop (:mod:`suite.train_loop`) knows nothing of T5: it asks a :class:`BackboneFamily`
for a model (fresh from a preset, or pretrained from a hub id or folder), for a batch of
examples, for the objective's loss on a batch and for per-layer held-out losses. T5 (t5,
t5-v1_1, flan-t5, mt5) is the family here; a decoder-only family (Llama, Mistral, Qwen2)
implements the same few methods and registers its ``model_type`` values in
:data:`FAMILIES`.

A pretrained checkpoint is loaded strictly: a weight the checkpoint lacks (which
``from_pretrained`` would silently initialise at random) or a weight of the wrong shape is
an error, and its weights hash is recorded with the fine-tuned model
(:func:`init_provenance`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from suite.errors import ExitbenchError

if TYPE_CHECKING:
    import torch

    from suite.training import EncodedData, LossParts, Objective, Preset


class BackboneFamily(Protocol):
    """What the training loop needs from a model family."""

    name: str
    model_types: tuple[str, ...]
    """``config.model_type`` values this family trains."""

    def fresh(self, preset: Preset, vocab_size: int, *, seed: int,
              dropout_rate: float | None) -> Any:
        """A randomly initialised model of ``preset`` (same seed, same weights)."""
        ...

    def pretrained(self, folder: Path, *, dropout_rate: float | None) -> Any:
        """The checkpoint in ``folder`` with every weight loaded (strict); ``dropout_rate``
        overrides the checkpoint's when given."""
        ...

    def collate(self, data: EncodedData, indices: Any) -> dict[str, torch.Tensor]:
        """A padded batch of the examples at ``indices`` (labels ``-100`` where ignored)."""
        ...

    def loss(self, model: Any, batch: dict[str, torch.Tensor], objective: Objective) -> LossParts:
        """The objective on one batch (a mean over its target tokens)."""
        ...

    def layer_losses(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of every exit, ``[L]``, layer 1 first."""
        ...

    def num_layers(self, model: Any) -> int:
        """Exits of the model (decoder layers)."""
        ...

    def architecture(self, model: Any) -> dict[str, Any]:
        """The sizes recorded with a trained model."""
        ...


class T5Family:
    """T5-family encoder-decoders (t5, t5-v1_1, flan-t5, mt5): ``*ForConditionalGeneration``
    trained with :func:`suite.training.objective_loss`."""

    name = "t5"
    model_types = ("t5", "mt5")

    def fresh(self, preset, vocab_size, *, seed, dropout_rate):
        from suite.training import build_model

        return build_model(preset, vocab_size, seed=seed, dropout_rate=dropout_rate)

    def pretrained(self, folder, *, dropout_rate):
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        from suite.training import _set_generation_defaults

        config = AutoConfig.from_pretrained(folder)
        if dropout_rate is not None:
            config.dropout_rate = dropout_rate
        model, info = AutoModelForSeq2SeqLM.from_pretrained(folder, config=config,
                                                            output_loading_info=True)
        check_loading_info(folder, info)
        if model.generation_config.decoder_start_token_id is None:
            _set_generation_defaults(model)
        return model

    def collate(self, data, indices):
        from suite.training import collate

        return collate(data, indices)

    def loss(self, model, batch, objective):
        from suite.training import objective_loss

        return objective_loss(model, batch, objective)

    def layer_losses(self, model, batch):
        from suite.training import layer_losses

        return layer_losses(model, batch)

    def num_layers(self, model):
        return int(model.config.num_decoder_layers)

    def architecture(self, model):
        config = model.config
        return {"model_type": config.model_type, "d_model": config.d_model,
                "d_ff": config.d_ff, "num_heads": config.num_heads, "d_kv": config.d_kv,
                "num_layers": config.num_layers, "num_decoder_layers": config.num_decoder_layers,
                "feed_forward_proj": config.feed_forward_proj, "vocab_size": config.vocab_size,
                "dropout_rate": config.dropout_rate}


FAMILIES: dict[str, BackboneFamily] = {t: T5Family() for t in T5Family.model_types}
"""``model_type`` -> the family that trains it."""


def _register_decoder_only() -> None:
    from suite.backbones.causal_training import CausalLMFamily

    family = CausalLMFamily()
    FAMILIES.update({t: family for t in family.model_types})


_register_decoder_only()

FRESH_FAMILY = "t5"
"""The family of models built from a preset (the suite's own small T5s)."""


def family_for(model_type: str, where: str = "") -> BackboneFamily:
    if model_type not in FAMILIES:
        raise ExitbenchError(f"{where or 'the checkpoint'}: model_type {model_type!r} cannot be "
                             f"fine-tuned here; supported: {', '.join(sorted(FAMILIES))} "
                             f"(t5, t5-v1_1, flan-t5 and mt5 checkpoints; Llama, Mistral, Qwen2 and "
                             f"Qwen3 causal LMs)")
    return FAMILIES[model_type]


def check_loading_info(folder: Path, info: dict[str, Any]) -> None:
    """Fail when ``from_pretrained`` initialised a weight itself: the fine-tuned model would
    silently start from partly random weights."""
    problems = []
    if info.get("missing_keys"):
        problems.append(f"weights missing from the checkpoint (they would start random): "
                        f"{_few(info['missing_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"weights of another shape: {_few([k[0] if isinstance(k, tuple) else k for k in info['mismatched_keys']])}")
    if problems:
        raise ExitbenchError(f"--init {folder}: " + "; ".join(problems) + ". Point --init at a "
                             "complete checkpoint (save_pretrained)")


def _few(names: Any, n: int = 5) -> str:
    names = sorted(str(x) for x in names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass(frozen=True)
class InitCheckpoint:
    """A pretrained checkpoint to fine-tune: where it came from and what it is."""

    source: str
    """What the user gave: a hub id or a folder."""
    folder: Path
    """The local folder (the hub cache's snapshot for a hub id)."""
    model_type: str
    weights_sha256: str
    tokenizer_sha256: str

    def provenance(self) -> dict[str, Any]:
        return {"source": self.source, "folder": str(self.folder), "model_type": self.model_type,
                "weights_sha256": self.weights_sha256, "tokenizer_sha256": self.tokenizer_sha256}


def resolve_init(source: str) -> InitCheckpoint:
    """The checkpoint behind ``--init`` (a folder, or a hub id from the hub or its cache)."""
    from suite.models import resolve_model_folder, tokenizer_sha256, weights_sha256

    folder = resolve_model_folder(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExitbenchError(f"--init {source}: {folder} has no config.json; point --init at a "
                             f"folder written by save_pretrained or a hub id")
    model_type = json.loads(config_path.read_text("utf-8")).get("model_type", "")
    family_for(model_type, f"--init {source}")
    return InitCheckpoint(source=source, folder=folder, model_type=model_type,
                          weights_sha256=weights_sha256(folder),
                          tokenizer_sha256=tokenizer_sha256(folder))


def copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy a checkpoint's tokenizer files into a model folder, byte for byte (the suite's
    own tokenizer metadata included), so the trained model carries its tokenizer."""
    import shutil

    from suite.models import TOKENIZER_FILES
    from suite.tokenizer import TOKENIZER_FILES as SUITE_TOKENIZER_FILES

    for name in dict.fromkeys((*SUITE_TOKENIZER_FILES, *TOKENIZER_FILES)):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
