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

import numpy as np

from suite import __version__
from suite.atomic import atomic_write_json
from suite.config import MeasureConfig, ModelConfig, SuiteConfig, TaskConfig
from suite.errors import ExitbenchError
from suite.keys import content_key, file_stem

logger = logging.getLogger(__name__)


class ShardFailedError(ExitbenchError):
    """A shard failed on every attempt; the run stops and names it."""


# -- Ray ------------------------------------------------------------------------------------------
RAY_LOG = "ray.log"
"""Ray's own notices (token authentication, start-up) go to ``<output_dir>/logs/ray.log``
instead of the terminal; ``exitbench -v`` shows them too."""


RAY_NOTICE_LOGGERS = ("ray", "ray._private.authentication.authentication_token_setup")
"""Loggers whose records go to ``ray.log``: Ray's own, and the one that announces token
authentication at every start (``ray.init`` resets the ``ray`` logger's handlers, so that
notice needs its own)."""


def quiet_ray_logging(log_dir: str | Path | None) -> None:
    """Send Ray's loggers' records to ``log_dir/ray.log`` and not to the terminal (unless the
    root logger is at DEBUG, i.e. ``exitbench -v``). Called before and after ``ray.init``."""
    import ray  # noqa: F401 - ray installs its own terminal handler on import

    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        return
    handler = None
    if log_dir is not None:
        try:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(Path(log_dir) / RAY_LOG, encoding="utf-8")
        except OSError:
            handler = None  # no log then; never fail a run for it
    if handler is not None:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.handleError = lambda record: None  # a full disk must not print tracebacks
    for name in RAY_NOTICE_LOGGERS:
        ray_logger = logging.getLogger(name)
        ray_logger.propagate = False
        for old in list(ray_logger.handlers):  # ray's own handler writes to the terminal
            ray_logger.removeHandler(old)
            if isinstance(old, logging.FileHandler):
                old.close()
        ray_logger.addHandler(handler if handler is not None else logging.NullHandler())


def init_ray(address: str | None = None, num_cpus: int | None = None,
             log_dir: str | Path | None = None) -> bool:
    """Start Ray in-process bound to 127.0.0.1 (``address=None``) or join a cluster.
    Returns True when this call started or joined Ray (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    quiet_ray_logging(log_dir)
    # keep every node on loopback: otherwise Ray picks the machine's interface address
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address is None:
        # address="local": always a new instance, never one another process started here
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1",
                 include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    quiet_ray_logging(log_dir)  # ray.init reset the ray logger's handlers
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
        """One line of counts, then one indented line per note."""
        return (f"{self.name:<12} done {self.done:>4}  skipped {self.skipped:>4}  failed "
                f"{self.failed:>3}  retried {self.retried:>3}  {self.seconds:8.1f} s"
                + "".join(f"\n      - {note}" for note in self.notes))


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
    return any(measure_facts(m.name)[1] for m in config.measures)


def trace_dir(output_dir: str | Path, task: str, model: str, role: str = "eval",
              kind: str = "generated") -> Path:
    """``<out>/traces/<task>/<model>/<kind>`` for the evaluated split; learned measures'
    fit split lives in ``<out>/traces/<task>/<model>/fit/<kind>``, the calibration split in
    ``.../calibration/<kind>``."""
    base = Path(output_dir) / "traces" / file_stem(task) / file_stem(model)
    return base / kind if role == "eval" else base / file_stem(role) / kind


def sweep_inputs(config: SuiteConfig, task: TaskConfig, model: ModelConfig):
    """One (task, model) of the run as replay's sweep reads it: the evaluated split's
    generated traces, and the fit split's when they were recorded."""
    from suite.sweep import SweepInputs
    from suite.tasks import task_spec

    fit_dir = trace_dir(config.output_dir, task.name, model.name, "fit")
    return SweepInputs(task=task_spec(task), split=task.split, model=model, limit=task.limit,
                       trace_dir=trace_dir(config.output_dir, task.name, model.name),
                       data_dir=config.data_dir, dtype=config.dtype,
                       fit_trace_dir=fit_dir if (fit_dir / "manifest.json").is_file() else None)


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
            if config.calibration is not None and task.calibration_split:
                calibration_task = task.model_copy(update={"split": task.calibration_split,
                                                           "limit": task.calibration_limit})
                jobs.append(RecordJob(calibration_task, model, "calibration", trace_dir(
                    config.output_dir, task.name, model.name, "calibration")))
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
        for file in plan.repaired:
            report.notes.append(f"repaired {plan.store.root / file} (its checksum did not match "
                                f"the manifest; recorded again)")
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
        # Actor tasks cannot be force-cancelled: killing the actors stops their work. Each
        # step is guarded so that the clean-up never hides why the stage stopped.
        for worker in {id(w): w for w in workers + list(idle)
                       + [w for w, _ in in_flight.values()]}.values():
            _kill_quietly(worker)
    report.seconds = time.perf_counter() - started
    return report


