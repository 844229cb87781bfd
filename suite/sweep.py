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
from suite.errors import ExitbenchError, MeasureFailedError
from suite.measures import Measure, ModelDims, code_hash, get_measure
from suite.metrics import get_metric
from suite.profiles import get_profile
from suite.prompts import encode_sources, prompt_format
from suite.replay import (
    ScoreCache,
    outputs_hash,
    replayed_tokens,
    sequences_by_example,
)
from suite.results import ResultRow
from suite.schedules import build_schedule, replay_scheduled, schedule_extra
from suite.tasks import TaskSpec, load_examples
from suite.traces import TraceArrays, TraceStore, sha256_file
from suite.uncertainty import BootstrapSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What replay needs to know about a backbone, read from its config and tokenizer."""

    dims: ModelDims
    gated_ffn: bool
    num_encoder_layers: int
    eos_token_id: int
    decoder_only: bool = False
    eos_token_ids: tuple[int, ...] = ()
    """Every EOS id the checkpoint names (decoder-only models may have several)."""

    def costs(self, profile, dtype: str):
        """The operation costs of ``profile`` for this backbone."""
        return operation_costs(profile, self.dims, dtype, self.gated_ffn,
                               self.num_encoder_layers, self.decoder_only)


def model_info(model_path: str) -> ModelInfo:
    from transformers import AutoConfig

    from suite.models import resolve_model_folder

    config = AutoConfig.from_pretrained(resolve_model_folder(model_path))
    if getattr(config, "model_type", None) not in ("t5", "mt5"):
        from suite.backbones.decoder_only import decoder_only_info

        return decoder_only_info(config, model_path)
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
    samples: dict[str, dict[str, list]] = field(default_factory=dict)
    """Measure -> its per-point samples (:func:`suite.samples.sample_records` columns);
    ``""`` -> the full-depth output's."""


def instantiate(config: MeasureConfig, model_path: str | None = None) -> Measure:
    """The configured measure; with ``model_path``, adapted to that backbone
    (:meth:`suite.measures.Measure.adapt_to` with what its model folder records)."""
    cls = get_measure(config.name)
    try:
        measure = cls(**config.options)
    except TypeError as exc:
        raise ExitbenchError(f"measure {config.name!r}: options {config.options} are not "
                             f"accepted ({exc})") from exc
    if model_path is not None:
        from suite.training import read_backbone

        measure.adapt_to(read_backbone(model_path))
    return measure


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
    measure = instantiate(config, inputs.model.path)
    if measure.needs_fit:
        if inputs.fit_trace_dir is None:
            raise ExitbenchError(f"measure {config.display_name!r} must be fitted, but task "
                                 f"{inputs.task.name!r} has no fit_split in the config")
        measure.fit(hidden(inputs.fit_trace_dir), cache_dir=fit_cache_dir, seed=seed)
    return measure


ESTIMATED_CHECK_NOTE = ("the measured profile has no timings for this measure's check: it is "
                        "priced from the measure's declared FLOPs and bytes at rates derived "
                        "from the profile's own measured operations (docs/cost_model.md)")
"""``extra['cost_estimated']`` of rows whose check cost is an estimate."""

