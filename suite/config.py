"""The suite config: one YAML file that says what to run and where to write it.

Validated on load; every error names the file, the key and what is wrong.
Relative paths in a config file are taken from the folder that holds the file (not from the
current directory), so a config means the same wherever it is run from: ``output_dir``,
``data_dir``, ``tokenizer.path``, and ``models[].path`` when it names a local folder (see
:func:`is_local_model_path`; a hub id such as ``google-t5/t5-small`` is left as it is).
:func:`load_config` resolves them; :func:`parse_config` on a mapping resolves nothing unless
given ``base_dir``.

Example (``configs/example.yaml``; its paths are relative to ``configs/``)::

    name: quickstart
    output_dir: ../runs/quickstart
    data_dir: ../data/samples         # omit to load from the Hugging Face hub
    tasks:
      - {name: squad, split: "validation[:100]", limit: 100}
    models:
      - {name: tiny-t5-squad, path: ../backbones/tiny-t5-squad}
    measures: [softmax_margin]
    profiles: [generic_cpu]
    batch_sizes: [1, 8, 32]
    ray: {address: null}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from suite.errors import ConfigError, UnknownNameError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Strict):
    """One task to run."""

    name: str
    split: str = "validation"
    """Split, with the hub's slice syntax allowed: ``validation[:100]``."""
    limit: int | None = Field(default=None, ge=1)
    """At most this many examples (after slicing)."""
    max_source_tokens: int | None = Field(default=None, ge=1)
    max_target_tokens: int | None = Field(default=None, ge=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    fit_split: str | None = None
    """Split whose traces fit learned measures (kept apart from ``split``); ``None``: no fitting."""
    fit_limit: int | None = Field(default=None, ge=1)
    calibration_split: str | None = None
    """Split whose traces calibrate thresholds (``calibration:``; kept apart from ``split``)."""
    calibration_limit: int | None = Field(default=None, ge=1)


class ScheduleConfig(_Strict):
    """How the threshold depends on the token (:mod:`suite.schedules`)."""

    kind: Literal["constant", "calm_decay", "free_adaptive"] = "constant"
    """``constant``; ``calm_decay`` (CALM's ``lambda e^(-tau t/N) / 10 + 9 lambda / 10``);
    ``free_adaptive`` (FREE's beta-mixture threshold, refitted while decoding; FREE's
    measure only)."""
    tau: float = Field(default=4.0, ge=0)
    """``calm_decay``: t5x's ``position_temp`` (4 in CALM and in every run of the study)."""
    max_length: int | None = Field(default=None, ge=1)
    """``calm_decay``: ``N`` (t5x's ``max_decode_length``); ``None``: the task's
    ``max_new_tokens``."""
    position_offset: int = Field(default=0, ge=0)
    """``calm_decay``: ``t = position + offset`` (0: t5x's loop index; 1: FREE's ``pos_time``)."""
    max_refits: int = Field(default=300, ge=0)
    """``free_adaptive``: FREE's ``bmm_update_max_iter``."""

    @property
    def label(self) -> str:
        """What the schedule adds to a measure's display name ('' for constant)."""
        if self.kind == "calm_decay":
            return f"decay tau={self.tau:g}"
        return "adaptive" if self.kind == "free_adaptive" else ""


class MeasureConfig(_Strict):
    """One measure to replay, with options (a bare name in the YAML means defaults)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the measure's constructor."""
    label: str | None = None
    """Name shown in results; defaults to ``name`` (set it when one measure runs with
    several option sets)."""
    min_layer: int = Field(default=0, ge=0)
    """No exit before this layer (0-based)."""
    min_position: int = Field(default=0, ge=0)
    """No exit for tokens at positions below this (0-based; the study's ``min_exit_seq_len``)."""
    schedule: ScheduleConfig | None = None
    """The threshold schedule (``None``: constant); the swept thresholds are its base."""
    thresholds: list[float] | None = None
    """Overrides the measure's own sweep."""

    @property
    def display_name(self) -> str:
        """The label, else the name with the schedule (``softmax_margin (decay tau=4)``), so
        a decayed variant is its own series."""
        if self.label:
            return self.label
        suffix = self.schedule.label if self.schedule is not None else ""
        return f"{self.name} ({suffix})" if suffix else self.name


class DraftStopConfig(_Strict):
    """Self-speculation's optional draft-stopping rule: stop drafting after a token whose
    score by ``measure`` at the draft's exit layer is below the threshold."""

    measure: str
    """A registered measure (``exitbench ls measures``)."""
    options: dict[str, Any] = Field(default_factory=dict)
    thresholds: list[float] = Field(min_length=1)
    """Each threshold is a point of the sweep."""


class MethodConfig(_Strict):
    """A decoding method beside early exit, swept over its options: every combination is
    a point (a result row per profile and batch size)."""

    name: Literal["self_speculative"]
    """``self_speculative``: LayerSkip-style drafting with the first ``E`` layers, verified
    by the rest in one pass (lossless; docs/self_speculative.md)."""
    label: str | None = None
    """Series name in results; defaults to ``name`` (set it for several entries)."""
    draft_depths: list[int] | None = None
    """``E`` values: the draft runs layers ``0..E-1``; ``None``: every ``1..L-1``."""
    draft_lengths: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1)
    """``k`` values: tokens drafted per cycle at most."""
    stop: DraftStopConfig | None = None
    stop_at_eos: bool = False
    """Stop drafting after a drafted EOS, as LayerSkip does (draft counts become bounds
    where the draft leaves the trace); off: every cycle drafts ``min(k, budget - 1)``."""
    online_draft_depths: list[int] | None = None
    """The ``E`` values ``exitbench online`` / ``fidelity`` decode (``None``: the sweep's)."""
    online_draft_lengths: list[int] | None = None
    """The ``k`` values decoded online (``None``: the sweep's)."""

    @property
    def display_name(self) -> str:
        return self.label or self.name

    @field_validator("draft_depths", "draft_lengths", "online_draft_depths",
                     "online_draft_lengths")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(v < 1 for v in value)):
            raise ValueError("must be a non-empty list of integers >= 1")
        return value


