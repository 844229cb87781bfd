"""The study's analyses over recorded traces: monotonicity of predictions and confidence,
and easy vs difficult sequences by hidden-state saturation.

Everything here is a pure, vectorised function of :class:`~suite.traces.TraceArrays`
(``[tokens, layers]`` arrays; Python loops only run over layers, start layers or
backbones, never over tokens). Layers are 0-based: a model with ``L`` decoder layers has
layers ``0 .. L-1`` and ``L-1`` is the last. A *sequence* is one example's run of tokens
(``TraceArrays.example_bounds``): the model's own greedy output in ``generated`` traces,
the reference summary in ``forced`` ones.

Monotonicity of predictions and confidence (every layer, every token):

- **stable prediction** at layer ``l``: ``top1_id[t, l] == top1_id[t, m]`` for every
  ``m > l`` (so the last layer is always stable). ``stable_fraction[l]`` is the share of
  tokens stable at ``l``: the accuracy an oracle exit rule "stop once the prediction will
  not change again" would keep from layer ``l`` on.
- **confidence** at layer ``l``: ``final_prob[t, l]``, the probability layer ``l``'s exit
  head gives to the last layer's prediction. Per layer, its mean and population standard
  deviation (``ddof=0``) over tokens.
- **non-decreasing from** ``l``: ``final_prob[t, l] <= final_prob[t, l+1] <= ... <=
  final_prob[t, L-1]`` (exact float comparison; equal values count as non-decreasing).
  ``nondecreasing_share[l]`` is the share of tokens for which it holds; 1 at ``L-1``.

Hidden-state saturation (after the study's ``sequence_types.py``): ``cos_last[t, l]`` is
the cosine similarity of layer ``l``'s hidden state with the last layer's. The last layer's
own similarity is 1 by construction, so, as in the study, only the *compared layers*
``0 .. L-2`` enter the saturation statistics; a model needs at least 2 layers.

- a layer is **saturated** for a token when ``cos_last >= threshold`` (0.9 by default);
- a sequence's **similarity curve** is ``curve[l] = mean over its tokens of cos_last[t, l]``
  for ``l = 0 .. L-2``; its **mean similarity** is the mean of that curve (the mean of
  ``cos_last`` over its tokens and compared layers);
- its **first saturated layer** is the first ``l`` with ``curve[l] >= threshold`` (-1 when
  no compared layer reaches it) and its **number of saturated layers** counts those ``l``;
  its **length** is its number of tokens. The same three are reported per token too
  (token's own ``cos_last``), aggregated over tokens;
- **easy** sequences are the ``K`` with the highest mean similarity, **difficult** the
  ``K`` with the lowest, ``K = min(top_k, num_sequences // 2)`` so the two never overlap
  (one ranking, ties broken by row order); the study took 1000 of 2500 CNN/DM sequences;
- **strictly increasing from** ``s``: ``x[s] < x[s+1] < ... < x[L-2]`` (ties are not
  strict; a single compared layer is vacuously increasing), for ``x`` a token's
  ``cos_last`` row (the study's unit: one decoding step, a prefix of the sequence) and for
  ``x`` a sequence's similarity curve; reported as the share of tokens and of sequences.
  Start layers are given for a 24-layer model, as the study did (0, 4, 8), and scaled to a
  shallower model by :func:`scaled_start_layers`.

Which states (``AnalysisSettings.states``): ``normed`` (default, the study's: its
``decoder_hidden_states`` pass through the decoder's final norm before the cosine, so it
compares ``cos_last_normed``) or ``raw`` (the un-normed residual stream, ``cos_last``).

Prefix length (the study's "longer sequences are easier"): a token's prefix length is its
position, the number of tokens generated before it. Per prefix length, the tokens' mean
similarity (over compared layers) and share never saturated; the Spearman correlation of
prefix length with a token's mean similarity; and the mean prefix length of the ``K``
easiest and ``K`` most difficult tokens (prefixes) by mean similarity, beside all tokens'.

:func:`analyse_traces` computes all of it for one (model, kind); :func:`analysis_tables`,
:func:`write_tables` and :func:`write_figures` turn several into CSV/JSON tables and one
matplotlib figure per analysis with every backbone on the same axes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite.atomic import atomic_write, atomic_write_bytes, atomic_write_json
from suite.errors import ExitbenchError
from suite.keys import file_stem
from suite.traces import TraceArrays

REFERENCE_LAYERS = 24
"""Depth for which ``increasing_from`` start layers are given (the study's T5-large-sized
decoders); shallower models get them scaled."""
KIND_TITLES = {"generated": "the model's own generations", "forced": "reference-forced"}


class AnalysisError(ExitbenchError):
    """Traces or settings the analyses cannot use (too few layers, no tokens, bad K)."""


# -- small building blocks ---------------------------------------------------------------------
def _check(traces: TraceArrays, what: str = "traces") -> None:
    if traces.num_tokens == 0:
        raise AnalysisError(f"{what}: hold no tokens; record them first "
                            f"(`exitbench record --config ... --kind both`)")
    if traces.num_layers < 2:
        raise AnalysisError(f"{what}: have {traces.num_layers} decoder layer(s); the analyses "
                            f"compare layers with the last one and need at least 2")


def holds_from(ok_next: np.ndarray) -> np.ndarray:
    """``[N, L]`` from ``ok_next`` ``[N, L-1]`` (``ok_next[:, l]``: the pair ``(l, l+1)``
    is in order): ``out[:, l]`` is True when every pair from ``l`` on is in order, i.e. a
    reverse cumulative AND; the last column is True (nothing follows it)."""
    n = ok_next.shape[0]
    tail = np.logical_and.accumulate(ok_next[:, ::-1], axis=1)[:, ::-1]
    return np.concatenate([tail, np.ones((n, 1), dtype=bool)], axis=1)


def stable_predictions(top1_id: np.ndarray) -> np.ndarray:
    """``[T, L]`` bool: layer ``l``'s top-1 equals the top-1 of every later layer."""
    return holds_from(top1_id[:, :-1] == top1_id[:, 1:])


