"""Traces: per-token, per-layer records of full-depth decoding, and their store.

One row per generated (or teacher-forced) token. Per-layer fields are
``[tokens, layers]`` arrays; layer ``l`` is the output of decoder layer ``l``
(0-based), so a model with ``L`` decoder layers has ``L`` columns.

Per layer (``LAYER_FIELDS``):
  ``top1_id`` (int32), ``top1_prob``, ``top2_prob`` (float32): the exit head's
  prediction at that layer; ``cos_prev`` (float32): cosine similarity of the
  layer's hidden state with the previous layer's (for layer 0, with the decoder
  input embedding); ``cos_last`` (float32): cosine with the last layer's hidden
  state (for analyses); ``final_prob`` (float32): the probability that layer's exit
  head gives to the last layer's prediction (``top1_id[:, -1]``), for the monotonicity
  analyses. Hidden states are compared before the final norm, except
  that HF's last entry is already normed: we compare un-normed states throughout.
Per layer, optional in the arrays, always recorded (``OPTIONAL_LAYER_FIELDS``, format 3):
  ``cos_prev_normed``, ``cos_last_normed`` (float32): the same cosines between the states
  after the decoder's final norm (the norm the exit head applies, with its weight), as the
  study's saturation analysis compares them (its ``decoder_hidden_states`` are
  final-normed); for layer 0 the previous state is the normed input embedding.
Per token (``TOKEN_FIELDS``):
  ``example_id`` (string), ``position`` (int32, 0-based decoding step),
  ``final_id`` (int32, the full-depth token), ``gold_id`` (int32, the reference
  token in reference-forced traces, -1 in generated ones).
Optional per token (``OPTIONAL_TOKEN_FIELDS``):
  ``exit_layer`` (int32): the layer an online early-exit decoder exited at for that
  token (:mod:`suite.online`); absent from full-depth traces.

Shards are Arrow IPC files (uncompressed, memory-mapped on load) with per-layer
fields as fixed-size lists, so loading is a reshape, not a loop. A manifest
(``manifest.json``) ties the shards to the model, tokenizer, data and settings
and holds each shard's SHA-256; loading verifies every shard against it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from suite.atomic import atomic_write, atomic_write_json
from suite.errors import ExitbenchError

TRACE_FORMAT_VERSION = 3
LAYER_FIELDS: dict[str, type] = {"top1_id": np.int32, "top1_prob": np.float32,
                                 "top2_prob": np.float32, "cos_prev": np.float32,
                                 "cos_last": np.float32, "final_prob": np.float32}
TOKEN_FIELDS: dict[str, type] = {"position": np.int32, "final_id": np.int32, "gold_id": np.int32}
OPTIONAL_TOKEN_FIELDS: dict[str, type] = {"exit_layer": np.int32}
OPTIONAL_LAYER_FIELDS: dict[str, type] = {"cos_prev_normed": np.float32,
                                          "cos_last_normed": np.float32}
"""Per-layer fields that recording always writes (format 3) but arrays built elsewhere may
lack (``None``)."""
LOOK_AHEAD_TOKEN_FIELDS: tuple[str, ...] = ("final_id", "gold_id")
"""Per-token fields not known while decoding: the last layer's top-1, the reference."""
LOOK_AHEAD_LAYER_FIELDS: tuple[str, ...] = ("cos_last", "final_prob", "cos_last_normed")
"""Per-layer fields that depend on the last layer at every layer (its hidden state, its
prediction): measures that read them look ahead, like the oracle."""


class TraceIntegrityError(ExitbenchError):
    """A shard that is missing, truncated or does not match its checksum."""


