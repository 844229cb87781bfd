"""The run's results in the conventions users already parse (issue 17).

Beside ``results/results.{parquet,json}`` (one row per point) the results stage writes:

- ``results/samples.parquet``: every point's per-example samples (:mod:`suite.samples`),
  merged from the parts each measure's replay stored
  (``results/parts/<task>/<model>/samples/<measure>.parquet`` and
  ``full_depth.samples.parquet``);
- ``results/aggregated.json``: one summary per run in the lm-evaluation-harness's layout
  (``results`` keyed by evaluation with ``metric,filter`` keys and a ``metric_stderr,filter``
  beside each metric; ``configs``, ``versions``, ``config``, ``git_hash``, ``date``,
  ``total_evaluation_time_seconds``, ``n-samples``, ``higher_is_better``), where an
  evaluation is one (task, model, measure, mode) and the filter is the panel
  ``<profile>@batch<b>``; plus the bootstrap settings and the paired comparisons of each
  ranking. ``docs/results.md`` documents both files; ``docs/schemas/aggregated.schema.json``
  is the JSON Schema a test checks written files against.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from suite.atomic import atomic_write_json
from suite.keys import file_stem
from suite.samples import read_samples, stats_by_point, to_table, write_samples

AGGREGATED_SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "schemas" / \
    "aggregated.schema.json"


def full_depth_samples_path(part_path: Path) -> Path:
    return part_path.parent / "full_depth.samples.parquet"


def write_samples_part(part_path: Path, measure: str, samples: dict[str, dict]) -> None:
    """Store one measure's samples (and the full depth's) beside its part file."""
    from suite.runner import samples_part_path

    if measure in samples:
        write_samples(samples_part_path(part_path, measure), [to_table(samples[measure])])
    if "" in samples:
        write_samples(full_depth_samples_path(part_path), [to_table(samples[""])])


def _panel_filter(profile: str, batch_size: int) -> str:
    return f"{profile}@batch{batch_size}"


def _number(value: Any) -> float | None:
    import math

    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def aggregate(rows: list, samples: dict | None, *, config: dict | None = None,
              task_configs: dict | None = None, versions: dict | None = None,
              git_hash: str | None = None, total_seconds: float | None = None) -> dict:
    """The aggregated JSON document of ``rows`` (see the module docstring)."""
    from suite.fronts import build_panels, matched_throughput, ranked

    results: dict[str, dict[str, Any]] = {}
    comparisons: list[dict[str, Any]] = []
    n_samples: dict[str, dict[str, int]] = {}
    bootstrap: dict[str, Any] | None = None
    for group in build_panels(rows, samples):
        for batch_size, panel in sorted(group.panels.items()):
            where = _panel_filter(panel.profile, batch_size)
            n_samples[panel.task] = {"original": int(panel.series[0].rows[0].num_examples),
                                     "effective": int(panel.series[0].rows[0].num_examples)}
            if panel.settings is not None:
                bootstrap = {"resamples": panel.settings.resamples, "seed": panel.settings.seed,
                             "confidence": panel.settings.confidence}
            order = ranked(panel)
            for rank, (series, above) in enumerate(order, 1):
                key = f"{panel.task}/{panel.model}/{series.measure}/{series.mode}"
                entry = results.setdefault(key, {
                    "alias": f"{panel.task} · {panel.model} · {series.measure} ({series.mode})",
                    "task": panel.task, "model": panel.model,
                    "model_label": panel.model_label, "measure": series.measure,
                    "mode": series.mode, "deployable": series.deployable,
                    "metric": panel.metric})
                metric = panel.metric
                entry[f"{metric}_full_depth,{where}"] = _number(panel.full_depth_quality)
                if panel.full_depth_interval is not None:
                    entry[f"{metric}_full_depth_stderr,{where}"] = _number(
                        panel.full_depth_interval.stderr)
                for name, value, interval in (
                        ("best_speedup_within_1pct", series.best_speedup,
                         series.best_speedup_interval),
                        ("area_over_static_layer", series.area, series.area_interval)):
                    entry[f"{name},{where}"] = _number(value)
                    entry[f"{name}_stderr,{where}"] = _number(interval.stderr) if interval \
                        else None
                    entry[f"{name}_ci_low,{where}"] = _number(interval.low) if interval else None
                    entry[f"{name}_ci_high,{where}"] = _number(interval.high) if interval \
                        else None
                entry[f"rank,{where}"] = rank
                best = _best_row(series)
                if best is not None:
                    entry[f"{metric}_at_best,{where}"] = _number(best.quality)
                    entry[f"{metric}_at_best_stderr,{where}"] = _number(best.quality_stderr)
                    for q in ("ttft_p99_seconds", "tpot_p99_seconds"):
                        entry[f"{q}_at_best,{where}"] = _number(getattr(best, q))
                if above is not None:
                    above_series = order[rank - 2][0]
                    matched = matched_throughput(panel, above_series, series)
                    comparisons.append({
                        "task": panel.task, "model": panel.model, "profile": panel.profile,
                        "batch_size": batch_size, "mode": series.mode,
                        "a": above_series.measure, "b": series.measure, "rank_of_b": rank,
                        "ranking_statistic": above.to_dict(),
                        "matched_throughput": matched.to_dict() if matched else None})
    return {
        "schema_version": AGGREGATED_SCHEMA_VERSION,
        "format": "exitbench aggregated results (lm-evaluation-harness layout)",
        "results": results,
        "comparisons": comparisons,
        "bootstrap": bootstrap,
        "configs": task_configs or {},
        "versions": versions or {},
        "config": config or {},
        "n-samples": n_samples,
        "higher_is_better": {"quality": True, "best_speedup_within_1pct": True,
                             "area_over_static_layer": True, "ttft_p99_seconds": False,
                             "tpot_p99_seconds": False},
        "git_hash": git_hash,
        "date": time.time(),
        "total_evaluation_time_seconds": total_seconds,
    }


def _best_row(series):
    """The row behind a series' best speedup within 1% (None when it has none)."""
    import math

    if not math.isfinite(series.best_speedup):
        return None
    for row in series.rows:
        if row.speedup == series.best_speedup:
            return row
    return None


