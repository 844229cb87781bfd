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
  "never exit here".

The exit rule is shared and lives in the engine, not in measures: a token exits
at the first layer ``l >= min_layer`` whose score reaches the threshold, else at
the last layer.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from suite.registry import Registry

if TYPE_CHECKING:
    from suite.traces import TraceArrays

MEASURES_DIR = Path(__file__).resolve().parent.parent / "measures"


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
    """Default threshold sweep."""

    def fit(self, traces: TraceArrays, **options: Any) -> None:  # pragma: no cover - default
        """Learn parameters from train-split traces (only when ``needs_fit``)."""
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


MEASURES: Registry[type[Measure]] = Registry("measure", "exitbench.measures",
                                             _discover_builtin_measures, _check_measure)


def get_measure(name: str) -> type[Measure]:
    return MEASURES.get(name)
