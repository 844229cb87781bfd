"""What a leaderboard is built from: a run directory (or a bare results directory), read once.

Layout of a run directory (other stages write it; everything but the results is optional)::

    <run>/results/results.json | results.parquet   result rows (suite.results)
    <run>/run_manifest.json                          config, versions, every shard's hash
    <run>/traces/<task>/<model>/<generated|forced>/manifest.json   trace manifests
    <run>/validation/<measure>.json                  validation reports
    <run>/analysis/<task>/                           `exitbench analyze`: figures, tables and a
                                                     summary.json listing them with captions

Nothing here trusts the strings it reads: they are data, escaped when rendered. What is
missing or unreadable becomes a note that the site and the CLI show.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.errors import ExitbenchError
from suite.results import RESULT_SCHEMA_VERSION, ResultRow
from suite.traces import TraceManifest

ANALYSIS_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".pdf", ".json", ".csv", ".txt", ".md")
"""Files of ``<run>/analysis/`` copied into the site (images are shown with ``<img>``, so an
SVG's scripts never run)."""


class LeaderboardError(ExitbenchError):
    """A results directory, site folder or port the leaderboard cannot use."""


@dataclass(frozen=True)
class TraceManifestEntry:
    """One ``manifest.json`` under ``<run>/traces``."""

    path: str
    """Relative to the run directory, with ``/`` separators."""
    sha256: str
    """SHA-256 of the file's bytes."""
    canonical_sha256: str
    """SHA-256 of its JSON re-serialised with sorted keys and no spaces (matches a
    ``traces_hash`` computed from the parsed manifest rather than the file)."""
    manifest: TraceManifest | None
    raw: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class ValidationCheck:
    name: str
    passed: bool
    message: str
    status: str = ""
    """``PASS``, ``FAIL`` or ``SKIP`` as the validator wrote it."""


@dataclass(frozen=True)
class ValidationReport:
    """A ``<run>/validation/*.json`` report; ``measure`` comes from the file's content."""

    measure: str
    passed: bool
    checks: list[ValidationCheck]
    path: str
    raw: dict[str, Any]


@dataclass(frozen=True)
class AnalysisFigure:
    name: str
    caption: str
    png: Path | None
    svg: Path | None


@dataclass(frozen=True)
class AnalysisTable:
    name: str
    caption: str
    columns: list[str]
    rows: list[list[Any]]
    csv: Path | None
    json: Path | None


@dataclass(frozen=True)
class AnalysisSection:
    """One ``<run>/analysis/<...>/summary.json`` written by ``exitbench analyze``, with the
    figures and tables it lists (only files that exist inside that folder)."""

    folder: Path
    task: str
    note: str
    models: list[tuple[str, str]]
    """(model, label) of the backbones analysed."""
    figures: list[AnalysisFigure]
    tables: list[AnalysisTable]


@dataclass
class RunInputs:
    """Everything the site shows, as read from disk."""

    results_path: Path
    results_bytes: bytes
    """The results file as read (copied into the site for download)."""
    run_dir: Path | None
    rows: list[ResultRow]
    metadata: dict[str, Any]
    run_manifest: dict[str, Any] | None = None
    run_manifest_sha256: str | None = None
    trace_manifests: list[TraceManifestEntry] = field(default_factory=list)
    validation: dict[str, ValidationReport] = field(default_factory=dict)
    analysis_files: list[Path] = field(default_factory=list)
    analysis_sections: list[AnalysisSection] = field(default_factory=list)
    """The analyses described by ``summary.json`` files (their files are in
    ``analysis_files`` too)."""
    notes: list[str] = field(default_factory=list)
    """What is missing or could not be read, one sentence each."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical_sha256(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return sha256_bytes(text.encode("utf-8"))


def locate_results(path: str | Path) -> tuple[Path, Path | None]:
    """(results file, run directory or None) for a run directory, a results directory or a
    results file."""
    path = Path(path)
    if not path.exists():
        raise LeaderboardError(f"--results {path}: no such file or directory; point it at a run "
                               f"directory (holding results/results.json) or a results "
                               f"directory (holding results.json)")
    candidates: list[tuple[Path, Path | None]] = []
    if path.is_file():
        candidates.append((path, path.parent.parent if path.parent.name == "results" else None))
    else:
        for name in ("results.json", "results.parquet"):
            candidates.append((path / "results" / name, path))
        for name in ("results.json", "results.parquet"):
            candidates.append((path / name, path.parent if path.name == "results" else None))
    for results_file, run_dir in candidates:
        if results_file.is_file():
            return results_file, run_dir
    raise LeaderboardError(
        f"--results {path}: holds neither results/results.json nor results.json (nor their "
        f".parquet twins); run the suite first (`exitbench run --config ...`) or point "
        f"--results at the run directory it wrote")


def _rows_from_json(path: Path, data: bytes) -> tuple[list[ResultRow], dict[str, Any]]:
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LeaderboardError(f"{path}: not valid JSON ({exc}); rerun the stage that wrote it "
                               f"(`exitbench run` resumes)") from exc
    if not isinstance(payload, dict) or not isinstance(payload.get("rows"), list):
        raise LeaderboardError(f"{path}: no 'rows' list; this is not a results file written by "
                               f"suite.results.write_results")
    if payload.get("schema_version") != RESULT_SCHEMA_VERSION:
        raise LeaderboardError(f"{path}: results schema {payload.get('schema_version')!r}, this "
                               f"exitbench reads schema {RESULT_SCHEMA_VERSION}; rebuild the "
                               f"results with this version or use the matching exitbench")
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    return [_row(path, i, record) for i, record in enumerate(payload["rows"])], metadata


def _rows_from_parquet(path: Path) -> tuple[list[ResultRow], dict[str, Any]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise LeaderboardError(f"{path}: cannot be read as Parquet ({exc}); rerun the stage "
                               f"that wrote it") from exc
    records = []
    for record in frame.to_dict(orient="records"):
        for column in ("scores", "extra"):
            if isinstance(record.get(column), str):
                record[column] = json.loads(record[column])
        if "exit_histogram" in record and not isinstance(record["exit_histogram"], list):
            record["exit_histogram"] = [float(v) for v in record["exit_histogram"]]
        records.append(record)
    return [_row(path, i, record) for i, record in enumerate(records)], {}


def _row(path: Path, index: int, record: Any) -> ResultRow:
    names = {f.name for f in dataclasses.fields(ResultRow)}
    if not isinstance(record, dict):
        raise LeaderboardError(f"{path}: rows[{index}] is not an object")
    try:
        row = ResultRow(**{k: v for k, v in record.items() if k in names})
    except TypeError as exc:
        raise LeaderboardError(f"{path}: rows[{index}] does not match the ResultRow schema "
                               f"({exc}); rebuild the results with this exitbench") from exc
    for name in ("quality", "tokens_per_s", "speedup", "threshold", "batch_size"):
        value = getattr(row, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LeaderboardError(f"{path}: rows[{index}].{name} is {value!r}, not a number")
    return row


def _read_json(path: Path) -> tuple[Any, bytes]:
    data = path.read_bytes()
    return json.loads(data.decode("utf-8")), data


def _read_trace_manifests(run_dir: Path, notes: list[str]) -> list[TraceManifestEntry]:
    entries = []
    traces_dir = run_dir / "traces"
    if not traces_dir.is_dir():
        notes.append("traces/: not in this run, so the rows' traces_hash values cannot be "
                     "matched to a trace manifest")
        return entries
    for path in sorted(traces_dir.rglob("manifest.json")):
        relative = path.relative_to(run_dir).as_posix()
        data = path.read_bytes()
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            notes.append(f"{relative}: not valid JSON ({exc})")
            entries.append(TraceManifestEntry(relative, sha256_bytes(data), "", None, None,
                                              f"not valid JSON: {exc}"))
            continue
        manifest, error = None, None
        try:
            manifest = TraceManifest.from_dict(raw)
        except (TypeError, ValueError, AttributeError) as exc:
            error = f"does not match the TraceManifest schema: {exc}"
            notes.append(f"{relative}: {error}")
        entries.append(TraceManifestEntry(relative, sha256_bytes(data), _canonical_sha256(raw),
                                          manifest, raw if isinstance(raw, dict) else None,
                                          error))
    if not entries:
        notes.append("traces/: holds no manifest.json, so the rows' traces_hash values cannot "
                     "be matched to a trace manifest")
    return entries


def _read_validation(run_dir: Path, notes: list[str]) -> dict[str, ValidationReport]:
    reports: dict[str, ValidationReport] = {}
    folder = run_dir / "validation"
    if not folder.is_dir():
        notes.append("validation/: not in this run; every measure shows as not validated "
                     "(`exitbench submit` writes the reports)")
        return reports
    for path in sorted(folder.glob("*.json")):
        relative = path.relative_to(run_dir).as_posix()
        try:
            raw, _ = _read_json(path)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            notes.append(f"{relative}: not valid JSON ({exc}); skipped")
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("measure"), str) \
                or not isinstance(raw.get("passed"), bool):
            notes.append(f"{relative}: not a validation report (needs 'measure' and a boolean "
                         f"'passed'); skipped")
            continue
        checks = []
        for item in raw.get("checks") or []:
            if not isinstance(item, dict):
                continue
            # the validator's form (suite.validate.CheckResult): check, status, message
            status = str(item.get("status", "")).upper()
            if status not in ("PASS", "FAIL", "SKIP"):
                status = "PASS" if item.get("passed") is True else "FAIL"
            checks.append(ValidationCheck(str(item.get("check", item.get("name", ""))),
                                          status != "FAIL", str(item.get("message", "")),
                                          status))
        reports[raw["measure"]] = ValidationReport(raw["measure"], raw["passed"], checks,
                                                   relative, raw)
    return reports


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _listed_file(folder: Path, name: Any, files: set[Path]) -> Path | None:
    """``folder / name`` when ``name`` is a plain file name among the analysis files (a
    summary cannot point outside its folder)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name \
            or name in (".", ".."):
        return None
    path = folder / name
    return path if path in files else None


def _read_analysis_sections(run_dir: Path, files: list[Path],
                            notes: list[str]) -> list[AnalysisSection]:
    available = set(files)
    sections = []
    for path in sorted(p for p in files if p.name == "summary.json"):
        relative = path.relative_to(run_dir).as_posix()
        try:
            raw, _ = _read_json(path)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            notes.append(f"{relative}: not valid JSON ({exc}); its files are listed as they are")
            continue
        if not isinstance(raw, dict) or not isinstance(raw.get("figures"), list) \
                or not isinstance(raw.get("tables"), list):
            notes.append(f"{relative}: not an analysis summary (needs 'figures' and 'tables' "
                         f"lists); its files are listed as they are")
            continue
        folder = path.parent
        figures = []
        for item in raw["figures"]:
            if not isinstance(item, dict):
                continue
            png = _listed_file(folder, item.get("png"), available)
            svg = _listed_file(folder, item.get("svg"), available)
            if png is None and svg is None:
                notes.append(f"{relative}: figure {_text(item.get('name'))!r} has no file in "
                             f"{folder.relative_to(run_dir).as_posix()}/; skipped")
                continue
            figures.append(AnalysisFigure(_text(item.get("name")), _text(item.get("caption")),
                                          png, svg))
        tables = []
        for item in raw["tables"]:
            if not isinstance(item, dict):
                continue
            csv_path = _listed_file(folder, item.get("csv"), available)
            json_path = _listed_file(folder, item.get("json"), available)
            columns: list[str] = []
            rows: list[list[Any]] = []
            if json_path is not None:
                try:
                    data, _ = _read_json(json_path)
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    notes.append(f"{json_path.relative_to(run_dir).as_posix()}: not valid JSON "
                                 f"({exc}); table not shown")
                    data = None
                if isinstance(data, dict) and isinstance(data.get("columns"), list) \
                        and isinstance(data.get("rows"), list):
                    columns = [str(c) for c in data["columns"]]
                    rows = [[r.get(c) for c in columns] for r in data["rows"]
                            if isinstance(r, dict)]
            if csv_path is None and json_path is None:
                continue
            tables.append(AnalysisTable(_text(item.get("name")), _text(item.get("caption")),
                                        columns, rows, csv_path, json_path))
        models: list[tuple[str, str]] = []
        listed = raw.get("models")
        if isinstance(listed, dict):
            models = [(str(k), _text(v) or "no label") for k, v in listed.items()]
        elif isinstance(listed, list):
            models = [(str(m.get("name")), _text(m.get("label")) or "no label")
                      for m in listed if isinstance(m, dict)]
        sections.append(AnalysisSection(
            folder=folder, task=_text(raw.get("task")) or folder.name,
            note=_text(raw.get("note")), models=models,
            figures=figures, tables=tables))
    return sections


def read_run(path: str | Path) -> RunInputs:
    """Read a run directory, a results directory or a results file."""
    results_path, run_dir = locate_results(path)
    results_bytes = results_path.read_bytes()
    if results_path.suffix == ".parquet":
        rows, metadata = _rows_from_parquet(results_path)
    else:
        rows, metadata = _rows_from_json(results_path, results_bytes)
    if not rows:
        raise LeaderboardError(f"{results_path}: holds no result rows; there is nothing to "
                               f"rank. Check that the run finished (`exitbench run` resumes)")
    inputs = RunInputs(results_path=results_path, results_bytes=results_bytes, run_dir=run_dir,
                       rows=rows, metadata=metadata)
    notes = inputs.notes
    if run_dir is None:
        notes.append(f"{results_path.parent}: a bare results directory, not a run directory; "
                     f"run manifest, trace manifests, validation reports and analyses are not "
                     f"shown")
        return inputs
    manifest_path = run_dir / "run_manifest.json"
    if manifest_path.is_file():
        try:
            raw, data = _read_json(manifest_path)
            inputs.run_manifest = raw if isinstance(raw, dict) else {"value": raw}
            inputs.run_manifest_sha256 = sha256_bytes(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            notes.append(f"run_manifest.json: not valid JSON ({exc}); not shown")
    else:
        notes.append("run_manifest.json: not in this run, so the run's config, versions and "
                     "shard hashes cannot be shown")
    inputs.trace_manifests = _read_trace_manifests(run_dir, notes)
    inputs.validation = _read_validation(run_dir, notes)
    analysis = run_dir / "analysis"
    if analysis.is_dir():
        inputs.analysis_files = sorted(
            p for p in analysis.rglob("*")
            if p.is_file() and p.suffix.lower() in ANALYSIS_SUFFIXES and not p.name.startswith("."))
        if not inputs.analysis_files:
            notes.append("analysis/: present but holds no figures or tables yet")
        inputs.analysis_sections = _read_analysis_sections(run_dir, inputs.analysis_files,
                                                           notes)
    else:
        notes.append("analysis/: not in this run (`exitbench analyze --config ...` writes the "
                     "monotonicity and saturation analyses)")
    return inputs
