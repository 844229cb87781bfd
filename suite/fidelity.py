"""Online measurement and the replay-fidelity report (``exitbench online`` / ``fidelity``).

For one (task, model) and each configured measure, threshold and batch size:

- **online**: the examples are decoded with real early exits (:mod:`suite.online`), timed
  wall-clock on the config's device, and scored with the task metric. Every batch is also
  decoded at full depth (:func:`suite.decoding.greedy_decode`) right beside it
  (:func:`suite.online.decode_paired`), so the realised speedup is a ratio of runs made
  side by side (these machines are shared and noisy); ``repeats`` such pairs give medians.
- **replay**, when the model's generated traces of the same examples exist: the same
  measure and threshold replayed over them (quality), priced by the cost model on the
  chosen hardware profile (predicted tokens/s and speedup).
- **online exits**: the cost model applied to what was actually decoded -- the online
  outputs with their exit layers, over the full-depth run's outputs -- so that its error is
  the cost model's alone (replay's prediction adds the trajectory's divergence: outputs of
  other lengths, other exits).
- **divergence**: per example, the online output against the replayed one: the share of
  token positions that differ, the examples that differ at all, and where they part (the
  first differing position, and whether the exit decision there changed or only the
  prediction at the same exit layer, i.e. the propagated state changed it).

Rows are :class:`suite.results.ResultRow` with ``mode="online"`` and the replay figures in
``extra``; each point's emitted tokens with their exit layers are written in the trace format
(``<out>/online/<task>/<model>/traces/<measure>/threshold-<t>-batch-<b>.arrow``, read with
:func:`suite.traces.read_shard`); rows are stored per measure in
``<out>/online/<task>/<model>/<measure>.json``
(keyed by everything they depend on, so a rerun reuses them) and merged into the run's
results beside the replayed rows.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite.atomic import atomic_write_json
from suite.config import MeasureConfig, ModelConfig, SuiteConfig, TaskConfig
from suite.errors import ExitbenchError
from suite.keys import content_key, file_stem
from suite.measures import Measure, code_hash
from suite.online import ExitPolicy, OnlineRun, decode_examples, decode_paired
from suite.replay import ScoreCache
from suite.results import ResultRow
from suite.sweep import Detokenizer, SweepInputs
from suite.traces import TraceArrays, write_shard

logger = logging.getLogger(__name__)


# -- divergence -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Divergence:
    """Online outputs against replayed ones, example by example.

    Where they part: at an example's first differing position ``p`` every earlier output
    token is the same online and in replay, so the difference has one of three causes,
    checked in this order:

    - ``fed_back``: the token at ``p - 1`` differs from the recorded full-depth one, so
      replay (which follows the recorded trajectory) read another input at ``p`` than online
      decoding, which feeds the exited token forward;
    - ``decision``: same input, but the token exited at another layer online (the states of
      earlier exited tokens changed the score);
    - ``state``: same input and exit layer, another prediction (the propagated states of
      earlier exited tokens changed the hidden state itself).
    """

    token_rate: float
    """Differing positions / all positions (a position only one output has differs)."""
    examples_diverged: float
    """Share of examples whose outputs differ anywhere."""
    first_positions: list[int]
    """First differing position of each diverged example."""
    causes: dict[str, float]
    """Share of diverged examples per cause (``fed_back``, ``decision``, ``state``); empty
    when exits and full-depth tokens were not given."""

    def to_dict(self) -> dict[str, Any]:
        positions = np.asarray(self.first_positions)
        return {"token_rate": self.token_rate, "examples_diverged": self.examples_diverged,
                "causes": self.causes,
                "first_position_median": float(np.median(positions)) if positions.size else None,
                "first_position_mean": float(positions.mean()) if positions.size else None}


CAUSES = ("fed_back", "decision", "state")


def divergence(online: Sequence[Sequence[int]], replayed: Sequence[Sequence[int]],
               online_exits: Sequence[Sequence[int]] | None = None,
               replayed_exits: Sequence[Sequence[int]] | None = None,
               full_depth: Sequence[Sequence[int]] | None = None) -> Divergence:
    """Compare per-example token lists; with the exit layers of each token and the recorded
    full-depth tokens, also say where each diverged example parts (see
    :class:`Divergence`)."""
    if len(online) != len(replayed):
        raise ValueError(f"{len(online)} online outputs but {len(replayed)} replayed ones")
    explain = online_exits is not None and replayed_exits is not None and full_depth is not None
    differing = total = 0
    first_positions: list[int] = []
    counts = dict.fromkeys(CAUSES, 0)
    for index, (a, b) in enumerate(zip(online, replayed)):  # per example, not per token
        a, b = np.asarray(a), np.asarray(b)
        common = min(a.size, b.size)
        unequal = a[:common] != b[:common]
        longest = max(a.size, b.size)
        differing += int(unequal.sum()) + (longest - common)
        total += longest
        if not (unequal.any() or a.size != b.size):
            continue
        first = int(np.argmax(unequal)) if unequal.any() else common
        first_positions.append(first)
        if explain:
            recorded = full_depth[index]
            online_layers, replayed_layers = online_exits[index], replayed_exits[index]
            if 0 < first <= len(recorded) and first - 1 < b.size \
                    and b[first - 1] != recorded[first - 1]:
                counts["fed_back"] += 1
            elif first < len(online_layers) and first < len(replayed_layers) \
                    and online_layers[first] != replayed_layers[first]:
                counts["decision"] += 1
            else:
                counts["state"] += 1
    diverged = len(first_positions)
    causes = ({cause: count / diverged for cause, count in counts.items()}
              if explain and diverged else {})
    return Divergence(token_rate=differing / total if total else 0.0,
                      examples_diverged=diverged / len(online) if online else 0.0,
                      first_positions=first_positions, causes=causes)


def per_example(traces: TraceArrays, values: np.ndarray) -> list[np.ndarray]:
    """``values [T]`` split by example (row order)."""
    starts, ends = traces.example_bounds()
    return [values[s:e] for s, e in zip(starts, ends)]


def cut_at_eos(sequences: Sequence[np.ndarray], eos_token_id: int | Sequence[int]
               ) -> list[np.ndarray]:
    """Each sequence up to (not including) its first EOS (or stop id), as replay cuts its
    outputs."""
    stops = np.atleast_1d(np.asarray(eos_token_id))
    out = []
    for ids in sequences:
        hits = np.flatnonzero(np.isin(np.asarray(ids), stops))
        out.append(np.asarray(ids)[:hits[0]] if hits.size else np.asarray(ids))
    return out


# -- thresholds -------------------------------------------------------------------------------
def online_thresholds(config: SuiteConfig, measure_config: MeasureConfig, measure: Measure,
                      num_layers: int) -> list[float]:
    """The thresholds decoded online: the config's ``online.thresholds``, else
    ``online.num_thresholds`` of the measure's sweep (config or its own), evenly spread and
    always including both ends."""
    if config.online.thresholds is not None:
        return [float(t) for t in config.online.thresholds]
    sweep = sorted(set(float(t) for t in (measure_config.thresholds if measure_config.thresholds
                                          is not None else measure.thresholds_for(num_layers))))
    count = min(config.online.num_thresholds, len(sweep))
    picks = np.unique(np.round(np.linspace(0, len(sweep) - 1, count)).astype(int))
    return [sweep[i] for i in picks]


# -- the stored parts -------------------------------------------------------------------------
def online_part_path(output_dir: str | Path, task: str, model: str, measure: str) -> Path:
    return (Path(output_dir) / "online" / file_stem(task) / file_stem(model)
            / f"{file_stem(measure)}.json")


def online_traces_path(output_dir: str | Path, task: str, model: str, measure: str,
                       threshold: float, batch_size: int) -> Path:
    """Where the traces of one online point (emitted tokens, ``exit_layer``) are written."""
    return (Path(output_dir) / "online" / file_stem(task) / file_stem(model) / "traces"
            / file_stem(measure)
            / f"threshold-{threshold:.6g}-batch-{batch_size}.arrow")


def stored_parts(config: SuiteConfig):
    """``(task, model, part)`` for every stored online part of this config, in config order."""
    for task in config.tasks:
        for model in config.models:
            for measure in config.measures:
                path = online_part_path(config.output_dir, task.name, model.name,
                                        measure.display_name)
                if path.is_file():
                    yield task.name, model.name, json.loads(path.read_text("utf-8"))


def read_online_rows(config: SuiteConfig) -> list[ResultRow]:
    """Every stored online row of this config's tasks, models and measures."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(ResultRow)}
    return [ResultRow(**{k: v for k, v in row.items() if k in names})
            for _, _, part in stored_parts(config) for row in part["rows"]]


