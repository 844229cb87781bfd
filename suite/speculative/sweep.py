"""Self-speculative decoding as a stage of a run: replayed and priced over the same traces,
profiles and batch sizes as the exit measures (rows ``method: self_speculative``, mode
``replay``), and decoded online beside full depth (mode ``online``, with fidelity entries
that set each online point beside its replay).

Config: a ``methods:`` entry (:class:`suite.config.MethodConfig`) sweeps draft depths ``E``
(default every ``1..L-1``), draft lengths ``k`` and the stopping rule's thresholds; each
combination is a point, one row per profile and batch size. Rows are lossless by
construction: quality is the full-depth quality of the same traces (checked: the replayed
cycles emit exactly the recorded tokens). Where the trace leaves a stopping rule's draft
count open (:mod:`suite.speculative.replay`), the row's speedup is the lower bound (the most
drafting) and ``extra`` holds both bounds.

Stored work: ``results/methods/<task>/<model>/<label>.json`` (replay rows) and
``online/<task>/<model>/methods/<label>.json`` (online rows and fidelity entries), each keyed
by everything it depends on, so reruns reuse them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite import __version__
from suite.atomic import atomic_write_json
from suite.config import MeasureConfig, MethodConfig, SuiteConfig, TaskConfig
from suite.cost import full_depth_seconds, speculative_cost
from suite.errors import ExitbenchError
from suite.keys import content_key, file_stem
from suite.measures import Measure, code_hash, get_measure
from suite.results import ResultRow
from suite.speculative.method import (
    METHOD,
    DraftStop,
    SelfSpeculation,
    method_code_hash,
    options_json,
    options_label,
    stop_scores,
)
from suite.speculative.replay import (
    SpeculativeReplay,
    SpeculativeStatistics,
    cycle_statistics,
    emitted_tokens,
    replay_speculation,
    replay_statistics,
)
from suite.sweep import HiddenStateLoader, OpenedTraces, SweepInputs, fitted_measure, open_traces
from suite.traces import TraceStore, sha256_file


# -- the points of a method entry ---------------------------------------------------------------
def stop_measure_config(method: MethodConfig) -> MeasureConfig | None:
    if method.stop is None:
        return None
    return MeasureConfig(name=method.stop.measure, options=method.stop.options)


def method_specs(method: MethodConfig, num_layers: int, stop_measure: Measure | None, *,
                 online: bool = False) -> list[SelfSpeculation]:
    """Every ``(E, k, stop threshold)`` point of ``method`` (``online``: the online subset),
    checked against the model's depth."""
    depths = method.draft_depths or list(range(1, num_layers))
    lengths = method.draft_lengths
    if online:
        depths = method.online_draft_depths or depths
        lengths = method.online_draft_lengths or lengths
    thresholds = method.stop.thresholds if method.stop is not None else [None]
    specs = []
    for depth in depths:
        for length in lengths:
            for threshold in thresholds:
                stop = None if threshold is None else DraftStop(
                    stop_measure, float(threshold), method.stop.measure)  # type: ignore[union-attr]
                spec = SelfSpeculation(int(depth), int(length), stop, method.stop_at_eos)
                try:
                    spec.check(num_layers)
                except ExitbenchError as exc:
                    raise ExitbenchError(f"method {method.display_name!r}: {exc}") from exc
                specs.append(spec)
    return specs


def _stop_measure(method: MethodConfig, inputs: SweepInputs, hidden: HiddenStateLoader,
                  fit_cache_dir: Path | None, seed: int) -> Measure | None:
    config = stop_measure_config(method)
    if config is None:
        return None
    return fitted_measure(config, inputs, hidden, fit_cache_dir=fit_cache_dir, seed=seed)


@dataclass(frozen=True)
class PricedSpeculation:
    """One replayed point priced on one profile and batch size."""

    seconds_high: float
    """Seconds at the most drafting the trace allows (the row's figure)."""
    seconds_low: float
    full_depth_seconds: float
    breakdown: dict[str, float]

    @property
    def speedup(self) -> float:
        return self.full_depth_seconds / self.seconds_high

    @property
    def speedup_high(self) -> float:
        return self.full_depth_seconds / self.seconds_low