@dataclass
class TraceArrays:
    """Traces of many tokens, as arrays. Rows are tokens in (example, position) order."""

    example_id: np.ndarray
    """``[T]`` object array of example ids."""
    position: np.ndarray
    final_id: np.ndarray
    gold_id: np.ndarray
    top1_id: np.ndarray
    top1_prob: np.ndarray
    top2_prob: np.ndarray
    cos_prev: np.ndarray
    cos_last: np.ndarray
    final_prob: np.ndarray
    cos_prev_normed: np.ndarray | None = None
    """Optional ``[T, L]`` ``cos_prev`` between final-normed states (recorded traces have it)."""
    cos_last_normed: np.ndarray | None = None
    """Optional ``[T, L]`` ``cos_last`` between final-normed states (recorded traces have it)."""
    exit_layer: np.ndarray | None = None
    """Optional ``[T]`` exit layer of each token, in traces of online early-exit decoding."""
    hidden: np.ndarray | None = None
    """Optional ``[T, L, d_model]`` hidden states (re-materialised on demand, never stored)."""

    @property
    def num_tokens(self) -> int:
        return int(self.top1_id.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.top1_id.shape[1])

    def cosines(self, which: str, normed: bool) -> np.ndarray:
        """``cos_prev`` / ``cos_last`` (``which``: ``prev`` or ``last``) between un-normed or,
        with ``normed``, final-normed states; a clear error when the traces lack them."""
        name = f"cos_{which}" + ("_normed" if normed else "")
        value = getattr(self, name)
        if value is None:
            raise ExitbenchError(f"these traces have no {name} (traces recorded before trace "
                                 f"format 3, or built without it); record them again")
        return value

    def example_ids(self) -> list[str]:
        """Distinct example ids in row order."""
        if self.num_tokens == 0:
            return []
        starts = np.flatnonzero(np.r_[True, self.example_id[1:] != self.example_id[:-1]])
        return [str(x) for x in self.example_id[starts]]

    def example_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Row ranges ``[start, end)`` of each example, in row order."""
        if self.num_tokens == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        starts = np.flatnonzero(np.r_[True, self.example_id[1:] != self.example_id[:-1]])
        ends = np.r_[starts[1:], self.num_tokens]
        return starts, ends

    def take(self, rows: np.ndarray) -> TraceArrays:
        """A row subset (index array or boolean mask)."""
        values = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[rows])
                  for f in dataclasses.fields(self)}
        return TraceArrays(**values)

    def validate(self) -> None:
        n, layers = self.top1_id.shape
        for name in (*LAYER_FIELDS, *OPTIONAL_LAYER_FIELDS):
            if getattr(self, name) is not None and getattr(self, name).shape != (n, layers):
                raise ValueError(f"trace field {name} has shape {getattr(self, name).shape}, "
                                 f"expected {(n, layers)}")
        for name in ("example_id", *TOKEN_FIELDS, *OPTIONAL_TOKEN_FIELDS):
            if getattr(self, name) is not None and getattr(self, name).shape != (n,):
                raise ValueError(f"trace field {name} has shape {getattr(self, name).shape}")

    @staticmethod
    def concat(parts: list[TraceArrays]) -> TraceArrays:
        if not parts:
            raise ValueError("no traces to concatenate")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(TraceArrays):
            arrays = [getattr(p, f.name) for p in parts]
            values[f.name] = None if any(a is None for a in arrays) else np.concatenate(arrays)
        return TraceArrays(**values)


# -- shards -------------------------------------------------------------------------------
def to_table(traces: TraceArrays) -> pa.Table:
    traces.validate()
    layers = traces.num_layers
    columns: dict[str, pa.Array] = {
        "example_id": pa.array(traces.example_id.astype(str), type=pa.string()).dictionary_encode(),
    }
    for name, dtype in TOKEN_FIELDS.items():
        columns[name] = pa.array(np.ascontiguousarray(getattr(traces, name), dtype=dtype))
    for name, dtype in OPTIONAL_TOKEN_FIELDS.items():
        if getattr(traces, name) is not None:
            columns[name] = pa.array(np.ascontiguousarray(getattr(traces, name), dtype=dtype))
    for name, dtype in (*LAYER_FIELDS.items(), *OPTIONAL_LAYER_FIELDS.items()):
        if getattr(traces, name) is None:
            continue
        flat = pa.array(np.ascontiguousarray(getattr(traces, name), dtype=dtype).reshape(-1))
        columns[name] = pa.FixedSizeListArray.from_arrays(flat, layers)
    table = pa.table(columns)
    return table.replace_schema_metadata({"exitbench_trace_format": str(TRACE_FORMAT_VERSION),
                                          "num_layers": str(layers)})


def from_table(table: pa.Table) -> TraceArrays:
    layers = int(table.schema.metadata[b"num_layers"])
    n = table.num_rows
    values: dict[str, Any] = {}
    example_id = table.column("example_id").combine_chunks()
    if pa.types.is_dictionary(example_id.type):
        dictionary = np.asarray(example_id.dictionary.to_pylist(), dtype=object)
        values["example_id"] = dictionary[example_id.indices.to_numpy(zero_copy_only=False)]
    else:
        values["example_id"] = np.asarray(example_id.to_pylist(), dtype=object)
    for name, dtype in TOKEN_FIELDS.items():
        values[name] = table.column(name).combine_chunks().to_numpy().astype(dtype, copy=False)
    for name, dtype in OPTIONAL_TOKEN_FIELDS.items():
        if name in table.column_names:
            values[name] = table.column(name).combine_chunks().to_numpy().astype(dtype,
                                                                                 copy=False)
    for name, dtype in (*LAYER_FIELDS.items(), *OPTIONAL_LAYER_FIELDS.items()):
        if name not in table.column_names:
            continue
        flat = table.column(name).combine_chunks().flatten().to_numpy()
        values[name] = flat.astype(dtype, copy=False).reshape(n, layers)
    return TraceArrays(**values)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(path: str | Path, traces: TraceArrays) -> str:
    """Write one shard atomically; return its SHA-256."""
    table = to_table(traces)

    def write(fh):
        with pa.ipc.new_file(fh, table.schema) as writer:
            writer.write_table(table)

    atomic_write(path, write)
    return sha256_file(path)


def read_shard(path: str | Path, expected_sha256: str | None = None) -> TraceArrays:
    """Read one shard, verifying its checksum when given; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise TraceIntegrityError(f"trace shard {path} is missing; rerun the record stage to "
                                  f"rewrite it")
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise TraceIntegrityError(
                f"trace shard {path.name} is corrupted: SHA-256 {actual[:12]}... does not match "
                f"the manifest's {expected_sha256[:12]}... ({path}); delete it and rerun the "
                f"record stage, which rewrites only the missing shards")
    try:
        with pa.memory_map(str(path), "r") as source:
            table = pa.ipc.open_file(source).read_all()
        return from_table(table)
    except (pa.ArrowInvalid, KeyError, ValueError) as exc:
        raise TraceIntegrityError(f"trace shard {path.name} cannot be read ({exc}); delete it "
                                  f"and rerun the record stage") from exc


