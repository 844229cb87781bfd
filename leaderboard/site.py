"""Build the static leaderboard site from a run's results.

:func:`build_site` reads a run directory (see :mod:`leaderboard.inputs`), computes fronts and
scores (:mod:`leaderboard.summary`), renders the pages with Jinja2 (autoescaped: every string
from results, manifests and reports is data) and writes the site into a temporary folder
beside ``out_dir`` that is then renamed over it, so a reader never sees half a site.

Pages (all links relative, so the folder can be opened from disk or served anywhere)::

    index.html                 fronts per (task, model, profile), batch selector, rankings
    measures/index.html        every measure; measures/<slug>.html one page each
    profiles/index.html        every profile; profiles/<slug>.html one page each
    provenance.html            run manifest, trace manifests, per-row hashes
    analysis.html              the run's analyses (when it has them): per summary.json of
                               `exitbench analyze`, its figures and tables with captions;
                               other files of analysis/ listed as they are
    data/results.json          the results file the site was built from
    static/style.css, static/site.js
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import numpy as np
from markupsafe import Markup, escape

from leaderboard.describe import (
    describe_measure,
    describe_method,
    describe_profile,
    recorded_measures,
)
from leaderboard.inputs import LeaderboardError, RunInputs, read_run
from leaderboard.plot import PALETTE_SIZE, colour_class, format_rate, method_setting, panel_figure
from suite import __version__
from suite.atomic import temp_dir_beside
from suite.fronts import (
    BASELINE_MEASURE,
    Panel,
    PanelGroup,
    build_panels,
    consistency_notes,
)
from suite.keys import file_stem

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
SITE_MARKER = ".exitbench-site.json"
"""Written into every built site; a folder without it is never replaced."""


# -- escaping and formatting filters -------------------------------------------------------
def script_json(value: Any) -> Markup:
    """JSON safe inside ``<script>``: ``<``, ``>`` and ``&`` become ``\\u00XX`` escapes, so
    neither ``</script>`` nor ``<!--`` can end or change the script element."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return Markup(text)


URL_PATTERN = re.compile(r"https?://[^\s<>\"'()]+[^\s<>\"'().,;:]")


def linkify(text: Any) -> Markup:
    """Escape ``text`` and turn its http(s) URLs (and only those) into links."""
    text = str(text)
    out, last = [], 0
    for match in URL_PATTERN.finditer(text):
        out.append(str(escape(text[last:match.start()])))
        url = match.group(0)
        out.append(f'<a href="{escape(url)}" rel="noopener noreferrer">{escape(url)}</a>')
        last = match.end()
    out.append(str(escape(text[last:])))
    return Markup("".join(out))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt_speedup(value: Any) -> str:
    return f"{value:.2f}×" if _finite(value) else "none"


def fmt_quality(value: Any) -> str:
    return f"{value:.2f}" if _finite(value) else "n/a"


def fmt_area(value: Any) -> str:
    return f"{value:+.2f}" if _finite(value) else "n/a"


def sort_key(value: Any) -> str:
    """``data-sort`` value of a numeric cell ("" sorts last)."""
    return repr(float(value)) if _finite(value) else ""


def fmt_px(value: float) -> str:
    return f"{value:.2f}"


def fmt_threshold(value: Any) -> str:
    return f"{value:g}" if _finite(value) else str(value)


def fmt_count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def short_hash(value: Any) -> str:
    text = str(value)
    return text[:12] if len(text) > 12 else text


BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""Unicode's directional formatting characters: an unclosed one (a right-to-left override)
in a label would reorder the page's own text after it."""


def isolate_bidi(value: Any) -> Any:
    """Jinja's ``finalize``: every string printed that holds a directional formatting
    character is escaped and wrapped in ``<bdi>``, which ends its effect at the string's end
    (the CSS also isolates the elements that hold labels: cells, list items, headings)."""
    if isinstance(value, str) and not isinstance(value, Markup) and BIDI_CONTROLS.search(value):
        return Markup(f"<bdi>{escape(value)}</bdi>")
    return value


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES_DIR)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             finalize=isolate_bidi)
    env.filters.update(script_json=script_json, linkify=linkify, speedup=fmt_speedup,
                       quality=fmt_quality, area=fmt_area, sortkey=sort_key, px=fmt_px,
                       rate=format_rate, threshold=fmt_threshold, count=fmt_count,
                       short=short_hash)
    return env


