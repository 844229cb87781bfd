"""What the site says about measures and hardware profiles beyond the result rows: the
measure's description, declared cost, status (failures with their reasons) and submission
(from the run's own record in the results' metadata; a built-in measure missing from it is
looked up in the registry -- a measure that is not built in is never imported here), and a
profile's specs with their sources or its measured tables (from a snapshot in the run
manifest, else the profile registry). A name that is not installed here is reported, never
an error: the leaderboard is built from results files alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from suite.results import ResultRow

REFERENCE_DIMS: dict[str, int] = {"d_model": 512, "d_ff": 2048, "num_heads": 8, "d_kv": 64,
                                  "vocab_size": 32128}
"""T5-small's sizes: the declared cost is shown for them when the run recorded none."""
DIM_FIELDS = ("num_layers", "d_model", "d_ff", "num_heads", "d_kv", "vocab_size")


@dataclass
class DeclaredCost:
    model: str
    dims: dict[str, int]
    dims_source: str
    flops: float
    bytes: float
    needs_lm_head: bool
    checked_layers: list[int]
    """0-based layers at which a check is made and paid for."""


@dataclass
class MeasureFailure:
    task: str | None
    model: str | None
    reason: str


@dataclass
class MeasureInfo:
    name: str
    registered: bool
    source: str | None = None
    """``builtin``, ``plugin:<dist>`` or ``submission:<path>``."""
    description: str | None = None
    reads: list[str] = field(default_factory=list)
    needs_fit: bool | None = None
    deployable: bool | None = None
    installed_code_hash: str | None = None
    costs: list[DeclaredCost] = field(default_factory=list)
    problem: str | None = None
    """Why the description or cost could not be read."""
    status: str = "ok"
    """``ok``, ``failed`` (on some task and model) or ``failed validation``."""
    failures: list[MeasureFailure] = field(default_factory=list)
    submission: dict[str, Any] | None = None
    """Name, options, SHA-256, origin and time of a stored submission."""
    method: str | None = None
    """A decoding method's name (``self_speculative``) when the series is one, not a measure."""


def _from_record(name: str, record: dict[str, Any]) -> MeasureInfo:
    """A measure as the run recorded it (``metadata['measures'][name]``)."""
    info = MeasureInfo(name, True, source=str(record.get("source") or "") or None,
                       description=str(record.get("description") or "") or None,
                       reads=[str(r) for r in record.get("reads") or []],
                       needs_fit=record.get("needs_fit"), deployable=record.get("deployable"),
                       status=str(record.get("status") or "ok"),
                       submission=record.get("submission")
                       if isinstance(record.get("submission"), dict) else None,
                       problem=str(record["problem"]) if record.get("problem") else None)
    for cost in record.get("costs") or []:
        if isinstance(cost, dict) and isinstance(cost.get("dims"), dict):
            info.costs.append(DeclaredCost(
                str(cost.get("model", "")), {k: int(v) for k, v in cost["dims"].items()
                                             if isinstance(v, (int, float))},
                "the run's record", float(cost.get("flops", math.nan)),
                float(cost.get("bytes", math.nan)), bool(cost.get("needs_lm_head")),
                [int(i) for i in cost.get("checked_layers") or []]))
    for failure in record.get("failures") or []:
        if isinstance(failure, dict):
            info.failures.append(MeasureFailure(failure.get("task"), failure.get("model"),
                                                str(failure.get("reason", ""))))
    code = (info.submission or {}).get("sha256")
    info.installed_code_hash = str(code) if code else None
    return info


