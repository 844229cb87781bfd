"""The suite runner: the whole pipeline of a config as Ray tasks and actors.

Stages (each resumable; a rerun of a finished run does no work):

1. **backbones** (driver): train the tokenizer and the models a config asks the suite to
   make (``models[].train``), unless their folders already hold finished ones.
2. **record**: every (task, model) split is cut into shards of examples; each shard is
   recorded by a ``RecordWorker`` actor, which loads the model once and records many
   shards. Workers ask for a GPU when the device is CUDA, CPUs otherwise. The driver
   writes every returned shard into the trace store (atomically, with its checksum in
   the manifest), so results need no disk shared between nodes. A shard already in the
   manifest is skipped; a worker that dies has its shard retried on a fresh worker; a
   shard that keeps failing stops the run with a report naming it.
3. **replay** (fit learned measures, then replay, score and price): one Ray task per
   (task, model) runs every measure not yet done (sharing its score cache and hidden
   states); each measure's rows are kept as a part file keyed by everything they depend
   on, so a rerun skips finished parts.
4. **results**: ``results/results.{parquet,json}`` and ``results/fronts.json``.
5. **leaderboard**: the static site in ``<output_dir>/site``.

Ray runs in-process on 127.0.0.1 by default; ``ray.address`` (``auto`` or ``HOST:PORT``)
joins an existing cluster. ``run_manifest.json`` ties together the config, the versions
and every shard's hash.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite import __version__
from suite.atomic import atomic_write_json
from suite.config import MeasureConfig, ModelConfig, SuiteConfig, TaskConfig
from suite.errors import ExitbenchError
from suite.keys import content_key, file_stem

logger = logging.getLogger(__name__)


class ShardFailedError(ExitbenchError):
    """A shard failed on every attempt; the run stops and names it."""


# -- Ray ------------------------------------------------------------------------------------------
def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start Ray in-process bound to 127.0.0.1 (``address=None``) or join a cluster.
    Returns True when this call started or joined Ray (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    # keep every node on loopback: otherwise Ray picks the machine's interface address
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is None:
        # "local": a new instance of our own; without it Ray joins any instance another
        # process on this machine started (/tmp/ray/ray_current_cluster)
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1",
                 include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


def _record_worker_class():
    import ray

    @ray.remote
    class RecordWorker:
        """Records shards; holds the loaded model across shards (one load per worker)."""

        def __init__(self, threads: int):
            import torch

            torch.set_num_threads(threads)

        def pid(self) -> int:
            return os.getpid()

        def record(self, request):
            from suite.record import record_shard

            result = record_shard(request)
            return result, ray.get_runtime_context().get_node_id()

    return RecordWorker


# -- stage reports ---------------------------------------------------------------------------------
@dataclass
class StageReport:
    name: str
    done: int = 0
    skipped: int = 0
    failed: int = 0
    retried: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.name:<12} done {self.done:>4}  skipped {self.skipped:>4}  failed "
                f"{self.failed:>3}  retried {self.retried:>3}  {self.seconds:8.1f} s"
                + (f"  ({'; '.join(self.notes)})" if self.notes else ""))


@dataclass
class RunSummary:
    output_dir: Path
    stages: list[StageReport]
    site_index: Path | None = None
    shard_nodes: dict[str, str] = field(default_factory=dict)
    """Shard file -> node id of the worker that recorded it (this run's new shards)."""
    backbones: list[str] = field(default_factory=list)
    """One line per model: its name and what it is."""

    def format(self) -> str:
        lines = [f"run {self.output_dir}"] + [f"  backbone {b}" for b in self.backbones] \
            + ["  " + s.line() for s in self.stages]
        if self.site_index:
            lines.append(f"  leaderboard: open {self.site_index}")
        return "\n".join(lines)


# -- the record plan -------------------------------------------------------------------------------
def uses_fitting(config: SuiteConfig) -> bool:
    from suite.measures import get_measure

    return any(get_measure(m.name).needs_fit for m in config.measures)


def trace_dir(output_dir: str | Path, task: str, model: str, role: str = "eval",
              kind: str = "generated") -> Path:
    """``<out>/traces/<task>/<model>/<kind>`` for the evaluated split; learned measures'
    fit split lives in ``<out>/traces/<task>/<model>/fit/<kind>``."""
    base = Path(output_dir) / "traces" / task / model
    return base / kind if role == "eval" else base / "fit" / kind


@dataclass(frozen=True)
class RecordJob:
    task: TaskConfig
    model: ModelConfig
    role: str
    directory: Path


def record_jobs(config: SuiteConfig) -> list[RecordJob]:
    jobs = []
    fitting = uses_fitting(config)
    for task in config.tasks:
        for model in config.models:
            jobs.append(RecordJob(task, model, "eval",
                                  trace_dir(config.output_dir, task.name, model.name)))
            if fitting and task.fit_split:
                fit_task = task.model_copy(update={"split": task.fit_split,
                                                   "limit": task.fit_limit})
                jobs.append(RecordJob(fit_task, model, "fit", trace_dir(
                    config.output_dir, task.name, model.name, "fit")))
    return jobs


def run_record_stage(config: SuiteConfig, *, progress: bool = True,
                     summary: RunSummary | None = None) -> StageReport:
    """Record every job's missing shards on Ray actors; the driver writes them."""
    import ray
    from tqdm.auto import tqdm

    from suite.record import plan_record

    report = StageReport("record")
    started = time.perf_counter()
    work: deque[tuple[Any, Any, Any, int]] = deque()  # (plan, request, key, attempts)
    for job in record_jobs(config):
        plan = plan_record(job.task, job.model, "generated", job.directory,
                           data_dir=config.data_dir, device=config.device, dtype=config.dtype,
                           seed=config.seed, batch_size=config.record_batch_size,
                           shard_size=config.shard_size)
        report.skipped += plan.skipped
        for request, key in plan.pending:
            work.append((plan, request, key, 0))
    if not work:
        report.seconds = time.perf_counter() - started
        return report

    worker_class = _record_worker_class()
    on_gpu = config.device.startswith("cuda")
    threads = config.ray.cpus_per_worker

    def new_worker():
        options = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": threads}
        return worker_class.options(**options, max_concurrency=1).remote(threads)

    workers = [new_worker() for _ in range(min(config.ray.record_workers, len(work)))]
    idle = deque(workers)
    in_flight: dict[Any, tuple[Any, tuple]] = {}
    bar = tqdm(total=len(work), unit="shard", desc="record", disable=not progress)
    try:
        while work or in_flight:
            while work and idle:
                worker = idle.popleft()
                item = work.popleft()
                in_flight[worker.record.remote(item[1])] = (worker, item)
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=600)
            if not ready:
                raise ShardFailedError("no shard finished in 10 minutes; workers may be stuck "
                                       "(check `ray status`)")
            for ref in ready:
                worker, (plan, request, key, attempts) = in_flight.pop(ref)
                try:
                    result, node_id = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.RayTaskError) as exc:
                    crashed = not isinstance(exc, ray.exceptions.RayTaskError) or \
                        isinstance(exc.cause, ray.exceptions.RayActorError)
                    if crashed:  # the worker is gone: replace it
                        ray.kill(worker, no_restart=True)
                        worker = new_worker()
                    if attempts >= config.ray.max_retries:
                        report.failed += 1
                        raise ShardFailedError(
                            f"shard {request.task}/{request.split} examples "
                            f"[{request.first_example}, {request.end_example}) of model "
                            f"{request.model_path} failed {attempts + 1} time(s); last error: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                            f"Finished shards are kept; fix the cause and rerun to resume"
                        ) from exc
                    report.retried += 1
                    logger.warning("shard %s [%d, %d) failed (%s); retrying", request.task,
                                   request.first_example, request.end_example,
                                   type(exc).__name__)
                    work.appendleft((plan, request, key, attempts + 1))
                    idle.append(worker)
                    continue
                info = plan.store.add_shard(plan.manifest, result.traces, key=key,
                                            first_example=result.first_example,
                                            num_examples=result.num_examples)
                if summary is not None:
                    summary.shard_nodes[str(plan.store.root / info.file)] = node_id
                report.done += 1
                bar.update(1)
                idle.append(worker)
    finally:
        bar.close()
        for ref in in_flight:
            ray.cancel(ref, force=True)
        for worker in workers + list(idle):
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
    report.seconds = time.perf_counter() - started
    return report