# -- names to files and anchors ------------------------------------------------------------
RESERVED_SLUGS = frozenset({"index", "static", "data"})
"""Names of the site's own pages and folders, which no measure or profile page may take."""


def _slug(name: str) -> str:
    stem = file_stem(name)  # the suite's one safe-name function
    if stem.lower() in RESERVED_SLUGS:
        return f"{stem}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"
    return stem


def unique_slugs(names: list[str]) -> dict[str, str]:
    """File-safe, unique (also case-insensitively) slugs for ``names``."""
    slugs: dict[str, str] = {}
    taken: set[str] = set()
    for name in sorted(set(names)):
        slug = _slug(name)
        if slug.lower() in taken:
            slug = f"{slug}-{hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]}"
        taken.add(slug.lower())
        slugs[name] = slug
    return slugs


def panel_anchor(group: PanelGroup) -> str:
    key = "\0".join(group.key)
    readable = re.sub(r"[^a-z0-9]+", "-", f"{group.task}-{group.profile}".lower()).strip("-")
    return f"panel-{readable[:40]}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:8]}"


# -- view models ---------------------------------------------------------------------------
@dataclass
class RankingRow:
    measure: str
    href: str
    mode: str
    deployable: bool
    best_speedup: float
    area: float
    fastest_quality: float
    fastest_speedup: float
    points: int
    colour: str
    is_baseline: bool
    # issue 17: intervals, the paired comparison with the row above, latency at the best point
    best_speedup_ci: tuple[float, float] | None = None
    area_ci: tuple[float, float] | None = None
    tie_with_above: bool = False
    tie_title: str = ""
    ttft_p99: float | None = None
    latency_text: str = "n/a"
    over_limits: bool = False
    lossless_speedup: float = math.nan
    mean_accepted_tokens: float | None = None


@dataclass
class PanelView:
    batch_size: int
    hidden: bool
    panel: Panel | None
    figure: Any = None
    ranking: list[RankingRow] = field(default_factory=list)


@dataclass
class GroupView:
    anchor: str
    task: str
    model: str
    model_label: str
    profile: str
    profile_kind: str
    profile_href: str
    metric: str
    views: list[PanelView]


@dataclass
class Site:
    """What :func:`build_site_report` built."""

    index: Path
    pages: list[Path]
    notes: list[str]
    num_rows: int
    num_panels: int


def _ci(interval) -> tuple[float, float] | None:
    if interval is None or not (_finite(interval.low) and _finite(interval.high)):
        return None
    return (interval.low, interval.high)


def _latency_at_best(series) -> tuple[float | None, str, bool]:
    best = next((r for r in series.rows if _finite(series.best_speedup)
                 and r.speedup == series.best_speedup), None)
    if best is None or best.ttft_p99_seconds is None:
        return None, "n/a", False
    tpot = (f"{best.tpot_p99_seconds * 1e3:.3g} ms" if best.tpot_p99_seconds is not None
            else "n/a")
    return (best.ttft_p99_seconds, f"{best.ttft_p99_seconds * 1e3:.3g} ms / {tpot}",
            best.meets_latency_limits is False)


def _ranking(panel: Panel, root: str, measure_slugs: dict[str, str],
             colour_index: dict[str, int], only: set[str] | None = None) -> list[RankingRow]:
    from suite.fronts import ranked

    rows = []
    kept = [s for s in panel.series if only is None or s.measure in only]
    for s, above in ranked(panel, kept):
        ttft, latency_text, over = _latency_at_best(s)
        tie = above is not None and not above.significant and _finite(above.p_value)
        rows.append(RankingRow(
            measure=s.measure, href=f"{root}measures/{measure_slugs[s.measure]}.html",
            mode=s.mode, deployable=s.deployable, best_speedup=s.best_speedup, area=s.area,
            fastest_quality=s.fastest_quality, fastest_speedup=s.fastest_speedup,
            points=len(s.rows), colour=colour_class(s.measure, colour_index),
            is_baseline=s.is_baseline, best_speedup_ci=_ci(s.best_speedup_interval),
            area_ci=_ci(s.area_interval), tie_with_above=tie,
            tie_title=(f"not significantly different from the measure above on "
                       f"{above.statistic}: difference {above.difference:+.3g}, p = "
                       f"{above.p_value:.3f} (paired bootstrap, {above.resamples} resamples)"
                       if tie else ""),
            ttft_p99=ttft, latency_text=latency_text, over_limits=over,
            lossless_speedup=s.lossless_speedup, mean_accepted_tokens=s.mean_accepted_tokens))
    return rows