class TokenizerConfig(_Strict):
    """A SentencePiece tokenizer the suite trains for its own backbones."""

    path: str
    """Folder to write (skipped when it already holds a tokenizer)."""
    tasks: list[str] = Field(min_length=1)
    split: str
    heldout_split: str
    """Unseen text on which the unknown-token rate is measured."""
    vocab_size: int = Field(default=4000, ge=16)
    max_unk_rate: float = Field(default=0.01, ge=0.0, le=1.0)
    limit: int | None = Field(default=None, ge=1)


class TrainConfig(_Strict):
    """Train the backbone here when its folder does not hold a finished model: fresh from
    a preset with the config's ``tokenizer``, or fine-tuned from ``init``."""

    objective: Literal["vanilla", "calm", "free", "layerskip"] = "calm"
    init: str | None = None
    """Pretrained checkpoint to fine-tune (hub id or folder; its own tokenizer is used)."""
    preset: str | None = None
    """Size of a fresh model (default ``tiny``); not with ``init``."""
    tasks: list[str] = Field(min_length=1)
    split: str
    eval_split: str | None = None
    eval_every: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)
    steps: int = Field(default=600, ge=1)
    batch_size: int = Field(default=16, ge=1)
    """The global batch (over all workers and accumulation steps)."""
    learning_rate: float = Field(default=3e-3, gt=0)
    warmup_steps: int = Field(default=30, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    dropout_rate: float | None = Field(default=None, ge=0, lt=1)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    final_lr_fraction: float = Field(default=0.1, ge=0, le=1)
    grad_accum_steps: int = Field(default=1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    gradient_checkpointing: bool = False
    max_source_tokens: int | None = Field(default=None, ge=2)
    max_target_tokens: int | None = Field(default=None, ge=2)
    shallow_layer: int | None = Field(default=None, ge=1)
    """FREE: shallow layers, 1-based (default ``L / 4``, FREE's 6 of 24)."""
    layer_map: Literal["dyna", "uniform", "last"] = "dyna"
    """FREE: the distillation layer map (FREE's default ``dyna``)."""
    kd_weight: float = Field(default=0.5, ge=0)
    layer_dropout: float | None = Field(default=None, ge=0, lt=1)
    """LayerSkip: the last layer's dropout rate (default 0.2, LayerSkip's)."""
    early_exit_scale: float | None = Field(default=None, gt=0)
    """LayerSkip: scale of the early exits' losses (default 1.0)."""
    curriculum: Literal["gradual", "none"] | None = None
    """LayerSkip: which exits' losses count when (default gradual)."""
    seed: int = 0
    workers: int | None = Field(default=None, ge=1)
    """Ray Train workers (PyTorch DDP, one GPU each when ``device`` is CUDA) on the config's
    Ray (``ray.address``); ``None`` trains in the driver process."""
    checkpoint_every: int = Field(default=100, ge=1)

    @model_validator(mode="after")
    def _preset_or_init(self) -> TrainConfig:
        if self.init is not None and self.preset is not None:
            raise ValueError("give either 'preset' (a fresh model) or 'init' (a pretrained "
                             "checkpoint to fine-tune), not both")
        return self


class ModelConfig(_Strict):
    """One backbone: a hub id or a local folder written by ``save_pretrained``."""

    name: str
    path: str
    """Hub id (``google-t5/t5-small``) or local folder."""
    label: str | None = None
    """Shown on the leaderboard next to the numbers, e.g. 'tiny T5 trained here on the SQuAD sample'."""
    train: TrainConfig | None = None
    """When set and ``path`` holds no finished model, the suite trains it there first
    (with the suite config's ``tokenizer``)."""
    chat_template: bool = False
    """Decoder-only models: wrap each task's prompt as the user turn of the tokenizer's chat
    template (``suite/prompts.py``); plain prompts otherwise."""


class RayConfig(_Strict):
    address: str | None = None
    """``None`` starts Ray in-process on 127.0.0.1; ``auto`` or ``HOST:PORT`` joins a cluster."""
    num_cpus: int | None = Field(default=None, ge=1)
    """CPUs of the in-process Ray instance (default: all)."""
    record_workers: int = Field(default=1, ge=1)
    """Recording actors; each loads the model once and records many shards."""
    cpus_per_worker: int = Field(default=1, ge=1)
    """CPUs (torch threads) per worker when the device is the CPU."""
    max_retries: int = Field(default=2, ge=0)
    """Retries of a failing shard before the run stops and names it."""


class AnalysisConfig(_Strict):
    """Settings of ``exitbench analyze`` (the study's monotonicity and saturation analyses)."""

    saturation_threshold: float = Field(default=0.9, gt=-1.0, le=1.0)
    """A layer is saturated when its hidden state's cosine with the last layer's reaches this."""
    top_k: int = Field(default=1000, ge=1)
    """Easy / difficult sequences: the K with the highest / lowest mean similarity (capped at
    half the sequences)."""
    increasing_from: list[int] = Field(default_factory=lambda: [0, 4, 8])
    """Start layers of the strictly-increasing-similarity indicators, given for a 24-layer
    model and scaled to shallower ones."""
    states: Literal["normed", "raw"] = "normed"
    """Saturation cosines between final-normed states (the study's) or un-normed ones."""
    kinds: list[Literal["generated", "forced"]] = Field(default_factory=lambda: ["generated",
                                                                                 "forced"])
    """Trace kinds analysed: the model's own generations, reference-forced traces."""


class OnlineConfig(_Strict):
    """Settings of ``exitbench online`` / ``exitbench fidelity`` (real early-exit decoding)."""

    thresholds: list[float] | None = None
    """Thresholds decoded online per measure (each costs one decoding pass); ``None``: a few
    of the measure's own sweep, evenly spread."""
    num_thresholds: int = Field(default=4, ge=1)
    """How many of the measure's sweep to take when ``thresholds`` is not set."""
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8])
    repeats: int = Field(default=1, ge=1)
    """Timed decoding passes per setting; the median is reported."""
    threads: int | None = Field(default=None, ge=1)
    """``torch.set_num_threads`` for the timed runs on the CPU (``None``: torch's default);
    match the measured profile's threads when comparing with it."""
    profile: str | None = None
    """Hardware profile whose predicted tokens/s the fidelity report sets beside the measured
    ones; ``None``: the first of ``profiles``."""
    measures: list[str] | None = None
    """Labels of the measures decoded online (``None``: every measure; ``[]``: none, e.g.
    when only the ``methods`` are to be measured)."""