def price_speculation(costs, dims, example_index_cycles: np.ndarray, position: np.ndarray,
                      drafted_low: np.ndarray, drafted_high: np.ndarray, spec: SelfSpeculation,
                      token_example_index: np.ndarray, token_position: np.ndarray,
                      source_len: np.ndarray, batch_size: int) -> PricedSpeculation:
    """Seconds of a decode's cycles (both draft-count bounds) and of full depth over the
    same tokens."""
    stop_check = spec.stop.measure.check_cost(dims) if spec.stop is not None else None
    stop_name = spec.stop.measure_name if spec.stop is not None else None
    num_tokens = int(token_example_index.shape[0])

    def priced(drafted: np.ndarray):
        return speculative_cost(costs, dims, spec.draft_depth, example_index_cycles, position,
                                drafted, source_len, batch_size, num_tokens, stop_check,
                                stop_name)

    slow = priced(drafted_high)
    fast = slow if np.array_equal(drafted_low, drafted_high) else priced(drafted_low)
    full = full_depth_seconds(costs, dims, token_example_index, token_position, source_len,
                              batch_size)
    return PricedSpeculation(
        seconds_high=slow.seconds, seconds_low=fast.seconds, full_depth_seconds=full,
        breakdown={"draft_seconds": slow.draft_seconds, "verify_seconds": slow.verify_seconds,
                   "rollback_seconds": slow.rollback_seconds,
                   "prefill_seconds": slow.prefill_seconds, "draft_steps": slow.draft_steps,
                   "batch_cycles": slow.num_cycles})


def _row(*, task: str, split: str, model, spec: SelfSpeculation, label: str, profile,
         batch_size: int, mode: str, metric: str, quality: dict, full_quality: float,
         num_layers: int, agreement: float, tokens_per_s: float, full_tokens_per_s: float,
         speedup: float, num_examples: int, num_tokens: int, traces_hash: str,
         stats: SpeculativeStatistics, extra: dict[str, Any]) -> ResultRow:
    """A self-speculative result row: every token is the last layer's (verified)."""
    from suite.training import model_label

    return ResultRow(
        task=task, split=split, model=model.name, model_label=model_label(model),
        measure=label, measure_options=options_json(spec), deployable=True,
        threshold=float(spec.stop.threshold) if spec.stop is not None else 0.0, min_layer=0,
        profile=profile.name, profile_kind=profile.kind, batch_size=int(batch_size), mode=mode,
        metric=metric, quality=float(quality["scores"][metric]),
        quality_full_depth=float(full_quality),
        scores={k: float(v) for k, v in quality["scores"].items()},
        mean_layers_used=float(num_layers), num_layers=num_layers, token_agreement=agreement,
        exit_histogram=[0.0] * (num_layers - 1) + [1.0], tokens_per_s=float(tokens_per_s),
        full_depth_tokens_per_s=float(full_tokens_per_s), speedup=float(speedup),
        num_examples=num_examples, num_tokens=num_tokens, traces_hash=traces_hash,
        measure_code_hash=method_code_hash(), method=METHOD,
        method_options=options_json(spec), mean_accepted_tokens=stats.mean_accepted_tokens,
        extra={"statistics": stats.to_dict(), **extra})


def replay_point(opened: OpenedTraces, spec: SelfSpeculation, max_new_tokens: int,
                 stop_score: np.ndarray | None) -> SpeculativeReplay:
    """One point's cycles, checked to emit exactly the recorded tokens."""
    result = replay_speculation(opened.traces, spec, max_new_tokens, stop_score,
                                opened.info.eos_token_id)
    emitted_tokens(opened.traces, result)
    return result


# -- replay --------------------------------------------------------------------------------------
@dataclass
class MethodSweepReport:
    rows: list[ResultRow]
    seconds: float
    points: int