def _group_views(groups: list[PanelGroup], batch_sizes: list[int], default_batch: int,
                 root: str, measure_slugs: dict[str, str], profile_slugs: dict[str, str],
                 colour_index: dict[str, int], only: str | None = None) -> list[GroupView]:
    views = []
    for group in groups:
        if only is not None and not any(s.measure == only for p in group.panels.values()
                                        for s in p.series):
            continue
        panel_views = []
        for batch_size in batch_sizes:
            panel = group.panels.get(batch_size)
            view = PanelView(batch_size, batch_size != default_batch, panel)
            if panel is not None and (only is None or any(s.measure == only
                                                          for s in panel.series)):
                keep = None if only is None else {only}
                view.figure = panel_figure(panel, colour_index, keep)
                view.ranking = _ranking(panel, root, measure_slugs, colour_index, keep)
            else:
                view.panel = None
            panel_views.append(view)
        first = next(iter(group.panels.values()))
        views.append(GroupView(
            anchor=panel_anchor(group), task=group.task, model=group.model,
            model_label=group.model_label, profile=group.profile,
            profile_kind=group.profile_kind,
            profile_href=f"{root}profiles/{profile_slugs[group.profile]}.html",
            metric=first.metric, views=panel_views))
    return views


def _match_traces(inputs: RunInputs) -> dict[str, str]:
    """traces_hash -> path of the trace manifest it names (file or canonical JSON hash)."""
    found = {}
    for entry in inputs.trace_manifests:
        found[entry.sha256] = entry.path
        if entry.canonical_sha256:
            found.setdefault(entry.canonical_sha256, entry.path)
    return found


# -- the overview ----------------------------------------------------------------------------
@dataclass
class OverviewCell:
    speedup: float
    best: bool
    estimated: bool


@dataclass
class OverviewRow:
    measure: str
    deployable: bool
    cells: list[OverviewCell | None]
    """One per profile (``None``: the measure has no rows there)."""


@dataclass
class OverviewTable:
    task: str
    model: str
    model_label: str
    metric: str
    batch_size: int
    rows: list[OverviewRow]
    winners: list[str]
    """Per profile, the deployable measure(s) with the best speedup there."""


def overview_tables(groups: list[PanelGroup], batch_sizes: list[int],
                    profiles: list[str]) -> list[OverviewTable]:
    """Per (task, model, batch size): each measure's best speedup within 1% quality loss on
    every profile side by side, the best deployable replayed measure of each profile marked."""
    tables = []
    by_key: dict[tuple[str, str], dict[str, PanelGroup]] = defaultdict(dict)
    for group in groups:
        by_key[(group.task, group.model)][group.profile] = group
    for (task, model), per_profile in sorted(by_key.items()):
        for batch_size in batch_sizes:
            panels = {p: g.panels.get(batch_size) for p, g in per_profile.items()}
            if not any(panels.values()):
                continue
            speedups: dict[str, dict[str, tuple[float, bool]]] = defaultdict(dict)
            deployable: dict[str, bool] = {}
            for profile, panel in panels.items():
                if panel is None:
                    continue
                for series in panel.series:
                    if series.mode != "replay":
                        continue
                    estimated = any(isinstance(r.extra, dict) and r.extra.get("cost_estimated")
                                    for r in series.rows)
                    speedups[series.measure][profile] = (series.best_speedup, estimated)
                    deployable[series.measure] = series.deployable
            best: dict[str, float] = {}
            for profile in profiles:
                values = [v[profile][0] for m, v in speedups.items()
                          if profile in v and deployable[m] and _finite(v[profile][0])]
                if values:
                    best[profile] = max(values)
            rows = []
            for measure in sorted(speedups, key=lambda m: (not deployable[m], m)):
                cells: list[OverviewCell | None] = []
                for profile in profiles:
                    value = speedups[measure].get(profile)
                    if value is None:
                        cells.append(None)
                        continue
                    cells.append(OverviewCell(value[0], deployable[measure]
                                              and _finite(value[0]) and profile in best
                                              and value[0] >= best[profile] - 1e-12, value[1]))
                rows.append(OverviewRow(measure, deployable[measure], cells))
            first = next(p for p in panels.values() if p is not None)
            winners = []
            for profile in profiles:
                names = [r.measure for r in rows
                         if r.cells[profiles.index(profile)] and r.cells[profiles.index(profile)].best]
                winners.append(", ".join(names) if names else "none")
            tables.append(OverviewTable(task, model, first.model_label, first.metric,
                                        batch_size, rows, winners))
    return tables


