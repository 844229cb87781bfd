"""static_layer: every token exits at the same layer ``k`` (the baseline every measure must
beat: a shallower model for free).

The threshold sweep selects ``k``: the score at layer ``l`` is ``(l + 1) / L``, so a
threshold ``t`` exits at the first layer with ``(l + 1) / L >= t``, and
:meth:`thresholds_for` gives ``t_k = (k + 1) / L`` for ``k = 0 .. L-1``.

Cost: none. The exit layer is fixed before decoding, so no check is made at any layer and
no LM head is needed before the exit layer.
"""

from __future__ import annotations

import numpy as np

from suite.measures import CheckCost, Measure, ModelDims
from suite.traces import TraceArrays


class StaticLayer(Measure):
    name = "static_layer"
    description = "every token exits at the same layer k; the sweep runs over k (baseline)"
    reads = frozenset({"top1_id"})  # only for the shape of the traces
    thresholds = tuple(float(t) for t in np.round(np.linspace(0.0, 1.0, 21), 4))
    """Depth-independent fallback; :meth:`thresholds_for` gives one threshold per layer."""

    def scores(self, traces: TraceArrays) -> np.ndarray:
        num_tokens, num_layers = traces.top1_id.shape
        layer_fraction = (np.arange(num_layers, dtype=np.float64) + 1.0) / num_layers
        return np.broadcast_to(layer_fraction, (num_tokens, num_layers)).copy()

    def thresholds_for(self, num_layers: int) -> tuple[float, ...]:
        # the same float64 expression as scores(), so t_k == score[k] exactly
        return tuple(float(t) for t in (np.arange(num_layers, dtype=np.float64) + 1.0)
                     / num_layers)

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=0.0, bytes=0.0, needs_lm_head=False)

    def checked_layers(self, num_layers: int) -> np.ndarray:
        return np.zeros(num_layers, dtype=bool)


MEASURE = StaticLayer
