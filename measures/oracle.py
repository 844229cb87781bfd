"""oracle: exit at the first layer whose prediction equals the full model's token (CALM's
oracle, ``oracle_tok_consistency`` in t5x ``t5x/contrib/calm/models.py``: "exit first time
prediction is the same as top layer"). An upper bound for consistency-preserving exits,
not a deployable measure: it looks ahead at the last layer by design.

Score: ``1.0`` at layers whose top-1 equals ``final_id``, ``-inf`` elsewhere; with the
single threshold ``1.0`` the shared exit rule picks the first agreeing layer (from
``min_layer`` on), so top-1 ``[7, 3, 7, 7]`` with final token 7 exits at layer 0. Every
replayed token therefore equals the full-depth one along the recorded trajectory.

This is the tight bound: the earlier rule "the first layer from which the prediction never
changes again" exits no earlier and often later (at layer 2 in the example). The analyses
report that share directly (``stable_fraction`` in :mod:`suite.analysis`).

Cost: declared free (no check, no LM head), so the oracle prices the best exits a measure
could find, without any measure overhead.
"""

from __future__ import annotations

import numpy as np

from suite.measures import CheckCost, Measure, ModelDims
from suite.traces import TraceArrays


class Oracle(Measure):
    name = "oracle"
    description = "first layer whose prediction equals the full model's token (CALM's oracle)"
    reads = frozenset({"top1_id", "final_id"})
    deployable = False
    thresholds = (1.0,)

    def scores(self, traces: TraceArrays) -> np.ndarray:
        agrees = traces.top1_id == traces.final_id[:, None]
        return np.where(agrees, 1.0, -np.inf)

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=0.0, bytes=0.0, needs_lm_head=False)

    def checked_layers(self, num_layers: int) -> np.ndarray:
        return np.zeros(num_layers, dtype=bool)


MEASURE = Oracle
