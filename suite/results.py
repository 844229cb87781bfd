"""Result rows: one per (task, model, measure, threshold, profile, batch size).

The leaderboard is built from results files alone, so every row carries what a
reader needs to trust it: the mode (``replay`` numbers are predicted from
traces, ``online`` ones are measured by real early-exit decoding), the hashes of
the traces and of the measure's code, and the model's label (for example that
it is a tiny T5 trained by the suite, not a published checkpoint).

Files: ``results.parquet`` and ``results.json`` (the same rows; JSON for humans
and the static site), written atomically, plus ``fronts.json`` (Pareto fronts
and summary scores).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from suite.atomic import atomic_write_bytes

RESULT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ResultRow:
    """One point of a quality-vs-throughput sweep."""

    task: str
    model: str
    model_label: str
    """Who made the backbone and on what (``tiny T5 trained by exitbench on ...``)."""
    measure: str
    measure_options: str
    """JSON of the measure's constructor options (``{}`` for defaults)."""
    deployable: bool
    """False for upper bounds such as the oracle."""
    threshold: float
    min_layer: int
    profile: str
    profile_kind: str
    """``simulated`` or ``measured``."""
    batch_size: int
    mode: Literal["replay", "online"]
    metric: str
    """Name of the primary quality metric (``f1``, ``bleu``, ``rougeL``)."""
    quality: float
    """Value of the primary metric, in percent."""
    quality_full_depth: float
    """The same metric for full-depth decoding of the same traces."""
    scores: dict[str, float]
    """Every metric of the task, in percent."""
    mean_layers_used: float
    """Mean decoder layers run per token (1-based)."""
    num_layers: int
    token_agreement: float
    """Share of tokens equal to the full-depth token."""
    exit_histogram: list[float]
    """Share of tokens exiting at each layer."""
    tokens_per_s: float
    full_depth_tokens_per_s: float
    speedup: float
    """``tokens_per_s / full_depth_tokens_per_s`` on the same profile and batch size."""
    num_examples: int
    num_tokens: int
    traces_hash: str
    """SHA-256 of the trace manifest the row was computed from."""
    measure_code_hash: str
    """SHA-256 of the measure's source file."""
    split: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # -- uncertainty (issue 17; rows written before it load with these defaults) --------------
    quality_stderr: float | None = None
    """Bootstrap standard error of ``quality`` (resampling examples)."""
    quality_ci_low: float | None = None
    quality_ci_high: float | None = None
    """Confidence interval of ``quality`` at ``confidence_level``, by the metric library's own
    bootstrap rule (``interval_method``)."""
    confidence_level: float | None = None
    bootstrap_resamples: int = 0
    """Resamples behind the interval (0: none computed)."""
    bootstrap_seed: int = 0
    interval_method: str = ""
    # -- per-request latency (seconds; None where unknown) -------------------------------------
    ttft_p50_seconds: float | None = None
    """Time to first token (prefill + first step) over the requests, 50th percentile."""
    ttft_p90_seconds: float | None = None
    ttft_p99_seconds: float | None = None
    tpot_p50_seconds: float | None = None
    """Time per output token after the first, 50th percentile over the requests."""
    tpot_p90_seconds: float | None = None
    tpot_p99_seconds: float | None = None
    meets_latency_limits: bool | None = None
    """Within the profile's ``latency_limits`` (``None``: the profile declares none)."""
    method: str = "early_exit"
    """The decoding method: ``early_exit`` (a measure and a threshold) or
    ``self_speculative`` (lossless drafting from an early exit; :mod:`suite.speculative.method`)."""
    method_options: str = "{}"
    """JSON of the method's options (``{}`` for early exit, whose options are the measure's;
    self-speculation: ``draft_depth``, ``draft_length`` and the stopping rule's
    ``stop_measure`` and ``stop_threshold``)."""
    mean_accepted_tokens: float | None = None
    """Self-speculation: tokens emitted per draft-and-verify cycle (Spec-Bench's figure);
    ``None`` for early exit."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float, ``None`` when it is missing or not finite (JSON has no NaN)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def rows_to_frame(rows: list[ResultRow]) -> pd.DataFrame:
    records = [row.to_dict() for row in rows]
    frame = pd.DataFrame.from_records(records)
    for column in ("scores", "extra"):
        if column in frame:
            frame[column] = frame[column].map(lambda v: json.dumps(v, sort_keys=True))
    return frame


def write_results(directory: str | Path, rows: list[ResultRow],
                  metadata: dict[str, Any] | None = None) -> bool:
    """Write ``results.parquet`` and ``results.json`` atomically; returns False (and writes
    nothing) when ``results.json`` already holds exactly these rows and metadata, so a rerun
    that changed nothing leaves the results files as they were."""
    directory = Path(directory)
    text = json.dumps({"schema_version": RESULT_SCHEMA_VERSION, "metadata": metadata or {},
                       "rows": [row.to_dict() for row in rows]},
                      indent=2, sort_keys=True, default=str) + "\n"
    current = directory / "results.json"
    if current.is_file() and (directory / "results.parquet").is_file() \
            and current.read_bytes() == text.encode("utf-8"):
        return False
    frame = rows_to_frame(rows)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(directory / "results.parquet", buffer.getvalue())
    atomic_write_bytes(current, text.encode("utf-8"))
    return True


def read_results(path: str | Path) -> list[ResultRow]:
    """Rows from a ``results.json`` file or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    data = json.loads(path.read_text("utf-8"))
    if data.get("schema_version") != RESULT_SCHEMA_VERSION:
        raise ValueError(f"{path}: results schema {data.get('schema_version')} is not "
                         f"{RESULT_SCHEMA_VERSION}")
    names = {f.name for f in dataclasses.fields(ResultRow)}
    return [ResultRow(**{k: v for k, v in row.items() if k in names}) for row in data["rows"]]
