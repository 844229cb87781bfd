"""Threshold schedules: the threshold a token's score must reach may depend on the token's
position (CALM's decay) or on what decoding has seen so far (FREE's adaptive threshold).

The exit rule stays the engine's: a token at position ``t`` exits at the first layer
``l >= min_layer`` whose score reaches ``threshold_t(lambda)``, else at the last layer; a
token at a position below ``min_position`` never exits early (the study's
``min_exit_seq_len``). ``lambda`` is the swept (or calibrated) base threshold; result rows
keep it in ``threshold`` and the schedule in ``extra["schedule"]``.

Schedules (:func:`build_schedule` from a :class:`suite.config.ScheduleConfig`):

- ``constant``: ``threshold_t(lambda) = lambda`` (the engine's rule before schedules).
- ``calm_decay``: CALM's decaying threshold, exactly as t5x writes it
  (``t5x/contrib/calm/models.py``, ``_compute_logits_from_slice_early_exit``,
  ``correct_by_pos``)::

      threshold_t(lambda) = lambda * exp(-tau * t / N) / 10 + 9 * lambda / 10

  with ``tau`` (t5x's ``position_temp``, 4 by default and in every run of the study) and
  ``N`` (t5x's ``max_decode_length``: the length of the batch's target features, i.e. the
  task's generation budget; here ``max_length``, by default the task's ``max_new_tokens``).
  ``t`` is the token's 0-based position plus ``position_offset`` (0: t5x's decoding-loop
  index; 1: FREE's and the study's ``pos_time``). The threshold falls from ``lambda`` at
  ``t = 0`` towards ``0.9 lambda``; there is nothing to clip for ``lambda`` in ``[0, 1]``.
- ``free_adaptive``: FREE's threshold from a beta mixture refitted while decoding
  (:mod:`suite.adaptive`); it depends on earlier tokens' exits, so replay simulates it
  sequentially over the evaluation's tokens in decoding order.

Replay of a position schedule, exactly and vectorised (:func:`schedule_scores`): the
threshold at each position is non-decreasing in ``lambda`` (checked), so for the sorted
sweep ``lambda_0 <= ... <= lambda_{K-1}`` a score ``s`` at position ``t`` reaches
``threshold_t(lambda_k)`` exactly when ``k`` is below ``c = #{j: threshold_t(lambda_j) <=
s}``. Replacing ``s`` by ``lambda_{c-1}`` (``-inf`` when ``c = 0``) therefore gives a
score that reaches the constant threshold ``lambda_k`` exactly when ``s`` reaches
``threshold_t(lambda_k)``: float for float, ties included (``>=`` on both sides), for the
swept values. ``c`` is one ``searchsorted`` per distinct position (a loop over at most
``max_new_tokens`` positions, vectorised over tokens and layers). The engine's constant
replay (:func:`suite.replay.replay`) then computes every exit, so the exit rule, the
statistics and the cost model see nothing new. Online decoding compares
``s >= threshold_t(lambda)`` computed by the same :meth:`PositionSchedule.thresholds`
(elementwise float64 arithmetic, so a one-threshold call gives the same value as the sweep's
vector), which is why replay and online agree exactly.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from suite.errors import ExitbenchError
from suite.replay import ExitStatistics, exit_statistics, replay

if TYPE_CHECKING:
    from suite.config import ScheduleConfig
    from suite.measures import Measure
    from suite.traces import TraceArrays


class PositionSchedule(abc.ABC):
    """A threshold that depends on the token's position only."""

    kind: str

    @abc.abstractmethod
    def thresholds(self, base: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """``[P, K]`` float64 thresholds for base thresholds ``[K]`` at positions ``[P]``
        (0-based token positions); non-decreasing in the base threshold."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-serialisable description (``kind`` and parameters), kept in result rows."""


@dataclass(frozen=True)
class ConstantSchedule(PositionSchedule):
    kind = "constant"

    def thresholds(self, base: np.ndarray, positions: np.ndarray) -> np.ndarray:
        base = np.asarray(base, dtype=np.float64)
        return np.broadcast_to(base, (len(positions), len(base))).copy()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


@dataclass(frozen=True)
class CalmDecaySchedule(PositionSchedule):
    """CALM's ``lambda * exp(-tau * t / N) / 10 + 9 * lambda / 10`` (see the module doc)."""

    tau: float = 4.0
    max_length: int = 128
    """``N``: t5x's ``max_decode_length``."""
    position_offset: int = 0
    """Added to the 0-based position to give ``t`` (1: FREE's ``pos_time``)."""
    kind = "calm_decay"

    def __post_init__(self) -> None:
        if not np.isfinite(self.tau) or self.tau < 0:
            raise ExitbenchError(f"schedule calm_decay: tau={self.tau!r} must be a finite "
                                 f"number >= 0 (CALM and the study use 4)")
        if self.max_length < 1:
            raise ExitbenchError(f"schedule calm_decay: max_length={self.max_length!r} must be "
                                 f">= 1 (t5x's max_decode_length, the generation budget)")

    def thresholds(self, base: np.ndarray, positions: np.ndarray) -> np.ndarray:
        base = np.asarray(base, dtype=np.float64)[None, :]
        t = (np.asarray(positions, dtype=np.float64) + self.position_offset)[:, None]
        # t5x's expression, term for term (correct_by_pos in models.py)
        return base * np.exp(-self.tau * t / self.max_length) / 10 + 9 * base / 10

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "tau": float(self.tau), "max_length": int(self.max_length),
                "position_offset": int(self.position_offset)}


