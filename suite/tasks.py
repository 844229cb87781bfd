"""Tasks: where the data comes from, how inputs are formatted, how outputs are scored.

A task is a :class:`TaskSpec`, written as one YAML file in ``tasks/`` (built-in)
or provided by a plugin through the ``exitbench.tasks`` entry-point group (an
object that is a ``TaskSpec`` or a callable returning one).

Data comes from one of two sources, with the same column layout:

- the Hugging Face hub (``datasets.load_dataset(hub_path, hub_config, split)``),
  which is how users with network access run;
- a folder of JSON Lines in the hub's layout (``--data-dir`` or
  ``EXITBENCH_DATA_DIR``), which is how offline machines and CI run.

Splits accept the hub's slicing syntax (``validation[:100]``,
``validation[800:]``) for both sources, so training and evaluation examples
can be carved apart from one file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from suite.errors import DataError
from suite.registry import Registry

if TYPE_CHECKING:
    from suite.config import TaskConfig

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"
DATA_DIR_ENV = "EXITBENCH_DATA_DIR"


@dataclass(frozen=True)
class TaskLimits:
    """Length limits, in tokens of the model's tokenizer."""

    max_source_tokens: int
    """Inputs are truncated to this many tokens (EOS included)."""
    max_target_tokens: int
    """Targets are truncated to this many tokens for training and reference-forced traces."""
    max_new_tokens: int
    """Generation stops after this many new tokens if EOS has not come."""


