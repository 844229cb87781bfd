"""Hardware profiles: one YAML file per device, ``kind: simulated`` (device specs with a
source for every figure) or ``kind: measured`` (tables of timed operations written by
``exitbench profile``). Built-ins are ``hardware_profiles/*.yaml``; plugins come from the
``exitbench.profiles`` entry-point group (an entry point names a loaded profile object, or a
callable returning one or a path to a YAML file).

Both kinds load into frozen, validated pydantic records (:class:`SimulatedProfile`,
:class:`MeasuredProfile`); every validation error names the file, the key path and the fix.
Units live in the key names: ``*_flops_per_s``, ``*_bytes_per_s``, ``*_bytes``,
``*_seconds``. Sizes are stored in bytes, never GB; FLOP/s are **dense** figures, never the
2:4-sparsity ones vendors print next to them. ``docs/cost_model.md`` documents both schemas
and how :mod:`suite.cost` prices operations from them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from suite.errors import ConfigError
from suite.registry import Registry, closest_names

PROFILES_DIR = Path(__file__).resolve().parent.parent / "hardware_profiles"

Dtype = Literal["float32", "tf32", "bfloat16", "float16"]
"""Compute dtypes a profile may price. ``tf32`` is float32 storage with TF32 tensor-core
matmuls (``torch.backends.cuda.matmul.allow_tf32``); ``float32`` is strict FP32."""

DTYPES: tuple[str, ...] = ("float32", "tf32", "bfloat16", "float16")

BYTES_PER_PARAM: dict[str, int] = {"float32": 4, "tf32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per stored weight or activation value at each compute dtype."""