def build_schedule(config: ScheduleConfig | None, max_new_tokens: int):
    """The schedule of a measure config (``None``: constant). ``max_new_tokens`` is the
    task's generation budget, CALM's ``N`` unless ``max_length`` is set."""
    if config is None or config.kind == "constant":
        return ConstantSchedule()
    if config.kind == "calm_decay":
        return CalmDecaySchedule(tau=float(config.tau),
                                 max_length=int(config.max_length or max_new_tokens),
                                 position_offset=int(config.position_offset))
    from suite.adaptive import AdaptiveSettings

    return AdaptiveSettings(max_refits=config.max_refits)


def schedule_extra(config, schedule) -> dict[str, Any]:
    """What a result row's ``extra`` records of a measure config's schedule and
    ``min_position`` (nothing for the constant rule from position 0)."""
    if config.schedule is None and not config.min_position:
        return {}
    return {"schedule": schedule.describe(), "min_position": int(config.min_position)}


# -- replay -------------------------------------------------------------------------------------
def schedule_scores(scores: np.ndarray, positions: np.ndarray, thresholds: Sequence[float],
                    schedule: PositionSchedule, min_position: int = 0) -> np.ndarray:
    """Scores for the engine's constant replay at ``thresholds`` that reproduce the
    schedule's exits exactly (see the module docstring): ``[T, L]`` float64 whose values are
    thresholds of the sweep or ``-inf``."""
    scores = np.asarray(scores)
    positions = np.asarray(positions)
    if scores.ndim != 2 or positions.shape != (scores.shape[0],):
        raise ValueError(f"scores {scores.shape} and positions {positions.shape} do not match")
    base = np.sort(np.asarray(thresholds, dtype=np.float64).reshape(-1), kind="stable")
    out = np.full(scores.shape, -np.inf)
    if base.size == 0 or scores.shape[0] == 0:
        return out
    distinct, inverse = np.unique(positions, return_inverse=True)
    table = schedule.thresholds(base, distinct)  # [P, K]
    if np.isnan(table).any() or (np.diff(table, axis=1) < 0).any():
        raise ExitbenchError(f"schedule {schedule.describe()}: thresholds are not "
                             f"non-decreasing in the base threshold; replay cannot use it")
    by_position = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[by_position], np.arange(len(distinct) + 1))
    for index, position in enumerate(distinct):  # a loop over positions, not tokens
        if position < min_position:
            continue  # no exit before min_position: the rows stay -inf
        rows = by_position[bounds[index]:bounds[index + 1]]
        block = scores[rows].astype(np.float64)
        reached = np.searchsorted(table[index], block, side="right")
        values = np.where(reached > 0, base[np.maximum(reached - 1, 0)], -np.inf)
        values[np.isnan(block)] = -np.inf  # NaN never exits (searchsorted sorts it last)
        out[rows] = values
    return out


@dataclass(frozen=True)
class ScheduledReplay:
    """Exit layers and their statistics for every base threshold of one measure."""

    exits: np.ndarray
    """``[K, T]`` exit layer per base threshold (caller's order) and token."""
    statistics: ExitStatistics
    thresholds_used: np.ndarray | None = None
    """``[K, T]`` the threshold each token met (adaptive schedules only)."""


def replay_scheduled(traces: TraceArrays, scores: np.ndarray, thresholds: Sequence[float],
                     schedule=None, min_layer: int = 0, min_position: int = 0,
                     measure: Measure | None = None) -> ScheduledReplay:
    """Replay ``scores`` at every base threshold under ``schedule`` (``None``: constant) and
    ``min_position``; the adaptive schedule also needs the ``measure`` (its shallow layer)."""
    from suite.adaptive import AdaptiveSettings, replay_adaptive

    thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if isinstance(schedule, AdaptiveSettings):
        return replay_adaptive(traces, scores, thresholds, schedule, measure, min_layer,
                               min_position)
    schedule = schedule or ConstantSchedule()
    if isinstance(schedule, ConstantSchedule) and min_position <= 0:
        transformed = scores
    else:
        transformed = schedule_scores(scores, traces.position, thresholds, schedule,
                                      min_position)
    result = replay(transformed, thresholds, min_layer)
    return ScheduledReplay(exits=result.exits, statistics=exit_statistics(traces, result))
