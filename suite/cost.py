"""The cost model: what a replayed early-exit decoding costs on a hardware profile.

Two layers:

1. :class:`OperationCosts`, the seconds of each operation of T5 decoding (a decoder-layer
   step, the LM head, the K/V fill of a skipped layer, one confidence check, the encoder
   prefill, the fixed per-step cost). :class:`SimulatedCosts` prices them with a roofline
   from a :class:`~suite.profiles.SimulatedProfile`; :class:`MeasuredCosts` interpolates the
   tables of a :class:`~suite.profiles.MeasuredProfile`. :func:`operation_costs` picks one.
   Every method takes numpy arrays (broadcast together) and returns seconds of that shape,
   so the schedule below prices all steps and thresholds in a few array calls.
2. :func:`decode_seconds`, the schedule: replayed exit layers ``[K, T]`` -> seconds ``[K]``
   for a batch size and a K/V propagation scheme (CALM, FREE or none), and
   :func:`full_depth_seconds` for the speedup's denominator.

``docs/cost_model.md`` gives the formulas, units, assumptions and sources.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from suite.errors import ExitbenchError
from suite.latency import RequestLatency
from suite.measures import CheckCost, ModelDims
from suite.profiles import (
    BYTES_PER_PARAM,
    HardwareProfile,
    MeasuredProfile,
    ProfileError,
    SimulatedProfile,
)

Propagation = Literal["calm", "free", "none"]
PROPAGATIONS: tuple[str, ...] = ("calm", "free", "none")

# Kernels per operation in eager PyTorch Hugging Face T5 (no fusion). Each costs the profile's
# ``kernel_launch_seconds``; at decoding batch sizes this host-side cost is often the largest
# term, which is why early exit pays off less on fast GPUs than FLOP counts suggest.
RMS_NORM_KERNELS = 4  # pow, mean, rsqrt(+eps), two multiplies fused by nothing: ~4
SELF_ATTENTION_KERNELS = RMS_NORM_KERNELS + 11  # q,k,v, 2 cache appends, QK^T, +bias, softmax, AV, o, residual
CROSS_ATTENTION_KERNELS = RMS_NORM_KERNELS + 7  # q, QK^T, +bias, softmax, AV, o, residual
FFN_KERNELS = RMS_NORM_KERNELS + 4  # wi, activation, wo, residual
GATED_FFN_EXTRA_KERNELS = 2  # wi_1 and the gate multiply
DECODER_LAYER_KERNELS = SELF_ATTENTION_KERNELS + CROSS_ATTENTION_KERNELS + FFN_KERNELS
LM_HEAD_KERNELS = RMS_NORM_KERNELS + 3  # tied-embedding scaling, matmul, softmax
KV_FILL_KERNELS = RMS_NORM_KERNELS + 4  # k, v, 2 cache appends
CHECK_KERNELS = 3  # the measure's op(s) and the comparison with the threshold
ENCODER_LAYER_KERNELS = RMS_NORM_KERNELS + 9 + FFN_KERNELS  # q,k,v, QK^T, +bias, softmax, AV, o, residual
CROSS_KV_KERNELS_PER_DECODER_LAYER = 2  # cross-attention k and v of the encoder output

FREE_CHUNK_ELEMENTS = 1 << 22
"""Bound on the ``[thresholds, steps, layers]`` scratch of the FREE schedule (~32 MB each)."""


class CostModelError(ExitbenchError):
    """Inputs to the cost model that do not fit together."""


# -- operation costs ---------------------------------------------------------------------------
@runtime_checkable
class OperationCosts(Protocol):
    """Seconds of each operation of one decoding step, for a whole batch. Arguments are numpy
    arrays (or scalars) broadcast together; results have their broadcast shape."""

    name: str

    def decoder_layer(self, batch_size: np.ndarray, context_len: np.ndarray,
                      source_len: np.ndarray, query_len: np.ndarray | int = 1) -> np.ndarray:
        """One decoder layer for ``batch_size`` rows of ``query_len`` new tokens each, attending
        to ``context_len`` decoder keys (the current token included) and ``source_len``
        encoder keys. ``query_len > 1`` is FREE's deferred parallel pass."""
        ...

    def lm_head(self, batch_size: np.ndarray) -> np.ndarray:
        """Final norm + LM head + softmax for ``batch_size`` rows."""
        ...

    def kv_fill(self, batch_size: np.ndarray) -> np.ndarray:
        """K/V projections of one skipped layer for ``batch_size`` propagated states (CALM)."""
        ...

    def measure_check(self, check_cost: CheckCost, batch_size: np.ndarray,
                      measure_name: str | None = None) -> np.ndarray:
        """One confidence check at one layer for ``batch_size`` rows, the LM head excluded."""
        ...

    def encoder_prefill(self, batch_size: np.ndarray, source_len: np.ndarray) -> np.ndarray:
        """The encoder over ``batch_size`` sources of ``source_len`` tokens, plus the
        cross-attention K/V of every decoder layer (computed once per batch)."""
        ...

    def fixed_step(self) -> float:
        """One decoding step outside the layers (loop, embedding, argmax, stopping)."""
        ...


@dataclass(frozen=True)
class Roofline:
    """One operation's time split into its roofline terms (arrays of one shape)."""

    compute_seconds: np.ndarray
    """FLOPs / (peak FLOP/s x compute efficiency)."""
    memory_seconds: np.ndarray
    """Bytes / (bandwidth x memory efficiency)."""
    overhead_seconds: np.ndarray
    """Kernel launches (and, for checks, the exit decision's host synchronisation)."""

    @property
    def seconds(self) -> np.ndarray:
        return np.maximum(self.compute_seconds, self.memory_seconds) + self.overhead_seconds

    @property
    def compute_bound(self) -> np.ndarray:
        """True where compute, not memory traffic, sets the time."""
        return self.compute_seconds >= self.memory_seconds