@dataclass(frozen=True)
class TaskSpec:
    """One task of the suite. Field paths use dots (``answers.text``)."""

    name: str
    description: str
    metric: str
    """Name in :data:`suite.metrics.METRICS`."""
    input_template: str
    """``str.format`` template over the record, e.g. ``"translate English to French: {translation[en]}"``."""
    target_template: str
    """``str.format`` template for the training / teacher-forcing target, e.g. ``"{answers[text][0]}"``."""
    references_field: str
    """Dotted path to the gold reference(s): a string or a list of strings."""
    limits: TaskLimits
    hub_path: str
    hub_config: str | None = None
    id_field: str | None = "id"
    """Dotted path to a unique example id; ``None`` uses the row index."""
    local_files: dict[str, str] = field(default_factory=dict)
    """Split name -> file name inside the data folder, for files not named ``<task>/<split>.jsonl``."""
    source: str = "builtin"
    prompt_template: str | None = None
    """``str.format`` template of the prompt decoder-only models read (plain text ending where
    the answer starts, e.g. ``"...\\nAnswer:"``); ``None`` uses ``input_template``. Encoder-
    decoders always read ``input_template``."""
    stop_strings: tuple[str, ...] = ()
    """Decoder-only generation also stops at a token whose text contains one of these (a
    newline after a short answer); EOS always stops it (:mod:`suite.prompts`)."""

    def with_limits(self, **overrides: int | None) -> TaskSpec:
        """A copy with some limits overridden (``None`` keeps the default)."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, limits=dataclasses.replace(self.limits, **changes))

    @property
    def input_fields(self) -> list[str]:
        return template_fields(self.input_template) + (
            template_fields(self.prompt_template) if self.prompt_template else [])


@dataclass(frozen=True)
class Example:
    """One formatted example."""

    id: str
    source: str
    """The model input (prompt already applied)."""
    target: str
    """The single training / teacher-forcing target."""
    references: tuple[str, ...]
    """All gold references the metric compares against."""
    prompt: str | None = None
    """The decoder-only prompt (the task's ``prompt_template``); ``None`` when it has none."""


def template_fields(template: str) -> list[str]:
    """Top-level record fields a ``str.format`` template reads."""
    names = []
    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name:
            names.append(re.split(r"[.\[]", field_name, maxsplit=1)[0])
    return names


def get_path(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def task_from_dict(data: dict[str, Any], source: str) -> TaskSpec:
    data = dict(data)
    limits = TaskLimits(**data.pop("limits"))
    hub = data.pop("hub")
    if "stop_strings" in data:
        data["stop_strings"] = tuple(str(s) for s in data["stop_strings"] or ())
    return TaskSpec(limits=limits, hub_path=hub["path"], hub_config=hub.get("config"),
                    source=source, **data)


def load_task_yaml(path: Path) -> TaskSpec:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    try:
        return task_from_dict(data, source=f"builtin:{path.name}")
    except (TypeError, KeyError) as exc:
        raise DataError(f"{path}: not a valid task definition ({exc})") from exc


def _discover_builtin_tasks(registry: Registry[TaskSpec]) -> None:
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        registry.register(path.stem, loader=lambda p=path: load_task_yaml(p), source="builtin")


def _check_task(name: str, value: Any) -> TaskSpec:
    if callable(value) and not isinstance(value, TaskSpec):
        value = value()
    if not isinstance(value, TaskSpec):
        raise TypeError(f"task {name!r} must be a TaskSpec (or a callable returning one), "
                        f"got {type(value).__name__}")
    return value


TASKS: Registry[TaskSpec] = Registry("task", "exitbench.tasks", _discover_builtin_tasks, _check_task)


def get_task(name: str) -> TaskSpec:
    return TASKS.get(name)


def task_spec(task: TaskConfig) -> TaskSpec:
    """The registered task with a config entry's limits applied (unset ones keep the task's
    defaults)."""
    return get_task(task.name).with_limits(max_source_tokens=task.max_source_tokens,
                                           max_target_tokens=task.max_target_tokens,
                                           max_new_tokens=task.max_new_tokens)


# -- data loading -----------------------------------------------------------------
_SPLIT_RE = re.compile(r"^(?P<base>[A-Za-z0-9_\-]+)(?P<slice>\[.*\])?$")


def split_base(split: str) -> str:
    match = _SPLIT_RE.match(split.strip())
    if not match:
        raise DataError(f"split {split!r} is not a split name with an optional slice, "
                        f"such as 'validation' or 'validation[:100]'")
    return match.group("base")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return Path(data_dir).expanduser().resolve() if data_dir else None


def local_file(task: TaskSpec, data_dir: Path, split: str) -> Path:
    """The JSON Lines file of ``split`` inside ``data_dir``; raises naming what was tried."""
    base = split_base(split)
    candidates = []
    if base in task.local_files:
        candidates.append(data_dir / task.local_files[base])
    candidates += [data_dir / task.name / f"{base}.jsonl", data_dir / f"{task.name}_{base}.jsonl"]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"task {task.name!r}: no JSON Lines file for split {base!r} in {data_dir}; "
                    f"looked for {', '.join(str(c) for c in candidates)}. Put the split there "
                    f"in the hub's column layout, or drop --data-dir to load from the hub.")


@dataclass(frozen=True)
class RecordSource:
    """Where a split's records come from, for error messages that point at the record."""

    where: str
    """The file path, or the hub dataset, config and split."""
    path: Path | None = None
    """The local JSON Lines file (``None`` for the hub)."""
    indices: tuple[int, ...] | None = None
    """Record ``i`` of the (sliced) split is record ``indices[i]`` of the file."""

    def locate(self, index: int) -> str:
        """``FILE line N`` (1-based, blank lines counted) or ``hub ... record N``."""
        absolute = self.indices[index] if self.indices is not None else index
        if self.path is None:
            return f"{self.where}, record {absolute + 1}"
        line = _line_of_record(self.path, absolute)
        return f"{self.path} line {line}" if line else f"{self.path}, record {absolute + 1}"


def _line_of_record(path: Path, record: int) -> int | None:
    """1-based line of the ``record``-th (0-based) non-blank line of a JSON Lines file."""
    seen = -1
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                seen += 1
                if seen == record:
                    return number
    return None


def _first_invalid_line(path: Path) -> str | None:
    """``line N: reason`` of the first line of ``path`` that is not a JSON object."""
    import json

    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except (UnicodeDecodeError, ValueError) as exc:
                return f"line {number} is not valid JSON ({exc})"
            if not isinstance(value, dict):
                return f"line {number} is a JSON {type(value).__name__}, not an object"
    return None


def _read_local(task: TaskSpec, path: Path, split: str):
    """The whole file as a ``datasets.Dataset``, sliced as ``split`` says; a file that is
    empty or not JSON Lines gets an error naming the file and the first bad line."""
    import datasets

    base = split_base(split)
    if path.stat().st_size == 0 or not path.read_bytes().strip():
        raise DataError(f"task {task.name!r}: {path} is empty; put the split's records there, "
                        f"one JSON object per line in the hub's column layout")
    try:
        whole = datasets.load_dataset("json", data_files={base: str(path)}, split=base)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the file and the line
        reason = _first_invalid_line(path)
        if reason is None:
            text = str(exc).strip().splitlines()
            reason = text[-1] if text else type(exc).__name__
        raise DataError(f"task {task.name!r}: {path} is not JSON Lines: {reason}; each line "
                        f"must be one JSON object") from None
    try:
        instructions = datasets.ReadInstruction.from_spec(split).to_absolute({base: len(whole)})
    except (ValueError, AssertionError) as exc:
        raise DataError(f"task {task.name!r}: split {split!r} is not a valid slice of {path} "
                        f"({len(whole)} records): {exc}") from None
    indices = tuple(i for ins in instructions for i in range(ins.from_, ins.to))
    return whole.select(indices), RecordSource(where=str(path), path=path, indices=indices)


def load_records(task: TaskSpec, split: str, data_dir: str | os.PathLike | None = None):
    """The raw ``datasets.Dataset`` for a split, from the local folder or the hub, and the
    :class:`RecordSource` that locates its records for error messages."""
    import datasets

    datasets.disable_progress_bars()
    folder = resolve_data_dir(data_dir)
    if folder is not None:
        if not folder.is_dir():
            raise DataError(f"task {task.name!r}: data folder {folder} does not exist "
                            f"(from --data-dir or {DATA_DIR_ENV})")
        ds, source = _read_local(task, local_file(task, folder, split), split)
    else:
        where = f"hub dataset {task.hub_path!r} (config {task.hub_config!r}, split {split!r})"
        try:
            ds = datasets.load_dataset(task.hub_path, task.hub_config, split=split)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"task {task.name!r}: could not load split {split!r} from {where}: "
                            f"{exc}. Offline, pass --data-dir (or set {DATA_DIR_ENV}) to a "
                            f"folder of JSON Lines.") from exc
        source = RecordSource(where=where)
    if len(ds) == 0:
        raise DataError(f"task {task.name!r}: split {split!r} of {source.where} holds no records")
    needed = set(task.input_fields) | set(template_fields(task.target_template))
    needed.add(task.references_field.split(".")[0])
    if task.id_field:
        needed.add(task.id_field.split(".")[0])
    missing = sorted(needed - set(ds.column_names))
    if missing:
        raise DataError(f"task {task.name!r}: {source.where} has no field(s) {', '.join(missing)} "
                        f"in any record (it has {', '.join(ds.column_names)}); the task's "
                        f"templates read {', '.join(sorted(needed))}")
    return ds, source


