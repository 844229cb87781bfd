"""Self-speculative decoding replayed from full-depth traces: every cycle's drafts,
acceptances and emitted tokens, exactly, without running the model.

Why the trace determines it (:mod:`suite.speculative.method` describes the method): within an
accepted prefix the draft reads the same inputs as the full model did, so its prediction
at each position ``p + i`` (for ``i`` up to and including the first rejected draft) is the
recorded top-1 at layer ``E - 1``, ``top1_id[p + i, E - 1]``, and the full model's is the
recorded ``final_id[p + i]``. So for a cycle starting at ``p`` with draft limit
``k_c = min(k, budget - 1)``:

- ``f`` = the number of leading positions ``i < k_c`` where the two agree (capped by the
  tokens the sequence has left; an accepted EOS ends it);
- without a stopping rule the cycle drafts ``c = k_c`` tokens and accepts ``a = f``;
- with one it drafts ``c = s + 1`` when the first unsure draft ``s`` lies within the
  recorded trajectory (``s <= f``, its score read at layer ``E - 1`` of the trace), and
  accepts ``a = min(f, c)`` (``stop_at_eos``: a drafted EOS counts as unsure). Otherwise the draft goes on past the first rejected token,
  where its context leaves the recorded trajectory: the trace does not say when it stops,
  so ``c`` is given as bounds ``[min(f + 2, k_c), k_c]`` (``f + 1`` when ``f`` reached the
  sequence's end). The accepted count never needs this (``a = f`` in either case);
- the cycle emits ``a + 1`` tokens (the accepted drafts and the full model's next token),
  or ``a`` when the accepted drafts end the sequence; the next cycle starts at ``p + e``.

Vectorised over tokens: for every position at once the run of matches starting there
(``f``), the first unsure draft (``s``) and so what a cycle starting there would do; a
cycle's successor is then one lookup, and the cycles of all examples are walked together,
one vectorised step per cycle index (at most the longest sequence's length, not per token).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from suite.errors import ExitbenchError
from suite.speculative.method import SelfSpeculation, stop_scores
from suite.traces import TraceArrays


@dataclass(frozen=True)
class SpeculativeReplay:
    """The cycles of a self-speculative decode of every traced example, in (example,
    cycle) order; every array is ``[C]`` over cycles."""

    spec: SelfSpeculation
    example_index: np.ndarray
    """Example of each cycle (``0..E-1`` in trace order)."""
    position: np.ndarray
    """First position the cycle emits (= positions verified before it)."""
    drafted_low: np.ndarray
    """Tokens drafted (lower bound; equal to ``drafted_high`` where the trace decides it)."""
    drafted_high: np.ndarray
    accepted: np.ndarray
    """Leading drafts accepted (exact)."""
    emitted: np.ndarray
    """Tokens the cycle emits (exact): ``accepted + 1``, or ``accepted`` at an accepted EOS."""
    num_examples: int
    num_tokens: int

    @property
    def num_cycles(self) -> int:
        return int(self.position.shape[0])

    @property
    def exact(self) -> bool:
        """True when the trace determines every cycle's draft count."""
        return bool(np.array_equal(self.drafted_low, self.drafted_high))

    def cycles_per_example(self) -> np.ndarray:
        return np.bincount(self.example_index, minlength=self.num_examples)