@dataclass
class OverviewWins:
    measure: str
    wins: int
    median: float


def overview_wins(tables: list[OverviewTable]) -> tuple[list[OverviewWins], int]:
    """Per deployable measure: on how many panels it is the best, and its median best
    speedup over the panels where it has one; with the number of panels."""
    wins: dict[str, int] = defaultdict(int)
    values: dict[str, list[float]] = defaultdict(list)
    panels = 0
    for table in tables:
        for column in range(len(table.winners)):
            cells = [(row, row.cells[column]) for row in table.rows if row.cells[column]]
            if not cells:
                continue
            panels += 1
            for row, cell in cells:
                if not row.deployable:
                    continue
                wins[row.measure] += int(cell.best)
                if _finite(cell.speedup):
                    values[row.measure].append(cell.speedup)
    measures = sorted(set(wins) | set(values))
    out = [OverviewWins(m, wins[m], float(np.median(values[m])) if values[m] else math.nan)
           for m in measures]
    return sorted(out, key=lambda w: (-w.wins, -(w.median if _finite(w.median) else -1),
                                      w.measure)), panels


def estimated_profiles(rows) -> list[tuple[str, str]]:
    """(measure, profile) pairs whose check cost is an estimate (no timings in the profile)."""
    return sorted({(r.measure, r.profile) for r in rows
                   if isinstance(r.extra, dict) and r.extra.get("cost_estimated")})


# -- analyses ------------------------------------------------------------------------------
ANALYSIS_TABLE_ROWS = 150
"""Tables with more rows are linked (CSV, JSON), not rendered."""


@dataclass
class CellView:
    text: str
    numeric: bool


@dataclass
class TableView:
    name: str
    caption: str
    columns: list[str]
    rows: list[list[CellView]]
    num_rows: int
    csv_href: str | None
    json_href: str | None
    shown: bool


@dataclass
class FigureView:
    name: str
    caption: str
    img_href: str
    png_href: str | None
    svg_href: str | None


@dataclass
class AnalysisView:
    anchor: str
    task: str
    folder: str
    note: str
    models: list[tuple[str, str]]
    figures: list[FigureView]
    tables: list[TableView]
    extra_links: list[tuple[str, str]]
    """(name, href) of the section's summary.json and README.md."""
    files: set[Path]
    """Files this section shows (the rest of analysis/ is listed as it is)."""


def analysis_cell(value: Any) -> CellView:
    """A table value as text: floats to 4 significant digits, booleans yes/no, null n/a."""
    if value is None:
        return CellView("n/a", False)
    if isinstance(value, bool):
        return CellView("yes" if value else "no", False)
    if isinstance(value, int):
        return CellView(str(value), True)
    if isinstance(value, float):
        return CellView(f"{value:.4g}" if math.isfinite(value) else "n/a", True)
    return CellView(str(value), False)


