"""Measured hardware profiles: time the operations of T5 decoding on the current device and
write a ``kind: measured`` profile (:class:`suite.profiles.MeasuredProfile`) that
:class:`suite.cost.MeasuredCosts` prices replays with (``exitbench profile``).

Everything is timed through the suite's own layer loop (:class:`suite.backbones.t5.T5Adapter`),
on the model the tables are for, with random token ids (timings do not depend on values):

- **a greedy decoding step** ``[batch, context]``, exactly as
  :func:`suite.decoding.greedy_decode` runs it, with a self-attention KV cache of
  ``context - 1`` keys (the step attends to ``context`` keys, the table's axis) and
  cross-attention over ``source_len`` encoder keys, each part timed: the **decoder layer**
  table is the step's blocks divided by the depth (block 0 also computes the step's relative
  position bias, so the table is the mean block, and that per-step cost is spread over the
  layers); the **LM head** table is the final norm, tied-embedding scaling, LM head and a
  float32 softmax (``T5Adapter.exit_logits``; median over contexts); the **fixed step** is
  the decoder input embedding and masks (``begin_step``) plus the argmax, the stopping
  bookkeeping and its host synchronisation (median over contexts, then over batch sizes:
  the schema has one number).
- **K/V fill** ``[batch]``: what CALM pays for a skipped layer: the self-attention norm, the
  K and V projections of the propagated state and their append to that layer's cache (at
  the middle context length).
- **measure checks** ``[batch]``: each measure's own operation per check on the layer's
  output, with the threshold comparison and the batch's exit decision on the host
  (``bool(...all())``); see :func:`check_entry` for what is real and what is a stand-in.
- **encoder prefill** ``[batch, source]``: ``T5Adapter.start`` (the encoder) plus the
  cross-attention K/V of every decoder layer, stored in the cache as the first decoding
  step would.
- **verification pass** ``[batch, query length]`` (self-speculative decoding): as the
  decoder runs its deep part, ``begin_catch_up`` (masks and relative position bias of ``q``
  queries: ``setup_seconds``, once per verification) and then ``q`` positions per row
  through layers ``1..L-1`` whose caches lack them, at the middle context; the table is
  those layers' time divided by ``L - 1`` (no position bias inside: it is the set-up's).
- **position bias** ``[batch]``: one step's relative position bias, which block 0 computes
  for every pass; the decoder-layer table spreads it over the ``L`` layers, so a draft step
  of ``E`` layers is priced ``(1 - E / L)`` of it more.
- **rollback** ``[batch]`` (self-speculative decoding): a cycle's acceptance
  (:func:`suite.speculative.online.accept_drafts`) and the rollback of the rejected
  positions from every layer's cache, rows rejecting different counts (so rows are
  realigned, the dearer case) at batch > 1.

Context matters on a CPU: an operation repeated back to back runs with its weights and
threads warm, and was 2-4x faster (the LM head, the step's embedding) than inside a
decoding step, while a step timed right after another entry (a prefill) found the weights
cold and ran ~10% slower than in the loop. So the step's parts are timed inside whole
steps, each right after an untimed step, and the K/V fill and the checks after an untimed
decoder block (with the LM head first for measures that read it), never repeated alone.
Timed this way, a step matched the loop's per-step time within 1-2% when both were timed
alternately in one process.

Timing: each entry gets ``warmup`` untimed runs, then ``repeats`` timed runs, and the
median is kept. A timed run is the mean of ``inner`` calls, ``inner`` chosen from the
warm-up so a run lasts at least ``min_run_seconds`` (short operations such as a check would
otherwise be below the timer's resolution). Every timed call or part is bracketed by
``torch.cuda.synchronize`` on CUDA and timed with ``time.perf_counter``; per-call set-up
(resetting the cache, the preceding block) is outside the timed region. Entries of one
batch size are interleaved run by run, so a burst of load from another process spreads
over all of them instead of biasing one.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from suite.errors import ExitbenchError
from suite.measures import Measure
from suite.profiles import DTYPES, MEASURED_FORMAT_VERSION, MeasuredProfile, parse_profile

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 8, 32)
DEFAULT_CONTEXTS: tuple[int, ...] = (16, 64, 128)
DEFAULT_SOURCE_LEN = 256
DEFAULT_QUERY_LENS: tuple[int, ...] = (2, 3, 5, 9)
"""Verification passes of 1, 2, 4 and 8 drafts (``k + 1`` positions)."""
DEFAULT_REPEATS = 5
DEFAULT_WARMUP = 2
DEFAULT_MIN_RUN_SECONDS = 0.002
MAX_INNER_CALLS = 1000
CHECK_THRESHOLD = 0.9
"""The threshold a timed check compares with (any value: the comparison costs the same)."""
SIGNIFICANT_DIGITS = 4
"""Seconds are written with this many significant digits (timing noise is far larger)."""

Log = Callable[[str], None]


class ProfilingError(ExitbenchError):
    """Settings ``exitbench profile`` cannot measure with."""


# -- settings ----------------------------------------------------------------------------------
def parse_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; a :class:`ProfilingError` names the
    problem (an unknown device, CUDA asked for without a CUDA GPU, a GPU index out of range)."""
    text = str(text).strip()
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", text)
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ProfilingError(f"--device {text!r} is not a device exitbench can profile; use "
                             f"cpu, cuda or cuda:N (N = the GPU index)")
    if match.group(1) == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ProfilingError(f"--device {text!r} asks for CUDA, but torch {torch.__version__} "
                             f"sees no CUDA GPU (torch.cuda.is_available() is False); profile "
                             f"with --device cpu here, or run on a machine with a GPU and a "
                             f"CUDA build of torch")
    index = int(match.group(2) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ProfilingError(f"--device {text!r}: there is no GPU {index}; torch sees {count} "
                             f"GPU(s), indices 0..{count - 1}")
    return torch.device("cuda", index)


def default_source_lens(source_len: int) -> tuple[int, ...]:
    """Encoder-prefill source lengths when none are given: a quarter, a half and all of
    ``source_len``."""
    return tuple(sorted({max(1, source_len // 4), max(1, source_len // 2), source_len}))


def _sizes(values: Sequence[int], what: str, minimum: int = 1,
           why: str = "") -> tuple[int, ...]:
    sizes = []
    for value in values:
        if isinstance(value, bool) or int(value) != value or value < minimum:
            raise ProfilingError(f"{what} {value!r} is not an integer >= {minimum}{why}")
        sizes.append(int(value))
    if not sizes:
        raise ProfilingError(f"{what}: give at least one value")
    return tuple(sorted(set(sizes)))


@dataclass(frozen=True)
class ProfileSettings:
    """What ``exitbench profile`` measures and how."""

    device: str = "cpu"
    dtype: str = "float32"
    """``float32``, ``tf32`` (CUDA only), ``bfloat16`` or ``float16``."""
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    contexts: tuple[int, ...] = DEFAULT_CONTEXTS
    """Decoder keys of a step (the current token included), the decoder table's axis."""
    source_len: int = DEFAULT_SOURCE_LEN
    """Encoder keys of the decoder-layer table's cross-attention."""
    source_lens: tuple[int, ...] | None = None
    """Source lengths of the encoder-prefill table (default :func:`default_source_lens`)."""
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    measures: tuple[str, ...] | None = None
    """Measures whose checks are timed (``None``: every registered measure)."""
    min_run_seconds: float = DEFAULT_MIN_RUN_SECONDS
    seed: int = 0
    threads: int | None = None
    """``torch.set_num_threads`` before timing (``None``: torch's default)."""
    query_lens: tuple[int, ...] | None = None
    """Positions per row of the timed verification passes (self-speculation's ``k + 1``),
    below the middle context; ``None``: those of ``DEFAULT_QUERY_LENS`` that fit (no
    verification table when none does)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ProfilingError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        object.__setattr__(self, "batch_sizes", _sizes(self.batch_sizes, "batch size"))
        object.__setattr__(self, "contexts", _sizes(
            self.contexts, "context length", 2, " (--contexts counts the step's own key, so "
            "2 is the first with a cached one; context 1, the first step, is priced at the "
            "smallest context timed)"))
        if isinstance(self.source_len, bool) or int(self.source_len) != self.source_len \
                or self.source_len < 1:
            raise ProfilingError(f"--source-len {self.source_len!r} is not an integer >= 1")
        middle = self.contexts[len(self.contexts) // 2]
        if self.query_lens is None:
            object.__setattr__(self, "query_lens", tuple(
                q for q in DEFAULT_QUERY_LENS if q < middle))
        else:
            object.__setattr__(self, "query_lens", _sizes(
                self.query_lens, "query length", 2, " (a verification pass runs the drafts "
                "and the last draft token: k + 1 >= 2 positions)"))
            if max(self.query_lens) >= middle:
                raise ProfilingError(f"query length {max(self.query_lens)} does not fit below "
                                     f"the middle context {middle} it is timed at (the "
                                     f"verified positions are part of the context); give "
                                     f"longer --contexts or shorter --query-lens")
        lens = self.source_lens if self.source_lens is not None \
            else default_source_lens(int(self.source_len))
        object.__setattr__(self, "source_lens", _sizes(lens, "source length"))
        if isinstance(self.repeats, bool) or int(self.repeats) != self.repeats or self.repeats < 1:
            raise ProfilingError(f"--repeats {self.repeats!r} must be an integer >= 1")
        if isinstance(self.warmup, bool) or int(self.warmup) != self.warmup or self.warmup < 0:
            raise ProfilingError(f"--warmup {self.warmup!r} must be an integer >= 0")
        if not self.min_run_seconds >= 0:
            raise ProfilingError(f"min_run_seconds {self.min_run_seconds!r} must be >= 0")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ProfilingError(f"--threads {self.threads!r} must be an integer >= 1")


# -- timing ------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One table entry to time: per call, ``setup()`` (untimed) then ``op()`` (timed).

    With ``phases`` (names), ``op`` times itself and returns the seconds of each phase (a
    decoding step split into its parts); otherwise the call is timed around ``op``."""

    op: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    phases: tuple[str, ...] = ()
    inner: int = 1
    runs: list[tuple[float, ...]] = field(default_factory=list)


class Timer:
    """Times entries with warm-up, inner loops and the median of repeats (module docstring)."""

    def __init__(self, device: torch.device, repeats: int, warmup: int,
                 min_run_seconds: float = DEFAULT_MIN_RUN_SECONDS):
        self.device = device
        self.repeats = repeats
        self.warmup = warmup
        self.min_run_seconds = min_run_seconds

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, entry: Entry, calls: int) -> tuple[float, ...]:
        """Mean seconds (per phase) of ``calls`` timed calls of ``entry``."""
        total = [0.0] * max(1, len(entry.phases))
        for _ in range(calls):
            if entry.setup is not None:
                entry.setup()
            if entry.phases:
                for i, seconds in enumerate(entry.op()):
                    total[i] += seconds
                continue
            self.sync()
            start = time.perf_counter()
            entry.op()
            self.sync()
            total[0] += time.perf_counter() - start
        return tuple(t / calls for t in total)

    def time_entries(self, entries: dict[Any, Entry]) -> dict[Any, float | tuple[float, ...]]:
        """Median seconds per entry (per phase for phased entries), entries interleaved run
        by run."""
        for round_ in range(self.warmup):
            for entry in entries.values():
                seconds = sum(self.run(entry, 1))
                if round_ == self.warmup - 1:  # size the inner loop from the last warm-up
                    entry.inner = max(1, min(MAX_INNER_CALLS, math.ceil(
                        self.min_run_seconds / max(seconds, 1e-9))))
        for _ in range(self.repeats):
            for entry in entries.values():
                entry.runs.append(self.run(entry, entry.inner))
        medians: dict[Any, float | tuple[float, ...]] = {}
        for key, entry in entries.items():
            per_phase = tuple(statistics.median(run[i] for run in entry.runs)
                              for i in range(len(entry.runs[0])))
            medians[key] = per_phase if entry.phases else per_phase[0]
        return medians


# -- the operations ----------------------------------------------------------------------------
def _rms_normalise(hidden: torch.Tensor) -> torch.Tensor:
    from suite.learned import _rms_normalise as rms

    return rms(hidden)


def fill_cross_attention(adapter, state) -> None:
    """The cross-attention K/V of every decoder layer, stored in the cache as the first
    decoding step stores them (``T5Attention`` with ``is_updated``); later steps reuse them."""
    encoder = state.encoder_hidden
    batch, source, _ = encoder.shape
    cache = state.cache
    for index, block in enumerate(adapter.blocks):
        attention = block.layer[1].EncDecAttention
        shape = (batch, source, -1, attention.key_value_proj_dim)
        keys = attention.k(encoder).view(shape).transpose(1, 2)
        values = attention.v(encoder).view(shape).transpose(1, 2)
        cache.cross_attention_cache.update(keys, values, index)
        cache.is_updated[index] = True


def encoder_prefill(adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """What a batch pays once: the encoder and the cross-attention K/V of every layer."""
    state = adapter.start(input_ids, attention_mask)
    fill_cross_attention(adapter, state)
    return state


class _Inputs:
    """What a check reads, produced afresh by its untimed set-up before every call."""

    hidden: torch.Tensor
    probabilities: torch.Tensor


@dataclass
class DecoderBench:
    """A decode state of ``batch`` rows whose self-attention cache can be set to any of the
    timed lengths: per context ``C``, contiguous copies of ``C - 1`` cached keys per layer."""

    adapter: Any
    state: Any
    snapshots: dict[int, list[tuple[torch.Tensor, torch.Tensor]]]
    next_ids: torch.Tensor

    @classmethod
    def build(cls, adapter, batch: int, contexts: Sequence[int], source_len: int,
              generator: torch.Generator) -> DecoderBench:
        vocab = adapter.dims.vocab_size
        device = adapter.device
        source = torch.randint(2, vocab, (batch, source_len), generator=generator).to(device)
        state = encoder_prefill(adapter, source, torch.ones_like(source))
        longest = max(contexts) - 1
        prompt = torch.randint(2, vocab, (batch, longest), generator=generator).to(device)
        hidden = adapter.begin_step(state, prompt)
        for layer in range(adapter.num_layers):  # one parallel pass fills every layer's cache
            hidden = adapter.run_layer(state, layer, hidden)
        layers = state.cache.self_attention_cache.layers
        snapshots = {context: [(layer.keys[..., :context - 1, :].contiguous(),
                                layer.values[..., :context - 1, :].contiguous())
                               for layer in layers] for context in contexts}
        next_ids = torch.randint(2, vocab, (batch, 1), generator=generator).to(device)
        return cls(adapter, state, snapshots, next_ids)

    def set_context(self, context: int) -> None:
        """Cache ``context - 1`` keys in every layer (the copies themselves: the next append
        concatenates into a new tensor, as decoding does, and leaves them intact)."""
        for layer, (keys, values) in zip(self.state.cache.self_attention_cache.layers,
                                         self.snapshots[context]):
            layer.keys, layer.values = keys, values
        self.state.decoder_mask = None  # a timed rollback may have left one

    def set_cached(self, cached: int) -> None:
        """Cache ``cached`` keys in every layer (a prefix of the longest snapshot)."""
        longest = self.snapshots[max(self.snapshots)]
        for layer, (keys, values) in zip(self.state.cache.self_attention_cache.layers, longest):
            layer.keys, layer.values = keys[..., :cached, :], values[..., :cached, :]
        self.state.decoder_mask = None

    def first_block(self, context: int) -> torch.Tensor:
        """Start a step at ``context`` keys and run block 0: the state decoding is in when a
        check, an exit or a K/V fill follows a layer. Returns the block's output
        ``[B, 1, d]``; untimed set-up for those operations, so that they are timed with
        the caches and threads as decoding leaves them, not warmed by repeating them."""
        self.set_context(context)
        hidden = self.adapter.begin_step(self.state, self.next_ids)
        return self.adapter.run_layer(self.state, 0, hidden)


STEP_PHASES = ("begin", "layers", "head", "bookkeeping")
"""The parts of a greedy decoding step, timed in the loop's order."""


def decoding_step_entry(bench: DecoderBench, context: int, sync: Callable[[], None]) -> Entry:
    """One full greedy decoding step at ``context`` keys, in the order and with the work of
    :func:`suite.decoding.greedy_decode`, each part timed: ``begin`` (embedding, masks),
    ``layers`` (every block; / depth = the decoder-layer table), ``head`` (final norm, LM
    head, float32 softmax: the LM-head table) and ``bookkeeping`` (argmax, stopping and the
    host synchronisation of the stopping test). ``begin + bookkeeping`` is the fixed step.
    Timing the parts inside whole steps keeps each one in the cache and thread state the
    loop leaves it in (timed alone and repeated, the LM head ran 2-4x faster on CPU); each
    timed step follows an untimed one, as in decoding."""
    adapter = bench.adapter
    state = bench.state
    last = adapter.num_layers - 1
    batch = bench.next_ids.shape[0]
    alive = torch.ones(batch, dtype=torch.bool, device=adapter.device)
    lengths = torch.zeros(batch, dtype=torch.long, device=adapter.device)
    pad, eos = adapter.pad_token_id, adapter.eos_token_id

    def op() -> tuple[float, float, float, float]:
        sync()
        t0 = time.perf_counter()
        hidden = adapter.begin_step(state, bench.next_ids)
        sync()
        t1 = time.perf_counter()
        for layer in range(adapter.num_layers):
            hidden = adapter.run_layer(state, layer, hidden)
        sync()
        t2 = time.perf_counter()
        logits = adapter.exit_logits(last, hidden[:, -1])
        torch.softmax(logits, dim=-1, dtype=torch.float32)
        sync()
        t3 = time.perf_counter()
        token = torch.where(alive, logits.argmax(dim=-1), pad)
        lengths.add_(alive)
        still = alive & (token != eos)
        next_ids = token[:, None]  # noqa: F841 - what the loop feeds the next step
        bool(still.any())
        sync()
        t4 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3

    def setup() -> None:
        # the step before, untimed: a step follows a step, with the weights and the cache
        # tensors it touches warm (after another entry, e.g. a prefill, they would be cold)
        bench.set_context(context)
        op()
        bench.set_context(context)

    return Entry(op=op, setup=setup, phases=STEP_PHASES)


def kv_fill_entry(bench: DecoderBench, context: int) -> Entry:
    """K/V of one skipped layer (the last one) for the propagated states, after a block has
    run: the layer's self-attention norm, its K and V projections and the append to its
    cache."""
    adapter = bench.adapter
    layer = adapter.num_layers - 1
    block_attention = adapter.blocks[layer].layer[0]
    attention = block_attention.SelfAttention
    batch = bench.next_ids.shape[0]
    cache = bench.state.cache.self_attention_cache
    shape = (batch, 1, -1, attention.key_value_proj_dim)
    inputs = _Inputs()

    def setup() -> None:
        inputs.hidden = bench.first_block(context)  # the exited state, propagated

    def op() -> None:
        normed = block_attention.layer_norm(inputs.hidden)
        keys = attention.k(normed).view(shape).transpose(1, 2)
        values = attention.v(normed).view(shape).transpose(1, 2)
        cache.update(keys, values, layer)

    return Entry(op=op, setup=setup)


VERIFY_PHASES = ("setup", "layers")


def verify_entry(bench: DecoderBench, context: int, query_len: int,
                 sync: Callable[[], None], generator: torch.Generator) -> Entry:
    """A verification pass as :func:`suite.speculative.online.self_speculative_decode` runs
    its deep part: layer 0 holds ``context`` keys, layers ``1..L-1`` lack the last
    ``query_len`` positions; ``setup`` is ``begin_catch_up`` (the masks and relative
    position bias of ``query_len`` queries, paid once per verification), ``layers`` runs the
    ``query_len`` positions through layers ``1..L-1`` (/ ``L - 1``: the per-layer table). The
    set-up runs an untimed one-token step first, as the draft steps leave the weights warm."""
    adapter = bench.adapter
    batch = bench.next_ids.shape[0]
    hidden_in = torch.randn(batch, query_len, adapter.dims.d_model,
                            generator=generator).to(adapter.device, adapter.dtype)

    def op() -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        adapter.begin_catch_up(bench.state, 1, query_len)
        sync()
        t1 = time.perf_counter()
        hidden = hidden_in
        for layer in range(1, adapter.num_layers):
            hidden = adapter.run_layer(bench.state, layer, hidden)
        sync()
        return t1 - t0, time.perf_counter() - t1

    def setup() -> None:
        bench.set_cached(context - query_len - 1)
        hidden = adapter.begin_step(bench.state, bench.next_ids)
        for layer in range(adapter.num_layers):
            hidden = adapter.run_layer(bench.state, layer, hidden)
        # layer 0 holds the pass's positions already (the last draft token's one-token pass
        # and the drafts'); their values do not matter for timing
        first = bench.state.cache.self_attention_cache.layers[0]
        shape = (*first.keys.shape[:2], query_len, first.keys.shape[-1])
        first.keys = torch.cat([first.keys, first.keys[..., -1:, :].expand(shape)], dim=-2)
        first.values = torch.cat([first.values, first.values[..., -1:, :].expand(shape)], dim=-2)

    return Entry(op=op, setup=setup, phases=VERIFY_PHASES)


def position_bias_entry(bench: DecoderBench, context: int) -> Entry:
    """One step's relative position bias (one query over ``context`` keys), which T5's
    block 0 computes for every pass whatever its depth: a draft step of ``E < L`` layers
    pays all of it, while the decoder-layer table spreads it over ``L`` layers."""
    attention = bench.adapter.blocks[0].layer[0].SelfAttention
    device = bench.adapter.device
    return Entry(op=lambda: attention.compute_bias(1, context, device=device,
                                                   past_seen_tokens=context - 1),
                 setup=lambda: bench.first_block(context))


def rollback_entry(bench: DecoderBench, context: int, draft_length: int) -> Entry:
    """A cycle's acceptance of ``draft_length`` drafts and the rollback of the rejected
    positions of every layer (rows rejecting different counts at batch > 1), on a cache of
    ``context`` keys."""
    from suite.speculative.online import accept_drafts

    adapter = bench.adapter
    batch = bench.next_ids.shape[0]
    device = adapter.device
    verified = torch.randint(2, adapter.dims.vocab_size, (batch, draft_length + 1),
                             device=device)
    drafts = [verified[:, i].clone() for i in range(draft_length)]
    accepted_target = torch.arange(batch, device=device) % (draft_length + 1)
    for row in range(batch):  # row b accepts b mod (k + 1) drafts: different counts
        if accepted_target[row] < draft_length:
            drafts[int(accepted_target[row])][row] = 0
    drafted = torch.full((batch,), draft_length, dtype=torch.long, device=device)

    def op() -> None:
        accepted, _ = accept_drafts(verified, drafts, drafted, adapter.eos_token_id)
        adapter.rollback(bench.state, draft_length - accepted)

    return Entry(op=op, setup=lambda: bench.set_cached(context))


def prefill_entry(adapter, batch: int, source_len: int, generator: torch.Generator) -> Entry:
    source = torch.randint(2, adapter.dims.vocab_size, (batch, source_len),
                           generator=generator).to(adapter.device)
    mask = torch.ones_like(source)
    return Entry(op=lambda: encoder_prefill(adapter, source, mask))


def _decide(score: torch.Tensor) -> bool:
    """The threshold comparison and the batch's exit decision, brought to the host."""
    return bool((score >= CHECK_THRESHOLD).all())


def check_entry(name: str, measure: Measure, bench: DecoderBench, context: int,
                generator: torch.Generator) -> tuple[Entry, str]:
    """``(entry, how)``: one check of measure ``name`` for the bench's rows, and how it is done
    (``"real: ..."`` or ``"stand-in: ..."``).

    The untimed set-up runs what precedes a check in decoding: block 0 of a step
    (:meth:`DecoderBench.first_block`) and, for measures that read the exit head
    (``needs_lm_head``), the LM head and softmax, whose ``[B, V]`` float32 probabilities the
    check reads (the head itself is priced by the LM-head table). The timed check is the
    measure's own operation on the layer's output, the threshold comparison and the batch's
    exit decision on the host. Learned measures run the network their class builds
    (:meth:`suite.learned.LearnedMeasure.build_network`, default options) on the
    RMS-normalised state, as a deployed check would (the standardisation folds into the
    first linear layer); states of earlier layers a measure keeps (the window, the LSTM's
    h and c, the previous state) are random tensors of the right shapes."""
    from suite.learned import LearnedMeasure

    adapter = bench.adapter
    device = adapter.device
    dims = adapter.dims
    batch = bench.next_ids.shape[0]
    last = adapter.num_layers - 1
    d = dims.d_model
    needs_head = measure.check_cost(dims).needs_lm_head
    inputs = _Inputs()

    def setup() -> None:
        hidden = bench.first_block(context)[:, -1]
        inputs.hidden = hidden
        if needs_head:
            inputs.probabilities = torch.softmax(adapter.exit_logits(last, hidden), dim=-1,
                                                 dtype=torch.float32)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device)

    def entry(op: Callable[[], Any], how: str) -> tuple[Entry, str]:
        return Entry(op=op, setup=setup), how

    if needs_head:
        if name == "softmax_margin":
            def op() -> bool:
                top = inputs.probabilities.topk(2, dim=-1).values
                return _decide(top[:, 0] - top[:, 1])
            return entry(op, "real: top-2 of the [B, V] probabilities, their difference")
        if name == "top1_rising_heuristic":
            before, previous = torch.rand(batch, device=device), torch.rand(batch, device=device)

            def op() -> bool:
                top1 = inputs.probabilities.max(dim=-1).values
                rising = (before < previous) & (previous < top1)
                return _decide(torch.where(rising, top1, float("-inf")))
            return entry(op, "real: max of the [B, V] probabilities, two comparisons with the "
                             "saved ones")
        known = name in ("softmax_max", "free_shallow_deep")

        def op() -> bool:
            return _decide(inputs.probabilities.max(dim=-1).values)
        return entry(op, ("real" if known else "stand-in") + ": max of the [B, V] "
                                                             "probabilities")
    if isinstance(measure, LearnedMeasure):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = measure.build_network(d).to(device).eval()
        lstm = getattr(network, "lstm", None)
        if isinstance(lstm, torch.nn.LSTM):
            carried = (randn(lstm.num_layers, batch, lstm.hidden_size),
                       randn(lstm.num_layers, batch, lstm.hidden_size))

            def op() -> bool:
                state = _rms_normalise(inputs.hidden.float())[:, None, :]
                output, _ = lstm(state, carried)
                logits = network.readout(output[:, 0])
                return _decide(torch.softmax(logits, dim=-1)[:, 1])
            return entry(op, "real: RMS norm, one step of the measure's LSTM with carried "
                             "state, read-out")
        if name == "classifier_three_hidden" and hasattr(network, "mlp"):
            saved = [_rms_normalise(randn(batch, d)) for _ in range(2)]

            def op() -> bool:
                window = torch.cat([*saved, _rms_normalise(inputs.hidden.float())], dim=-1)
                return _decide(torch.softmax(network.mlp(window), dim=-1)[:, 1])
            return entry(op, "real: RMS norm, the measure's MLP on the [B, 3d] window")

        def op() -> bool:
            logits = network(_rms_normalise(inputs.hidden.float())[:, None, :])[:, -1]
            return _decide(torch.softmax(logits, dim=-1)[:, 1])
        return entry(op, "real: RMS norm, the measure's network on one layer's state [B, 1, d]")
    previous = randn(batch, d)

    def op() -> bool:
        return _decide(F.cosine_similarity(inputs.hidden.float(), previous, dim=-1))
    how = "cosine of two [B, d] states"
    return entry(op, ("real: " if name == "hidden_state_saturation" else "stand-in: ") + how)


def _measures_to_time(names: Sequence[str] | None, num_layers: int
                      ) -> tuple[dict[str, Measure], list[str]]:
    """``({name: measure}, skipped)``: the measures that check somewhere (by default every
    registered one); measures that never check need no table and are listed as skipped. A
    name may also be a measure file (``my_measure.py``) or ``package.module:Class``: it is
    loaded in the sandbox (:func:`suite.validate.load_measure`) and timed by a stand-in of
    its declared kind of check, under the measure's own ``name``."""
    from suite.measures import MEASURES
    from suite.validate import load_measure

    names = list(MEASURES.names()) if names is None else list(names)
    chosen: dict[str, Measure] = {}
    skipped: list[str] = []
    for name in names:
        measure_cls = load_measure(name).measure_cls  # an unknown name lists the closest ones
        label = str(getattr(measure_cls, "name", name))
        try:
            measure = measure_cls()
        except Exception as exc:  # noqa: BLE001 - re-raised naming the measure and the fix
            raise ProfilingError(f"measure {name!r} cannot be built with its default options "
                                 f"({type(exc).__name__}: {exc}); leave it out of --measures"
                                 ) from exc
        if not np.asarray(measure.checked_layers(num_layers)).any():
            skipped.append(label)  # static_layer, oracle: no check is ever made or priced
            continue
        chosen[label] = measure
    return chosen, skipped


def cpu_model_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment_of(device: torch.device, dtype: str) -> dict[str, Any]:
    env: dict[str, Any] = {"dtype": dtype, "torch_version": str(torch.__version__),
                           "threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda_version"] = str(torch.version.cuda)
    else:
        env["device_name"] = cpu_model_name()
    env["host"] = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} logical CPUs, "
                   f"python {platform.python_version()}")
    return env


def _round(seconds: float) -> float:
    return float(f"{seconds:.{SIGNIFICANT_DIGITS}g}")


# -- the profile -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileRun:
    """A measured profile and what the command reports about it."""

    data: dict[str, Any]
    """The ``kind: measured`` mapping written to the YAML file."""
    check_methods: dict[str, str]
    """Measure -> how its check was timed (real operation or stand-in)."""
    skipped_measures: tuple[str, ...]
    """Measures that never check (no table needed)."""
    fixed_step_by_batch: dict[int, float]
    seconds: float
    """Wall time of the measurement."""


def measure_profile(adapter, settings: ProfileSettings, *, model_id: str, name: str,
                    log: Log | None = None) -> ProfileRun:
    """Time every table of a measured profile for ``adapter``'s model on its device."""
    started = time.perf_counter()
    log = log or (lambda message: None)
    device = adapter.device
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    dims = adapter.dims
    measures, skipped = _measures_to_time(settings.measures, dims.num_layers)
    timer = Timer(device, settings.repeats, settings.warmup, settings.min_run_seconds)
    generator = torch.Generator().manual_seed(settings.seed)
    contexts = list(settings.contexts)
    middle_context = contexts[len(contexts) // 2]
    batches = list(settings.batch_sizes)
    source_lens = list(settings.source_lens or ())
    decoder = [[0.0] * len(contexts) for _ in batches]
    prefill = [[0.0] * len(source_lens) for _ in batches]
    lm_head, kv_fill, fixed = [0.0] * len(batches), [0.0] * len(batches), {}
    checks: dict[str, list[float]] = {measure: [0.0] * len(batches) for measure in measures}
    query_lens = list(settings.query_lens)
    if dims.num_layers < 2:  # no deep part to verify with
        query_lens = []
    verify = [[0.0] * len(query_lens) for _ in batches]
    verify_setup = [[0.0] * len(query_lens) for _ in batches]
    rollback = [0.0] * len(batches)
    position_bias = [0.0] * len(batches)
    methods: dict[str, str] = {}
    with torch.inference_mode():
        for b, batch in enumerate(batches):
            batch_started = time.perf_counter()
            bench = DecoderBench.build(adapter, batch, contexts, settings.source_len, generator)
            entries: dict[Any, Entry] = {}
            for c, context in enumerate(contexts):
                entries[("step", c)] = decoding_step_entry(bench, context, timer.sync)
            entries[("kv_fill",)] = kv_fill_entry(bench, middle_context)
            for s, source_len in enumerate(source_lens):
                entries[("prefill", s)] = prefill_entry(adapter, batch, source_len, generator)
            for measure_name, measure in measures.items():
                entry, how = check_entry(measure_name, measure, bench, middle_context, generator)
                methods[measure_name] = how
                entries[("check", measure_name)] = entry
            for q, query_len in enumerate(query_lens):
                entries[("verify", q)] = verify_entry(bench, middle_context, query_len,
                                                      timer.sync, generator)
            entries[("rollback",)] = rollback_entry(bench, middle_context,
                                                    max(query_lens, default=2) - 1)
            entries[("bias",)] = position_bias_entry(bench, middle_context)
            seconds = timer.time_entries(entries)
            steps = [seconds[("step", c)] for c in range(len(contexts))]
            phase = {name: [step[i] for step in steps] for i, name in enumerate(STEP_PHASES)}
            decoder[b] = [t / dims.num_layers for t in phase["layers"]]
            lm_head[b] = statistics.median(phase["head"])
            fixed[batch] = statistics.median(
                begin + rest for begin, rest in zip(phase["begin"], phase["bookkeeping"]))
            for s in range(len(source_lens)):
                prefill[b][s] = seconds[("prefill", s)]
            kv_fill[b] = seconds[("kv_fill",)]
            for measure_name in measures:
                checks[measure_name][b] = seconds[("check", measure_name)]
            verify[b] = [seconds[("verify", q)][1] / max(1, dims.num_layers - 1)
                         for q in range(len(query_lens))]
            verify_setup[b] = [seconds[("verify", q)][0] for q in range(len(query_lens))]
            position_bias[b] = seconds[("bias",)]
            rollback[b] = seconds[("rollback",)]
            del bench, entries
            log(f"batch {batch}: decoder layer "
                + ", ".join(f"C={c} {1e6 * t:.0f} us" for c, t in zip(contexts, decoder[b]))
                + f"; LM head {1e6 * lm_head[b]:.0f} us; K/V fill {1e6 * kv_fill[b]:.0f} us; "
                f"fixed step {1e6 * fixed[batch]:.0f} us; prefill "
                + ", ".join(f"S={s} {1e3 * t:.2f} ms" for s, t in zip(source_lens, prefill[b]))
                + f" ({time.perf_counter() - batch_started:.1f} s)")

    config = adapter.model.config
    stand_ins = sorted(m for m, how in methods.items() if how.startswith("stand-in"))
    environment = environment_of(device, settings.dtype)
    description = (f"measured by `exitbench profile` on {environment['device_name']} "
                   f"({device}, {settings.dtype}, {torch.get_num_threads()} threads) for "
                   f"{model_id}; valid for that model's sizes only"
                   + (f"; checks of {', '.join(stand_ins)} timed with stand-ins"
                      if stand_ins else ""))
    synced = " after torch.cuda.synchronize" if device.type == "cuda" else ""
    timer_text = (f"time.perf_counter{synced} around each call, or each part of a whole "
                  f"greedy step (decoder layer = the step's {dims.num_layers} blocks / "
                  f"{dims.num_layers}; LM head; fixed = embedding and masks + argmax and "
                  f"stopping); checks and K/V fill after an untimed block; a run is the mean "
                  f"of calls lasting >= {settings.min_run_seconds * 1e3:g} ms; entries of a "
                  f"batch size interleaved run by run")
    data: dict[str, Any] = {
        "name": name, "kind": "measured", "description": description,
        "format_version": MEASURED_FORMAT_VERSION,
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")
        .replace("+00:00", "Z"),
        "suite_version": _suite_version(),
        "environment": environment,
        "model": {"id": model_id, "num_layers": dims.num_layers, "d_model": dims.d_model,
                  "d_ff": dims.d_ff, "num_heads": dims.num_heads, "d_kv": dims.d_kv,
                  "vocab_size": dims.vocab_size,
                  "num_encoder_layers": int(getattr(config, "num_layers", dims.num_layers)),
                  "gated_ffn": bool(getattr(config, "is_gated_act", False))},
        "method": {"warmup": settings.warmup, "repeats": settings.repeats,
                   "statistic": "median", "timer": timer_text},
        "tables": {
            "decoder_layer_seconds": {
                "batch_sizes": batches, "context_lens": contexts,
                "source_len": int(settings.source_len),
                "seconds": [[_round(t) for t in row] for row in decoder]},
            "lm_head_seconds": {"batch_sizes": batches, "seconds": [_round(t) for t in lm_head]},
            "kv_fill_seconds": {"batch_sizes": batches, "seconds": [_round(t) for t in kv_fill]},
            "measure_check_seconds": {
                measure_name: {"batch_sizes": batches,
                               "seconds": [_round(t) for t in checks[measure_name]]}
                for measure_name in measures},
            "encoder_prefill_seconds": {
                "batch_sizes": batches, "source_lens": source_lens,
                "seconds": [[_round(t) for t in row] for row in prefill]},
            "fixed_step_seconds": _round(statistics.median(fixed.values())),
            "rollback_seconds": {"batch_sizes": batches,
                                 "seconds": [_round(t) for t in rollback]},
            "position_bias_seconds": {"batch_sizes": batches,
                                      "seconds": [_round(t) for t in position_bias]},
        },
    }
    if query_lens:
        data["tables"]["verify_layer_seconds"] = {
            "batch_sizes": batches, "query_lens": query_lens,
            "context_len": int(middle_context), "source_len": int(settings.source_len),
            "seconds": [[_round(t) for t in row] for row in verify],
            "setup_seconds": [[_round(t) for t in row] for row in verify_setup]}
    return ProfileRun(data=data, check_methods=methods, skipped_measures=tuple(skipped),
                      fixed_step_by_batch=fixed, seconds=time.perf_counter() - started)


def _suite_version() -> str:
    from suite import __version__

    return __version__


def profile_name(out: str | Path) -> str:
    """The profile's name: the file stem of ``out``, which must be a ``.yaml`` file (the
    registry discovers ``hardware_profiles/*.yaml``)."""
    out = Path(out)
    if out.suffix != ".yaml":
        raise ProfilingError(f"--out {str(out)!r} must name a .yaml file (profiles are found as "
                             f"hardware_profiles/<name>.yaml), e.g. hardware_profiles/"
                             f"{out.stem or 'cpu_measured'}.yaml")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", out.stem):
        raise ProfilingError(f"--out {str(out)!r}: the file stem {out.stem!r} is the profile's "
                             f"name; use letters, digits, '_', '-' or '.'")
    return out.stem


class _PlainDumper(yaml.SafeDumper):
    """Safe YAML for people too: no anchors or aliases (``&id001``), and lists of numbers on
    one line (``[1, 8, 32]``), so each table row reads as a row."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def represent_list(self, data: list) -> yaml.Node:
        numbers = all(isinstance(item, (int, float)) and not isinstance(item, bool)
                      for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=numbers)


_PlainDumper.add_representer(list, _PlainDumper.represent_list)


def write_profile(data: dict[str, Any], out: str | Path) -> MeasuredProfile:
    """Validate ``data`` as a measured profile named after ``out`` and write it atomically."""
    from suite.atomic import atomic_write_bytes

    out = Path(out)
    profile = parse_profile(data, str(out), name=profile_name(out))
    header = (f"# Measured by `exitbench profile` ({data.get('measured_at', '')}); "
              f"schema: docs/cost_model.md.\n")
    text = header + yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, width=100)
    atomic_write_bytes(out, text.encode("utf-8"))
    return profile  # type: ignore[return-value]


def load_profiling_adapter(model: str, device: torch.device, dtype: str):
    """The model's adapter on ``device`` at ``dtype`` (``tf32``: float32 weights with TF32
    matmuls, CUDA only)."""
    from suite.models import load_adapter

    if dtype == "tf32":
        if device.type != "cuda":
            raise ProfilingError("--dtype tf32 is a CUDA tensor-core mode; on a CPU, profile "
                                 "with --dtype float32 (or bfloat16)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return load_adapter(model, device=device, dtype="float32" if dtype == "tf32" else dtype)


def profile_model(model: str, out: str | Path, settings: ProfileSettings,
                  log: Log | None = None) -> tuple[MeasuredProfile, ProfileRun]:
    """Measure ``model`` (a local folder or a hub id) on ``settings.device`` and write the
    profile to ``out``; returns the loaded profile and the run."""
    from suite.validate import load_measure

    name = profile_name(out)  # fail before loading the model and timing
    for measure_name in settings.measures or ():
        load_measure(measure_name)  # an unknown name lists the closest ones; a file loads
    device = parse_device(settings.device)
    adapter = load_profiling_adapter(model, device, settings.dtype)
    run = measure_profile(adapter, settings, model_id=model, name=name, log=log)
    return write_profile(run.data, out), run
