"""Validation of an exit measure before the suite uses it.

A list of small independent checks (:data:`CHECKS`), each with its own message, run on random
synthetic traces (:func:`synthetic_traces`). Learned measures are fitted on those traces first,
with a small number of epochs. Every call into the measure is guarded: a measure that raises,
returns NaN, returns the wrong shape or peeks ahead fails the check concerned with the reason;
the report itself never crashes. Checks that cannot run because an earlier stage failed
(the measure cannot be built or fitted, or its scores have the wrong shape) are skipped and
say why.

Library use: ``validate_measure(measure_cls, options) -> ValidationReport`` (JSON-serialisable
through :meth:`ValidationReport.to_dict`); ``load_measure("path/to/file.py" | "name" |
"module:Class")`` for what ``exitbench validate-measure`` accepts.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from suite.errors import ExitbenchError

if TYPE_CHECKING:
    from suite.sandbox import SandboxSettings
from suite.measures import MEASURES, TRACE_FIELDS, CheckCost, Measure, ModelDims
from suite.registry import closest_names
from suite.traces import (
    LAYER_FIELDS,
    LOOK_AHEAD_LAYER_FIELDS,
    LOOK_AHEAD_TOKEN_FIELDS,
    OPTIONAL_LAYER_FIELDS,
    TraceArrays,
)

logger = logging.getLogger(__name__)
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
VALIDATION_EPOCHS = 2
"""Epochs for fitting learned measures on the synthetic traces: enough to exercise fit()."""
CAUSALITY_RTOL = 1e-6
"""Relative tolerance when comparing scores of perturbed traces (float reorderings only)."""
COST_DIMS: dict[str, ModelDims] = {
    "t5-small": ModelDims(num_layers=6, d_model=512, d_ff=2048, num_heads=8, d_kv=64,
                          vocab_size=32128),
    "t5-large": ModelDims(num_layers=24, d_model=1024, d_ff=4096, num_heads=16, d_kv=64,
                          vocab_size=32128),
}
"""Model sizes at which the declared cost is evaluated."""
PER_TOKEN_FIELDS = ("example_id", "position", "final_id", "gold_id")
# The causality checks change the look-ahead fields of suite.traces with the layers above:
# per-token ones (final_id, gold_id) with every layer but the last, per-layer ones
# (cos_last, final_prob) at every layer.


# -- synthetic traces -----------------------------------------------------------------------
def synthetic_traces(num_examples: int = 6, tokens_per_example: int = 8, num_layers: int = 6,
                     d_model: int = 16, vocab_size: int = 50, seed: int = 0,
                     saturated_examples: int = 1) -> TraceArrays:
    """Random traces with hidden states that look like decoding: each token's hidden state
    drifts towards its final one with depth, its prediction settles on the final token from a
    random layer on, and its top-1 probability tends to grow. The last ``saturated_examples``
    examples are edge cases: the same state at every layer, top-1 probability 1 and top-2 0."""
    rng = np.random.default_rng(seed)
    num_tokens = num_examples * tokens_per_example
    layer_index = np.arange(num_layers)
    progress = (layer_index + 1.0) / num_layers

    final_hidden = rng.normal(size=(num_tokens, d_model))
    drift = rng.normal(size=(num_tokens, num_layers, d_model))
    hidden = (progress[None, :, None] * final_hidden[:, None, :]
              + (1.0 - progress)[None, :, None] * 1.5 * drift)
    embedding = rng.normal(size=(num_tokens, d_model))

    final_id = rng.integers(0, vocab_size, size=num_tokens)
    settle_layer = rng.integers(0, num_layers, size=num_tokens)
    other_ids = (final_id[:, None] + rng.integers(1, vocab_size, size=(num_tokens, num_layers))) \
        % vocab_size  # never the final token
    top1_id = np.where(layer_index[None, :] >= settle_layer[:, None], final_id[:, None], other_ids)
    top1_prob = np.clip(0.15 + 0.8 * progress[None, :]
                        + rng.normal(0.0, 0.08, size=(num_tokens, num_layers)), 0.02, 0.999)
    top2_prob = np.minimum(top1_prob, (1.0 - top1_prob)
                           * rng.uniform(0.1, 0.9, size=(num_tokens, num_layers)))
    gold_id = np.where(rng.random(num_tokens) < 0.8, final_id,
                       (final_id + rng.integers(1, vocab_size, size=num_tokens)) % vocab_size)

    saturated = np.arange(num_tokens) >= (num_examples - saturated_examples) * tokens_per_example
    hidden[saturated] = final_hidden[saturated][:, None, :]
    embedding[saturated] = final_hidden[saturated]
    top1_id[saturated] = final_id[saturated][:, None]
    top1_prob[saturated], top2_prob[saturated] = 1.0, 0.0

    previous = np.concatenate([embedding[:, None, :], hidden[:, :-1]], axis=1)
    example_names = np.array([f"synthetic-{i}" for i in range(num_examples)], dtype=object)
    return TraceArrays(
        example_id=np.repeat(example_names, tokens_per_example),
        position=np.tile(np.arange(tokens_per_example), num_examples).astype(np.int32),
        final_id=final_id.astype(np.int32), gold_id=gold_id.astype(np.int32),
        top1_id=top1_id.astype(np.int32), top1_prob=top1_prob.astype(np.float32),
        top2_prob=top2_prob.astype(np.float32),
        cos_prev=_cosine(hidden, previous).astype(np.float32),
        cos_last=_cosine(hidden, hidden[:, -1:]).astype(np.float32),
        # a weightless RMS norm scales each state: the cosines of the normed states are the same
        cos_prev_normed=_cosine(hidden, previous).astype(np.float32),
        cos_last_normed=_cosine(hidden, hidden[:, -1:]).astype(np.float32),
        final_prob=np.where(top1_id == final_id[:, None], top1_prob, top2_prob)
        .astype(np.float32),
        hidden=hidden.astype(np.float32))


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = (a * b).sum(-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.clip(dot / np.maximum(norms, 1e-12), -1.0, 1.0)


def mix_traces(base: TraceArrays, other: TraceArrays, from_other: np.ndarray,
               token_rows: np.ndarray | None = None,
               token_fields: tuple[str, ...] = ()) -> TraceArrays:
    """``base`` with the per-layer fields (hidden states included) taken from ``other`` where
    the ``[T, L]`` mask ``from_other`` is set, and the per-token ``token_fields`` taken from
    ``other`` on ``token_rows``."""
    values: dict[str, Any] = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    for name in (*LAYER_FIELDS, *OPTIONAL_LAYER_FIELDS):
        if getattr(base, name) is not None and getattr(other, name) is not None:
            values[name] = np.where(from_other, getattr(other, name), getattr(base, name))
    if base.hidden is not None and other.hidden is not None:
        values["hidden"] = np.where(from_other[..., None], other.hidden, base.hidden)
    rows = np.ones(base.num_tokens, bool) if token_rows is None else token_rows
    for name in token_fields:
        values[name] = np.where(rows, getattr(other, name), getattr(base, name))
    return TraceArrays(**values)


# -- the report -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check."""

    check: str
    status: str
    """``PASS``, ``FAIL`` or ``SKIP``."""
    message: str