def sweep_method(inputs: SweepInputs, method: MethodConfig, profiles: list[str],
                 batch_sizes: list[int], *, score_cache=None, fit_cache_dir: Path | None = None,
                 seed: int = 0) -> MethodSweepReport:
    """Replay and price every point of ``method`` on one (task, model)'s traces."""
    started = time.perf_counter()
    opened = open_traces(inputs, profiles, score_cache=score_cache)
    traces, info = opened.traces, opened.info
    manifest = TraceStore(inputs.trace_dir).read_manifest()
    max_new_tokens = int(manifest.generation.get("max_new_tokens")
                         or inputs.task.limits.max_new_tokens)
    hidden = HiddenStateLoader(inputs.model.path, inputs.data_dir)
    stop_measure = _stop_measure(method, inputs, hidden, fit_cache_dir, seed)
    scored = (hidden(inputs.trace_dir) if stop_measure is not None
              and "hidden" in stop_measure.reads else traces)
    specs = method_specs(method, traces.num_layers, stop_measure)
    stop_code = code_hash(type(stop_measure)) if stop_measure is not None else None
    rows: list[ResultRow] = []
    scores_by_layer: dict[int, np.ndarray] = {}
    for spec in specs:
        score = None
        if spec.stop is not None:
            if spec.exit_layer not in scores_by_layer:
                scores_by_layer[spec.exit_layer] = stop_scores(spec.stop, scored, spec.exit_layer)
            score = scores_by_layer[spec.exit_layer]
        result = replay_point(opened, spec, max_new_tokens, score)
        stats = replay_statistics(result)
        for profile in opened.profiles:
            for batch_size in batch_sizes:
                priced = price_speculation(
                    opened.costs[profile.name], info.dims, result.example_index,
                    result.position, result.drafted_low, result.drafted_high, spec,
                    opened.example_index, traces.position, opened.source_len, batch_size)
                tokens_per_s = traces.num_tokens / priced.seconds_high
                rows.append(_row(
                    task=inputs.task.name, split=inputs.split, model=inputs.model, spec=spec,
                    label=method.display_name, profile=profile, batch_size=batch_size,
                    mode="replay", metric=opened.primary, quality=opened.full,
                    full_quality=opened.full["scores"][opened.primary],
                    num_layers=traces.num_layers, agreement=1.0, tokens_per_s=tokens_per_s,
                    full_tokens_per_s=traces.num_tokens / priced.full_depth_seconds,
                    speedup=priced.speedup, num_examples=len(opened.example_ids),
                    num_tokens=traces.num_tokens, traces_hash=opened.traces_hash, stats=stats,
                    extra={"model_dims": info.dims.__dict__,
                           "signature": opened.full.get("signature"),
                           "exact": result.exact, "cycles": result.num_cycles,
                           "speedup_bounds": [priced.speedup, priced.speedup_high],
                           "tokens_per_s_bounds": [tokens_per_s,
                                                   traces.num_tokens / priced.seconds_low],
                           "cost": priced.breakdown, "stop_measure_code_hash": stop_code}))
    return MethodSweepReport(rows=rows, seconds=time.perf_counter() - started,
                             points=len(specs))


def method_part_path(output_dir: str | Path, task: str, model: str, method: str) -> Path:
    return Path(output_dir) / "results" / "methods" / task / model / f"{file_stem(method)}.json"


def _method_payload(config: SuiteConfig, task: TaskConfig, model, method: MethodConfig
                     ) -> dict[str, Any]:
    """What a method's stored rows depend on besides the traces."""
    from suite.profiles import PROFILES
    from suite.runner import trace_dir

    payload: dict[str, Any] = {
        "method": method.model_dump(mode="json"), "code": method_code_hash(),
        "profiles": {name: PROFILES.get(name).model_dump(mode="json", exclude={"path"})
                     for name in config.profiles},
        "dtype": config.dtype, "seed": config.seed, "task": task.model_dump(mode="json"),
        "suite": __version__}
    if method.stop is not None:
        measure_cls = get_measure(method.stop.measure)
        fit = trace_dir(config.output_dir, task.name, model.name, "fit") / "manifest.json"
        payload.update(stop_code=code_hash(measure_cls),
                       fit=sha256_file(fit) if measure_cls.needs_fit and fit.is_file() else "")
    return payload


def method_part_key(config: SuiteConfig, task: TaskConfig, model, method: MethodConfig) -> str:
    from suite.runner import trace_dir

    manifest = trace_dir(config.output_dir, task.name, model.name) / "manifest.json"
    return content_key({**_method_payload(config, task, model, method),
                        "traces": sha256_file(manifest) if manifest.is_file() else "",
                        "batch_sizes": config.batch_sizes})


