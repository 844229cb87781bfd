"""Self-speculative decoding (LayerSkip-style): the method's settings, shared by replay
(:mod:`suite.speculative.replay`), the cost model (:func:`suite.cost.speculative_cost`) and
the online decoder (:mod:`suite.speculative.online`).

The method, as LayerSkip's ``SelfSpeculativeGenerationStrategy`` runs it
(``self_speculation/self_speculation_generator.py`` and ``llama_model_utils.py`` of
facebookresearch/LayerSkip; lines cited in ``docs/self_speculative.md``): a decode is a
sequence of *cycles*. A cycle starting at position ``p`` (every earlier position verified,
the last emitted token not yet run through any layer)

1. **drafts** up to ``k`` tokens, one step each, with the first ``E`` decoder layers and
   the exit head at layer ``E - 1`` (``forward_early``: ``model.layers[:exit_layer]``),
   keeping each step's layer ``E - 1`` state (LayerSkip's ``exit_query_cache``);
2. **verifies** them in one pass: the last draft token runs layers ``0..E-1``, then layers
   ``E..L-1`` run the ``c + 1`` positions ``p..p+c`` together, reusing the draft's K/V
   below ``E`` (``forward_remainder``), and the LM head predicts each of them;
3. **accepts** the leading drafts that equal the full model's prediction, emits them and
   the full model's token at the first mismatch (or after the last draft), and **rolls
   back** the cache to the accepted positions (``crop_past_key_values``).

Greedy self-speculation is lossless: every emitted token is the full model's greedy token.
``E`` is :attr:`SelfSpeculation.draft_depth` (LayerSkip's ``exit_layer``), ``k``
:attr:`SelfSpeculation.draft_length` (its ``num_speculations``).

Draft length per cycle: ``min(k, budget - 1)`` with ``budget`` the tokens the sequence may
still emit (LayerSkip's ``min(num_speculations, max_steps - len(output_ids) - 1)``), so a
cycle never emits past ``max_new_tokens``. By default, unlike LayerSkip, the draft does not
stop when it drafts EOS (its line 146): a fixed ``k`` keeps every cycle's draft count
determined by the trace; an accepted EOS still ends the sequence, and drafts after it are
not accepted. ``stop_at_eos`` restores LayerSkip's rule (draft counts then become bounds
where the trace cannot say whether the draft emits EOS).

An optional **draft-stopping rule** (Kangaroo; LayerSkip's dynamic variants) ends a
cycle's drafting after a drafted token whose score, by any registered measure at the
draft's exit layer ``E - 1``, does not reach a threshold (that token is still verified).
The measure sees what the draft computes, the fields of layer ``E - 1`` only
(:func:`draft_layer_view`): its exit head and its hidden state (``cos_prev`` against layer
``E - 2``'s); a measure that reads earlier layers sees them unknown (NaN) there, online and
in replay alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite.errors import ExitbenchError
from suite.measures import Measure
from suite.traces import LAYER_FIELDS, TraceArrays

METHOD = "self_speculative"
"""The method's name in configs and result rows (early exit is ``early_exit``)."""
EARLY_EXIT = "early_exit"

HEAD_AND_STATE_FIELDS = ("top1_id", "top1_prob", "top2_prob", "cos_prev")
"""Per-layer fields the draft computes at its exit layer (the rest stay unknown)."""


@dataclass(frozen=True)
class DraftStop:
    """Stop drafting after a drafted token whose score at the draft's exit layer is below
    ``threshold`` (a score that does not reach it: NaN stops too)."""

    measure: Measure
    threshold: float
    measure_name: str
    """The measure's registry name (keys measured check tables)."""

    def check(self, exit_layer: int, num_layers: int) -> None:
        from suite.online import ExitPolicy

        # what online decoding refuses (look-ahead fields, undeployable measures), refused here
        ExitPolicy(self.measure, self.threshold).check(num_layers)
        if not bool(np.asarray(self.measure.checked_layers(num_layers), bool)[exit_layer]):
            raise ExitbenchError(f"draft-stopping measure {self.measure_name!r} makes no check "
                                 f"at layer {exit_layer} (the draft's exit layer); choose a "
                                 f"measure that checks there or another draft depth")

    def unsure(self, scores: np.ndarray) -> np.ndarray:
        """``[N]`` True where drafting stops after the token (score below the threshold)."""
        with np.errstate(invalid="ignore"):
            return ~(np.asarray(scores, np.float64) >= self.threshold)


