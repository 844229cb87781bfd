"""CALM's calibration: the most aggressive threshold whose risk is controlled, with a
statistical guarantee, by Learn-then-Test (Angelopoulos et al. 2021) as CALM proposes it
(Schuster et al. 2022, Sec. 4; no public CALM code implements it).

For a measure, a threshold schedule, a risk, ``epsilon`` and ``delta``: on a calibration
split, every candidate base threshold ``lambda`` gets a p-value for the null hypothesis
"the risk at ``lambda`` exceeds ``epsilon``". Fixed-sequence testing orders the candidates
from the safest (the highest threshold: fewest early exits) to the most aggressive and
rejects while the p-value is at most ``delta``; the chosen threshold is the last one
rejected. Then, over the randomness of the calibration split, ``P(risk(chosen) > epsilon)
<= delta``. When even the safest candidate is not rejected, nothing is certified and the
report says so (full depth is the only safe choice).

Risks (per example, bounded in ``[0, 1]``; the risk is their expectation):

- ``consistency_01``: textual consistency, 1 when the early-exit output (the replayed token
  ids up to EOS) differs from the full-depth output, else 0. p-value: the exact binomial
  tail ``P(Binomial(n, epsilon) <= n * risk_hat)``.
- ``consistency_rougeL``: textual consistency as a bounded dissimilarity, ``1 - ROUGE-L F``
  of the early output against the full-depth one (rouge-score, Porter stemmer).
  p-value: Hoeffding-Bentkus, ``min(exp(-n h(min(risk_hat, epsilon), epsilon)),
  e * P(Binomial(n, epsilon) <= ceil(n risk_hat)))`` with ``h(a, b) = a log(a / b) + (1 - a)
  log((1 - a) / (1 - b))``.
- ``task_loss``: risk consistency, the increase of the task loss over the full model's,
  ``max(0, L(early) - L(full))`` with ``L = 1 - metric / 100`` per example (SQuAD F1,
  sentence BLEU, ROUGE-L against the references). Clipping at 0 keeps it in ``[0, 1]`` and
  controls ``E[L(early) - L(full)]`` from above. p-value: Hoeffding-Bentkus.

Replay gives every candidate's exits from one pass over the calibration traces
(:func:`suite.schedules.replay_scheduled`), so all risks cost one replay and the metric on
outputs that differ from full depth. The same losses on the evaluated split give the test
risk at the chosen threshold and, over many random calibration/test splits of those traces,
the share of splits whose test risk exceeds ``epsilon`` (:func:`split_validity`), which the
guarantee bounds by ``delta`` (up to the test split's own sampling noise).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from suite.errors import ExitbenchError

if TYPE_CHECKING:
    from suite.config import CalibrationTarget, MeasureConfig, ModelConfig, SuiteConfig, TaskConfig
    from suite.traces import TraceArrays

BINARY_RISKS = ("consistency_01",)
RISKS = ("consistency_01", "consistency_rougeL", "task_loss")


# -- p-values and fixed-sequence testing -----------------------------------------------------------
def binomial_p_values(loss_sums: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    """Exact p-values of "risk > epsilon" for 0/1 losses: ``P(Binomial(n, epsilon) <= k)``
    with ``k`` the observed number of losses (any shape)."""
    from scipy import stats

    return stats.binom.cdf(np.asarray(loss_sums), n, epsilon)


def hoeffding_bentkus_p_values(mean_losses: np.ndarray, n: int, epsilon: float) -> np.ndarray:
    """Hoeffding-Bentkus p-values of "risk > epsilon" for losses in ``[0, 1]`` (any shape)."""
    from scipy import stats

    risk = np.minimum(np.asarray(mean_losses, dtype=np.float64), epsilon)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(risk > 0, risk * np.log(risk / epsilon), 0.0) + np.where(
            risk < 1, (1 - risk) * np.log((1 - risk) / (1 - epsilon)), 0.0)
    hoeffding = np.exp(-n * h)
    bentkus = math.e * stats.binom.cdf(np.ceil(n * np.asarray(mean_losses) - 1e-9), n, epsilon)
    return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def p_values(losses: np.ndarray, epsilon: float, binary: bool) -> np.ndarray:
    """``[..., K]`` p-values from per-example losses ``[..., K, n]``."""
    n = losses.shape[-1]
    if binary:
        return binomial_p_values(np.rint(losses.sum(axis=-1)), n, epsilon)
    return hoeffding_bentkus_p_values(losses.mean(axis=-1), n, epsilon)


def fixed_sequence(p_ordered: np.ndarray, delta: float) -> np.ndarray:
    """Hypotheses rejected by fixed-sequence testing of ``p_ordered`` ``[..., K]`` (safest
    first): how many leading p-values are all at most ``delta`` (``[...]``)."""
    fails = np.asarray(p_ordered) > delta
    return np.where(fails.any(axis=-1), fails.argmax(axis=-1), fails.shape[-1])


@dataclass(frozen=True)
class LttResult:
    """Learn-then-Test over candidate thresholds (ordered safest first)."""

    thresholds: tuple[float, ...]
    """Candidates, safest (highest) first."""
    empirical_risk: tuple[float, ...]
    p_values: tuple[float, ...]
    num_rejected: int
    epsilon: float
    delta: float
    num_examples: int

    @property
    def certified(self) -> bool:
        return self.num_rejected > 0

    @property
    def chosen(self) -> float | None:
        """The most aggressive threshold certified; ``None`` when none is."""
        return self.thresholds[self.num_rejected - 1] if self.certified else None

    @property
    def chosen_risk(self) -> float | None:
        return self.empirical_risk[self.num_rejected - 1] if self.certified else None


def safest_first(thresholds: Sequence[float]) -> np.ndarray:
    """Indices of ``thresholds`` from the highest (exits least: the safest) to the lowest,
    distinct values only."""
    values = np.asarray(thresholds, dtype=np.float64)
    _, first = np.unique(-values, return_index=True)
    return first


def learn_then_test(losses: np.ndarray, thresholds: Sequence[float], epsilon: float,
                    delta: float, binary: bool) -> LttResult:
    """Choose a threshold from per-example ``losses`` ``[K, n]`` at ``thresholds`` ``[K]``."""
    if not 0 < epsilon < 1 or not 0 < delta < 1:
        raise ExitbenchError(f"calibration: epsilon={epsilon} and delta={delta} must lie "
                             f"strictly between 0 and 1")
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[0] != len(thresholds) or losses.shape[1] == 0:
        raise ExitbenchError(f"calibration: losses of shape {losses.shape} for "
                             f"{len(thresholds)} thresholds; need [thresholds, examples >= 1]")
    order = safest_first(thresholds)
    ordered = losses[order]
    values = p_values(ordered, epsilon, binary)
    return LttResult(thresholds=tuple(float(t) for t in np.asarray(thresholds)[order]),
                     empirical_risk=tuple(float(r) for r in ordered.mean(axis=1)),
                     p_values=tuple(float(p) for p in values),
                     num_rejected=int(fixed_sequence(values, delta)), epsilon=float(epsilon),
                     delta=float(delta), num_examples=int(losses.shape[1]))


@dataclass(frozen=True)
class SplitValidity:
    """Learn-then-Test over many random calibration/test splits of one set of examples."""

    num_splits: int
    calibration_fraction: float
    exceed_share: float
    """Share of splits whose test risk at the chosen threshold exceeds epsilon. The test half
    is the complement of the calibration half in a finite pool, so its risk deviates
    opposite to the calibration half's: this share runs somewhat above the guarantee's
    ``delta`` when the pool is small."""
    pool_exceed_share: float
    """Share of splits whose risk over the whole pool at the chosen threshold exceeds
    epsilon: what the guarantee bounds by ``delta`` when calibration examples are drawn from
    the pool (without replacement, which only makes the binomial tests conservative)."""
    certified_share: float
    """Share of splits where some threshold was certified."""
    mean_test_risk: float
    mean_chosen_threshold: float | None
    epsilon: float
    delta: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_validity(losses: np.ndarray, thresholds: Sequence[float], epsilon: float,
                   delta: float, binary: bool, num_splits: int = 1000,
                   calibration_fraction: float = 0.5, seed: int = 0) -> SplitValidity:
    """Random calibration/test splits of the examples of ``losses`` ``[K, n]``: per split,
    Learn-then-Test on the calibration part and the empirical risk of the chosen threshold on
    the test part (a split that certifies nothing runs at full depth: test risk 0). All
    splits at once: calibration sums are one matrix product."""
    losses = np.asarray(losses, dtype=np.float64)
    order = safest_first(thresholds)
    ordered = losses[order]  # [K, n]
    n = ordered.shape[1]
    n_cal = int(round(calibration_fraction * n))
    if not 1 <= n_cal < n:
        raise ExitbenchError(f"calibration: {n} examples cannot be split {calibration_fraction}"
                             f" / {1 - calibration_fraction}; record more examples")
    rng = np.random.default_rng(seed)
    in_cal = np.zeros((num_splits, n), dtype=bool)
    chosen_examples = np.argsort(rng.random((num_splits, n)), axis=1)[:, :n_cal]
    np.put_along_axis(in_cal, chosen_examples, True, axis=1)
    cal_sum = in_cal.astype(np.float64) @ ordered.T  # [S, K]
    test_sum = (~in_cal).astype(np.float64) @ ordered.T
    if binary:
        values = binomial_p_values(np.rint(cal_sum), n_cal, epsilon)
    else:
        values = hoeffding_bentkus_p_values(cal_sum / n_cal, n_cal, epsilon)
    rejected = fixed_sequence(values, delta)  # [S]
    certified = rejected > 0
    index = np.maximum(rejected - 1, 0)
    test_risk = np.where(certified, test_sum[np.arange(num_splits), index] / (n - n_cal), 0.0)
    chosen = np.asarray(thresholds, dtype=np.float64)[order][index]
    pool_risk = np.where(certified, ordered.mean(axis=1)[index], 0.0)
    return SplitValidity(num_splits=num_splits, calibration_fraction=calibration_fraction,
                         exceed_share=float((test_risk > epsilon).mean()),
                         pool_exceed_share=float((pool_risk > epsilon).mean()),
                         certified_share=float(certified.mean()),
                         mean_test_risk=float(test_risk.mean()),
                         mean_chosen_threshold=float(chosen[certified].mean())
                         if certified.any() else None, epsilon=epsilon, delta=delta)


# -- per-example losses from replayed outputs -----------------------------------------------------
def _cut(ids: np.ndarray, eos: int | None) -> tuple[int, ...]:
    if eos is not None:
        hits = np.flatnonzero(ids == eos)
        if hits.size:
            ids = ids[:hits[0]]
    return tuple(int(i) for i in ids)


def example_losses(risk: str, traces: TraceArrays, replayed_tokens: np.ndarray,
                   detokenize: Callable[[Sequence[Sequence[int]]], list[str]],
                   references: Sequence[Sequence[str]], metric: str,
                   eos_token_id: int | None) -> np.ndarray:
    """``[K, E]`` per-example losses of ``risk`` for the replayed tokens ``[K, T]`` of each
    threshold; an output equal to the full-depth one costs 0 without scoring it."""
    if risk not in RISKS:
        raise ExitbenchError(f"calibration: unknown risk {risk!r}; use one of {', '.join(RISKS)}")
    starts, ends = traces.example_bounds()
    full = [_cut(traces.final_id[a:b], eos_token_id) for a, b in zip(starts, ends)]
    losses = np.zeros((replayed_tokens.shape[0], len(full)))
    differ = []  # (k, example, ids) where the early output is not the full one
    for k in range(replayed_tokens.shape[0]):  # per threshold and example, not per token
        row = replayed_tokens[k]
        for e, (a, b) in enumerate(zip(starts, ends)):
            ids = _cut(row[a:b], eos_token_id)
            if ids != full[e]:
                differ.append((k, e, ids))
    if not differ:
        return losses
    if risk == "consistency_01":
        for k, e, _ in differ:
            losses[k, e] = 1.0
        return losses
    texts = detokenize([ids for _, _, ids in differ])
    if risk == "consistency_rougeL":
        full_texts = detokenize(full)
        scorer = _rouge_l()
        memo: dict[tuple[str, str], float] = {}
        for (k, e, _), text in zip(differ, texts):
            key = (full_texts[e], text)
            if key not in memo:
                memo[key] = 1.0 - scorer.score(full_texts[e], text)["rougeL"].fmeasure
            losses[k, e] = memo[key]
        return losses
    full_texts = detokenize(full)
    score = _per_example_metric(metric)
    full_loss = [1.0 - score(full_texts[e], references[e]) for e in range(len(full))]
    memo_task: dict[tuple[int, str], float] = {}
    for (k, e, _), text in zip(differ, texts):
        if (e, text) not in memo_task:
            memo_task[(e, text)] = max(0.0, 1.0 - score(text, references[e]) - full_loss[e])
        losses[k, e] = memo_task[(e, text)]
    return losses


def _rouge_l():
    import logging

    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _per_example_metric(metric: str) -> Callable[[str, Sequence[str]], float]:
    """The task's primary metric of one prediction, as a fraction in ``[0, 1]``."""
    from suite.metrics import get_metric

    function = get_metric(metric)

    def score(prediction: str, refs: Sequence[str]) -> float:
        result = function([prediction], [list(refs)])
        return min(1.0, max(0.0, result.scores[result.primary] / 100.0))

    return score


