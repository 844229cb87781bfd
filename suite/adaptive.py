"""FREE's adaptive threshold (Bae et al. 2023): a beta mixture of the shallow exit's
confidences, refitted while decoding, from which the threshold is read.

What FREE's deploying code does (``models/deploying_t5.py``, ``util/bmm.py``), and so this
module:

- **Pairs.** When a token goes deep (its shallow confidence does not exceed the threshold)
  while earlier tokens of the sequence are pending (they exited at the shallow layer since
  the last deep token), the parallel deep pass predicts all of them; each pending token and
  the deep token itself gives a pair ``(x, y)``: ``x`` its shallow confidence, ``y`` whether
  its shallow prediction equals the deep one (``stack_conf_all``, ``stack_ident_all``). A
  deep token with nothing pending adds no pair; tokens still pending when the sequence
  ends add none.
- **Refits.** Before each sequence (each ``generate`` call: FREE's deployment runs batch 1),
  when pairs exist and fewer than ``max_refits`` (FREE's ``bmm_update_max_iter``, 300)
  refits have been made, the mixture is fitted on all pairs so far and the threshold is
  read from it; until the first refit the configured threshold holds
  (``shallow2deep_conf_threshold``; here the swept base threshold).
- **Fit** (``BetaMixture1D.fit`` with labels, ``max_iters = 1``): confidences clipped to
  ``[1e-4, 1 - 1e-4]``; responsibilities ``r = 0.2 * onehot(y)`` floored at ``1e-4`` and
  normalised per pair (FREE computes the weighted likelihoods first and then overwrites
  them, so only the labels count), i.e. weight ``w_own = 0.2 / 0.2001`` for the pair's own
  class and ``w_other = 1e-4 / 0.2001`` for the other; each component's ``(alpha, beta)``
  by the weighted method of moments (``fit_beta_weighted``): ``alpha = m (m (1 - m) / v -
  1)``, ``beta = alpha (1 - m) / m``. Component 0 is "inconsistent", 1 "consistent".
- **Threshold** (``predict_proba(0.3, 0.9)``): on the grid ``x = linspace(0.3, 0.9, 10)``,
  with ``i`` the component of larger mean, count the grid points where
  ``pdf_i(x) / (pdf_i(x) + pdf_other(x)) > zeta`` (0.4); the threshold is
  ``x[min(max(0, 10 - count), 9)]``. A fit with no finite likelihoods (zero variance, a
  single pair) counts no point and gives the top of the grid, 0.9, as FREE's does.

Only the sufficient statistics of the pairs are kept (count, sum, sum of squares per
class): the weighted moments follow from them, so a refit is O(1) whatever the number of
pairs. The variance is taken as ``E_w[x^2] - m^2``, which differs from FREE's two-pass sum by
rounding only.

Replay (:func:`replay_adaptive`) simulates this over the evaluation's tokens in decoding
order (examples in trace order, tokens by position): one threshold per example, shared by
its tokens, every base threshold of the sweep at once (a Python loop over examples, each
step vectorised over thresholds and tokens). The exit rule is the engine's: a token exits at
the shallow layer when its score there reaches the example's threshold (FREE exits when it
is strictly above; they differ on exact ties only); the simulation applies it, since its
state depends on every exit, and the statistics of its two exit layers follow directly. Online decoding
(:class:`AdaptiveThreshold`) keeps the same state across the batches it decodes and refits
at the start of each batch, which is FREE's rule at batch size 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from suite.errors import ExitbenchError

if TYPE_CHECKING:
    from suite.measures import Measure
    from suite.schedules import ScheduledReplay
    from suite.traces import TraceArrays

LABEL_WEIGHT = 0.2
"""FREE's ``1 - lam_r`` (``lam_r = 0.8``): the label's share of a responsibility."""
FLOOR = 1e-4
"""FREE's ``eps_nan``: responsibilities are floored here."""
CLIP = 1e-4
"""Confidences are clipped to ``[CLIP, 1 - CLIP]`` before fitting (EM on betas needs (0, 1))."""