def run_method_stage(config: SuiteConfig, *, progress: bool = True):
    """Replay every method point not stored yet, per (task, model, method entry), in this
    process (no model runs unless a stopping measure needs hidden states or fitting); a
    failing entry is reported and the others go on."""
    from suite.replay import ScoreCache
    from suite.runner import StageReport, sweep_inputs

    report = StageReport("methods")
    started = time.perf_counter()
    cache_path = Path(config.output_dir) / "results" / "score_cache.json"
    cache = ScoreCache(cache_path)
    try:
        for task in config.tasks:
            for model in config.models:
                for method in config.methods:
                    path = method_part_path(config.output_dir, task.name, model.name,
                                            method.display_name)
                    key = method_part_key(config, task, model, method)
                    if path.is_file() and json.loads(path.read_text("utf-8")).get("key") == key:
                        report.skipped += 1
                        continue
                    try:
                        result = sweep_method(
                            sweep_inputs(config, task, model), method, config.profiles,
                            config.batch_sizes, score_cache=cache,
                            fit_cache_dir=Path(config.output_dir) / "measures", seed=config.seed)
                    except ExitbenchError as exc:
                        report.failed += 1
                        report.notes.append(f"{task.name}/{model.name}/{method.display_name} "
                                            f"failed: {exc}")
                        continue
                    atomic_write_json(path, {"key": key,
                                             "rows": [r.to_dict() for r in result.rows],
                                             "report": {"seconds": result.seconds,
                                                        "points": result.points}})
                    report.done += 1
                    if progress:
                        print(f"  methods {task.name}/{model.name}/{method.display_name}: "
                              f"{result.points} points in {result.seconds:.1f} s", flush=True)
    finally:
        cache.save()
    report.seconds = time.perf_counter() - started
    return report


def _rows(path: Path) -> list[ResultRow]:
    names = {f.name for f in dataclasses.fields(ResultRow)}
    return [ResultRow(**{k: v for k, v in row.items() if k in names})
            for row in json.loads(path.read_text("utf-8"))["rows"]]


def _parts(config: SuiteConfig, where: Callable[[str, str, str], Path]
           ) -> Iterator[tuple[str, str, Path]]:
    for task in config.tasks:
        for model in config.models:
            for method in config.methods:
                path = where(task.name, model.name, method.display_name)
                if path.is_file():
                    yield task.name, model.name, path


def read_method_rows(config: SuiteConfig) -> list[ResultRow]:
    """Every stored self-speculative row of this config, replayed then online."""
    replayed = [row for _, _, path in _parts(config, lambda t, m, n: method_part_path(
        config.output_dir, t, m, n)) for row in _rows(path)]
    online = [row for _, _, path in _parts(config, lambda t, m, n: online_method_part_path(
        config.output_dir, t, m, n)) for row in _rows(path)]
    return replayed + online


# -- online --------------------------------------------------------------------------------------
def online_method_part_path(output_dir: str | Path, task: str, model: str, method: str) -> Path:
    return Path(output_dir) / "online" / task / model / "methods" / f"{file_stem(method)}.json"


@dataclass(frozen=True)
class SpeculativeTiming:
    """Full-depth and self-speculative decoding of the same examples, side by side."""

    full: Any
    """:class:`suite.online.OnlineRun` of the first repeat."""
    speculative: Any
    """:class:`suite.speculative.online.SpeculativeRun` of the first repeat."""
    full_tokens_per_s: float
    """Median over repeats."""
    speculative_tokens_per_s: float
    speedup: float
    """Median over repeats of each repeat's speculative / full-depth tokens/s (paired)."""
    speedups: list[float]


def timed_speculation(ctx, batch_size: int, spec: SelfSpeculation,
                      repeats: int) -> SpeculativeTiming:
    """``repeats`` paired runs (:func:`suite.speculative.online.decode_paired_speculative`)."""
    from suite.speculative.online import decode_paired_speculative

    pairs = [decode_paired_speculative(ctx.adapter, ctx.sources, ctx.example_ids, batch_size,
                                       ctx.task.limits.max_new_tokens, spec)
             for _ in range(repeats)]
    full_tps = [full.tokens_per_s for full, _ in pairs]
    spec_tps = [run.run.tokens_per_s for _, run in pairs]
    ratios = [float(s / f) for s, f in zip(spec_tps, full_tps)]
    return SpeculativeTiming(full=pairs[0][0], speculative=pairs[0][1],
                             full_tokens_per_s=float(np.median(full_tps)),
                             speculative_tokens_per_s=float(np.median(spec_tps)),
                             speedup=float(np.median(ratios)), speedups=ratios)


