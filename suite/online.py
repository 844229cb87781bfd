"""Online early-exit greedy decoding: the exited token is fed forward, as deployed.

Replay (:mod:`suite.replay`) follows the recorded full-depth trajectory. Here each token
exits for real: a measure's score is computed layer by layer while decoding, the token
is emitted from the first layer ``l >= min_layer`` whose score reaches the threshold (the
same rule as replay), and later tokens see the consequences.

Skipped layers still need K/V entries for later tokens, by the measure's ``propagation``:

- ``calm`` (CALM, Schuster et al. 2022): the exited hidden state is propagated: each
  skipped layer's K/V are its K/V projections of that state
  (:meth:`suite.models.DecoderAdapter.fill_layer`).
- ``free`` (FREE, Bae et al. 2023): one shallow exit layer ``k``. A token that exits there
  leaves the deep layers ``k+1..L-1`` pending (their caches simply lack it); the next token
  that goes deep runs the deep layers over the pending tokens and itself in one causal
  pass (synchronized parallel decoding, :meth:`begin_catch_up`), which writes the pending
  tokens' real deep K/V before any deep attention reads them.

Batches: every row runs the decoder layers until the batch's slowest unfinished row exits
(one batched matmul serves all rows); a row that has exited keeps its exit state, so the
layers it "runs" afterwards only append its propagated K/V (exactly CALM's fill). Finished
rows are fed the pad token, as in :func:`suite.decoding.greedy_decode`.

Scoring online: :class:`LayerScorer` computes, at each layer, only the trace fields the
measure declares in ``reads`` (the LM head only at the layers it checks), writes them into
a ``[B, L]`` :class:`suite.traces.TraceArrays` of the current step (layers not yet reached
hold NaN / -1) and calls the measure's own ``scores`` -- the code replay runs, so any
registered deployable measure decodes online unchanged. Each row shows the measure the
current token only: a measure that reads earlier tokens of its sequence (allowed by the
causality contract, used by no built-in measure) would score differently online.

Outputs are traces of the emitted tokens with ``exit_layer`` set (per-layer fields where
they were computed, NaN / -1 elsewhere), so the trace tooling reads them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from suite.adaptive import AdaptiveSettings, AdaptiveThreshold
from suite.decoding import (
    DecodeOutput,
    check_example_ids,
    check_max_new_tokens,
    greedy_decode,
    head_top2,
    pad_batch,
    positions_from_counts,
    stop_tensor,
)
from suite.errors import ExitbenchError
from suite.measures import Measure
from suite.models import DecoderAdapter
from suite.schedules import PositionSchedule
from suite.traces import (
    LAYER_FIELDS,
    LOOK_AHEAD_LAYER_FIELDS,
    LOOK_AHEAD_TOKEN_FIELDS,
    OPTIONAL_LAYER_FIELDS,
    TraceArrays,
)

HEAD_FIELDS = frozenset({"top1_id", "top1_prob", "top2_prob"})
LOOK_AHEAD_FIELDS = frozenset(LOOK_AHEAD_TOKEN_FIELDS + LOOK_AHEAD_LAYER_FIELDS)
"""Fields that depend on the last layer or the reference: unknown while decoding."""


@dataclass(frozen=True)
class ExitPolicy:
    """A measure, one (base) threshold, its schedule, and where exits may start."""

    measure: Measure
    threshold: float
    min_layer: int = 0
    schedule: PositionSchedule | AdaptiveSettings | None = None
    """The threshold schedule (:mod:`suite.schedules`); ``None``: constant."""
    min_position: int = 0
    """Tokens at positions below this never exit early."""
    adaptive: AdaptiveThreshold | None = None
    """FREE's estimator state for a ``free_adaptive`` schedule, shared by the batches of one
    decoding run (:meth:`fresh` makes a new one)."""

    @property
    def propagation(self) -> str:
        return type(self.measure).propagation

    def fresh(self) -> ExitPolicy:
        """This policy with a new estimator state (adaptive schedules), for one decoding run."""
        if not isinstance(self.schedule, AdaptiveSettings):
            return self
        return dataclasses.replace(self, adaptive=AdaptiveThreshold(
            threshold=float(self.threshold), settings=self.schedule))

    def threshold_at(self, position: int) -> float:
        """The threshold a token at ``position`` must reach (the same float64 arithmetic as
        replay's :func:`suite.schedules.schedule_scores`)."""
        if self.adaptive is not None:
            return self.adaptive.threshold
        if isinstance(self.schedule, PositionSchedule):
            return float(self.schedule.thresholds(np.array([self.threshold], np.float64),
                                                  np.array([position]))[0, 0])
        return float(self.threshold)

    def check(self, num_layers: int) -> None:
        """Errors that say what cannot be decoded online, and why."""
        cls = type(self.measure)
        if not cls.deployable:
            raise ExitbenchError(f"measure {cls.name!r} is not deployable (it looks ahead, "
                                 f"e.g. at the last layer); it has replay results only")
        ahead = sorted(set(cls.reads) & LOOK_AHEAD_FIELDS)
        if ahead:
            raise ExitbenchError(f"measure {cls.name!r} reads {', '.join(ahead)}, which are not "
                                 f"known while decoding; online decoding cannot score it")
        if not 0 <= self.min_layer < num_layers:
            raise ExitbenchError(f"min_layer {self.min_layer} is outside 0..{num_layers - 1}")
        if self.propagation not in ("calm", "free"):
            raise ExitbenchError(f"measure {cls.name!r}: propagation {self.propagation!r} is not "
                                 f"one online decoding implements (calm, free)")
        if self.propagation == "free" and not hasattr(self.measure, "exit_layer"):
            raise ExitbenchError(f"measure {cls.name!r} uses FREE propagation but has no "
                                 f"exit_layer(num_layers) method naming its shallow exit layer")
        if isinstance(self.schedule, AdaptiveSettings) and self.propagation != "free":
            raise ExitbenchError(f"measure {cls.name!r}: the free_adaptive schedule needs FREE's "
                                 f"shallow-deep measure (free_shallow_deep)")

    def shallow_layer(self, num_layers: int) -> int:
        return int(self.measure.exit_layer(num_layers))  # type: ignore[attr-defined]


class LayerScorer:
    """The measure's score at one layer for the rows of a batch, from what decoding has
    computed so far (see the module docstring)."""

    def __init__(self, policy: ExitPolicy, adapter: DecoderAdapter, example_ids: np.ndarray):
        self.policy = policy
        self.adapter = adapter
        self.reads = frozenset(type(policy.measure).reads)
        self.checked = np.asarray(policy.measure.checked_layers(adapter.num_layers), bool)
        batch, layers = len(example_ids), adapter.num_layers
        self.example_id = example_ids
        self.position = np.zeros(batch, np.int32)
        self.unknown_token = np.full(batch, -1, np.int32)
        """``final_id`` and ``gold_id``: not known while decoding (look-ahead measures are
        refused)."""
        self.fields = {name: np.empty((batch, layers), dtype)
                       for name, dtype in LAYER_FIELDS.items()}
        self.fields.update({name: np.empty((batch, layers), dtype)
                            for name, dtype in OPTIONAL_LAYER_FIELDS.items() if name in self.reads})
        self.hidden = (np.zeros((batch, layers, adapter.dims.d_model), np.float32)
                       if "hidden" in self.reads else None)
        self.head_fields = bool(self.reads & HEAD_FIELDS)
        self.start_step(0)

    def start_step(self, position: int) -> None:
        self.position[:] = position
        for name, array in self.fields.items():
            array.fill(-1 if name == "top1_id" else np.nan)

    def observe(self, layer: int, hidden: torch.Tensor, previous: torch.Tensor
                ) -> torch.Tensor | None:
        """Compute the fields of ``layer`` the measure reads (``hidden``/``previous``:
        ``[B, d]`` un-normed states of this layer and the one before); return the top-1 ids
        when the LM head ran here."""
        top1 = None
        if self.checked[layer]:
            if self.head_fields:
                _, top1, first, second = head_top2(self.adapter.exit_logits(layer, hidden))
                self.fields["top1_id"][:, layer] = top1.cpu().numpy()
                self.fields["top1_prob"][:, layer] = first.cpu().numpy()
                self.fields["top2_prob"][:, layer] = second.cpu().numpy()
            if "cos_prev" in self.reads:
                self.fields["cos_prev"][:, layer] = F.cosine_similarity(
                    hidden.float(), previous.float(), dim=-1).cpu().numpy()
            if "cos_prev_normed" in self.reads:
                self.fields["cos_prev_normed"][:, layer] = F.cosine_similarity(
                    self.adapter.exit_norm(layer, hidden).float(),
                    self.adapter.exit_norm(layer, previous).float(), dim=-1).cpu().numpy()
            if self.hidden is not None:
                self.hidden[:, layer] = hidden.float().cpu().numpy()
        return top1

    def score(self, layer: int) -> np.ndarray:
        """``[B]`` scores at ``layer`` (the measure's ``scores`` on this step's rows)."""
        batch, layers = self.fields["top1_id"].shape
        traces = TraceArrays(example_id=self.example_id, position=self.position,
                             final_id=self.unknown_token, gold_id=self.unknown_token,
                             hidden=self.hidden,
                             **self.fields)
        scores = np.asarray(self.policy.measure.scores(traces))
        if scores.shape != (batch, layers):
            raise ExitbenchError(f"measure {type(self.policy.measure).name!r} returned scores "
                                 f"of shape {scores.shape} for {batch} tokens x {layers} "
                                 f"layers online")
        return scores[:, layer]

    def snapshot(self) -> dict[str, np.ndarray]:
        return {name: array.copy() for name, array in self.fields.items()}


@dataclass(frozen=True)
class OnlineOutput:
    """One batch decoded with early exits."""

    decoded: DecodeOutput
    traces: TraceArrays
    """The emitted tokens in (example, position) order, ``exit_layer`` set."""
    state: object = None
    """The adapter's decode state at the end (its KV cache), for inspection."""


def _exits(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The shared exit rule at one layer (NaN never exits)."""
    with np.errstate(invalid="ignore"):
        return np.asarray(scores, np.float64) >= threshold


@torch.inference_mode()
def online_greedy_decode(adapter: DecoderAdapter, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, example_ids: Sequence[str],
                         max_new_tokens: int, policy: ExitPolicy,
                         step_clock: list[float] | None = None,
                         stop_token_ids: Sequence[int] | None = None) -> OnlineOutput:
    """Greedy decoding of one batch that exits each token early by ``policy``.
    ``step_clock`` receives ``time.perf_counter()`` when each step's tokens are known; a row
    ends at a stop id (:func:`suite.decoding.stop_tensor`)."""
    ids = check_example_ids(example_ids, input_ids.shape[0])
    check_max_new_tokens(max_new_tokens)
    num_layers = adapter.num_layers
    policy.check(num_layers)
    if isinstance(policy.schedule, AdaptiveSettings) and policy.adaptive is None:
        policy = policy.fresh()
    adaptive = policy.adaptive
    if adaptive is not None:
        adaptive.start_sequence()  # FREE refits before each generate call (a batch)
    last = num_layers - 1
    free = policy.propagation == "free"
    shallow = policy.shallow_layer(num_layers) if free else -1
    scorer = LayerScorer(policy, adapter, ids)
    state = adapter.start(input_ids, attention_mask)
    next_ids = state.first_input_ids
    batch = next_ids.shape[0]
    device = next_ids.device
    stops = stop_tensor(adapter, stop_token_ids, device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    shallow_states = (torch.empty(batch, max_new_tokens, adapter.dims.d_model,
                                  dtype=adapter.dtype, device=device) if free else None)
    if adaptive is not None:  # FREE's pairs: the shallow confidence and prediction per step
        shallow_score = np.zeros((batch, max_new_tokens))
        shallow_top1 = torch.zeros(batch, max_new_tokens, dtype=torch.long, device=device)
    deep_done = 0  # FREE: positions whose deep layers hold real K/V, for every row
    steps, step_exits, step_alive, step_fields = [], [], [], []
    for step in range(max_new_tokens):
        scorer.start_step(step)
        threshold = policy.threshold_at(step)
        may_exit = step >= policy.min_position
        hidden = adapter.begin_step(state, next_ids)
        exited = ~alive  # finished rows are frozen from the start
        exit_layer = np.full(batch, last, np.int32)
        known_top1 = torch.full((batch,), -1, dtype=torch.long, device=device)
        for layer in range(num_layers):
            output = adapter.run_layer(state, layer, hidden)
            previous = hidden
            hidden = torch.where(exited[:, None, None], hidden, output)
            if layer == last:
                break
            top1 = scorer.observe(layer, hidden[:, -1], previous[:, -1])
            if layer >= policy.min_layer and may_exit:
                layer_scores = scorer.score(layer)
                newly = torch.from_numpy(_exits(layer_scores, threshold)).to(device) & ~exited
                if adaptive is not None and layer == shallow:
                    shallow_score[:, step] = layer_scores
                    shallow_top1[:, step] = top1
                if bool(newly.any()):
                    exit_layer[newly.cpu().numpy()] = layer
                    if top1 is not None:
                        known_top1 = torch.where(newly, top1, known_top1)
                    exited = exited | newly
            if free and layer == shallow:
                shallow_states[:, step] = hidden[:, -1]
                if bool(exited.all()):  # the deep layers stay pending for this token
                    break
                # synchronized parallel decoding: pending tokens and this one, together (one
                # query token: the step's own masks and biases already fit)
                queries = step + 1 - deep_done
                if queries > 1:
                    adapter.begin_catch_up(state, layer + 1, queries)
                deep = shallow_states[:, deep_done:step + 1]
                for deep_layer in range(layer + 1, num_layers):
                    deep = adapter.run_layer(state, deep_layer, deep)
                if adaptive is not None and queries > 1 and may_exit:
                    _collect_pairs(adaptive, adapter, deep, ~exited, shallow_score,
                                   shallow_top1, deep_done, step)
                deep_done = step + 1
                hidden = torch.where(exited[:, None, None], hidden, deep[:, -1:])
                break
            if bool(exited.all()):  # CALM: propagate the exit states to the skipped layers
                for skipped in range(layer + 1, num_layers):
                    adapter.fill_layer(state, skipped, hidden)
                break
        token = known_top1
        if bool((token < 0).any()):
            logits = adapter.exit_logits(last, hidden[:, -1])
            token = torch.where(token < 0, logits.argmax(dim=-1), token)
        token = torch.where(alive, token, adapter.pad_token_id)
        steps.append(token)
        step_exits.append(exit_layer)
        step_alive.append(alive.clone())
        step_fields.append(scorer.snapshot())
        alive = alive & ~torch.isin(token, stops)
        next_ids = token[:, None]
        any_alive = bool(alive.any())  # waits for the step's tokens
        if step_clock is not None:
            step_clock.append(time.perf_counter())
        if not any_alive:
            break
    return OnlineOutput(decoded=_decoded(steps, step_alive),
                        traces=_online_traces(ids, steps, step_exits, step_alive, step_fields),
                        state=state)


def _collect_pairs(adaptive: AdaptiveThreshold, adapter: DecoderAdapter, deep: torch.Tensor,
                   went_deep: torch.Tensor, shallow_score: np.ndarray,
                   shallow_top1: torch.Tensor, first: int, step: int) -> None:
    """FREE's calibration pairs of a deep step with pending tokens (positions ``first`` to
    ``step``): for each row that went deep, each token's shallow confidence and whether its
    shallow prediction equals the deep one (the parallel pass's, ``deep`` at the last
    layer)."""
    rows = went_deep.nonzero().flatten()
    if rows.numel() == 0:
        return
    deep_top1 = adapter.exit_logits(adapter.num_layers - 1, deep[rows]).argmax(dim=-1)
    same = (deep_top1 == shallow_top1[rows, first:step + 1]).cpu().numpy()
    adaptive.add_pairs(shallow_score[rows.cpu().numpy(), first:step + 1], same)


def _decoded(steps: list[torch.Tensor], step_alive: list[torch.Tensor]) -> DecodeOutput:
    tokens = torch.stack(steps, 1).cpu().numpy()
    lengths = torch.stack(step_alive, 1).sum(1).cpu().numpy()
    return DecodeOutput(token_ids=tokens, lengths=lengths)


def _online_traces(ids: np.ndarray, steps: list[torch.Tensor], step_exits: list[np.ndarray],
                   step_alive: list[torch.Tensor], step_fields: list[dict[str, np.ndarray]]
                   ) -> TraceArrays:
    recorded = torch.stack(step_alive, 1).cpu().numpy()  # [B, steps]
    tokens = torch.stack(steps, 1).cpu().numpy()
    exits = np.stack(step_exits, 1)
    fields = {name: np.stack([f[name] for f in step_fields], 1)[recorded]
              for name in LAYER_FIELDS}
    counts = recorded.sum(1)
    return TraceArrays(example_id=np.repeat(ids, counts),
                       position=positions_from_counts(counts).astype(np.int32),
                       final_id=tokens[recorded].astype(np.int32),
                       gold_id=np.full(int(counts.sum()), -1, np.int32),
                       exit_layer=exits[recorded].astype(np.int32), **fields)


# -- many examples, timed ----------------------------------------------------------------------
@dataclass(frozen=True)
class OnlineRun:
    """Examples decoded in order, ``batch_size`` at a time, with their wall-clock time."""

    traces: TraceArrays
    """Emitted tokens; ``exit_layer`` is the last layer throughout for full-depth runs."""
    seconds: float
    """Wall-clock seconds of all batches (encoder, decoding, exits; no tokenisation)."""
    emitted_at_seconds: np.ndarray | None = None
    """``[T]`` wall-clock seconds from the start of each token's batch (encoder included) to
    the end of the step that emitted it: per-request TTFT / TPOT (:mod:`suite.latency`)."""

    @property
    def num_tokens(self) -> int:
        return self.traces.num_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_batch(adapter: DecoderAdapter, sources: Sequence[Sequence[int]],
                  ids: list[str], max_new_tokens: int, policy: ExitPolicy | None,
                  stop_token_ids: Sequence[int] | None = None) -> OnlineRun:
    """One batch, timed (``policy=None``: full depth)."""
    input_ids, attention_mask = pad_batch(sources, adapter.pad_token_id)
    _synchronise(adapter.device)
    clock: list[float] = []
    started = time.perf_counter()
    if policy is None:
        decoded = greedy_decode(adapter, input_ids, attention_mask, max_new_tokens, clock,
                                stop_token_ids)
    else:
        output = online_greedy_decode(adapter, input_ids, attention_mask, ids, max_new_tokens,
                                      policy, clock, stop_token_ids)
    _synchronise(adapter.device)
    seconds = time.perf_counter() - started
    traces = (_full_depth_traces(decoded, ids, adapter.num_layers) if policy is None
              else output.traces)
    # every row emits its token at position p in step p: rows run in lockstep
    emitted = (np.asarray(clock) - started)[traces.position]
    return OnlineRun(traces=traces, seconds=seconds, emitted_at_seconds=emitted)


def _batches(sources: Sequence[Sequence[int]], example_ids: Sequence[str], batch_size: int):
    if len(sources) != len(example_ids):
        raise ValueError(f"{len(sources)} sources for {len(example_ids)} example ids")
    if batch_size < 1:
        raise ExitbenchError(f"batch size {batch_size} must be at least 1")
    for begin in range(0, len(sources), batch_size):
        rows = slice(begin, begin + batch_size)
        yield sources[rows], list(example_ids[rows])


def _joined(parts: list[OnlineRun]) -> OnlineRun:
    emitted = [p.emitted_at_seconds for p in parts]
    return OnlineRun(traces=TraceArrays.concat([p.traces for p in parts]),
                     seconds=sum(p.seconds for p in parts),
                     emitted_at_seconds=(np.concatenate(emitted) if emitted and all(
                         e is not None for e in emitted) else None))


def decode_examples(adapter: DecoderAdapter, sources: Sequence[Sequence[int]],
                    example_ids: Sequence[str], batch_size: int, max_new_tokens: int,
                    policy: ExitPolicy | None,
                    stop_token_ids: Sequence[int] | None = None) -> OnlineRun:
    """Decode every example in order, ``batch_size`` at a time; ``policy=None`` decodes at
    full depth with :func:`suite.decoding.greedy_decode` (the baseline of the speedup)."""
    policy = policy.fresh() if policy is not None else None
    return _joined([_decode_batch(adapter, batch, ids, max_new_tokens, policy, stop_token_ids)
                    for batch, ids in _batches(sources, example_ids, batch_size)])


def decode_paired(adapter: DecoderAdapter, sources: Sequence[Sequence[int]],
                  example_ids: Sequence[str], batch_size: int, max_new_tokens: int,
                  policy: ExitPolicy, stop_token_ids: Sequence[int] | None = None
                  ) -> tuple[OnlineRun, OnlineRun]:
    """``(full depth, early exit)`` runs of the same examples, timed batch by batch side by
    side (the two decodes of a batch run back to back, in alternating order), so that a
    shared machine's drift, which moves both alike, cancels in their ratio."""
    policy = policy.fresh()
    full, online = [], []
    for index, (batch, ids) in enumerate(_batches(sources, example_ids, batch_size)):
        order = (None, policy) if index % 2 == 0 else (policy, None)
        for which in order:
            result = _decode_batch(adapter, batch, ids, max_new_tokens, which, stop_token_ids)
            (full if which is None else online).append(result)
    return _joined(full), _joined(online)


def _full_depth_traces(decoded: DecodeOutput, ids: Sequence[str], num_layers: int
                       ) -> TraceArrays:
    counts = decoded.lengths.astype(np.int64)
    tokens = np.concatenate([row for row in decoded.rows()]) if counts.sum() else \
        np.zeros(0, np.int64)
    total = int(counts.sum())
    fields = {name: np.full((total, num_layers), -1 if name == "top1_id" else np.nan, dtype)
              for name, dtype in LAYER_FIELDS.items()}
    return TraceArrays(example_id=np.repeat(np.asarray(ids, dtype=object), counts),
                       position=positions_from_counts(counts).astype(np.int32),
                       final_id=tokens.astype(np.int32), gold_id=np.full(total, -1, np.int32),
                       exit_layer=np.full(total, num_layers - 1, np.int32), **fields)