class _MissingField(Exception):
    def __init__(self, field_name: str, problem: str):
        super().__init__(field_name)
        self.field_name = field_name
        self.problem = problem


class _RecordFormatter(string.Formatter):
    """``str.format`` over a record, where a field that is absent or null is an error (never
    the text ``None``)."""

    def get_field(self, field_name, args, kwargs):
        try:
            value, first = super().get_field(field_name, args, kwargs)
        except KeyError as exc:
            raise _MissingField(field_name, f"is missing (no key {exc})") from None
        except IndexError:
            raise _MissingField(field_name, "is missing (the list is shorter)") from None
        except TypeError:  # a subscript of a null or of a scalar
            raise _MissingField(field_name, "is missing (a field above it is null or not a "
                                            "mapping/list)") from None
        if value is None:
            raise _MissingField(field_name, "is missing or null")
        return value, first


_FORMATTER = _RecordFormatter()


def format_example(task: TaskSpec, record: dict[str, Any], index: int,
                   source: RecordSource | str = "") -> Example:
    """Apply the task's templates to one raw record (``index`` within the split)."""
    if isinstance(source, str):
        source = RecordSource(where=source or "the data")

    def fail(what: str, template_name: str, template: str) -> DataError:
        return DataError(f"task {task.name!r}: {source.locate(index)}: {what}; the "
                         f"{template_name} {template!r} needs it. Fix or remove that record")

    formatted = {}
    templates = [("input template", task.input_template),
                 ("target template", task.target_template)]
    if task.prompt_template is not None:
        templates.append(("prompt template", task.prompt_template))
    for name, template in templates:
        try:
            formatted[name] = _FORMATTER.format(template, **record)
        except _MissingField as exc:
            top = re.split(r"[.\[]", exc.field_name, maxsplit=1)[0]
            what = (f"field {top!r} is missing or null" if record.get(top) is None
                    else f"field {exc.field_name!r} {exc.problem}")
            raise fail(what, name, template) from None
    try:
        refs = get_path(record, task.references_field)
    except KeyError:
        refs = None
    if refs is None:
        raise fail(f"field {task.references_field!r} is missing or null", "references field",
                   task.references_field)
    references = (refs,) if isinstance(refs, str) else tuple(str(r) for r in refs)
    if not references:
        raise fail(f"field {task.references_field!r} holds no references", "references field",
                   task.references_field)
    if task.id_field:
        try:
            raw_id = get_path(record, task.id_field)
        except KeyError:
            raw_id = None
        if raw_id is None:
            raise fail(f"field {task.id_field!r} is missing or null", "id field", task.id_field)
        example_id = str(raw_id)
    else:
        example_id = str(source.indices[index] if source.indices is not None else index)
    return Example(id=example_id, source=formatted["input template"],
                   target=formatted["target template"], references=references,
                   prompt=formatted.get("prompt template"))


def load_examples(task: TaskSpec, split: str, data_dir: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[Example]:
    """Formatted examples of a task split, at most ``limit`` of them, in file order."""
    ds, source = load_records(task, split, data_dir)
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    examples = [format_example(task, rec, i, source) for i, rec in enumerate(ds)]
    seen: dict[str, int] = {}
    for i, ex in enumerate(examples):
        if ex.id in seen:
            raise DataError(f"task {task.name!r}: {source.locate(i)}: example id {ex.id!r} "
                            f"was used before, at {source.locate(seen[ex.id])}; ids must be "
                            f"unique")
        seen[ex.id] = i
    return examples
