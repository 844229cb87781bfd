"""Per-request latency: time to first token (TTFT) and time per output token (TPOT).

Serving users judge a system per request, at high percentiles, not by mean tokens/s (MLPerf
Inference's LLM scenarios bound TTFT and TPOT at the 99th percentile). Here a *request* is one
example of the task; examples are decoded ``batch_size`` at a time, in order, as the cost
model and online decoding both do. Per request, with ``e_i`` the time its ``i``-th output
token is emitted, measured from the start of its batch (the encoder or prompt prefill
included):

- ``TTFT = e_0``: the prefill plus the first decoding step;
- ``TPOT = (e_{n-1} - e_0) / (n - 1)``: the mean time between its later tokens (MLPerf's
  definition); undefined (NaN, left out of the percentiles) for one-token outputs.

Queueing behind earlier batches is not counted: every batch starts when its requests arrive
(the issue's definition; an offline run's queueing depends on the arrival process, which the
suite does not model). Percentiles are numpy's (linear interpolation) over the requests.

Two sources give emission times: the cost model's schedule (:func:`suite.cost.request_latency`,
from each step's priced seconds) and online decoding (a clock read after every step,
:class:`suite.online.OnlineRun`), both turned into :class:`RequestLatency` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 90, 99)
"""The percentiles every result row carries (``ttft_p50_seconds`` ... ``tpot_p99_seconds``)."""


@dataclass(frozen=True)
class RequestLatency:
    """TTFT and TPOT of every request, per threshold (``[K, E]``, seconds; NaN where
    undefined)."""

    ttft_seconds: np.ndarray
    tpot_seconds: np.ndarray

    def percentiles(self) -> list[dict[str, float]]:
        """Per threshold: ``{"ttft_p50_seconds": ..., "tpot_p99_seconds": ...}``."""
        out = []
        for ttft, tpot in zip(np.atleast_2d(self.ttft_seconds), np.atleast_2d(self.tpot_seconds)):
            row = {}
            for name, values in (("ttft", ttft), ("tpot", tpot)):
                finite = values[np.isfinite(values)]
                for q in PERCENTILES:
                    row[f"{name}_p{q}_seconds"] = (float(np.percentile(finite, q))
                                                   if finite.size else float("nan"))
            out.append(row)
        return out


def from_emissions(example_index: np.ndarray, position: np.ndarray,
                   emitted_at_seconds: np.ndarray, num_examples: int) -> RequestLatency:
    """Per-request TTFT and TPOT from each token's emission time (``[T]`` or ``[K, T]``,
    seconds since its batch started); ``example_index`` and ``position`` place the tokens."""
    example_index = np.asarray(example_index, np.int64)
    position = np.asarray(position, np.int64)
    emitted = np.atleast_2d(np.asarray(emitted_at_seconds, np.float64))
    lengths = np.bincount(example_index, minlength=num_examples)
    first = np.full(num_examples, -1, np.int64)
    last = np.full(num_examples, -1, np.int64)
    first[example_index[position == 0]] = np.flatnonzero(position == 0)
    is_last = position == lengths[example_index] - 1
    last[example_index[is_last]] = np.flatnonzero(is_last)
    has = first >= 0
    ttft = np.full((emitted.shape[0], num_examples), np.nan)
    tpot = np.full((emitted.shape[0], num_examples), np.nan)
    ttft[:, has] = emitted[:, first[has]]
    many = lengths >= 2
    tpot[:, many] = (emitted[:, last[many]] - emitted[:, first[many]]) / (lengths[many] - 1)
    return RequestLatency(ttft_seconds=ttft, tpot_seconds=tpot)


def meets_limits(percentiles: dict[str, float], limits) -> bool | None:
    """Whether a point's latency percentiles are within a profile's ``latency_limits``
    (``None`` when the profile declares none)."""
    if limits is None:
        return None
    q = int(limits.percentile)
    checks = []
    for name, bound in (("ttft", limits.ttft_seconds), ("tpot", limits.tpot_seconds)):
        if bound is None:
            continue
        value = percentiles.get(f"{name}_p{q}_seconds", float("nan"))
        checks.append(bool(np.isfinite(value) and value <= bound))
    return all(checks) if checks else None