def _kill_quietly(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone, or Ray is shutting down
        pass


# -- the replay stage -------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    from suite.traces import sha256_file

    return sha256_file(path) if path.is_file() else ""


def measure_facts(name: str) -> tuple[str, bool]:
    """``(code hash, needs_fit)`` of a registered measure; a stored submission's come from its
    record, so that keys are computed without starting its sandbox."""
    from suite.measures import code_hash, get_measure
    from suite.submissions import registered_submission

    submission = registered_submission(name)
    if submission is not None:
        return submission.sha256, bool(submission.declared.get("needs_fit", True))
    measure_cls = get_measure(name)
    return code_hash(measure_cls), bool(measure_cls.needs_fit)


def part_key(config: SuiteConfig, task: TaskConfig, model: ModelConfig,
             measure: MeasureConfig) -> str:
    """Hash of everything a measure's rows on one (task, model) depend on. A measure's
    stored failure carries the same key, so it is not retried until one of these changes."""
    from suite.profiles import get_profile

    eval_dir = trace_dir(config.output_dir, task.name, model.name)
    fit_dir = trace_dir(config.output_dir, task.name, model.name, "fit")
    code, needs_fit = measure_facts(measure.name)
    # the profiles' figures price the rows; where their files lie does not
    profiles = {get_profile(name).name: get_profile(name).model_dump(mode="json",
                                                                     exclude={"path"})
                for name in config.profiles}
    payload = {
        "traces": _file_sha256(eval_dir / "manifest.json"),
        "fit": _file_sha256(fit_dir / "manifest.json") if needs_fit else "",
        "measure": measure.model_dump(mode="json"),
        "code": code,
        "profiles": profiles,
        "batch_sizes": config.batch_sizes, "dtype": config.dtype, "seed": config.seed,
        "task": task.model_dump(mode="json"), "suite": __version__,
        "uncertainty": config.uncertainty.model_dump(mode="json"),
    }
    return content_key(payload)


def _part_path(output_dir: str | Path, task: str, model: str, measure: str) -> Path:
    return (Path(output_dir) / "results" / "parts" / file_stem(task) / file_stem(model)
            / f"{file_stem(measure)}.json")


def samples_part_path(part_path: Path, measure: str) -> Path:
    """The per-point samples Parquet stored beside a measure's part (``docs/results.md``)."""
    return part_path.parent / "samples" / f"{file_stem(measure)}.parquet"


def bootstrap_settings(config: SuiteConfig):
    from suite.uncertainty import BootstrapSettings

    return BootstrapSettings(resamples=config.uncertainty.resamples, seed=config.seed,
                             confidence=config.uncertainty.confidence)


def stored_part(config: SuiteConfig, task: TaskConfig, model: ModelConfig,
                measure: MeasureConfig) -> dict | None:
    """The stored part of ``measure`` on (task, model) when it is current: its key matches
    what the rows depend on now, and rows come with their samples file."""
    path = _part_path(config.output_dir, task.name, model.name, measure.display_name)
    part = read_part(path)
    if part is None or part.get("key") != part_key(config, task, model, measure):
        return None
    if "rows" in part and not samples_part_path(path, measure.display_name).is_file():
        return None
    return part


def read_part(path: Path) -> dict | None:
    """A stored part (rows, or a stored failure), or ``None`` when absent or unreadable (an
    unreadable part is simply redone)."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class GroupReplayer:
    """Replays the measures of one (task, model), one call per measure, over one
    :class:`suite.sweep.Sweep` (traces, references and hidden states loaded once). Runs in a
    Ray actor (one per group) or in-process. A measure's failure comes back as data; a
    failure of the group itself (traces that cannot be read, a model that does not load)
    is raised, and raised again for every later measure without redoing the work."""

    def __init__(self, config: SuiteConfig, task: TaskConfig, model: ModelConfig,
                 cache_entries: dict[str, dict], submissions: list | None = None):
        from suite.replay import ScoreCache
        from suite.sandbox import configure
        from suite.submissions import register_submissions

        sandbox = config.sandbox.settings()
        configure(sandbox)
        register_submissions(submissions or [], sandbox)
        self.config, self.task, self.model = config, task, model
        self.cache = ScoreCache()
        self.cache.entries.update(cache_entries)
        self._sent = set(cache_entries)
        self._full_depth_sent = False
        self._sweep = None
        self._error: BaseException | None = None

    def _context(self):
        from suite.sweep import Sweep

        if self._error is not None:
            raise self._error
        if self._sweep is None:
            config = self.config
            inputs = sweep_inputs(config, self.task, self.model)
            try:
                self._sweep = Sweep(inputs, config.profiles, config.batch_sizes,
                                    score_cache=self.cache,
                                    fit_cache_dir=Path(config.output_dir) / "measures",
                                    seed=config.seed, bootstrap=bootstrap_settings(config))
            except BaseException as exc:
                self._error = exc
                raise
        return self._sweep

    def measure(self, measure: MeasureConfig) -> dict:
        """``{"rows", "report", "samples", "cache"}``, or ``{"failed", "deterministic",
        "cache"}``; ``samples`` holds the measure's per-point samples and, the first time,
        the full depth's (key ``""``)."""
        from suite.errors import MeasureFailedError

        context = self._context()
        started = time.perf_counter()
        scored, cached = context.outputs_scored, context.outputs_from_cache
        try:
            rows = [row.to_dict() for row in context.measure_rows(measure)]
            out: dict[str, Any] = {"rows": rows, "report": {
                "seconds": time.perf_counter() - started,
                "outputs_scored": context.outputs_scored - scored,
                "outputs_from_cache": context.outputs_from_cache - cached}}
            samples = context.points.samples
            out["samples"] = {k: samples[k] for k in (measure.display_name, "")
                              if k in samples and (k or not self._full_depth_sent)}
            self._full_depth_sent = True
        except MeasureFailedError as exc:
            out = {"failed": str(exc), "deterministic": exc.deterministic}
        fresh = {k: v for k, v in self.cache.entries.items() if k not in self._sent}
        self._sent.update(fresh)
        out["cache"] = fresh
        return out


@dataclass
class _Pending:
    task: TaskConfig
    model: ModelConfig
    measure: MeasureConfig
    key: str
    path: Path


def run_replay_stage(config: SuiteConfig, *, progress: bool = True,
                     use_ray: bool = True) -> StageReport:
    """Replay every measure not done yet. One worker per (task, model) replays its measures
    one by one; each measure's rows -- or its failure -- are stored as soon as it finishes,
    so a killed replay resumes with the measures it had not finished. A group whose traces
    cannot be read stops that group only; the stage then raises (after storing everything
    that finished), so the results are not republished from a partial replay."""
    from tqdm.auto import tqdm

    from suite.replay import ScoreCache
    from suite.submissions import stored_for_registry

    report = StageReport("replay")
    started = time.perf_counter()
    groups: dict[tuple[str, str], list[_Pending]] = {}
    for task in config.tasks:
        for model in config.models:
            for measure in config.measures:
                path = _part_path(config.output_dir, task.name, model.name, measure.display_name)
                key = part_key(config, task, model, measure)
                old = stored_part(config, task, model, measure)
                if old is not None:
                    report.skipped += 1
                    if "failed" in old:
                        report.failed += 1
                        report.notes.append(f"{measure.display_name} on {task.name}/{model.name} "
                                            f"failed before (not retried until its inputs "
                                            f"change): {old['failed']}")
                    continue
                groups.setdefault((task.name, model.name), []).append(
                    _Pending(task, model, measure, key, path))
    if not groups:
        report.seconds = time.perf_counter() - started
        return report
    cache = ScoreCache(Path(config.output_dir) / "results" / "score_cache.json")
    submissions = stored_for_registry()
    totals = {"outputs_scored": 0, "outputs_from_cache": 0}
    group_errors: list[str] = []
    trace_problems: list[str] = []
    bar = tqdm(total=sum(len(g) for g in groups.values()), unit="measure", desc="replay",
               disable=not progress)

    def store(item: _Pending, out: dict) -> None:
        cache.entries.update(out.get("cache") or {})
        name = item.measure.display_name
        if "failed" in out:
            report.failed += 1
            report.notes.append(f"{name} on {item.task.name}/{item.model.name} failed: "
                                f"{out['failed']}")
            if out.get("deterministic", True):
                atomic_write_json(item.path, {"key": item.key, "failed": out["failed"],
                                              "measure": name})
        else:
            from suite.aggregated import write_samples_part

            # samples first: a part whose JSON exists is complete
            write_samples_part(item.path, name, out.get("samples") or {})
            atomic_write_json(item.path, {"key": item.key, "rows": out["rows"],
                                          "report": out["report"]})
            for total in totals:
                totals[total] += out["report"][total]
            report.done += 1
        bar.update(1)

    def group_failed(items: list[_Pending], exc: BaseException) -> None:
        from suite.traces import TraceIntegrityError

        cause = getattr(exc, "cause", None) or exc
        text = str(cause).strip().splitlines()
        reason = text[0] if text else type(cause).__name__
        group_errors.append(f"{items[0].task.name}/{items[0].model.name}: {reason}")
        if isinstance(cause, TraceIntegrityError):
            trace_problems.append(reason)
        report.failed += len(items)
        bar.update(len(items))

    actors = []
    try:
        if use_ray:
            import ray

            worker_class = ray.remote(num_cpus=1, max_restarts=0)(GroupReplayer)
            refs: dict[Any, tuple[_Pending, Any]] = {}
            for items in groups.values():
                actor = worker_class.remote(config, items[0].task, items[0].model,
                                            cache.entries, submissions)
                actors.append(actor)
                for item in items:
                    refs[actor.measure.remote(item.measure)] = (item, actor)
            failed_actors: set[int] = set()
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    item, actor = refs[ref]
                    try:
                        out = ray.get(ref)
                    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                        if id(actor) not in failed_actors:
                            failed_actors.add(id(actor))
                            group_failed([i for i, a in refs.values() if a is actor], exc)
                        continue
                    store(item, out)
        else:
            for items in groups.values():
                replayer = GroupReplayer(config, items[0].task, items[0].model, cache.entries,
                                         submissions)
                for i, item in enumerate(items):
                    try:
                        out = replayer.measure(item.measure)
                    except ExitbenchError as exc:
                        group_failed(items[i:], exc)
                        break
                    store(item, out)
    finally:
        bar.close()
        for actor in actors:
            _kill_quietly(actor)
        cache.save()
    total = totals["outputs_scored"] + totals["outputs_from_cache"]
    if total:
        report.notes.append(f"outputs scored {totals['outputs_scored']}, from cache "
                            f"{totals['outputs_from_cache']} "
                            f"({100 * totals['outputs_from_cache'] / total:.0f}%)")
    report.seconds = time.perf_counter() - started
    if group_errors:
        report.notes.extend(f"could not replay {error}" for error in group_errors)
        raise ReplayGroupError(report, group_errors, traces_damaged=bool(trace_problems))
    return report


class ReplayGroupError(ExitbenchError):
    """Some (task, model) groups could not be replayed (their traces cannot be read, ...).
    Everything that finished is stored; the results files are left as they were."""

    def __init__(self, report: StageReport, errors: list[str], traces_damaged: bool = False):
        self.report = report
        self.errors = errors
        fix = (" Repair the traces with `exitbench run --config CONFIG` (it records corrupt or "
               "missing shards again, and says which) and rerun." if traces_damaged else
               " Fix the cause and rerun; finished measures are kept.")
        super().__init__("replay could not read what it needs for "
                         + "; ".join(errors) + ". The results files were left unchanged."
                         + fix)


def collect_results(config: SuiteConfig) -> list:
    """Rows of every part of this config, in config order: replayed rows, the decoding
    methods' rows (:mod:`suite.speculative.sweep`), then the rows measured online
    (``exitbench online``/``fidelity``) when there are any."""
    from suite.fidelity import read_online_rows
    from suite.results import ResultRow

    names = {f.name for f in dataclasses.fields(ResultRow)}
    rows = []
    for task in config.tasks:
        for model in config.models:
            for measure in config.measures:
                part = stored_part(config, task, model, measure)
                # a failure, or rows of other inputs (stale): the stage report says why
                if part is None or "rows" not in part:
                    continue
                for row in part["rows"]:
                    rows.append(ResultRow(**{k: v for k, v in row.items() if k in names}))
    from suite.calibration import read_calibrated_rows
    from suite.speculative.sweep import read_method_rows

    return rows + read_method_rows(config) + read_online_rows(config) + \
        read_calibrated_rows(config)


def validation_failure(config: SuiteConfig, measure: MeasureConfig) -> str | None:
    """Why ``measure`` failed validation, from its stored report (``None`` if it passed or
    has no report for its current code and options)."""
    data = read_part(validation_path(config.output_dir, measure))
    if data is None or data.get("passed") is not False or \
            data.get("key") != content_key([measure_facts(measure.name)[0], measure.options]):
        return None
    failed = [f"{c.get('check')}: {c.get('message')}" for c in data.get("checks", [])
              if isinstance(c, dict) and c.get("status") == "FAIL"]
    return "failed validation: " + ("; ".join(failed[:3]) or "see its report")


def measure_statuses(config: SuiteConfig) -> dict[str, dict[str, Any]]:
    """Per measure of the run: where it comes from, what it declares (description, reads,
    cost at each model's sizes), and whether it produced rows (``ok``), failed (with the
    reason per task and model) or was left out (failed validation). Written into the
    results' metadata, so the leaderboard shows failures and submissions without importing
    any measure's code."""
    from suite.measures import get_measure, measure_source
    from suite.submissions import registered_submission

    statuses: dict[str, dict[str, Any]] = {}
    for measure in config.measures:
        name = measure.display_name
        submission = registered_submission(measure.name)
        entry: dict[str, Any] = {"name": measure.name, "options": measure.options,
                                 "source": measure_source(measure.name), "status": "ok",
                                 "failures": [], "submission": None}
        if submission is not None:
            entry["submission"] = {k: v for k, v in submission.to_dict().items()
                                   if k != "declared"}
            entry.update({k: submission.declared.get(k) for k in
                          ("description", "reads", "needs_fit", "deployable", "costs")})
        else:
            entry.update(describe_measure_class(get_measure(measure.name), measure, config))
        reason = validation_failure(config, measure)
        if reason is not None:
            entry["status"] = "failed validation"
            entry["failures"].append({"task": None, "model": None, "reason": reason})
        for task in config.tasks:
            for model in config.models:
                part = stored_part(config, task, model, measure)
                if part is not None and "failed" in part:
                    entry["status"] = "failed"
                    entry["failures"].append({"task": task.name, "model": model.name,
                                              "reason": part["failed"]})
        statuses[name] = entry
    return statuses


def describe_measure_class(cls, measure: MeasureConfig, config: SuiteConfig) -> dict[str, Any]:
    """Description, reads and declared cost of a measure class (built in, or sandboxed: its
    methods are then requests to its worker) at each model's sizes."""
    from suite.sweep import model_info

    info: dict[str, Any] = {"description": str(getattr(cls, "description", "")),
                            "reads": sorted(getattr(cls, "reads", ())),
                            "needs_fit": bool(cls.needs_fit), "deployable": bool(cls.deployable),
                            "costs": []}
    try:
        instance = cls(**measure.options)
    except Exception as exc:  # noqa: BLE001 - reported on the site, never fatal
        info["problem"] = f"cannot be built with its options: {exc}"
        return info
    for model in config.models:
        try:
            dims = model_info(model.path).dims
        except Exception:  # noqa: BLE001 - a model that is not there yet
            continue
        info["costs"].append(declared_cost(instance, model.name, dims))
    return info


def declared_cost(instance, model: str, dims) -> dict[str, Any]:
    cost = instance.check_cost(dims)
    checked = instance.checked_layers(dims.num_layers)
    return {"model": model, "dims": dataclasses.asdict(dims), "flops": float(cost.flops),
            "bytes": float(cost.bytes), "needs_lm_head": bool(cost.needs_lm_head),
            "checked_layers": [int(i) for i in np.flatnonzero(np.asarray(checked))]}


def publish_results(config: SuiteConfig) -> int:
    """Write ``results/`` (Parquet, JSON, fronts) from every stored part of the config's
    measures and the run's stored submissions; return the rows. The measures' statuses
    (failures included) go into the results' metadata. Call under the run's lock."""
    from suite.aggregated import publish_aggregated
    from suite.fronts import fronts_summary
    from suite.results import write_results

    config = with_submissions(config)
    rows = collect_results(config)
    results_dir = Path(config.output_dir) / "results"
    changed = write_results(results_dir, rows, {"run": config.name, "versions": versions(),
                                                "measures": measure_statuses(config)})
    if not changed and (results_dir / "aggregated.json").is_file() \
            and (results_dir / "fronts.json").is_file():
        return len(rows)  # nothing changed: every results file stays as it was
    # samples.parquet, intervals of the fronts, aggregated.json (harness style)
    samples = publish_aggregated(config, rows, results_dir)
    atomic_write_json(results_dir / "fronts.json", fronts_summary(rows, samples))
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
            shallow_layer=spec.shallow_layer, layer_map=spec.layer_map,
            kd_weight=spec.kd_weight, steps=spec.steps,
            batch_size=spec.batch_size, learning_rate=spec.learning_rate,
            warmup_steps=spec.warmup_steps, weight_decay=spec.weight_decay,
            dropout_rate=spec.dropout_rate, optimizer=spec.optimizer,
            lr_schedule=spec.lr_schedule, final_lr_fraction=spec.final_lr_fraction,
            grad_accum_steps=spec.grad_accum_steps, precision=spec.precision, seed=spec.seed,
            layer_dropout=spec.layer_dropout, early_exit_scale=spec.early_exit_scale,
            curriculum=spec.curriculum)
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