class SandboxConfig(_Strict):
    """How measures that are not built in (submissions, plugins) are isolated
    (:mod:`suite.sandbox`; ``docs/measures.md`` says what each mode guarantees)."""

    mode: Literal["bwrap", "process"] = "bwrap"
    """``bwrap``: bubblewrap namespaces + seccomp + limits; ``process``: limits and seccomp
    only, no file-system isolation (for code you trust, on machines without bubblewrap)."""
    memory_bytes: int = Field(default=8 << 30, ge=1 << 28)
    cpu_seconds: int = Field(default=3600, ge=1)
    call_seconds: float = Field(default=600.0, gt=0)
    """Wall-clock limit of one request (scoring a split's traces, a fit)."""
    validation_call_seconds: float = Field(default=120.0, gt=0)
    file_bytes: int = Field(default=2 << 30, ge=1 << 20)
    threads: int = Field(default=1, ge=1)

    def settings(self):
        from suite.sandbox import SandboxSettings

        return SandboxSettings(**self.model_dump())


class UncertaintyConfig(_Strict):
    """Bootstrap over examples behind every interval (:mod:`suite.uncertainty`); the seed is
    the config's ``seed``."""

    resamples: int = Field(default=1000, ge=2)
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
class CalibrationTarget(_Strict):
    """One guarantee to calibrate for (:mod:`suite.calibration`)."""

    measure: str
    """A measure of the config, by its display name (``softmax_margin (decay tau=4)``)."""
    risk: Literal["consistency_01", "consistency_rougeL", "task_loss"] = "consistency_01"
    """Textual consistency with the full model (0/1, or ``1 - ROUGE-L``), or risk
    consistency (the task loss's increase over the full model's)."""
    epsilon: float = Field(gt=0, lt=1)
    """Risk level to control."""
    delta: float = Field(default=0.1, gt=0, lt=1)
    """The guarantee holds with probability at least ``1 - delta``."""
    thresholds: list[float] | None = None
    """Candidate base thresholds; ``None``: the measure's sweep refined to ``num_thresholds``."""