@dataclass(frozen=True)
class AdaptiveSettings:
    """FREE's adaptive threshold estimator (``BetaMixture1D`` defaults and the deploying
    code's refit limit)."""

    max_refits: int = 300
    """``bmm_update_max_iter``: refits after which the threshold stays fixed."""
    zeta: float = 0.4
    """Posterior ratio a grid point must exceed to count as "consistent"."""
    grid_low: float = 0.3
    grid_high: float = 0.9
    grid_points: int = 10
    """``lookup_resolution``: the grid ``predict_proba(0.3, 0.9)`` reads the threshold from."""
    kind = "free_adaptive"

    def __post_init__(self) -> None:
        if self.max_refits < 0:
            raise ExitbenchError(f"schedule free_adaptive: max_refits={self.max_refits} must "
                                 f"be >= 0 (FREE uses 300)")

    @property
    def grid(self) -> np.ndarray:
        return np.linspace(self.grid_low, self.grid_high, self.grid_points)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "max_refits": self.max_refits, "zeta": self.zeta,
                "grid": [self.grid_low, self.grid_high, self.grid_points]}


@dataclass
class PairStatistics:
    """Sufficient statistics of the collected pairs, per class (``[..., 2]``: inconsistent,
    consistent), for any leading shape (one per base threshold in replay)."""

    count: np.ndarray
    total: np.ndarray
    total_sq: np.ndarray

    @staticmethod
    def empty(shape: tuple[int, ...] = ()) -> PairStatistics:
        return PairStatistics(*(np.zeros((*shape, 2)) for _ in range(3)))

    def add(self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add pairs ``x`` (confidences) and ``y`` (bool) over the last axis, where ``mask``."""
        x = np.clip(np.asarray(x, dtype=np.float64), CLIP, 1 - CLIP)
        y = np.asarray(y, dtype=bool)
        mask = np.ones(np.broadcast_shapes(x.shape, y.shape), bool) if mask is None else mask
        for label in (0, 1):
            chosen = mask & (y == bool(label))
            self.count[..., label] += chosen.sum(axis=-1)
            self.total[..., label] += np.where(chosen, x, 0.0).sum(axis=-1)
            self.total_sq[..., label] += np.where(chosen, x * x, 0.0).sum(axis=-1)

    @property
    def num_pairs(self) -> np.ndarray:
        return self.count.sum(axis=-1)


def fit_beta_mixture(stats: PairStatistics) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas, betas)`` ``[..., 2]`` of FREE's supervised fit (see the module docstring)."""
    norm = LABEL_WEIGHT + FLOOR + 1e-12
    own, other = LABEL_WEIGHT / norm, FLOOR / norm
    alphas, betas = np.empty_like(stats.count), np.empty_like(stats.count)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for component in (0, 1):
            rest = 1 - component
            weight = own * stats.count[..., component] + other * stats.count[..., rest]
            mean = (own * stats.total[..., component] + other * stats.total[..., rest]) / weight
            second = (own * stats.total_sq[..., component]
                      + other * stats.total_sq[..., rest]) / weight
            variance = second - mean * mean
            variance = np.where(variance > 0, variance, 0.0)  # rounding below zero: degenerate
            alpha = mean * ((mean * (1 - mean)) / variance - 1)
            alphas[..., component] = alpha
            betas[..., component] = alpha * (1 - mean) / mean
    return alphas, betas


def mixture_threshold(alphas: np.ndarray, betas: np.ndarray,
                      settings: AdaptiveSettings | None = None) -> np.ndarray:
    """FREE's ``predict_proba(0.3, 0.9)`` for fits ``[..., 2]``: the threshold ``[...]``."""
    from scipy import stats as scipy_stats

    settings = settings or AdaptiveSettings()
    grid = settings.grid
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        means = alphas / (alphas + betas)
        best = np.argmax(means, axis=-1)  # like FREE's mean.argmax(): the first NaN wins
        a_best = np.take_along_axis(alphas, best[..., None], -1)
        b_best = np.take_along_axis(betas, best[..., None], -1)
        a_rest = np.take_along_axis(alphas, 1 - best[..., None], -1)
        b_rest = np.take_along_axis(betas, 1 - best[..., None], -1)
        like_best = scipy_stats.beta.pdf(grid, a_best, b_best)  # [..., G]
        like_rest = scipy_stats.beta.pdf(grid, a_rest, b_rest)
        consistent = like_best / (like_best + like_rest) > settings.zeta  # NaN counts False
    index = np.clip(settings.grid_points - consistent.sum(axis=-1), 0, settings.grid_points - 1)
    return grid[index]


@dataclass
class AdaptiveThreshold:
    """The estimator's state while decoding online: pairs so far, refits made, threshold."""

    threshold: float
    """Current threshold; the configured one until the first refit."""
    settings: AdaptiveSettings = field(default_factory=AdaptiveSettings)
    stats: PairStatistics = field(default_factory=PairStatistics.empty)
    refits: int = 0

    def start_sequence(self) -> float:
        """FREE's refit before a ``generate`` call; returns the threshold to use."""
        if self.stats.num_pairs > 0 and self.refits < self.settings.max_refits:
            alphas, betas = fit_beta_mixture(self.stats)
            self.threshold = float(mixture_threshold(alphas, betas, self.settings))
            self.refits += 1
        return self.threshold

    def add_pairs(self, confidence: np.ndarray, consistent: np.ndarray) -> None:
        self.stats.add(np.asarray(confidence).reshape(-1), np.asarray(consistent).reshape(-1))


def replay_adaptive(traces: TraceArrays, scores: np.ndarray, thresholds: np.ndarray,
                    settings: AdaptiveSettings, measure: Measure | None, min_layer: int = 0,
                    min_position: int = 0) -> ScheduledReplay:
    """Sequential simulation of FREE's adaptive threshold for every base threshold (the
    initial threshold before the first refit); see the module docstring."""
    from suite.replay import ExitStatistics
    from suite.schedules import ScheduledReplay

    if measure is None or not hasattr(measure, "exit_layer"):
        raise ExitbenchError("schedule free_adaptive needs a measure with one shallow exit "
                             "layer (FREE's free_shallow_deep): it learns when to skip the "
                             "deep layers from the shallow layer's confidence")
    num_tokens, num_layers = traces.num_tokens, traces.num_layers
    shallow = int(measure.exit_layer(num_layers))
    confidence = np.asarray(scores, dtype=np.float64)[:, shallow]
    consistent = traces.top1_id[:, shallow] == traces.final_id
    allowed = (traces.position >= min_position) & (shallow >= min_layer)
    num_thresholds = len(thresholds)
    current = np.asarray(thresholds, dtype=np.float64).copy()
    refits = np.zeros(num_thresholds, dtype=np.int64)
    stats = PairStatistics.empty((num_thresholds,))
    used = np.empty((num_thresholds, num_tokens))
    exits_shallow = np.zeros((num_thresholds, num_tokens), dtype=bool)
    starts, ends = traces.example_bounds()
    for start, end in zip(starts, ends):  # per example (decoding order), not per token
        refit = (stats.num_pairs > 0) & (refits < settings.max_refits)
        if refit.any():
            alphas, betas = fit_beta_mixture(stats)
            current = np.where(refit, mixture_threshold(alphas, betas, settings), current)
            refits += refit
        x, y = confidence[start:end], consistent[start:end]
        with np.errstate(invalid="ignore"):
            exit_now = allowed[start:end][None, :] & (x[None, :] >= current[:, None])  # [K, n]
        deep = ~exit_now
        # segment of each token: the deep tokens before it; a segment closed by a deep token
        # with at least one pending token before it gives pairs for all its tokens
        segment = np.cumsum(deep, axis=1) - deep
        closed = segment < deep.sum(axis=1, keepdims=True)
        width = end - start + 1
        flat = (segment + np.arange(num_thresholds)[:, None] * width).ravel()
        size = np.bincount(flat, minlength=num_thresholds * width)[flat].reshape(segment.shape)
        stats.add(np.broadcast_to(x, exit_now.shape), np.broadcast_to(y, exit_now.shape),
                  closed & (size > 1))
        used[:, start:end] = current[:, None]
        exits_shallow[:, start:end] = exit_now
    # The simulation has to decide each exit to update its state (pairs depend on them), so
    # the exits come from it; a single-exit measure exits at `shallow` or at the last layer,
    # so the statistics need two counts per threshold, not a replay per threshold (which was
    # 75% of the time: 23 s of 31 s for 20 thresholds over 1M tokens, profiled).
    last = num_layers - 1
    exits = np.where(exits_shallow, shallow, last).astype(np.int8 if num_layers <= 127
                                                         else np.int16)
    share = exits_shallow.mean(axis=1) if num_tokens else np.zeros(num_thresholds)
    histogram = np.zeros((num_thresholds, num_layers))
    histogram[:, shallow] += share
    histogram[:, last] += 1.0 - share
    agrees_shallow = (traces.top1_id[:, shallow] == traces.final_id).astype(np.float64)
    agrees_last = (traces.top1_id[:, last] == traces.final_id).astype(np.float64)
    agreement = (exits_shallow @ agrees_shallow + (~exits_shallow) @ agrees_last) \
        / max(num_tokens, 1)
    statistics = ExitStatistics(mean_layers_used=histogram @ (np.arange(num_layers) + 1.0),
                                exit_histogram=histogram, token_agreement=agreement)
    return ScheduledReplay(exits=exits, statistics=statistics, thresholds_used=used)
