"""Online self-speculative greedy decoding through the adapter protocol: draft with the
first ``E`` layers, verify the drafts in one parallel pass through the rest, accept, roll
the caches back, continue (:mod:`suite.speculative.method` describes the method and cites
LayerSkip's code it follows).

One cycle of :func:`self_speculative_decode`, for a batch:

- **draft**: up to ``k`` steps of ``begin_step`` and layers ``0..E-1`` (each appends its
  K/V there) and the exit head at layer ``E - 1``; each step's layer ``E - 1`` state is
  kept for the verification (LayerSkip's ``exit_query_cache``). A row's limit is
  ``min(k, budget - 1)``; with a draft-stopping rule a row stops after a draft its measure
  is unsure of (:class:`suite.online.LayerScorer`, observing layer ``E - 1`` only). Rows
  draft in lockstep until the last one stops; a row's drafts past its own stop are not
  verified as its own.
- **verify**: the last draft token runs layers ``0..E-1`` (one query), then
  ``begin_catch_up(E, c + 1)`` and layers ``E..L-1`` over the ``c + 1`` positions together
  (the kept states and that token's), then the LM head at each: ``c + 1`` full-depth
  predictions.
- **accept** per row: the leading drafts equal to the full model's predictions (an
  accepted EOS ends the row; drafts after it are not accepted), then the full model's
  token at the first mismatch; **rollback** drops each row's rejected positions
  (:meth:`suite.models.DecoderAdapter.rollback`; rows that keep different counts stay
  right-aligned with the freed slots masked, so batched decoding accepts per row).

Every emitted token is the full model's greedy prediction on the emitted prefix, so the
output equals :func:`suite.decoding.greedy_decode`'s (up to float differences between a
parallel and a one-token pass, which can flip an exact near-tie; tested equal on random and
trained models). Each row's cycles are those of batch 1 (its acceptances depend on its own
tokens only); the per-cycle log is what replay (:mod:`suite.speculative.replay`) predicts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from suite.decoding import (
    DecodeOutput,
    check_example_ids,
    check_max_new_tokens,
    greedy_decode,
    pad_batch,
)
from suite.models import DecoderAdapter
from suite.online import (
    ExitPolicy,
    LayerScorer,
    OnlineRun,
    _batches,
    _full_depth_traces,
    _joined,
    _synchronise,
)
from suite.speculative.method import SelfSpeculation


@dataclass(frozen=True)
class CycleLog:
    """The cycles an online decode ran, per row, in (row, cycle) order; arrays ``[N]``."""

    row: np.ndarray
    """Row of the batch (or example index, in :class:`SpeculativeRun`)."""
    position: np.ndarray
    """Tokens the row had emitted before the cycle."""
    drafted: np.ndarray
    """Drafts the row made (its own count; the batch drafts to its slowest row)."""
    accepted: np.ndarray
    emitted: np.ndarray

    @staticmethod
    def concat(logs: Sequence[CycleLog]) -> CycleLog:
        return CycleLog(*(np.concatenate([getattr(log, name) for log in logs])
                          for name in ("row", "position", "drafted", "accepted", "emitted")))

    def shifted(self, offset: int) -> CycleLog:
        return CycleLog(self.row + offset, self.position, self.drafted, self.accepted,
                        self.emitted)


@dataclass(frozen=True)
class SpeculativeOutput:
    decoded: DecodeOutput
    cycles: CycleLog
    state: object = None
    """The adapter's decode state at the end (its KV cache), for inspection."""


def _scorer(spec: SelfSpeculation, adapter: DecoderAdapter, ids: np.ndarray
            ) -> LayerScorer | None:
    if spec.stop is None:
        return None
    return LayerScorer(ExitPolicy(spec.stop.measure, spec.stop.threshold), adapter, ids)


