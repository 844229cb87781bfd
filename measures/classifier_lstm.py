"""classifier_lstm: an LSTM run over the hidden states of the layers so far, one step per
layer (the "Monotonic Early Exiting" study). Score at layer ``l``: a linear read-out of the
LSTM's output after step ``l``, as the probability that the layer's prediction is good enough
to exit (see :mod:`suite.learned`). A unidirectional LSTM is causal by construction.

Options: ``hidden_size`` (250 by default) and ``num_lstm_layers`` (1 by default): the
study's code (``LSTMClassifier`` in ``src/models/modeling_t5.py``: ``nn.LSTM(d_model, 250,
1)`` and a linear read-out to two classes); its blog post describes "a two-layered LSTM
network", which ``num_lstm_layers: 2`` gives. Plus the training options of
:class:`suite.learned.LearnedMeasure`. The study feeds the final-normed state
(``final_layer_norm``, with its weight); here each state is RMS-normalised without the
weight and standardised per dimension (:mod:`suite.learned`), which the first linear
layer absorbs.

Cost per check (one LSTM step): RMS norm of the new state (``3 d``); per LSTM layer, four
gates of ``2 (in + h) h`` flops (``in = d`` for the first layer, ``h`` after) plus about
``10 h`` for the gate nonlinearities and the cell update; the read-out (``2 * 2 h``) and a
two-class softmax. Bytes: the LSTM's and read-out's weights, the carried state (``h`` and
``c`` per LSTM layer) and the new hidden state, float32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from suite.errors import ExitbenchError
from suite.learned import LearnedMeasure
from suite.measures import ModelDims

GATES = 4
ELEMENTWISE_FLOPS_PER_UNIT = 10


class LayerwiseLstm(nn.Module):
    """``[B, L, d] -> [B, L, 2]``: an LSTM over the layer axis and a linear read-out."""

    def __init__(self, d_model: int, hidden_size: int, num_lstm_layers: int):
        super().__init__()
        self.lstm = nn.LSTM(d_model, hidden_size, num_layers=num_lstm_layers, batch_first=True)
        self.readout = nn.Linear(hidden_size, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(hidden)
        return self.readout(outputs)


class ClassifierLstm(LearnedMeasure):
    name = "classifier_lstm"
    description = "learned LSTM over the hidden states of all layers so far (the study)"

    def __init__(self, hidden_size: int = 250, num_lstm_layers: int = 1, **training: Any):
        super().__init__(**training)
        for option, value in (("hidden_size", hidden_size), ("num_lstm_layers", num_lstm_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ExitbenchError(f"classifier_lstm: {option}={value!r} must be an integer "
                                     f">= 1")
        self.hidden_size = hidden_size
        self.num_lstm_layers = num_lstm_layers

    def architecture(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "num_lstm_layers": self.num_lstm_layers}

    def build_network(self, d_model: int) -> nn.Module:
        return LayerwiseLstm(d_model, self.hidden_size, self.num_lstm_layers)

    def network_flops(self, dims: ModelDims) -> float:
        hidden = self.hidden_size
        flops = 0.0
        for lstm_layer in range(self.num_lstm_layers):
            inputs = dims.d_model if lstm_layer == 0 else hidden
            flops += GATES * 2.0 * (inputs + hidden) * hidden + ELEMENTWISE_FLOPS_PER_UNIT * hidden
        return flops + 2.0 * hidden * 2

    def state_values(self, dims: ModelDims) -> int:
        return 2 * self.num_lstm_layers * self.hidden_size  # h and c per LSTM layer


MEASURE = ClassifierLstm