# -- the replay stage -------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    from suite.traces import sha256_file

    return sha256_file(path) if path.is_file() else ""


def part_key(config: SuiteConfig, task: TaskConfig, model: ModelConfig,
             measure: MeasureConfig) -> str:
    """Hash of everything a measure's rows on one (task, model) depend on."""
    from suite.measures import code_hash, get_measure
    from suite.profiles import PROFILES

    eval_dir = trace_dir(config.output_dir, task.name, model.name)
    fit_dir = trace_dir(config.output_dir, task.name, model.name, "fit")
    # the profiles' figures price the rows; where their files lie does not
    profiles = {name: PROFILES.get(name).model_dump(mode="json", exclude={"path"})
                for name in config.profiles}
    payload = {
        "traces": _file_sha256(eval_dir / "manifest.json"),
        "fit": _file_sha256(fit_dir / "manifest.json") if get_measure(measure.name).needs_fit
        else "",
        "measure": measure.model_dump(mode="json"),
        "code": code_hash(get_measure(measure.name)),
        "profiles": profiles,
        "batch_sizes": config.batch_sizes, "dtype": config.dtype, "seed": config.seed,
        "task": task.model_dump(mode="json"), "suite": __version__,
    }
    return content_key(payload)


def _part_path(output_dir: str | Path, task: str, model: str, measure: str) -> Path:
    return Path(output_dir) / "results" / "parts" / task / model / f"{file_stem(measure)}.json"


