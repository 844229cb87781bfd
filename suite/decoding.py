"""Full-depth decoding through the suite's own layer-by-layer loop.

- :func:`greedy_decode`: batched greedy decoding with a KV cache, LM head at the last
  layer only (outputs, and the baseline the tracing overhead is measured against).
- :func:`traced_greedy_decode`: the same loop, observing every layer of every step and
  returning :class:`suite.traces.TraceArrays` (``gold_id = -1``).
- :func:`forced_traces`: one teacher-forced parallel pass over gold targets per batch,
  the same fields with ``gold_id`` set.
- :func:`rematerialise_hidden`: every layer's hidden state ``[T, L, d_model]`` for
  recorded traces, from one teacher-forced pass over the recorded tokens.

Conventions shared by all of them (and documented in :mod:`suite.traces`): hidden states
are the un-normed residual stream after each decoder layer, for every layer including
the last (HF's ``decoder_hidden_states[-1]`` is normed; ours is not); ``cos_prev`` of
layer 0 compares with the decoder input embedding; probabilities are the softmax of the
exit logits, computed in float32. Rows finished (EOS emitted) keep being fed the pad
token, as HF ``generate`` does, so every row's arithmetic is the same as in a batch
where it never finishes; their later steps are not recorded. The EOS step is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from suite.errors import ExitbenchError
from suite.models import DecoderAdapter
from suite.traces import LAYER_FIELDS, OPTIONAL_LAYER_FIELDS, TraceArrays

RECORDED_LAYER_FIELDS = {**LAYER_FIELDS, **OPTIONAL_LAYER_FIELDS}
"""Every per-layer field recording writes."""
LOGIT_CHUNK_ELEMENTS = 1 << 25
"""Cap on ``layers x tokens x vocab`` logits held at once (128 MiB in float32)."""


@dataclass(frozen=True)
class DecodeOutput:
    """Generated tokens of a batch, right-padded with the pad id after each row's end."""

    token_ids: np.ndarray
    """``[B, steps]`` int64; row ``b``'s tokens are ``token_ids[b, :lengths[b]]`` (EOS included
    when the row reached it)."""
    lengths: np.ndarray
    """``[B]`` tokens generated per row."""

    def rows(self) -> list[np.ndarray]:
        return [self.token_ids[b, :n] for b, n in enumerate(self.lengths)]


@dataclass(frozen=True)
class LayerStats:
    """Per-layer statistics of ``N`` tokens, each ``[N, L]`` (float32 / int64 tensors)."""

    top1_id: torch.Tensor
    top1_prob: torch.Tensor
    top2_prob: torch.Tensor
    cos_prev: torch.Tensor
    cos_last: torch.Tensor
    final_prob: torch.Tensor
    cos_prev_normed: torch.Tensor
    cos_last_normed: torch.Tensor


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(ids [B, S], attention_mask [B, S])``."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_batch needs a non-empty list of non-empty sequences")
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):  # one copy per row, not per token
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids, mask


def head_top2(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor]:
    """``(probabilities, top-1 id, top-1 probability, top-2 probability)`` of exit logits
    ``[..., V]``; probabilities in float32. Ties in the top probability break as the
    logits' ``argmax`` breaks them (HF's greedy search), so every decoder of the suite picks
    the same token."""
    # softmax + top-2 of the probabilities: two fused passes over the logits (a logsumexp
    # was 4x slower than softmax on CPU, profiled).
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top2 = probs.topk(2, dim=-1)
    ids = top2.indices[..., 0]
    # softmax is monotone, so a unique top probability sits at the unique top logit; only
    # where the top two probabilities tie do we ask the logits.
    tied = top2.values[..., 0] == top2.values[..., 1]
    if bool(tied.any()):
        ids = torch.where(tied, logits.argmax(dim=-1), ids)
    return probs, ids, top2.values[..., 0], top2.values[..., 1]


