"""The replay stage: every measure at every threshold over stored traces, scored with the
task metric and priced on every hardware profile and batch size -> result rows.

This is the suite's core promise: record once, then price each (measure, threshold,
profile, batch size) point in seconds. Work per (task, model):

1. load the generated traces (verified against their manifest) and the references;
2. detokenise and score the full-depth outputs;
3. per measure: fit it on the fit split's traces when it learns, compute its scores,
   the exit layer of every token at every threshold (:func:`suite.replay.exit_layers`),
   the replayed outputs, their quality (cached by output hash), and their price on every
   profile and batch size (:func:`suite.cost.price_replay`).

Results are labelled ``mode="replay"``: they follow the recorded full-depth trajectory
(online early-exit decoding, which feeds exited tokens forward, is measured separately).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from suite.config import MeasureConfig, ModelConfig
from suite.cost import example_index_from_ids, operation_costs, price_replay
from suite.errors import ExitbenchError
from suite.measures import Measure, ModelDims, code_hash, get_measure
from suite.metrics import get_metric
from suite.profiles import get_profile
from suite.record import encode_texts
from suite.replay import (
    ScoreCache,
    exit_statistics,
    outputs_hash,
    replay,
    replayed_tokens,
    sequences_by_example,
)
from suite.results import ResultRow
from suite.tasks import TaskSpec, load_examples
from suite.traces import TraceArrays, TraceStore, sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What replay needs to know about a backbone, read from its config and tokenizer."""

    dims: ModelDims
    gated_ffn: bool
    num_encoder_layers: int
    eos_token_id: int


def model_info(model_path: str) -> ModelInfo:
    from transformers import AutoConfig

    from suite.models import resolve_model_folder

    config = AutoConfig.from_pretrained(resolve_model_folder(model_path))
    num_layers = int(getattr(config, "num_decoder_layers", None) or config.num_layers)
    dims = ModelDims(num_layers=num_layers, d_model=int(config.d_model), d_ff=int(config.d_ff),
                     num_heads=int(config.num_heads), d_kv=int(config.d_kv),
                     vocab_size=int(config.vocab_size))
    return ModelInfo(dims=dims, gated_ffn=bool(getattr(config, "is_gated_act", False)),
                     num_encoder_layers=int(config.num_layers),
                     eos_token_id=int(config.eos_token_id))


@dataclass
class Detokenizer:
    """Token ids -> text, memoised per sequence: most thresholds share most outputs."""

    tokenizer: object
    memo: dict[tuple[int, ...], str] = field(default_factory=dict)

    def __call__(self, sequences: Sequence[Sequence[int]]) -> list[str]:
        keys = [tuple(s) for s in sequences]
        todo = list({k for k in keys if k not in self.memo})
        if todo:
            texts = self.tokenizer.batch_decode([list(k) for k in todo], skip_special_tokens=True)
            self.memo.update(zip(todo, (t.strip() for t in texts)))
        return [self.memo[k] for k in keys]


@dataclass(frozen=True)
class SweepInputs:
    """One (task, model) to sweep."""

    task: TaskSpec
    split: str
    model: ModelConfig
    trace_dir: Path
    data_dir: str | None = None
    limit: int | None = None
    fit_trace_dir: Path | None = None
    """Generated traces of the fit split, for learned measures."""
    dtype: str = "float32"


@dataclass
class SweepReport:
    rows: list[ResultRow]
    seconds: float
    outputs_scored: int
    outputs_from_cache: int
    per_measure_seconds: dict[str, float]


def instantiate(config: MeasureConfig) -> Measure:
    cls = get_measure(config.name)
    try:
        return cls(**config.options)
    except TypeError as exc:
        raise ExitbenchError(f"measure {config.name!r}: options {config.options} are not "
                             f"accepted ({exc})") from exc


class HiddenStateLoader:
    """Traces of a trace directory with every layer's hidden state, re-materialised once per
    directory (:func:`suite.record.load_hidden_states`) and then reused."""

    def __init__(self, model_path: str, data_dir: str | None):
        self.model_path = model_path
        self.data_dir = data_dir
        self._loaded: dict[Path, TraceArrays] = {}

    def __call__(self, trace_dir: Path) -> TraceArrays:
        if trace_dir not in self._loaded:
            from suite.record import load_hidden_states

            states = load_hidden_states(trace_dir, model_path=self.model_path,
                                        data_dir=self.data_dir)
            if states.mismatch_rate > 0:
                logger.warning("%s: hidden-state pass reproduces %.3f%% of tokens differently",
                               trace_dir, 100 * states.mismatch_rate)
            self._loaded[trace_dir] = states.traces
        return self._loaded[trace_dir]