class CalibrationConfig(_Strict):
    """``exitbench calibrate``: Learn-then-Test thresholds on ``tasks[].calibration_split``."""

    targets: list[CalibrationTarget] = Field(min_length=1)
    num_thresholds: int = Field(default=101, ge=0)
    """Evenly spaced candidates added to the measure's sweep."""
    validity_splits: int = Field(default=1000, ge=0)
    """Random calibration/test splits of the evaluated split's traces on which the share of
    test risks above epsilon is reported (0: skip)."""
    calibration_fraction: float = Field(default=0.5, gt=0, lt=1)
    """Share of examples in the calibration half of each random split."""


class SuiteConfig(_Strict):
    """A whole suite run."""

    name: str = "suite"
    output_dir: str = "runs/suite"
    data_dir: str | None = None
    """Folder of JSON Lines in the hub layout; ``None`` loads from the hub (or ``EXITBENCH_DATA_DIR``)."""
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tasks: list[TaskConfig] = Field(min_length=1)
    models: list[ModelConfig] = Field(default_factory=list)
    measures: list[MeasureConfig] = Field(default_factory=list)
    """Bare names or ``{name, options, label, min_layer, thresholds}`` mappings."""
    methods: list[MethodConfig] = Field(default_factory=list)
    """Decoding methods beside early exit (``self_speculative``), replayed and priced on
    the same traces, profiles and batch sizes as the measures."""
    profiles: list[str] = Field(default_factory=list)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 8, 32])
    record_batch_size: int = Field(default=8, ge=1)
    """Examples decoded together when recording traces."""
    shard_size: int = Field(default=64, ge=1)
    """Examples per trace shard."""
    ray: RayConfig = Field(default_factory=RayConfig)
    tokenizer: TokenizerConfig | None = None
    """Tokenizer for the backbones the suite trains (``models[].train``)."""
    leaderboard: bool = True
    """Build the static site into ``<output_dir>/site`` at the end of ``exitbench run``."""
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)
    calibration: CalibrationConfig | None = None
    """Thresholds with a statistical guarantee (``exitbench calibrate``, and ``exitbench run``
    when set)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Free-form settings for later stages (training, replay); kept in the manifest."""

    @field_validator("measures", mode="before")
    @classmethod
    def _measure_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _positive_batches(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError("must be a non-empty list of positive integers")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda"):
            raise ValueError(f"{value!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'")
        return value


def _format_location(loc: tuple[Any, ...], data: Any) -> str:
    """``('tasks', 0, 'limit')`` -> ``tasks[0].limit`` (with the task's name when known)."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = f"[{item}]"
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict) \
                    and "name" in node[item]:
                label = f"[{item}] ({node[item]['name']})"
            parts.append(label)
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "(top level)"


def is_local_model_path(path: str, base_dir: Path, trained_here: bool = False) -> bool:
    """Whether a model entry's ``path`` names a local folder (else it is a hub id): an
    absolute path, one starting with ``.`` or ``~``, the folder of a backbone the suite trains
    (``train:``), or a path that exists relative to ``base_dir``."""
    return (path.startswith((".", "~", "/")) or trained_here
            or (base_dir / path).expanduser().exists())


def _resolve(path: str, base_dir: Path) -> str:
    resolved = Path(path).expanduser()
    return str(resolved if resolved.is_absolute() else (base_dir / resolved).resolve())


def resolve_paths(config: SuiteConfig, base_dir: str | Path) -> SuiteConfig:
    """``config`` with its relative paths taken from ``base_dir`` (the config file's folder)."""
    from suite.profiles import is_profile_file

    base = Path(base_dir).resolve()
    update: dict[str, Any] = {"output_dir": _resolve(config.output_dir, base)}
    if config.data_dir is not None:
        update["data_dir"] = _resolve(config.data_dir, base)
    if config.tokenizer is not None:
        update["tokenizer"] = config.tokenizer.model_copy(
            update={"path": _resolve(config.tokenizer.path, base)})
    update["profiles"] = [_resolve(name, base) if is_profile_file(name) else name
                          for name in config.profiles]
    update["models"] = [
        model.model_copy(update={"path": _resolve(model.path, base)})
        if is_local_model_path(model.path, base, model.train is not None) else model
        for model in config.models]
    return config.model_copy(update=update)


def parse_config(data: Any, path: str = "<config>",
                 base_dir: str | Path | None = None) -> SuiteConfig:
    """Validate a config mapping; raise :class:`ConfigError` naming file, key and problem.
    With ``base_dir``, relative paths are resolved against it (:func:`resolve_paths`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a YAML mapping of keys to values, "
                          f"got {type(data).__name__}")
    try:
        config = SuiteConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = _format_location(tuple(err["loc"]), data)
            message = err["msg"]
            if err["type"] == "extra_forbidden":
                from suite.registry import closest_names
                known = list(_model_for(err["loc"]).model_fields)
                close = closest_names(str(err["loc"][-1]), known, n=1)
                message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "") \
                    + f"; valid keys here: {', '.join(known)}"
            lines.append(f"{path}: {key}: {message}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None
    _check_names(config, path)
    return config if base_dir is None else resolve_paths(config, base_dir)


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = SuiteConfig
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        annotation = {"tasks": TaskConfig, "models": ModelConfig, "ray": RayConfig,
                      "measures": MeasureConfig, "tokenizer": TokenizerConfig,
                      "train": TrainConfig, "analysis": AnalysisConfig,
                      "online": OnlineConfig, "sandbox": SandboxConfig,
                      "uncertainty": UncertaintyConfig, "schedule": ScheduleConfig,
                      "calibration": CalibrationConfig,
                      "targets": CalibrationTarget, "methods": MethodConfig,
                      "stop": DraftStopConfig}.get(str(item))
        if annotation is None:
            break
        model = annotation
    return model


def _check_names(config: SuiteConfig, path: str) -> None:
    from suite.measures import MEASURES
    from suite.profiles import PROFILES, is_profile_file
    from suite.tasks import TASKS, split_base

    errors = []
    for i, task in enumerate(config.tasks):
        if task.name not in TASKS:
            errors.append(f"{path}: tasks[{i}].name: {TASKS.unknown(task.name)}")
        try:
            split_base(task.split)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{path}: tasks[{i}] ({task.name}).split: {exc}")
    for key, registry, names in (("measures", MEASURES, [m.name for m in config.measures]),
                                 ("profiles", PROFILES, config.profiles)):
        for i, name in enumerate(names):
            if key == "profiles" and is_profile_file(name):
                continue  # a profile YAML file: checked when it is loaded
            if name not in registry:
                errors.append(f"{path}: {key}[{i}]: {registry.unknown(name)}")
    for i, method in enumerate(config.methods):
        if method.stop is not None and method.stop.measure not in MEASURES:
            errors.append(f"{path}: methods[{i}] ({method.name}).stop.measure: "
                          f"{MEASURES.unknown(method.stop.measure)}")
    measure_labels = [m.display_name for m in config.measures]
    for name in config.online.measures or ():
        if name not in measure_labels:
            errors.append(f"{path}: online.measures: {name!r} is not one of the config's "
                          f"measures ({', '.join(measure_labels) or 'none'})")
    labels = measure_labels + [m.display_name for m in config.methods]
    for dup in sorted({n for n in labels if labels.count(n) > 1}):
        errors.append(f"{path}: measures: {dup!r} appears twice; give one a distinct 'label'")
    for i, target in enumerate(config.calibration.targets if config.calibration else []):
        if target.measure not in labels:
            from suite.registry import closest_names

            close = closest_names(target.measure, labels, n=1)
            errors.append(f"{path}: calibration.targets[{i}].measure: {target.measure!r} is not "
                          f"a measure of this config" + (f" (did you mean {close[0]!r}?)"
                                                          if close else "")
                          + f"; use one of {', '.join(labels) or '(none)'}")
    if config.calibration and not any(t.calibration_split for t in config.tasks):
        errors.append(f"{path}: calibration: no task has a calibration_split; set "
                      f"tasks[].calibration_split to a split disjoint from the evaluated one")
    model_names = [m.name for m in config.models]
    for dup in sorted({n for n in model_names if model_names.count(n) > 1}):
        errors.append(f"{path}: models: the name {dup!r} is used twice; names must be unique")
    for i, model in enumerate(config.models):
        if model.train is not None and model.train.init is None and config.tokenizer is None:
            errors.append(f"{path}: models[{i}] ({model.name}).train: training a backbone from "
                          f"scratch needs a top-level 'tokenizer' section (or 'init' to "
                          f"fine-tune a pretrained checkpoint)")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


def load_config(path: str | Path) -> SuiteConfig:
    """Read and validate a suite config file; its relative paths are taken from its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(data, str(path), base_dir=path.parent)


__all__ = ["SuiteConfig", "AnalysisConfig", "OnlineConfig", "TaskConfig", "ModelConfig", "MeasureConfig", "MethodConfig", "DraftStopConfig", "RayConfig", "load_config",
           "parse_config", "ConfigError", "UnknownNameError"]