# -- one (task, model) ------------------------------------------------------------------------
@dataclass
class OnlineContext:
    """What every measure of one (task, model) shares: model, examples, metric, traces."""

    config: SuiteConfig
    task_config: TaskConfig
    model_config: ModelConfig
    adapter: Any
    tokenizer: Any
    task: Any
    examples: list
    sources: list[list[int]]
    references: list
    traces: TraceArrays | None
    """Generated traces of the same examples (``None``: no replay comparison)."""
    traces_hash: str
    model_hash: str
    profile: Any
    detokenize: Detokenizer
    scores: ScoreCache
    """Metric results by output hash: thresholds that decode alike are scored once."""
    stop_token_ids: tuple[int, ...] = ()
    """Where outputs end (EOS; decoder-only: the task's stop strings too)."""

    @property
    def example_ids(self) -> list[str]:
        return [e.id for e in self.examples]

    def sweep_inputs(self, trace_dir: Path) -> SweepInputs:
        """This (task, model) as replay's sweep sees it, with the fit split's traces for
        learned measures."""
        return SweepInputs(task=self.task, split=self.task_config.split,
                           model=self.model_config, trace_dir=trace_dir,
                           data_dir=self.config.data_dir, limit=self.task_config.limit,
                           fit_trace_dir=_fit_dir(self.config, self.task_config,
                                                  self.model_config),
                           dtype=self.config.dtype)

    def quality(self, sequences: Sequence[Sequence[int]]) -> dict:
        """``{"scores", "primary"}`` of the task metric for per-example token lists."""
        from suite.metrics import get_metric
        from suite.replay import outputs_hash

        texts = self.detokenize([list(map(int, s)) for s in sequences])

        def compute() -> dict:
            result = get_metric(self.task.metric)(texts, self.references)
            return {"scores": result.scores, "primary": result.primary}

        return self.scores.get_or_compute(outputs_hash(texts), compute)