def replay_group(config: SuiteConfig, task: TaskConfig, model: ModelConfig,
                 measures: list[MeasureConfig], cache_entries: dict[str, dict]) -> dict:
    """Fit, replay, score and price ``measures`` on one (task, model); plain data out."""
    from suite.replay import ScoreCache
    from suite.sweep import SweepInputs, sweep
    from suite.tasks import task_spec

    spec = task_spec(task)
    fit_dir = trace_dir(config.output_dir, task.name, model.name, "fit")
    inputs = SweepInputs(task=spec, split=task.split, model=model, limit=task.limit,
                         trace_dir=trace_dir(config.output_dir, task.name, model.name),
                         data_dir=config.data_dir, dtype=config.dtype,
                         fit_trace_dir=fit_dir if (fit_dir / "manifest.json").is_file() else None)
    cache = ScoreCache()
    cache.entries.update(cache_entries)
    per_measure = {}
    reports = {}
    errors = {}
    for measure in measures:
        try:
            result = sweep(inputs, [measure], config.profiles, config.batch_sizes,
                           score_cache=cache, fit_cache_dir=Path(config.output_dir) / "measures",
                           seed=config.seed)
        except ExitbenchError as exc:  # one measure's failure must not lose the others
            errors[measure.display_name] = str(exc)
            continue
        per_measure[measure.display_name] = [row.to_dict() for row in result.rows]
        reports[measure.display_name] = {"seconds": result.seconds,
                                         "outputs_scored": result.outputs_scored,
                                         "outputs_from_cache": result.outputs_from_cache}
    return {"rows": per_measure, "reports": reports, "cache": cache.entries, "errors": errors}