# -- the calibration stage -------------------------------------------------------------------------
@dataclass
class CalibrationOutcome:
    """One target on one (task, model): the choice, the test split and the validity study."""

    task: str
    model: str
    measure: str
    risk: str
    epsilon: float
    delta: float
    calibration_split: str
    calibration: LttResult
    test_risk: float
    """Empirical risk on the evaluated split at the chosen threshold (0 at full depth)."""
    test_examples: int
    speedups: dict[str, float] = field(default_factory=dict)
    """``profile/batch`` -> speedup at the chosen threshold on the evaluated split."""
    validity: SplitValidity | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "rows"}
        data["chosen_threshold"] = self.calibration.chosen
        data["certified"] = self.calibration.certified
        data["calibration_risk"] = self.calibration.chosen_risk
        data["calibration"] = {k: v for k, v in data["calibration"].items()
                               if k in ("num_rejected", "num_examples")}
        data["calibration"]["candidates"] = len(self.calibration.thresholds)
        return data


def calibrated_label(measure: MeasureConfig, target: CalibrationTarget) -> str:
    """The series name of a calibrated point: its measure, risk and (epsilon, delta)."""
    return (f"{measure.display_name} [calibrated {target.risk} eps={target.epsilon:g} "
            f"delta={target.delta:g}]")