# -- manifest and store -------------------------------------------------------------------
@dataclass
class ShardInfo:
    """One shard in the manifest."""

    file: str
    key: str
    """Hash of what the shard depends on (model, tokenizer, examples, settings)."""
    sha256: str
    num_examples: int
    num_tokens: int
    first_example: int
    """Index of the shard's first example in the task split."""


@dataclass
class TraceManifest:
    """What a trace directory holds and what it was made from."""

    kind: str
    """``generated`` (the model's own greedy output) or ``forced`` (teacher-forced gold target)."""
    task: str
    split: str
    model_id: str
    model_hash: str
    tokenizer_hash: str
    num_layers: int
    example_ids_hash: str
    num_examples: int
    generation: dict[str, Any]
    device: str
    dtype: str
    seed: int
    suite_version: str
    git_commit: str | None
    format_version: int = TRACE_FORMAT_VERSION
    shards: list[ShardInfo] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TraceManifest:
        data = dict(data)
        shards = [ShardInfo(**s) for s in data.pop("shards", [])]
        return TraceManifest(shards=shards, **data)

    def identity(self) -> dict[str, Any]:
        """The fields that must agree for two runs to share a trace directory."""
        return {k: getattr(self, k) for k in ("kind", "task", "split", "model_hash",
                                               "tokenizer_hash", "example_ids_hash",
                                               "generation", "dtype", "format_version")}


