"""Offline replay: a measure's scores and a vector of thresholds -> every token's exit layer,
the replayed output, and what it costs in quality.

The exit rule (shared by every measure): a token exits at the first layer
``l >= min_layer`` whose score reaches the threshold, else at the last layer.

Vectorisation (torch, multi-threaded). For each token let ``M[l]`` be the running maximum of the
scores over layers ``min_layer..l`` (``-inf`` below ``min_layer``). ``M`` is
non-decreasing, so a threshold ``t`` is first reached at the first ``l`` with
``M[l] >= t``. With the thresholds sorted, ``reached[l] = searchsorted(t, M[l],
"right")`` counts the thresholds reached by layer ``l``; the exit layer of
threshold ``k`` is the number of layers with ``reached[l] <= k``. That count is
built by one scatter per layer and a cumulative sum over thresholds:
O(tokens x (layers + thresholds)) work instead of tokens x layers x thresholds,
and no Python loop per token or per threshold.

Two engines compute the same arrays: the compiled kernels of :mod:`suite.replay_kernels`
(numba; one pass per token, the default where numba imports) and the array path above
(``engine="reference"``), which the tests compare the kernels with. The environment variable
``EXITBENCH_REPLAY_ENGINE`` (``auto``, ``numba``, ``reference``) picks the default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from suite.traces import TraceArrays, hash_strings

TOKEN_CHUNK = 1 << 18
"""Tokens per chunk of the reference path, which bounds its [tokens, thresholds] scratch array
(~26 MB at 100 thresholds)."""

ENGINES = ("auto", "numba", "reference")


def _kernels():
    """:mod:`suite.replay_kernels`, or ``None`` where numba does not import."""
    try:
        from suite import replay_kernels
    except ImportError:  # numba missing or broken: the reference path still works
        return None
    return replay_kernels


def resolve_engine(engine: str | None = None) -> str:
    """``numba`` or ``reference``: the engine :func:`replay` and :func:`exit_statistics` use
    for ``engine`` (``None``: ``EXITBENCH_REPLAY_ENGINE``, default ``auto``)."""
    from suite.errors import ExitbenchError

    engine = engine or os.environ.get("EXITBENCH_REPLAY_ENGINE", "auto")
    if engine not in ENGINES:
        raise ExitbenchError(f"replay engine {engine!r} is not one of {', '.join(ENGINES)} "
                             f"(check EXITBENCH_REPLAY_ENGINE)")
    if engine == "reference":
        return engine
    if _kernels() is None:
        if engine == "numba":
            raise ExitbenchError("replay engine 'numba' asked for, but numba does not import; "
                                 "install it (pip install numba) or use 'reference'")
        return "reference"
    return "numba"


def _thresholds_as(thresholds: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Thresholds in the scores' float type, rounded up where the cast rounded down, so that
    ``score >= cast(threshold)`` holds exactly when ``score >= threshold`` does."""
    exact = torch.from_numpy(thresholds)
    cast = exact.to(dtype)
    low = cast.double() < exact
    cast[low] = torch.nextafter(cast[low], torch.tensor(float("inf"), dtype=dtype))
    return cast


@dataclass(frozen=True)
class Replay:
    """Exit layers of one measure at every threshold, plus the compact per-token form they
    come from, which the statistics use without touching the ``[K, T]`` array."""

    exits: np.ndarray
    """``[K, T]`` exit layer (0-based) per threshold (in the caller's order) and token."""
    reached: np.ndarray
    """``[T, L - 1]`` int: how many of the sorted thresholds each token's running-max score
    reaches by layer ``l`` (non-decreasing in ``l``); exit(k) = first ``l`` with
    ``reached[l] > k``, else the last layer."""
    order: np.ndarray
    """``[K]`` argsort of the thresholds: sorted index ``j`` is threshold ``order[j]``."""


