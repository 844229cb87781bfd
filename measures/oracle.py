"""oracle: exit at the earliest layer from which the prediction never changes again (the
layer's top-1 equals the final token at that layer and every later one). An upper bound for
consistency-preserving exits, not a deployable measure: it looks ahead by design.

Score: ``1.0`` at layers from which the prediction is stable, ``-inf`` before; with the
single threshold ``1.0`` the shared exit rule picks the earliest stable layer.

Cost: declared free (no check, no LM head), so the oracle prices the best exits a measure
could find, without any measure overhead.
"""

from __future__ import annotations

import numpy as np

from suite.measures import CheckCost, Measure, ModelDims
from suite.traces import TraceArrays


class Oracle(Measure):
    name = "oracle"
    description = "earliest layer whose prediction never changes again (upper bound)"
    reads = frozenset({"top1_id", "final_id"})
    deployable = False
    thresholds = (1.0,)

    def scores(self, traces: TraceArrays) -> np.ndarray:
        agrees = traces.top1_id == traces.final_id[:, None]
        # stable[l]: agrees at l and every later layer (a reversed running AND)
        stable = np.logical_and.accumulate(agrees[:, ::-1], axis=1)[:, ::-1]
        return np.where(stable, 1.0, -np.inf)

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=0.0, bytes=0.0, needs_lm_head=False)

    def checked_layers(self, num_layers: int) -> np.ndarray:
        return np.zeros(num_layers, dtype=bool)


MEASURE = Oracle