def publish_aggregated(config, rows: list, results_dir: Path) -> dict | None:
    """Merge the samples parts into ``samples.parquet`` and write ``aggregated.json``;
    returns the samples by point (for the fronts), or None when no part has samples."""
    from suite.record import git_commit
    from suite.runner import _part_path, samples_part_path, stored_part, versions

    tables, seen_full, total = [], set(), 0.0
    for task in config.tasks:
        for model in config.models:
            for measure in config.measures:
                stored = stored_part(config, task, model, measure)
                if stored is None or "rows" not in stored:  # failed, or stale
                    continue
                part = _part_path(config.output_dir, task.name, model.name,
                                  measure.display_name)
                total += float(stored.get("report", {}).get("seconds", 0.0))
                path = samples_part_path(part, measure.display_name)
                if path.is_file():
                    tables.append(read_samples(path))
                full = full_depth_samples_path(part)
                if full.is_file() and full.parent not in seen_full:
                    seen_full.add(full.parent)
                    tables.append(read_samples(full))
    samples = None
    if tables:
        path = write_samples(results_dir / "samples.parquet", tables)
        samples = stats_by_point(read_samples(path))
    from suite.tasks import task_spec

    task_configs = {}
    for task in config.tasks:
        try:
            spec = task_spec(task)
            task_configs[task.name] = {"split": task.split, "metric": spec.metric,
                                       "limit": task.limit,
                                       "limits": dict(vars(spec.limits))}
        except Exception:  # noqa: BLE001 - an unknown task is reported elsewhere
            task_configs[task.name] = {"split": task.split}
    document = aggregate(rows, samples, config=config.model_dump(mode="json"),
                         task_configs=task_configs, versions=versions(), git_hash=git_commit(),
                         total_seconds=total)
    atomic_write_json(results_dir / "aggregated.json", document)
    return samples


__all__ = ["aggregate", "publish_aggregated", "write_samples_part", "file_stem"]