@dataclass
class OpenedTraces:
    """One (task, model)'s generated traces with what replay prices and scores them by
    (:func:`open_traces`); shared by the measures' sweep and the decoding methods'
    (:mod:`suite.speculative.sweep`)."""

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
    references: list = field(default_factory=list)
    """Each traced example's references, in ``example_ids`` order."""
    detokenize: Callable | None = None
    format: object = None
    """The task's prompt format for this model (:func:`suite.prompts.prompt_format`)."""
    stop_token_ids: tuple[int, ...] = ()
    """The ids that end an output (EOS, and a decoder-only task's stop strings)."""
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
    # the encoder lengths (prompt lengths) the record stage used: same truncation rule
    prompt = prompt_format(tokenizer, inputs.task, decoder_only=info.decoder_only,
                           eos_token_ids=info.eos_token_ids or (info.eos_token_id,),
                           chat_template=inputs.model.chat_template)
    stop_token_ids = prompt.stop_token_ids
    source_len = np.array([len(ids) for ids in encode_sources(
        tokenizer, [examples[i] for i in example_ids], prompt,
        inputs.task.limits.max_source_tokens)])
    metric = get_metric(inputs.task.metric)
    metric_key = f"{inputs.task.name}|{inputs.task.metric}|{len(example_ids)}"

    def quality_of(token_rows: np.ndarray) -> dict:
        texts = detokenize(sequences_by_example(traces, token_rows, stop_token_ids))
        key = metric_key + "|" + outputs_hash(texts)

        def compute() -> dict:
            result = metric(texts, references)
            return {"scores": result.scores, "primary": result.primary,
                    "signature": result.signature}

        return cache.get_or_compute(key, compute)

    full = quality_of(traces.final_id)
    loaded_profiles = [get_profile(name) for name in profiles]
    costs = {p.name: info.costs(p, inputs.dtype) for p in loaded_profiles}
    return OpenedTraces(traces=traces, traces_hash=traces_hash, info=info,
                        example_ids=example_ids, source_len=source_len,
                        example_index=example_index_from_ids(traces.example_id),
                        primary=full["primary"], full=full, costs=costs,
                        profiles=loaded_profiles, cache=cache, quality_of=quality_of,
                        references=references, detokenize=detokenize,
                        format=prompt, stop_token_ids=stop_token_ids,
                        hits_before=hits_before, misses_before=misses_before)


def describe_exception(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else '(no message)'}"


def check_real_scores(scores, traces: TraceArrays, name: str) -> np.ndarray:
    """``scores`` of a measure on real traces, checked as validation checks synthetic ones: a
    float ``[tokens, layers]`` numpy array without NaN or ``+inf``. Raises
    :class:`MeasureFailedError` naming the measure and the first bad value."""
    expected = (traces.num_tokens, traces.num_layers)
    if not isinstance(scores, np.ndarray):
        raise MeasureFailedError(f"measure {name!r}: scores() returned "
                                 f"{type(scores).__name__} on the real traces, not a numpy "
                                 f"array of shape [tokens, layers] = {list(expected)}")
    if scores.shape != expected:
        raise MeasureFailedError(f"measure {name!r}: scores() returned shape "
                                 f"{list(scores.shape)} on the real traces; expected [tokens, "
                                 f"layers] = {list(expected)}")
    if not np.issubdtype(scores.dtype, np.floating):
        raise MeasureFailedError(f"measure {name!r}: scores() returned dtype {scores.dtype} on "
                                 f"the real traces; return floats")
    bad = np.isnan(scores) | (scores == np.inf)
    if bad.any():
        token, layer = (int(v) for v in np.argwhere(bad)[0])
        raise MeasureFailedError(
            f"measure {name!r}: {int(bad.sum())} of {scores.size} scores on the real traces are "
            f"NaN or +inf (first: example {traces.example_id[token]!r}, position "
            f"{int(traces.position[token])}, layer {layer}); return finite scores, or -inf for "
            f"'never exit here'")
    return scores


def _measure_call(name: str, what: str, call):
    """Run a call into a measure's code; anything it raises becomes the measure's failure."""
    try:
        return call()
    except MeasureFailedError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except ExitbenchError as exc:
        from suite.sandbox import SandboxedError

        if isinstance(exc, SandboxedError):  # raised by sandboxed code: say what it raised
            raise MeasureFailedError(f"measure {name!r}: {what} raised "
                                     f"{describe_exception(exc)}") from exc
        text = str(exc)  # the measure's own clear message (e.g. one class only)
        raise MeasureFailedError(text if repr(name) in text else f"measure {name!r}: {what}: "
                                 f"{text}") from exc
    except Exception as exc:  # noqa: BLE001 - the measure's failure, named, not the run's
        raise MeasureFailedError(f"measure {name!r}: {what} raised {describe_exception(exc)}"
                                 ) from exc