def candidate_thresholds(sweep: Sequence[float], num: int) -> np.ndarray:
    """The measure's sweep plus ``num`` evenly spaced values over its range: fixed-sequence
    testing pays nothing for more candidates, so a finer grid only finds a finer choice."""
    sweep = np.asarray(sweep, dtype=np.float64)
    grid = np.linspace(sweep.min(), sweep.max(), num) if num > 1 else np.zeros(0)
    return np.unique(np.concatenate([sweep, grid]))


@dataclass
class _Split:
    """One split's traces, references and replayed losses for one measure."""

    traces: TraceArrays
    losses: np.ndarray


def _losses_on(trace_dir: Path, split: str, limit: int | None, config: SuiteConfig,
               task: TaskConfig, model: ModelConfig, measure_config: MeasureConfig,
               thresholds: np.ndarray, risk: str, hidden) -> _Split:
    from suite.models import load_tokenizer
    from suite.replay import replayed_tokens
    from suite.schedules import build_schedule, replay_scheduled
    from suite.sweep import Detokenizer, SweepInputs, fitted_measure, model_info
    from suite.tasks import load_examples, task_spec
    from suite.traces import TraceStore

    spec = task_spec(task)
    traces = TraceStore(trace_dir).load()
    info = model_info(model.path)
    examples = {e.id: e for e in load_examples(spec, split, config.data_dir, limit)}
    ids = traces.example_ids()
    missing = [i for i in ids if i not in examples]
    if missing:
        raise ExitbenchError(f"{trace_dir}: traced example {missing[0]!r} is not in "
                             f"{task.name}/{split}")
    fit_dir = _trace_dir(config, task, model, "fit")
    inputs = SweepInputs(task=spec, split=split, model=model, trace_dir=trace_dir,
                         data_dir=config.data_dir, limit=limit, dtype=config.dtype,
                         fit_trace_dir=fit_dir if (fit_dir / "manifest.json").is_file() else None)
    measure = fitted_measure(measure_config, inputs, hidden,
                             fit_cache_dir=Path(config.output_dir) / "measures", seed=config.seed)
    scored = hidden(trace_dir) if "hidden" in measure.reads else traces
    schedule = build_schedule(measure_config.schedule, spec.limits.max_new_tokens)
    replayed = replay_scheduled(traces, measure.scores(scored), thresholds, schedule,
                                measure_config.min_layer, measure_config.min_position, measure)
    tokens = replayed_tokens(traces, replayed.exits)
    losses = example_losses(risk, traces, tokens, Detokenizer(load_tokenizer(model.path)),
                            [examples[i].references for i in ids], spec.metric,
                            info.eos_token_id)
    return _Split(traces=traces, losses=losses)