@torch.inference_mode()
def self_speculative_decode(adapter: DecoderAdapter, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor, example_ids: Sequence[str],
                            max_new_tokens: int, spec: SelfSpeculation) -> SpeculativeOutput:
    """Self-speculative greedy decoding of one batch (see the module docstring)."""
    ids = check_example_ids(example_ids, input_ids.shape[0])
    check_max_new_tokens(max_new_tokens)
    num_layers = adapter.num_layers
    spec.check(num_layers)
    depth, exit_layer, last = spec.draft_depth, spec.exit_layer, num_layers - 1
    scorer = _scorer(spec, adapter, ids)
    state = adapter.start(input_ids, attention_mask)
    pending = state.first_input_ids[:, 0]  # the next input, not yet through any layer
    batch, device = pending.shape[0], pending.device
    pad, eos = adapter.pad_token_id, adapter.eos_token_id
    width = max_new_tokens + spec.draft_length + 1  # the last column takes masked writes
    output = torch.full((batch, width + 1), pad, dtype=torch.long, device=device)
    emitted = torch.zeros(batch, dtype=torch.long, device=device)
    alive = torch.ones(batch, dtype=torch.bool, device=device)
    logs: list[tuple[torch.Tensor, ...]] = []
    while True:
        limit = torch.where(alive, (max_new_tokens - 1 - emitted).clamp(0, spec.draft_length), 0)
        drafting = limit > 0
        drafted = torch.zeros_like(emitted)
        drafts: list[torch.Tensor] = []
        states: list[torch.Tensor] = []
        token = pending
        while bool(drafting.any()):  # draft: layers 0..E-1 and the exit head at E-1
            hidden = adapter.begin_step(state, token[:, None])
            previous = hidden
            for layer in range(depth):
                previous = hidden
                hidden = adapter.run_layer(state, layer, hidden)
            top1 = None
            if scorer is not None:
                scorer.start_step(0)
                scorer.position[:] = (emitted + len(drafts)).cpu().numpy()
                top1 = scorer.observe(exit_layer, hidden[:, -1], previous[:, -1])
            if top1 is None:
                top1 = adapter.exit_logits(exit_layer, hidden[:, -1]).argmax(dim=-1)
            drafts.append(top1)
            states.append(hidden)
            drafted += drafting
            stop = drafted >= limit
            if scorer is not None:
                stop |= torch.from_numpy(spec.stop.unsure(scorer.score(exit_layer))).to(device)
            if spec.stop_at_eos:
                stop |= top1 == eos
            drafting &= ~stop
            token = top1
        count = len(drafts)
        # verify: the last draft token through layers 0..E-1, then E..L-1 over c + 1 positions
        hidden = adapter.begin_step(state, token[:, None])
        for layer in range(depth):
            hidden = adapter.run_layer(state, layer, hidden)
        if count:
            hidden = torch.cat([*states, hidden], dim=1)
            adapter.begin_catch_up(state, depth, count + 1)
        for layer in range(depth, num_layers):
            hidden = adapter.run_layer(state, layer, hidden)
        verified = adapter.exit_logits(last, hidden).argmax(dim=-1)  # [B, c + 1]
        accepted, count_emitted = accept_drafts(verified, drafts, drafted, eos)
        count_emitted = torch.where(alive, count_emitted, 0)
        logs.append((alive.clone(), emitted.clone(), drafted, accepted, count_emitted))
        # write the emitted tokens (masked entries go to the spare last column)
        offsets = torch.arange(count + 1, device=device)
        columns = torch.where(offsets < count_emitted[:, None], emitted[:, None] + offsets, width)
        output.scatter_(1, columns, verified)
        emitted += count_emitted
        last_token = output.gather(1, (emitted - 1).clamp(min=0)[:, None])[:, 0]
        alive &= (last_token != eos) & (emitted < max_new_tokens)
        if not bool(alive.any()):
            break
        pending = torch.where(alive, verified.gather(1, accepted[:, None])[:, 0], pad)
        rejected = count - accepted
        rejected = torch.where(alive, rejected, rejected[alive].min())
        adapter.rollback(state, rejected)
    return SpeculativeOutput(decoded=DecodeOutput(token_ids=output[:, :max_new_tokens].cpu().numpy(),
                                                  lengths=emitted.cpu().numpy()),
                             cycles=_cycle_log(logs), state=state)