def compare_cycles(online, replayed: SpeculativeReplay) -> dict[str, Any]:
    """Online cycles (a :class:`suite.speculative.online.CycleLog` whose rows are example
    indices) against replay's, example by example: the accepted counts must be equal cycle
    for cycle, and online draft counts lie within replay's bounds (checked on the examples
    whose cycles line up)."""
    num_examples = replayed.num_examples
    order = np.argsort(online.row, kind="stable")  # (example, cycle) order
    rows, accepted, drafted = online.row[order], online.accepted[order], online.drafted[order]
    counts = np.bincount(rows, minlength=num_examples)
    aligned = counts == replayed.cycles_per_example()  # [E]
    on_aligned = aligned[rows]
    replay_on_aligned = aligned[replayed.example_index]
    unequal = np.bincount(rows[on_aligned], accepted[on_aligned]
                          != replayed.accepted[replay_on_aligned], minlength=num_examples)
    equal = aligned & (unequal == 0)
    drafted = drafted[on_aligned]
    inside = (drafted >= replayed.drafted_low[replay_on_aligned]) \
        & (drafted <= replayed.drafted_high[replay_on_aligned])
    return {"accepted_equal_examples": float(equal.mean()) if num_examples else 1.0,
            "accepted_equal": bool(equal.all()),
            "drafted_within_bounds": float(inside.mean()) if inside.size else 1.0,
            "replay_exact": replayed.exact}


