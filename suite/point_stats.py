"""What the sweep adds to each point beyond quality and tokens/s (issue 17): its samples
(:mod:`suite.samples`), the bootstrap interval of its quality (:mod:`suite.uncertainty`) and
its per-request latency percentiles (:mod:`suite.latency`).

One :class:`PointStatistics` per (task, model) sweep: the examples' shared resamples, the
per-example statistics cache (each distinct prediction of an example scored once) and the
intervals cached by the hash of the whole output list in the sweep's :class:`ScoreCache`
(thresholds that replay to the same outputs share one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from suite.latency import meets_limits
from suite.replay import ScoreCache, outputs_hash, sequences_by_example
from suite.results import finite_or_none
from suite.samples import FULL_DEPTH_MODE, sample_records
from suite.traces import TraceArrays
from suite.uncertainty import BootstrapSettings, ExampleStatsCache, Resampler, quality_interval


class PointStatistics:
    def __init__(self, traces: TraceArrays, example_ids: Sequence[str],
                 references: Sequence[Sequence[str]], task, model: str,
                 detokenize: Callable[[Sequence[Sequence[int]]], list[str]],
                 eos_token_id: int | Sequence[int],
                 cache: ScoreCache, settings: BootstrapSettings):
        self.traces = traces
        self.example_ids = list(example_ids)
        self.references = [list(r) for r in references]
        self.task = task
        self.model = model
        self.detokenize = detokenize
        self.eos_token_id = eos_token_id
        self.cache = cache
        self.settings = settings
        self.metric = task.metric
        self.resampler = Resampler(len(self.example_ids), settings)
        self.example_stats = ExampleStatsCache(self.metric)
        self.starts, self.ends = traces.example_bounds()
        self.samples: dict[str, dict[str, list]] = {}

    def _point(self, token_row: np.ndarray, exit_row: np.ndarray) -> tuple[list[str], dict,
                                                                            dict[str, list]]:
        sequences = sequences_by_example(self.traces, token_row, self.eos_token_id)
        texts = self.detokenize(sequences)
        stats = self.example_stats.stats(self.example_ids, texts, self.references)
        key = (f"{self.task.name}|{self.metric}|{len(self.example_ids)}|{outputs_hash(texts)}"
               f"|bootstrap|{self.settings.resamples}|{self.settings.seed}"
               f"|{self.settings.confidence}")
        interval = self.cache.get_or_compute(
            key, lambda: quality_interval(self.metric, stats, self.resampler).to_dict())
        columns = {"texts": texts, "stats": stats,
                   "output_tokens": [len(s) for s in sequences],
                   "exit_layers": [exit_row[a:b] for a, b in zip(self.starts, self.ends)]}
        return texts, interval, columns

    def _record(self, key: str, measure: str, mode: str, threshold, min_layer: int,
                columns: dict[str, Any]) -> None:
        records = sample_records(
            task=self.task.name, model=self.model, measure=measure, mode=mode,
            threshold=threshold, min_layer=min_layer, example_ids=self.example_ids,
            predictions=columns["texts"], references=self.references,
            output_tokens=columns["output_tokens"], exit_layers=columns["exit_layers"],
            metric=self.metric, stats=columns["stats"])
        part = self.samples.setdefault(key, {name: [] for name in records})
        for name, values in records.items():
            part[name].extend(values)

    def add_full_depth(self) -> None:
        last = np.full(self.traces.num_tokens, self.traces.num_layers - 1, np.int64)
        _, _, columns = self._point(self.traces.final_id, last)
        self._record("", "", FULL_DEPTH_MODE, None, 0, columns)

    def add_measure(self, measure: str, min_layer: int, thresholds: np.ndarray,
                    tokens: np.ndarray, exits: np.ndarray) -> list[dict[str, Any]]:
        """Samples of every threshold of one measure; the interval fields of its rows."""
        fields = []
        for k, threshold in enumerate(thresholds):
            _, interval, columns = self._point(tokens[k], exits[k])
            self._record(measure, measure, "replay", float(threshold), min_layer, columns)
            fields.append(interval_fields(interval, self.settings))
        return fields

    @staticmethod
    def latency(priced, example_index: np.ndarray, profile) -> list[dict[str, Any]]:
        """TTFT / TPOT percentiles of every threshold of one priced replay, and whether they
        meet the profile's latency limits."""
        from suite.cost import request_latency

        out = []
        for row in request_latency(priced.breakdown, example_index).percentiles():
            fields: dict[str, Any] = {name: finite_or_none(value) for name, value in row.items()}
            fields["meets_latency_limits"] = meets_limits(row, getattr(profile, "latency_limits",
                                                                       None))
            out.append(fields)
        return out


def interval_fields(interval: dict[str, Any], settings: BootstrapSettings) -> dict[str, Any]:
    """The :class:`suite.results.ResultRow` fields of a quality interval (``Interval.to_dict``)."""
    return {"quality_stderr": finite_or_none(interval["stderr"]),
            "quality_ci_low": finite_or_none(interval["low"]),
            "quality_ci_high": finite_or_none(interval["high"]),
            "confidence_level": float(interval["confidence"]),
            "bootstrap_resamples": int(interval["resamples"]),
            "bootstrap_seed": int(settings.seed),
            "interval_method": str(interval["method"])}


def quality_interval_fields(metric: str, example_ids: Sequence[str], texts: Sequence[str],
                            references: Sequence[Sequence[str]],
                            settings: BootstrapSettings) -> dict[str, Any]:
    """Row fields of the interval of one output list's quality (online rows)."""
    stats = ExampleStatsCache(metric).stats(list(example_ids), list(texts),
                                            [list(r) for r in references])
    interval = quality_interval(metric, stats, Resampler(len(example_ids), settings))
    return interval_fields(interval.to_dict(), settings)