def _trace_dir(config: SuiteConfig, task: TaskConfig, model: ModelConfig, role: str) -> Path:
    from suite.runner import trace_dir

    return trace_dir(config.output_dir, task.name, model.name, role)


def calibrate_one(config: SuiteConfig, task: TaskConfig, model: ModelConfig,
                  target: CalibrationTarget) -> CalibrationOutcome:
    """Calibrate one target on one (task, model) and evaluate it on the evaluated split."""
    from suite.measures import get_measure
    from suite.sweep import HiddenStateLoader, SweepInputs, sweep
    from suite.tasks import task_spec

    measure_config = _measure_config(config, target)
    if not task.calibration_split:
        raise ExitbenchError(f"calibration: task {task.name!r} has no calibration_split; set "
                             f"tasks[].calibration_split to a split disjoint from {task.split!r}")
    cls = get_measure(measure_config.name)
    hidden = HiddenStateLoader(model.path, config.data_dir)
    info_layers = _num_layers(model.path)
    sweep_values = (measure_config.thresholds if measure_config.thresholds is not None
                    else cls(**measure_config.options).thresholds_for(info_layers))
    thresholds = (np.asarray(target.thresholds, dtype=np.float64) if target.thresholds
                  else candidate_thresholds(sweep_values, config.calibration.num_thresholds))
    binary = target.risk in BINARY_RISKS
    cal = _losses_on(_trace_dir(config, task, model, "calibration"), task.calibration_split,
                     task.calibration_limit, config, task, model, measure_config, thresholds,
                     target.risk, hidden)
    result = learn_then_test(cal.losses, thresholds, target.epsilon, target.delta, binary)
    test = _losses_on(_trace_dir(config, task, model, "eval"), task.split, task.limit, config,
                      task, model, measure_config, thresholds, target.risk, hidden)
    order = safest_first(thresholds)
    test_risks = test.losses[order].mean(axis=1)
    test_risk = float(test_risks[result.num_rejected - 1]) if result.certified else 0.0
    validity = None
    if config.calibration.validity_splits:
        validity = split_validity(test.losses, thresholds, target.epsilon, target.delta, binary,
                                  config.calibration.validity_splits,
                                  config.calibration.calibration_fraction, config.seed)
    outcome = CalibrationOutcome(task=task.name, model=model.name,
                                 measure=measure_config.display_name, risk=target.risk,
                                 epsilon=target.epsilon, delta=target.delta,
                                 calibration_split=task.calibration_split, calibration=result,
                                 test_risk=test_risk, test_examples=test.losses.shape[1],
                                 validity=validity)
    if result.certified:
        # the chosen point on the evaluated split, through the sweep: its own series
        chosen = measure_config.model_copy(update={
            "thresholds": [result.chosen], "label": calibrated_label(measure_config, target)})
        spec = task_spec(task)
        fit_dir = _trace_dir(config, task, model, "fit")
        inputs = SweepInputs(task=spec, split=task.split, model=model,
                             trace_dir=_trace_dir(config, task, model, "eval"),
                             data_dir=config.data_dir, limit=task.limit, dtype=config.dtype,
                             fit_trace_dir=fit_dir if (fit_dir / "manifest.json").is_file()
                             else None)
        report = sweep(inputs, [chosen], config.profiles, config.batch_sizes,
                       fit_cache_dir=Path(config.output_dir) / "measures", seed=config.seed)
        marks = {"risk": target.risk, "epsilon": target.epsilon, "delta": target.delta,
                 "calibration_split": task.calibration_split,
                 "calibration_examples": result.num_examples,
                 "calibration_risk": result.chosen_risk, "test_risk": test_risk,
                 "base_measure": measure_config.display_name}
        for row in report.rows:
            outcome.rows.append(dataclasses.replace(
                row, extra={**row.extra, "calibration": marks}).to_dict())
            outcome.speedups[f"{row.profile}/{row.batch_size}"] = row.speedup
    return outcome