def recorded_measures(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``metadata['measures']``: the run's record of every measure (see
    :func:`suite.runner.measure_statuses`); empty for results written before it existed."""
    found = metadata.get("measures") if isinstance(metadata, dict) else None
    return {str(k): v for k, v in found.items() if isinstance(v, dict)} \
        if isinstance(found, dict) else {}


def _find_dims(model: str, rows: list[ResultRow], *sources: Any) -> tuple[dict[str, int], str] | None:
    """Model sizes recorded by the run: a row's ``extra['model_dims']``, or
    ``models.<model>`` (or its ``dims`` / ``config``) in the results metadata or run manifest."""
    def complete(candidate: Any) -> dict[str, int] | None:
        if isinstance(candidate, dict) and all(isinstance(candidate.get(k), int)
                                               for k in DIM_FIELDS):
            return {k: int(candidate[k]) for k in DIM_FIELDS}
        return None

    for row in rows:
        found = complete(row.extra.get("model_dims")) if isinstance(row.extra, dict) else None
        if found:
            return found, "the result rows"
    for label, source in sources:
        models = source.get("models") if isinstance(source, dict) else None
        entry = models.get(model) if isinstance(models, dict) else None
        if isinstance(models, list):
            entry = next((m for m in models if isinstance(m, dict) and m.get("name") == model),
                         None)
        for candidate in (entry, *(entry.get(k) for k in ("dims", "config")
                                   if isinstance(entry, dict))):
            found = complete(candidate)
            if found:
                return found, label
    return None


METHOD_DESCRIPTIONS = {
    "self_speculative": "Self-speculative decoding (LayerSkip-style): the first E decoder "
                        "layers draft up to k tokens through the exit head at layer E-1, the "
                        "remaining layers verify them in one parallel pass and the leading "
                        "drafts the full model agrees with are kept. Lossless: the output is "
                        "full-depth greedy decoding's, so every point sits at full-depth "
                        "quality; its points differ in speed (E, k and the stopping rule are "
                        "shown per point)."}


def describe_method(name: str, rows: list[ResultRow]) -> MeasureInfo:
    """A decoding method's series (rows with ``method`` other than ``early_exit``)."""
    from suite.speculative.method import method_code_hash

    method = rows[0].method
    info = MeasureInfo(name, True, source=f"decoding method {method}", method=method,
                       description=METHOD_DESCRIPTIONS.get(method, f"decoding method {method}"),
                       reads=["top1_id", "final_id"], needs_fit=False, deployable=True)
    if method == "self_speculative":
        info.installed_code_hash = method_code_hash()
    return info


def describe_measure(name: str, rows: list[ResultRow], metadata: dict[str, Any],
                     run_manifest: dict[str, Any] | None) -> MeasureInfo:
    """Description, declared cost and status of ``name``: the run's own record when it has
    one, else the built-in measure of that name as installed here."""
    from suite.measures import MEASURES, ModelDims, code_hash

    record = recorded_measures(metadata).get(name)
    if record is not None:
        return _from_record(name, record)
    # a labelled, scheduled or calibrated series names its registry entry in its rows
    named = next((r.extra.get("measure_name") for r in rows if isinstance(r.extra, dict)
                  and isinstance(r.extra.get("measure_name"), str)), None)
    registry_name = named or name
    try:
        registered = registry_name in MEASURES
    except Exception as exc:  # a broken plugin entry point must not stop the site
        return MeasureInfo(name, False, problem=f"the measure registry failed to load: {exc}")
    if not registered:
        return MeasureInfo(name, False, problem="not installed here and not described by the "
                                                "run, so its description and declared cost "
                                                "cannot be shown")
    info = MeasureInfo(name, True, source=MEASURES.source(registry_name))
    if info.source != "builtin":  # submitted code runs only in the sandbox, never here
        info.problem = ("not built in, and the run did not record its description: rebuild "
                        "the results with this exitbench to show it")
        return info
    try:
        measure_cls = MEASURES.get(registry_name)
    except Exception as exc:
        info.problem = f"installed but failed to load: {type(exc).__name__}: {exc}"
        return info
    info.description = str(getattr(measure_cls, "description", "") or "")
    info.reads = sorted(str(r) for r in getattr(measure_cls, "reads", ()))
    info.needs_fit = bool(getattr(measure_cls, "needs_fit", False))
    info.deployable = bool(getattr(measure_cls, "deployable", True))
    info.installed_code_hash = code_hash(measure_cls)
    by_model: dict[str, list[ResultRow]] = {}
    for row in rows:
        by_model.setdefault(row.model, []).append(row)
    for model, model_rows in sorted(by_model.items()):
        try:
            options = json.loads(model_rows[0].measure_options or "{}")
            measure = measure_cls(**(options if isinstance(options, dict) else {}))
        except Exception as exc:
            info.problem = f"cannot be instantiated with the rows' options: {exc}"
            continue
        found = _find_dims(model, model_rows, ("the results metadata", metadata),
                           ("run_manifest.json", run_manifest))
        if found:
            dims, dims_source = found
        else:
            dims = {"num_layers": int(model_rows[0].num_layers), **REFERENCE_DIMS}
            dims_source = ("reference sizes (T5-small widths at this model's depth): the run "
                           "did not record the model's sizes")
        try:
            cost = measure.check_cost(ModelDims(**dims))
            checked = [int(i) for i, on in enumerate(measure.checked_layers(dims["num_layers"]))
                       if on]
        except Exception as exc:
            info.problem = f"check_cost failed: {type(exc).__name__}: {exc}"
            continue
        info.costs.append(DeclaredCost(model, dims, dims_source, float(cost.flops),
                                       float(cost.bytes), bool(cost.needs_lm_head), checked))
    return info