def _analysis_view(section, hrefs: dict[Path, str]) -> AnalysisView:
    figures, tables, files = [], [], set()
    for fig in section.figures:
        png = hrefs.get(fig.png) if fig.png else None
        svg = hrefs.get(fig.svg) if fig.svg else None
        figures.append(FigureView(fig.name, fig.caption, png or svg or "", png, svg))
        files.update(p for p in (fig.png, fig.svg) if p is not None)
    for table in section.tables:
        columns = list(table.columns)
        rows = table.rows
        if "task" in columns:  # one section is one task: the column says nothing
            index = columns.index("task")
            columns.pop(index)
            rows = [r[:index] + r[index + 1:] for r in rows]
        shown = 0 < len(rows) <= ANALYSIS_TABLE_ROWS
        tables.append(TableView(
            table.name, table.caption, columns,
            [[analysis_cell(v) for v in row] for row in rows] if shown else [], len(rows),
            hrefs.get(table.csv) if table.csv else None,
            hrefs.get(table.json) if table.json else None, shown))
        files.update(p for p in (table.csv, table.json) if p is not None)
    extra_links = []
    for name in ("summary.json", "README.md"):
        path = section.folder / name
        if path in hrefs:
            extra_links.append((name, hrefs[path]))
            files.add(path)
    folder = section.folder.name
    return AnalysisView(anchor="analysis-" + re.sub(r"[^a-z0-9]+", "-", folder.lower()).strip("-")
                        + "-" + hashlib.sha256(str(section.folder).encode()).hexdigest()[:8],
                        task=section.task, folder=folder, note=section.note,
                        models=section.models, figures=figures, tables=tables,
                        extra_links=extra_links, files=files)


# -- writing -------------------------------------------------------------------------------
def _check_out_dir(out_dir: Path, inputs: RunInputs) -> None:
    resolved = out_dir.resolve()
    sources = [inputs.results_path.resolve()] + ([inputs.run_dir.resolve()]
                                                 if inputs.run_dir else [])
    for source in sources:
        if resolved == source or resolved in source.parents:
            raise LeaderboardError(f"--out {out_dir}: would replace the run it is built from "
                                   f"({source}); choose a folder outside it, or a new "
                                   f"subfolder such as {source.parent / 'site'}")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise LeaderboardError(f"--out {out_dir}: is a file; give a folder for the site")
        if any(out_dir.iterdir()) and not (out_dir / SITE_MARKER).is_file():
            raise LeaderboardError(
                f"--out {out_dir}: exists, is not empty and is not a site built by exitbench "
                f"(no {SITE_MARKER}); it is never replaced. Choose a new folder, e.g. "
                f"{out_dir / 'leaderboard'}")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "site")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _Writer:
    def __init__(self, root: Path, env: jinja2.Environment, common: dict[str, Any]):
        self.root = root
        self.env = env
        self.common = common
        self.pages: list[Path] = []

    def page(self, relative: str, template: str, **context: Any) -> None:
        depth = relative.count("/")
        root = "../" * depth
        html = self.env.get_template(template).render(**self.common, root=root, **context)
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html, encoding="utf-8")
        self.pages.append(Path(relative))


def _samples_beside(results_path: Path, notes: list[str]):
    """Per-point statistics from ``samples.parquet`` next to the results file (issue 17),
    for the intervals of the ranking; None (and a note) when it is missing or unreadable."""
    from suite.samples import read_samples, stats_by_point

    path = results_path.parent / "samples.parquet"
    if not path.is_file():
        notes.append("no samples.parquet beside the results: the ranking shows no intervals")
        return None
    try:
        return stats_by_point(read_samples(path, ["task", "model", "measure", "mode",
                                                  "threshold", "example_id", "metric",
                                                  "stats"]))
    except Exception as exc:  # noqa: BLE001 - the site is still built, without intervals
        notes.append(f"{path}: not readable ({exc}); the ranking shows no intervals")
        return None


