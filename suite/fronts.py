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

from suite.pareto import (
    area_over_baseline,
    best_speedup_replicates,
    best_speedup_within,
    pareto_mask,
)
from suite.results import ResultRow
from suite.uncertainty import (
    BootstrapSettings,
    Interval,
    PairedComparison,
    Resampler,
    paired_bootstrap,
    percentile_interval,
    quality_interval,
    quality_replicates,
)

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
    # -- uncertainty (issue 17; set by build_panels when samples are given) --------------------
    best_speedup_interval: Interval | None = None
    area_interval: Interval | None = None
    quality_replicates: np.ndarray | None = None
    """``[K, B]`` quality of each row (in ``rows`` order) over the shared resamples."""
    best_speedup_replicates: np.ndarray | None = None
    area_replicates: np.ndarray | None = None
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
    full_depth_interval: Interval | None = None
    full_depth_replicates: np.ndarray | None = None
    settings: BootstrapSettings | None = None

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


def build_panels(rows: list[ResultRow], samples: dict | None = None, *,
                 within_latency_limits: bool = False) -> list[PanelGroup]:
    """Group rows into panels, sorted by task, model and profile; series by measure, mode.

    ``samples`` (:func:`suite.samples.stats_by_point`) adds the intervals: every series'
    best speedup and area replicates over the resamples of its (task, model), its rows'
    quality replicates, and the full depth's. ``within_latency_limits`` leaves out the rows
    whose profile's latency limits they break (``meets_latency_limits`` false)."""
    if within_latency_limits:
        rows = [r for r in rows if r.meets_latency_limits is not False]
    by_panel: dict[tuple[str, str, str, int], list[ResultRow]] = defaultdict(list)
    for row in rows:
        by_panel[(row.task, row.model, row.profile, int(row.batch_size))].append(row)
    groups: dict[tuple[str, str, str], PanelGroup] = {}
    replicate_cache: dict = {}
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
        if samples:
            _add_intervals(panel, samples, replicate_cache)
        group = groups.setdefault((task, model, profile), PanelGroup(
            task=task, model=model, model_label=first.model_label, profile=profile,
            profile_kind=first.profile_kind, panels={}))
        group.panels[batch_size] = panel
    return list(groups.values())


# -- intervals and paired comparisons (issue 17) ------------------------------------------------
def _settings_of(rows: list[ResultRow]) -> BootstrapSettings:
    for row in rows:
        if row.bootstrap_resamples:
            return BootstrapSettings(resamples=int(row.bootstrap_resamples),
                                     seed=int(row.bootstrap_seed),
                                     confidence=float(row.confidence_level or 0.95))
    return BootstrapSettings()


def _add_intervals(panel: Panel, samples: dict, cache: dict) -> None:
    """Replicates and intervals of the panel's full depth and of every series with samples."""
    rows = [r for s in panel.series for r in s.rows]
    settings = _settings_of(rows)
    full = samples.get((panel.task, panel.model, "", "full_depth", None))
    if full is None:
        return
    metric = full["metric"]
    resampler_key = (panel.task, panel.model, settings)
    if resampler_key not in cache:
        cache[resampler_key] = Resampler(len(full["example_ids"]), settings)
    resampler = cache[resampler_key]

    def replicates(key):
        if (key, settings) not in cache:
            point = samples.get(key)
            cache[(key, settings)] = (None if point is None or len(point["example_ids"]) !=
                                      resampler.num_examples
                                      else quality_replicates(metric, point["stats"], resampler))
        return cache[(key, settings)]

    panel.settings = settings
    panel.full_depth_replicates = replicates((panel.task, panel.model, "", "full_depth", None))
    panel.full_depth_interval = quality_interval(metric, full["stats"], resampler,
                                                 panel.full_depth_replicates)
    for series in panel.series:
        reps = [replicates((panel.task, panel.model, series.measure, series.mode,
                            float(r.threshold))) for r in series.rows]
        if any(r is None for r in reps):
            continue
        series.quality_replicates = np.stack(reps)
        speedup = np.array([r.speedup for r in series.rows])
        series.best_speedup_replicates = best_speedup_replicates(
            speedup, series.quality_replicates, panel.full_depth_replicates, MAX_RELATIVE_LOSS)
        series.best_speedup_interval = percentile_interval(
            series.best_speedup, series.best_speedup_replicates, settings)
    for series in panel.series:
        baseline = panel.baseline(series.mode)
        if series.quality_replicates is None or baseline is None or \
                baseline.quality_replicates is None:
            continue
        series.area_replicates = area_over_baseline(
            np.array([r.speedup for r in series.rows]), series.quality_replicates,
            np.array([r.speedup for r in baseline.rows]), baseline.quality_replicates)
        series.area_interval = percentile_interval(series.area, series.area_replicates,
                                                   settings)