def fitted_measure(config: MeasureConfig, inputs: SweepInputs, hidden: HiddenStateLoader, *,
                   fit_cache_dir: Path | None = None, seed: int = 0) -> Measure:
    """The configured measure, fitted on the fit split's traces when it learns."""
    measure = instantiate(config)
    if measure.needs_fit:
        if inputs.fit_trace_dir is None:
            raise ExitbenchError(f"measure {config.display_name!r} must be fitted, but task "
                                 f"{inputs.task.name!r} has no fit_split in the config")
        measure.fit(hidden(inputs.fit_trace_dir), cache_dir=fit_cache_dir, seed=seed)
    return measure


@dataclass
class OpenedTraces:
    """One (task, model)'s generated traces with what replay prices and scores them by
    (:func:`open_traces`); shared by the measures' sweep and the decoding methods'
    (:mod:`suite.speculative_sweep`)."""

    traces: TraceArrays
    traces_hash: str
    info: ModelInfo
    example_ids: list[str]
    source_len: np.ndarray
    """Encoder tokens per example, as the record stage truncated them (EOS included)."""
    example_index: np.ndarray
    """``[T]`` each token's example, ``0..E-1`` in trace order."""
    primary: str
    full: dict
    """The full-depth outputs' quality (``scores``, ``primary``, ``signature``)."""
    costs: dict[str, object]
    """Profile name -> its operation costs for this model and dtype."""
    profiles: list
    cache: ScoreCache
    quality_of: Callable[[np.ndarray], dict]
    """``[T]`` tokens in trace order -> their quality (detokenised, cut at EOS, cached)."""
    hits_before: int = 0
    misses_before: int = 0


def open_traces(inputs: SweepInputs, profiles: Sequence[str], *,
                score_cache: ScoreCache | None = None) -> OpenedTraces:
    """Load and verify one (task, model)'s generated traces, their references and source
    lengths; score the full-depth outputs; build every profile's operation costs."""
    from suite.models import load_tokenizer

    store = TraceStore(inputs.trace_dir)
    manifest = store.read_manifest()
    if manifest.kind != "generated":
        raise ExitbenchError(f"{inputs.trace_dir}: replay needs generated traces, not "
                             f"{manifest.kind!r} ones")
    traces = store.load()
    traces_hash = sha256_file(store.manifest_path)
    info = model_info(inputs.model.path)
    if info.dims.num_layers != traces.num_layers:
        raise ExitbenchError(f"{inputs.trace_dir}: traces have {traces.num_layers} layers, model "
                             f"{inputs.model.path} has {info.dims.num_layers}")
    tokenizer = load_tokenizer(inputs.model.path)
    detokenize = Detokenizer(tokenizer)
    cache = score_cache or ScoreCache()
    hits_before, misses_before = cache.hits, cache.misses

    examples = {e.id: e for e in load_examples(inputs.task, inputs.split, inputs.data_dir,
                                                inputs.limit)}
    example_ids = traces.example_ids()
    missing = [i for i in example_ids if i not in examples]
    if missing:
        raise ExitbenchError(f"{inputs.trace_dir}: traced example {missing[0]!r} is not in "
                             f"{inputs.task.name}/{inputs.split}; were the traces recorded "
                             f"from another split?")
    references = [examples[i].references for i in example_ids]
    # the encoder lengths the record stage used (same truncation rule, EOS included)
    source_len = np.array([len(ids) for ids in encode_texts(
        tokenizer, [examples[i].source for i in example_ids],
        inputs.task.limits.max_source_tokens, info.eos_token_id)])
    metric = get_metric(inputs.task.metric)
    metric_key = f"{inputs.task.name}|{inputs.task.metric}|{len(example_ids)}"

    def quality_of(token_rows: np.ndarray) -> dict:
        texts = detokenize(sequences_by_example(traces, token_rows, info.eos_token_id))
        key = metric_key + "|" + outputs_hash(texts)

        def compute() -> dict:
            result = metric(texts, references)
            return {"scores": result.scores, "primary": result.primary,
                    "signature": result.signature}

        return cache.get_or_compute(key, compute)

    full = quality_of(traces.final_id)
    loaded_profiles = [get_profile(name) for name in profiles]
    costs = {p.name: operation_costs(p, info.dims, inputs.dtype, info.gated_ffn,
                                     info.num_encoder_layers) for p in loaded_profiles}
    return OpenedTraces(traces=traces, traces_hash=traces_hash, info=info,
                        example_ids=example_ids, source_len=source_len,
                        example_index=example_index_from_ids(traces.example_id),
                        primary=full["primary"], full=full, costs=costs,
                        profiles=loaded_profiles, cache=cache, quality_of=quality_of,
                        hits_before=hits_before, misses_before=misses_before)


