"""hidden_state_saturation: cosine similarity of the layer's hidden state with the previous
layer's (CALM's state-propagation measure, Schuster et al. 2022).

Option ``states``: ``"raw"`` (default: CALM's, which compares the decoder's prelogits, the
layer outputs before the final norm: t5x ``get_pred_confidence``, ``conf_method='state'``,
on ``return_prelogits`` outputs of flaxformer's ``calm_architecture.py``) or ``"normed"``
(the study's ``hidden_state_saturation`` in ``src/util/skip_conf.py``, over its
final-normed ``all_hidden_states``): the trace fields ``cos_prev`` and ``cos_prev_normed``.

Layer 0 never exits: its "previous state" would be the decoder input embedding, which is not
a layer output, so its score is ``-inf`` and no check is made there.

Cost per check: three dot products of length ``d`` (``h_l . h_{l-1}``, ``|h_l|^2``,
``|h_{l-1}|^2``: ``6 d`` flops) plus a square root and a division, reading the current and
the saved previous hidden state (``2 d`` float32 values). No LM head at the check; the
engine still pays the head once, at the exit layer.
"""

from __future__ import annotations

import numpy as np

from suite.errors import ExitbenchError
from suite.measures import BYTES_PER_VALUE, DENSE_NEAR_ONE, CheckCost, Measure, ModelDims
from suite.traces import TraceArrays

STATES = ("raw", "normed")


class HiddenStateSaturation(Measure):
    name = "hidden_state_saturation"
    description = "cosine similarity of consecutive layers' hidden states (CALM's state measure)"
    reads = frozenset({"cos_prev", "cos_prev_normed"})
    thresholds = DENSE_NEAR_ONE

    def __init__(self, states: str = "raw"):
        if states not in STATES:
            raise ExitbenchError(f"hidden_state_saturation: states={states!r} is not one of "
                                 f"{', '.join(STATES)} (raw: CALM's; normed: the study's)")
        self.states = states

    def scores(self, traces: TraceArrays) -> np.ndarray:
        scores = traces.cosines("prev", self.states == "normed").astype(np.float64)
        scores[:, 0] = -np.inf
        return scores

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=6.0 * dims.d_model + 2.0,
                         bytes=float(2 * BYTES_PER_VALUE * dims.d_model), needs_lm_head=False)

    def checked_layers(self, num_layers: int) -> np.ndarray:
        mask = super().checked_layers(num_layers)
        mask[0] = False
        return mask


MEASURE = HiddenStateSaturation