# -- profiles ------------------------------------------------------------------------------
@dataclass
class SpecRow:
    figure: str
    value: str
    source: str


@dataclass
class TableView:
    """A measured table: a caption, a header row and body rows of strings."""

    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class ProfileInfo:
    name: str
    kind: str | None
    found_in: str | None
    """``run_manifest.json`` (a snapshot) or ``registry (builtin)``; None when not found."""
    description: str | None = None
    specs: list[SpecRow] = field(default_factory=list)
    """Simulated: one row per figure, with its source."""
    notes: list[SpecRow] = field(default_factory=list)
    """Simulated: dtypes the device cannot run, and why."""
    facts: list[tuple[str, str]] = field(default_factory=list)
    """Measured: environment, model and method, as (key, value)."""
    tables: list[TableView] = field(default_factory=list)
    problem: str | None = None


def format_si(value: float, unit: str) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {prefix}{unit}"
    return f"{value:.4g} {unit}"


def format_bytes(value: float) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    for factor, unit in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {unit} ({int(value):,} bytes)"
    return f"{value:g} bytes"


def format_seconds(value: float) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0 s"
    for factor, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "µs")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {unit}"
    return f"{value / 1e-9:.4g} ns"


def format_figure(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if key.endswith("_flops_per_s"):
        return format_si(value, "FLOP/s")
    if key.endswith("_bytes_per_s"):
        return format_si(value, "B/s")
    if key.endswith("_bytes"):
        return format_bytes(value)
    if key.endswith("_seconds"):
        return format_seconds(value)
    return f"{value:g}"


def _table_views(name: str, value: Any) -> list[TableView]:
    """Measured tables in any of the shapes profiles use: ``{batch_sizes, seconds}`` by batch,
    ``{batch_sizes, <other>_lens, seconds[][]}`` grids, dicts of tables, or scalars."""
    if isinstance(value, dict) and "batch_sizes" in value and "seconds" in value:
        batch_sizes, seconds = value["batch_sizes"], value["seconds"]
        extras = {k: v for k, v in value.items() if k not in ("batch_sizes", "seconds")}
        columns_key = next((k for k, v in extras.items() if isinstance(v, list)), None)
        notes = ", ".join(f"{k} {v}" for k, v in extras.items() if k != columns_key)
        caption = name + (f" ({notes})" if notes else "")
        if columns_key and seconds and isinstance(seconds[0], list):
            columns = extras[columns_key]
            return [TableView(caption, [f"batch \\ {columns_key}"] + [str(c) for c in columns],
                              [[str(b)] + [format_seconds(s) for s in row]
                               for b, row in zip(batch_sizes, seconds)])]
        return [TableView(caption, ["batch size", "seconds"],
                          [[str(b), format_seconds(s)] for b, s in zip(batch_sizes, seconds)])]
    if isinstance(value, dict):
        views = []
        for key, item in value.items():
            views.extend(_table_views(f"{name}.{key}" if name else str(key), item))
        return views
    return [TableView(name, ["value"], [[format_figure(name, value)]])]


def latency_limits_text(limits: Any) -> str | None:
    """``p99 TTFT <= 2 s, TPOT <= 0.2 s`` for a profile's ``latency_limits`` mapping."""
    if not isinstance(limits, dict):
        return None
    parts = [f"{name} ≤ {limits[key]:g} s" for name, key in (("TTFT", "ttft_seconds"),
                                                             ("TPOT", "tpot_seconds"))
             if limits.get(key) is not None]
    return f"p{limits.get('percentile', 99)} " + ", ".join(parts) if parts else None


def _render_profile(info: ProfileInfo, data: dict[str, Any]) -> None:
    info.kind = str(data.get("kind"))
    info.description = str(data.get("description", "") or "")
    limits = latency_limits_text(data.get("latency_limits"))
    if limits:
        info.specs.append(SpecRow("latency_limits", limits, str(
            data["latency_limits"].get("source") or "no source given")))
    if info.kind == "simulated":
        sources = data.get("sources") if isinstance(data.get("sources"), dict) else {}
        skip = {"name", "kind", "description", "sources", "unsupported_dtypes", "path",
                "latency_limits"}
        for key, value in data.items():
            if key in skip:
                continue
            source = sources.get(key, "")
            if isinstance(value, dict):
                for sub, sub_value in value.items():
                    sub_source = source.get(sub, "") if isinstance(source, dict) else source
                    info.specs.append(SpecRow(f"{key} [{sub}]", format_figure(key, sub_value),
                                              str(sub_source or "no source given")))
            else:
                info.specs.append(SpecRow(key, format_figure(key, value),
                                          str(source or "no source given")))
        for dtype, reason in (data.get("unsupported_dtypes") or {}).items():
            info.notes.append(SpecRow(str(dtype), "not supported", str(reason)))
    else:
        for section in ("environment", "model", "method"):
            for key, value in (data.get(section) or {}).items():
                if value is None:
                    continue
                info.facts.append((f"{section}.{key}", format_figure(key, value)))
        for key in ("measured_at", "suite_version", "format_version"):
            if data.get(key) is not None:
                info.facts.append((key, str(data[key])))
        info.tables = _table_views("", data.get("tables") or {})


def describe_profile(name: str, run_manifest: dict[str, Any] | None) -> ProfileInfo:
    """Specs or tables of profile ``name``: the run manifest's snapshot
    (``profiles.<name>``, a profile mapping) wins over this installation's registry."""
    from suite.profiles import PROFILES, parse_profile

    snapshots = run_manifest.get("profiles") if isinstance(run_manifest, dict) else None
    snapshot = snapshots.get(name) if isinstance(snapshots, dict) else None
    if isinstance(snapshot, dict) and snapshot.get("kind") in ("simulated", "measured"):
        info = ProfileInfo(name, None, "run_manifest.json")
        data = {k: v for k, v in snapshot.items() if k != "path"}
        try:
            data = parse_profile(data, f"run_manifest.json profiles.{name}").model_dump()
        except Exception as exc:  # shown anyway, with the reason it does not validate
            info.problem = f"the snapshot does not validate here: {exc}"
        _render_profile(info, data)
        return info
    try:
        registered = name in PROFILES
    except Exception as exc:
        return ProfileInfo(name, None, None, problem=f"the profile registry failed: {exc}")
    if not registered:
        return ProfileInfo(name, None, None, problem=(
            "not in this installation's profile registry and not snapshotted in "
            "run_manifest.json, so its specs cannot be shown"))
    info = ProfileInfo(name, None, f"registry ({PROFILES.source(name)})")
    try:
        profile = PROFILES.get(name)
    except Exception as exc:
        info.problem = f"failed to load: {exc}"
        return info
    _render_profile(info, profile.model_dump())
    return info