def method_online(ctx, method: MethodConfig, *, progress: Callable[[str], None] | None = None
                  ) -> dict[str, Any]:
    """Decode, time, score and compare every online point of ``method`` at every online
    batch size; returns the stored part (rows and fidelity entries)."""
    from suite.cost import example_index_from_ids, operation_costs
    from suite.fidelity import (
        _agreement,
        _eval_dir,
        _machine,
        cut_at_eos,
        per_example,
        warm_up,
    )
    from suite.fidelity import divergence as token_divergence
    from suite.sweep import model_info

    config, adapter = ctx.config, ctx.adapter
    num_layers = adapter.num_layers
    label = method.display_name
    inputs = ctx.sweep_inputs(_eval_dir(config, ctx))
    hidden = HiddenStateLoader(ctx.model_config.path, config.data_dir)
    stop_measure = _stop_measure(method, inputs, hidden, Path(config.output_dir) / "measures",
                                 config.seed)
    specs = method_specs(method, num_layers, stop_measure, online=True)
    info = model_info(ctx.model_config.path)
    eos = adapter.eos_token_id
    max_new_tokens = ctx.task.limits.max_new_tokens
    costs = (operation_costs(ctx.profile, info.dims, config.dtype, info.gated_ffn,
                             info.num_encoder_layers) if ctx.profile is not None else None)
    source_len = np.array([len(s) for s in ctx.sources])
    replays: dict[SelfSpeculation, SpeculativeReplay] = {}
    if ctx.traces is not None:
        scored = (hidden(inputs.trace_dir) if stop_measure is not None
                  and "hidden" in stop_measure.reads else ctx.traces)
        for spec in specs:
            score = (stop_scores(spec.stop, scored, spec.exit_layer)
                     if spec.stop is not None else None)
            replays[spec] = replay_speculation(ctx.traces, spec, max_new_tokens, score, eos)
    rows, entries = [], []
    for batch_size in config.online.batch_sizes:
        warm_up(ctx, batch_size)
        for spec in specs:
            if progress:
                progress(f"{label} {spec.label()} batch {batch_size}")
            timing = timed_speculation(ctx, batch_size, spec, config.online.repeats)
            run, cycles = timing.speculative.run, timing.speculative.cycles
            full_sequences = cut_at_eos(per_example(timing.full.traces,
                                                    timing.full.traces.final_id), eos)
            online_sequences = cut_at_eos(per_example(run.traces, run.traces.final_id), eos)
            full_quality = ctx.quality(full_sequences)
            quality = ctx.quality(online_sequences)
            primary = quality["primary"]
            stats = cycle_statistics(cycles.accepted, cycles.emitted, cycles.drafted,
                                     cycles.drafted, len(ctx.examples), spec.draft_length)
            gap = token_divergence(online_sequences, full_sequences)
            entry: dict[str, Any] = {
                "measure": f"{label} ({spec.label()})", "method": METHOD,
                "method_options": spec.options(), "point": spec.label(),
                "threshold": float(spec.stop.threshold) if spec.stop is not None else 0.0,
                "batch_size": batch_size, "metric": primary,
                "online_quality": quality["scores"][primary],
                "full_depth_quality": full_quality["scores"][primary],
                "online_tokens_per_s": timing.speculative_tokens_per_s,
                "full_depth_tokens_per_s": timing.full_tokens_per_s,
                "realised_speedup": timing.speedup, "realised_speedups": timing.speedups,
                "online_tokens": run.num_tokens, "online_mean_layers": float(num_layers),
                "online_statistics": stats.to_dict(),
                "lossless_token_divergence": gap.token_rate}
            if costs is not None:
                online_priced = price_speculation(
                    costs, info.dims, cycles.row, cycles.position, cycles.drafted,
                    cycles.drafted, spec, example_index_from_ids(run.traces.example_id),
                    run.traces.position, source_len, batch_size)
                full_traces = timing.full.traces
                full_predicted = full_traces.num_tokens / full_depth_seconds(
                    costs, info.dims, example_index_from_ids(full_traces.example_id),
                    full_traces.position, source_len, batch_size)
                online_predicted_tps = run.num_tokens / online_priced.seconds_high
                entry.update(profile=ctx.profile.name,
                             predicted_speedup_online_exits=online_predicted_tps / full_predicted,
                             predicted_tokens_per_s_online_exits=online_predicted_tps,
                             realised_over_predicted_online_exits=timing.speedup
                             / (online_predicted_tps / full_predicted),
                             throughput_error_online_exits=online_predicted_tps
                             / timing.speculative_tokens_per_s - 1.0)
            replayed = replays.get(spec)
            if replayed is not None:
                replay_stats = replay_statistics(replayed)
                replay_sequences = cut_at_eos(per_example(ctx.traces, ctx.traces.final_id), eos)
                replay_quality = ctx.quality(replay_sequences)
                entry.update(replay_quality=replay_quality["scores"][primary],
                             quality_difference=entry["online_quality"]
                             - replay_quality["scores"][primary],
                             replay_mean_layers=float(num_layers),
                             replay_statistics=replay_stats.to_dict(),
                             divergence=token_divergence(online_sequences,
                                                         replay_sequences).to_dict(),
                             cycles=compare_cycles(cycles, replayed))
                if costs is not None:
                    priced = price_speculation(
                        costs, info.dims, replayed.example_index, replayed.position,
                        replayed.drafted_low, replayed.drafted_high, spec,
                        example_index_from_ids(ctx.traces.example_id), ctx.traces.position,
                        source_len, batch_size)
                    predicted_tps = ctx.traces.num_tokens / priced.seconds_high
                    entry.update(predicted_tokens_per_s=predicted_tps,
                                 predicted_speedup=priced.speedup,
                                 predicted_speedup_bounds=[priced.speedup, priced.speedup_high],
                                 predicted_full_depth_tokens_per_s=ctx.traces.num_tokens
                                 / priced.full_depth_seconds,
                                 throughput_error=predicted_tps
                                 / timing.speculative_tokens_per_s - 1.0,
                                 realised_over_predicted=timing.speedup / priced.speedup)
            entries.append(entry)
            profile = ctx.profile if ctx.profile is not None else _UnpricedProfile(
                f"online-{config.device}")
            rows.append(_row(
                task=ctx.task.name, split=ctx.task_config.split, model=ctx.model_config,
                spec=spec, label=label, profile=profile, batch_size=batch_size, mode="online",
                metric=primary, quality=quality,
                full_quality=full_quality["scores"][primary], num_layers=num_layers,
                agreement=_agreement(online_sequences, full_sequences),
                tokens_per_s=timing.speculative_tokens_per_s,
                full_tokens_per_s=timing.full_tokens_per_s, speedup=timing.speedup,
                num_examples=len(ctx.examples), num_tokens=run.num_tokens,
                traces_hash=ctx.traces_hash, stats=stats,
                extra={"model_dims": info.dims.__dict__, "device": config.device,
                       "measured_on": _machine(), "repeats": config.online.repeats,
                       "fidelity": {k: v for k, v in entry.items()
                                    if k not in ("measure", "threshold", "batch_size")}}))
    return {"rows": [r.to_dict() for r in rows], "fidelity": entries}