def sweep(inputs: SweepInputs, measures: Sequence[MeasureConfig], profiles: Sequence[str],
          batch_sizes: Sequence[int], *, score_cache: ScoreCache | None = None,
          fit_cache_dir: Path | None = None, seed: int = 0) -> SweepReport:
    """Replay, score and price every measure on one (task, model)'s traces."""
    started = time.perf_counter()
    opened = open_traces(inputs, profiles, score_cache=score_cache)
    traces, traces_hash, info, cache = (opened.traces, opened.traces_hash, opened.info,
                                        opened.cache)
    hits_before, misses_before = opened.hits_before, opened.misses_before
    example_ids, source_len, quality_of = opened.example_ids, opened.source_len, \
        opened.quality_of
    full, primary, example_index = opened.full, opened.primary, opened.example_index
    loaded_profiles, costs = opened.profiles, opened.costs

    hidden = HiddenStateLoader(inputs.model.path, inputs.data_dir)
    rows: list[ResultRow] = []
    per_measure: dict[str, float] = {}
    for config in measures:
        measure_started = time.perf_counter()
        measure = fitted_measure(config, inputs, hidden, fit_cache_dir=fit_cache_dir, seed=seed)
        name = config.display_name
        scored = hidden(inputs.trace_dir) if "hidden" in measure.reads else traces
        scores = measure.scores(scored)
        thresholds = np.asarray(config.thresholds if config.thresholds is not None
                                else measure.thresholds_for(traces.num_layers), dtype=np.float64)
        replayed = replay(scores, thresholds, config.min_layer)
        exits = replayed.exits
        tokens = replayed_tokens(traces, exits)
        stats = exit_statistics(traces, replayed)
        qualities = [quality_of(tokens[k]) for k in range(len(thresholds))]
        check_cost = measure.check_cost(info.dims)
        checked = measure.checked_layers(traces.num_layers)
        measure_hash = code_hash(type(measure))
        options_json = json.dumps(config.options, sort_keys=True)
        for profile in loaded_profiles:
            for batch_size in batch_sizes:
                priced = price_replay(costs[profile.name], info.dims, exits, example_index,
                                      traces.position, source_len, batch_size, check_cost,
                                      checked, config.min_layer, measure.propagation,
                                      measure_name=config.name)
                full_tokens_per_s = traces.num_tokens / priced.full_depth_seconds
                for k, threshold in enumerate(thresholds):
                    rows.append(ResultRow(
                        task=inputs.task.name, split=inputs.split, model=inputs.model.name,
                        model_label=inputs.model.label or inputs.model.name, measure=name,
                        measure_options=options_json, deployable=measure.deployable,
                        threshold=float(threshold), min_layer=config.min_layer,
                        profile=profile.name, profile_kind=profile.kind,
                        batch_size=int(batch_size), mode="replay", metric=primary,
                        quality=float(qualities[k]["scores"][primary]),
                        quality_full_depth=float(full["scores"][primary]),
                        scores={k2: float(v) for k2, v in qualities[k]["scores"].items()},
                        mean_layers_used=float(stats.mean_layers_used[k]),
                        num_layers=traces.num_layers,
                        token_agreement=float(stats.token_agreement[k]),
                        exit_histogram=[float(x) for x in stats.exit_histogram[k]],
                        tokens_per_s=float(priced.tokens_per_s[k]),
                        full_depth_tokens_per_s=float(full_tokens_per_s),
                        speedup=float(priced.speedup[k]), num_examples=len(example_ids),
                        num_tokens=traces.num_tokens, traces_hash=traces_hash,
                        measure_code_hash=measure_hash,
                        extra={"model_dims": info.dims.__dict__,
                               "signature": qualities[k].get("signature")}))
        per_measure[name] = time.perf_counter() - measure_started
    return SweepReport(rows=rows, seconds=time.perf_counter() - started,
                       outputs_scored=cache.misses - misses_before,
                       outputs_from_cache=cache.hits - hits_before,
                       per_measure_seconds=per_measure)