def nondecreasing_from(values: np.ndarray) -> np.ndarray:
    """``[N, L]`` bool: ``values[:, l] <= values[:, l+1] <= ... <= values[:, -1]``."""
    return holds_from(values[:, :-1] <= values[:, 1:])


def strictly_increasing_from(values: np.ndarray) -> np.ndarray:
    """``[N, L]`` bool: ``values[:, l] < values[:, l+1] < ... < values[:, -1]`` (ties fail)."""
    return holds_from(values[:, :-1] < values[:, 1:])


def first_true(mask: np.ndarray) -> np.ndarray:
    """``[N]`` index of the first True column of each row, -1 for a row with none."""
    first = np.argmax(mask, axis=1)
    return np.where(mask.any(axis=1), first, -1)


def scaled_start_layers(starts: Sequence[int], num_layers: int,
                        reference_layers: int = REFERENCE_LAYERS) -> tuple[int, ...]:
    """Start layers given for a ``reference_layers``-deep model, for one with ``num_layers``
    layers: ``floor(s * num_layers / reference_layers + 0.5)`` (half rounds up) when the
    model is shallower, ``s`` itself otherwise; each is capped at the last compared layer
    ``num_layers - 2`` and duplicates are dropped (first kept), so the 24-layer ``[0, 4, 8]``
    gives ``[0, 1, 2]`` for 6 layers and ``[0, 1]`` for 3."""
    if num_layers < 2:
        raise AnalysisError(f"strictly-increasing indicators need at least 2 layers, "
                            f"got {num_layers}")
    out: list[int] = []
    for start in starts:
        if start < 0:
            raise AnalysisError(f"analysis.increasing_from: start layer {start} is negative; "
                                f"layers are 0-based")
        layer = (math.floor(start * num_layers / reference_layers + 0.5)
                 if num_layers < reference_layers else int(start))
        layer = min(layer, num_layers - 2)
        if layer not in out:
            out.append(layer)
    if not out:
        raise AnalysisError("analysis.increasing_from: give at least one start layer, "
                            "e.g. [0, 4, 8]")
    return tuple(out)


# -- results -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AnalysisSettings:
    """What the analyses depend on besides the traces (``SuiteConfig.analysis``)."""

    saturation_threshold: float = 0.9
    top_k: int = 1000
    increasing_from: tuple[int, ...] = (0, 4, 8)
    """Start layers for a 24-layer model (scaled by :func:`scaled_start_layers`)."""
    states: str = "normed"
    """``normed`` (the study's: cosines between final-normed states) or ``raw``."""

    def __post_init__(self) -> None:
        if self.states not in ("normed", "raw"):
            raise AnalysisError(f"analysis.states {self.states!r} is not 'normed' (the study's) "
                                f"or 'raw'")
        if self.top_k < 1:
            raise AnalysisError(f"analysis.top_k must be at least 1, got {self.top_k}")
        if not -1.0 < self.saturation_threshold <= 1.0:
            raise AnalysisError(f"analysis.saturation_threshold {self.saturation_threshold} "
                                f"is not a cosine similarity in (-1, 1]")


@dataclass(frozen=True)
class LayerStats:
    """Per-layer monotonicity statistics over all tokens; each field has ``L`` entries."""

    stable_fraction: np.ndarray
    """Share of tokens whose top-1 at ``l`` equals the top-1 at every later layer."""
    final_prob_mean: np.ndarray
    """Mean over tokens of ``final_prob[:, l]`` (probability of the last layer's prediction)."""
    final_prob_std: np.ndarray
    """Population standard deviation (``ddof=0``) of ``final_prob[:, l]``."""
    nondecreasing_share: np.ndarray
    """Share of tokens whose ``final_prob`` is non-decreasing from ``l`` to the last layer."""
    top1_prob_mean: np.ndarray
    """Mean of each layer's own top-1 probability (for reference)."""
    similarity_mean: np.ndarray
    """Mean of ``cos_last[:, l]`` over tokens (1 at the last layer)."""
    saturated_share: np.ndarray
    """Share of tokens with ``cos_last[:, l] >= threshold``."""


@dataclass(frozen=True)
class SequenceSaturation:
    """Per-sequence saturation; arrays have one entry (or row) per sequence, in row order."""

    example_id: np.ndarray
    """``[S]`` example ids."""
    length_tokens: np.ndarray
    """``[S]`` tokens in the sequence."""
    curve: np.ndarray
    """``[S, L-1]`` mean over the sequence's tokens of ``cos_last`` at compared layers."""
    mean_similarity: np.ndarray
    """``[S]`` mean of ``curve`` (= mean ``cos_last`` over tokens and compared layers)."""
    first_saturated_layer: np.ndarray
    """``[S]`` first compared layer whose ``curve`` reaches the threshold; -1: none does."""
    num_saturated_layers: np.ndarray
    """``[S]`` compared layers whose ``curve`` reaches the threshold."""
    increasing: np.ndarray
    """``[S, L-1]`` bool: ``curve`` strictly increasing from layer ``l``."""
    token_increasing: np.ndarray
    """``[T, L-1]`` bool: the token's ``cos_last`` strictly increasing from layer ``l``."""
    token_first_saturated_layer: np.ndarray
    """``[T]`` each token's first compared layer with ``cos_last >= threshold``; -1: none."""
    token_num_saturated_layers: np.ndarray
    """``[T]`` each token's number of compared layers with ``cos_last >= threshold``."""
    token_sequence: np.ndarray
    """``[T]`` index of each token's sequence."""

    @property
    def num_sequences(self) -> int:
        return int(self.length_tokens.shape[0])


