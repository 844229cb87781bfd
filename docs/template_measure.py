"""smoothed_top1: a template exit measure to copy. Replace the name, the description, the
fields it reads, the score and the cost; keep the shape of the file.

Score at layer ``l``: the mean top-1 probability over the last ``window`` layers
(``l - window + 1 .. l``; fewer at the first layers), which damps a single confident layer.

Cost per check: the LM head and softmax at the layer (``needs_lm_head``; the engine prices
them), a max over the ``V`` probabilities (``V`` flops reading ``V`` float32 values), and a
running sum over the ``window - 1`` saved earlier top-1 probabilities.

Check it with ``exitbench validate-measure docs/template_measure.py``.
"""

from __future__ import annotations

import numpy as np

from suite.errors import ExitbenchError
from suite.measures import BYTES_PER_VALUE, DENSE_NEAR_ONE, CheckCost, Measure, ModelDims
from suite.traces import TraceArrays


class SmoothedTop1(Measure):
    name = "smoothed_top1"
    description = "mean top-1 probability over the last few layers (template)"
    reads = frozenset({"top1_prob"})  # every trace field scores() touches, and no other
    thresholds = DENSE_NEAR_ONE  # the default sweep; override thresholds_for() if it depends on depth

    def __init__(self, window: int = 2):  # options: keyword arguments with defaults
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ExitbenchError(f"smoothed_top1: window={window!r} must be an integer >= 1")
        self.window = window

    def scores(self, traces: TraceArrays) -> np.ndarray:
        # [tokens, layers], vectorised: a running sum along the layer axis looks back only,
        # so the score at layer l reads layers <= l (causal)
        top1 = traces.top1_prob.astype(np.float64)
        num_layers = top1.shape[1]
        running = np.cumsum(top1, axis=1)
        before_window = np.zeros_like(running)
        before_window[:, self.window:] = running[:, :num_layers - self.window]
        layers_in_window = np.minimum(np.arange(num_layers) + 1, self.window)
        return (running - before_window) / layers_in_window

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=float(dims.vocab_size + self.window),
                         bytes=float(BYTES_PER_VALUE * (dims.vocab_size + self.window - 1)),
                         needs_lm_head=True)

    # checked_layers(): the default (every layer but the last) fits this measure.


MEASURE = SmoothedTop1
