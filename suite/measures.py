"""The measure contract: what an exit measure declares and computes.

A measure is a class registered by name. Built-ins are the modules of
``measures/`` (module ``measures/<name>.py`` exposes its class as ``MEASURE``);
plugins come from the ``exitbench.measures`` entry-point group (the entry point
names the class). The engine (replay, cost model, validation) sees a measure
only through this contract:

- ``reads``: the trace fields it needs (see :class:`suite.traces.TraceArrays`);
  ``"hidden"`` means per-layer hidden states, re-materialised on demand.
- ``needs_fit`` and :meth:`Measure.fit`: learned measures fit on train-split traces.
- :meth:`Measure.check_cost`: the price of one check at one layer for one token.
- :meth:`Measure.scores`: a float score per token per layer, **causal**: the
  score at layer ``l`` may depend on layers ``<= l`` only. ``-inf`` means
  "never exit here"; NaN and ``+inf`` are invalid.
- :meth:`Measure.checked_layers`: where a check is made and paid for. The exit
  rule reads the scores at every layer; a layer a measure cannot exit at has
  ``-inf`` there. A measure whose decision costs nothing at run time (a static
  exit layer, the oracle) may check nowhere and still exit.
- :meth:`Measure.thresholds_for`: the threshold sweep for a model depth.
- :meth:`Measure.adapt_to`: called once with the :class:`Backbone` the measure runs on
  (what the model folder records about how it was trained), before fitting or scoring;
  the FREE measure reads the shallow layer its backbone was trained to exit at.

Options: a measure's constructor takes its options as keyword arguments with
defaults (``MyMeasure(hidden_size=64)``); the engine instantiates the class with
the options from the suite config. :func:`code_hash` hashes a measure's source
for result provenance and learned-weight caches.

The exit rule is shared and lives in the engine, not in measures: a token exits
at the first layer ``l >= min_layer`` whose score reaches the threshold, else at
the last layer.
"""

from __future__ import annotations

import abc
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from suite.registry import Registry

if TYPE_CHECKING:
    from suite.traces import TraceArrays

MEASURES_DIR = Path(__file__).resolve().parent.parent / "measures"

TRACE_FIELDS: frozenset[str] = frozenset({
    "top1_id", "top1_prob", "top2_prob", "cos_prev", "cos_last", "final_prob",  # [T, L]
    "cos_prev_normed", "cos_last_normed",  # [T, L], final-normed states
    "example_id", "position", "final_id", "gold_id",  # per token [T]
    "hidden",  # per layer [T, L, d_model], re-materialised on demand
})
"""The trace fields a measure may name in ``reads`` (see :class:`suite.traces.TraceArrays`)."""

BYTES_PER_VALUE = 4
"""Cost declarations count weights and saved states as float32 (4 bytes per value)."""

DENSE_NEAR_ONE: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9,
                                     0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999,
                                     0.9995, 0.9999, 1.0)
"""A threshold sweep for scores in [0, 1] that cluster near 1 (probabilities, cosines)."""


@dataclass(frozen=True)
class ModelDims:
    """The sizes a cost declaration may depend on."""

    num_layers: int
    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    vocab_size: int


@dataclass(frozen=True)
class Backbone:
    """What the model folder records about how a backbone was trained (see
    :func:`suite.training.read_backbone`); every field is ``None`` for a checkpoint the
    suite did not train (a hub id, a folder without ``exitbench_model.json``)."""

    path: str
    """The model path of the config (folder or hub id)."""
    objective: str | None = None
    """The training objective (``vanilla``, ``calm``, ``free``, ...)."""
    shallow_layer: int | None = None
    """FREE: the number of shallow decoder layers it was trained with (1-based, so the
    shallow exit is 0-based layer ``shallow_layer - 1``)."""


@dataclass(frozen=True)
class CheckCost:
    """Price of one confidence check at one layer for one token."""

    flops: float
    """Floating-point operations of the measure itself (the LM head excluded)."""
    bytes: float
    """Bytes of weights and state the check reads from memory."""
    needs_lm_head: bool
    """True when the check needs this layer's exit logits (norm + LM head + softmax)."""