def accept_drafts(verified: torch.Tensor, drafts: list[torch.Tensor], drafted: torch.Tensor,
            eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(accepted drafts, tokens emitted)`` per row: the leading drafts (within the row's
    own count) equal to the full model's predictions, none after an accepted EOS; then the
    full model's token, unless an accepted EOS already ended the row."""
    if not drafts:
        zeros = torch.zeros(verified.shape[0], dtype=torch.long, device=verified.device)
        return zeros, zeros + 1
    draft_ids = torch.stack(drafts, dim=1)  # [B, c]
    count = draft_ids.shape[1]
    is_eos = draft_ids == eos
    after_eos = (torch.cumsum(is_eos, dim=1) - is_eos.long()) > 0
    agree = (draft_ids == verified[:, :count]) & ~after_eos \
        & (torch.arange(count, device=draft_ids.device) < drafted[:, None])
    accepted = agree.long().cumprod(dim=1).sum(dim=1)
    ended = (accepted > 0) & is_eos.gather(1, (accepted - 1).clamp(min=0)[:, None])[:, 0]
    return accepted, torch.where(ended, accepted, accepted + 1)


def _cycle_log(logs: list[tuple[torch.Tensor, ...]]) -> CycleLog:
    """Per-step tensors ``[B]`` -> (row, cycle)-ordered arrays of the rows alive then."""
    alive, position, drafted, accepted, emitted = (torch.stack(parts, 1).cpu().numpy()
                                                   for parts in zip(*logs))
    rows = np.broadcast_to(np.arange(alive.shape[0])[:, None], alive.shape)
    return CycleLog(row=rows[alive].astype(np.int64), position=position[alive].astype(np.int64),
                    drafted=drafted[alive].astype(np.int64),
                    accepted=accepted[alive].astype(np.int64),
                    emitted=emitted[alive].astype(np.int64))


# -- many examples, timed ----------------------------------------------------------------------
@dataclass(frozen=True)
class SpeculativeRun:
    """Examples decoded self-speculatively in order, with their time and cycles."""

    run: OnlineRun
    """Emitted tokens (``exit_layer`` is the last layer: every token is verified at full
    depth) and wall-clock seconds."""
    cycles: CycleLog
    """Rows are example indices (in decoding order)."""


def _decode_batch(adapter: DecoderAdapter, sources: Sequence[Sequence[int]], ids: list[str],
                  max_new_tokens: int, spec: SelfSpeculation | None
                  ) -> tuple[OnlineRun, CycleLog | None]:
    """One batch, timed (``spec=None``: full-depth greedy decoding)."""
    input_ids, attention_mask = pad_batch(sources, adapter.pad_token_id)
    _synchronise(adapter.device)
    started = time.perf_counter()
    cycles = None
    if spec is None:
        decoded = greedy_decode(adapter, input_ids, attention_mask, max_new_tokens)
    else:
        output = self_speculative_decode(adapter, input_ids, attention_mask, ids,
                                         max_new_tokens, spec)
        decoded, cycles = output.decoded, output.cycles
    _synchronise(adapter.device)
    seconds = time.perf_counter() - started
    return OnlineRun(traces=_full_depth_traces(decoded, ids, adapter.num_layers),
                     seconds=seconds), cycles


def decode_paired_speculative(adapter: DecoderAdapter, sources: Sequence[Sequence[int]],
                              example_ids: Sequence[str], batch_size: int,
                              max_new_tokens: int, spec: SelfSpeculation
                              ) -> tuple[OnlineRun, SpeculativeRun]:
    """``(full depth, self-speculative)`` runs of the same examples, timed batch by batch
    side by side in alternating order (as :func:`suite.online.decode_paired`), so that a
    shared machine's drift cancels in their ratio."""
    full, runs, logs = [], [], []
    for index, (batch, ids) in enumerate(_batches(sources, example_ids, batch_size)):
        order = (None, spec) if index % 2 == 0 else (spec, None)
        for which in order:
            run, cycles = _decode_batch(adapter, batch, ids, max_new_tokens, which)
            if which is None:
                full.append(run)
            else:
                runs.append(run)
                logs.append(cycles.shifted(index * batch_size))
    return _joined(full), SpeculativeRun(run=_joined(runs), cycles=CycleLog.concat(logs))