@dataclass(frozen=True)
class GroupStats:
    """Summary of a group of sequences (all, easy or difficult)."""

    group: str
    num_sequences: int
    num_tokens: int
    mean_similarity: float
    """Mean over the group's sequences of their mean similarity."""
    mean_length_tokens: float
    mean_first_saturated_layer: float | None
    """Mean first saturated layer over the group's sequences that saturate (``None``: none do)."""
    share_never_saturated: float
    """Share of the group's sequences whose curve never reaches the threshold."""
    mean_num_saturated_layers: float
    token_mean_first_saturated_layer: float | None
    """The same, per token: mean over the group's tokens that saturate at some compared layer."""
    token_share_never_saturated: float
    curve: tuple[float, ...]
    """Mean over the group's sequences of their similarity curves, per compared layer."""
    increasing_sequences: tuple[float, ...]
    """Share of the group's sequences strictly increasing from each start layer."""
    increasing_tokens: tuple[float, ...]
    """Share of the group's tokens strictly increasing from each start layer."""


@dataclass(frozen=True)
class EasyDifficult:
    """Easy (highest mean similarity) and difficult (lowest) sequences."""

    k_requested: int
    k: int
    """``min(k_requested, num_sequences // 2)``."""
    easy: np.ndarray
    """Indices of the easy sequences, highest mean similarity first."""
    difficult: np.ndarray
    """Indices of the difficult sequences, lowest mean similarity first."""


@dataclass(frozen=True)
class PrefixStats:
    """Saturation by prefix length (a token's position: the tokens generated before it)."""

    prefix_length: np.ndarray
    """``[P]`` the prefix lengths present, ascending."""
    num_tokens: np.ndarray
    """``[P]`` tokens at each prefix length."""
    mean_similarity: np.ndarray
    """``[P]`` mean over those tokens of their mean similarity over compared layers."""
    share_never_saturated: np.ndarray
    """``[P]`` share of those tokens saturated at no compared layer."""
    spearman: float
    """Rank correlation of prefix length with a token's mean similarity (NaN when either is
    constant)."""
    k: int
    """Tokens in each of the easy / difficult prefix groups (``min(top_k, T // 2)``)."""
    mean_prefix_all: float
    mean_prefix_easy: float
    """Mean prefix length of the ``k`` tokens with the highest mean similarity."""
    mean_prefix_difficult: float
    """Mean prefix length of the ``k`` tokens with the lowest mean similarity."""


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse]


def prefix_stats(traces: TraceArrays, saturation: SequenceSaturation, similarity: np.ndarray,
                 top_k: int) -> PrefixStats:
    """:class:`PrefixStats` from the tokens' similarity rows ``[T, L-1]``."""
    position = np.asarray(traces.position, dtype=np.int64)
    token_mean = similarity.mean(axis=1)
    never = saturation.token_first_saturated_layer < 0
    lengths, inverse, counts = np.unique(position, return_inverse=True, return_counts=True)
    rank_x, rank_y = _ranks(position), _ranks(token_mean)
    with np.errstate(invalid="ignore", divide="ignore"):
        spearman = float(np.corrcoef(rank_x, rank_y)[0, 1]) if len(position) > 1 else math.nan
    split = split_easy_difficult(token_mean, top_k)
    return PrefixStats(
        prefix_length=lengths, num_tokens=counts,
        mean_similarity=np.bincount(inverse, token_mean) / counts,
        share_never_saturated=np.bincount(inverse, never.astype(np.float64)) / counts,
        spearman=spearman, k=split.k, mean_prefix_all=float(position.mean()),
        mean_prefix_easy=_share(position[split.easy].astype(np.float64)),
        mean_prefix_difficult=_share(position[split.difficult].astype(np.float64)))


@dataclass(frozen=True)
class TraceAnalysis:
    """Every analysis of one backbone's traces of one kind."""

    model: str
    kind: str
    task: str
    num_layers: int
    num_tokens: int
    settings: AnalysisSettings
    start_layers: tuple[int, ...]
    """Scaled start layers of the strictly-increasing indicators (see ``settings``)."""
    layers: LayerStats
    sequences: SequenceSaturation
    split: EasyDifficult
    groups: dict[str, GroupStats]
    """``all``, ``easy`` and ``difficult``."""
    model_label: str | None = None
    prefix: PrefixStats | None = None


# -- the statistics ---------------------------------------------------------------------------------
def stable_prediction_fraction(traces: TraceArrays) -> np.ndarray:
    """``[L]`` share of tokens whose top-1 at layer ``l`` equals the top-1 at every later
    layer (1 at the last layer)."""
    _check(traces)
    return stable_predictions(traces.top1_id).mean(axis=0)


def layer_stats(traces: TraceArrays, saturation_threshold: float = 0.9,
                normed: bool = False) -> LayerStats:
    """Per-layer monotonicity and confidence statistics (see :class:`LayerStats`);
    ``normed`` takes the similarities between final-normed states."""
    _check(traces)
    final_prob = traces.final_prob.astype(np.float64)
    cos_last = traces.cosines("last", normed)
    return LayerStats(
        stable_fraction=stable_predictions(traces.top1_id).mean(axis=0),
        final_prob_mean=final_prob.mean(axis=0),
        final_prob_std=final_prob.std(axis=0),
        nondecreasing_share=nondecreasing_from(traces.final_prob).mean(axis=0),
        top1_prob_mean=traces.top1_prob.astype(np.float64).mean(axis=0),
        similarity_mean=cos_last.astype(np.float64).mean(axis=0),
        saturated_share=(cos_last >= saturation_threshold).mean(axis=0))