def run_calibration_stage(config: SuiteConfig) -> StageReport:
    """Learn-then-Test thresholds of ``config.calibration`` (:mod:`suite.calibration`)."""
    from suite.calibration import run_calibration

    result = run_calibration(config)
    return StageReport("calibrate", done=result.done, skipped=result.reused,
                       failed=len(result.errors), seconds=result.seconds,
                       notes=[f"{k} failed: {v}" for k, v in result.errors.items()])


# -- validation --------------------------------------------------------------------------------------
def validation_path(output_dir: str | Path, measure: MeasureConfig) -> Path:
    return Path(output_dir) / "validation" / f"{file_stem(measure.display_name)}.json"


def validate_configured(config: SuiteConfig, measure: MeasureConfig,
                        measure_cls=None) -> tuple[dict, bool]:
    """The validation report of ``measure`` (``(report, reused)``): the stored one when its
    key (code hash and options) matches, else a new one, stored atomically."""
    from suite.measures import code_hash, get_measure, measure_source
    from suite.validate import validate_measure

    path = validation_path(config.output_dir, measure)
    code = measure_facts(measure.name)[0] if measure_cls is None else code_hash(measure_cls)
    key = content_key([code, measure.options])
    old = read_part(path)
    if old is not None and old.get("key") == key and isinstance(old.get("passed"), bool):
        return old, True
    cls = measure_cls if measure_cls is not None else get_measure(measure.name)
    if measure_cls is None:
        source = measure_source(measure.name)
    else:
        source = getattr(getattr(cls, "code", None), "origin", "submitted code")
    if getattr(cls, "session", None) is not None:
        source += f", sandboxed ({cls.session.mode})"
    result = validate_measure(cls, measure.options, source=source,
                              expected_name=measure.name, seed=config.seed)
    data = result.to_dict()
    data["key"] = key
    data["measure"] = measure.display_name
    atomic_write_json(path, data)
    return data, False