def run_replay_stage(config: SuiteConfig, *, progress: bool = True,
                     use_ray: bool = True) -> StageReport:
    """Replay every measure not done yet; each (task, model) is one Ray task."""
    from tqdm.auto import tqdm

    from suite.replay import ScoreCache

    report = StageReport("replay")
    started = time.perf_counter()
    groups = []
    for task in config.tasks:
        for model in config.models:
            todo = []
            for measure in config.measures:
                path = _part_path(config.output_dir, task.name, model.name, measure.display_name)
                key = part_key(config, task, model, measure)
                if path.is_file() and json.loads(path.read_text("utf-8")).get("key") == key:
                    report.skipped += 1
                else:
                    todo.append((measure, key, path))
            if todo:
                groups.append((task, model, todo))
    if not groups:
        report.seconds = time.perf_counter() - started
        return report
    cache_path = Path(config.output_dir) / "results" / "score_cache.json"
    cache = ScoreCache(cache_path)
    scored = from_cache = 0
    bar = tqdm(total=sum(len(g[2]) for g in groups), unit="measure", desc="replay",
               disable=not progress)
    try:
        if use_ray:
            import ray

            remote = ray.remote(num_cpus=1, max_retries=config.ray.max_retries)(replay_group)
            refs = {remote.remote(config, task, model, [m for m, _, _ in todo], cache.entries):
                    (task, model, todo) for task, model, todo in groups}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    task, model, todo = refs[ref]
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        report.failed += len(todo)
                        raise ExitbenchError(f"replay of {task.name}/{model.name} failed: "
                                             f"{exc.cause if exc.cause else exc}") from exc
                    scored, from_cache = _store_group(out, todo, cache, report, bar, scored,
                                                      from_cache)
        else:
            for task, model, todo in groups:
                out = replay_group(config, task, model, [m for m, _, _ in todo], cache.entries)
                scored, from_cache = _store_group(out, todo, cache, report, bar, scored,
                                                  from_cache)
    finally:
        bar.close()
        cache.save()
    total = scored + from_cache
    if total:
        report.notes.append(f"outputs scored {scored}, from cache {from_cache} "
                            f"({100 * from_cache / total:.0f}%)")
    report.seconds = time.perf_counter() - started
    return report


def _store_group(out: dict, todo, cache, report: StageReport, bar, scored: int,
                 from_cache: int) -> tuple[int, int]:
    cache.entries.update(out["cache"])
    for measure, key, path in todo:
        name = measure.display_name
        if name in out["errors"]:
            report.failed += 1
            report.notes.append(f"{name} failed: {out['errors'][name]}")
            bar.update(1)
            continue
        atomic_write_json(path, {"key": key, "rows": out["rows"][name],
                                 "report": out["reports"][name]})
        scored += out["reports"][name]["outputs_scored"]
        from_cache += out["reports"][name]["outputs_from_cache"]
        report.done += 1
        bar.update(1)
    return scored, from_cache


def collect_results(config: SuiteConfig) -> list:
    """Rows of every part of this config, in config order: replayed rows, then the rows
    measured online (``exitbench online``/``fidelity``) when there are any."""
    from suite.fidelity import read_online_rows
    from suite.results import ResultRow

    names = {f.name for f in dataclasses.fields(ResultRow)}
    rows = []
    for task in config.tasks:
        for model in config.models:
            for measure in config.measures:
                path = _part_path(config.output_dir, task.name, model.name, measure.display_name)
                if not path.is_file():  # failed this run; the stage report says why
                    continue
                for row in json.loads(path.read_text("utf-8"))["rows"]:
                    rows.append(ResultRow(**{k: v for k, v in row.items() if k in names}))
    return rows + read_online_rows(config)


def publish_results(config: SuiteConfig) -> int:
    """Write ``results/`` (Parquet, JSON, fronts) from every stored part; return the rows."""
    from suite.fronts import fronts_summary
    from suite.results import write_results

    rows = collect_results(config)
    results_dir = Path(config.output_dir) / "results"
    write_results(results_dir, rows, {"run": config.name, "versions": versions()})
    atomic_write_json(results_dir / "fronts.json", fronts_summary(rows))
    return len(rows)