def build_site_report(results_dir: str | Path, out_dir: str | Path, *,
                      within_latency_limits: bool = False) -> Site:
    """Build the site; returns what was built and the notes on what is missing.
    ``within_latency_limits`` ranks only the points within their profile's latency limits."""
    inputs = read_run(results_dir)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, inputs)
    rows = inputs.rows
    notes = list(inputs.notes) + consistency_notes(rows)
    samples = _samples_beside(inputs.results_path, notes)
    groups = build_panels(rows, samples, within_latency_limits=within_latency_limits)
    if within_latency_limits:
        notes.append("ranking and fronts use only the points within their profile's latency "
                     "limits (built with --within-latency-limits)")
    batch_sizes = sorted({int(r.batch_size) for r in rows})
    default_batch = batch_sizes[0]
    measures = sorted({r.measure for r in rows})
    recorded = recorded_measures(inputs.metadata)
    # measures the run recorded without rows (failed, or left out by validation) get a page too
    page_measures = sorted(set(measures) | set(recorded))
    profiles = sorted({r.profile for r in rows})
    measure_slugs = unique_slugs(page_measures)
    profile_slugs = unique_slugs(profiles)
    colour_index = {m: i for i, m in enumerate(m for m in measures if m != BASELINE_MEASURE)}
    if BASELINE_MEASURE not in measures:
        notes.append(f"no {BASELINE_MEASURE} rows: the area column has no baseline and shows "
                     f"n/a")
    if len(colour_index) > PALETTE_SIZE:
        notes.append(f"{len(colour_index)} measures share {PALETTE_SIZE} colours; hover a point "
                     f"or use the legend's links to tell them apart")

    rows_by_measure: dict[str, list] = defaultdict(list)
    for row in rows:
        rows_by_measure[row.measure].append(row)
    measure_infos = {m: describe_method(m, rows_by_measure[m])
                     if rows_by_measure[m] and rows_by_measure[m][0].method != "early_exit"
                     else describe_measure(m, rows_by_measure[m], inputs.metadata,
                                           inputs.run_manifest) for m in page_measures}
    failed_measures = [(m, measure_infos[m]) for m in page_measures
                       if measure_infos[m].status != "ok" or measure_infos[m].failures]
    for name, info in measure_infos.items():
        if info.problem:
            notes.append(f"measure {name!r}: {info.problem}")
        if name in measures and name not in inputs.validation and inputs.run_dir is not None \
                and not info.method \
                and (inputs.run_dir / "validation").is_dir():
            notes.append(f"measure {name!r}: no validation report in validation/")
    profile_infos = {p: describe_profile(p, inputs.run_manifest) for p in profiles}
    for name, info in profile_infos.items():
        if info.problem:
            notes.append(f"profile {name!r}: {info.problem}")
    traces_index = _match_traces(inputs)
    unmatched = sorted({r.traces_hash for r in rows} - set(traces_index))
    if inputs.trace_manifests and unmatched:
        notes.append(f"{len(unmatched)} traces_hash value(s) of the rows match no trace "
                     f"manifest in traces/ (see the provenance page)")

    models = sorted({(r.model, r.model_label) for r in rows})
    site_data = {"batch_sizes": batch_sizes, "default_batch_size": default_batch,
                 "measures": measures, "schema": 1}
    common = dict(
        version=__version__, results_name=inputs.results_path.name,
        has_analysis=bool(inputs.analysis_files), site_data=site_data, batch_sizes=batch_sizes,
        default_batch=default_batch, models=models,
        measure_slugs=measure_slugs, profile_slugs=profile_slugs, colour_index=colour_index,
        colour_class=colour_class, baseline_measure=BASELINE_MEASURE,
        method_setting=method_setting)

    tmp = temp_dir_beside(out_dir)
    try:
        writer = _Writer(tmp, make_environment(), common)
        shutil.copytree(STATIC_DIR, tmp / "static")
        (tmp / "data").mkdir()
        (tmp / "data" / inputs.results_path.name).write_bytes(inputs.results_bytes)

        legend = [(m, f"measures/{measure_slugs[m]}.html", colour_class(m, colour_index))
                  for m in measures]
        index_groups = _group_views(groups, batch_sizes, default_batch, "", measure_slugs,
                                    profile_slugs, colour_index)
        writer.page("index.html", "index.html", page_title="Fronts and ranking",
                    groups=index_groups, legend=legend, notes=notes,
                    num_rows=len(rows), tasks=sorted({r.task for r in rows}),
                    profiles=profiles, results_path=str(inputs.results_path),
                    failed_measures=failed_measures,
                    estimated=estimated_profiles(rows))
        tables = overview_tables(groups, batch_sizes, profiles)
        wins, num_panels = overview_wins(tables)
        writer.page("overview.html", "overview.html", page_title="Which measure is best",
                    tables=tables, profiles=profiles, wins=wins, num_panels=num_panels,
                    failed_measures=failed_measures)
        measure_cards = []
        for measure in page_measures:
            measure_rows = rows_by_measure[measure]
            hashes = Counter(r.measure_code_hash for r in measure_rows)
            measure_cards.append((measure, measure_infos[measure],
                                  inputs.validation.get(measure), sorted({r.mode for r in
                                                                          measure_rows})))
            writer.page(
                f"measures/{measure_slugs[measure]}.html", "measure.html",
                page_title=f"Measure {measure}", measure=measure,
                info=measure_infos[measure], report=inputs.validation.get(measure),
                validation_dir=bool(inputs.run_dir and (inputs.run_dir / "validation").is_dir()),
                code_hashes=sorted(hashes.items()),
                estimated=sorted({r.profile for r in measure_rows
                                  if isinstance(r.extra, dict) and r.extra.get("cost_estimated")}),
                deployable=all(r.deployable for r in measure_rows)
                if measure_rows else bool(measure_infos[measure].deployable),
                modes=sorted({r.mode for r in measure_rows}),
                colour=colour_class(measure, colour_index),
                groups=_group_views(groups, batch_sizes, default_batch, "../", measure_slugs,
                                    profile_slugs, colour_index, only=measure),
                points=sorted(measure_rows, key=lambda r: (r.task, r.model, r.profile,
                                                           r.batch_size, r.mode, r.threshold)))
        writer.page("measures/index.html", "measures.html", page_title="Measures",
                    cards=measure_cards)
        for profile in profiles:
            used = [g for g in groups if g.profile == profile]
            writer.page(f"profiles/{profile_slugs[profile]}.html", "profile.html",
                        page_title=f"Hardware profile {profile}", profile=profile,
                        info=profile_infos[profile],
                        kinds=sorted({r.profile_kind for r in rows if r.profile == profile}),
                        used=[(g, panel_anchor(g)) for g in used])
        writer.page("profiles/index.html", "profiles.html", page_title="Hardware profiles",
                    infos=[profile_infos[p] for p in profiles])
        hash_groups = Counter((r.task, r.model, r.measure, r.mode, r.traces_hash,
                               r.measure_code_hash) for r in rows)
        writer.page(
            "provenance.html", "provenance.html", page_title="Provenance",
            inputs=inputs, run_manifest_json=(json.dumps(inputs.run_manifest, indent=2,
                                                         sort_keys=True, default=str)
                                              if inputs.run_manifest is not None else None),
            metadata_json=json.dumps(inputs.metadata, indent=2, sort_keys=True, default=str),
            results_sha256=hashlib.sha256(inputs.results_bytes).hexdigest(),
            hash_groups=sorted(hash_groups.items()), traces_index=traces_index,
            installed_hashes={m: i.installed_code_hash for m, i in measure_infos.items()},
            notes=notes)
        if inputs.analysis_files:
            analysis_root = inputs.run_dir / "analysis"  # type: ignore[operator]
            hrefs = {}
            for path in inputs.analysis_files:
                relative = path.relative_to(analysis_root).as_posix()
                target = tmp / "analysis" / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                hrefs[path] = "analysis/" + quote(relative)
            sections = [_analysis_view(section, hrefs) for section in inputs.analysis_sections]
            described = {p for section in sections for p in section.files}
            files = [(path.relative_to(analysis_root).as_posix(), hrefs[path],
                      path.suffix.lower() in (".png", ".svg", ".jpg", ".jpeg"))
                     for path in inputs.analysis_files if path not in described]
            writer.page("analysis.html", "analysis.html", page_title="Analyses", files=files,
                        sections=sections)
        (tmp / SITE_MARKER).write_text(json.dumps({
            "built_by": f"exitbench {__version__}", "results": str(inputs.results_path),
            "results_sha256": hashlib.sha256(inputs.results_bytes).hexdigest()}, indent=2)
            + "\n", encoding="utf-8")
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Site(index=out_dir / "index.html", pages=[out_dir / p for p in writer.pages],
                notes=notes, num_rows=len(rows), num_panels=sum(len(g.panels) for g in groups))


def build_site(results_dir: str | Path, out_dir: str | Path, *,
               within_latency_limits: bool = False) -> Path:
    """Build the leaderboard of the run (or results directory) ``results_dir`` into
    ``out_dir``; returns the path of ``index.html``."""
    return build_site_report(results_dir, out_dir,
                             within_latency_limits=within_latency_limits).index


__all__ = ["Site", "build_site", "build_site_report", "script_json", "linkify"]
