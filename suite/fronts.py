"""Pareto fronts and summary scores of result rows, grouped as readers compare them.

A *panel* is one (task, model, hardware profile, batch size): the points of every measure
there, its full-depth point, and per (measure, mode) a *series* with its Pareto front
(:func:`suite.pareto.pareto_mask` over tokens/s and quality) and the ranking scores
(:func:`suite.pareto.best_speedup_within`, :func:`suite.pareto.area_over_baseline` against the
``static_layer`` series of the same panel).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from suite.pareto import area_over_baseline, best_speedup_within, pareto_mask
from suite.results import ResultRow

BASELINE_MEASURE = "static_layer"
MAX_RELATIVE_LOSS = 0.01
"""Quality loss allowed for the "best speedup" column: 1% of full depth, relative."""


@dataclass
class Series:
    """One measure in one mode on one panel, its rows sorted by tokens/s."""

    measure: str
    mode: str
    deployable: bool
    rows: list[ResultRow]
    front: np.ndarray
    """Boolean mask over ``rows``: the Pareto-optimal points."""
    full_depth_quality: float
    best_speedup: float
    """Highest speedup within 1% relative quality of full depth (NaN when none is)."""
    area: float
    """Area over the static-layer front (NaN without a baseline on the panel)."""
    fastest_quality: float
    fastest_speedup: float
    lossless_speedup: float = math.nan
    """Highest speedup at no quality loss against full depth (NaN when none is); lossless
    methods (self-speculation) have all their points there."""
    mean_accepted_tokens: float | None = None
    """Self-speculation: tokens per cycle at the point of ``lossless_speedup`` (``None``
    for exit measures)."""

    @property
    def is_baseline(self) -> bool:
        return self.measure == BASELINE_MEASURE

    def front_rows(self) -> list[ResultRow]:
        return [row for row, on in zip(self.rows, self.front) if on]


@dataclass
class Panel:
    """One (task, model, profile, batch size)."""

    task: str
    model: str
    model_label: str
    profile: str
    profile_kind: str
    batch_size: int
    metric: str
    num_layers: int
    full_depth_quality: float
    full_depth_tokens_per_s: float
    series: list[Series] = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return sum(len(s.rows) for s in self.series)

    def baseline(self, mode: str = "replay") -> Series | None:
        for candidate in (mode, "replay"):
            for series in self.series:
                if series.is_baseline and series.mode == candidate:
                    return series
        return None


@dataclass
class PanelGroup:
    """The panels of one (task, model, profile), one per batch size."""

    task: str
    model: str
    model_label: str
    profile: str
    profile_kind: str
    panels: dict[int, Panel]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.task, self.model, self.profile)


def _median(values: list[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64))) if values else math.nan


def _series(measure: str, mode: str, rows: list[ResultRow]) -> Series:
    rows = sorted(rows, key=lambda r: (r.tokens_per_s, r.quality, r.threshold))
    speed = np.array([r.tokens_per_s for r in rows], dtype=np.float64)
    quality = np.array([r.quality for r in rows], dtype=np.float64)
    speedup = np.array([r.speedup for r in rows], dtype=np.float64)
    full_depth_quality = _median([r.quality_full_depth for r in rows])
    fastest = int(np.argmax(speed))
    lossless = best_speedup_within(speedup, quality, full_depth_quality, 0.0)
    at_lossless = [r for r in rows if r.speedup == lossless and r.mean_accepted_tokens is not None]
    return Series(
        measure=measure, mode=mode, deployable=all(r.deployable for r in rows), rows=rows,
        front=pareto_mask(speed, quality), full_depth_quality=full_depth_quality,
        best_speedup=best_speedup_within(speedup, quality, full_depth_quality, MAX_RELATIVE_LOSS),
        area=math.nan, fastest_quality=float(quality[fastest]),
        fastest_speedup=float(speedup[fastest]), lossless_speedup=lossless,
        mean_accepted_tokens=float(at_lossless[0].mean_accepted_tokens) if at_lossless else None)


def _score_against_baseline(panel: Panel) -> None:
    for series in panel.series:
        baseline = panel.baseline(series.mode)
        if baseline is None:
            continue
        series.area = area_over_baseline(
            np.array([r.speedup for r in series.rows]), np.array([r.quality for r in series.rows]),
            np.array([r.speedup for r in baseline.rows]),
            np.array([r.quality for r in baseline.rows]))


def build_panels(rows: list[ResultRow]) -> list[PanelGroup]:
    """Group rows into panels, sorted by task, model and profile; series by measure, mode."""
    by_panel: dict[tuple[str, str, str, int], list[ResultRow]] = defaultdict(list)
    for row in rows:
        by_panel[(row.task, row.model, row.profile, int(row.batch_size))].append(row)
    groups: dict[tuple[str, str, str], PanelGroup] = {}
    for (task, model, profile, batch_size), panel_rows in sorted(by_panel.items()):
        first = panel_rows[0]
        # the full-depth point: replay rows price it from the same traces; online rows measure it
        reference = [r for r in panel_rows if r.mode == "replay"] or panel_rows
        panel = Panel(task=task, model=model, model_label=first.model_label, profile=profile,
                      profile_kind=first.profile_kind, batch_size=batch_size, metric=first.metric,
                      num_layers=int(first.num_layers),
                      full_depth_quality=_median([r.quality_full_depth for r in reference]),
                      full_depth_tokens_per_s=_median([r.full_depth_tokens_per_s
                                                       for r in reference]))
        by_series: dict[tuple[str, str], list[ResultRow]] = defaultdict(list)
        for row in panel_rows:
            by_series[(row.measure, row.mode)].append(row)
        panel.series = [_series(measure, mode, series_rows)
                        for (measure, mode), series_rows in sorted(by_series.items())]
        _score_against_baseline(panel)
        group = groups.setdefault((task, model, profile), PanelGroup(
            task=task, model=model, model_label=first.model_label, profile=profile,
            profile_kind=first.profile_kind, panels={}))
        group.panels[batch_size] = panel
    return list(groups.values())


def consistency_notes(rows: list[ResultRow]) -> list[str]:
    """Warnings about rows that disagree where they should not."""
    notes = []
    labels: dict[str, set[str]] = defaultdict(set)
    code_hashes: dict[str, set[str]] = defaultdict(set)
    full_depth: dict[tuple, set[float]] = defaultdict(set)
    for row in rows:
        labels[row.model].add(row.model_label)
        code_hashes[row.measure].add(row.measure_code_hash)
        if row.mode == "replay":
            full_depth[(row.task, row.model, row.profile, row.batch_size)].add(
                round(float(row.full_depth_tokens_per_s), 6))
    for model, values in sorted(labels.items()):
        if len(values) > 1:
            notes.append(f"model {model!r} carries {len(values)} different labels")
    for measure, values in sorted(code_hashes.items()):
        if len(values) > 1:
            notes.append(f"measure {measure!r}: rows come from {len(values)} versions of its code "
                         f"(different measure_code_hash values)")
    for key, values in sorted(full_depth.items()):
        if len(values) > 1:
            notes.append(f"{key[0]} / {key[1]} / {key[2]} / batch {key[3]}: replay rows disagree "
                         f"on full-depth tokens/s; the median is shown")
    return notes


def fronts_summary(rows: list[ResultRow]) -> list[dict]:
    """JSON-ready fronts: per (task, model, profile, batch size) and per (measure, mode), the
    Pareto-optimal points and the summary scores; what ``fronts.json`` holds."""
    out = []
    for group in build_panels(rows):
        for batch_size, panel in sorted(group.panels.items()):
            for series in panel.series:
                out.append({
                    "task": panel.task, "model": panel.model, "profile": panel.profile,
                    "batch_size": batch_size, "measure": series.measure, "mode": series.mode,
                    "deployable": series.deployable, "metric": panel.metric,
                    "full_depth_quality": panel.full_depth_quality,
                    "full_depth_tokens_per_s": panel.full_depth_tokens_per_s,
                    "best_speedup_within_1pct": series.best_speedup,
                    "area_over_static_layer": series.area,
                    "quality_at_fastest": series.fastest_quality,
                    "speedup_at_fastest": series.fastest_speedup,
                    "speedup_at_no_loss": series.lossless_speedup,
                    "mean_accepted_tokens": series.mean_accepted_tokens,
                    "front": [{"threshold": r.threshold, "tokens_per_s": r.tokens_per_s,
                               "speedup": r.speedup, "quality": r.quality}
                              for r in series.front_rows()]})
    return out