def run_validate_stage(config: SuiteConfig) -> tuple[StageReport, SuiteConfig]:
    """Check every measure (API, finiteness, determinism, causality, cost) before using it.
    Reports go to ``<out>/validation/<measure>.json``; a measure that fails is left out of
    this run, with a note (and in the results' metadata), and nothing else is lost."""
    report = StageReport("validate")
    started = time.perf_counter()
    kept = []
    for measure in config.measures:
        data, reused = validate_configured(config, measure)
        report.skipped += reused
        report.done += not reused
        if data.get("passed"):
            kept.append(measure)
            continue
        reason = validation_failure(config, measure) or "failed validation"
        report.failed += 1
        report.notes.append(f"{measure.display_name} left out ({reason[:200]}; see "
                            f"{validation_path(config.output_dir, measure)})")
    report.seconds = time.perf_counter() - started
    return report, config.model_copy(update={"measures": kept})


def with_submissions(config: SuiteConfig) -> SuiteConfig:
    """``config`` with every submission stored in its run directory appended to its measures
    (registered, sandboxed, in this process's measure registry)."""
    from suite.config import MeasureConfig as _MeasureConfig
    from suite.sandbox import configure
    from suite.submissions import SubmissionStore, register_submissions

    sandbox = config.sandbox.settings()
    configure(sandbox)
    submissions = SubmissionStore(config.output_dir).list()
    register_submissions(submissions, sandbox)
    names = {m.display_name for m in config.measures}
    extra = [_MeasureConfig(name=s.name, options=s.options) for s in submissions
             if s.name not in names]
    return config.model_copy(update={"measures": list(config.measures) + extra})


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
    from suite.profiles import get_profile
    for name in config.profiles:
        profile = get_profile(name)
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
    also the second half of :func:`run_suite`). Every submission stored in the run is
    included. Holds the run directory's lock."""
    from suite.lock import run_lock

    output = Path(config.output_dir)
    summary = summary or RunSummary(output_dir=output, stages=[])
    with run_lock(output):
        all_measures = with_submissions(config)
        config = all_measures
        if config.measures:
            validated, config = run_validate_stage(all_measures)
            summary.stages.append(validated)
        if config.measures:
            started_ray = init_ray(config.ray.address, config.ray.num_cpus,
                                   output / "logs") if use_ray else False
            try:
                summary.stages.append(run_replay_stage(config, progress=progress,
                                                       use_ray=use_ray))
            except ReplayGroupError as exc:
                summary.stages.append(exc.report)
                write_run_manifest(all_measures, config_path, summary)
                exc.summary = summary
                raise
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
        if config.calibration is not None and config.measures:
            summary.stages.append(run_calibration_stage(config))
        if config.methods:  # decoding methods beside early exit, on the same traces
            from suite.speculative.sweep import run_method_stage

            summary.stages.append(run_method_stage(config, progress=progress))
        if all_measures.measures or config.methods:
            results_started = time.perf_counter()
            rows = publish_results(all_measures)
            summary.stages.append(StageReport("results", done=rows,
                                              seconds=time.perf_counter() - results_started))
        write_run_manifest(all_measures, config_path, summary)
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

    from suite.lock import run_lock

    output = Path(config.output_dir)
    summary = RunSummary(output_dir=output, stages=[])
    with run_lock(output):
        summary.stages.append(ensure_backbones(config, progress=progress))
        from suite.training import model_label

        summary.backbones = [f"{m.name}: {model_label(m)}" for m in config.models]
        started_ray = init_ray(config.ray.address, config.ray.num_cpus, output / "logs")
        try:
            summary.stages.append(run_record_stage(with_submissions(config), progress=progress,
                                                   summary=summary))
            return replay_suite(config, config_path, progress=progress,
                                build_leaderboard=build_leaderboard, summary=summary)
        finally:
            if started_ray:
                ray.shutdown()