class TraceStore:
    """A trace directory: ``manifest.json`` plus ``shard-<first>-<end>.arrow`` files."""

    MANIFEST = "manifest.json"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def manifest_path(self) -> Path:
        return self.root / self.MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def read_manifest(self) -> TraceManifest:
        if not self.exists():
            raise ExitbenchError(f"no traces at {self.root} (no {self.MANIFEST}); record them "
                                 f"first with `exitbench record --config ...`")
        try:
            return TraceManifest.from_dict(json.loads(self.manifest_path.read_text("utf-8")))
        except (json.JSONDecodeError, TypeError) as exc:
            raise TraceIntegrityError(f"{self.manifest_path} is not a valid trace manifest "
                                      f"({exc})") from exc

    def open(self, manifest: TraceManifest) -> TraceManifest:
        """Start or continue a trace directory for ``manifest``'s identity. Shards already
        recorded for the same identity are kept (so a killed run resumes) with the
        provenance of the recording that started the directory (suite version, git commit):
        reopening a complete directory rewrites nothing, so its manifest's hash -- which
        result rows and stored parts are keyed by -- stays put. A directory recorded with
        other settings is an error, not silently overwritten."""
        if self.exists():
            old = self.read_manifest()
            if old.identity() != manifest.identity():
                differ = [k for k, v in manifest.identity().items() if old.identity()[k] != v]
                raise ExitbenchError(
                    f"{self.root} holds traces recorded with other settings ({', '.join(differ)} "
                    f"differ); choose another output_dir or delete that folder")
            kept = [s for s in old.shards if (self.root / s.file).is_file()]
            if len(kept) == len(old.shards):
                return old
            manifest = dataclasses.replace(old, shards=kept)
        self.write_manifest(manifest)
        return manifest

    def write_manifest(self, manifest: TraceManifest) -> None:
        manifest.shards.sort(key=lambda s: s.first_example)
        atomic_write_json(self.manifest_path, manifest.to_dict())

    def completed_keys(self, manifest: TraceManifest) -> set[str]:
        return {s.key for s in manifest.shards}

    def add_shard(self, manifest: TraceManifest, traces: TraceArrays, key: str,
                  first_example: int, num_examples: int) -> ShardInfo:
        """Write a shard, then record it in the manifest (both atomically)."""
        name = f"shard-{first_example:06d}-{first_example + num_examples:06d}.arrow"
        digest = write_shard(self.root / name, traces)
        info = ShardInfo(file=name, key=key, sha256=digest, num_examples=num_examples,
                         num_tokens=traces.num_tokens, first_example=first_example)
        manifest.shards = [s for s in manifest.shards if s.file != name] + [info]
        self.write_manifest(manifest)
        return info

    def load(self, verify: bool = True) -> TraceArrays:
        """All shards, concatenated in example order, verified against the manifest."""
        manifest = self.read_manifest()
        if not manifest.shards:
            raise ExitbenchError(f"{self.root}: the manifest lists no shards; the record stage "
                                 f"has not finished any")
        parts = [read_shard(self.root / s.file, s.sha256 if verify else None)
                 for s in manifest.shards]
        for shard, part in zip(manifest.shards, parts):
            if part.num_tokens != shard.num_tokens:
                raise TraceIntegrityError(f"trace shard {shard.file} has {part.num_tokens} "
                                          f"tokens, the manifest says {shard.num_tokens}")
        return TraceArrays.concat(parts)

    def verify(self) -> list[str]:
        """Problems found, one line per shard (empty when all is well)."""
        problems = []
        for shard in self.read_manifest().shards:
            try:
                read_shard(self.root / shard.file, shard.sha256)
            except TraceIntegrityError as exc:
                problems.append(str(exc))
        return problems


def hash_strings(values: list[str]) -> str:
    digest = hashlib.sha256()
    for value in values:
        digest.update(value.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