@dataclass(frozen=True)
class SpeculativeStatistics:
    """What a result row reports about a replayed (or online) self-speculative decode."""

    mean_accepted_tokens: float
    """Tokens emitted per cycle (Spec-Bench's "mean accepted tokens": accepted drafts plus
    the full model's token)."""
    mean_accepted_drafts: float
    """Accepted drafts per cycle."""
    acceptance_rate_low: float
    """Accepted / drafted tokens (LayerSkip's ``acceptance_rate``) at the most drafting the
    bounds allow; equal to ``acceptance_rate_high`` when the trace decides every draft."""
    acceptance_rate_high: float
    mean_cycles: float
    """Cycles per sequence."""
    acceptance_histogram: list[float]
    """Share of cycles accepting ``0..k`` drafts."""
    mean_drafted_low: float
    mean_drafted_high: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _next_index(flags: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """``[T]`` index of the first flagged token at or after each token within its example,
    else the example's end. One reverse running minimum: every later example's indices are
    at least this example's end, so no reset between examples is needed."""
    index = np.where(flags, np.arange(flags.shape[0]), ends)
    return np.minimum.accumulate(index[::-1])[::-1]


def replay_speculation(traces: TraceArrays, spec: SelfSpeculation, max_new_tokens: int,
                       stop_score: np.ndarray | None = None,
                       eos_token_id: int | None = None) -> SpeculativeReplay:
    """Every example's cycles under ``spec`` (see the module docstring). ``max_new_tokens``
    is the budget the traces were recorded with; ``stop_score`` (``[T]``, the stopping
    measure's score at the draft's exit layer) is computed from the traces when the spec
    has a stopping rule and it is not given; ``eos_token_id`` is needed with
    ``stop_at_eos`` (a drafted EOS stops drafting like an unsure draft)."""
    num_layers = traces.num_layers
    spec.check(num_layers)
    if max_new_tokens < 1:
        raise ExitbenchError(f"max_new_tokens is {max_new_tokens}; it must be at least 1")
    starts, ends = traces.example_bounds()
    lengths = ends - starts
    num_tokens, num_examples = traces.num_tokens, len(starts)
    if num_examples and (lengths.max() > max_new_tokens or np.any(
            traces.position != np.arange(num_tokens) - np.repeat(starts, lengths))):
        raise ExitbenchError(f"traces must hold each example's positions 0..n-1 in order, "
                             f"n <= max_new_tokens ({max_new_tokens}); were they recorded "
                             f"with another max_new_tokens?")
    token_end = np.repeat(ends, lengths)
    token = np.arange(num_tokens)
    remaining = token_end - token  # tokens the sequence has left, this one included
    limit = np.clip(np.minimum(spec.draft_length, max_new_tokens - traces.position - 1), 0, None)
    matches = traces.top1_id[:, spec.exit_layer] == traces.final_id
    agreeing = _next_index(~matches, token_end) - token  # run of matches from each token
    agreed = np.minimum(agreeing, limit)  # f
    if not spec.draft_stops:
        drafted_low = drafted_high = limit
        accepted = agreed
    else:
        stops = np.zeros(num_tokens, bool)
        if spec.stop is not None:
            if stop_score is None:
                stop_score = stop_scores(spec.stop, traces, spec.exit_layer)
            stop_score = np.asarray(stop_score)
            if stop_score.shape != (num_tokens,):
                raise ValueError(f"stop_score has shape {stop_score.shape}, expected "
                                 f"({num_tokens},)")
            stops |= spec.stop.unsure(stop_score)
        if spec.stop_at_eos:
            if eos_token_id is None:
                raise ValueError("stop_at_eos needs the model's eos_token_id")
            stops |= traces.top1_id[:, spec.exit_layer] == eos_token_id  # the draft's token
        unsure = _next_index(stops, token_end) - token  # s
        known = (unsure <= agreed) & (unsure < limit) & (unsure < remaining)
        # not known: every draft up to the first rejected one (or to the limit) was sure
        past_rejected = np.minimum(np.where(agreed < remaining, agreed + 2, agreed + 1), limit)
        drafted_low = np.where(known, unsure + 1, past_rejected)
        drafted_high = np.where(known, unsure + 1, limit)
        accepted = np.minimum(agreed, drafted_low)
    emitted = np.where(accepted < remaining, accepted + 1, accepted)

    # walk the cycles: one vectorised step per cycle index, over all examples at once
    cycle_tokens = []
    at = starts.copy()
    active = at < ends
    while active.any():
        current = at[active]
        cycle_tokens.append(np.stack([np.flatnonzero(active), current]))
        at[active] = current + emitted[current]
        active = at < ends
    if cycle_tokens:
        example_index, first = np.concatenate(cycle_tokens, axis=1)
        order = np.lexsort((first, example_index))
        example_index, first = example_index[order], first[order]
    else:
        example_index = first = np.zeros(0, np.int64)
    return SpeculativeReplay(
        spec=spec, example_index=example_index.astype(np.int64),
        position=traces.position[first].astype(np.int64),
        drafted_low=np.asarray(drafted_low)[first].astype(np.int64),
        drafted_high=np.asarray(drafted_high)[first].astype(np.int64),
        accepted=accepted[first].astype(np.int64), emitted=emitted[first].astype(np.int64),
        num_examples=num_examples, num_tokens=num_tokens)


def emitted_tokens(traces: TraceArrays, result: SpeculativeReplay) -> np.ndarray:
    """``[T]`` the tokens the replayed cycles emit, in trace order: each cycle's accepted
    drafts (the draft's top-1 at layer ``E - 1``) then the full model's token. Raises when
    they are not the recorded full-depth tokens, position for position (they are by
    construction; this checks the cycle walk)."""
    starts, _ = traces.example_bounds()
    first = starts[result.example_index] + result.position
    offset = np.arange(int(result.emitted.sum())) - np.repeat(
        np.cumsum(result.emitted) - result.emitted, result.emitted)
    rows = np.repeat(first, result.emitted) + offset
    from_draft = offset < np.repeat(result.accepted, result.emitted)
    if rows.shape[0] != traces.num_tokens or np.any(rows != np.arange(traces.num_tokens)):
        raise ExitbenchError("replayed cycles do not cover every recorded position once")
    tokens = np.where(from_draft, traces.top1_id[rows, result.spec.exit_layer],
                      traces.final_id[rows])
    if np.any(tokens != traces.final_id):
        raise ExitbenchError("replayed self-speculative tokens differ from full depth")
    return tokens


def cycle_statistics(accepted: np.ndarray, emitted: np.ndarray, drafted_low: np.ndarray,
                     drafted_high: np.ndarray, num_examples: int, draft_length: int
                     ) -> SpeculativeStatistics:
    """Spec-Bench's and LayerSkip's figures from per-cycle counts (replayed or online)."""
    cycles = max(1, accepted.shape[0])
    histogram = np.bincount(accepted, minlength=draft_length + 1)[:draft_length + 1] / cycles
    drafted_high_total, drafted_low_total = float(drafted_high.sum()), float(drafted_low.sum())
    accepted_total = float(accepted.sum())
    return SpeculativeStatistics(
        mean_accepted_tokens=float(emitted.sum()) / cycles,
        mean_accepted_drafts=accepted_total / cycles,
        acceptance_rate_low=accepted_total / drafted_high_total if drafted_high_total else 0.0,
        acceptance_rate_high=accepted_total / drafted_low_total if drafted_low_total else 0.0,
        mean_cycles=accepted.shape[0] / max(1, num_examples),
        acceptance_histogram=[float(x) for x in histogram],
        mean_drafted_low=drafted_low_total / cycles, mean_drafted_high=drafted_high_total / cycles)


def replay_statistics(result: SpeculativeReplay) -> SpeculativeStatistics:
    return cycle_statistics(result.accepted, result.emitted, result.drafted_low,
                            result.drafted_high, result.num_examples, result.spec.draft_length)