MEASURED_FORMAT_VERSION = 1

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class ProfileError(ConfigError):
    """A hardware profile file that does not load or validate, or a request it cannot serve."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- latency limits (both kinds) ---------------------------------------------------------------
class LatencyLimits(_Strict):
    """MLPerf-style per-request latency limits a profile may declare: TTFT and TPOT (see
    :mod:`suite.latency`) at a percentile over the task's requests. Points over a limit are
    flagged in the results (``meets_latency_limits``) and the ranking can leave them out."""

    percentile: Literal[50, 90, 99] = 99
    ttft_seconds: PositiveFloat | None = None
    """Time to first token (prefill plus the first step)."""
    tpot_seconds: PositiveFloat | None = None
    """Time per output token after the first."""
    source: str = ""
    """Where the limits come from (a benchmark's rules and URL, or ``assumption: ...``)."""

    @model_validator(mode="after")
    def _some_limit(self) -> LatencyLimits:
        if self.ttft_seconds is None and self.tpot_seconds is None:
            raise ValueError("give ttft_seconds, tpot_seconds or both (or drop latency_limits)")
        return self


# -- simulated ---------------------------------------------------------------------------------
SIMULATED_FIGURES: tuple[str, ...] = (
    "peak_flops_per_s", "memory_bandwidth_bytes_per_s", "memory_bytes", "kernel_launch_seconds",
    "fixed_step_seconds", "exit_sync_seconds", "compute_efficiency", "memory_efficiency")
"""The figures of a simulated profile; each needs an entry in ``sources``."""


class SimulatedProfile(_Strict):
    """A device described by its specifications; priced by the roofline in :mod:`suite.cost`."""

    name: str
    kind: Literal["simulated"]
    description: str
    peak_flops_per_s: dict[Dtype, PositiveFloat] = Field(min_length=1)
    """Dense peak FLOP/s per compute dtype (never the sparsity figure). A dtype the device
    cannot run is absent (and may be explained in ``unsupported_dtypes``)."""
    memory_bandwidth_bytes_per_s: PositiveFloat
    """Peak device-memory bandwidth."""
    memory_bytes: PositiveInt
    """Device memory size."""
    kernel_launch_seconds: NonNegativeFloat
    """Host-side cost of issuing one kernel (eager PyTorch dispatch + launch)."""
    fixed_step_seconds: NonNegativeFloat
    """Cost of one decoding step outside the layers: the Python loop, embedding lookup,
    argmax, stopping criterion."""
    exit_sync_seconds: NonNegativeFloat
    """Cost of bringing one exit decision to the host (device-to-host copy and stream
    synchronisation); paid once per check, since the next layer depends on it."""
    compute_efficiency: Fraction
    """Achievable fraction of ``peak_flops_per_s`` for the matmuls of decoding."""
    memory_efficiency: Fraction
    """Achievable fraction of ``memory_bandwidth_bytes_per_s``."""
    unsupported_dtypes: dict[Dtype, str] = Field(default_factory=dict)
    """Dtype -> why the device cannot run it (shown when a config asks for it)."""
    sources: dict[str, str | dict[str, str]]
    """Figure name -> where it comes from: a datasheet name and URL, or
    ``"assumption: <reasoning>"``. ``peak_flops_per_s`` may map each dtype to its own source."""
    latency_limits: LatencyLimits | None = None
    """Optional per-request TTFT / TPOT limits (MLPerf-style)."""
    path: str | None = None
    """The YAML file it was loaded from (set by the loader)."""

    @field_validator("memory_bytes", mode="before")
    @classmethod
    def _bytes_not_gb(cls, value: Any) -> Any:
        if isinstance(value, str) and re.search(r"[A-Za-z]", value):
            raise ValueError(f"{value!r} is not a byte count; store bytes as an integer "
                             f"(80 GiB = 85899345920), not GB")
        return value

    def peak_for(self, dtype: str) -> float:
        """Dense peak FLOP/s at ``dtype``; a :class:`ProfileError` when the device lacks it."""
        if dtype not in self.peak_flops_per_s:
            reason = self.unsupported_dtypes.get(dtype)  # type: ignore[call-overload]
            why = f": {reason}" if reason else ""
            raise ProfileError(
                f"hardware profile {self.name!r} ({self.path or 'in memory'}) has no {dtype} "
                f"figure{why}. Use one of its dtypes ({', '.join(self.peak_flops_per_s)}) in "
                f"the suite config's 'dtype', or leave this profile out of 'profiles'.")
        return float(self.peak_flops_per_s[dtype])  # type: ignore[index]


def _check_sources(profile: SimulatedProfile) -> list[tuple[str, str]]:
    """(key, problem) pairs for sources that are missing, unknown or uninformative."""
    problems: list[tuple[str, str]] = []
    valid = "a datasheet name with its URL (http...), or 'assumption: <reasoning>'"

    def check_text(key: str, text: Any) -> None:
        if not isinstance(text, str) or not text.strip():
            problems.append((key, f"must be a non-empty string: {valid}"))
        elif "http" not in text and not text.strip().lower().startswith("assumption:"):
            problems.append((key, f"{text[:60]!r} names no URL and is not an assumption; "
                                  f"give {valid}"))

    for figure in SIMULATED_FIGURES:
        key = f"sources.{figure}"
        if figure not in profile.sources:
            problems.append((key, f"missing; every figure needs a source: {valid}"))
            continue
        entry = profile.sources[figure]
        if isinstance(entry, dict):
            if figure != "peak_flops_per_s":
                problems.append((key, "must be one string (only peak_flops_per_s may give "
                                      "one source per dtype)"))
                continue
            for dtype in profile.peak_flops_per_s:
                if dtype not in entry:
                    problems.append((f"{key}.{dtype}", "missing; give the source of this "
                                                       "dtype's FLOP/s, or one string for all"))
                else:
                    check_text(f"{key}.{dtype}", entry[dtype])
            for extra in sorted(set(entry) - set(profile.peak_flops_per_s)):
                problems.append((f"{key}.{extra}", "names a dtype that peak_flops_per_s lacks"))
        else:
            check_text(key, entry)
    for extra in sorted(set(profile.sources) - set(SIMULATED_FIGURES)):
        close = closest_names(extra, list(SIMULATED_FIGURES), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append((f"sources.{extra}", f"is not a figure of a simulated profile{hint}; "
                                             f"figures: {', '.join(SIMULATED_FIGURES)}"))
    for dtype in profile.unsupported_dtypes:
        if dtype in profile.peak_flops_per_s:
            problems.append((f"unsupported_dtypes.{dtype}", "is also in peak_flops_per_s; "
                                                            "keep it in one of the two"))
    return problems


# -- measured ----------------------------------------------------------------------------------
def _increasing(values: list[int], key: str) -> None:
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{key} must be strictly increasing, got {values}")


class BatchTable(_Strict):
    """Seconds of one operation by batch size."""

    batch_sizes: list[PositiveInt] = Field(min_length=1)
    seconds: list[NonNegativeFloat] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> BatchTable:
        _increasing(self.batch_sizes, "batch_sizes")
        if len(self.seconds) != len(self.batch_sizes):
            raise ValueError(f"seconds has {len(self.seconds)} values but batch_sizes has "
                             f"{len(self.batch_sizes)}; give one time per batch size")
        return self


class _GridTable(_Strict):
    batch_sizes: list[PositiveInt] = Field(min_length=1)
    seconds: list[list[NonNegativeFloat]] = Field(min_length=1)

    def _check_grid(self, columns: list[int], column_key: str) -> None:
        _increasing(self.batch_sizes, "batch_sizes")
        _increasing(columns, column_key)
        if len(self.seconds) != len(self.batch_sizes):
            raise ValueError(f"seconds has {len(self.seconds)} rows but batch_sizes has "
                             f"{len(self.batch_sizes)}; give one row per batch size")
        for i, row in enumerate(self.seconds):
            if len(row) != len(columns):
                raise ValueError(f"seconds[{i}] has {len(row)} values but {column_key} has "
                                 f"{len(columns)}; give one time per {column_key[:-1]}")


class DecoderLayerTable(_GridTable):
    """Seconds of one decoder-layer step (one new token per row) by batch size and context
    length (self-attention keys, the current token included), at one source length."""

    context_lens: list[PositiveInt] = Field(min_length=1)
    source_len: PositiveInt
    """Source length (cross-attention keys) the table was timed at."""

    @model_validator(mode="after")
    def _shape(self) -> DecoderLayerTable:
        self._check_grid(self.context_lens, "context_lens")
        return self


class EncoderPrefillTable(_GridTable):
    """Seconds of the whole encoder pass plus the cross-attention K/V of every decoder layer,
    by batch size and source length."""

    source_lens: list[PositiveInt] = Field(min_length=1)

    @model_validator(mode="after")
    def _shape(self) -> EncoderPrefillTable:
        self._check_grid(self.source_lens, "source_lens")
        return self


class VerifyLayerTable(_GridTable):
    """Seconds of one decoder layer running ``query_len`` positions per row in one causal
    pass (self-speculation's verification of ``query_len - 1`` drafts), by batch size and
    query length, at one context length (keys, the queries included) and source length."""

    query_lens: list[PositiveInt] = Field(min_length=1)
    context_len: PositiveInt
    source_len: PositiveInt
    setup_seconds: list[list[NonNegativeFloat]] | None = None
    """``[batch][query length]``: ``begin_catch_up``, the masks and relative position bias
    of the pass (once per verification, not per layer)."""

    @model_validator(mode="after")
    def _shape(self) -> VerifyLayerTable:
        self._check_grid(self.query_lens, "query_lens")
        if self.setup_seconds is not None and (
                len(self.setup_seconds) != len(self.batch_sizes)
                or any(len(row) != len(self.query_lens) for row in self.setup_seconds)):
            raise ValueError("setup_seconds must be [batch][query length] like seconds")
        return self


class MeasuredTables(_Strict):
    """The timed operations; each time is the statistic (median) of ``method.repeats`` runs."""

    decoder_layer_seconds: DecoderLayerTable
    lm_head_seconds: BatchTable
    """Final norm + LM head + softmax over the vocabulary."""
    kv_fill_seconds: BatchTable
    """K/V projections of one skipped layer for the propagated states (CALM)."""
    measure_check_seconds: dict[str, BatchTable] = Field(default_factory=dict)
    """Measure name -> one check at one layer, on inputs already computed (the LM head
    excluded: it is priced from ``lm_head_seconds`` when the measure needs it)."""
    encoder_prefill_seconds: EncoderPrefillTable
    fixed_step_seconds: NonNegativeFloat
    """One decoding step outside the layers (loop, embedding, argmax, stopping)."""
    verify_layer_seconds: VerifyLayerTable | None = None
    """Self-speculation's verification pass per layer (profiles measured before it have
    none: the cost model then prices ``query_len`` tokens as that many one-token rows)."""
    rollback_seconds: BatchTable | None = None
    """Self-speculation's per-cycle acceptance and K/V rollback of rejected drafts (``0``
    in profiles measured before it)."""
    position_bias_seconds: BatchTable | None = None
    """One step's relative position bias (block 0 computes it for every pass; the decoder
    table spreads it over the depth), for pricing passes shallower than the model."""


class MeasuredEnvironment(_Strict):
    """Where the tables were timed."""

    device_name: str
    """As the driver reports it (``torch.cuda.get_device_name()``, or the CPU model)."""
    torch_version: str
    dtype: Dtype
    threads: PositiveInt
    """``torch.get_num_threads()`` during timing."""
    cuda_version: str | None = None
    host: str | None = None


class MeasuredModel(_Strict):
    """The model whose operations were timed: tables are valid for these sizes only."""

    id: str
    num_layers: PositiveInt
    d_model: PositiveInt
    d_ff: PositiveInt
    num_heads: PositiveInt
    d_kv: PositiveInt
    vocab_size: PositiveInt
    num_encoder_layers: PositiveInt | None = None
    gated_ffn: bool = False


class MeasuredMethod(_Strict):
    """How each table entry was timed."""

    warmup: NonNegativeInt
    """Untimed runs before timing (allocator, autotuning, caches)."""
    repeats: PositiveInt
    """Timed runs per entry."""
    statistic: Literal["median"] = "median"
    timer: str = "torch.cuda.Event on CUDA, time.perf_counter on CPU (after synchronize)"


class MeasuredProfile(_Strict):
    """A device described by tables of timed operations (``exitbench profile``)."""

    name: str
    kind: Literal["measured"]
    description: str
    format_version: Literal[1] = MEASURED_FORMAT_VERSION
    measured_at: str | None = None
    """ISO 8601 time of the measurement."""
    suite_version: str | None = None
    environment: MeasuredEnvironment
    model: MeasuredModel
    method: MeasuredMethod
    tables: MeasuredTables
    latency_limits: LatencyLimits | None = None
    """Optional per-request TTFT / TPOT limits (MLPerf-style)."""
    path: str | None = None


def example_measured_profile() -> dict[str, Any]:
    """A small valid measured profile as a mapping: the schema ``exitbench profile`` writes,
    with toy numbers (for documentation and tests; not a real device)."""
    return {
        "name": "toy_measured", "kind": "measured", "description": "toy tables (an example)",
        "format_version": MEASURED_FORMAT_VERSION,
        "measured_at": "2025-01-01T00:00:00Z", "suite_version": "0.1.0",
        "environment": {"device_name": "Toy CPU", "torch_version": "2.3.0",
                        "dtype": "float32", "threads": 2},
        "model": {"id": "toy-t5", "num_layers": 4, "d_model": 64, "d_ff": 128,
                  "num_heads": 4, "d_kv": 16, "vocab_size": 100},
        "method": {"warmup": 3, "repeats": 10, "statistic": "median"},
        "tables": {
            "decoder_layer_seconds": {"batch_sizes": [1, 8], "context_lens": [16, 64],
                                      "source_len": 128,
                                      "seconds": [[1e-3, 2e-3], [3e-3, 4e-3]]},
            "lm_head_seconds": {"batch_sizes": [1, 8, 32], "seconds": [1e-4, 3e-4, 9e-4]},
            "kv_fill_seconds": {"batch_sizes": [1], "seconds": [2e-4]},
            "measure_check_seconds": {"softmax_margin": {"batch_sizes": [1, 32],
                                                         "seconds": [1e-5, 4.1e-5]}},
            "encoder_prefill_seconds": {"batch_sizes": [1, 8], "source_lens": [64, 256],
                                        "seconds": [[1e-2, 3e-2], [5e-2, 1.5e-1]]},
            "fixed_step_seconds": 5e-5,
        },
    }


HardwareProfile = SimulatedProfile | MeasuredProfile
"""What the profile registry holds."""


# -- loading -----------------------------------------------------------------------------------
def _format_location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if item == "[key]":  # pydantic's marker for a bad mapping key: the key is named already
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _model_fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The valid keys at ``loc`` (for "unknown key" hints), following nested models."""
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(str(item))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            break
    return [name for name in model.model_fields if name != "path"]


def parse_profile(data: Any, path: str = "<profile>", name: str | None = None) -> HardwareProfile:
    """Validate a profile mapping; a :class:`ProfileError` names the file, key and fix."""
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a hardware profile must be a YAML mapping, got "
                           f"{type(data).__name__}")
    kind = data.get("kind")
    model: type[BaseModel]
    if kind == "simulated":
        model = SimulatedProfile
    elif kind == "measured":
        model = MeasuredProfile
    else:
        raise ProfileError(f"{path}: kind: {kind!r} is not a profile kind; write 'kind: "
                           f"simulated' (device specs with sources) or 'kind: measured' "
                           f"(tables from `exitbench profile`)")
    if "path" in data:
        raise ProfileError(f"{path}: path: reserved (set by the loader); remove it")
    data = dict(data)
    if name is not None:
        if data.setdefault("name", name) != name:
            raise ProfileError(f"{path}: name: {data['name']!r} differs from the file name "
                               f"{name!r}; rename the file or the name so they agree")
    data["path"] = path
    try:
        profile = model.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                known = _model_fields_at(model, loc)
                close = closest_names(str(loc[-1]), known, n=1)
                message = "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "") \
                    + f"; valid keys here: {', '.join(known)}"
            elif err["type"] == "missing":
                message = "missing; add it (the schema is in docs/cost_model.md)"
            lines.append(f"{path}: {_format_location(loc)}: {message}")
        raise ProfileError("invalid hardware profile:\n  " + "\n  ".join(lines)) from None
    if isinstance(profile, SimulatedProfile):
        problems = _check_sources(profile)
        if problems:
            raise ProfileError("invalid hardware profile:\n  " + "\n  ".join(
                f"{path}: {key}: {problem}" for key, problem in problems))
    return profile  # type: ignore[return-value]


def load_profile(path: str | Path) -> HardwareProfile:
    """Read and validate one profile YAML file (its name defaults to the file's stem)."""
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"{path}: hardware profile file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    return parse_profile(data, str(path), name=path.stem)


def _discover_builtin_profiles(registry: Registry[HardwareProfile]) -> None:
    for path in sorted(PROFILES_DIR.glob("*.yaml")):
        registry.register(path.stem, loader=lambda p=path: load_profile(p), source="builtin")


def _check_profile(name: str, value: Any) -> HardwareProfile:
    if callable(value) and not isinstance(value, BaseModel):
        value = value()
    if isinstance(value, (str, Path)):
        value = load_profile(value)
    if not isinstance(value, (SimulatedProfile, MeasuredProfile)):
        raise TypeError(f"profile {name!r} must be a SimulatedProfile, a MeasuredProfile or a "
                        f"path to a profile YAML file, got {value!r}")
    return value


PROFILES: Registry[HardwareProfile] = Registry("profile", "exitbench.profiles",
                                               _discover_builtin_profiles, _check_profile)


def is_profile_file(name: str) -> bool:
    """A config's ``profiles`` entry that names a YAML file (e.g. one `exitbench profile`
    wrote for your own GPU) rather than a registered profile."""
    return name.endswith((".yaml", ".yml"))


_FILES: dict[str, HardwareProfile] = {}


def get_profile(name: str) -> HardwareProfile:
    """A registered profile by name, or a profile YAML file by path (its stem is its name)."""
    if is_profile_file(name):
        path = Path(name)
        if not path.is_file():
            raise ProfileError(f"hardware profile file {path} does not exist; give a profile "
                               f"name (see `exitbench ls profiles`) or the path of a profile "
                               f"YAML file (`exitbench profile ... --out FILE.yaml` writes one)")
        key = str(path.resolve())
        if key not in _FILES:
            _FILES[key] = load_profile(path)
        return _FILES[key]
    return PROFILES.get(name)