class Measure(abc.ABC):
    """Base class of exit measures. Subclasses set the class attributes and implement
    :meth:`scores` and :meth:`check_cost`; learned ones also :meth:`fit`."""

    name: ClassVar[str]
    description: ClassVar[str]
    reads: ClassVar[frozenset[str]]
    needs_fit: ClassVar[bool] = False
    deployable: ClassVar[bool] = True
    """False for upper bounds such as the oracle, which look ahead by design."""
    thresholds: ClassVar[tuple[float, ...]] = tuple(np.round(np.linspace(0.0, 1.0, 21), 4))
    """Default threshold sweep (see :meth:`thresholds_for`)."""
    propagation: ClassVar[str] = "calm"
    """How skipped layers get their key/value entries, which the cost model prices:
    ``calm`` (the exited state is propagated: K/V projections of each skipped layer) or
    ``free`` (FREE's synchronized parallel decoding of the skipped layers later)."""
    fit_reads: ClassVar[frozenset[str]] = frozenset()
    """Trace fields :meth:`fit` reads besides ``reads`` (e.g. labels: ``top1_id``,
    ``final_id``, ``gold_id``); :meth:`scores` may read only ``reads``."""

    def fit(self, traces: TraceArrays, **options: Any) -> None:  # pragma: no cover - default
        """Learn parameters from train-split traces (only when ``needs_fit``). Options the
        engine and validation may pass: ``epochs``, ``seed``, ``cache_dir``; a measure
        accepts those it uses. Fitting must be deterministic for a given seed."""
        if self.needs_fit:
            raise NotImplementedError(f"measure {self.name!r} needs fit() but does not define it")

    @abc.abstractmethod
    def scores(self, traces: TraceArrays) -> np.ndarray:
        """``[tokens, layers]`` float scores; causal in the layer axis."""

    @abc.abstractmethod
    def check_cost(self, dims: ModelDims) -> CheckCost:
        """Price of one check at one layer for one token."""

    def checked_layers(self, num_layers: int) -> np.ndarray:
        """Boolean mask ``[layers]`` of the layers at which a check is made (and paid for).
        By default every layer but the last (the last layer exits unconditionally)."""
        mask = np.ones(num_layers, dtype=bool)
        mask[-1] = False
        return mask

    def adapt_to(self, backbone: Backbone) -> None:
        """Take what the measure needs from the backbone it runs on (called by the engine
        before :meth:`fit` and :meth:`scores`); by default nothing. Raise
        :class:`suite.errors.ExitbenchError` when the options contradict the backbone."""
        return None

    def thresholds_for(self, num_layers: int) -> tuple[float, ...]:
        """The threshold sweep for a model with ``num_layers`` decoder layers. By default the
        class's ``thresholds``; a measure whose sweep depends on depth (static_layer) overrides it."""
        return tuple(float(t) for t in self.thresholds)


def code_hash(measure_cls: type) -> str:
    """SHA-256 of the source file that defines ``measure_cls`` (its whole module, so helper
    functions beside the class count too); for a sandboxed measure, the hash of its submitted
    code (:attr:`suite.sandbox.MeasureCode.sha256`)."""
    sandboxed = getattr(measure_cls, "code_sha256", None)
    if isinstance(sandboxed, str):
        return sandboxed
    digest = hashlib.sha256()
    try:
        digest.update(Path(inspect.getfile(measure_cls)).read_bytes())
    except (TypeError, OSError):  # defined interactively: fall back to the qualified name
        digest.update(f"{measure_cls.__module__}.{measure_cls.__qualname__}".encode())
    return digest.hexdigest()


def _discover_builtin_measures(registry: Registry[type[Measure]]) -> None:
    for path in sorted(MEASURES_DIR.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        registry.register(path.stem, f"measures.{path.stem}:MEASURE", source="builtin")


def _check_measure(name: str, value: Any) -> type[Measure]:
    if not (isinstance(value, type) and issubclass(value, Measure)):
        raise TypeError(f"measure {name!r} must be a subclass of suite.measures.Measure, "
                        f"got {value!r}")
    return value


def _sandboxed_plugin(entry_point: Any, dist: str):
    """Plugins are submitted code too: their class is imported inside the sandbox only."""
    def load() -> type[Measure]:
        from suite.sandbox import MeasureCode, default_settings, isolated_measure_class

        code = MeasureCode(kind="import", origin=f"plugin:{dist}", import_spec=entry_point.value)
        return isolated_measure_class(code, default_settings(), label=entry_point.name)
    return load


MEASURES: Registry[type[Measure]] = Registry("measure", "exitbench.measures",
                                             _discover_builtin_measures, _check_measure,
                                             plugin_loader=_sandboxed_plugin)


def get_measure(name: str) -> type[Measure]:
    """A measure class by name: a stored submission of the run this process works on
    (sandboxed; :mod:`suite.submissions`), else a built-in or plugin from the registry."""
    from suite.submissions import submission_class

    return submission_class(name) or MEASURES.get(name)


def measure_source(name: str) -> str:
    """Where :func:`get_measure`'s class comes from: ``submission:<path>``, ``builtin`` or
    ``plugin:<dist>``."""
    from suite.submissions import registered_submission

    submission = registered_submission(name)
    if submission is not None:
        return f"submission:{submission.source_path}"
    return MEASURES.source(name)
