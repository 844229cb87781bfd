"""The record stage: full-depth decoding of a task split into a trace directory.

Work is cut into shards of examples. :func:`record_shard` records one shard and is pure:
it takes a :class:`ShardRequest` (plain fields) and returns a :class:`ShardResult`
(plain arrays), so a Ray worker can run it as is. :func:`record_task` is the sequential
orchestrator: it plans the shards (:func:`plan_record`), skips those already in the
manifest with a matching checksum (a killed run resumes; a corrupted shard is recorded
again), and writes each new shard atomically through :class:`suite.traces.TraceStore`.

Kinds: ``generated`` traces follow the model's own greedy output; ``forced`` traces read
the gold target (``Example.target`` tokenised, truncated to ``max_target_tokens`` with
EOS) in one teacher-forced pass per batch.

Inputs are tokenised without the tokenizer's own template and then given EOS, so that
truncation keeps EOS inside the limit whatever the tokenizer's defaults are (for T5
tokenizers this is the same as ``tokenizer(text, truncation=True, max_length=n)``).
"""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from suite import __version__
from suite.config import ModelConfig, TaskConfig
from suite.decoding import (
    HiddenStates,
    forced_traces,
    pad_batch,
    rematerialise_hidden,
    traced_greedy_decode,
)
from suite.errors import ExitbenchError
from suite.keys import content_key
from suite.models import (
    load_adapter,
    load_tokenizer,
    resolve_model_folder,
    tokenizer_sha256,
    weights_sha256,
)
from suite.prompts import PromptFormat, encode_sources, encode_targets, prompt_format
from suite.tasks import Example, TaskSpec, get_task, load_examples, task_spec
from suite.traces import TraceArrays, TraceManifest, TraceStore, hash_strings, sha256_file

