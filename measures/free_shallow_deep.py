"""free_shallow_deep: one shallow exit point, else the full model (FREE, Bae et al. 2023).

Tokens whose confidence at the shallow exit layer ``k`` reaches the threshold exit there;
all others run the full depth. Score at layer ``k``: FREE's ``softmax_confidence``
(``util/skip_conf.py``), the softmax top-1 minus top-2 probability, which every FREE script
uses (``--shallow2deep_conf_type softmax``); ``-inf`` at every other layer. FREE learns
its threshold online with a beta mixture: the ``free_adaptive`` threshold schedule
(:mod:`suite.adaptive`); with a constant schedule the threshold is swept.

Options:

- ``shallow_layer``: 0-based index of the exit layer. By default the layer the backbone was
  trained to exit at (its model folder records it; see
  :func:`suite.training.read_backbone`), and for a backbone not trained with FREE's
  objective :func:`suite.training.default_shallow_layer` ``- 1`` (FREE's ``L / 4``: 6 of
  24 layers, so ``k = 5``). Naming another layer for a FREE-trained backbone is an error.
- ``confidence``: ``"margin"`` (FREE's, top-1 minus top-2) or ``"max"`` (top-1, which
  earlier versions of this suite used).

FREE exits when the confidence is strictly above the threshold (``conf <= threshold``
keeps the token); the engine's shared rule exits when it reaches it (``>=``). The two
differ only on exact ties.

Cost per check: made only at layer ``k``; the LM head and softmax there
(``needs_lm_head``), then one pass over the ``V`` probabilities keeping the two largest
(``2 V`` flops, ``V`` float32 values; ``V`` for ``max``). The deferred parallel pass that
fills skipped layers' KV is the engine's to price.
"""

from __future__ import annotations

import numpy as np

from suite.errors import ExitbenchError
from suite.measures import (
    BYTES_PER_VALUE,
    DENSE_NEAR_ONE,
    Backbone,
    CheckCost,
    Measure,
    ModelDims,
)
from suite.traces import TraceArrays

CONFIDENCES = ("margin", "max")


class FreeShallowDeep(Measure):
    name = "free_shallow_deep"
    propagation = "free"
    description = ("one shallow exit layer (the one the backbone was trained with) scored by "
                   "softmax top-1 minus top-2, else full depth (FREE)")
    reads = frozenset({"top1_prob", "top2_prob"})
    thresholds = DENSE_NEAR_ONE

    def __init__(self, shallow_layer: int | None = None, confidence: str = "margin"):
        if shallow_layer is not None and (isinstance(shallow_layer, bool) or
                                          not isinstance(shallow_layer, int) or shallow_layer < 0):
            raise ExitbenchError(f"free_shallow_deep: shallow_layer={shallow_layer!r} is not a "
                                 f"layer index; give a 0-based integer >= 0, or leave it unset "
                                 f"to use the layer the backbone was trained with")
        if confidence not in CONFIDENCES:
            raise ExitbenchError(f"free_shallow_deep: confidence={confidence!r} is not one of "
                                 f"{', '.join(CONFIDENCES)} (FREE's is 'margin')")
        self.shallow_layer = shallow_layer
        self.confidence = confidence
        self.trained_layer: int | None = None
        """The 0-based shallow exit the backbone was trained with, once :meth:`adapt_to` ran."""

    def adapt_to(self, backbone: Backbone) -> None:
        if backbone.objective != "free" or backbone.shallow_layer is None:
            return
        trained = int(backbone.shallow_layer) - 1
        if self.shallow_layer is not None and self.shallow_layer != trained:
            raise ExitbenchError(
                f"free_shallow_deep: shallow_layer={self.shallow_layer} (0-based), but the "
                f"backbone {backbone.path} was trained with FREE's objective to exit at layer "
                f"{trained} (0-based; {backbone.shallow_layer} shallow layers); remove the "
                f"option or set shallow_layer: {trained}")
        self.trained_layer = trained

    def exit_layer(self, num_layers: int) -> int:
        """The 0-based shallow exit layer for a model of ``num_layers`` decoder layers."""
        from suite.training import default_shallow_layer

        if self.shallow_layer is not None:
            layer = self.shallow_layer
        elif self.trained_layer is not None:
            layer = self.trained_layer
        else:
            layer = default_shallow_layer(num_layers) - 1
        if layer > num_layers - 2:
            raise ExitbenchError(
                f"free_shallow_deep: shallow exit layer {layer} leaves no deep part in a model "
                f"of {num_layers} decoder layers; choose shallow_layer <= {num_layers - 2}")
        return layer

    def scores(self, traces: TraceArrays) -> np.ndarray:
        layer = self.exit_layer(traces.num_layers)
        scores = np.full(traces.top1_prob.shape, -np.inf)
        top1 = traces.top1_prob[:, layer].astype(np.float64)
        scores[:, layer] = (top1 - traces.top2_prob[:, layer].astype(np.float64)
                            if self.confidence == "margin" else top1)
        return scores

    def check_cost(self, dims: ModelDims) -> CheckCost:
        passes = 2.0 if self.confidence == "margin" else 1.0
        return CheckCost(flops=passes * dims.vocab_size,
                         bytes=float(BYTES_PER_VALUE * dims.vocab_size), needs_lm_head=True)

    def checked_layers(self, num_layers: int) -> np.ndarray:
        mask = np.zeros(num_layers, dtype=bool)
        mask[self.exit_layer(num_layers)] = True
        return mask


MEASURE = FreeShallowDeep