@dataclass(frozen=True)
class SelfSpeculation:
    """One self-speculative decoding setting."""

    draft_depth: int
    """``E``: the draft runs decoder layers ``0..E-1`` and exits at layer ``E - 1``."""
    draft_length: int
    """``k``: tokens drafted per cycle at most."""
    stop: DraftStop | None = None
    stop_at_eos: bool = False
    """Also stop drafting after a drafted EOS, as LayerSkip does. Off by default: after a
    rejected draft the trace does not say whether the draft emits EOS, so the draft count
    becomes a bound there (as with a stopping rule)."""

    @property
    def draft_stops(self) -> bool:
        """True when a cycle may draft fewer than ``min(k, budget - 1)`` tokens."""
        return self.stop is not None or self.stop_at_eos

    @property
    def exit_layer(self) -> int:
        """The draft's exit layer (0-based): ``E - 1``."""
        return self.draft_depth - 1

    def check(self, num_layers: int) -> None:
        """Errors naming what does not fit a model of ``num_layers`` decoder layers."""
        if not 1 <= self.draft_depth <= num_layers - 1:
            raise ExitbenchError(f"draft_depth {self.draft_depth} is outside 1..{num_layers - 1} "
                                 f"for a model of {num_layers} decoder layers (the draft runs "
                                 f"layers 0..E-1; the verification at least one more)")
        if self.draft_length < 1:
            raise ExitbenchError(f"draft_length {self.draft_length} must be at least 1")
        if self.stop is not None:
            self.stop.check(self.exit_layer, num_layers)

    def options(self) -> dict[str, Any]:
        """What a result row records in ``method_options``."""
        options: dict[str, Any] = {"draft_depth": self.draft_depth,
                                   "draft_length": self.draft_length}
        if self.stop is not None:
            options.update(stop_measure=self.stop.measure_name,
                           stop_threshold=float(self.stop.threshold))
        if self.stop_at_eos:
            options["stop_at_eos"] = True
        return options

    def label(self) -> str:
        """``E=3 k=4`` (plus ``stop softmax_max<0.5``, ``stop at EOS``)."""
        return options_label(self.options())


def options_label(options: dict[str, Any]) -> str:
    """A point's options (:meth:`SelfSpeculation.options`, a row's ``method_options``) for
    people: ``E=3 k=4``, plus the stopping rule and ``stop at EOS``."""
    text = f"E={options.get('draft_depth')} k={options.get('draft_length')}"
    if "stop_measure" in options:
        text += f" stop {options['stop_measure']}<{options.get('stop_threshold'):g}"
    if options.get("stop_at_eos"):
        text += " stop at EOS"
    return text


def draft_layer_view(traces: TraceArrays, exit_layer: int) -> TraceArrays:
    """``traces`` as the draft sees them at its exit layer: at ``exit_layer`` the exit head's
    fields and ``cos_prev``, every other per-layer field unknown (NaN, ``-1`` ids), hidden
    states only at ``exit_layer`` (zeros elsewhere), and the look-ahead token fields
    ``-1`` -- what :class:`suite.online.LayerScorer` holds when only that layer is observed."""
    values: dict[str, Any] = {f.name: getattr(traces, f.name) for f in dataclasses.fields(traces)}
    num_tokens, num_layers = traces.num_tokens, traces.num_layers
    for name, dtype in LAYER_FIELDS.items():
        unknown = np.full((num_tokens, num_layers), -1 if name == "top1_id" else np.nan, dtype)
        if name in HEAD_AND_STATE_FIELDS:
            unknown[:, exit_layer] = getattr(traces, name)[:, exit_layer]
        values[name] = unknown
    if traces.hidden is not None:
        hidden = np.zeros_like(traces.hidden)
        hidden[:, exit_layer] = traces.hidden[:, exit_layer]
        values["hidden"] = hidden
    values["final_id"] = np.full(num_tokens, -1, np.int32)
    values["gold_id"] = np.full(num_tokens, -1, np.int32)
    values["exit_layer"] = None
    return TraceArrays(**values)


def stop_scores(stop: DraftStop, traces: TraceArrays, exit_layer: int) -> np.ndarray:
    """``[T]`` the stopping measure's score of every recorded token at the draft's exit
    layer, from the fields the draft computes there (:func:`draft_layer_view`)."""
    scores = np.asarray(stop.measure.scores(draft_layer_view(traces, exit_layer)))
    if scores.shape != (traces.num_tokens, traces.num_layers):
        raise ExitbenchError(f"draft-stopping measure {stop.measure_name!r} returned scores of "
                             f"shape {scores.shape} for {traces.num_tokens} tokens x "
                             f"{traces.num_layers} layers")
    return scores[:, exit_layer]


METHOD_MODULES = ("speculative/method.py", "speculative/replay.py", "speculative/online.py",
                  "speculative/sweep.py", "cost.py")
"""The sources a self-speculative row's numbers depend on (its code hash)."""


def method_code_hash() -> str:
    """SHA-256 over the method's modules (the ``measure_code_hash`` of its rows)."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent.parent  # suite/
    for name in METHOD_MODULES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()


def options_json(spec: SelfSpeculation) -> str:
    return json.dumps(spec.options(), sort_keys=True)
