"""top1_rising_heuristic: exit when the top-1 probability rose strictly over the last three
layers and the current one reaches the threshold (the "Monotonic Early Exiting" study's
heuristic, which used a threshold of 0.9; here the threshold is swept).

Score at layer ``l``: ``top1_prob[l]`` when ``top1_prob[l-2] < top1_prob[l-1] <
top1_prob[l]``, else ``-inf``; layers 0 and 1 have no three-layer history and never exit.

Cost per check: the LM head and softmax at every layer but the last (``needs_lm_head``; also
at layers 0 and 1, whose probabilities the later checks need, so they are checked layers),
a max over ``V`` probabilities (``V`` flops reading ``V`` float32 values) and two
comparisons with the two saved previous top-1 probabilities.
"""

from __future__ import annotations

import numpy as np

from suite.measures import BYTES_PER_VALUE, DENSE_NEAR_ONE, CheckCost, Measure, ModelDims
from suite.traces import TraceArrays


class Top1RisingHeuristic(Measure):
    name = "top1_rising_heuristic"
    description = ("top-1 probability rising strictly over the last three layers, scored by "
                   "the current top-1 probability (the study's heuristic)")
    reads = frozenset({"top1_prob"})
    thresholds = DENSE_NEAR_ONE

    def scores(self, traces: TraceArrays) -> np.ndarray:
        top1 = traces.top1_prob.astype(np.float64)
        scores = np.full_like(top1, -np.inf)
        rising = (top1[:, :-2] < top1[:, 1:-1]) & (top1[:, 1:-1] < top1[:, 2:])
        scores[:, 2:] = np.where(rising, top1[:, 2:], -np.inf)
        return scores

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=float(dims.vocab_size) + 3.0,
                         bytes=float(BYTES_PER_VALUE * (dims.vocab_size + 2)), needs_lm_head=True)


MEASURE = Top1RisingHeuristic