def sequence_saturation(traces: TraceArrays, saturation_threshold: float = 0.9,
                        normed: bool = False) -> SequenceSaturation:
    """Per-token and per-sequence saturation over the compared layers ``0 .. L-2``
    (``normed``: between final-normed states)."""
    _check(traces)
    starts, ends = traces.example_bounds()
    lengths = ends - starts
    similarity = traces.cosines("last", normed)[:, :-1].astype(np.float64)  # [T, L-1]
    # a sum per sequence without a loop over tokens: reduceat over contiguous row runs
    curve = np.add.reduceat(similarity, starts, axis=0) / lengths[:, None]
    saturated_curve = curve >= saturation_threshold
    saturated_tokens = similarity >= saturation_threshold
    return SequenceSaturation(
        example_id=np.asarray(traces.example_id[starts], dtype=object),
        length_tokens=lengths.astype(np.int64),
        curve=curve,
        mean_similarity=curve.mean(axis=1),
        first_saturated_layer=first_true(saturated_curve),
        num_saturated_layers=saturated_curve.sum(axis=1).astype(np.int64),
        increasing=strictly_increasing_from(curve),
        token_increasing=strictly_increasing_from(similarity),
        token_first_saturated_layer=first_true(saturated_tokens),
        token_num_saturated_layers=saturated_tokens.sum(axis=1).astype(np.int64),
        token_sequence=np.repeat(np.arange(len(starts)), lengths))