def layer_statistics(adapter: DecoderAdapter, states: torch.Tensor) -> LayerStats:
    """Statistics of every layer for ``N`` tokens from ``states [L + 1, N, d]``: the decoder
    input embedding, then each layer's un-normed output. The exit heads of all layers run
    as one batched LM-head matmul (chunked over tokens to bound memory)."""
    layers_plus_one, num_tokens, _ = states.shape
    layers = layers_plus_one - 1
    as_float = states.float()
    cos_prev = F.cosine_similarity(as_float[1:], as_float[:-1], dim=-1)  # [L, N]
    cos_last = F.cosine_similarity(as_float[1:], as_float[-1:], dim=-1)
    normed = adapter.exit_norm(-1, states).float()  # the study compares final-normed states
    cos_prev_normed = F.cosine_similarity(normed[1:], normed[:-1], dim=-1)
    cos_last_normed = F.cosine_similarity(normed[1:], normed[-1:], dim=-1)
    vocab = adapter.dims.vocab_size
    chunk = max(1, LOGIT_CHUNK_ELEMENTS // max(1, layers * vocab))
    top1_id, top1_prob, top2_prob, final_prob = [], [], [], []
    for begin in range(0, num_tokens, chunk):
        # All layers share one head here; exit_logits(layer=-1) names "any layer".
        logits = adapter.exit_logits(-1, states[1:, begin:begin + chunk])
        probs, ids, first, second = head_top2(logits)
        top1_id.append(ids)
        top1_prob.append(first)
        top2_prob.append(second)
        final = ids[-1:, :, None].expand(layers, -1, 1)
        final_prob.append(probs.gather(-1, final)[..., 0])

    def joined(parts: list[torch.Tensor]) -> torch.Tensor:
        return (parts[0] if len(parts) == 1 else torch.cat(parts, 1)).T

    return LayerStats(top1_id=joined(top1_id), top1_prob=joined(top1_prob),
                      top2_prob=joined(top2_prob), cos_prev=cos_prev.T, cos_last=cos_last.T,
                      final_prob=joined(final_prob), cos_prev_normed=cos_prev_normed.T,
                      cos_last_normed=cos_last_normed.T)


def _run_all_layers(adapter: DecoderAdapter, state, input_ids: torch.Tensor) -> torch.Tensor:
    """``[L + 1, B, T, d]``: the step's embeddings and every layer's output."""
    hidden = adapter.begin_step(state, input_ids)
    outputs = [hidden]
    for layer in range(adapter.num_layers):
        hidden = adapter.run_layer(state, layer, hidden)
        outputs.append(hidden)
    return torch.stack(outputs)


def stop_tensor(adapter: DecoderAdapter, stop_token_ids: Sequence[int] | None,
                device: torch.device) -> torch.Tensor:
    """The ids that end a row: ``stop_token_ids`` when given, else the adapter's own
    (``stop_token_ids`` of a decoder-only adapter: every EOS it names), else its EOS."""
    if stop_token_ids is None:
        stop_token_ids = getattr(adapter, "stop_token_ids", None) or (adapter.eos_token_id,)
    return torch.as_tensor(list(stop_token_ids), dtype=torch.long, device=device)


@torch.inference_mode()
def greedy_decode(adapter: DecoderAdapter, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, max_new_tokens: int,
                  step_clock: list[float] | None = None,
                  stop_token_ids: Sequence[int] | None = None) -> DecodeOutput:
    """Greedy decoding through the layer loop, LM head at the last layer only.
    ``step_clock`` receives ``time.perf_counter()`` when each step's tokens are known; a row
    ends at any of ``stop_token_ids`` (default: :func:`stop_tensor`'s)."""
    check_max_new_tokens(max_new_tokens)
    state = adapter.start(input_ids, attention_mask)
    next_ids = state.first_input_ids
    stops = stop_tensor(adapter, stop_token_ids, next_ids.device)
    alive = torch.ones(next_ids.shape[0], dtype=torch.bool, device=next_ids.device)
    steps, lengths = [], torch.zeros_like(alive, dtype=torch.long)
    last = adapter.num_layers - 1
    for _ in range(max_new_tokens):
        hidden = adapter.begin_step(state, next_ids)
        for layer in range(adapter.num_layers):
            hidden = adapter.run_layer(state, layer, hidden)
        token = adapter.exit_logits(last, hidden[:, -1]).argmax(dim=-1)
        token = torch.where(alive, token, adapter.pad_token_id)
        steps.append(token)
        lengths += alive
        alive &= ~torch.isin(token, stops)
        next_ids = token[:, None]
        any_alive = bool(alive.any())  # waits for the step's tokens
        if step_clock is not None:
            step_clock.append(time.perf_counter())
        if not any_alive:
            break
    return DecodeOutput(token_ids=torch.stack(steps, 1).cpu().numpy(),
                        lengths=lengths.cpu().numpy())


def _to_trace_arrays(stats: LayerStats, final_id: torch.Tensor, example_id: np.ndarray,
                     position: np.ndarray, gold_id: np.ndarray) -> TraceArrays:
    fields = {name: getattr(stats, name).cpu().numpy().astype(dtype, copy=False)
              for name, dtype in RECORDED_LAYER_FIELDS.items()}
    return TraceArrays(example_id=example_id, position=position.astype(np.int32),
                       final_id=final_id.cpu().numpy().astype(np.int32),
                       gold_id=gold_id.astype(np.int32), **fields)


def positions_from_counts(counts: np.ndarray) -> np.ndarray:
    """``0..n-1`` for each row's count ``n``, concatenated."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)


def check_max_new_tokens(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise ExitbenchError(f"max_new_tokens is {max_new_tokens}; it must be at least 1")


def check_example_ids(example_ids: Sequence[str], batch_size: int) -> np.ndarray:
    if len(example_ids) != batch_size:
        raise ValueError(f"{len(example_ids)} example ids for a batch of {batch_size} rows")
    return np.asarray([str(e) for e in example_ids], dtype=object)


@torch.inference_mode()
def traced_greedy_decode(adapter: DecoderAdapter, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor, example_ids: Sequence[str],
                         max_new_tokens: int,
                         stop_token_ids: Sequence[int] | None = None) -> TraceArrays:
    """Greedy decoding that observes every layer of every step (see the module docstring).
    Rows come out in (example, position) order; a row ends at a stop id (:func:`stop_tensor`)."""
    ids = check_example_ids(example_ids, input_ids.shape[0])
    check_max_new_tokens(max_new_tokens)
    state = adapter.start(input_ids, attention_mask)
    next_ids = state.first_input_ids
    stops = stop_tensor(adapter, stop_token_ids, next_ids.device)
    batch = next_ids.shape[0]
    alive = torch.ones(batch, dtype=torch.bool, device=next_ids.device)
    step_stats: list[LayerStats] = []
    step_alive: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        states = _run_all_layers(adapter, state, next_ids)[:, :, -1]  # [L + 1, B, d]
        stats = layer_statistics(adapter, states)
        token = stats.top1_id[:, -1]
        step_stats.append(stats)
        step_alive.append(alive.clone())
        alive &= ~torch.isin(token, stops)
        next_ids = torch.where(alive, token, adapter.pad_token_id)[:, None]
        if not bool(alive.any()):
            break
    # [steps, B, ...] -> rows in (example, position) order, finished rows dropped.
    recorded = torch.stack(step_alive, 1)  # [B, steps]
    stacked = LayerStats(**{name: torch.stack([getattr(s, name) for s in step_stats], 1)
                            [recorded] for name in RECORDED_LAYER_FIELDS})
    counts = recorded.sum(1).cpu().numpy()
    position = positions_from_counts(counts)
    return _to_trace_arrays(stacked, stacked.top1_id[:, -1], np.repeat(ids, counts), position,
                            np.full(int(counts.sum()), -1))


def _teacher_forced_states(adapter: DecoderAdapter, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, targets: Sequence[Sequence[int]]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One parallel pass with decoder inputs = start token + ``targets[:-1]``.
    Returns ``(states [L + 1, N, d], target ids [N], lengths [B])`` over the valid positions,
    in (row, position) order."""
    state = adapter.start(input_ids, attention_mask, use_cache=False)
    target_ids, target_mask = pad_batch(targets, adapter.pad_token_id)
    target_ids = target_ids.to(state.first_input_ids.device)
    valid = target_mask.bool().to(target_ids.device)
    decoder_inputs = torch.cat([state.first_input_ids, target_ids[:, :-1]], dim=1)
    states = _run_all_layers(adapter, state, decoder_inputs)  # [L + 1, B, T, d]
    return states[:, valid], target_ids[valid], target_mask.sum(1)


@torch.inference_mode()
def forced_traces(adapter: DecoderAdapter, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor, example_ids: Sequence[str],
                  targets: Sequence[Sequence[int]]) -> TraceArrays:
    """Reference-forced traces: the model reads the gold target (EOS included) in one
    parallel pass; ``gold_id`` is the gold token at each position and ``final_id`` the
    last layer's argmax there."""
    ids = check_example_ids(example_ids, input_ids.shape[0])
    states, gold, lengths = _teacher_forced_states(adapter, input_ids, attention_mask, targets)
    stats = layer_statistics(adapter, states)
    counts = lengths.numpy()
    position = positions_from_counts(counts)
    return _to_trace_arrays(stats, stats.top1_id[:, -1], np.repeat(ids, counts), position,
                            gold.cpu().numpy())


@dataclass(frozen=True)
class HiddenStates:
    """Traces with ``hidden`` filled, and how faithfully the pass reproduced them."""

    traces: TraceArrays
    mismatched_tokens: int
    """Tokens whose last-layer argmax in the teacher-forced pass differs from ``final_id``."""

    @property
    def mismatch_rate(self) -> float:
        return self.mismatched_tokens / max(1, self.traces.num_tokens)


@torch.inference_mode()
def rematerialise_hidden(adapter: DecoderAdapter, traces: TraceArrays,
                         encoder_inputs: Mapping[str, Sequence[int]], *,
                         batch_size: int = 8) -> HiddenStates:
    """Every layer's un-normed hidden state ``[T, L, d_model]`` (float32) for recorded
    traces, by one teacher-forced pass per batch of examples over the recorded tokens:
    decoder inputs are the start token then the recorded tokens (``final_id`` for
    generated traces, ``gold_id`` for reference-forced ones). ``encoder_inputs`` maps each
    example id to its encoder token ids, as recorded. Checks that the last layer's argmax
    reproduces ``final_id``; the mismatch count is returned, not raised, since tiny float
    differences between cached and parallel attention can flip a near-tie."""
    starts, ends = traces.example_bounds()
    if traces.num_tokens and np.any(traces.position != positions_from_counts(ends - starts)):
        raise ExitbenchError("traces for hidden states must hold every position of each "
                             "example from 0, in order (take whole examples, not token subsets)")
    forced = traces.num_tokens > 0 and bool(np.all(traces.gold_id >= 0))
    tokens = traces.gold_id if forced else traces.final_id
    example_ids = traces.example_ids()
    missing = [e for e in example_ids if e not in encoder_inputs]
    if missing:
        raise ExitbenchError(f"no encoder inputs for {len(missing)} traced example(s), e.g. "
                             f"{missing[0]!r}; pass the sources of the traced split")
    hidden = np.empty((traces.num_tokens, adapter.num_layers, adapter.dims.d_model), np.float32)
    mismatched = 0
    for begin in range(0, len(example_ids), batch_size):
        rows = range(begin, min(begin + batch_size, len(example_ids)))
        input_ids, attention_mask = pad_batch([encoder_inputs[example_ids[r]] for r in rows],
                                              adapter.pad_token_id)
        targets = [tokens[starts[r]:ends[r]] for r in rows]
        states, _, _ = _teacher_forced_states(adapter, input_ids, attention_mask, targets)
        first, last = starts[rows[0]], ends[rows[-1]]
        final = adapter.exit_logits(adapter.num_layers - 1, states[-1]).argmax(-1).cpu().numpy()
        mismatched += int(np.sum(final != traces.final_id[first:last]))
        hidden[first:last] = states[1:].float().permute(1, 0, 2).cpu().numpy()
    out = traces.take(np.arange(traces.num_tokens))
    out.hidden = hidden
    return HiddenStates(traces=out, mismatched_tokens=mismatched)