# -- backbones --------------------------------------------------------------------------------------
def ensure_backbones(config: SuiteConfig, *, progress: bool = True) -> StageReport:
    """Train the tokenizer and the models the config asks for, unless already made."""
    report = StageReport("backbones")
    started = time.perf_counter()
    to_train = [m for m in config.models if m.train is not None]
    if not to_train:
        report.seconds = time.perf_counter() - started
        return report
    from suite.tokenizer import TokenizerSettings, read_metadata, task_texts, train_tokenizer
    from suite.training import Launch, TrainSettings, read_model_metadata, train

    tok = config.tokenizer
    if any(m.train.init is None for m in to_train) and read_metadata(tok.path) is None:
        texts, sources = task_texts(tok.tasks, tok.split, config.data_dir, tok.limit)
        heldout, held = task_texts(tok.tasks, tok.heldout_split, config.data_dir, tok.limit)
        for a, b in zip(sources, held):
            if set(a.example_ids) & set(b.example_ids):
                raise ExitbenchError(f"tokenizer: heldout_split {tok.heldout_split!r} overlaps "
                                     f"split {tok.split!r} for task {a.task!r}; choose disjoint "
                                     f"slices")
        provenance = {"train": [{"task": s.task, "split": s.split,
                                 "num_examples": s.num_examples} for s in sources],
                      "heldout": [{"task": s.task, "split": s.split,
                                   "num_examples": s.num_examples} for s in held]}
        result = train_tokenizer(texts, heldout, tok.path,
                                 TokenizerSettings(vocab_size=tok.vocab_size,
                                                   max_unk_rate=tok.max_unk_rate,
                                                   seed=config.seed), provenance)
        report.done += 1
        report.notes.append(f"tokenizer: held-out <unk> {result.heldout.rate:.3%}")
    elif tok is not None:
        report.skipped += 1
    for model in to_train:
        spec = model.train
        folder = Path(model.path)
        try:
            read_model_metadata(folder)
            report.skipped += 1
            continue
        except (ExitbenchError, OSError, ValueError):
            pass
        settings = TrainSettings(
            objective=spec.objective, preset=spec.preset or TrainSettings().preset,
            init=spec.init, tasks=tuple(spec.tasks), split=spec.split, limit=spec.limit,
            max_source_tokens=spec.max_source_tokens, max_target_tokens=spec.max_target_tokens,
            shallow_layer=spec.shallow_layer, kd_weight=spec.kd_weight, steps=spec.steps,
            batch_size=spec.batch_size, learning_rate=spec.learning_rate,
            warmup_steps=spec.warmup_steps, weight_decay=spec.weight_decay,
            dropout_rate=spec.dropout_rate, optimizer=spec.optimizer,
            lr_schedule=spec.lr_schedule, final_lr_fraction=spec.final_lr_fraction,
            grad_accum_steps=spec.grad_accum_steps, precision=spec.precision, seed=spec.seed)
        launch = Launch(workers=spec.workers, address=config.ray.address, device=config.device,
                        cpus_per_worker=config.ray.cpus_per_worker)
        result = train(settings, None if spec.init else tok.path, folder,
                       data_dir=config.data_dir, eval_split=spec.eval_split,
                       eval_every=spec.eval_every, checkpoint_every=spec.checkpoint_every,
                       progress=progress, launch=launch,
                       gradient_checkpointing=spec.gradient_checkpointing)
        report.done += 1
        report.notes.append(f"{model.name}: {spec.objective}"
                            + (f" from {spec.init}" if spec.init else "")
                            + f", final loss {getattr(result, 'final_loss', float('nan')):.3f}")
    report.seconds = time.perf_counter() - started
    return report


def describe_backbone(model: ModelConfig) -> str:
    """What a backbone is, for the run's summary: the config's label, else the label its
    model folder records, else its path."""
    if model.label:
        return model.label
    from suite.training import read_model_metadata

    try:
        return str(read_model_metadata(model.path).get("label") or model.path)
    except (ExitbenchError, OSError, ValueError):
        return model.path


# -- validation --------------------------------------------------------------------------------------
def run_validate_stage(config: SuiteConfig) -> tuple[StageReport, SuiteConfig]:
    """Check every measure (API, finiteness, determinism, causality, cost) before using it.
    Reports go to ``<out>/validation/<measure>.json``; a measure that fails is left out of
    this run, with a note, and nothing else is lost."""
    from suite.measures import MEASURES, code_hash
    from suite.validate import validate_measure

    report = StageReport("validate")
    started = time.perf_counter()
    kept = []
    for measure in config.measures:
        cls = MEASURES.get(measure.name)
        path = Path(config.output_dir) / "validation" / f"{measure.display_name}.json"
        key = content_key([code_hash(cls), measure.options])
        if path.is_file():
            old = json.loads(path.read_text("utf-8"))
            if old.get("key") == key:
                report.skipped += 1
                if old.get("passed"):
                    kept.append(measure)
                else:
                    report.failed += 1
                    report.notes.append(f"{measure.display_name} left out (failed validation)")
                continue
        result = validate_measure(cls, measure.options, source=MEASURES.source(measure.name),
                                  expected_name=measure.name, seed=config.seed)
        data = result.to_dict()
        data["key"] = key
        data["measure"] = measure.display_name
        atomic_write_json(path, data)
        report.done += 1
        if result.passed:
            kept.append(measure)
        else:
            report.failed += 1
            report.notes.append(f"{measure.display_name} left out (failed validation; see {path})")
    report.seconds = time.perf_counter() - started
    return report, config.model_copy(update={"measures": kept})


