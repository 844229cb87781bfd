"""free_shallow_deep: one shallow exit point, else the full model (FREE, Bae et al. 2023).

Tokens whose top-1 probability at the shallow exit layer ``k`` reaches the threshold exit
there; all others run the full depth. Score: ``top1_prob[k]`` at layer ``k``, ``-inf`` at
every other layer. FREE learns its threshold (a beta mixture); here it is swept.

Options: ``shallow_layer`` (0-based index of the exit layer) or, when it is not given,
``shallow_fraction`` of the depth: the shallow model has ``round(fraction * L)`` layers
(at least one), so ``k = max(1, round(fraction * L)) - 1``.

Cost per check: made only at layer ``k``; the LM head and softmax there
(``needs_lm_head``), and a max over ``V`` probabilities (``V`` flops, ``V`` float32 values).
The deferred parallel pass that fills skipped layers' KV is the engine's to price.
"""

from __future__ import annotations

import numpy as np

from suite.errors import ExitbenchError
from suite.measures import BYTES_PER_VALUE, DENSE_NEAR_ONE, CheckCost, Measure, ModelDims
from suite.traces import TraceArrays


class FreeShallowDeep(Measure):
    name = "free_shallow_deep"
    propagation = "free"
    description = "one shallow exit layer with softmax top-1 confidence, else full depth (FREE)"
    reads = frozenset({"top1_prob"})
    thresholds = DENSE_NEAR_ONE

    def __init__(self, shallow_layer: int | None = None, shallow_fraction: float = 0.25):
        if shallow_layer is not None and (isinstance(shallow_layer, bool) or
                                          not isinstance(shallow_layer, int) or shallow_layer < 0):
            raise ExitbenchError(f"free_shallow_deep: shallow_layer={shallow_layer!r} is not a "
                                 f"layer index; give a 0-based integer >= 0, or leave it unset "
                                 f"and set shallow_fraction")
        if not 0.0 < float(shallow_fraction) < 1.0:
            raise ExitbenchError(f"free_shallow_deep: shallow_fraction={shallow_fraction!r} must "
                                 f"lie strictly between 0 and 1 (the share of layers in the "
                                 f"shallow model)")
        self.shallow_layer = shallow_layer
        self.shallow_fraction = float(shallow_fraction)

    def exit_layer(self, num_layers: int) -> int:
        """The 0-based shallow exit layer for a model of ``num_layers`` decoder layers."""
        if self.shallow_layer is not None:
            layer = self.shallow_layer
        else:
            layer = max(1, round(self.shallow_fraction * num_layers)) - 1
        if layer > num_layers - 2:
            raise ExitbenchError(
                f"free_shallow_deep: shallow exit layer {layer} leaves no deep part in a model "
                f"of {num_layers} decoder layers; choose shallow_layer <= {num_layers - 2}")
        return layer

    def scores(self, traces: TraceArrays) -> np.ndarray:
        layer = self.exit_layer(traces.num_layers)
        scores = np.full(traces.top1_prob.shape, -np.inf)
        scores[:, layer] = traces.top1_prob[:, layer]
        return scores

    def check_cost(self, dims: ModelDims) -> CheckCost:
        return CheckCost(flops=float(dims.vocab_size),
                         bytes=float(BYTES_PER_VALUE * dims.vocab_size), needs_lm_head=True)

    def checked_layers(self, num_layers: int) -> np.ndarray:
        mask = np.zeros(num_layers, dtype=bool)
        mask[self.exit_layer(num_layers)] = True
        return mask


MEASURE = FreeShallowDeep