KINDS = ("generated", "forced")
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ShardRequest:
    """Everything one shard depends on, as plain values (picklable, hashable)."""

    model_path: str
    """Hub id or local folder of the checkpoint (tokenizer saved beside the weights)."""
    task: str
    split: str
    data_dir: str | None
    limit: int | None
    """The task split is cut to its first ``limit`` examples before sharding."""
    first_example: int
    end_example: int
    """Examples ``[first_example, end_example)`` of the (limited) split."""
    max_source_tokens: int
    max_target_tokens: int
    max_new_tokens: int
    kind: str
    """``generated`` or ``forced``."""
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    batch_size: int = 8
    chat_template: bool = False
    """Decoder-only models: prompts through the tokenizer's chat template."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ExitbenchError(f"trace kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not 0 <= self.first_example < self.end_example:
            raise ExitbenchError(f"shard range [{self.first_example}, {self.end_example}) is "
                                 f"empty or negative")


@dataclass(frozen=True)
class ShardResult:
    """One recorded shard."""

    first_example: int
    num_examples: int
    traces: TraceArrays
    seconds: float

    @property
    def num_tokens(self) -> int:
        return self.traces.num_tokens


def encode_texts(tokenizer, texts: Sequence[str], max_tokens: int, eos_id: int) -> list[list[int]]:
    """Token ids of each text, cut to ``max_tokens - 1`` and ended with EOS."""
    if max_tokens < 1:
        raise ExitbenchError(f"a token limit of {max_tokens} leaves no room for EOS")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(ids[: max_tokens - 1]) + [eos_id] for ids in encoded]


@functools.lru_cache(maxsize=2)
def _cached_model(model_path: str, device: str, dtype: str):
    """One loaded model per process and setting: shards of a run share it (the adapter of
    the checkpoint's family, :func:`suite.models.load_adapter`)."""
    return load_adapter(model_path, device=device, dtype=dtype), load_tokenizer(model_path)


def adapter_format(adapter, tokenizer, task: TaskSpec, chat_template: bool = False
                   ) -> PromptFormat:
    """The prompt format and stop ids of ``task`` for a loaded adapter."""
    return prompt_format(tokenizer, task, decoder_only=getattr(adapter, "is_decoder_only", False),
                         eos_token_ids=getattr(adapter, "stop_token_ids", None)
                         or (adapter.eos_token_id,), chat_template=chat_template)


@functools.lru_cache(maxsize=8)
def _cached_examples(task: str, split: str, data_dir: str | None,
                     limit: int | None) -> tuple[Example, ...]:
    return tuple(load_examples(get_task(task), split, data_dir, limit))


def record_shard(request: ShardRequest,
                 on_batch: Callable[[int], None] | None = None) -> ShardResult:
    """Record one shard. ``on_batch(n)`` (optional) is told after each batch of ``n``
    examples, for progress bars; it does not affect the result."""
    start = time.perf_counter()
    examples = _cached_examples(request.task, request.split, request.data_dir,
                                request.limit)[request.first_example:request.end_example]
    if len(examples) != request.end_example - request.first_example:
        raise ExitbenchError(f"task {request.task!r} split {request.split!r} has "
                             f"{request.first_example + len(examples)} examples, fewer than "
                             f"the shard's end {request.end_example}")
    adapter, tokenizer = _cached_model(request.model_path, request.device, request.dtype)
    torch.manual_seed(request.seed)  # greedy decoding is deterministic; this is for hygiene
    fmt = adapter_format(adapter, tokenizer, get_task(request.task), request.chat_template)
    sources = encode_sources(tokenizer, examples, fmt, request.max_source_tokens)
    targets = (encode_targets(tokenizer, examples, fmt, request.max_target_tokens)
               if request.kind == "forced" else None)
    parts = []
    for begin in range(0, len(examples), request.batch_size):
        end = min(begin + request.batch_size, len(examples))
        input_ids, attention_mask = pad_batch(sources[begin:end], adapter.pad_token_id)
        ids = [e.id for e in examples[begin:end]]
        if targets is None:
            parts.append(traced_greedy_decode(adapter, input_ids, attention_mask, ids,
                                              request.max_new_tokens, fmt.stop_token_ids))
        else:
            parts.append(forced_traces(adapter, input_ids, attention_mask, ids,
                                       targets[begin:end]))
        if on_batch is not None:
            on_batch(end - begin)
    return ShardResult(first_example=request.first_example, num_examples=len(examples),
                       traces=TraceArrays.concat(parts), seconds=time.perf_counter() - start)


# -- orchestration ----------------------------------------------------------------------------
def git_commit(root: Path = REPO_ROOT) -> str | None:
    """``git rev-parse HEAD`` of the suite's checkout, or ``None`` outside a git checkout."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def _shard_key(manifest: TraceManifest, first: int, end: int, example_ids: Sequence[str]) -> str:
    payload = {"identity": manifest.identity(), "first": first, "end": end,
               "example_ids": hash_strings(list(example_ids))}
    return content_key(payload)


@dataclass(frozen=True)
class RecordPlan:
    """What :func:`record_task` will do for one (task, model, kind)."""

    store: TraceStore
    manifest: TraceManifest
    pending: tuple[tuple[ShardRequest, str], ...]
    """Shards to record, each with its manifest key."""
    skipped: int
    """Shards already recorded with a matching checksum."""
    repaired: tuple[str, ...]
    """Shard files found corrupted (checksum mismatch); they are recorded again."""
    dropped: tuple[str, ...]
    """Shard files from another sharding of the same traces; removed."""


@dataclass(frozen=True)
class RecordSummary:
    """The outcome of :func:`record_task`."""

    trace_dir: str
    task: str
    model: str
    kind: str
    shards_written: int
    shards_skipped: int
    shards_repaired: int
    examples_written: int
    tokens_written: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_written / self.seconds if self.seconds > 0 else 0.0


def plan_record(task_config: TaskConfig, model: ModelConfig, kind: str, trace_dir: str | Path, *,
                data_dir: str | None = None, device: str = "cpu", dtype: str = "float32",
                seed: int = 0, batch_size: int = 8, shard_size: int = 64) -> RecordPlan:
    """Open (or start) the trace directory and list the shards still to record."""
    if kind not in KINDS:
        raise ExitbenchError(f"trace kind {kind!r} is not one of {', '.join(KINDS)}")
    task = task_spec(task_config)
    examples = _cached_examples(task.name, task_config.split, data_dir, task_config.limit)
    example_ids = [e.id for e in examples]
    folder = resolve_model_folder(model.path)
    from suite.models import checkpoint_layers

    num_layers, decoder_only = checkpoint_layers(model.path)
    chat_template = bool(getattr(model, "chat_template", False))
    limits = task.limits
    generation = {"decoding": "greedy", "max_source_tokens": limits.max_source_tokens,
                  "max_target_tokens": limits.max_target_tokens,
                  "max_new_tokens": limits.max_new_tokens}
    if decoder_only:  # T5 manifests (and the keys built on them) stay as they were
        generation.update(family="decoder-only",
                          prompt="chat_template" if chat_template else "plain",
                          stop_strings=list(task.stop_strings))
    manifest = TraceManifest(
        kind=kind, task=task.name, split=task_config.split, model_id=model.path,
        model_hash=weights_sha256(folder), tokenizer_hash=tokenizer_sha256(folder),
        num_layers=num_layers, example_ids_hash=hash_strings(example_ids),
        num_examples=len(examples),
        generation=generation,
        device=device, dtype=dtype, seed=seed, suite_version=__version__,
        git_commit=git_commit(),
        extra={"model_name": model.name, "model_label": model.label, "model_path": model.path,
               "data_dir": data_dir, "limit": task_config.limit, "task_source": task.source,
               "record_batch_size": batch_size, "shard_size": shard_size})
    store = TraceStore(trace_dir)
    manifest = store.open(manifest)

    planned: dict[str, ShardRequest] = {}
    for first in range(0, len(examples), shard_size):
        end = min(first + shard_size, len(examples))
        request = ShardRequest(
            model_path=model.path, task=task.name, split=task_config.split, data_dir=data_dir,
            limit=task_config.limit, first_example=first, end_example=end,
            max_source_tokens=limits.max_source_tokens,
            max_target_tokens=limits.max_target_tokens,
            max_new_tokens=limits.max_new_tokens, kind=kind, device=device, dtype=dtype,
            seed=seed, batch_size=batch_size, chat_template=chat_template)
        planned[_shard_key(manifest, first, end, example_ids[first:end])] = request

    kept, repaired, dropped = [], [], []
    for shard in manifest.shards:
        path = store.root / shard.file
        if shard.key not in planned:
            dropped.append(shard.file)
            path.unlink(missing_ok=True)
        elif sha256_file(path) != shard.sha256:
            repaired.append(shard.file)
        else:
            kept.append(shard)
    if repaired or dropped:
        manifest.shards = kept
        store.write_manifest(manifest)
    done = {s.key for s in kept}
    pending = tuple((request, key) for key, request in planned.items() if key not in done)
    return RecordPlan(store=store, manifest=manifest, pending=pending, skipped=len(done),
                      repaired=tuple(repaired), dropped=tuple(dropped))


def record_task(task_config: TaskConfig, model: ModelConfig, kind: str, trace_dir: str | Path, *,
                data_dir: str | None = None, device: str = "cpu", dtype: str = "float32",
                seed: int = 0, batch_size: int = 8, shard_size: int = 64,
                progress: bool = True) -> RecordSummary:
    """Record a task split's traces for one model and kind into ``trace_dir``, resuming."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    plan = plan_record(task_config, model, kind, trace_dir, data_dir=data_dir, device=device,
                       dtype=dtype, seed=seed, batch_size=batch_size, shard_size=shard_size)
    examples = tokens = 0
    total = sum(r.end_example - r.first_example for r, _ in plan.pending)
    with tqdm(total=total, unit="ex", desc=f"record {task_config.name}/{model.name}/{kind}",
              disable=not progress or total == 0, leave=False) as bar:
        for request, key in plan.pending:
            result = record_shard(request, on_batch=bar.update)
            plan.store.add_shard(plan.manifest, result.traces, key=key,
                                 first_example=result.first_example,
                                 num_examples=result.num_examples)
            examples += result.num_examples
            tokens += result.num_tokens
    return RecordSummary(trace_dir=str(plan.store.root), task=task_config.name, model=model.name,
                         kind=kind, shards_written=len(plan.pending),
                         shards_skipped=plan.skipped, shards_repaired=len(plan.repaired),
                         examples_written=examples, tokens_written=tokens,
                         seconds=time.perf_counter() - start)