def open_context(config: SuiteConfig, task_config: TaskConfig, model_config: ModelConfig
                 ) -> OnlineContext:
    from suite.models import load_adapter, load_tokenizer, resolve_model_folder, weights_sha256
    from suite.profiles import get_profile
    from suite.prompts import encode_sources
    from suite.record import adapter_format
    from suite.runner import trace_dir
    from suite.tasks import load_examples, task_spec
    from suite.traces import TraceStore, sha256_file

    task = task_spec(task_config)
    examples = load_examples(task, task_config.split, config.data_dir, task_config.limit)
    if not examples:
        raise ExitbenchError(f"task {task.name}: split {task_config.split!r} has no examples")
    adapter = load_adapter(model_config.path, device=config.device, dtype=config.dtype)
    tokenizer = load_tokenizer(model_config.path)
    fmt = adapter_format(adapter, tokenizer, task, model_config.chat_template)
    sources = encode_sources(tokenizer, examples, fmt, task.limits.max_source_tokens)
    model_hash = weights_sha256(resolve_model_folder(model_config.path))
    store = TraceStore(trace_dir(config.output_dir, task.name, model_config.name))
    traces, traces_hash = None, ""
    if store.exists():
        manifest = store.read_manifest()
        loaded = store.load()
        if manifest.model_hash != model_hash:
            logger.warning("%s: traces were recorded with other weights; no replay comparison",
                           store.root)
        elif loaded.example_ids() != [e.id for e in examples]:
            logger.warning("%s: traces hold other examples; no replay comparison", store.root)
        else:
            traces, traces_hash = loaded, sha256_file(store.manifest_path)
    profile_name = config.online.profile or (config.profiles[0] if config.profiles else None)
    profile = get_profile(profile_name) if profile_name else None
    return OnlineContext(config=config, task_config=task_config, model_config=model_config,
                         adapter=adapter, tokenizer=tokenizer, task=task, examples=examples,
                         sources=sources, references=[e.references for e in examples],
                         traces=traces, traces_hash=traces_hash, model_hash=model_hash,
                         profile=profile, detokenize=Detokenizer(tokenizer),
                         scores=ScoreCache(), stop_token_ids=fmt.stop_token_ids)


@dataclass(frozen=True)
class PairedTiming:
    """Full-depth and early-exit decoding of the same examples, timed side by side."""

    full: OnlineRun
    online: OnlineRun
    full_tokens_per_s: float
    """Median over repeats."""
    online_tokens_per_s: float
    speedup: float
    """Median over repeats of each repeat's online / full-depth tokens/s (paired)."""


