"""softmax_max: the top-1 probability of the layer's exit head.

Cost per check: the LM head and softmax at the layer (``needs_lm_head``; priced by the
engine), then a max over the ``V`` probabilities: ``V`` comparisons reading ``V`` float32
values once.
"""

from __future__ import annotations

import numpy as np

from suite.measures import BYTES_PER_VALUE, DENSE_NEAR_ONE, CheckCost, Measure, ModelDims
from suite.traces import TraceArrays


class SoftmaxMax(Measure):
    name = "softmax_max"
    description = "softmax top-1 probability at the layer"
    reads = frozenset({"top1_prob"})
    thresholds = DENSE_NEAR_ONE

    def scores(self, traces: TraceArrays) -> np.ndarray:
        return traces.top1_prob.astype(np.float64)

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=float(dims.vocab_size),
                         bytes=float(BYTES_PER_VALUE * dims.vocab_size), needs_lm_head=True)


MEASURE = SoftmaxMax
