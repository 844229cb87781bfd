"""Model adapters: the suite's view of a backbone. This module holds the protocol every
family implements, how a checkpoint is found, loaded and hashed, and :func:`load_adapter`,
which picks the family; the families themselves live in :mod:`suite.backbones` (T5 in
:mod:`suite.backbones.t5`, Llama-style causal LMs in :mod:`suite.backbones.decoder_only`).
Each family's exit-head function (:func:`suite.backbones.t5.t5_exit_logits`,
:func:`suite.backbones.decoder_only.causal_exit_logits`) is the single place its exit head
is defined, so that training objectives, traced decoding and online decoding compute a
layer's prediction the same way the checkpoint computes its last layer.

A :class:`DecoderAdapter` runs the decoder **one layer at a time** with a KV cache, so
that traced decoding can observe every layer and an online early-exit decoder can stop
after any layer (and fill the skipped layers' KV itself). One decoding step is::

    state = adapter.start(input_ids, attention_mask)      # encoder pass (or prompt prefill)
    hidden = adapter.begin_step(state, state.first_input_ids)   # [B, 1, d_model] embeddings
    for layer in range(adapter.num_layers):
        hidden = adapter.run_layer(state, layer, hidden)  # appends this layer's K/V
    logits = adapter.exit_logits(layer, hidden)           # norm + scaling + LM head

``begin_step`` accepts ``[B, T]`` tokens too: with ``use_cache=False`` that is one
parallel teacher-forced pass, the same code path as decoding.

Self-speculative decoding (:mod:`suite.speculative.online`) needs two more things, both
in the protocol: a multi-token pass through the deep layers only (``begin_catch_up``, the
same call FREE's synchronized parallel decoding uses: the draft has filled layers
``0..E-1``, the verification runs its ``k + 1`` positions through ``E..L-1``), and
``rollback``, which drops rejected draft positions from every layer's cache; rows of a
batch that keep different counts stay right-aligned, the slots freed at the front of the
shorter rows masked in later steps. A decoder-only adapter
(Llama-style) fits the same protocol: ``start`` prefills all but the last prompt token
and ``first_input_ids`` is that last token.

:class:`suite.backbones.t5.T5Adapter` implements it for Hugging Face T5-family checkpoints (t5, t5-v1_1,
flan-t5, mt5) by calling the checkpoint's own ``T5Block`` modules with the masks built
by the same ``transformers`` functions ``T5Stack.forward`` uses, so exiting at the last
layer reproduces the checkpoint's logits and greedy output.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from suite.errors import ExitbenchError
from suite.measures import ModelDims

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin")
"""Weight files PyTorch loading reads (the hash covers them; TF/Flax files are not loaded)."""
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
SUPPORTED_MODEL_TYPES = ("t5", "mt5")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]
"""Files fetched for a hub id: configs, safetensors weights, SentencePiece and vocab files."""


# -- the adapter protocol ---------------------------------------------------------------------
@dataclass
class DecodeState:
    """What a decode keeps between calls. Adapters subclass it with their own fields."""

    first_input_ids: torch.Tensor
    """``[B, 1]`` the first decoder input of every row (T5: the decoder start token)."""
    cache: Any | None
    """The KV cache (``None`` for a single parallel pass)."""


@runtime_checkable
class DecoderAdapter(Protocol):
    """A backbone decoded one layer at a time. Hidden states passed in and out are the
    un-normed residual stream (the output of a decoder layer, before any final norm)."""

    model_id: str
    num_layers: int
    """Decoder layers; exit heads exist after each, 0-based."""
    dims: ModelDims
    device: torch.device
    dtype: torch.dtype
    eos_token_id: int
    pad_token_id: int

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
              use_cache: bool = True) -> DecodeState:
        """Encode (or prefill) a right-padded batch ``[B, S]`` once; return the state."""
        ...

    def begin_step(self, state: DecodeState, input_ids: torch.Tensor) -> torch.Tensor:
        """Start a step for decoder inputs ``[B, T]``; return their embeddings ``[B, T, d]``
        (the input of layer 0)."""
        ...

    def run_layer(self, state: DecodeState, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run decoder layer ``layer`` on ``hidden`` (appending its K/V to the cache)."""
        ...

    def exit_logits(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[..., vocab]`` of an un-normed hidden state ``[..., d]`` of ``layer``:
        the checkpoint's own final norm, scaling and LM head."""
        ...

    def exit_norm(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The normed state ``[..., d]`` the exit head of ``layer`` reads (the final norm,
        with its weight; no output scaling): what the study's saturation cosines compare."""
        ...

    def fill_layer(self, state: DecodeState, layer: int, hidden: torch.Tensor) -> None:
        """Append to ``layer``'s self-attention cache the K/V that layer would compute from
        ``hidden [B, T, d]`` (its norm and K/V projections only): CALM's propagation of an
        exited state to the skipped layers."""
        ...

    def begin_catch_up(self, state: DecodeState, first_layer: int, num_queries: int) -> None:
        """Prepare layers ``first_layer..L-1``, whose caches lack the last ``num_queries``
        positions (this step's and those of earlier tokens that skipped them), to run those
        ``num_queries`` tokens in one causal pass: set the masks and position biases for it.
        FREE's synchronized parallel decoding of the tokens that skipped those layers, and
        self-speculation's verification pass (the draft's ``k`` positions and the last draft
        token's, through layers ``E..L-1``)."""
        ...

    def rollback(self, state: DecodeState, num_rejected: torch.Tensor) -> None:
        """Drop the last ``num_rejected[b]`` positions of row ``b`` (``[B]`` integers) from
        every layer's self-attention cache: the rejected drafts of self-speculative
        decoding. Every layer must hold the same number of positions. Rows that drop
        different counts stay right-aligned (their newest position in the last slot): the
        slots this frees at the front of the rows that kept fewer are masked from every
        later step's attention (``begin_step`` and ``begin_catch_up`` honour it), and a
        row's positions keep their distances, so relative position biases are unchanged.
        When every row drops the same count this is a plain crop."""
        ...


@dataclass(frozen=True)
class RollbackPlan:
    """Where each row's kept cache slots come from after a :meth:`DecoderAdapter.rollback`
    (shared by every adapter): rows stay right-aligned, so row ``b``'s kept slots move
    right by ``rejected[b] - min(rejected)``."""

    rejected: torch.Tensor
    """``[B]`` positions dropped per row."""
    length: int
    """Slots every layer held before the rollback."""
    kept: int
    """Slots every layer holds after it (``length - min(rejected)``)."""
    source: torch.Tensor
    """``[B, kept]`` the old slot each new slot is read from (clamped at 0)."""
    holds: torch.Tensor
    """``[B, kept]`` whether the new slot holds a position (``False``: freed, to mask)."""

    @property
    def is_crop(self) -> bool:
        """Every row drops the same count: the rollback is a plain crop to ``kept``."""
        return not bool((self.rejected != self.rejected.min()).any()) \
            if self.rejected.numel() else True

    def gather(self, layers) -> None:
        """Move every cache layer's keys and values to the plan's slots."""
        for layer in layers:
            if self.is_crop:
                layer.keys = layer.keys[..., :self.kept, :]
                layer.values = layer.values[..., :self.kept, :]
                continue
            batch, heads, _, width = layer.keys.shape
            index = self.source[:, None, :, None].expand(batch, heads, self.kept, width)
            layer.keys, layer.values = layer.keys.gather(2, index), layer.values.gather(2, index)


def rollback_plan(layers, num_rejected, device: torch.device) -> RollbackPlan:
    """Check a rollback of ``num_rejected`` (``[B]``) against the cache ``layers`` (every
    layer at one length, counts within it) and plan where the kept slots go."""
    lengths = {layer.get_seq_length() for layer in layers}
    if len(lengths) != 1:
        raise ValueError(f"rollback needs every layer's cache at one length, found "
                         f"{sorted(lengths)}")
    length = lengths.pop()
    rejected = torch.as_tensor(num_rejected, dtype=torch.long, device=device)
    if rejected.numel() and (int(rejected.min()) < 0 or int(rejected.max()) > length):
        raise ValueError(f"rejected counts {rejected.tolist()} are outside 0..{length}")
    dropped = int(rejected.min()) if rejected.numel() else 0
    kept = length - dropped
    shift = rejected - dropped  # how far right each row's kept slots move
    source = torch.arange(kept, device=device)[None, :] - shift[:, None]
    return RollbackPlan(rejected=rejected, length=length, kept=kept,
                        source=source.clamp(min=0), holds=source >= 0)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ExitbenchError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExitbenchError(f"device {str(device)!r} was asked for but torch sees no CUDA GPU "
                             f"(torch {torch.__version__}); set device: cpu in the config")
    return device


def load_adapter(path: str, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32") -> DecoderAdapter:
    """The adapter for the checkpoint at ``path`` (a local folder or a hub id), chosen by
    the family its ``config.json`` names: :class:`suite.backbones.t5.T5Adapter` for T5-family encoder-decoders,
    :class:`suite.backbones.decoder_only.DecoderOnlyAdapter` for Llama-style causal LMs."""
    from suite.backbones.decoder_only import DECODER_ONLY_MODEL_TYPES, DecoderOnlyAdapter

    model_type = checkpoint_model_type(path)
    if model_type in SUPPORTED_MODEL_TYPES:
        from suite.backbones.t5 import T5Adapter

        return T5Adapter.load(path, device=device, dtype=dtype)
    if model_type in DECODER_ONLY_MODEL_TYPES:
        return DecoderOnlyAdapter.load(path, device=device, dtype=dtype)
    from suite.backbones.decoder_only import check_decoder_only_config

    check_decoder_only_config(_read_config(path), f"model {path!r}")  # raises, with the reason
    raise AssertionError("unreachable")


def _read_config(path: str):
    from transformers import AutoConfig

    folder = resolve_model_folder(path)
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ExitbenchError(f"model {path!r}: {folder} has no readable config.json ({exc}); "
                             f"point the config at a folder written by save_pretrained") from exc


def checkpoint_model_type(path: str) -> str:
    """``config.model_type`` of the checkpoint at ``path``."""
    return str(getattr(_read_config(path), "model_type", ""))


def checkpoint_layers(path: str) -> tuple[int, bool]:
    """``(decoder layers, decoder-only?)`` of the checkpoint at ``path``, from its config."""
    config = _read_config(path)
    if getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES:
        return int(config.num_decoder_layers), False
    from suite.backbones.decoder_only import check_decoder_only_config

    check_decoder_only_config(config, f"model {path!r}")
    return int(config.num_hidden_layers), True


def is_decoder_only(path: str) -> bool:
    """Whether the checkpoint at ``path`` is a causal LM the decoder-only adapter takes."""
    from suite.backbones.decoder_only import DECODER_ONLY_MODEL_TYPES

    return checkpoint_model_type(path) in DECODER_ONLY_MODEL_TYPES


# -- files and provenance ----------------------------------------------------------------------
def resolve_model_folder(path: str) -> Path:
    """A local folder for ``path``: the folder itself, or the hub's cached snapshot of a hub
    id (downloaded when online; with ``HF_HUB_OFFLINE=1`` only the cache is used)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local.resolve()
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ExitbenchError(f"model {path!r}: no such folder; give a folder written by "
                             f"save_pretrained or a hub id such as google-t5/t5-small")
    try:
        from huggingface_hub import snapshot_download

        # Only what PyTorch loading needs: hub repos of T5 also carry TF, Flax and ONNX
        # weights several times the size of the PyTorch ones.
        folder = Path(snapshot_download(path, allow_patterns=HUB_FILES))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(path, allow_patterns=[*HUB_FILES, "pytorch_model*.bin"]))
        return folder
    except Exception as exc:  # noqa: BLE001 - re-raised naming the model and the fix
        raise ExitbenchError(f"model {path!r} is not a local folder and could not be fetched "
                             f"from the hub cache ({type(exc).__name__}: {exc}); offline, "
                             f"point the config at a local folder written by save_pretrained"
                             ) from exc


def _hash_files(files: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode("utf-8") + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """SHA-256 over the weight files of a checkpoint folder (names and contents)."""
    folder = Path(folder)
    # Top level only, as from_pretrained reads it (checkpoint subfolders are not the model).
    files = [p for p in folder.glob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
             and p.name != "training_args.bin"]
    if not files:
        raise ExitbenchError(f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}); "
                             f"is it a folder written by save_pretrained?")
    return _hash_files(files, folder)


def tokenizer_sha256(folder: str | Path) -> str:
    """The identity of the tokenizer saved in a checkpoint folder: the SHA-256 of its
    ``spiece.model`` (the same value :mod:`suite.tokenizer` records when it trains one),
    else a SHA-256 over the tokenizer files present."""
    from suite.tokenizer import SPIECE_FILE, spiece_sha256

    folder = Path(folder)
    if (folder / SPIECE_FILE).is_file():
        return spiece_sha256(folder)
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not files:
        raise ExitbenchError(f"{folder} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                             f"save the tokenizer next to the weights with save_pretrained")
    return _hash_files(files, folder)


def load_tokenizer(path: str):
    """The tokenizer saved with a checkpoint (local folder or hub id). SentencePiece (T5)
    folders load through :func:`suite.tokenizer.load_tokenizer`, which checks T5's special
    ids and a round trip against SentencePiece; others through ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    from suite.tokenizer import SPIECE_FILE
    from suite.tokenizer import load_tokenizer as load_sentencepiece_tokenizer

    folder = resolve_model_folder(path)
    tokenizer_sha256(folder)  # fails early, naming the files looked for
    if (folder / SPIECE_FILE).is_file():
        return load_sentencepiece_tokenizer(folder)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ExitbenchError(f"model {path!r}: the tokenizer in {folder} cannot be loaded "
                             f"({exc}); save it again with tokenizer.save_pretrained") from exc