class SimulatedCosts:
    """Roofline prices from device specs: per operation
    ``max(flops / (peak[dtype] * compute_eff), bytes / (bandwidth * memory_eff))
    + kernels * kernel_launch_seconds``.

    FLOPs count matmuls and attention (2 per multiply-add); element-wise work is left out.
    Bytes count weights (read once per batch), the K/V caches, and each matmul's inputs and
    outputs. ``gated_ffn`` (t5-v1_1, flan-t5: ``wi_0``, ``wi_1``, ``wo``) adds the third FFN
    matrix; ``num_encoder_layers`` defaults to the decoder's depth (T5 is symmetric).
    ``decoder_only`` (Llama-style causal LMs) drops cross-attention: a step's layer runs
    self q,k,v,o and the FFN, attending over prompt and output alike (``source_len`` is the
    prompt), and the prefill is the decoder's own layers over the prompt (pass
    ``num_encoder_layers`` = the depth), without cross K/V. Grouped-query attention is
    priced as full multi-head K/V (an upper bound on the K/V bytes)."""

    def __init__(self, profile: SimulatedProfile, dims: ModelDims, dtype: str,
                 gated_ffn: bool = False, num_encoder_layers: int | None = None,
                 decoder_only: bool = False):
        self.decoder_only = bool(decoder_only)
        self.profile = profile
        self.name = profile.name
        self.dims = dims
        self.dtype = dtype
        self.gated_ffn = bool(gated_ffn)
        self.num_encoder_layers = dims.num_layers if num_encoder_layers is None \
            else int(num_encoder_layers)
        self.peak_flops_per_s = profile.peak_for(dtype) * profile.compute_efficiency
        self.bandwidth_bytes_per_s = (profile.memory_bandwidth_bytes_per_s
                                      * profile.memory_efficiency)
        self.bytes_per_value = BYTES_PER_PARAM[dtype]
        self.launch_seconds = profile.kernel_launch_seconds

    @property
    def _ffn_matrices(self) -> int:
        return 3 if self.gated_ffn else 2

    def _roofline(self, flops: np.ndarray, bytes_: np.ndarray, kernels: float,
                  extra_seconds: float = 0.0) -> Roofline:
        flops, bytes_ = np.broadcast_arrays(np.asarray(flops, np.float64),
                                            np.asarray(bytes_, np.float64))
        return Roofline(compute_seconds=flops / self.peak_flops_per_s,
                        memory_seconds=bytes_ / self.bandwidth_bytes_per_s,
                        overhead_seconds=np.full(flops.shape,
                                                 kernels * self.launch_seconds + extra_seconds))

    # -- per-operation rooflines (the terms, for inspection and tests) --------------------------
    def decoder_layer_roofline(self, batch_size, context_len, source_len,
                               query_len=1) -> Roofline:
        d, f = self.dims.d_model, self.dims.d_ff
        inner = self.dims.num_heads * self.dims.d_kv
        heads = self.dims.num_heads
        n_ffn = self._ffn_matrices
        batch = np.asarray(batch_size, np.float64)
        context = np.asarray(context_len, np.float64)
        source = np.asarray(source_len, np.float64)
        tokens = batch * np.asarray(query_len, np.float64)  # query tokens through the weights
        # self q,k,v,o + cross q,o (cross K/V were computed at prefill) + FFN
        projections = 4 if self.decoder_only else 6
        norms = 2 if self.decoder_only else 3
        weight_params = projections * d * inner + n_ffn * d * f + norms * d  # + RMS-norm scales
        matmul_flops_per_token = 2.0 * (projections * d * inner + n_ffn * d * f)
        attention_flops_per_token = 4.0 * inner * (context + source)  # QK^T and AV, self + cross
        flops = tokens * (matmul_flops_per_token + attention_flops_per_token)
        # each matmul reads its input row and writes its output row once
        activation_values = 7 * d + 6 * inner + (n_ffn - 1) * (d + f) + f + d
        # scores: written by QK^T, read+written by bias add and softmax, read by AV
        score_values = tokens * heads * (context + source) * 4
        kv_values = batch * 2 * inner * (context + source) + tokens * 2 * inner  # read + append
        values = weight_params + tokens * activation_values + score_values + kv_values
        kernels = DECODER_LAYER_KERNELS + (GATED_FFN_EXTRA_KERNELS if self.gated_ffn else 0)
        return self._roofline(flops, values * self.bytes_per_value, kernels)

    def lm_head_roofline(self, batch_size) -> Roofline:
        d, vocab = self.dims.d_model, self.dims.vocab_size
        batch = np.asarray(batch_size, np.float64)
        flops = batch * (2.0 * d * vocab + 5.0 * vocab)  # matmul + softmax (max, sub, exp, sum, div)
        # weights; logits written, read and written by softmax, read by argmax
        values = vocab * d + d + batch * (d + 4.0 * vocab)
        return self._roofline(flops, values * self.bytes_per_value, LM_HEAD_KERNELS)

    def kv_fill_roofline(self, batch_size) -> Roofline:
        d = self.dims.d_model
        inner = self.dims.num_heads * self.dims.d_kv
        batch = np.asarray(batch_size, np.float64)
        flops = batch * 4.0 * d * inner  # K and V projections of the propagated state
        values = 2 * d * inner + d + batch * (d + 2 * inner)  # weights, norm; state in, K/V out
        return self._roofline(flops, values * self.bytes_per_value, KV_FILL_KERNELS)

    def measure_check_roofline(self, check_cost: CheckCost, batch_size) -> Roofline:
        batch = np.asarray(batch_size, np.float64)
        # CheckCost is per token; its bytes are counted per row (no sharing across rows
        # assumed: an upper bound for measures whose weights dominate)
        return self._roofline(batch * check_cost.flops, batch * check_cost.bytes, CHECK_KERNELS,
                              extra_seconds=self.profile.exit_sync_seconds)

    def encoder_prefill_roofline(self, batch_size, source_len) -> Roofline:
        d, f = self.dims.d_model, self.dims.d_ff
        inner = self.dims.num_heads * self.dims.d_kv
        heads = self.dims.num_heads
        n_ffn = self._ffn_matrices
        decoder_layers = self.dims.num_layers
        batch = np.asarray(batch_size, np.float64)
        source = np.asarray(source_len, np.float64)
        tokens = batch * source
        layer_flops = tokens * 2.0 * (4 * d * inner + n_ffn * d * f) \
            + batch * 4.0 * inner * source * source
        layer_values = (4 * d * inner + n_ffn * d * f + 2 * d) \
            + tokens * (5 * d + 4 * inner + (n_ffn - 1) * (d + f) + f + d) \
            + batch * heads * source * source * 4
        cross = 0.0 if self.decoder_only else 1.0  # a causal LM has no cross-attention K/V
        cross_flops = cross * tokens * decoder_layers * 4.0 * d * inner
        cross_values = cross * (decoder_layers * 2 * d * inner
                                + tokens * (d + decoder_layers * 2 * inner))
        flops = self.num_encoder_layers * layer_flops + cross_flops
        values = self.num_encoder_layers * layer_values + cross_values
        kernels = self.num_encoder_layers * (ENCODER_LAYER_KERNELS + (
            GATED_FFN_EXTRA_KERNELS if self.gated_ffn else 0)) \
            + cross * decoder_layers * CROSS_KV_KERNELS_PER_DECODER_LAYER + 1 + RMS_NORM_KERNELS
        return self._roofline(flops, values * self.bytes_per_value, kernels)

    # -- OperationCosts ----------------------------------------------------------------------
    def decoder_layer(self, batch_size, context_len, source_len, query_len=1) -> np.ndarray:
        return self.decoder_layer_roofline(batch_size, context_len, source_len, query_len).seconds

    def lm_head(self, batch_size) -> np.ndarray:
        return self.lm_head_roofline(batch_size).seconds

    def kv_fill(self, batch_size) -> np.ndarray:
        return self.kv_fill_roofline(batch_size).seconds

    def measure_check(self, check_cost: CheckCost, batch_size,
                      measure_name: str | None = None) -> np.ndarray:
        return self.measure_check_roofline(check_cost, batch_size).seconds

    def encoder_prefill(self, batch_size, source_len) -> np.ndarray:
        return self.encoder_prefill_roofline(batch_size, source_len).seconds

    def fixed_step(self) -> float:
        return float(self.profile.fixed_step_seconds)


    def memory_required_bytes(self, batch_size, context_len, source_len) -> np.ndarray:
        """Device memory for decoding: weights, the self and cross K/V caches of every decoder
        layer, and the logits (float32). Activations of one layer are left out (small)."""
        d, f, vocab = self.dims.d_model, self.dims.d_ff, self.dims.vocab_size
        inner = self.dims.num_heads * self.dims.d_kv
        n_ffn = self._ffn_matrices
        weights = vocab * d + self.dims.num_layers * (8 * d * inner + n_ffn * d * f + 3 * d) \
            + self.num_encoder_layers * (4 * d * inner + n_ffn * d * f + 2 * d) + 2 * d
        batch = np.asarray(batch_size, np.float64)
        kv = batch * self.dims.num_layers * 2 * inner * (np.asarray(context_len, np.float64)
                                                         + np.asarray(source_len, np.float64))
        return (weights + kv) * self.bytes_per_value + batch * vocab * 4

    def fits_in_memory(self, batch_size, context_len, source_len) -> np.ndarray:
        """True where :meth:`memory_required_bytes` fits in the profile's ``memory_bytes``."""
        return self.memory_required_bytes(batch_size, context_len, source_len) \
            <= self.profile.memory_bytes

    def rollback(self, batch_size, context_len) -> np.ndarray:
        """At one row a rollback is a crop (a view: no device work). Rows that keep different
        counts are realigned: every layer's K and V are gathered (read and written once)."""
        batch = np.asarray(batch_size, np.float64)
        context = np.asarray(context_len, np.float64)
        inner = self.dims.num_heads * self.dims.d_kv
        values = 2 * 2 * self.dims.num_layers * batch * inner * context  # K and V, read + write
        kernels = 2 * self.dims.num_layers + 4  # one gather per layer and tensor, the slot mask
        gathered = self._roofline(np.zeros_like(values), values * self.bytes_per_value, kernels)
        return np.where(batch > 1, gathered.seconds, 0.0)