def split_easy_difficult(mean_similarity: np.ndarray, top_k: int) -> EasyDifficult:
    """The ``K = min(top_k, S // 2)`` sequences with the highest mean similarity (easy) and
    the ``K`` with the lowest (difficult). One ranking decides both: among equal means an
    earlier row ranks higher (more easy), so the groups never overlap."""
    if top_k < 1:
        raise AnalysisError(f"top_k must be at least 1, got {top_k}")
    k = min(int(top_k), len(mean_similarity) // 2)
    # one ranking for both ends, so equal means can never put a sequence in both groups
    order = np.argsort(-np.asarray(mean_similarity), kind="stable")
    easy = order[:k]
    difficult = order[::-1][:k]
    return EasyDifficult(k_requested=int(top_k), k=k, easy=easy, difficult=difficult)


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def _share(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def group_stats(name: str, saturation: SequenceSaturation, chosen: np.ndarray,
                start_layers: Sequence[int]) -> GroupStats:
    """Summary of the sequences ``chosen`` (indices) and their tokens."""
    chosen = np.asarray(chosen, dtype=np.int64)
    tokens = np.isin(saturation.token_sequence, chosen)
    first = saturation.first_saturated_layer[chosen]
    token_first = saturation.token_first_saturated_layer[tokens]
    starts = list(start_layers)
    curve = saturation.curve[chosen]
    return GroupStats(
        group=name, num_sequences=int(chosen.size), num_tokens=int(tokens.sum()),
        mean_similarity=_share(saturation.mean_similarity[chosen]),
        mean_length_tokens=_share(saturation.length_tokens[chosen].astype(np.float64)),
        mean_first_saturated_layer=_mean_or_none(first[first >= 0].astype(np.float64)),
        share_never_saturated=_share(first < 0),
        mean_num_saturated_layers=_share(
            saturation.num_saturated_layers[chosen].astype(np.float64)),
        token_mean_first_saturated_layer=_mean_or_none(
            token_first[token_first >= 0].astype(np.float64)),
        token_share_never_saturated=_share(token_first < 0),
        curve=tuple(float(v) for v in (curve.mean(axis=0) if chosen.size
                                       else np.full(curve.shape[1], np.nan))),
        increasing_sequences=tuple(_share(saturation.increasing[chosen][:, s]) for s in starts),
        increasing_tokens=tuple(_share(saturation.token_increasing[tokens][:, s])
                                for s in starts))


def analyse_traces(traces: TraceArrays, settings: AnalysisSettings | None = None, *,
                   model: str = "model", kind: str = "generated", task: str = "task",
                   model_label: str | None = None) -> TraceAnalysis:
    """Every analysis of one backbone's traces of one kind."""
    settings = settings or AnalysisSettings()
    _check(traces, f"{task}/{model}/{kind} traces")
    start_layers = scaled_start_layers(settings.increasing_from, traces.num_layers)
    normed = settings.states == "normed"
    saturation = sequence_saturation(traces, settings.saturation_threshold, normed)
    split = split_easy_difficult(saturation.mean_similarity, settings.top_k)
    prefix = prefix_stats(traces, saturation,
                          traces.cosines("last", normed)[:, :-1].astype(np.float64),
                          settings.top_k)
    groups = {name: group_stats(name, saturation, chosen, start_layers) for name, chosen in (
        ("all", np.arange(saturation.num_sequences)), ("easy", split.easy),
        ("difficult", split.difficult))}
    return TraceAnalysis(model=model, kind=kind, task=task, num_layers=traces.num_layers,
                         num_tokens=traces.num_tokens, settings=settings,
                         start_layers=start_layers,
                         layers=layer_stats(traces, settings.saturation_threshold, normed),
                         sequences=saturation, split=split, groups=groups,
                         model_label=model_label, prefix=prefix)


# -- tables ------------------------------------------------------------------------------------------
TABLE_CAPTIONS = {
    "layers": "Per layer (0-based), over all tokens: share of stable top-1 predictions (equal "
              "to the top-1 of every later layer); mean and standard deviation of the "
              "probability given to the last layer's prediction; share of tokens whose "
              "probability is non-decreasing from that layer to the last; mean own top-1 "
              "probability; mean cosine similarity with the last layer's hidden state and "
              "share of tokens saturated (similarity at or above the threshold).",
    "groups": "Easy (the K sequences with the highest mean similarity to the last layer's "
              "hidden state), difficult (the K lowest) and all sequences: mean similarity, "
              "length, first saturated layer (sequences that saturate; -1 rows excluded), "
              "share never saturated, saturated layers, and the same per token.",
    "increasing": "Share of sequences (mean similarity curve) and of tokens (own similarity "
                  "row) whose similarity with the last layer rises strictly from the start "
                  "layer to the last compared layer; start layers are the study's 0, 4, 8 of "
                  "24 layers, scaled to the model's depth.",
    "curves": "Mean similarity with the last layer's hidden state per compared layer, over "
              "all, easy and difficult sequences (each sequence weighted equally).",
    "sequences": "Every sequence: length, mean similarity, first saturated layer (-1: never), "
                 "number of saturated layers, group, and the strictly-increasing indicators.",
    "prefix": "By prefix length (a token's position: tokens generated before it): tokens, "
              "their mean similarity with the last layer over compared layers, and the share "
              "never saturated (the study's 'longer sequences are easier').",
}
"""What each table measures (shown on the leaderboard and in the README)."""


def _none_if_nan(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def analysis_tables(analyses: Sequence[TraceAnalysis]) -> dict[str, Any]:
    """``pandas.DataFrame`` tables of several analyses (one row set per model and kind)."""
    import pandas as pd

    layers, groups, increasing, curves, sequences, prefixes = [], [], [], [], [], []
    for a in analyses:
        key = {"task": a.task, "model": a.model, "kind": a.kind}
        if a.prefix is not None:
            for i, length in enumerate(a.prefix.prefix_length):
                prefixes.append({**key, "prefix_length": int(length),
                                 "num_tokens": int(a.prefix.num_tokens[i]),
                                 "mean_similarity": a.prefix.mean_similarity[i],
                                 "share_never_saturated": a.prefix.share_never_saturated[i]})
        stats = a.layers
        for layer in range(a.num_layers):
            layers.append({**key, "layer": layer,
                           "stable_fraction": stats.stable_fraction[layer],
                           "final_prob_mean": stats.final_prob_mean[layer],
                           "final_prob_std": stats.final_prob_std[layer],
                           "nondecreasing_share": stats.nondecreasing_share[layer],
                           "top1_prob_mean": stats.top1_prob_mean[layer],
                           "similarity_mean": stats.similarity_mean[layer],
                           "saturated_share": stats.saturated_share[layer]})
        for name, g in a.groups.items():
            groups.append({**key, "group": name, "k_requested": a.split.k_requested,
                           "k": a.split.k, "num_sequences": g.num_sequences,
                           "num_tokens": g.num_tokens, "mean_similarity": g.mean_similarity,
                           "mean_length_tokens": g.mean_length_tokens,
                           "mean_first_saturated_layer": g.mean_first_saturated_layer,
                           "share_never_saturated": g.share_never_saturated,
                           "mean_num_saturated_layers": g.mean_num_saturated_layers,
                           "token_mean_first_saturated_layer":
                               g.token_mean_first_saturated_layer,
                           "token_share_never_saturated": g.token_share_never_saturated,
                           "saturation_threshold": a.settings.saturation_threshold})
            for i, start in enumerate(a.start_layers):
                increasing.append({**key, "group": name, "start_layer": start,
                                   "num_layers": a.num_layers,
                                   "share_sequences": g.increasing_sequences[i],
                                   "share_tokens": g.increasing_tokens[i]})
            for layer, value in enumerate(g.curve):
                curves.append({**key, "group": name, "layer": layer,
                               "mean_similarity": value})
        seq = a.sequences
        group_of = np.full(seq.num_sequences, "middle", dtype=object)
        group_of[a.split.easy] = "easy"
        group_of[a.split.difficult] = "difficult"
        columns = {"example_id": seq.example_id.astype(str),
                   "length_tokens": seq.length_tokens,
                   "mean_similarity": seq.mean_similarity,
                   "first_saturated_layer": seq.first_saturated_layer,
                   "num_saturated_layers": seq.num_saturated_layers, "group": group_of}
        for start in a.start_layers:
            columns[f"increasing_from_{start}"] = seq.increasing[:, start]
        frame = pd.DataFrame(columns)
        for i, (name, value) in enumerate(key.items()):
            frame.insert(i, name, value)
        sequences.append(frame)
    return {"layers": pd.DataFrame(layers), "groups": pd.DataFrame(groups),
            "increasing": pd.DataFrame(increasing), "curves": pd.DataFrame(curves),
            "sequences": pd.concat(sequences, ignore_index=True) if sequences
            else pd.DataFrame(), "prefix": pd.DataFrame(prefixes)}


def _records(frame) -> list[dict[str, Any]]:
    records = json.loads(frame.to_json(orient="records", double_precision=6))
    return [{k: _none_if_nan(v) for k, v in r.items()} for r in records]


def write_tables(tables: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Each table as ``<name>.csv`` and ``<name>.json`` (records), written atomically."""
    out_dir = Path(out_dir)
    written = []
    for name, frame in tables.items():
        csv_path = out_dir / f"{name}.csv"
        atomic_write_bytes(csv_path, frame.to_csv(index=False, float_format="%.6g")
                           .encode("utf-8"))
        json_path = out_dir / f"{name}.json"
        atomic_write_json(json_path, {"table": name, "caption": TABLE_CAPTIONS.get(name, ""),
                                      "columns": list(frame.columns),
                                      "rows": _records(frame)})
        written += [csv_path, json_path]
    return written


# -- figures -----------------------------------------------------------------------------------------
FIGURE_CAPTIONS = {
    "stable_predictions": "Share of tokens whose top-1 prediction at a layer equals the top-1 "
                          "at every later layer (1 at the last layer). A monotone model "
                          "reaches 1 early.",
    "confidence": "Mean probability each layer's exit head gives to the last layer's "
                  "prediction, with a band of one standard deviation over tokens.",
    "nondecreasing_confidence": "Share of tokens whose probability of the last layer's "
                                "prediction never decreases from that layer to the last "
                                "(the monotonicity assumption of confidence-based exits).",
    "saturation_easy_difficult": "Mean cosine similarity with the last layer's hidden state "
                                 "per layer, for easy sequences (highest mean similarity, "
                                 "solid) and difficult ones (lowest, dashed); the dotted line "
                                 "is the saturation threshold.",
    "strictly_increasing": "Share of sequences (solid: the sequence's mean similarity curve) "
                           "and of tokens (dotted) whose similarity with the last layer rises "
                           "strictly from the start layer on.",
}
"""What each figure shows (the leaderboard and the README reuse these)."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, kinds: Sequence[str], title: str):
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 3.9), sharey=True,
                             squeeze=False)
    fig.suptitle(title)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers are whole numbers
    return fig, {kind: ax for kind, ax in zip(kinds, axes[0])}


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for suffix in ("png", "svg"):
        path = out_dir / f"{name}.{suffix}"

        def write(fh, fmt=suffix):
            import matplotlib

            # no date and fixed element ids: a rerun on the same traces writes the same SVG
            with matplotlib.rc_context({"svg.hashsalt": "exitbench"}):
                fig.savefig(fh, format=fmt, dpi=130, bbox_inches="tight",
                            metadata={"Date": None} if fmt == "svg" else None)

        atomic_write(path, write)
        paths.append(path)
    return paths


def write_figures(analyses: Sequence[TraceAnalysis], out_dir: str | Path) -> list[Path]:
    """One figure per analysis (PNG and SVG), every backbone a line on the same axes, one
    panel per trace kind. Returns the files written."""
    if not analyses:
        raise AnalysisError("no analyses to plot")
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = list(dict.fromkeys(a.kind for a in analyses))
    models = list(dict.fromkeys(a.model for a in analyses))
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    # earlier backbones are drawn wider and with bigger markers, so a line that another
    # covers exactly (shares of 1.0, say) still shows around it
    widths = {m: 1.5 + 1.2 * (len(models) - 1 - i) for i, m in enumerate(models)}
    sizes = {m: 3.5 + 2.0 * (len(models) - 1 - i) for i, m in enumerate(models)}
    task = analyses[0].task
    written: list[Path] = []

    def per_layer(name: str, title: str, ylabel: str, field: str, band: str | None = None,
                  ylim: tuple[float, float] | None = (0.0, 1.02)):
        fig, axes = _panels(plt, kinds, title)
        for a in analyses:
            ax = axes[a.kind]
            x = np.arange(a.num_layers)
            y = getattr(a.layers, field)
            ax.plot(x, y, marker="o", ms=sizes[a.model], lw=widths[a.model],
                    color=colours[a.model], label=a.model)
            if band is not None:
                spread = getattr(a.layers, band)
                ax.fill_between(x, y - spread, y + spread, color=colours[a.model], alpha=0.12)
        for kind, ax in axes.items():
            ax.set_title(KIND_TITLES.get(kind, kind), fontsize=10)
            ax.set_xlabel("decoder layer (0-based)")
            ax.grid(alpha=0.3)
            if ylim:
                ax.set_ylim(*ylim)
        axes[kinds[0]].set_ylabel(ylabel)
        axes[kinds[-1]].legend(fontsize=8, loc="best")
        written.extend(_save(fig, out_dir, name))
        plt.close(fig)

    per_layer("stable_predictions", f"{task}: stable top-1 predictions per layer",
              "share of tokens stable", "stable_fraction")
    per_layer("confidence", f"{task}: probability of the last layer's prediction",
              "mean final_prob (±1 std)", "final_prob_mean", band="final_prob_std",
              ylim=(-0.05, 1.05))
    per_layer("nondecreasing_confidence", f"{task}: confidence non-decreasing from layer l",
              "share of tokens", "nondecreasing_share")

    fig, axes = _panels(plt, kinds, f"{task}: hidden-state saturation, easy vs difficult")
    for a in analyses:
        ax = axes[a.kind]
        x = np.arange(a.num_layers - 1)
        ax.plot(x, a.groups["easy"].curve, color=colours[a.model], marker="o",
                ms=sizes[a.model], lw=widths[a.model], label=f"{a.model} easy (K={a.split.k})")
        ax.plot(x, a.groups["difficult"].curve, color=colours[a.model], marker="s",
                ms=sizes[a.model], lw=widths[a.model], linestyle="--",
                label=f"{a.model} difficult")
    for kind, ax in axes.items():
        threshold = next(a.settings.saturation_threshold for a in analyses if a.kind == kind)
        ax.axhline(threshold, color="grey", linestyle=":", linewidth=1)
        ax.set_title(KIND_TITLES.get(kind, kind), fontsize=10)
        ax.set_xlabel("decoder layer (0-based; the last is left out)")
        ax.grid(alpha=0.3)
    axes[kinds[0]].set_ylabel("mean cosine with the last layer")
    axes[kinds[-1]].legend(fontsize=7, loc="best")
    written.extend(_save(fig, out_dir, "saturation_easy_difficult"))
    plt.close(fig)

    fig, axes = _panels(plt, kinds, f"{task}: similarity strictly increasing from layer s")
    for a in analyses:
        ax = axes[a.kind]
        g = a.groups["all"]
        ax.plot(a.start_layers, g.increasing_sequences, color=colours[a.model], marker="o",
                ms=sizes[a.model], lw=widths[a.model], label=f"{a.model} sequences")
        ax.plot(a.start_layers, g.increasing_tokens, color=colours[a.model], marker="^",
                ms=sizes[a.model], lw=widths[a.model], linestyle=":",
                label=f"{a.model} tokens")
    for kind, ax in axes.items():
        ax.set_title(KIND_TITLES.get(kind, kind), fontsize=10)
        given = next(a.settings.increasing_from for a in analyses if a.kind == kind)
        ax.set_xlabel(f"start layer s (scaled from {', '.join(map(str, given))} of "
                      f"{REFERENCE_LAYERS} layers)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[kinds[0]].set_ylabel("share strictly increasing")
    axes[kinds[-1]].legend(fontsize=7, loc="best")
    written.extend(_save(fig, out_dir, "strictly_increasing"))
    plt.close(fig)
    return written


# -- summary -----------------------------------------------------------------------------------------
def _rounded(values: Any, digits: int = 4) -> Any:
    if isinstance(values, (list, tuple, np.ndarray)):
        return [_rounded(v, digits) for v in values]
    if values is None:
        return None
    value = float(values)
    return round(value, digits) if math.isfinite(value) else None


def summarise(a: TraceAnalysis) -> dict[str, Any]:
    """The key numbers of one analysis, as plain JSON-able values."""
    groups = {}
    for name, g in a.groups.items():
        data = asdict(g)
        data.pop("group")
        groups[name] = {k: v if isinstance(v, int) else _rounded(v) for k, v in data.items()}
    return {"task": a.task, "model": a.model, "model_label": a.model_label, "kind": a.kind,
            "num_layers": a.num_layers, "num_tokens": a.num_tokens,
            "num_sequences": a.sequences.num_sequences,
            "settings": {"saturation_threshold": a.settings.saturation_threshold,
                         "top_k": a.settings.top_k,
                         "increasing_from": list(a.settings.increasing_from),
                         "states": a.settings.states},
            "prefix": None if a.prefix is None else {
                "spearman": _rounded(a.prefix.spearman), "k": a.prefix.k,
                "mean_prefix_all": _rounded(a.prefix.mean_prefix_all),
                "mean_prefix_easy": _rounded(a.prefix.mean_prefix_easy),
                "mean_prefix_difficult": _rounded(a.prefix.mean_prefix_difficult)},
            "start_layers": list(a.start_layers), "k": a.split.k,
            "stable_fraction": _rounded(a.layers.stable_fraction),
            "final_prob_mean": _rounded(a.layers.final_prob_mean),
            "final_prob_std": _rounded(a.layers.final_prob_std),
            "nondecreasing_share": _rounded(a.layers.nondecreasing_share),
            "similarity_mean": _rounded(a.layers.similarity_mean),
            "groups": groups}


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def summary_markdown(analyses: Sequence[TraceAnalysis], header: str = "") -> str:
    """A short README of the key numbers per backbone and kind."""
    lines = [f"# Analyses: {analyses[0].task}" if analyses else "# Analyses", ""]
    if header:
        lines += [header, ""]
    lines += ["Layers are 0-based. Definitions: docs/analysis.md. Figures: "
              + ", ".join(f"`{n}.png`/`.svg`" for n in FIGURE_CAPTIONS) + ".", ""]
    for a in analyses:
        label = f" ({a.model_label})" if a.model_label else ""
        g = a.groups
        lines += [f"## {a.model}, {a.kind}{label}", "",
                  f"{a.sequences.num_sequences} sequences, {a.num_tokens} tokens, "
                  f"{a.num_layers} layers; saturation threshold "
                  f"{a.settings.saturation_threshold:g} on {a.settings.states} states; K = "
                  f"{a.split.k} (asked {a.split.k_requested}).", "",
                  "| layer | " + " | ".join(str(i) for i in range(a.num_layers)) + " |",
                  "| --- |" + " ---: |" * a.num_layers,
                  "| stable top-1 | " + " | ".join(_fmt(v) for v in a.layers.stable_fraction)
                  + " |",
                  "| mean final_prob | " + " | ".join(_fmt(v) for v in
                                                     a.layers.final_prob_mean) + " |",
                  "| std final_prob | " + " | ".join(_fmt(v) for v in
                                                    a.layers.final_prob_std) + " |",
                  "| non-decreasing from l | " + " | ".join(
                      _fmt(v) for v in a.layers.nondecreasing_share) + " |",
                  "| mean cos_last | " + " | ".join(_fmt(v) for v in
                                                   a.layers.similarity_mean) + " |", "",
                  "| group | sequences | mean similarity | mean length | first saturated "
                  "layer | never saturated | "
                  + " | ".join(f"increasing from {s} (seq / tok)" for s in a.start_layers)
                  + " |",
                  "| --- |" + " ---: |" * (5 + len(a.start_layers))]
        for name in ("all", "easy", "difficult"):
            s = g[name]
            lines.append(f"| {name} | {s.num_sequences} | {_fmt(s.mean_similarity, 3)} | "
                         f"{_fmt(s.mean_length_tokens, 1)} | "
                         f"{_fmt(s.mean_first_saturated_layer)} | "
                         f"{_fmt(s.share_never_saturated)} | "
                         + " | ".join(f"{_fmt(q)} / {_fmt(t)}" for q, t in
                                      zip(s.increasing_sequences, s.increasing_tokens))
                         + " |")
        if a.prefix is not None:
            lines += ["", f"Prefix length (tokens before a token): Spearman correlation with "
                          f"the token's mean similarity {_fmt(a.prefix.spearman, 3)}; mean "
                          f"prefix length of the {a.prefix.k} easiest tokens "
                          f"{_fmt(a.prefix.mean_prefix_easy, 1)}, of the {a.prefix.k} most "
                          f"difficult {_fmt(a.prefix.mean_prefix_difficult, 1)}, of all "
                          f"{_fmt(a.prefix.mean_prefix_all, 1)}."]
        lines.append("")
    return "\n".join(lines)


def write_analysis(analyses: Sequence[TraceAnalysis], out_dir: str | Path, *,
                   provenance: dict[str, Any] | None = None, header: str = "") -> dict[str, Any]:
    """Tables, figures, ``summary.json`` and ``README.md`` of one task's analyses into
    ``out_dir``; returns the summary. ``summary.json`` lists every figure and table with its
    caption (the leaderboard's analyses page reads it)."""
    if not analyses:
        raise AnalysisError("no analyses to write")
    out_dir = Path(out_dir)
    write_tables(analysis_tables(analyses), out_dir)
    write_figures(analyses, out_dir)
    summary = {
        "schema": 1, "task": analyses[0].task,
        "note": header,
        "figures": [{"name": n, "png": f"{n}.png", "svg": f"{n}.svg", "caption": c}
                    for n, c in FIGURE_CAPTIONS.items()],
        "tables": [{"name": n, "csv": f"{n}.csv", "json": f"{n}.json", "caption": c}
                   for n, c in TABLE_CAPTIONS.items()],
        "models": [{"name": name, "label": label} for name, label in
                   dict((a.model, a.model_label) for a in analyses).items()],
        "analyses": [summarise(a) for a in analyses],
        "provenance": provenance or {},
    }
    atomic_write_json(out_dir / "summary.json", summary)
    atomic_write_bytes(out_dir / "README.md",
                       summary_markdown(analyses, header).encode("utf-8"))
    return summary


__all__ = ["AnalysisError", "AnalysisSettings", "LayerStats", "SequenceSaturation",
           "GroupStats", "EasyDifficult", "TraceAnalysis", "stable_predictions",
           "stable_prediction_fraction", "nondecreasing_from", "strictly_increasing_from",
           "first_true", "scaled_start_layers", "layer_stats", "sequence_saturation",
           "split_easy_difficult", "group_stats", "analyse_traces", "analysis_tables",
           "write_tables", "write_figures", "summarise", "summary_markdown",
           "write_analysis", "TABLE_CAPTIONS", "FIGURE_CAPTIONS"]


# -- a whole config ----------------------------------------------------------------------------------
@dataclass
class AnalysisRun:
    """What :func:`analyse_config` did."""

    output_dir: Path
    """``<output_dir>/analysis``."""
    task_dirs: dict[str, Path]
    """Task name -> folder of its figures, tables, ``summary.json`` and ``README.md``."""
    summaries: dict[str, dict[str, Any]]
    """Task name -> the summary written to its folder."""
    records: list[Any]
    """:class:`suite.record.RecordSummary` of every (task, model, kind) recorded or checked."""
    backbones: Any = None
    """The :class:`suite.runner.StageReport` of the backbone stage."""
    site_index: Path | None = None


def settings_from_config(config) -> AnalysisSettings:
    """:class:`AnalysisSettings` of a :class:`suite.config.SuiteConfig`'s ``analysis``."""
    section = config.analysis
    return AnalysisSettings(saturation_threshold=section.saturation_threshold,
                            top_k=section.top_k,
                            increasing_from=tuple(section.increasing_from),
                            states=section.states)


def analyse_config(config, *, models: Sequence[Any] | None = None,
                   tasks: Sequence[Any] | None = None, progress: bool = True,
                   build_leaderboard: bool | None = None) -> AnalysisRun:
    """``exitbench analyze``: train the backbones the config asks for (the runner's
    :func:`~suite.runner.ensure_backbones`), record the missing generated and forced
    traces (:func:`~suite.record.record_task`, resumable), analyse them and write
    ``<output_dir>/analysis/<task>/``. When the run has results and the config builds a
    leaderboard (or ``build_leaderboard``), the site is rebuilt so it shows the analyses."""
    from suite import __version__
    from suite.errors import ConfigError
    from suite.record import git_commit, record_task, trace_dir_for
    from suite.runner import ensure_backbones, rows_exist
    from suite.traces import TraceStore, sha256_file

    models = list(config.models if models is None else models)
    tasks = list(config.tasks if tasks is None else tasks)
    if not models:
        raise ConfigError("the config lists no models to analyse; add e.g. "
                          "`models: [{name: tiny, path: runs/models/tiny}]`")
    if not tasks:
        raise ConfigError("no tasks to analyse")
    settings = settings_from_config(config)
    kinds = list(dict.fromkeys(config.analysis.kinds))
    if not kinds:
        raise ConfigError("analysis.kinds is empty; give generated, forced or both")
    output = Path(config.output_dir)
    backbones = ensure_backbones(config.model_copy(update={"models": models}),
                                 progress=progress)
    run = AnalysisRun(output_dir=output / "analysis", task_dirs={}, summaries={}, records=[],
                      backbones=backbones)
    for task in tasks:
        analyses, provenance = [], []
        for model in models:
            for kind in kinds:
                directory = trace_dir_for(output, task.name, model.name, kind)
                run.records.append(record_task(
                    task, model, kind, directory, data_dir=config.data_dir,
                    device=config.device, dtype=config.dtype, seed=config.seed,
                    batch_size=config.record_batch_size, shard_size=config.shard_size,
                    progress=progress))
                store = TraceStore(directory)
                manifest = store.read_manifest()
                analyses.append(analyse_traces(store.load(), settings, model=model.name,
                                               kind=kind, task=task.name,
                                               model_label=model.label))
                provenance.append({"model": model.name, "kind": kind, "split": manifest.split,
                                   "trace_dir": directory.as_posix(),
                                   "manifest_sha256": sha256_file(store.manifest_path),
                                   "model_hash": manifest.model_hash,
                                   "tokenizer_hash": manifest.tokenizer_hash,
                                   "generation": manifest.generation})
        header = (f"Task {task.name}, split {task.split}; trace kinds: {', '.join(kinds)}; "
                  f"{len(models)} backbone(s), each labelled with what it is.")
        folder = run.output_dir / file_stem(task.name)
        run.summaries[task.name] = write_analysis(
            analyses, folder, header=header,
            provenance={"suite_version": __version__, "git_commit": git_commit(),
                        "config": config.name, "split": task.split, "traces": provenance})
        run.task_dirs[task.name] = folder
    wants_site = config.leaderboard if build_leaderboard is None else build_leaderboard
    if wants_site and rows_exist(output):
        from leaderboard import build_site

        run.site_index = build_site(output, output / "site")
    return run
