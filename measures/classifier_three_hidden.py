"""classifier_three_hidden: a two-layer MLP on the concatenated hidden states of the last three
layers ``[h_{l-2}; h_{l-1}; h_l]`` (the "Monotonic Early Exiting" study). Score: the MLP's
probability that the layer's prediction is good enough to exit (see :mod:`suite.learned`).

Layers 0 and 1 lack a three-layer window. They score ``-inf`` (never exit) rather than
zero-padding the window: a padded input is one the MLP never sees at other layers, and
padding would make the first two layers a different classifier in disguise. They are not
checked either. Causal by construction: the window only looks back.

Options: ``hidden_size`` (the MLP's width; by default ``d_model``, as the study's code:
``nn.Linear(config.d_model * 3, config.d_model)`` in ``src/models/modeling_t5.py``, whose
layers carry no bias where these do) and the training options of
:class:`suite.learned.LearnedMeasure`.

Cost per check: RMS norm of the new state (``3 d``; the two earlier ones were normalised when
they were produced), the MLP (``2 (3 d h + 2 h)`` plus ``h`` for the ReLU), a two-class
softmax; bytes: the MLP's weights, the current state and the two saved ones (float32).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from suite.errors import ExitbenchError
from suite.learned import LearnedMeasure
from suite.measures import ModelDims

WINDOW = 3


class ThreeLayerWindowMlp(nn.Module):
    """``[B, L, d] -> [B, L, 2]``: an MLP on each window of three consecutive layers; the first
    ``WINDOW - 1`` layers get zero logits (the measure masks them to ``-inf``)."""

    def __init__(self, d_model: int, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(WINDOW * d_model, hidden_size), nn.ReLU(),
                                 nn.Linear(hidden_size, 2))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, num_layers, _ = hidden.shape
        logits = hidden.new_zeros(batch, num_layers, 2)
        if num_layers < WINDOW:
            return logits
        # window ending at layer l: (l-2, l-1, l)
        windows = torch.cat([hidden[:, offset:num_layers - WINDOW + 1 + offset]
                             for offset in range(WINDOW)], dim=-1)
        logits[:, WINDOW - 1:] = self.mlp(windows)
        return logits


class ClassifierThreeHidden(LearnedMeasure):
    name = "classifier_three_hidden"
    description = "learned MLP on the last three layers' hidden states (the study)"
    first_scored_layer = WINDOW - 1

    def __init__(self, hidden_size: int | None = None, **training: Any):
        super().__init__(**training)
        if hidden_size is not None and (isinstance(hidden_size, bool)
                                        or not isinstance(hidden_size, int) or hidden_size < 1):
            raise ExitbenchError(f"classifier_three_hidden: hidden_size={hidden_size!r} must be "
                                 f"an integer >= 1")
        self.hidden_size = hidden_size

    def architecture(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "window": WINDOW}

    def build_network(self, d_model: int) -> nn.Module:
        return ThreeLayerWindowMlp(d_model, self.width(d_model))

    def network_flops(self, dims: ModelDims) -> float:
        width = self.width(dims.d_model)
        return 2.0 * (WINDOW * dims.d_model * width + width * 2) + width

    def width(self, d_model: int) -> int:
        """The MLP's hidden width: ``hidden_size``, or ``d_model`` when unset (the study's)."""
        return self.hidden_size if self.hidden_size is not None else d_model

    def state_values(self, dims: ModelDims) -> int:
        return (WINDOW - 1) * dims.d_model


MEASURE = ClassifierThreeHidden
