"""Pareto fronts of (tokens/s, quality) points and the per-measure summary scores.

Both axes are maximised. Summary scores of one measure's points against the
full-depth model and the static-layer baseline:

- ``best_speedup_within``: the highest speedup among points whose quality is at
  most ``max_relative_loss`` (1% by default) below full depth's, relative.
- ``area_over_baseline``: the area between the measure's front and the
  static-layer baseline's front, both read as step functions
  ``q(s) = max{quality_i : speedup_i >= s}`` (the best quality reachable at a
  speedup of at least ``s``), integrated over speedups from 1 to the smaller of
  the two curves' largest speedups. Units: quality points x speedup. Positive
  means the measure buys more quality than simply truncating the decoder.
"""

from __future__ import annotations

import numpy as np


def pareto_mask(speed: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Boolean mask of the non-dominated points (higher is better on both axes).

    A point is dominated when another is at least as good on both axes and better on
    one; of exact duplicates, one is kept."""
    speed = np.asarray(speed, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    if speed.shape != quality.shape or speed.ndim != 1:
        raise ValueError("speed and quality must be 1-D arrays of the same length")
    if speed.size == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((-quality, -speed))  # fastest first, best quality first among ties
    ordered_quality = quality[order]
    best_before = np.r_[-np.inf, np.maximum.accumulate(ordered_quality)[:-1]]
    mask = np.zeros(speed.size, dtype=bool)
    mask[order] = ordered_quality > best_before
    return mask


def best_quality_at_speedup(speedup: np.ndarray, quality: np.ndarray,
                            at: np.ndarray) -> np.ndarray:
    """``q(s) = max{quality_i : speedup_i >= s}`` for each ``s`` in ``at`` (-inf if none).
    ``quality`` may carry a trailing axis of replicates (``[K, B]`` -> ``[len(at), B]``)."""
    speedup = np.asarray(speedup, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    order = np.argsort(speedup)
    sorted_speedup = speedup[order]
    suffix_best = np.maximum.accumulate(quality[order][::-1], axis=0)[::-1]
    index = np.searchsorted(sorted_speedup, np.asarray(at, dtype=np.float64), side="left")
    padded = np.concatenate([suffix_best, np.full((1,) + quality.shape[1:], -np.inf)])
    return padded[index]


def best_speedup_within(speedup: np.ndarray, quality: np.ndarray, full_depth_quality: float,
                        max_relative_loss: float = 0.01) -> float:
    """Highest speedup whose quality is within ``max_relative_loss`` of full depth (NaN if none)."""
    speedup = np.asarray(speedup, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    floor = full_depth_quality - max_relative_loss * abs(full_depth_quality)
    ok = quality >= floor - 1e-12
    return float(speedup[ok].max()) if ok.any() else float("nan")


def area_over_baseline(speedup: np.ndarray, quality: np.ndarray, baseline_speedup: np.ndarray,
                       baseline_quality: np.ndarray):
    """Area between the measure's and the baseline's step fronts over speedups [1, s_max].
    With a trailing replicate axis on both qualities (``[K, B]``, ``[K0, B]``) it returns the
    ``[B]`` areas of the replicates (speedups are fixed)."""
    speedup = np.asarray(speedup, dtype=np.float64)
    baseline_speedup = np.asarray(baseline_speedup, dtype=np.float64)
    replicates = np.asarray(quality).shape[1:]
    if speedup.size == 0 or baseline_speedup.size == 0:
        return np.full(replicates, np.nan) if replicates else float("nan")
    upper = min(speedup.max(), baseline_speedup.max())
    if upper <= 1.0:
        return np.zeros(replicates) if replicates else 0.0
    points = np.unique(np.clip(np.r_[1.0, upper, speedup, baseline_speedup], 1.0, upper))
    # on each interval (a, b] both step functions are constant, equal to their value at b
    right = points[1:]
    widths = np.diff(points).reshape((-1,) + (1,) * len(replicates))
    difference = best_quality_at_speedup(speedup, quality, right) - \
        best_quality_at_speedup(baseline_speedup, baseline_quality, right)
    area = np.sum(widths * difference, axis=0)
    return area if replicates else float(area)


def best_speedup_replicates(speedup: np.ndarray, quality: np.ndarray,
                            full_depth_quality: np.ndarray,
                            max_relative_loss: float = 0.01) -> np.ndarray:
    """:func:`best_speedup_within` of every replicate: ``quality [K, B]`` and
    ``full_depth_quality [B]`` resampled together -> ``[B]`` (NaN where no point is within)."""
    speedup = np.asarray(speedup, dtype=np.float64)
    floor = full_depth_quality - max_relative_loss * np.abs(full_depth_quality)
    ok = np.asarray(quality, np.float64) >= floor[None, :] - 1e-12
    best = np.where(ok, speedup[:, None], -np.inf).max(axis=0, initial=-np.inf)
    return np.where(np.isfinite(best), best, np.nan)