def replay(scores: np.ndarray, thresholds: Sequence[float] | np.ndarray,
           min_layer: int = 0, *, engine: str | None = None) -> Replay:
    """Exit layer (0-based) of every token for every threshold.

    ``scores`` is ``[tokens, layers]``; NaN counts as "never exit here" (validation rejects
    measures that produce it). Thresholds may come in any order; rows of ``exits`` follow
    their order. ``exits`` is int8 when the model has at most 127 layers, else int16.
    ``engine`` picks the implementation (see the module docstring); both give equal arrays.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [tokens, layers], got shape {scores.shape}")
    num_tokens, num_layers = scores.shape
    if not 0 <= min_layer < num_layers:
        raise ValueError(f"min_layer {min_layer} is outside 0..{num_layers - 1}")
    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    order = np.argsort(thresholds, kind="stable")
    num_thresholds = len(thresholds)
    if resolve_engine(engine) == "numba":
        if not (np.issubdtype(scores.dtype, np.floating) and scores.dtype.itemsize >= 4):
            scores = scores.astype(np.float64)
        exits = np.empty((num_thresholds, num_tokens),
                         dtype=np.int8 if num_layers <= 127 else np.int16)
        reached = np.empty((num_tokens, num_layers - 1), dtype=np.int32)
        _kernels().replay_kernel(np.ascontiguousarray(scores), thresholds[order],
                                 order.astype(np.intp), int(min_layer), exits, reached)
        return Replay(exits=exits, reached=reached, order=order)
    return _replay_reference(scores, thresholds, order, min_layer)


def _replay_reference(scores: np.ndarray, thresholds: np.ndarray, order: np.ndarray,
                      min_layer: int) -> Replay:
    """The array path (torch ops over chunks of tokens): the reference the kernel matches."""
    num_tokens, num_layers = scores.shape
    num_thresholds = len(thresholds)
    float_dtype = torch.float64 if scores.dtype == np.float64 else torch.float32
    boundaries = _thresholds_as(thresholds[order], float_dtype)
    layer_dtype = torch.int8 if num_layers <= 127 else torch.int16
    result = np.empty((num_thresholds, num_tokens), dtype=np.int8 if num_layers <= 127
                      else np.int16)
    checked = num_layers - 1  # the last layer always exits
    reached_all = np.empty((num_tokens, checked), dtype=np.int32)
    result_view = torch.from_numpy(result)
    for start in range(0, num_tokens, TOKEN_CHUNK):  # chunks bound memory; no per-token loop
        chunk = torch.from_numpy(np.ascontiguousarray(scores[start:start + TOKEN_CHUNK]))
        chunk = torch.nan_to_num(chunk.to(float_dtype)[:, :checked], nan=-float("inf"))
        chunk[:, :min_layer] = -float("inf")
        # thresholds reached by each layer's score, then by the running max over layers
        reached = torch.cummax(torch.bucketize(chunk, boundaries, right=True), dim=1).values
        reached[:, :min_layer] = 0  # no exit before min_layer, even for a threshold of -inf
        width = chunk.shape[0]
        reached_all[start:start + width] = reached.numpy()
        counts = torch.zeros((width, num_thresholds + 1), dtype=layer_dtype)
        counts.scatter_add_(1, reached, torch.ones_like(reached, dtype=layer_dtype))
        # exit layer for threshold k = number of layers that reach at most k thresholds
        exits = torch.cumsum(counts[:, :num_thresholds], dim=1, dtype=layer_dtype)
        result_view[:, start:start + width] = exits.T
    if not np.array_equal(order, np.arange(num_thresholds)):
        unsorted = np.empty_like(result)
        unsorted[order] = result
        result = unsorted
    return Replay(exits=result, reached=reached_all, order=order)


def exit_layers(scores: np.ndarray, thresholds: Sequence[float] | np.ndarray,
                min_layer: int = 0, *, engine: str | None = None) -> np.ndarray:
    """``[thresholds, tokens]`` exit layers; see :func:`replay`."""
    return replay(scores, thresholds, min_layer, engine=engine).exits


def replayed_tokens(traces: TraceArrays, exits: np.ndarray) -> np.ndarray:
    """The prediction at each token's exit layer along the recorded trajectory: ``[K, T]``."""
    rows = np.arange(traces.num_tokens)[None, :]
    return traces.top1_id[rows, exits.astype(np.intp)]


@dataclass(frozen=True)
class ExitStatistics:
    """Per-threshold summaries of where tokens exit. Layers are counted 1-based in
    ``mean_layers_used`` (a token exiting at layer index 0 used one layer)."""

    mean_layers_used: np.ndarray
    """``[K]`` mean number of decoder layers run per token."""
    exit_histogram: np.ndarray
    """``[K, L]`` fraction of tokens exiting at each layer."""
    token_agreement: np.ndarray
    """``[K]`` fraction of tokens whose replayed prediction equals the full-depth token."""