def trace_dir_for(output_dir: str | Path, task: str, model: str, kind: str) -> Path:
    """Where ``exitbench record`` writes: ``<output_dir>/traces/<task>/<model>/<kind>/``
    (the evaluated split's traces; :func:`suite.runner.trace_dir`)."""
    from suite.runner import trace_dir

    return trace_dir(output_dir, task, model, kind=kind)


# -- hidden states on demand --------------------------------------------------------------------
def load_hidden_states(trace_dir: str | Path, *, model_path: str | None = None,
                       data_dir: str | None = None, device: str | None = None,
                       dtype: str | None = None, batch_size: int = 8) -> HiddenStates:
    """A trace directory's traces with every layer's hidden state ``[T, L, d_model]``,
    re-materialised by a teacher-forced pass over the recorded tokens (see
    :func:`suite.decoding.rematerialise_hidden`). Model, data and dtype default to those
    in the manifest; the model's weights must still hash as they did when recording."""
    store = TraceStore(trace_dir)
    manifest = store.read_manifest()
    traces = store.load()
    model_path = model_path or manifest.extra.get("model_path") or manifest.model_id
    folder = resolve_model_folder(model_path)
    if weights_sha256(folder) != manifest.model_hash:
        raise ExitbenchError(f"{trace_dir}: the traces were recorded with weights "
                             f"{manifest.model_hash[:12]}..., but {model_path} now holds other "
                             f"weights; pass the recording model, or record again")
    data_dir = data_dir if data_dir is not None else manifest.extra.get("data_dir")
    examples = _cached_examples(manifest.task, manifest.split, data_dir,
                                manifest.extra.get("limit"))
    adapter, tokenizer = _cached_model(model_path, device or "cpu", dtype or manifest.dtype)
    wanted = set(traces.example_ids())
    chosen = [e for e in examples if e.id in wanted]
    fmt = adapter_format(adapter, tokenizer, get_task(manifest.task),
                         manifest.generation.get("prompt") == "chat_template")
    sources = encode_sources(tokenizer, chosen, fmt, manifest.generation["max_source_tokens"])
    return rematerialise_hidden(adapter, traces, {e.id: s for e, s in zip(chosen, sources)},
                                batch_size=batch_size)
