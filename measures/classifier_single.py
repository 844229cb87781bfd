"""classifier_single: a learned classifier on the current layer's hidden state (CALM's
"meta" measure, Schuster et al. 2022). Score: the classifier's probability that the layer's
prediction is good enough to exit (see :mod:`suite.learned` for labels and training).

Options: ``head`` (``"linear"``, as in CALM, or ``"mlp"``: linear, ReLU, linear),
``hidden_size`` (the MLP's width), and the training options of
:class:`suite.learned.LearnedMeasure` (``epochs``, ``batch_size``, ``learning_rate``,
``seed``, ``label``, ``balance``, ``cache_dir``). ``balance`` defaults to ``"per_layer"``:
CALM balances the two classes within each layer (t5x ``loss_fn_meta_cls``).

Cost per check: RMS norm of the state (``3 d``), the head (linear: ``2 * 2 d`` flops; MLP:
``2 (d h + 2 h)`` plus ``h`` for the ReLU), a two-class softmax; bytes: the head's weights
and the state, float32. No LM head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from suite.errors import ExitbenchError
from suite.learned import LearnedMeasure
from suite.measures import ModelDims


@dataclass(frozen=True)
class Head:
    """A head architecture: how to build it and what one check through it costs."""

    build: Callable[[int, int], nn.Module]
    """``(d_model, hidden_size) -> module`` acting on the last axis."""
    flops: Callable[[int, int], float]
    """``(d_model, hidden_size) -> flops`` for one hidden state."""


HEADS = {
    "linear": Head(build=lambda d, h: nn.Linear(d, 2), flops=lambda d, h: 2.0 * d * 2),
    "mlp": Head(build=lambda d, h: nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, 2)),
                flops=lambda d, h: 2.0 * (d * h + h * 2) + h),  # + h: the ReLU
}


class ClassifierSingle(LearnedMeasure):
    name = "classifier_single"
    description = "learned classifier on the current layer's hidden state (CALM's meta measure)"
    default_balance = "per_layer"

    def __init__(self, head: str = "linear", hidden_size: int = 64, **training: Any):
        super().__init__(**training)
        if head not in HEADS:
            raise ExitbenchError(f"classifier_single: head={head!r} is not one of "
                                 f"{', '.join(sorted(HEADS))}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ExitbenchError(f"classifier_single: hidden_size={hidden_size!r} must be an "
                                 f"integer >= 1")
        self.head = head
        self.hidden_size = hidden_size

    def architecture(self) -> dict[str, Any]:
        return {"head": self.head, "hidden_size": self.hidden_size if self.head == "mlp" else None}

    def build_network(self, d_model: int) -> nn.Module:
        # nn.Linear acts on the last axis, so [B, L, d] -> [B, L, 2], each layer on its own
        return HEADS[self.head].build(d_model, self.hidden_size)

    def network_flops(self, dims: ModelDims) -> float:
        return HEADS[self.head].flops(dims.d_model, self.hidden_size)


MEASURE = ClassifierSingle