def exit_statistics(traces: TraceArrays, result: Replay, *,
                    engine: str | None = None) -> ExitStatistics:
    """Exit histogram, mean layers used and token agreement for every threshold, in
    O(tokens x layers): token ``t`` exits at layer ``l`` for the sorted thresholds
    ``k`` in ``[reached[l-1], reached[l])``, so each (token, layer) adds a +1/-1 pair to a
    difference array over thresholds, summed by one cumulative sum."""
    num_tokens, num_layers = traces.num_tokens, traces.num_layers
    num_thresholds = len(result.order)
    if resolve_engine(engine) == "numba":
        import numba

        counts, agreeing = _kernels().statistics_kernel(
            np.ascontiguousarray(result.reached), np.ascontiguousarray(traces.top1_id),
            np.ascontiguousarray(traces.final_id), num_thresholds,
            max(1, min(numba.get_num_threads(), num_tokens)))
        return _statistics(counts.T.astype(np.float64), agreeing.T.astype(np.float64),
                           result.order, num_tokens, num_layers)
    width = num_thresholds + 1
    counts = np.zeros((num_layers, width))
    agreeing = np.zeros((num_layers, width))
    lower = np.zeros(num_tokens, dtype=np.intp)  # reached[l - 1], 0 before the first layer
    for layer in range(num_layers):  # a loop over layers; each step is vectorised over tokens
        last = layer == num_layers - 1
        upper = None if last else result.reached[:, layer].astype(np.intp)
        agree = (traces.top1_id[:, layer] == traces.final_id).astype(np.float64)
        counts[layer] = np.bincount(lower, minlength=width)
        agreeing[layer] = np.bincount(lower, agree, minlength=width)
        if last:  # the last layer catches every threshold not reached before it
            counts[layer, num_thresholds] -= num_tokens
            agreeing[layer, num_thresholds] -= agree.sum()
        else:
            counts[layer] -= np.bincount(upper, minlength=width)
            agreeing[layer] -= np.bincount(upper, agree, minlength=width)
            lower = upper
    counts = np.cumsum(counts, axis=1)[:, :num_thresholds].T  # [K sorted, L]
    agreeing = np.cumsum(agreeing, axis=1)[:, :num_thresholds].T
    return _statistics(counts, agreeing, result.order, num_tokens, num_layers)


def _statistics(counts: np.ndarray, agreeing: np.ndarray, order: np.ndarray, num_tokens: int,
                num_layers: int) -> ExitStatistics:
    """Statistics from ``[K sorted, L]`` tokens exiting / agreeing per layer."""
    num_thresholds = len(order)
    total = max(num_tokens, 1)
    histogram = np.empty((num_thresholds, num_layers))
    histogram[order] = counts / total
    agreement = np.empty(num_thresholds)
    agreement[order] = agreeing.sum(axis=1) / total
    mean_used = histogram @ (np.arange(num_layers) + 1.0)
    return ExitStatistics(mean_layers_used=mean_used, exit_histogram=histogram,
                          token_agreement=agreement)


def sequences_by_example(traces: TraceArrays, tokens_row: np.ndarray,
                         eos_token_id: int | Sequence[int] | None) -> list[list[int]]:
    """Split one threshold's ``[T]`` replayed tokens into per-example id lists, cut at the
    first EOS (or the first of several stop ids): an early stop ends the replayed output
    there."""
    starts, ends = traces.example_bounds()
    stops = None if eos_token_id is None else np.atleast_1d(np.asarray(eos_token_id))
    sequences = []
    for start, end in zip(starts, ends):  # per example (hundreds), not per token
        ids = tokens_row[start:end]
        if stops is not None:
            hits = np.flatnonzero(np.isin(ids, stops))
            if hits.size:
                ids = ids[:hits[0]]
        sequences.append(ids.tolist())
    return sequences


def outputs_hash(outputs: Sequence[str]) -> str:
    """SHA-256 of a list of outputs (the score cache's key)."""
    return hash_strings(list(outputs))


class ScoreCache:
    """Task-metric results keyed by the hash of the whole output list, so thresholds that
    replay to the same outputs (common: every high threshold is full depth) are scored once.
    Optionally persisted as JSON in the run directory."""

    def __init__(self, path=None):
        import json
        from pathlib import Path

        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        if self.path and self.path.is_file():
            self.entries = json.loads(self.path.read_text("utf-8"))
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: str, compute: Callable[[], dict]) -> dict:
        if key in self.entries:
            self.hits += 1
            return self.entries[key]
        self.misses += 1
        value = compute()
        self.entries[key] = value
        return value

    def save(self) -> None:
        if self.path:
            from suite.atomic import atomic_write_json
            atomic_write_json(self.path, self.entries)