def timed_pairs(ctx: OnlineContext, batch_size: int, policy: ExitPolicy,
                repeats: int) -> PairedTiming:
    """``repeats`` paired runs (:func:`suite.online.decode_paired`); outputs from the first."""
    pairs = [decode_paired(ctx.adapter, ctx.sources, ctx.example_ids, batch_size,
                           ctx.task.limits.max_new_tokens, policy, ctx.stop_token_ids)
             for _ in range(repeats)]
    full_tps = [f.tokens_per_s for f, _ in pairs]
    online_tps = [o.tokens_per_s for _, o in pairs]
    return PairedTiming(full=pairs[0][0], online=pairs[0][1],
                        full_tokens_per_s=float(np.median(full_tps)),
                        online_tokens_per_s=float(np.median(online_tps)),
                        speedup=float(np.median(np.divide(online_tps, full_tps))))


def warm_up(ctx: OnlineContext, batch_size: int) -> None:
    """One untimed full-depth decode of the first batch (allocator, kernels, caches)."""
    decode_examples(ctx.adapter, ctx.sources[:batch_size], ctx.example_ids[:batch_size],
                    batch_size, ctx.task.limits.max_new_tokens, None, ctx.stop_token_ids)


def measure_online(ctx: OnlineContext, measure_config: MeasureConfig, *,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Decode, time, score and compare one measure at its online thresholds and every
    online batch size; returns the stored part (rows and the fidelity entries)."""
    from suite.cost import (
        example_index_from_ids,
        full_depth_seconds,
        price_replay,
    )
    from suite.replay import replayed_tokens
    from suite.schedules import build_schedule, replay_scheduled, schedule_extra
    from suite.sweep import HiddenStateLoader, fitted_measure, model_info
    from suite.training import model_label

    config, adapter = ctx.config, ctx.adapter
    num_layers = adapter.num_layers
    name, backbone = measure_config.display_name, model_label(ctx.model_config)
    inputs = ctx.sweep_inputs(Path())
    hidden = HiddenStateLoader(ctx.model_config.path, config.data_dir)
    measure = fitted_measure(measure_config, inputs, hidden,
                             fit_cache_dir=Path(config.output_dir) / "measures", seed=config.seed)
    schedule = build_schedule(measure_config.schedule, ctx.task.limits.max_new_tokens)

    def policy_at(threshold: float) -> ExitPolicy:
        return ExitPolicy(measure, threshold, measure_config.min_layer, schedule,
                          measure_config.min_position)

    policy_at(0.0).check(num_layers)
    thresholds = online_thresholds(config, measure_config, measure, num_layers)
    eos = ctx.stop_token_ids
    info = model_info(ctx.model_config.path)

    replay_exits = replay_rows = None
    if ctx.traces is not None:
        traces = hidden(_eval_dir(config, ctx)) if "hidden" in measure.reads else ctx.traces
        replay_exits = replay_scheduled(ctx.traces, measure.scores(traces), thresholds, schedule,
                                        measure_config.min_layer, measure_config.min_position,
                                        measure).exits
        replay_rows = replayed_tokens(ctx.traces, replay_exits)
        example_index = example_index_from_ids(ctx.traces.example_id)
    costs = info.costs(ctx.profile, config.dtype) if ctx.profile is not None else None
    source_len = np.array([len(s) for s in ctx.sources])

    rows, entries = [], []
    for batch_size in config.online.batch_sizes:
        warm_up(ctx, batch_size)
        for k, threshold in enumerate(thresholds):
            if progress:
                progress(f"{name} threshold {threshold:g} batch {batch_size}")
            policy = policy_at(threshold)
            timing = timed_pairs(ctx, batch_size, policy, config.online.repeats)
            run = timing.online
            full_sequences = per_example(timing.full.traces, timing.full.traces.final_id)
            full_quality = ctx.quality(cut_at_eos(full_sequences, eos))
            online_sequences = per_example(run.traces, run.traces.final_id)
            quality = ctx.quality(cut_at_eos(online_sequences, eos))
            primary = quality["primary"]
            exit_layer = run.traces.exit_layer
            tokens_per_s, full_tps = timing.online_tokens_per_s, timing.full_tokens_per_s
            agreement = _agreement(online_sequences, full_sequences)
            entry: dict[str, Any] = {
                "measure": name, "threshold": threshold, "batch_size": batch_size,
                "online_quality": quality["scores"][primary], "metric": primary,
                "full_depth_quality": full_quality["scores"][primary],
                "online_tokens_per_s": tokens_per_s, "full_depth_tokens_per_s": full_tps,
                "realised_speedup": timing.speedup,
                "online_tokens": run.num_tokens, "online_mean_layers": float(exit_layer.mean() + 1),
            }
            if costs is not None:
                online_index = example_index_from_ids(run.traces.example_id)
                priced_online = price_replay(
                    costs, info.dims, exit_layer.astype(np.int64), online_index,
                    run.traces.position, source_len, batch_size, measure.check_cost(info.dims),
                    measure.checked_layers(num_layers), measure_config.min_layer,
                    measure.propagation, measure_name=measure_config.name)
                # the full-depth side priced on the full-depth run's own outputs: the two
                # workloads the realised speedup compares (their lengths may differ)
                full_traces = timing.full.traces
                full_predicted_tps = full_traces.num_tokens / full_depth_seconds(
                    costs, info.dims, example_index_from_ids(full_traces.example_id),
                    full_traces.position, source_len, batch_size)
                online_predicted_tps = float(priced_online.tokens_per_s[0])
                entry.update(profile=ctx.profile.name,
                             predicted_speedup_online_exits=online_predicted_tps
                             / full_predicted_tps,
                             predicted_tokens_per_s_online_exits=online_predicted_tps)
            if replay_rows is not None:
                replayed = per_example(ctx.traces, replay_rows[k])
                replay_quality = ctx.quality(cut_at_eos(replayed, eos))
                gap = divergence(cut_at_eos(online_sequences, eos), cut_at_eos(replayed, eos),
                                 per_example(run.traces, exit_layer),
                                 per_example(ctx.traces, replay_exits[k]),
                                 per_example(ctx.traces, ctx.traces.final_id))
                entry.update(replay_quality=replay_quality["scores"][primary],
                             quality_difference=entry["online_quality"]
                             - replay_quality["scores"][primary],
                             replay_mean_layers=float(replay_exits[k].mean() + 1),
                             divergence=gap.to_dict())
                if costs is not None:
                    priced = price_replay(
                        costs, info.dims, replay_exits[k:k + 1].astype(np.int64), example_index,
                        ctx.traces.position, source_len, batch_size,
                        measure.check_cost(info.dims), measure.checked_layers(num_layers),
                        measure_config.min_layer, measure.propagation,
                        measure_name=measure_config.name)
                    entry.update(predicted_tokens_per_s=float(priced.tokens_per_s[0]),
                                 predicted_speedup=float(priced.speedup[0]),
                                 predicted_full_depth_tokens_per_s=float(
                                     ctx.traces.num_tokens / priced.full_depth_seconds))
                    entry["throughput_error"] = (entry["predicted_tokens_per_s"]
                                                 / tokens_per_s - 1.0)
                    entry["realised_over_predicted"] = (entry["realised_speedup"]
                                                        / entry["predicted_speedup"])
            shard = online_traces_path(config.output_dir, ctx.task.name, ctx.model_config.name,
                                       name, threshold, batch_size)
            if "predicted_speedup_online_exits" in entry:
                entry["realised_over_predicted_online_exits"] = (
                    entry["realised_speedup"] / entry["predicted_speedup_online_exits"])
                entry["throughput_error_online_exits"] = (
                    entry["predicted_tokens_per_s_online_exits"] / tokens_per_s - 1.0)
            entry.update(traces=str(shard), traces_sha256=write_shard(shard, run.traces))
            entries.append(entry)
            rows.append(ResultRow(
                task=ctx.task.name, split=ctx.task_config.split, model=ctx.model_config.name,
                model_label=backbone, measure=name,
                measure_options=json.dumps(measure_config.options, sort_keys=True),
                deployable=True, threshold=float(threshold), min_layer=measure_config.min_layer,
                profile=ctx.profile.name if ctx.profile is not None else f"online-{config.device}",
                profile_kind=ctx.profile.kind if ctx.profile is not None else "measured",
                batch_size=int(batch_size), mode="online", metric=primary,
                quality=float(quality["scores"][primary]),
                quality_full_depth=float(full_quality["scores"][primary]),
                scores={k2: float(v) for k2, v in quality["scores"].items()},
                mean_layers_used=float(exit_layer.mean() + 1), num_layers=num_layers,
                token_agreement=agreement,
                exit_histogram=[float(x) for x in np.bincount(
                    exit_layer, minlength=num_layers) / max(1, exit_layer.size)],
                tokens_per_s=float(tokens_per_s), full_depth_tokens_per_s=float(full_tps),
                speedup=float(timing.speedup), num_examples=len(ctx.examples),
                num_tokens=int(run.num_tokens), traces_hash=ctx.traces_hash,
                measure_code_hash=code_hash(type(measure)),
                extra={**schedule_extra(measure_config, schedule),
                       "model_dims": info.dims.__dict__, "device": config.device,
                       "measured_on": _machine(), "repeats": config.online.repeats,
                       "fidelity": {k2: v for k2, v in entry.items()
                                    if k2 not in ("measure", "threshold", "batch_size")}},
                **measured_latency(run, ctx.profile), **_online_interval(ctx, online_sequences)))
    return {"rows": [r.to_dict() for r in rows], "fidelity": entries}


def _online_interval(ctx: OnlineContext, sequences: list[np.ndarray]) -> dict[str, Any]:
    """Bootstrap interval of an online point's quality (issue 17)."""
    from suite.point_stats import quality_interval_fields
    from suite.runner import bootstrap_settings

    texts = ctx.detokenize([list(map(int, s)) for s in cut_at_eos(sequences,
                                                                  ctx.stop_token_ids)])
    return quality_interval_fields(ctx.task.metric, ctx.example_ids, texts, ctx.references,
                                   bootstrap_settings(ctx.config))


def measured_latency(run: OnlineRun, profile) -> dict[str, Any]:
    """Row fields of the per-request TTFT / TPOT percentiles measured online (issue 17)."""
    from suite.cost import example_index_from_ids
    from suite.latency import from_emissions, meets_limits
    from suite.results import finite_or_none

    if run.emitted_at_seconds is None:
        return {}
    index = example_index_from_ids(run.traces.example_id)
    percentiles = from_emissions(index, run.traces.position, run.emitted_at_seconds,
                                 int(index.max(initial=-1)) + 1).percentiles()[0]
    fields: dict[str, Any] = {k: finite_or_none(v) for k, v in percentiles.items()}
    fields["meets_latency_limits"] = meets_limits(percentiles,
                                                  getattr(profile, "latency_limits", None))
    return fields


def _agreement(online: list[np.ndarray], full: list[np.ndarray]) -> float:
    """Share of online tokens equal to the full-depth token at the same position."""
    same = total = 0
    for a, b in zip(online, full):
        common = min(len(a), len(b))
        same += int(np.sum(np.asarray(a[:common]) == np.asarray(b[:common])))
        total += len(a)
    return same / total if total else 1.0


def _machine() -> str:
    return f"{platform.machine()} {platform.processor() or platform.system()}".strip()


def _fit_dir(config: SuiteConfig, task: TaskConfig, model: ModelConfig) -> Path | None:
    from suite.runner import trace_dir

    directory = trace_dir(config.output_dir, task.name, model.name, "fit")
    return directory if (directory / "manifest.json").is_file() else None


def _eval_dir(config: SuiteConfig, ctx: OnlineContext) -> Path:
    from suite.runner import trace_dir

    return trace_dir(config.output_dir, ctx.task.name, ctx.model_config.name)


def part_key(ctx: OnlineContext, measure_config: MeasureConfig) -> str:
    import torch

    from suite import __version__
    from suite.measures import get_measure
    from suite.traces import sha256_file

    fit_dir = _fit_dir(ctx.config, ctx.task_config, ctx.model_config)
    needs_fit = get_measure(measure_config.name).needs_fit
    return content_key({
        "model": ctx.model_hash, "traces": ctx.traces_hash,
        "fit": sha256_file(fit_dir / "manifest.json") if needs_fit and fit_dir else "",
        "examples": ctx.example_ids, "task": ctx.task_config.model_dump(mode="json"),
        "measure": measure_config.model_dump(mode="json"),
        "code": code_hash(get_measure(measure_config.name)),
        "online": ctx.config.online.model_dump(mode="json"),
        # the profile's figures price the points; where its file lies does not
        "profile": (ctx.profile.model_dump(mode="json", exclude={"path"})
                    if ctx.profile is not None else None),
        "device": ctx.config.device, "dtype": ctx.config.dtype, "seed": ctx.config.seed,
        "threads": torch.get_num_threads(), "suite": __version__})


@dataclass
class OnlineReport:
    parts_done: int = 0
    parts_reused: int = 0
    errors: dict[str, str] | None = None
    seconds: float = 0.0


def run_online(config: SuiteConfig, *, progress: bool = True) -> OnlineReport:
    """Measure every (task, model, measure) of the config online, reusing stored parts."""
    import torch

    if not config.models or not (config.measures or config.methods):
        raise ExitbenchError("online decoding needs models and measures (or methods) in the "
                             "config")
    if config.online.threads is not None:
        torch.set_num_threads(config.online.threads)
    report = OnlineReport(errors={})
    started = time.perf_counter()
    online = [m for m in config.measures if config.online.measures is None
              or m.display_name in config.online.measures]
    for task in config.tasks if online else ():  # methods: speculative.sweep
        for model in config.models:
            ctx = open_context(config, task, model)
            for measure in online:
                path = online_part_path(config.output_dir, task.name, model.name,
                                        measure.display_name)
                store_online_part(
                    report, path, f"{task.name}/{model.name}/{measure.display_name}",
                    lambda ctx=ctx, measure=measure: part_key(ctx, measure),
                    lambda say, ctx=ctx, measure=measure: measure_online(ctx, measure,
                                                                         progress=say),
                    progress=progress)
    report.seconds = time.perf_counter() - started
    return report


def store_online_part(report: OnlineReport, path: Path, label: str, key: Callable[[], str],
                      decode: Callable[[Callable[[str], None] | None], dict[str, Any]], *,
                      progress: bool) -> None:
    """Reuse the part stored at ``path`` when its key matches, else ``decode`` it (with a
    progress callback) and store it; an :class:`ExitbenchError` is reported in
    ``report.errors`` and the other parts go on."""
    try:
        part_key_ = key()
        if path.is_file() and json.loads(path.read_text("utf-8")).get("key") == part_key_:
            report.parts_reused += 1
            return
        say = (lambda what: print(f"  online {label}: {what}", flush=True)) if progress else None
        part = decode(say)
    except ExitbenchError as exc:  # one part's failure must not lose the others
        report.errors[label] = str(exc)
        print(f"  online {label}: skipped: {exc}", flush=True)
        return
    atomic_write_json(path, {"key": part_key_, **part})
    report.parts_done += 1


def fidelity_entries(config: SuiteConfig) -> list[dict[str, Any]]:
    """The stored fidelity entries of this config, with task and model (the decoding
    methods' too: :func:`suite.speculative.sweep.method_fidelity_entries`)."""
    from suite.speculative.sweep import method_fidelity_entries

    return [{"task": task, "model": model, **entry}
            for task, model, part in stored_parts(config)
            for entry in part["fidelity"]] + method_fidelity_entries(config)


def fidelity_summary(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (task, measure, batch size): mean |quality difference|, mean |throughput error|,
    realised / predicted speedup (points with a predicted speedup above 1.05 only: at a
    predicted 1.0 the ratio measures noise), mean divergence rate."""
    groups: dict[tuple, list[dict]] = {}
    for entry in entries:
        groups.setdefault((entry["task"], entry["model"], entry["measure"],
                           entry["batch_size"]), []).append(entry)
    summary = []
    for (task, model, measure, batch), group in sorted(groups.items()):
        with_replay = [e for e in group if "replay_quality" in e]
        priced = [e for e in with_replay if "predicted_speedup" in e]
        speeding = [e for e in priced if e["predicted_speedup"] > 1.05]
        online_priced = [e for e in group if "predicted_speedup_online_exits" in e]
        online_speeding = [e for e in online_priced if e["predicted_speedup_online_exits"] > 1.05]
        summary.append({
            "task": task, "model": model, "measure": measure, "batch_size": batch,
            "points": len(group),
            "mean_abs_quality_difference": _mean([abs(e["quality_difference"])
                                                  for e in with_replay]),
            "mean_abs_throughput_error": _mean([abs(e["throughput_error"]) for e in priced]),
            "realised_over_predicted_speedup": _mean([e["realised_over_predicted"]
                                                      for e in speeding]),
            "mean_abs_throughput_error_online_exits": _mean([
                abs(_online_exits(e, "throughput_error")) for e in online_priced]),
            "realised_over_predicted_speedup_online_exits": _mean([
                _online_exits(e, "realised_over_predicted") for e in online_speeding]),
            "mean_token_divergence": _mean([e["divergence"]["token_rate"]
                                            for e in with_replay]),
        })
    return {"groups": summary}


def _online_exits(entry: dict[str, Any], what: str) -> float:
    """``throughput_error`` or ``realised_over_predicted`` with the cost model applied to the
    exit layers and trajectory online decoding took (computed here for older parts)."""
    if what == "throughput_error":
        return entry["predicted_tokens_per_s_online_exits"] / entry["online_tokens_per_s"] - 1
    return entry["realised_speedup"] / entry["predicted_speedup_online_exits"]


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def write_fidelity_report(config: SuiteConfig, out_dir: Path) -> Path:
    """``fidelity.json`` (every point and the summary) and ``fidelity.md`` (tables)."""
    entries = fidelity_entries(config)
    summary = fidelity_summary(entries)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "fidelity.json", {"points": entries, **summary,
                                                   "device": config.device,
                                                   "machine": _machine()})
    from suite.atomic import atomic_write_text
    from suite.speculative.sweep import render_method_markdown

    atomic_write_text(out_dir / "fidelity.md", render_markdown(entries, summary, config)
                      + render_method_markdown(entries, config))
    return out_dir / "fidelity.md"


def _causes(causes: dict[str, float] | None) -> str:
    if not causes:
        return "-"
    return " / ".join(f"{causes.get(cause, 0.0):.0%}" for cause in CAUSES)


def _fmt(value: Any, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def render_markdown(entries: list[dict[str, Any]], summary: dict[str, Any],
                    config: SuiteConfig) -> str:
    lines = [f"# Replay fidelity: {config.name}", "",
             f"Online early-exit decoding on `{config.device}` ({_machine()}), "
             f"{config.online.repeats} paired timed pass(es) per point (median), against replay "
             "over the recorded full-depth traces priced on the profile named per point. "
             "Models: " + "; ".join(f"{m.name}: {m.label or m.path}" for m in config.models)
             + ".", "",
             "Two predictions per point: *replay* prices the exit layers replay computes on the "
             "recorded full-depth trajectory (what the leaderboard shows); *online exits* "
             "prices the exit layers and outputs online decoding actually produced, so its "
             "error is the cost model's alone, while the replay error adds the trajectory's "
             "divergence (outputs of other lengths, other exits).", "",
             "## Per point", "",
             "| task | model | measure | threshold | batch | quality online | replay | diff | "
             "tokens/s online | predicted (replay) | error | error (online exits) | "
             "speedup realised | predicted (replay) | predicted (online exits) | "
             "realised/predicted (replay) | realised/predicted (online exits) | "
             "token divergence | examples diverged | first differing position (median) | "
             "parts at: fed-back token / exit decision / propagated state |",
             "|" + "---|" * 21]
    for e in entries:
        div = e.get("divergence", {})
        online_exits = "predicted_speedup_online_exits" in e
        lines.append("| " + " | ".join([
            e["task"], e["model"], e["measure"], f"{e['threshold']:g}", str(e["batch_size"]),
            _fmt(e["online_quality"]), _fmt(e.get("replay_quality")),
            _fmt(e.get("quality_difference"), "{:+.2f}"), _fmt(e["online_tokens_per_s"], "{:.1f}"),
            _fmt(e.get("predicted_tokens_per_s"), "{:.1f}"),
            _fmt(e.get("throughput_error"), "{:+.1%}"),
            _fmt(_online_exits(e, "throughput_error") if online_exits else None, "{:+.1%}"),
            _fmt(e["realised_speedup"]), _fmt(e.get("predicted_speedup")),
            _fmt(e.get("predicted_speedup_online_exits")),
            _fmt(e.get("realised_over_predicted"), "{:.0%}"),
            _fmt(_online_exits(e, "realised_over_predicted") if online_exits else None,
                 "{:.0%}"),
            _fmt(div.get("token_rate"), "{:.1%}"), _fmt(div.get("examples_diverged"), "{:.0%}"),
            _fmt(div.get("first_position_median"), "{:g}"), _causes(div.get("causes"))]) + " |")
    lines += ["", "## Per measure and batch size", "",
              "| task | model | measure | batch | points | mean abs quality diff | "
              "mean abs throughput error (replay) | (online exits) | "
              "realised/predicted speedup (replay) | (online exits) | mean token divergence |",
              "|" + "---|" * 11]
    for g in summary["groups"]:
        lines.append("| " + " | ".join([
            g["task"], g["model"], g["measure"], str(g["batch_size"]), str(g["points"]),
            _fmt(g["mean_abs_quality_difference"]),
            _fmt(g["mean_abs_throughput_error"], "{:.1%}"),
            _fmt(g["mean_abs_throughput_error_online_exits"], "{:.1%}"),
            _fmt(g["realised_over_predicted_speedup"], "{:.0%}"),
            _fmt(g["realised_over_predicted_speedup_online_exits"], "{:.0%}"),
            _fmt(g["mean_token_divergence"], "{:.1%}")]) + " |")
    lines += ["", "Quality in the task's primary metric (percent). Throughput error = predicted / "
              "measured tokens/s - 1. Realised/predicted speedup is averaged over points "
              "predicted above 1.05x (at 1.0 the ratio measures noise). Token divergence = "
              "share of positions where the online output differs from the replayed one. Where "
              "they part, per diverged example, at its first differing position: the token "
              "before it differs from the recorded full-depth one (replay read another input "
              "than online decoding), else the exit layer differs, else only the prediction "
              "(propagated states).", ""]
    return "\n".join(lines)