def ranking_key(series: Series) -> tuple:
    """The ranking's order: best speedup within 1%, then area over the baseline (higher
    first; NaN last), then name and mode."""
    best = series.best_speedup if math.isfinite(series.best_speedup) else -math.inf
    area = series.area if math.isfinite(series.area) else -math.inf
    return (-best, -area, series.measure, series.mode)


def compare_series(a: Series, b: Series, settings: BootstrapSettings
                   ) -> PairedComparison | None:
    """Paired bootstrap of ``a - b`` on the ranking's deciding statistic: best speedup within
    1% when both have one and they differ, else area over the baseline (None without
    replicates)."""
    if a.best_speedup_replicates is not None and b.best_speedup_replicates is not None and \
            math.isfinite(a.best_speedup) and math.isfinite(b.best_speedup) and \
            a.best_speedup != b.best_speedup:
        return paired_bootstrap(a.best_speedup, b.best_speedup, a.best_speedup_replicates,
                                b.best_speedup_replicates, settings,
                                statistic="best_speedup_within_1pct")
    if a.area_replicates is not None and b.area_replicates is not None:
        return paired_bootstrap(a.area, b.area, a.area_replicates, b.area_replicates, settings,
                                statistic="area_over_static_layer")
    return None


def ranked(panel: Panel, series: list[Series] | None = None
           ) -> list[tuple[Series, PairedComparison | None]]:
    """The panel's series in ranking order, each with its paired comparison against the one
    ranked just above it (None for the first, or without samples)."""
    order = sorted(panel.series if series is None else series, key=ranking_key)
    out: list[tuple[Series, PairedComparison | None]] = []
    for index, current in enumerate(order):
        above = order[index - 1] if index else None
        comparison = (compare_series(above, current, panel.settings)
                      if above is not None and panel.settings is not None else None)
        out.append((current, comparison))
    return out


def matched_throughput(panel: Panel, a: Series, b: Series,
                       speedup: float | None = None) -> PairedComparison | None:
    """Is ``a`` better than ``b`` at matched throughput? The best quality each reaches at a
    speedup of at least ``speedup`` (default: ``a``'s best speedup within 1%, else the
    smaller of the two fastest points), compared on the same resampled examples."""
    from suite.pareto import best_quality_at_speedup

    if a.quality_replicates is None or b.quality_replicates is None or panel.settings is None:
        return None
    if speedup is None:
        speedup = a.best_speedup if math.isfinite(a.best_speedup) else \
            min(a.fastest_speedup, b.fastest_speedup)
    at = np.array([speedup])
    sa, sb = (np.array([r.speedup for r in s.rows]) for s in (a, b))
    qa = best_quality_at_speedup(sa, np.array([r.quality for r in a.rows]), at)[0]
    qb = best_quality_at_speedup(sb, np.array([r.quality for r in b.rows]), at)[0]
    ra = best_quality_at_speedup(sa, a.quality_replicates, at)[0]
    rb = best_quality_at_speedup(sb, b.quality_replicates, at)[0]
    if not (np.isfinite(qa) and np.isfinite(qb)):
        return None
    return paired_bootstrap(qa, qb, ra, rb, panel.settings,
                            statistic=f"quality_at_speedup_{speedup:.4g}")


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


def _interval_dict(interval: Interval | None) -> dict | None:
    return None if interval is None else {
        "stderr": _json_float(interval.stderr), "low": _json_float(interval.low),
        "high": _json_float(interval.high), "resamples": interval.resamples,
        "confidence": interval.confidence, "method": interval.method}


def _json_float(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def fronts_summary(rows: list[ResultRow], samples: dict | None = None) -> list[dict]:
    """JSON-ready fronts: per (task, model, profile, batch size) and per (measure, mode), the
    Pareto-optimal points and the summary scores (with their intervals and the paired
    comparison with the measure ranked above, when samples are given); what ``fronts.json``
    holds."""
    out = []
    for group in build_panels(rows, samples):
        for batch_size, panel in sorted(group.panels.items()):
            comparisons = {id(s): c for s, c in ranked(panel)}
            for series in panel.series:
                comparison = comparisons.get(id(series))
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
                               "speedup": r.speedup, "quality": r.quality,
                               "quality_ci": [r.quality_ci_low, r.quality_ci_high]}
                              for r in series.front_rows()],
                    "best_speedup_within_1pct_interval": _interval_dict(
                        series.best_speedup_interval),
                    "area_over_static_layer_interval": _interval_dict(series.area_interval),
                    "full_depth_quality_interval": _interval_dict(panel.full_depth_interval),
                    "vs_ranked_above": comparison.to_dict() if comparison else None})
    return out