# -- measured tables ---------------------------------------------------------------------------
def _axis_weights(x: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment index and weight for linear interpolation along one table axis. Below the first
    point the weight is 0 (clamped); above the last it exceeds 1 (linear extrapolation)."""
    if len(points) == 1:
        return np.zeros(x.shape, np.intp), np.zeros(x.shape)
    index = np.clip(np.searchsorted(points, x, side="right") - 1, 0, len(points) - 2)
    low, high = points[index], points[index + 1]
    weight = np.maximum((x - low) / (high - low), 0.0)
    return index, weight


def interpolate_1d(x, points, values) -> np.ndarray:
    """Linear interpolation in a table; clamped below its first point, linearly extrapolated
    from its last two points above its last one, and never below the last point's value."""
    x = np.asarray(x, np.float64)
    points = np.asarray(points, np.float64)
    values = np.asarray(values, np.float64)
    if len(points) == 1:
        return np.full(x.shape, values[0])
    index, weight = _axis_weights(x, points)
    result = (1 - weight) * values[index] + weight * values[index + 1]
    inside = (1 - np.minimum(weight, 1)) * values[index] + np.minimum(weight, 1) * values[index + 1]
    return np.maximum(result, inside)  # extrapolation never prices below the table's edge


def interpolate_2d(x, y, x_points, y_points, values) -> np.ndarray:
    """Bilinear interpolation in a ``[len(x_points), len(y_points)]`` table with the same edge
    rules per axis as :func:`interpolate_1d`."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(y, np.float64))
    values = np.asarray(values, np.float64)
    x_points = np.asarray(x_points, np.float64)
    y_points = np.asarray(y_points, np.float64)
    if len(x_points) == 1:  # a single point on an axis: constant along it
        x_points, values = np.r_[x_points, x_points + 1], np.concatenate([values, values], 0)
    if len(y_points) == 1:
        y_points, values = np.r_[y_points, y_points + 1], np.concatenate([values, values], 1)
    i, wx = _axis_weights(x, x_points)
    j, wy = _axis_weights(y, y_points)

    def blend(wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
        return ((1 - wx) * (1 - wy) * values[i, j] + wx * (1 - wy) * values[i + 1, j]
                + (1 - wx) * wy * values[i, j + 1] + wx * wy * values[i + 1, j + 1])

    return np.maximum(blend(wx, wy), blend(np.minimum(wx, 1), np.minimum(wy, 1)))


class MeasuredCosts:
    """Prices from a measured profile's tables, interpolated linearly in batch size and
    context (or source) length; clamped below the tables, linearly extrapolated above.

    FREE's deferred pass (``query_len > 1``) is priced as a step of ``batch x query_len``
    rows: the weights are read once for all those tokens, as in a bigger batch. The decoder
    table was timed at one source length; other source lengths are priced at that one."""

    def __init__(self, profile: MeasuredProfile, dims: ModelDims, dtype: str | None = None):
        model = profile.model
        where = f"hardware profile {profile.name!r} ({profile.path or 'in memory'})"
        mismatched = [f"{key} {getattr(model, key)} (model has {getattr(dims, key)})"
                      for key in ("num_layers", "d_model", "d_ff", "num_heads", "d_kv",
                                  "vocab_size") if getattr(model, key) != getattr(dims, key)]
        if mismatched:
            raise ProfileError(f"{where} was timed on {model.id!r} with {', '.join(mismatched)}; "
                               f"its tables do not apply to this model. Run `exitbench profile` "
                               f"for this model, or use a simulated profile.")
        if dtype is not None and dtype != profile.environment.dtype:
            raise ProfileError(f"{where} was timed in {profile.environment.dtype}, not {dtype}; "
                               f"set the suite config's dtype to {profile.environment.dtype} or "
                               f"run `exitbench profile` with dtype {dtype}.")
        self.profile = profile
        self.name = profile.name
        self._where = where
        self.tables = profile.tables
        self.estimated_checks: set[str] = set()
        """Measures whose checks were priced by :meth:`estimated_check` (no timings)."""

    def decoder_layer(self, batch_size, context_len, source_len, query_len=1) -> np.ndarray:
        table = self.tables.decoder_layer_seconds
        rows = np.asarray(batch_size, np.float64) * np.asarray(query_len, np.float64)
        rows, context, _ = np.broadcast_arrays(rows, np.asarray(context_len, np.float64),
                                               np.asarray(source_len, np.float64))
        return interpolate_2d(rows, context, table.batch_sizes, table.context_lens, table.seconds)

    def lm_head(self, batch_size) -> np.ndarray:
        table = self.tables.lm_head_seconds
        return interpolate_1d(batch_size, table.batch_sizes, table.seconds)

    def kv_fill(self, batch_size) -> np.ndarray:
        table = self.tables.kv_fill_seconds
        return interpolate_1d(batch_size, table.batch_sizes, table.seconds)

    def measure_check(self, check_cost: CheckCost, batch_size,
                      measure_name: str | None = None) -> np.ndarray:
        """The measure's own timed check; a measure the profile has no timings for (a new
        submission) is priced by :meth:`estimated_check` and remembered in
        :attr:`estimated_checks`, so its rows say that their cost is an estimate."""
        table = self.tables.measure_check_seconds.get(measure_name or "")
        if table is None:
            self.estimated_checks.add(measure_name or "")
            return self.estimated_check(check_cost, batch_size)
        return interpolate_1d(batch_size, table.batch_sizes, table.seconds)

    def measured_rates(self) -> dict[str, float]:
        """Rates derived from this profile's own measured operations, for checks it has no
        timings for: FLOP/s from the LM-head table at its largest batch (``2 B V d`` FLOPs in
        the measured time), bytes/s from the LM head at its smallest batch (its ``V d``
        weights, at the profile's dtype, read in the measured time), and the fixed cost of one check from the
        cheapest measured check (else the LM head's time per kernel times a check's
        kernels). Each is a conservative rate: the measured times include fixed costs."""
        dims = self.profile.model
        head = self.tables.lm_head_seconds
        batches = np.asarray(head.batch_sizes, np.float64)
        seconds = np.asarray(head.seconds, np.float64)
        flop_rate = float(2 * batches[-1] * dims.vocab_size * dims.d_model / seconds[-1])
        width = BYTES_PER_PARAM.get(self.profile.environment.dtype, 4)
        byte_rate = float(dims.vocab_size * dims.d_model * width / seconds[0])
        checks = [t.seconds[0] for t in self.tables.measure_check_seconds.values()]
        overhead = float(min(checks)) if checks else \
            float(seconds[0]) * CHECK_KERNELS / LM_HEAD_KERNELS
        return {"flops_per_s": flop_rate, "bytes_per_s": byte_rate, "check_seconds": overhead}

    def estimated_check(self, check_cost: CheckCost, batch_size) -> np.ndarray:
        """A check priced from its declared cost at :meth:`measured_rates`: the fixed cost of
        a check plus the larger of its FLOPs and its bytes at those rates, per row."""
        rates = self.measured_rates()
        batch = np.asarray(batch_size, np.float64)
        work = np.maximum(batch * float(check_cost.flops) / rates["flops_per_s"],
                          batch * float(check_cost.bytes) / rates["bytes_per_s"])
        return rates["check_seconds"] + work

    def encoder_prefill(self, batch_size, source_len) -> np.ndarray:
        table = self.tables.encoder_prefill_seconds
        return interpolate_2d(batch_size, source_len, table.batch_sizes, table.source_lens,
                              table.seconds)

    def fixed_step(self) -> float:
        return float(self.tables.fixed_step_seconds)

    def verify_layer(self, batch_size, context_len, source_len, query_len) -> np.ndarray:
        """A layer over ``query_len`` positions per row (self-speculation's verification):
        the ``verify_layer_seconds`` table scaled by the decoder table's context
        dependence, or ``batch x query_len`` one-token rows without the table."""
        table = self.tables.verify_layer_seconds
        query = np.asarray(query_len, np.float64)
        if table is None:
            return self.decoder_layer(batch_size, context_len, source_len, query_len)
        batch, query, context = np.broadcast_arrays(np.asarray(batch_size, np.float64), query,
                                                    np.asarray(context_len, np.float64))
        one_token = self.decoder_layer(batch, context, source_len)
        # the table was timed at one context length: scale its per-query-length times by the
        # one-token layer's context dependence, read from the decoder table
        at_table_context = self.decoder_layer(batch, np.full(batch.shape, float(table.context_len)),
                                              source_len)
        several = interpolate_2d(batch, query, table.batch_sizes, table.query_lens,
                                 table.seconds) * one_token / np.maximum(at_table_context, 1e-30)
        return np.where(query <= 1, one_token, several)

    def verify_setup(self, batch_size, query_len) -> np.ndarray:
        """``begin_catch_up`` of a verification pass (masks, position bias), from the
        verify table's ``setup_seconds``; ``0`` without it."""
        table = self.tables.verify_layer_seconds
        shape = np.broadcast(np.asarray(batch_size), np.asarray(query_len)).shape
        if table is None or table.setup_seconds is None:
            return np.zeros(shape)
        return np.broadcast_to(interpolate_2d(batch_size, query_len, table.batch_sizes,
                                              table.query_lens, table.setup_seconds), shape)

    def position_bias(self, batch_size) -> np.ndarray:
        """One step's relative position bias (``position_bias_seconds``; ``0`` without)."""
        table = self.tables.position_bias_seconds
        if table is None:
            return np.zeros(np.shape(batch_size))
        return interpolate_1d(batch_size, table.batch_sizes, table.seconds)

    def rollback(self, batch_size, context_len) -> np.ndarray:
        """The ``rollback_seconds`` table (acceptance and K/V rollback of a cycle; timed at
        one context length); ``0`` for profiles measured without it."""
        table = self.tables.rollback_seconds
        shape = np.broadcast(np.asarray(batch_size), np.asarray(context_len)).shape
        if table is None:
            return np.zeros(shape)
        return np.broadcast_to(interpolate_1d(batch_size, table.batch_sizes, table.seconds), shape)


def operation_costs(profile: HardwareProfile, dims: ModelDims, dtype: str,
                    gated_ffn: bool = False,
                    num_encoder_layers: int | None = None,
                    decoder_only: bool = False) -> OperationCosts:
    """The operation costs of ``profile`` for a model of ``dims`` computing in ``dtype``."""
    if isinstance(profile, SimulatedProfile):
        return SimulatedCosts(profile, dims, dtype, gated_ffn, num_encoder_layers,
                              decoder_only)
    return MeasuredCosts(profile, dims, dtype)


def example_index_from_ids(example_id) -> np.ndarray:
    """``[T]`` example ids (any hashable values, e.g. a trace's ``example_id``) -> ``[T]``
    indices ``0..E-1`` in order of first appearance, the batching order of
    :func:`decode_seconds`."""
    example_id = np.asarray(example_id)
    if example_id.size == 0:
        return np.zeros(0, np.int64)
    _, first, inverse = np.unique(example_id, return_index=True, return_inverse=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.reshape(-1)]


# -- the schedule ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSchedule:
    """Examples grouped in order into batches, and the decoding steps each batch runs. A
    batch runs to its longest example; a row whose example has ended leaves the batch."""

    step_of_token: np.ndarray
    """``[T]`` global step index of each token (batches' steps laid end to end)."""
    token_order: np.ndarray
    """``[T]`` tokens sorted by step (stable)."""
    step_starts: np.ndarray
    """``[G]`` offset of each step's first token in ``token_order``."""
    active_rows: np.ndarray
    """``[G]`` rows still decoding at the step."""
    context_len: np.ndarray
    """``[G]`` decoder keys at the step (position + 1)."""
    source_len: np.ndarray
    """``[G]`` encoder keys (the batch's longest source: sources are padded per batch)."""
    batch_first_step: np.ndarray
    """``[G]`` global index of the first step of the step's batch."""
    batch_rows: np.ndarray
    """``[batches]`` examples per batch (for the prefill)."""
    batch_source_len: np.ndarray
    """``[batches]`` longest source per batch."""

    @property
    def num_steps(self) -> int:
        return int(self.active_rows.shape[0])


def schedule_steps(example_index, position, source_len, batch_size: int) -> StepSchedule:
    """Lay out the decoding steps of ``E`` examples decoded ``batch_size`` at a time."""
    example_index = np.asarray(example_index, np.int64)
    position = np.asarray(position, np.int64)
    source_len = np.asarray(source_len, np.int64)
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise CostModelError(f"batch size {batch_size!r} is not a positive integer; use 1, 8, 32...")
    batch_size = int(batch_size)
    if example_index.ndim != 1 or position.shape != example_index.shape:
        raise CostModelError(f"example_index {example_index.shape} and position "
                             f"{position.shape} must be [T] arrays of one length")
    num_examples = source_len.shape[0]
    if source_len.ndim != 1 or num_examples == 0 or (source_len < 1).any():
        raise CostModelError("source_len must be a non-empty [E] array of positive lengths")
    if example_index.size and (example_index.min() < 0 or example_index.max() >= num_examples):
        raise CostModelError(f"example_index must lie in 0..{num_examples - 1} "
                             f"(one source_len per example)")
    lengths = np.bincount(example_index, minlength=num_examples)
    if (position < 0).any() or (position >= lengths[example_index]).any() or \
            np.unique(example_index * (lengths.max(initial=0) + 1) + position).size != position.size:
        raise CostModelError("each example's positions must be 0..n-1, each once "
                             "(a token per decoding step)")
    batch_starts = np.arange(0, num_examples, batch_size)
    batch_steps = np.maximum.reduceat(lengths, batch_starts)
    batch_rows = np.diff(np.r_[batch_starts, num_examples])
    batch_source_len = np.maximum.reduceat(source_len, batch_starts)
    step_offset = np.r_[0, np.cumsum(batch_steps)[:-1]]
    num_steps = int(batch_steps.sum())
    batch_of_step = np.repeat(np.arange(len(batch_starts)), batch_steps)
    batch_first_step = step_offset[batch_of_step]
    step_of_token = step_offset[example_index // batch_size] + position
    token_order = np.argsort(step_of_token, kind="stable")
    active_rows = np.bincount(step_of_token, minlength=num_steps)
    return StepSchedule(
        step_of_token=step_of_token, token_order=token_order,
        step_starts=np.r_[0, np.cumsum(active_rows)[:-1]].astype(np.intp),
        active_rows=active_rows,
        context_len=np.arange(num_steps) - batch_first_step + 1,
        source_len=batch_source_len[batch_of_step], batch_first_step=batch_first_step,
        batch_rows=batch_rows, batch_source_len=batch_source_len)


@dataclass(frozen=True)
class DecodeCost:
    """Seconds of a replay per threshold, split by where they go (each ``[K]``)."""

    fixed_seconds: np.ndarray
    layer_seconds: np.ndarray
    """Decoder layers run up to each step's deepest exit."""
    check_seconds: np.ndarray
    """Confidence checks, with the LM head at the checked layer when the measure needs it."""
    lm_head_seconds: np.ndarray
    """The LM head at the exit layer when no check already computed it."""
    propagation_seconds: np.ndarray
    """K/V of skipped layers: CALM's K/V fill, or the extra work of FREE's deferred passes."""
    prefill_seconds: np.ndarray
    num_tokens: int
    step_seconds: np.ndarray | None = None
    """``[K, G]`` seconds of each decoding step (every component but the prefill), for
    per-request latency (:func:`request_latency`)."""
    batch_prefill_seconds: np.ndarray | None = None
    """``[batches]`` encoder prefill of each batch."""
    schedule: StepSchedule | None = None

    @property
    def seconds(self) -> np.ndarray:
        return (self.fixed_seconds + self.layer_seconds + self.check_seconds
                + self.lm_head_seconds + self.propagation_seconds + self.prefill_seconds)

    @property
    def tokens_per_s(self) -> np.ndarray:
        return self.num_tokens / self.seconds


def _free_deferred_extra(costs: OperationCosts, deepest: np.ndarray, num_layers: int,
                         schedule: StepSchedule, layer_seconds: np.ndarray) -> np.ndarray:
    """FREE's deferred parallel pass, as extra seconds per step ``[K, G]``.

    Layer ``l`` skipped at some steps (the batch's deepest exit was shallower) runs again at
    the next step that reaches it, over the pending tokens and the current one together:
    ``1 + pending`` query tokens per row. The extra is that cost minus the one-token layer
    already counted. Rows are in lockstep, so every active row has the same pending count
    (a row active now was active at every earlier step of its batch)."""
    num_thresholds, num_steps = deepest.shape
    extra = np.zeros((num_thresholds, num_steps))
    layers = np.arange(num_layers)
    step_index = np.arange(num_steps)
    block = max(1, FREE_CHUNK_ELEMENTS // max(1, num_thresholds * num_layers))
    # last step (< current) that ran each layer, carried across blocks of steps
    last_run = np.full((num_thresholds, num_layers), -1, np.int64)
    for start in range(0, num_steps, block):  # blocks bound memory; no loop per step
        stop = min(start + block, num_steps)
        steps = step_index[start:stop]
        ran = deepest[:, start:stop, None] >= layers  # [K, g, L]
        ran_at = np.where(ran, steps[None, :, None], -1)
        running = np.maximum.accumulate(
            np.concatenate([last_run[:, None, :], ran_at], axis=1), axis=1)
        previous = running[:, :-1, :]  # last run strictly before each step
        last_run = running[:, -1, :]
        previous = np.maximum(previous, schedule.batch_first_step[start:stop, None] - 1)
        pending = steps[None, :, None] - previous - 1
        deferred = ran & (pending > 0)
        if not deferred.any():
            continue
        k, g, _ = np.nonzero(deferred)
        g_global = g + start
        extra_seconds = costs.decoder_layer(
            schedule.active_rows[g_global], schedule.context_len[g_global],
            schedule.source_len[g_global], 1 + pending[deferred]) - layer_seconds[g_global]
        extra[:, start:stop] += np.bincount(k * (stop - start) + g, weights=extra_seconds,
                                            minlength=num_thresholds * (stop - start)
                                            ).reshape(num_thresholds, stop - start)
    return extra


def decode_cost(costs: OperationCosts, dims: ModelDims, exit_layer, example_index, position,
                source_len, batch_size: int, check_cost: CheckCost, checked_layers,
                min_layer: int = 0, propagation: Propagation = "calm",
                measure_name: str | None = None) -> DecodeCost:
    """Seconds of replayed early-exit decoding per threshold, by component.

    ``exit_layer`` is ``[K, T]`` (0-based exit layer of each token per threshold, or ``[T]``);
    ``example_index``/``position`` ``[T]`` place each token (examples ``0..E-1``, grouped in
    order into batches of ``batch_size``); ``source_len`` is ``[E]``. Per step of a batch, with
    ``D`` the deepest exit among its active rows: the fixed cost; layers ``0..D``; a check at
    every checked layer ``min_layer <= l <= D`` (plus the LM head there if the measure needs
    it); the LM head at the exit unless the check at ``D`` computed it; and the K/V of the
    skipped layers ``D+1..L-1`` by ``propagation``: ``"calm"`` fills them (K/V projections),
    ``"free"`` defers them to the next step that runs them, ``"none"`` leaves them empty.
    Plus the encoder prefill once per batch. ``measure_name`` keys measured check tables."""
    if propagation not in PROPAGATIONS:
        raise CostModelError(f"propagation {propagation!r} is not one of "
                             f"{', '.join(PROPAGATIONS)}")
    num_layers = dims.num_layers
    exit_layer = np.asarray(exit_layer)
    if exit_layer.ndim == 1:
        exit_layer = exit_layer[None, :]
    if exit_layer.ndim != 2 or not np.issubdtype(exit_layer.dtype, np.integer):
        raise CostModelError(f"exit_layer must be an integer [K, T] array, got "
                             f"{exit_layer.dtype} {exit_layer.shape}")
    if exit_layer.size and (exit_layer.min() < 0 or exit_layer.max() >= num_layers):
        raise CostModelError(f"exit layers must lie in 0..{num_layers - 1} for a model of "
                             f"{num_layers} decoder layers")
    checked_layers = np.asarray(checked_layers, bool)
    if checked_layers.shape != (num_layers,):
        raise CostModelError(f"checked_layers has shape {checked_layers.shape}, expected "
                             f"({num_layers},): one flag per decoder layer")
    if not 0 <= min_layer < num_layers:
        raise CostModelError(f"min_layer {min_layer} is outside 0..{num_layers - 1}")
    schedule = schedule_steps(example_index, position, source_len, batch_size)
    if exit_layer.shape[1] != schedule.step_of_token.shape[0]:
        raise CostModelError(f"exit_layer has {exit_layer.shape[1]} tokens but example_index "
                             f"has {schedule.step_of_token.shape[0]}")
    num_thresholds = exit_layer.shape[0]
    zeros = np.zeros(num_thresholds)
    prefill = float(np.sum(costs.encoder_prefill(schedule.batch_rows, schedule.batch_source_len)))
    if schedule.num_steps == 0:
        return DecodeCost(zeros, zeros, zeros, zeros, zeros, zeros + prefill, 0)

    # deepest exit per step among its active rows: [K, G]
    deepest = np.maximum.reduceat(exit_layer[:, schedule.token_order].astype(np.int64),
                                  schedule.step_starts, axis=1)
    active = schedule.active_rows
    layer_seconds = costs.decoder_layer(active, schedule.context_len, schedule.source_len)
    head_seconds = costs.lm_head(active)

    made = checked_layers & (np.arange(num_layers) >= min_layer)
    checks_up_to = np.cumsum(made)  # checks made by a step whose deepest exit is l
    if made.any():
        one_check = costs.measure_check(check_cost, active, measure_name)
        if check_cost.needs_lm_head:
            one_check = one_check + head_seconds
        check_steps = checks_up_to[deepest] * one_check
        # the check at D already applied the LM head to layer D: no second one
        head_reused = made[deepest] & check_cost.needs_lm_head
    else:
        check_steps = np.zeros(deepest.shape)
        head_reused = np.zeros(deepest.shape, bool)
    head_steps = np.where(head_reused, 0.0, head_seconds)

    if propagation == "calm":
        propagated_steps = (num_layers - 1 - deepest) * costs.kv_fill(active)
    elif propagation == "free":
        propagated_steps = _free_deferred_extra(costs, deepest, num_layers, schedule,
                                                layer_seconds)
    else:
        propagated_steps = np.zeros(deepest.shape)
    layer_steps = (deepest + 1) * layer_seconds
    fixed = costs.fixed_step()
    return DecodeCost(
        fixed_seconds=np.full(num_thresholds, fixed * schedule.num_steps),
        layer_seconds=layer_steps.sum(axis=1),
        check_seconds=check_steps.sum(axis=1), lm_head_seconds=head_steps.sum(axis=1),
        propagation_seconds=propagated_steps.sum(axis=1),
        prefill_seconds=zeros + prefill, num_tokens=int(schedule.step_of_token.shape[0]),
        step_seconds=fixed + layer_steps + check_steps + head_steps + propagated_steps,
        batch_prefill_seconds=np.asarray(costs.encoder_prefill(
            schedule.batch_rows, schedule.batch_source_len), np.float64),
        schedule=schedule)


def decode_seconds(costs: OperationCosts, dims: ModelDims, exit_layer, example_index, position,
                   source_len, batch_size: int, check_cost: CheckCost, checked_layers,
                   min_layer: int = 0, propagation: Propagation = "calm",
                   measure_name: str | None = None) -> np.ndarray:
    """``[K]`` seconds of replayed early-exit decoding (see :func:`decode_cost`);
    tokens/s is ``T / seconds``."""
    return decode_cost(costs, dims, exit_layer, example_index, position, source_len,
                       batch_size, check_cost, checked_layers, min_layer, propagation,
                       measure_name).seconds


NO_CHECK = CheckCost(flops=0.0, bytes=0.0, needs_lm_head=False)


def request_latency(cost: DecodeCost, example_index) -> RequestLatency:
    """Per-request TTFT and TPOT (:mod:`suite.latency`) of a priced decoding: each token is
    emitted at the end of its step, counted from the start of its batch (the batch's prefill
    plus its steps so far). ``example_index`` is the ``[T]`` array given to
    :func:`decode_cost`."""
    from suite.latency import from_emissions

    schedule = cost.schedule
    if cost.step_seconds is None or schedule is None:
        raise CostModelError("this DecodeCost has no per-step seconds (no decoding steps)")
    example_index = np.asarray(example_index, np.int64)
    done = np.cumsum(cost.step_seconds, axis=1)  # [K, G]: steps 0..g, batches end to end
    step = schedule.step_of_token
    first = schedule.batch_first_step[step]  # the first step of each token's batch
    before = np.where(first > 0, done[:, np.maximum(first - 1, 0)], 0.0)
    batch_of_example = np.repeat(np.arange(len(schedule.batch_rows)), schedule.batch_rows)
    prefill = cost.batch_prefill_seconds[batch_of_example[example_index]]
    emitted = prefill + done[:, step] - before  # [K, T]
    return from_emissions(example_index, step - first, emitted,
                          int(np.sum(schedule.batch_rows)))


def full_depth_seconds(costs: OperationCosts, dims: ModelDims, example_index, position,
                       source_len, batch_size: int) -> float:
    """Seconds of the same decoding without early exit: every token runs all layers, no
    checks, one LM head. The denominator of the speedup."""
    num_tokens = np.asarray(example_index).shape[0]
    every_layer = np.full((1, num_tokens), dims.num_layers - 1, np.int64)
    return float(decode_seconds(costs, dims, every_layer, example_index, position, source_len,
                                batch_size, NO_CHECK, np.zeros(dims.num_layers, bool),
                                propagation="none")[0])


@dataclass(frozen=True)
class ReplayCost:
    """A replay priced on one profile at one batch size (each array ``[K]``)."""

    seconds: np.ndarray
    tokens_per_s: np.ndarray
    speedup: np.ndarray
    """Full-depth seconds / early-exit seconds."""
    full_depth_seconds: float
    breakdown: DecodeCost


def price_replay(costs: OperationCosts, dims: ModelDims, exit_layer, example_index, position,
                 source_len, batch_size: int, check_cost: CheckCost, checked_layers,
                 min_layer: int = 0, propagation: Propagation = "calm",
                 measure_name: str | None = None) -> ReplayCost:
    """Seconds, tokens/s and speedup over full depth of a replay: what a result row needs."""
    breakdown = decode_cost(costs, dims, exit_layer, example_index, position, source_len,
                            batch_size, check_cost, checked_layers, min_layer, propagation,
                            measure_name)
    full = full_depth_seconds(costs, dims, example_index, position, source_len, batch_size)
    seconds = breakdown.seconds
    return ReplayCost(seconds=seconds, tokens_per_s=breakdown.tokens_per_s,
                      speedup=full / seconds, full_depth_seconds=full, breakdown=breakdown)


# -- self-speculative decoding -------------------------------------------------------------------
# A cycle (suite.speculative.method): ``c`` draft steps of layers 0..E-1 with the exit head at E-1,
# then one verification pass (the last draft token through layers 0..E-1, layers E..L-1 over
# the ``c + 1`` positions, the LM head at each), then the rollback of rejected positions.
def verification_layer_seconds(costs: OperationCosts, batch_size, context_len, source_len,
                               query_len) -> np.ndarray:
    """One decoder layer running ``query_len`` positions per row together (a verification
    pass), attending to ``context_len`` keys: the measured profile's ``verify_layer_seconds``
    table where it has one, else :meth:`OperationCosts.decoder_layer` with ``query_len``
    (the roofline prices the query tokens; a measured profile without the table prices
    them as ``batch x query_len`` rows of one-token steps)."""
    verify = getattr(costs, "verify_layer", None)
    if verify is not None:
        return verify(batch_size, context_len, source_len, query_len)
    return costs.decoder_layer(batch_size, context_len, source_len, query_len)


def _optional(costs: OperationCosts, name: str, *args) -> np.ndarray:
    """An operation only some costs price (measured tables added later): 0 elsewhere."""
    price = getattr(costs, name, None)
    if price is None:
        return np.zeros(np.broadcast(*map(np.asarray, args)).shape)
    return price(*args)


def rollback_seconds(costs: OperationCosts, batch_size, context_len) -> np.ndarray:
    """Accepting a cycle's drafts and rolling back every layer's K/V of the rejected
    positions, for ``batch_size`` rows with ``context_len`` cached keys (``0`` for costs that
    do not price it: measured profiles timed before the table existed)."""
    return _optional(costs, "rollback", batch_size, context_len)


@dataclass(frozen=True)
class SpeculativeCost:
    """Seconds of a self-speculative decode, split by where they go."""

    draft_seconds: float
    """Draft steps: fixed cost, layers 0..E-1, the exit head at E-1 and the stopping
    rule's check there."""
    verify_seconds: float
    """Verification passes: fixed cost, the last draft token through layers 0..E-1, layers
    E..L-1 over the drafted positions and the LM head at each of them."""
    rollback_seconds: float
    prefill_seconds: float
    num_tokens: int
    num_cycles: int
    draft_steps: int
    """Draft steps the batches ran (a batch drafts to its slowest row)."""

    @property
    def seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds + self.rollback_seconds \
            + self.prefill_seconds

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.seconds


def speculative_cost(costs: OperationCosts, dims: ModelDims, draft_depth: int, example_index,
                     position, drafted, source_len, batch_size: int, num_tokens: int,
                     stop_check: CheckCost | None = None,
                     stop_measure: str | None = None) -> SpeculativeCost:
    """Seconds of a self-speculative decode from its cycles.

    ``example_index``, ``position`` (positions verified before the cycle) and ``drafted``
    are ``[C]`` per cycle, in (example, cycle) order; examples ``0..E-1`` are decoded in order,
    ``batch_size`` at a time, ``source_len`` ``[E]``. The cycles of a batch run in lockstep:
    its ``j``-th cycle runs the rows that still decode, drafts as many steps as its slowest
    row (``c``, the most drafted), at the context of its longest row (``S``). Per batch
    cycle, with ``R`` rows: ``c`` draft steps (step ``i``: fixed + ``E`` layers at
    ``S + i + 1`` keys + the LM head at ``E - 1`` + the stopping check there, whose LM head
    is the draft's own), one verification (fixed + ``E`` layers for the last draft token +
    the pass's set-up (``begin_catch_up``) + ``L - E`` layers over ``c + 1`` queries at
    ``S + c + 1`` keys (:func:`verification_layer_seconds`) + the LM head over ``R (c + 1)``
    rows) and, when it drafted, a rollback (:func:`rollback_seconds`). A pass of ``E < L``
    layers also pays ``(1 - E / L)`` of a step's position bias, which the layer table
    spreads over the depth (measured profiles; 0 on simulated ones, whose layers do not
    count it). A cycle that drafts nothing (its budget allows one token) is a full-depth
    step. Plus the encoder prefill once per batch."""
    num_layers = dims.num_layers
    if not 1 <= draft_depth <= num_layers - 1:
        raise CostModelError(f"draft_depth {draft_depth} is outside 1..{num_layers - 1}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise CostModelError(f"batch size {batch_size!r} is not a positive integer")
    example_index = np.asarray(example_index, np.int64)
    position = np.asarray(position, np.int64)
    drafted = np.asarray(drafted, np.int64)
    source_len = np.asarray(source_len, np.int64)
    if not (example_index.shape == position.shape == drafted.shape) or example_index.ndim != 1:
        raise CostModelError("example_index, position and drafted must be [C] arrays of one "
                             "length (one entry per cycle)")
    if example_index.size and (np.any(np.diff(example_index) < 0) or example_index.min() < 0
                               or example_index.max() >= source_len.shape[0]):
        raise CostModelError(f"cycles must be in example order, examples in 0.."
                             f"{source_len.shape[0] - 1} (one source_len per example)")
    num_examples = source_len.shape[0]
    batch_size = int(batch_size)
    batch_starts = np.arange(0, num_examples, batch_size)
    batch_rows = np.diff(np.r_[batch_starts, num_examples])
    batch_source = np.maximum.reduceat(source_len, batch_starts) if num_examples else source_len
    prefill = float(np.sum(costs.encoder_prefill(batch_rows, batch_source)))
    if example_index.size == 0:
        return SpeculativeCost(0.0, 0.0, 0.0, prefill, int(num_tokens), 0, 0)

    counts = np.bincount(example_index, minlength=num_examples)
    cycle = np.arange(example_index.size) - np.repeat(np.cumsum(counts) - counts, counts)
    batch = example_index // batch_size
    order = np.lexsort((cycle, batch))
    key = batch[order] * (counts.max() + 1) + cycle[order]
    group_starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    rows = np.diff(np.r_[group_starts, key.size])  # R per batch cycle
    steps = np.maximum.reduceat(drafted[order], group_starts)  # c
    context = np.maximum.reduceat(position[order], group_starts)  # S
    source = batch_source[batch[order][group_starts]]
    fixed = costs.fixed_step()
    head = costs.lm_head(rows)

    # draft steps, expanded: step i of a batch cycle attends to S + i + 1 keys
    step_group = np.repeat(np.arange(rows.size), steps)
    step_index = np.arange(step_group.size) - np.repeat(np.cumsum(steps) - steps, steps)
    step_rows = rows[step_group]
    # block 0 computes a pass's position bias whatever its depth; the layer tables spread
    # it over the L layers, so a pass of E layers pays (1 - E / L) of it more
    shallow_bias = (1 - draft_depth / num_layers) * _optional(costs, "position_bias", rows)
    draft = fixed + draft_depth * costs.decoder_layer(
        step_rows, context[step_group] + step_index + 1, source[step_group]) \
        + head[step_group] + shallow_bias[step_group]
    if stop_check is not None:
        draft = draft + costs.measure_check(stop_check, step_rows, stop_measure)

    verified_context = context + steps + 1
    deep = np.where(steps > 0, _optional(costs, "verify_setup", rows, steps + 1)
                    + (num_layers - draft_depth) * verification_layer_seconds(
                        costs, rows, verified_context, source, steps + 1),
                    (num_layers - draft_depth) * costs.decoder_layer(rows, verified_context,
                                                                     source))
    verify = fixed + draft_depth * costs.decoder_layer(rows, verified_context, source) \
        + np.where(steps > 0, shallow_bias, 0.0) + deep + costs.lm_head(rows * (steps + 1))
    rollback = np.where(steps > 0, rollback_seconds(costs, rows, verified_context), 0.0)
    return SpeculativeCost(draft_seconds=float(np.sum(draft)), verify_seconds=float(np.sum(verify)),
                           rollback_seconds=float(np.sum(rollback)), prefill_seconds=prefill,
                           num_tokens=int(num_tokens), num_cycles=int(rows.size),
                           draft_steps=int(steps.sum()))
