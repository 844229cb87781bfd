"""Submitted measures stored in a run directory, so every later run includes them.

``exitbench submit my_measure.py --config C`` stores the file's text and its options under
``<output_dir>/submissions/<name>/`` and replays it; from then on every ``run``, ``replay``
and leaderboard build of that directory includes every stored submission beside the config's
measures, with its description and declared cost. One submission never evicts another:
submissions are keyed by their measure's name; submitting the same name again with the same
code and options changes nothing, and with other code or options is refused unless the
submitter asks to replace it (``--replace``).

Layout of one submission::

    submissions/<file_stem(name)>/measure.py        the source as submitted (never imported
                                                    by the engine: it runs in the sandbox)
    submissions/<file_stem(name)>/submission.json   name, options, SHA-256 of the source,
                                                    where it came from, when, and what the
                                                    measure declared (description, reads,
                                                    cost) when it was validated

Writes happen under the run directory's lock (:mod:`suite.lock`) and are atomic.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from suite.atomic import atomic_write_json, atomic_write_text
from suite.errors import ExitbenchError
from suite.keys import file_stem

SUBMISSIONS_DIR = "submissions"
SOURCE_FILE = "measure.py"
RECORD_FILE = "submission.json"


class SubmissionError(ExitbenchError):
    """A submission that clashes with a stored one or a built-in measure."""


@dataclass(frozen=True)
class Submission:
    """One stored submission."""

    name: str
    """The measure's name (its class's ``name``), unique in the run."""
    options: dict[str, Any]
    sha256: str
    """SHA-256 of the source text."""
    submitted_from: str
    """The path the researcher gave."""
    submitted_at: str
    folder: Path
    declared: dict[str, Any] = field(default_factory=dict)
    """What the measure declared when validated: description, reads, needs_fit, deployable,
    and its check cost at reference sizes."""

    @property
    def source_path(self) -> Path:
        return self.folder / SOURCE_FILE

    def source_text(self) -> str:
        text = self.source_path.read_text("utf-8")
        if hashlib.sha256(text.encode("utf-8")).hexdigest() != self.sha256:
            raise SubmissionError(f"{self.source_path}: its SHA-256 no longer matches the one "
                                  f"stored when it was submitted; submit the file again "
                                  f"(`exitbench submit FILE --config ... --replace`)")
        return text

    def code(self):
        """The :class:`~suite.sandbox.MeasureCode` that runs this submission."""
        from suite.sandbox import MeasureCode

        return MeasureCode(kind="file", origin=f"submission:{self.source_path}",
                           source_text=self.source_text(), file_name=SOURCE_FILE)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("folder")
        return data


class SubmissionStore:
    """``<output_dir>/submissions``."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir) / SUBMISSIONS_DIR

    def folder(self, name: str) -> Path:
        return self.root / file_stem(name)

    def list(self) -> list[Submission]:
        """Every stored submission, by name; a damaged record is an error naming it."""
        found = []
        if not self.root.is_dir():
            return found
        for record in sorted(self.root.glob(f"*/{RECORD_FILE}")):
            try:
                data = json.loads(record.read_text("utf-8"))
                found.append(Submission(folder=record.parent, **data))
            except (OSError, ValueError, TypeError) as exc:
                raise SubmissionError(f"{record} is not a readable submission record ({exc}); "
                                      f"submit that measure again or remove its folder") from exc
        return sorted(found, key=lambda s: s.name)

    def get(self, name: str) -> Submission | None:
        return next((s for s in self.list() if s.name == name), None)

    def add(self, name: str, source_text: str, options: dict[str, Any], submitted_from: str,
            declared: dict[str, Any], *, replace: bool = False) -> tuple[Submission, str]:
        """Store a submission; returns it and what happened (``stored``, ``unchanged``,
        ``replaced``). Call under the run directory's lock."""
        from suite.measures import MEASURES

        if name in MEASURES:
            raise SubmissionError(f"a measure named {name!r} is already registered "
                                  f"({MEASURES.source(name)}); give yours another name")
        sha = hashlib.sha256(source_text.encode("utf-8")).hexdigest()
        old = self.get(name)
        outcome = "stored"
        if old is not None:
            if old.sha256 == sha and old.options == options:
                return old, "unchanged"
            if not replace:
                what = "code" if old.sha256 != sha else "options"
                raise SubmissionError(
                    f"{self.root} already holds a submission named {name!r} with other {what} "
                    f"(submitted {old.submitted_at} from {old.submitted_from}); pass --replace "
                    f"to replace it, or give your measure another name")
            outcome = "replaced"
        folder = self.folder(name)
        atomic_write_text(folder / SOURCE_FILE, source_text)
        submission = Submission(name=name, options=dict(options), sha256=sha,
                                submitted_from=submitted_from,
                                submitted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                folder=folder, declared=declared)
        atomic_write_json(folder / RECORD_FILE, submission.to_dict())
        return submission, outcome


_REGISTERED: dict[str, tuple[Submission, Any]] = {}
"""The submissions of the run this process works on, by name, with their sandbox settings.
Kept apart from the measure registry (which holds built-ins and plugins only), so that one
run's submissions never appear in another's lists; :func:`suite.measures.get_measure`
consults it first."""
_CLASSES: dict[tuple[str, str], type] = {}


def registered_submission(name: str) -> Submission | None:
    """The stored submission registered under ``name`` in this process, if any."""
    found = _REGISTERED.get(name)
    return found[0] if found else None


def stored_for_registry() -> list[Submission]:
    """Every submission registered in this process (handed to replay workers, which register
    them in theirs)."""
    return [submission for submission, _ in _REGISTERED.values()]


def submission_class(name: str):
    """The sandboxed class of the registered submission ``name`` (built on first use, one
    sandbox worker per submitted code), or ``None``."""
    found = _REGISTERED.get(name)
    if found is None:
        return None
    submission, sandbox = found
    key = (submission.name, submission.sha256)
    if key not in _CLASSES:
        from suite.sandbox import isolated_measure_class

        _CLASSES[key] = isolated_measure_class(submission.code(), sandbox, label=name)
    return _CLASSES[key]


def register_submissions(submissions: list[Submission], sandbox=None) -> None:
    """Make the run's stored submissions the ones :func:`suite.measures.get_measure` finds in
    this process (the driver, and each replay worker); they replace those of any run this
    process worked on before."""
    from suite.measures import MEASURES

    for submission in submissions:
        if submission.name in MEASURES:
            raise SubmissionError(f"stored submission {submission.name!r} has the name of a "
                                  f"registered measure ({MEASURES.source(submission.name)}); "
                                  f"remove {submission.folder} or rename the measure")
    _REGISTERED.clear()
    for submission in submissions:
        _REGISTERED[submission.name] = (submission, sandbox)
