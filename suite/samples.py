"""Per-point samples: what every example produced at every point, so a reader can audit any
number (the lm-evaluation-harness keeps a ``samples_<task>.jsonl`` beside its results; here one
Parquet file per run, ``results/samples.parquet``).

One row per (task, model, measure, mode, threshold, example): the example's prediction and
references, the exit layer of every token of its replayed trajectory in compact form (one
byte per token), and its per-example metric statistics (:data:`suite.uncertainty.STAT_NAMES`),
from which every interval and paired comparison is recomputed. The full-depth output of each
(task, model) is stored once, as ``mode = "full_depth"`` with an empty measure and a null
threshold. Samples do not depend on the hardware profile or batch size: those only price
the points.

The schema is :data:`SAMPLE_COLUMNS` (documented in ``docs/results.md``; a test checks the
two agree and that written files follow them).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from suite.atomic import atomic_write_bytes
from suite.errors import ExitbenchError

SAMPLES_SCHEMA_VERSION = 1
FULL_DEPTH_MODE = "full_depth"
MAX_LAYERS = 256
"""Exit layers are stored one unsigned byte per token."""

SAMPLE_COLUMNS: tuple[tuple[str, pa.DataType, str], ...] = (
    ("task", pa.string(), "task name"),
    ("model", pa.string(), "model name (as in the result rows)"),
    ("measure", pa.string(), "measure display name; empty for the full-depth output"),
    ("mode", pa.string(), "`replay`, `online`, or `full_depth`"),
    ("threshold", pa.float64(), "the measure's threshold; null for full depth"),
    ("min_layer", pa.int32(), "first layer allowed to exit (0-based)"),
    ("example_id", pa.string(), "the task example's id"),
    ("prediction", pa.string(), "the output text (cut at the first EOS, detokenised)"),
    ("references", pa.list_(pa.string()), "the example's reference texts"),
    ("output_tokens", pa.int32(), "tokens of the output before its first EOS"),
    ("exit_layers", pa.binary(), "exit layer (0-based) of each token of the trajectory, one "
                                 "unsigned byte per token, in position order"),
    ("metric", pa.string(), "the task metric (`squad`, `bleu`, `rouge`)"),
    ("stats", pa.list_(pa.float64()), "per-example metric statistics; names in `stat_names`"),
    ("stat_names", pa.list_(pa.string()), "names of `stats` (same for every row of a metric)"),
    ("score", pa.float64(), "the example's primary-metric value (SQuAD F1, ROUGE-L); null for "
                            "BLEU, which is a corpus statistic"),
)

SAMPLES_SCHEMA = pa.schema([pa.field(name, kind) for name, kind, _ in SAMPLE_COLUMNS])


def encode_exit_layers(layers: np.ndarray) -> bytes:
    layers = np.asarray(layers)
    if layers.size and (layers.min() < 0 or layers.max() >= MAX_LAYERS):
        raise ExitbenchError(f"exit layers must lie in 0..{MAX_LAYERS - 1} to be stored in "
                             f"the samples file, got {layers.min()}..{layers.max()}")
    return layers.astype(np.uint8).tobytes()


def decode_exit_layers(data: bytes) -> np.ndarray:
    """The per-token exit layers of one sample (``exit_layers`` column) as an int array."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def sample_records(*, task: str, model: str, measure: str, mode: str, threshold: float | None,
                   min_layer: int, example_ids: Sequence[str], predictions: Sequence[str],
                   references: Sequence[Sequence[str]], output_tokens: Sequence[int],
                   exit_layers: Sequence[np.ndarray], metric: str, stats: np.ndarray,
                   ) -> dict[str, list]:
    """Columns of one point's samples (one entry per example)."""
    from suite.uncertainty import PRIMARY, STAT_NAMES

    names = list(STAT_NAMES[metric])
    stats = np.asarray(stats, np.float64)
    score = [None] * len(example_ids) if metric == "bleu" else \
        [float(v) for v in stats[:, names.index(PRIMARY[metric])]]
    count = len(example_ids)
    return {
        "task": [task] * count, "model": [model] * count, "measure": [measure] * count,
        "mode": [mode] * count,
        "threshold": [None if threshold is None else float(threshold)] * count,
        "min_layer": [int(min_layer)] * count, "example_id": [str(i) for i in example_ids],
        "prediction": list(predictions), "references": [list(r) for r in references],
        "output_tokens": [int(n) for n in output_tokens],
        "exit_layers": [encode_exit_layers(e) for e in exit_layers],
        "metric": [metric] * count, "stats": stats.tolist(), "stat_names": [names] * count,
        "score": score}


def to_table(records: dict[str, list]) -> pa.Table:
    return pa.Table.from_pydict({name: records.get(name, []) for name, _, _ in SAMPLE_COLUMNS},
                                schema=SAMPLES_SCHEMA)


def write_samples(path: str | Path, tables: Sequence[pa.Table]) -> Path:
    """Write ``tables`` (each :data:`SAMPLES_SCHEMA`) as one Parquet file, atomically."""
    path = Path(path)
    table = pa.concat_tables(list(tables)) if tables else SAMPLES_SCHEMA.empty_table()
    table = table.replace_schema_metadata({"exitbench.samples": json.dumps(
        {"schema_version": SAMPLES_SCHEMA_VERSION})})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_samples(path: str | Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A samples file (all columns, or ``columns``); checks its schema version."""
    path = Path(path)
    metadata = pq.read_schema(path).metadata or {}
    version = json.loads(metadata.get(b"exitbench.samples", b"{}")).get("schema_version")
    if version != SAMPLES_SCHEMA_VERSION:
        raise ExitbenchError(f"{path}: samples schema {version} is not "
                             f"{SAMPLES_SCHEMA_VERSION}; rerun the replay stage to rewrite it")
    return pq.read_table(path, columns=list(columns) if columns else None)


def stats_by_point(table: pa.Table) -> dict[tuple[str, str, str, str, Any], dict[str, Any]]:
    """``(task, model, measure, mode, threshold) -> {"example_ids", "stats" [E, S], "metric"}``
    with examples in one order per (task, model) (the full-depth point's)."""
    columns = table.select(["task", "model", "measure", "mode", "threshold", "example_id",
                            "metric", "stats"]).to_pydict()
    groups: dict[tuple, dict[str, Any]] = {}
    for n in range(len(columns["task"])):
        threshold = columns["threshold"][n]
        key = (columns["task"][n], columns["model"][n], columns["measure"][n],
               columns["mode"][n], None if threshold is None else float(threshold))
        group = groups.setdefault(key, {"example_ids": [], "stats": [],
                                        "metric": columns["metric"][n]})
        group["example_ids"].append(columns["example_id"][n])
        group["stats"].append(columns["stats"][n])
    orders: dict[tuple[str, str], dict[str, int]] = {}
    for key, group in groups.items():
        if key[3] == FULL_DEPTH_MODE:
            orders[(key[0], key[1])] = {i: n for n, i in enumerate(group["example_ids"])}
    out = {}
    for key, group in groups.items():
        order = orders.get((key[0], key[1]))
        stats = np.asarray(group["stats"], np.float64)
        if order is not None and set(group["example_ids"]) == set(order):
            index = np.array([order[i] for i in group["example_ids"]])
            aligned = np.empty_like(stats)
            aligned[index] = stats
            stats = aligned
            ids = sorted(order, key=order.get)
        elif order is not None:
            continue  # another set of examples (e.g. an online run over a slice): not paired
        else:
            ids = group["example_ids"]
        out[key] = {"example_ids": ids, "stats": stats, "metric": group["metric"]}
    return out