def _num_layers(model_path: str) -> int:
    from suite.sweep import model_info

    return model_info(model_path).dims.num_layers


def _measure_config(config: SuiteConfig, target: CalibrationTarget) -> MeasureConfig:
    by_name = {m.display_name: m for m in config.measures}
    if target.measure not in by_name:
        from suite.registry import closest_names

        close = closest_names(target.measure, list(by_name))
        raise ExitbenchError(f"calibration: measure {target.measure!r} is not among the config's "
                             f"measures" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; name one of {', '.join(by_name)}")
    return by_name[target.measure]


# -- stored parts, the report ----------------------------------------------------------------------
def part_path(output_dir: str | Path, task: str, model: str, label: str) -> Path:
    from suite.keys import file_stem

    return Path(output_dir) / "calibration" / task / model / f"{file_stem(label)}.json"


def part_key(config: SuiteConfig, task: TaskConfig, model: ModelConfig,
             target: CalibrationTarget) -> str:
    """Everything a calibrated part depends on: the measure's replay part key (traces,
    code, profiles, ...), the calibration traces, the target and the calibration settings."""
    from suite.keys import content_key
    from suite.runner import part_key as replay_part_key
    from suite.traces import sha256_file

    manifest = _trace_dir(config, task, model, "calibration") / "manifest.json"
    return content_key({
        "replay": replay_part_key(config, task, model, _measure_config(config, target)),
        "calibration_traces": sha256_file(manifest) if manifest.is_file() else "",
        "target": target.model_dump(mode="json"),
        "settings": config.calibration.model_dump(mode="json", exclude={"targets"}),
    })


@dataclass
class CalibrationReport:
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    done: int = 0
    reused: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def run_calibration(config: SuiteConfig) -> CalibrationReport:
    """Every target of ``config.calibration`` on every (task with a calibration split,
    model); finished parts whose key matches are reused. Writes ``calibration/`` parts and
    ``calibration/calibration.{json,md}``. Traces must be recorded (the runner's record
    stage records the calibration split)."""
    from suite.atomic import atomic_write_json, atomic_write_text

    started = time.perf_counter()
    report = CalibrationReport()
    if config.calibration is None:
        return report
    for task in config.tasks:
        if not task.calibration_split:
            continue
        for model in config.models:
            for target in config.calibration.targets:
                label = f"{task.name}/{model.name}/{target.measure}/{target.risk}/" \
                        f"{target.epsilon:g}/{target.delta:g}"
                try:
                    measure_config = _measure_config(config, target)
                    path = part_path(config.output_dir, task.name, model.name,
                                     calibrated_label(measure_config, target))
                    key = part_key(config, task, model, target)
                    if path.is_file() and json.loads(path.read_text("utf-8")).get("key") == key:
                        part = json.loads(path.read_text("utf-8"))
                        report.reused += 1
                    else:
                        outcome = calibrate_one(config, task, model, target)
                        part = {"key": key, "summary": outcome.summary(), "rows": outcome.rows}
                        atomic_write_json(path, part)
                        report.done += 1
                except ExitbenchError as exc:  # one target's failure must not lose the others
                    report.errors[label] = str(exc)
                    continue
                report.outcomes.append(part["summary"])
    folder = Path(config.output_dir) / "calibration"
    atomic_write_json(folder / "calibration.json", {"outcomes": report.outcomes,
                                                    "errors": report.errors})
    atomic_write_text(folder / "calibration.md", format_report(report))
    report.seconds = time.perf_counter() - started
    return report


def read_calibrated_rows(config: SuiteConfig) -> list:
    """The result rows of every stored calibrated part of ``config`` (for the results)."""
    from suite.results import ResultRow

    if config.calibration is None:
        return []
    names = {f.name for f in dataclasses.fields(ResultRow)}
    rows = []
    for task in config.tasks:
        for model in config.models:
            for target in config.calibration.targets:
                by_name = {m.display_name: m for m in config.measures}
                if target.measure not in by_name:
                    continue
                path = part_path(config.output_dir, task.name, model.name,
                                 calibrated_label(by_name[target.measure], target))
                if path.is_file():
                    for row in json.loads(path.read_text("utf-8"))["rows"]:
                        rows.append(ResultRow(**{k: v for k, v in row.items() if k in names}))
    return rows


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def format_report(report: CalibrationReport) -> str:
    """The calibration report in Markdown: per target, the chosen threshold, the test risk
    beside epsilon, the speedups, and the validity study."""
    lines = ["# Calibration (Learn-then-Test, fixed-sequence testing)", "",
             "| task | model | measure | risk | eps | delta | chosen threshold | cal. risk "
             "| test risk | speedup | splits: test risk > eps | pool risk > eps "
             "| certified splits |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for o in report.outcomes:
        speedups = o.get("speedups") or {}
        speedup = ", ".join(f"{k} {v:.2f}x" for k, v in list(speedups.items())[:3]) or \
            "full depth"
        validity = o.get("validity") or {}
        lines.append(
            f"| {o['task']} | {o['model']} | {o['measure']} | {o['risk']} | {o['epsilon']:g} | "
            f"{o['delta']:g} | {_fmt(o['chosen_threshold'])} | {_fmt(o['calibration_risk'])} | "
            f"{_fmt(o['test_risk'])} | {speedup} | "
            f"{_fmt(validity.get('exceed_share'), '.3f')} (<= {o['delta']:g}) over "
            f"{validity.get('num_splits', 0)} | {_fmt(validity.get('pool_exceed_share'), '.3f')} "
            f"| {_fmt(validity.get('certified_share'), '.3f')} |")
    for label, error in report.errors.items():
        lines.append(f"\nfailed {label}: {error}")
    return "\n".join(lines) + "\n"
