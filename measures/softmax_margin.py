"""softmax_margin: top-1 minus top-2 probability of the layer's exit head (CALM's softmax
measure, Schuster et al. 2022).

Cost per check: the LM head and softmax at the layer (``needs_lm_head``; priced by the
engine), then one pass over the ``V`` probabilities keeping the two largest: about two
comparisons per entry (``2 V`` flops) reading the ``V`` float32 probabilities once.
"""

from __future__ import annotations

import numpy as np

from suite.measures import BYTES_PER_VALUE, DENSE_NEAR_ONE, CheckCost, Measure, ModelDims
from suite.traces import TraceArrays


class SoftmaxMargin(Measure):
    name = "softmax_margin"
    description = "softmax top-1 minus top-2 probability at the layer (CALM)"
    reads = frozenset({"top1_prob", "top2_prob"})
    thresholds = DENSE_NEAR_ONE

    def scores(self, traces: TraceArrays) -> np.ndarray:
        return traces.top1_prob.astype(np.float64) - traces.top2_prob.astype(np.float64)

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=2.0 * dims.vocab_size,
                         bytes=float(BYTES_PER_VALUE * dims.vocab_size), needs_lm_head=True)


MEASURE = SoftmaxMargin