@dataclass
class ValidationReport:
    """All checks of one measure; ``passed`` when none failed."""

    measure: str
    source: str
    """Where the measure came from: ``builtin``, ``plugin:<dist>``, a file path, ``module:attr``."""
    options: dict[str, Any]
    deployable: bool | None
    """``False`` for look-ahead upper bounds (the oracle); ``None`` when unknown."""
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(result.status != FAIL for result in self.checks)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ValidationReport:
        """A report as :meth:`to_dict` wrote it (extra keys such as ``key`` are ignored)."""
        checks = [CheckResult(check=str(c.get("check", "")), status=str(c.get("status", "")),
                              message=str(c.get("message", "")))
                  for c in data.get("checks", []) if isinstance(c, dict)]
        return ValidationReport(measure=str(data.get("measure", "")),
                                source=str(data.get("source", "")),
                                options=dict(data.get("options") or {}),
                                deployable=data.get("deployable"), checks=checks,
                                seconds=float(data.get("seconds", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["options"] = json.loads(json.dumps(self.options, default=repr))
        data["passed"] = self.passed
        return data

    def format(self) -> str:
        """A readable report: a header, one line per check, a verdict."""
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "defaults"
        lines = [f"measure {self.measure}  ({self.source}; options: {options})"]
        if self.deployable is False:
            lines.append("  note: not deployable (looks ahead by design); an upper bound, "
                         "not ranked with deployable measures")
        width = max((len(r.check) for r in self.checks), default=0)
        for result in self.checks:
            lines.append(f"  {result.status}  {result.check:<{width}}  {result.message}")
        failed = sum(r.status == FAIL for r in self.checks)
        skipped = sum(r.status == SKIP for r in self.checks)
        verdict = "PASSED" if self.passed else f"FAILED ({failed} of {len(self.checks)} checks)"
        lines.append(f"{verdict}: {len(self.checks) - failed - skipped} passed, {failed} failed, "
                     f"{skipped} skipped, {self.seconds:.1f} s")
        return "\n".join(lines)


# -- the context the checks share -----------------------------------------------------------
class Blocked(Exception):
    """A check cannot run because an earlier stage failed; the report says SKIP and why."""


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else '(no message)'}"


def call_fit(measure: Measure, traces: TraceArrays, **options: Any) -> None:
    """``measure.fit(traces, ...)`` with the options its signature accepts; per-epoch progress
    logs are silenced (a validation fit takes a moment)."""
    parameters = inspect.signature(measure.fit).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        options = {k: v for k, v in options.items() if k in parameters}
    learned_logger = logging.getLogger("suite.learned")
    level = learned_logger.level
    learned_logger.setLevel(logging.WARNING)
    try:
        measure.fit(traces, **options)
    finally:
        learned_logger.setLevel(level)


class ValidationContext:
    """The measure under test, the synthetic traces, and the instance built and fitted once
    for all checks (so a fit failure is reported once and blocks the rest)."""

    def __init__(self, measure_cls: Any, options: dict[str, Any], *, seed: int = 0,
                 num_layers: int = 6, expected_name: str | None = None):
        self.measure_cls = measure_cls
        self.options = dict(options)
        self.seed = seed
        self.expected_name = expected_name
        self.traces = synthetic_traces(num_layers=num_layers, seed=seed)
        self.other = synthetic_traces(num_layers=num_layers, seed=seed + 1)
        self.build_error: str | None = None
        self.fit_error: str | None = None
        self._measure: Measure | None = None
        self._scores: np.ndarray | None = None

    @property
    def is_measure_class(self) -> bool:
        return isinstance(self.measure_cls, type) and issubclass(self.measure_cls, Measure) \
            and not inspect.isabstract(self.measure_cls)

    @property
    def needs_fit(self) -> bool:
        return bool(getattr(self.measure_cls, "needs_fit", False))

    def new_fitted(self) -> Measure:
        """A fresh instance, fitted when it needs to be (exceptions propagate)."""
        measure = self.measure_cls(**self.options)
        if self.needs_fit:
            call_fit(measure, copy_traces(self.traces), epochs=VALIDATION_EPOCHS,
                     seed=self.seed)
        return measure

    def measure(self) -> Measure:
        """The instance under test; :class:`Blocked` when it cannot be built or fitted."""
        if self._measure is not None:
            return self._measure
        if not self.is_measure_class:
            raise Blocked("not run: not a concrete Measure subclass (see api)")
        if self.build_error or self.fit_error:
            raise Blocked(f"not run: {self.build_error or self.fit_error}")
        try:
            measure = self.measure_cls(**self.options)
        except Exception as exc:  # noqa: BLE001 - reported, never raised
            self.build_error = f"the measure cannot be built ({describe_exception(exc)})"
            raise Blocked(f"not run: {self.build_error}") from exc
        if self.needs_fit:
            try:
                call_fit(measure, copy_traces(self.traces), epochs=VALIDATION_EPOCHS,
                         seed=self.seed)
            except Exception as exc:  # noqa: BLE001
                self.fit_error = f"fit failed ({describe_exception(exc)})"
                raise Blocked(f"not run: {self.fit_error}") from exc
        self._measure = measure
        return measure

    def scores(self, traces: TraceArrays, measure: Measure | None = None) -> np.ndarray:
        """Scores of a copy of ``traces`` (a measure that writes to its input must not spoil
        the other checks); :class:`Blocked` when they are not a ``[T, L]`` float array (the
        shape check reports that)."""
        result = (measure or self.measure()).scores(copy_traces(traces))
        if not is_score_array(result, traces):
            raise Blocked("not run: scores are not a [tokens, layers] float array (see shape)")
        return result

    def base_scores(self) -> np.ndarray:
        """Scores of the primary synthetic traces (computed once)."""
        if self._scores is None:
            self._scores = self.scores(self.traces)
        return self._scores


def copy_traces(traces: TraceArrays) -> TraceArrays:
    return dataclasses.replace(traces, **{
        f.name: np.copy(getattr(traces, f.name)) for f in dataclasses.fields(traces)
        if getattr(traces, f.name) is not None})


def is_score_array(result: Any, traces: TraceArrays) -> bool:
    return isinstance(result, np.ndarray) and result.shape == traces.top1_id.shape \
        and np.issubdtype(result.dtype, np.floating)


def count_unequal(a: np.ndarray, b: np.ndarray) -> int:
    """Scores that are not bit-for-bit equal (NaN equals NaN, -inf equals -inf)."""
    return int((~np.isclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)).sum())


def first_difference(a: np.ndarray, b: np.ndarray) -> tuple[int, int, int] | None:
    """``(count, token, layer)`` of scores that differ beyond float noise, or ``None``."""
    same = np.isclose(a, b, rtol=CAUSALITY_RTOL, atol=1e-9, equal_nan=True)
    if same.all():
        return None
    token, layer = np.argwhere(~same)[0]
    return int((~same).sum()), int(token), int(layer)


# -- the checks -----------------------------------------------------------------------------
class Check(abc.ABC):
    """One independent check; :meth:`run` returns ``(status, message)``. Exceptions from the
    measure are caught by :func:`run_check` and reported as failures."""

    name: ClassVar[str]

    @abc.abstractmethod
    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        ...


class ApiCheck(Check):
    """Subclass of Measure, the declared attributes, buildable with the options."""

    name = "api"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        cls = ctx.measure_cls
        isolated_problem = getattr(cls, "isolation_api_error", None)
        if isolated_problem:  # what the sandbox found wrong with the submitted class
            return FAIL, str(isolated_problem)
        if not (isinstance(cls, type) and issubclass(cls, Measure)):
            return FAIL, (f"{cls!r} is not a subclass of suite.measures.Measure; derive the "
                          f"measure class from it")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            return FAIL, f"{cls.__name__} does not implement {missing}"
        problems = []
        for attribute in ("name", "description"):
            value = getattr(cls, attribute, None)
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{attribute} must be a non-empty string, got {value!r}")
        if ctx.expected_name and getattr(cls, "name", None) != ctx.expected_name:
            problems.append(f"name {getattr(cls, 'name', None)!r} differs from the registered "
                            f"name {ctx.expected_name!r}")
        for attribute in ("reads", "fit_reads"):
            value = getattr(cls, attribute, None)
            if not isinstance(value, (set, frozenset)) or \
                    not all(isinstance(item, str) for item in value):
                problems.append(f"{attribute} must be a frozenset of field names, got {value!r}")
                continue
            for unknown in sorted(set(value) - TRACE_FIELDS):
                close = closest_names(unknown, sorted(TRACE_FIELDS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{attribute} names unknown trace field {unknown!r}{hint}; "
                                f"known: {', '.join(sorted(TRACE_FIELDS))}")
        for attribute in ("needs_fit", "deployable"):
            if not isinstance(getattr(cls, attribute, None), bool):
                problems.append(f"{attribute} must be True or False")
        defines_fit = getattr(cls, "defines_fit", cls.fit is not Measure.fit)
        if getattr(cls, "needs_fit", False) is True and not defines_fit:
            problems.append("needs_fit is True but the class does not define fit()")
        if problems:
            return FAIL, "; ".join(problems)
        try:
            cls(**ctx.options)
        except Exception as exc:  # noqa: BLE001
            return FAIL, (f"cannot be built with options {ctx.options or '{}'} "
                          f"({describe_exception(exc)})")
        reads = ", ".join(sorted(cls.reads)) or "nothing"
        return PASS, f"Measure subclass; reads {reads}" + \
            (f"; fit reads {', '.join(sorted(cls.fit_reads))}" if cls.fit_reads else "")


class FitCheck(Check):
    """Learned measures fit on the synthetic traces without error."""

    name = "fit"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        if not ctx.needs_fit:
            return SKIP, "needs_fit is False"
        started = time.perf_counter()
        try:
            ctx.measure()
        except Blocked as blocked:
            if ctx.fit_error:
                return FAIL, f"{ctx.fit_error} on {ctx.traces.num_tokens} synthetic tokens"
            raise blocked
        return PASS, (f"fitted on {ctx.traces.num_tokens} synthetic tokens x "
                      f"{ctx.traces.num_layers} layers ({VALIDATION_EPOCHS} epochs, "
                      f"{time.perf_counter() - started:.1f} s)")


class ShapeCheck(Check):
    """Scores are a float numpy array of shape [tokens, layers], at more than one depth."""

    name = "shape"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        measure = ctx.measure()
        cases = [("the synthetic traces", ctx.traces)]
        if not ctx.needs_fit:  # a fitted measure is tied to its training depth
            cases.append(("traces of another depth", synthetic_traces(
                num_examples=3, tokens_per_example=5, num_layers=ctx.traces.num_layers + 3,
                seed=ctx.seed + 2)))
        for label, traces in cases:
            result = measure.scores(copy_traces(traces))
            expected = traces.top1_id.shape
            if not isinstance(result, np.ndarray):
                return FAIL, (f"scores() returned {type(result).__name__} on {label}; return a "
                              f"numpy array of shape [tokens, layers] = {expected}")
            if result.shape != expected:
                return FAIL, (f"scores() returned shape {result.shape} on {label}; expected "
                              f"[tokens, layers] = {expected}")
            if not np.issubdtype(result.dtype, np.floating):
                return FAIL, f"scores() returned dtype {result.dtype}; return floats"
        return PASS, "[tokens, layers] float array" + \
            (" at two depths" if len(cases) > 1 else "")


class FiniteCheck(Check):
    """No NaN or +inf (-inf is allowed: "never exit here")."""

    name = "finite"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        scores = ctx.base_scores()
        bad = np.isnan(scores) | (scores == np.inf)
        if bad.any():
            token, layer = np.argwhere(bad)[0]
            kinds = " and ".join(kind for kind, count in
                                 (("NaN", np.isnan(scores).sum()),
                                  ("+inf", (scores == np.inf).sum())) if count)
            return FAIL, (f"{int(bad.sum())} of {scores.size} scores are {kinds} (first at token "
                          f"{token}, layer {layer}); return finite scores, or -inf for "
                          f"'never exit here'")
        never = int(np.isneginf(scores).sum())
        return PASS, "no NaN or +inf" + (f" ({never} scores are -inf: never exit there)"
                                         if never else "")


class ReadOnlyCheck(Check):
    """Scoring leaves the traces it is given unchanged."""

    name = "read-only"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        traces = copy_traces(ctx.traces)
        ctx.measure().scores(traces)
        changed = [f.name for f in dataclasses.fields(traces)
                   if getattr(traces, f.name) is not None
                   and not np.array_equal(getattr(traces, f.name), getattr(ctx.traces, f.name))]
        if changed:
            return FAIL, (f"scores() modified the traces it was given ({', '.join(changed)}); "
                          f"copy an array before writing to it")
        return PASS, "the traces are unchanged after scoring"


class DeclaredReadsCheck(Check):
    """Scores do not change when fields the measure does not declare in ``reads`` change."""

    name = "declared-reads"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        measure = ctx.measure()
        base = ctx.base_scores()
        undeclared = sorted(TRACE_FIELDS - set(type(measure).reads))
        replacements: dict[str, Any] = {name: getattr(ctx.other, name)
                                        for name in (*LAYER_FIELDS, *OPTIONAL_LAYER_FIELDS,
                                                     "final_id", "gold_id")}
        replacements["example_id"] = np.array([f"renamed-{x}" for x in ctx.traces.example_id],
                                              dtype=object)
        replacements["position"] = ctx.traces.position + 7
        replacements["hidden"] = None  # re-materialised only for measures that declare it
        culprits, errors = [], []
        for name in undeclared:
            traces = dataclasses.replace(ctx.traces, **{name: replacements[name]})
            try:
                changed = first_difference(base, ctx.scores(traces, measure))
            except Blocked:
                raise
            except Exception as exc:  # noqa: BLE001
                action = "absent" if replacements[name] is None else "changed"
                errors.append(f"{name} {action}: {describe_exception(exc)}")
                continue
            if changed is not None:
                culprits.append(name)
        if culprits or errors:
            detail = []
            if culprits:
                detail.append(f"scores change with {', '.join(culprits)}")
            if errors:
                detail.append("scores() raised with " + "; ".join(errors))
            return FAIL, (f"reads fields it does not declare: {'; '.join(detail)}; add them to "
                          f"reads")
        return PASS, (f"unaffected by the {len(undeclared)} undeclared fields"
                      + (" (hidden states absent)" if "hidden" in undeclared else ""))


class DeterminismCheck(Check):
    """Two runs give equal scores; learned measures refitted with the same seed too."""

    name = "determinism"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        measure = ctx.measure()
        first = ctx.base_scores()
        second = ctx.scores(ctx.traces, measure)
        if not np.array_equal(first, second, equal_nan=True):
            return FAIL, (f"two scores() calls on the same traces differ in "
                          f"{count_unequal(first, second)} of {first.size} scores; make "
                          f"scoring deterministic")
        if not ctx.needs_fit:
            return PASS, "two runs give equal scores"
        refitted = ctx.scores(ctx.traces, ctx.new_fitted())
        if not np.array_equal(first, refitted, equal_nan=True):
            return FAIL, (f"two fits with seed {ctx.seed} give different scores "
                          f"({count_unequal(first, refitted)} of {first.size} differ); seed "
                          f"every random choice in fit()")
        return PASS, f"two runs and two fits (seed {ctx.seed}) give equal scores"


class LayerCausalityCheck(Check):
    """The score at layer l is unchanged when every field at layers above l changes
    (hidden states, final and gold tokens included)."""

    name = "causality"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        measure = ctx.measure()
        if not type(measure).deployable:
            return SKIP, "not deployable: looks ahead by design (reported as an upper bound)"
        base = ctx.base_scores()
        num_tokens, num_layers = base.shape
        layer_index = np.arange(num_layers)
        for layer in range(num_layers):
            above = np.broadcast_to(layer_index > layer, (num_tokens, num_layers))
            # final_id is the last layer's top-1: it counts as "above" every earlier layer
            token_fields = LOOK_AHEAD_TOKEN_FIELDS if layer < num_layers - 1 else ("gold_id",)
            perturbed = mix_traces(ctx.traces, ctx.other, above, token_fields=token_fields)
            if layer < num_layers - 1:
                perturbed = dataclasses.replace(perturbed, **{
                    name: getattr(ctx.other, name) for name in LOOK_AHEAD_LAYER_FIELDS})
            scores = ctx.scores(perturbed, measure)
            changed = first_difference(base[:, :layer + 1], scores[:, :layer + 1])
            if changed is not None:
                count, token, at = changed
                what = (f"layers > {layer}, final_id, gold_id, {', '.join(LOOK_AHEAD_LAYER_FIELDS)}"
                        if layer < num_layers - 1
                        else "gold_id")
                return FAIL, (f"peeks ahead: changing only {what} changed {count} score(s) at "
                              f"layers <= {layer} (first: token {token}, layer {at}: "
                              f"{base[token, at]:.4g} -> {scores[token, at]:.4g}); the score at "
                              f"layer l may read layers <= l only")
        return PASS, f"no score at layer l depends on layers > l (l = 0..{num_layers - 1})"


class TokenCausalityCheck(Check):
    """A token's scores depend on earlier tokens of its sequence only: at every position ``c``
    the scores of the tokens at positions ``<= c`` are unchanged (1) when every sequence is cut
    after ``c`` (so nothing can read later tokens or where its sequence ends) and (2) when the
    tokens after ``c`` are replaced by other ones."""

    name = "causality-tokens"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        measure = ctx.measure()
        if not type(measure).deployable:
            return SKIP, "not deployable: looks ahead by design (reported as an upper bound)"
        base = ctx.base_scores()
        positions = ctx.traces.position
        last = int(positions.max())
        for cut in range(last + 1):
            kept = positions <= cut
            if cut < last:  # cutting after the last position changes nothing
                scores = ctx.scores(ctx.traces.take(kept), measure)
                changed = first_difference(base[kept], scores)
                if changed is not None:
                    return FAIL, (f"peeks at later tokens: cutting every sequence after "
                                  f"position {cut} changed {changed[0]} score(s) of the tokens "
                                  f"kept (positions <= {cut}); a token's score may use earlier "
                                  f"tokens only, not later ones nor where its sequence ends")
                later = ~kept
                from_other = np.broadcast_to(later[:, None], base.shape)
                perturbed = mix_traces(ctx.traces, ctx.other, from_other, token_rows=later,
                                       token_fields=LOOK_AHEAD_TOKEN_FIELDS)
                scores = ctx.scores(perturbed, measure)
                changed = first_difference(base[kept], scores[kept])
                if changed is not None:
                    return FAIL, (f"peeks at later tokens: changing the tokens after position "
                                  f"{cut} changed {changed[0]} score(s) of tokens at positions "
                                  f"<= {cut}; a token's score may use earlier tokens only")
        return PASS, (f"no token's score depends on later tokens or on its sequence's length "
                      f"(every prefix, positions 0..{last})")


class ThresholdsCheck(Check):
    """``thresholds_for(num_layers)`` is a non-empty sequence of finite numbers."""

    name = "thresholds"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        measure = ctx.measure()
        num_layers = ctx.traces.num_layers
        thresholds = measure.thresholds_for(num_layers)
        try:
            values = np.asarray(list(thresholds), dtype=np.float64)
        except (TypeError, ValueError):
            return FAIL, f"thresholds_for({num_layers}) returned {thresholds!r}; return floats"
        if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
            return FAIL, (f"thresholds_for({num_layers}) returned {thresholds!r}; return a "
                          f"non-empty sequence of finite numbers")
        return PASS, (f"{values.size} thresholds from {values.min():.4g} to {values.max():.4g} "
                      f"at {num_layers} layers")


class CostCheck(Check):
    """A declared cost: a CheckCost with non-negative finite numbers, a boolean checked-layers
    mask, and no exit at a layer that is not checked unless checks are free."""

    name = "cost"

    def run(self, ctx: ValidationContext) -> tuple[str, str]:
        measure = ctx.measure()
        summaries = []
        for label, dims in COST_DIMS.items():
            cost = measure.check_cost(dims)
            if not isinstance(cost, CheckCost):
                return FAIL, (f"check_cost() returned {type(cost).__name__} for {label}; return "
                              f"suite.measures.CheckCost(flops=..., bytes=..., needs_lm_head=...)")
            for attribute in ("flops", "bytes"):
                value = getattr(cost, attribute)
                if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) \
                        or not np.isfinite(value) or value < 0:
                    return FAIL, (f"check_cost() for {label} declares {attribute}={value!r}; "
                                  f"declare a finite number >= 0")
            if not isinstance(cost.needs_lm_head, (bool, np.bool_)):
                return FAIL, f"needs_lm_head={cost.needs_lm_head!r} must be True or False"
            summaries.append(f"{label}: {float(cost.flops):.3g} flops, {float(cost.bytes):.3g} "
                             f"bytes{', LM head' if cost.needs_lm_head else ''}")
            mask = measure.checked_layers(dims.num_layers)
            if not (isinstance(mask, np.ndarray) and mask.dtype == bool
                    and mask.shape == (dims.num_layers,)):
                return FAIL, (f"checked_layers({dims.num_layers}) must return a boolean array "
                              f"of shape [{dims.num_layers}], got {mask!r}")
        scores = ctx.base_scores()
        num_layers = scores.shape[1]
        checked = measure.checked_layers(num_layers)
        cost = measure.check_cost(COST_DIMS["t5-small"])
        pays = cost.flops > 0 or cost.bytes > 0 or bool(cost.needs_lm_head)
        can_exit = np.isfinite(scores[:, :-1]).any(axis=0)  # the last layer exits anyway
        unpriced = np.flatnonzero(can_exit & ~checked[:-1])
        if pays and unpriced.size:
            return FAIL, (f"scores allow exits at layers {unpriced.tolist()}, which "
                          f"checked_layers() does not check, so those checks go unpriced; mark "
                          f"them checked or score them -inf")
        layers = np.flatnonzero(checked).tolist()
        return PASS, "; ".join(summaries) + f"; checks at layers {layers} of {num_layers}"


CHECKS: tuple[Check, ...] = (ApiCheck(), FitCheck(), ShapeCheck(), FiniteCheck(), ReadOnlyCheck(),
                             DeclaredReadsCheck(), DeterminismCheck(), LayerCausalityCheck(),
                             TokenCausalityCheck(), ThresholdsCheck(), CostCheck())
"""The checks, in report order. Each is independent; add one by appending a Check."""


def run_check(check: Check, ctx: ValidationContext) -> CheckResult:
    """Run one check; a blocked check is skipped, an exception from the measure fails it."""
    try:
        status, message = check.run(ctx)
    except Blocked as blocked:
        status, message = SKIP, str(blocked)
    except Exception as exc:  # noqa: BLE001 - the measure's failure is the report's content
        status, message = FAIL, f"the measure raised {describe_exception(exc)}"
    return CheckResult(check=check.name, status=status, message=message)


def measure_label(measure_cls: Any) -> str:
    name = getattr(measure_cls, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(measure_cls, "__name__", repr(measure_cls))


def validate_measure(measure_cls: Any, options: dict[str, Any] | None = None, *,
                     source: str = "runtime", expected_name: str | None = None, seed: int = 0,
                     num_layers: int = 6,
                     checks: tuple[Check, ...] = CHECKS) -> ValidationReport:
    """Run every check on ``measure_cls`` built with ``options``; never raises for a faulty
    measure (the report says what is wrong)."""
    started = time.perf_counter()
    ctx = ValidationContext(measure_cls, options or {}, seed=seed, num_layers=num_layers,
                            expected_name=expected_name)
    session = getattr(measure_cls, "session", None)  # a sandboxed measure's worker
    limits = session.validation_limits() if hasattr(session, "validation_limits") \
        else contextlib.nullcontext()
    with limits:
        results = []
        for check in checks:
            check_started = time.perf_counter()
            results.append(run_check(check, ctx))
            logger.debug("validation of %s: %s took %.1f s", measure_label(measure_cls),
                         check.name, time.perf_counter() - check_started)
    deployable = getattr(measure_cls, "deployable", None)
    return ValidationReport(measure=measure_label(measure_cls), source=source,
                            options=dict(options or {}),
                            deployable=deployable if isinstance(deployable, bool) else None,
                            checks=results, seconds=time.perf_counter() - started)


# -- loading what the user names ------------------------------------------------------------
@dataclass(frozen=True)
class LoadedMeasure:
    """A measure class found from a path, a registry name or ``module:attr``."""

    measure_cls: Any
    source: str
    expected_name: str | None = None
    """The registry name, when loaded by name (the class's ``name`` must match)."""


def load_measure_file(path: str | Path) -> LoadedMeasure:
    """Import a Python file and return its ``MEASURE``, else its one Measure subclass. Only the
    sandbox worker calls this on submitted code (:mod:`suite.sandbox.worker`); the engine
    loads files through :func:`load_measure`."""
    path = Path(path)
    if not path.is_file():
        raise ExitbenchError(f"measure file {path} does not exist; give the path of a .py file "
                             f"or a registered name (see `exitbench ls measures`)")
    module_name = "exitbench_user_measure_" + hashlib.sha256(
        str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ExitbenchError(f"{path} cannot be imported as Python; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - a user file can raise anything
        sys.modules.pop(module_name, None)
        raise ExitbenchError(f"{path} could not be imported ({describe_exception(exc)}); fix "
                             f"the error and rerun") from exc
    if hasattr(module, "MEASURE"):
        return LoadedMeasure(module.MEASURE, str(path))
    found = [value for value in vars(module).values()
             if isinstance(value, type) and issubclass(value, Measure)
             and value.__module__ == module_name and not inspect.isabstract(value)]
    if not found:
        raise ExitbenchError(f"{path} defines no Measure subclass; define a class deriving from "
                             f"suite.measures.Measure (or set MEASURE = YourClass)")
    if len(found) > 1:
        names = ", ".join(sorted(cls.__name__ for cls in found))
        raise ExitbenchError(f"{path} defines several Measure subclasses ({names}); set "
                             f"MEASURE = the one to validate")
    return LoadedMeasure(found[0], str(path))


def load_measure(spec: str, sandbox: SandboxSettings | None = None) -> LoadedMeasure:
    """``spec`` is a path to a ``.py`` file, ``package.module:Class``, or a registered name.

    A file or an importable class is submitted code: it is loaded in a sandbox
    (:func:`suite.sandbox.isolated_measure_class`), never imported here. A registered name
    gives the built-in class, or the sandboxed class of a plugin."""
    from suite.sandbox import MeasureCode, isolated_measure_class

    if spec.endswith(".py") or "/" in spec or Path(spec).is_file():
        code = MeasureCode.from_file(spec)
        measure_cls = isolated_measure_class(code, sandbox, label=Path(spec).stem)
        return LoadedMeasure(measure_cls, f"{spec}, sandboxed ({measure_cls.session.mode})")
    if ":" in spec:
        module, _, attr = spec.partition(":")
        if not module or not attr:
            raise ExitbenchError(f"{spec!r} is not package.module:Class")
        code = MeasureCode(kind="import", origin=spec, import_spec=spec)
        measure_cls = isolated_measure_class(code, sandbox, label=attr)
        return LoadedMeasure(measure_cls, f"{spec}, sandboxed ({measure_cls.session.mode})")
    if spec not in MEASURES:
        raise MEASURES.unknown(spec)
    try:
        measure_cls = MEASURES.get(spec)
    except TypeError as exc:  # the registry's type check: a plugin entry that is not a Measure
        raise ExitbenchError(f"{exc}; fix the plugin's entry point") from exc
    return LoadedMeasure(measure_cls, MEASURES.source(spec), expected_name=spec)


def validate_spec(spec: str, options: dict[str, Any] | None = None, *, seed: int = 0,
                  num_layers: int = 6, sandbox: SandboxSettings | None = None
                  ) -> ValidationReport:
    """:func:`load_measure` then :func:`validate_measure`."""
    loaded = load_measure(spec, sandbox)
    return validate_measure(loaded.measure_cls, options, source=loaded.source,
                            expected_name=loaded.expected_name, seed=seed, num_layers=num_layers)