@dataclass(frozen=True)
class _UnpricedProfile:
    name: str
    kind: str = "measured"


def online_method_key(ctx, method: MethodConfig) -> str:
    import torch

    return content_key({
        **_method_payload(ctx.config, ctx.task_config, ctx.model_config, method),
        "model": ctx.model_hash, "traces": ctx.traces_hash, "examples": ctx.example_ids,
        "online": ctx.config.online.model_dump(mode="json"),
        "profile": (ctx.profile.model_dump(mode="json", exclude={"path"})
                    if ctx.profile is not None else None),
        "device": ctx.config.device, "threads": torch.get_num_threads()})


def run_methods_online(config: SuiteConfig, report, *, progress: bool = True) -> None:
    """Decode every (task, model, method entry) online, reusing stored parts; adds to the
    ``report`` of :func:`suite.fidelity.run_online` (one context per (task, model))."""
    import torch

    from suite.fidelity import open_context, store_online_part

    if not config.methods or not config.models:
        return
    if config.online.threads is not None:
        torch.set_num_threads(config.online.threads)
    started = time.perf_counter()
    for task in config.tasks:
        for model in config.models:
            opened: list = []  # the (task, model)'s context, opened once when first needed

            def context(task=task, model=model, opened=opened):
                if not opened:
                    opened.append(open_context(config, task, model))
                return opened[0]

            for method in config.methods:
                path = online_method_part_path(config.output_dir, task.name, model.name,
                                               method.display_name)
                store_online_part(
                    report, path, f"{task.name}/{model.name}/{method.display_name}",
                    lambda method=method: online_method_key(context(), method),
                    lambda say, method=method: method_online(context(), method, progress=say),
                    progress=progress)
    report.seconds += time.perf_counter() - started


def method_fidelity_entries(config: SuiteConfig) -> list[dict[str, Any]]:
    """The stored online entries of this config's methods, with task and model."""
    return [{"task": task, "model": model, **entry}
            for task, model, path in _parts(config, lambda t, m, n: online_method_part_path(
                config.output_dir, t, m, n))
            for entry in json.loads(path.read_text("utf-8"))["fidelity"]]


def _fmt(value, pattern: str = "{:.2f}") -> str:
    return "-" if value is None else pattern.format(value)


def _speedup_cell(row: ResultRow) -> str:
    low, high = row.extra.get("speedup_bounds", [row.speedup, row.speedup])
    return f"{low:.2f}" if abs(high - low) < 1e-9 else f"{low:.2f}-{high:.2f}"