class Sweep:
    """One (task, model) loaded once -- traces, references, full-depth quality, operation
    costs, hidden states on demand -- and its measures swept one at a time
    (:meth:`measure_rows`), so a caller can store each measure's rows as soon as they exist.
    A measure that fails raises :class:`MeasureFailedError`; the context stays usable for the
    next measure."""

    def __init__(self, inputs: SweepInputs, profiles: Sequence[str], batch_sizes: Sequence[int],
                 *, score_cache: ScoreCache | None = None, fit_cache_dir: Path | None = None,
                 seed: int = 0, bootstrap: BootstrapSettings | None = None):
        from suite.point_stats import PointStatistics

        started = time.perf_counter()
        self.inputs = inputs
        self.batch_sizes = list(batch_sizes)
        self.fit_cache_dir = fit_cache_dir
        self.seed = seed
        opened = open_traces(inputs, profiles, score_cache=score_cache)
        self.traces, self.traces_hash, self.info = opened.traces, opened.traces_hash, opened.info
        self.detokenize, self.cache = opened.detokenize, opened.cache
        self._hits, self._misses = opened.hits_before, opened.misses_before
        self.example_ids, self.references = opened.example_ids, opened.references
        self.source_len, self.example_index = opened.source_len, opened.example_index
        self.quality_of = opened.quality_of
        self.format, self.stop_token_ids = opened.format, opened.stop_token_ids
        self.full = opened.full
        self.profiles, self.costs = opened.profiles, opened.costs
        # per-example samples, quality intervals and per-request latency of each point
        self.points = PointStatistics(self.traces, self.example_ids, self.references,
                                      inputs.task, inputs.model.name, self.detokenize,
                                      self.stop_token_ids, self.cache,
                                      bootstrap or BootstrapSettings(seed=seed))
        self.points.add_full_depth()
        self.hidden = HiddenStateLoader(inputs.model.path, inputs.data_dir)
        self.load_seconds = time.perf_counter() - started

    @property
    def outputs_scored(self) -> int:
        return self.cache.misses - self._misses

    @property
    def outputs_from_cache(self) -> int:
        return self.cache.hits - self._hits

    def measure_rows(self, config: MeasureConfig) -> list[ResultRow]:
        """Fit (when it learns), score, replay every threshold, score the outputs with the
        task metric and price them on every profile and batch size: the measure's rows."""
        from suite.training import model_label

        inputs, traces, info = self.inputs, self.traces, self.info
        name, backbone = config.display_name, model_label(inputs.model)
        measure = _measure_call(name, "building it",
                                lambda: instantiate(config, inputs.model.path))
        if measure.needs_fit:
            if inputs.fit_trace_dir is None:
                raise MeasureFailedError(f"measure {name!r} must be fitted, but task "
                                         f"{inputs.task.name!r} has no fit_split in the config")
            fit_traces = self.hidden(inputs.fit_trace_dir)  # the engine's work, not the measure's
            _measure_call(name, "fit()", lambda: measure.fit(
                fit_traces, cache_dir=self.fit_cache_dir, seed=self.seed))
        scored = self.hidden(inputs.trace_dir) if "hidden" in measure.reads else traces
        scores = check_real_scores(_measure_call(name, "scores()", lambda: measure.scores(scored)),
                                   traces, name)
        thresholds = np.asarray(config.thresholds if config.thresholds is not None else
                                _measure_call(name, "thresholds_for()", lambda: measure
                                              .thresholds_for(traces.num_layers)),
                                dtype=np.float64)
        check_cost = _measure_call(name, "check_cost()", lambda: measure.check_cost(info.dims))
        checked = np.asarray(_measure_call(name, "checked_layers()", lambda: measure
                                           .checked_layers(traces.num_layers)), dtype=bool)
        schedule = build_schedule(config.schedule, inputs.task.limits.max_new_tokens)
        replayed = replay_scheduled(traces, scores, thresholds, schedule, config.min_layer,
                                    config.min_position, measure)
        exits = replayed.exits
        tokens = replayed_tokens(traces, exits)
        stats = replayed.statistics
        extra_schedule = schedule_extra(config, schedule)
        qualities = [self.quality_of(tokens[k]) for k in range(len(thresholds))]
        intervals = self.points.add_measure(name, config.min_layer, thresholds, tokens, exits)
        measure_hash = code_hash(type(measure))
        options_json = json.dumps(config.options, sort_keys=True)
        primary = self.full["primary"]
        rows: list[ResultRow] = []
        for profile in self.profiles:
            for batch_size in self.batch_sizes:
                priced = price_replay(self.costs[profile.name], info.dims, exits,
                                      self.example_index, traces.position, self.source_len,
                                      batch_size, check_cost, checked, config.min_layer,
                                      measure.propagation, measure_name=config.name)
                full_tokens_per_s = traces.num_tokens / priced.full_depth_seconds
                latency = self.points.latency(priced, self.example_index, profile)
                estimate = {}
                if config.name in getattr(self.costs[profile.name], "estimated_checks", ()):
                    estimate = {"cost_estimated": ESTIMATED_CHECK_NOTE}
                for k, threshold in enumerate(thresholds):
                    rows.append(ResultRow(
                        task=inputs.task.name, split=inputs.split, model=inputs.model.name,
                        model_label=backbone, measure=name,
                        measure_options=options_json, deployable=measure.deployable,
                        threshold=float(threshold), min_layer=config.min_layer,
                        profile=profile.name, profile_kind=profile.kind,
                        batch_size=int(batch_size), mode="replay", metric=primary,
                        quality=float(qualities[k]["scores"][primary]),
                        quality_full_depth=float(self.full["scores"][primary]),
                        scores={k2: float(v) for k2, v in qualities[k]["scores"].items()},
                        mean_layers_used=float(stats.mean_layers_used[k]),
                        num_layers=traces.num_layers,
                        token_agreement=float(stats.token_agreement[k]),
                        exit_histogram=[float(x) for x in stats.exit_histogram[k]],
                        tokens_per_s=float(priced.tokens_per_s[k]),
                        full_depth_tokens_per_s=float(full_tokens_per_s),
                        speedup=float(priced.speedup[k]), num_examples=len(self.example_ids),
                        num_tokens=traces.num_tokens, traces_hash=self.traces_hash,
                        measure_code_hash=measure_hash,
                        extra={"model_dims": info.dims.__dict__,
                               "signature": qualities[k].get("signature"),
                               "measure_name": config.name, **extra_schedule, **estimate},
                        **intervals[k], **latency[k]))
        return rows


def sweep(inputs: SweepInputs, measures: Sequence[MeasureConfig], profiles: Sequence[str],
          batch_sizes: Sequence[int], *, score_cache: ScoreCache | None = None,
          fit_cache_dir: Path | None = None, seed: int = 0,
          bootstrap: BootstrapSettings | None = None) -> SweepReport:
    """Replay, score and price every measure on one (task, model)'s traces (all or nothing:
    a failing measure raises; the runner uses :class:`Sweep` to keep the others)."""
    started = time.perf_counter()
    context = Sweep(inputs, profiles, batch_sizes, score_cache=score_cache,
                    fit_cache_dir=fit_cache_dir, seed=seed, bootstrap=bootstrap)
    rows: list[ResultRow] = []
    per_measure: dict[str, float] = {}
    for config in measures:
        measure_started = time.perf_counter()
        rows += context.measure_rows(config)
        per_measure[config.display_name] = time.perf_counter() - measure_started
    return SweepReport(rows=rows, seconds=time.perf_counter() - started,
                       outputs_scored=context.outputs_scored,
                       outputs_from_cache=context.outputs_from_cache,
                       per_measure_seconds=per_measure, samples=context.points.samples)