# -- the whole run -----------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    import importlib.metadata as md

    found = {"exitbench": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "datasets", "ray", "numpy", "pyarrow", "sacrebleu",
                    "rouge-score"):
        try:
            found[package] = md.version(package)
        except md.PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_run_manifest(config: SuiteConfig, config_path: str | None,
                       summary: RunSummary) -> Path:
    from suite.record import git_commit
    from suite.traces import TraceStore

    traces = {}
    for job in record_jobs(config):
        store = TraceStore(job.directory)
        if store.exists():
            manifest = store.read_manifest()
            traces[str(job.directory)] = {
                "role": job.role, "task": job.task.name, "split": job.task.split,
                "model": job.model.name, "manifest_sha256": _file_sha256(store.manifest_path),
                "model_hash": manifest.model_hash, "tokenizer_hash": manifest.tokenizer_hash,
                "shards": {s.file: s.sha256 for s in manifest.shards}}
    profiles = {}
    from suite.profiles import PROFILES
    for name in config.profiles:
        profile = PROFILES.get(name)
        if profile.kind == "measured":
            profiles[name] = profile.model_dump(mode="json")
    path = Path(config.output_dir) / "run_manifest.json"
    atomic_write_json(path, {
        "config": config.model_dump(mode="json"), "config_path": config_path,
        "versions": versions(), "git_commit": git_commit(), "device": config.device,
        "traces": traces, "profiles": profiles,
        "models": {m.name: {"path": m.path, "label": m.label} for m in config.models},
        "stages": [dataclasses.asdict(s) for s in summary.stages],
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return path


def replay_suite(config: SuiteConfig, config_path: str | None = None, *,
                 progress: bool = True, use_ray: bool = True,
                 build_leaderboard: bool | None = None,
                 summary: RunSummary | None = None) -> RunSummary:
    """Validate, fit, replay and publish over traces already recorded (``exitbench replay``;
    also the second half of :func:`run_suite`)."""
    output = Path(config.output_dir)
    summary = summary or RunSummary(output_dir=output, stages=[])
    all_measures = config
    if config.measures:
        validated, config = run_validate_stage(config)
        summary.stages.append(validated)
    if config.measures:
        started_ray = init_ray(config.ray.address, config.ray.num_cpus) if use_ray else False
        try:
            summary.stages.append(run_replay_stage(config, progress=progress, use_ray=use_ray))
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    if all_measures.measures:
        results_started = time.perf_counter()
        rows = publish_results(config)
        summary.stages.append(StageReport("results", done=rows,
                                          seconds=time.perf_counter() - results_started))
    write_run_manifest(config, config_path, summary)
    if rows_exist(output) and (config.leaderboard if build_leaderboard is None
                               else build_leaderboard):
        from leaderboard import build_site

        site_started = time.perf_counter()
        summary.site_index = build_site(output, output / "site")
        summary.stages.append(StageReport("leaderboard", done=1,
                                          seconds=time.perf_counter() - site_started))
    return summary


def rows_exist(output: Path) -> bool:
    return (output / "results" / "results.json").is_file()


def run_suite(config: SuiteConfig, config_path: str | None = None, *, progress: bool = True,
              build_leaderboard: bool | None = None) -> RunSummary:
    """Run every stage of ``config`` (resuming what is done) and return the summary."""
    import ray

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(output_dir=output, stages=[])
    summary.stages.append(ensure_backbones(config, progress=progress))
    summary.backbones = [f"{m.name}: {describe_backbone(m)}" for m in config.models]
    started_ray = init_ray(config.ray.address, config.ray.num_cpus)
    try:
        summary.stages.append(run_record_stage(config, progress=progress, summary=summary))
        return replay_suite(config, config_path, progress=progress,
                            build_leaderboard=build_leaderboard, summary=summary)
    finally:
        if started_ray:
            ray.shutdown()