def render_replay_markdown(rows: list[ResultRow], profile: str | None) -> str:
    """Per (task, model): every replayed self-speculative point on ``profile`` at each batch
    size (mean accepted tokens, acceptance rate, predicted speedup; a range where replay
    gives bounds) beside the best deployable exit measure's speedup within 1% quality."""
    from suite.fronts import MAX_RELATIVE_LOSS

    replayed = [r for r in rows if r.mode == "replay" and (profile is None
                                                           or r.profile == profile)]
    lines: list[str] = []
    for task, model in sorted({(r.task, r.model) for r in replayed if r.method == METHOD}):
        panel = [r for r in replayed if r.task == task and r.model == model]
        profile_name = panel[0].profile if profile is None else profile
        panel = [r for r in panel if r.profile == profile_name]
        batches = sorted({r.batch_size for r in panel})
        points: dict[tuple, dict[int, ResultRow]] = {}
        for row in panel:
            if row.method == METHOD:
                points.setdefault((row.measure, row.method_options), {})[row.batch_size] = row
        first = panel[0]
        lines += [f"### {task} / {model} on {profile_name} (replayed)", "",
                  f"{first.model_label}. Full depth: {first.metric} "
                  f"{first.quality_full_depth:.2f} (every self-speculative point's quality).",
                  "", "| series | point | mean accepted tokens | acceptance rate | "
                  + " | ".join(f"speedup, batch {b}" for b in batches) + " |",
                  "|" + "---|" * (4 + len(batches))]
        for (series, options), by_batch in sorted(points.items(), key=lambda item: (
                item[0][0], sorted(json.loads(item[0][1]).items()))):
            row = next(iter(by_batch.values()))
            stats = row.extra.get("statistics", {})
            low, high = stats.get("acceptance_rate_low"), stats.get("acceptance_rate_high")
            rate = _fmt(low) if low == high else f"{_fmt(low)}-{_fmt(high)}"
            lines.append("| " + " | ".join(
                [series, options_label(json.loads(options)), _fmt(row.mean_accepted_tokens),
                 rate]
                + [_speedup_cell(by_batch[b]) if b in by_batch else "-" for b in batches])
                + " |")
        best = []
        for batch in batches:
            floor = lambda r: r.quality_full_depth - MAX_RELATIVE_LOSS * abs(  # noqa: E731
                r.quality_full_depth) - 1e-12
            exits = [r for r in panel if r.batch_size == batch and r.method != METHOD
                     and r.deployable and r.quality >= floor(r)]
            top = max(exits, key=lambda r: r.speedup, default=None)
            best.append(f"{top.speedup:.2f} ({top.measure} {top.threshold:g})" if top else "none")
        lines += ["| best exit measure within 1% | | | | " + " | ".join(best) + " |", ""]
    if not lines:
        return ""
    return "\n".join(["## Self-speculative decoding, replayed", "",
                      "Predicted speedups over full depth from the cost model on the replayed "
                      "cycles (a range: the trace leaves a stopping rule's draft count open "
                      "past the first rejected draft). Beside them, the best deployable exit "
                      "measure whose quality is within 1% of full depth.", "", *lines])


def render_method_markdown(entries: list[dict[str, Any]],
                           config: SuiteConfig | None = None) -> str:
    """The fidelity report's self-speculation sections: with ``config``, every replayed
    point (:func:`render_replay_markdown`, on the online profile); then online cycles beside
    replay's."""
    text = ""
    if config is not None and config.methods:
        from suite.runner import collect_results

        text = render_replay_markdown(collect_results(config), config.online.profile or (
            config.profiles[0] if config.profiles else None))
    method_entries = [e for e in entries if e.get("method") == METHOD]
    if not method_entries:
        return text
    fmt = _fmt

    lines = [text, "## Self-speculative decoding: online beside replay", "",
             "Lossless by construction: online outputs are compared with the full-depth run's "
             "(token divergence should be 0). Accepted drafts per cycle online must equal "
             "replay's exactly; drafted counts must lie inside replay's bounds (exact without "
             "a stopping rule).", "",
             "| task | model | point | batch | mean accepted tokens online | replay | "
             "accepted equal (examples) | drafted within bounds | lossless divergence | "
             "speedup realised | predicted (replay) | predicted (online cycles) | "
             "realised/predicted (replay) | realised/predicted (online cycles) |",
             "|" + "---|" * 14]
    for e in method_entries:
        cycles = e.get("cycles", {})
        online_stats = e.get("online_statistics", {})
        replay_stats = e.get("replay_statistics", {})
        lines.append("| " + " | ".join([
            e["task"], e["model"], e.get("point", ""), str(e["batch_size"]),
            fmt(online_stats.get("mean_accepted_tokens")),
            fmt(replay_stats.get("mean_accepted_tokens")),
            fmt(cycles.get("accepted_equal_examples"), "{:.0%}"),
            fmt(cycles.get("drafted_within_bounds"), "{:.0%}"),
            fmt(e.get("lossless_token_divergence"), "{:.1%}"),
            fmt(e.get("realised_speedup")), fmt(e.get("predicted_speedup")),
            fmt(e.get("predicted_speedup_online_exits")),
            fmt(e.get("realised_over_predicted"), "{:.0%}"),
            fmt(e.get("realised_over_predicted_online_exits"), "{:.0%}")]) + " |")
    return "\n".join(lines + [""])
