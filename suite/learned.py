"""Learned exit measures: training on train-split traces, a weight cache, and AUROC.

A learned measure (:class:`LearnedMeasure`) is a small torch network that reads the decoder's
hidden states ``[tokens, layers, d_model]`` and predicts, per token and layer, whether the
layer's prediction is good enough to exit. The three built-ins differ only in the network
(``measures/classifier_single.py``, ``classifier_three_hidden.py``, ``classifier_lstm.py``);
this module holds what they share:

- **Labels** (option ``label``): ``"consistent"`` (CALM's consistency: the layer's top-1
  equals the full-depth token, ``top1_id[:, l] == final_id``) or ``"gold"`` (it equals the
  reference token, ``top1_id[:, l] == gold_id``, from reference-forced traces; rows without a
  reference, ``gold_id == -1``, are left out).
- **Training**: Adam, shuffled mini-batches of tokens (all their layers at once), a fixed
  number of epochs (5 by default, as in the study), class-balanced cross-entropy, only on the
  layers where the measure checks (never the last, which exits unconditionally). Option
  ``balance``: ``"classes"`` (each class weighted by ``n / (2 n_class)`` over all pairs, so
  the rarer class counts as much as the common one) or ``"per_layer"`` (CALM's meta
  classifier, t5x ``loss_fn_meta_cls``: at each layer, positives weighted by the layer's
  share of negatives and negatives by its share of positives, ``1 - n_class,l / n_l``; CALM
  counts per batch, here per layer over the training set). Seeded: the same data, options
  and seed give the same weights.
- **Inputs**: each hidden state is RMS-normalised (as T5's final norm does, without its
  weight; T5's un-normed states grow with depth) and then standardised per dimension with
  statistics of the training set. The standardisation folds into the first linear layer at
  deployment, so a check pays only the RMS norm.
- **Cache**: with a ``cache_dir``, the trained weights are saved (atomically) under a content
  hash of the training inputs (hidden states, labels), the options and the code of the
  measure and of this module, and reused when none of them changed.
- **Evaluation**: :func:`auroc` (ties get average ranks) and :func:`will_not_change_auroc`,
  which scores any measure's ``[T, L]`` scores against "the prediction will not change"
  (``top1_id[:, l] == final_id``) per token and layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from suite.atomic import atomic_write_bytes
from suite.errors import ExitbenchError
from suite.measures import BYTES_PER_VALUE, CheckCost, Measure, ModelDims, code_hash
from suite.traces import TraceArrays

logger = logging.getLogger(__name__)

RMS_EPSILON = 1e-6
SCORE_CHUNK_TOKENS = 4096
"""Tokens scored per forward pass, which bounds the memory of scoring long traces."""
NORMALISE_FLOPS_PER_VALUE = 3.0
"""RMS norm of one hidden state: a square, a sum and a scale per value."""
TWO_CLASS_SOFTMAX_FLOPS = 6.0
"""Two logits to a probability: one difference, one exp, one add, one division (rounded up)."""


# -- labels ---------------------------------------------------------------------------------
def consistent_labels(traces: TraceArrays) -> tuple[np.ndarray, np.ndarray]:
    """``(label, defined)`` ``[T, L]``: the layer's top-1 equals the full-depth token."""
    label = traces.top1_id == traces.final_id[:, None]
    return label, np.ones_like(label, dtype=bool)


def gold_labels(traces: TraceArrays) -> tuple[np.ndarray, np.ndarray]:
    """``(label, defined)`` ``[T, L]``: the layer's top-1 equals the reference token; defined
    only on rows that carry one (reference-forced traces)."""
    has_gold = traces.gold_id >= 0
    if not has_gold.any():
        raise ExitbenchError(
            "label='gold' needs reference-forced traces (gold_id >= 0), but every row has "
            "gold_id == -1 (generated traces); record forced traces, or use label='consistent'")
    label = traces.top1_id == traces.gold_id[:, None]
    return label, np.broadcast_to(has_gold[:, None], label.shape).copy()


LABELS: dict[str, Callable[[TraceArrays], tuple[np.ndarray, np.ndarray]]] = {
    "consistent": consistent_labels,
    "gold": gold_labels,
}


BALANCES = ("classes", "per_layer")
"""How the training loss balances the two classes (see the module docstring)."""


def pair_weights(label_matrix: np.ndarray, trainable: np.ndarray, balance: str) -> np.ndarray:
    """``[T, L]`` loss weight of each (token, layer) pair (0 where not trained)."""
    label = label_matrix.astype(bool) & trainable
    if balance == "per_layer":  # CALM: within each layer, 1 - (the class's share)
        count = trainable.sum(axis=0).astype(np.float64)
        positives = label.sum(axis=0).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            weight_pos = np.where(count > 0, (count - positives) / count, 0.0)
            weight_neg = np.where(count > 0, positives / count, 0.0)
        weights = np.where(label, weight_pos[None, :], weight_neg[None, :])
    else:
        num_pairs = int(trainable.sum())
        positives = int(label.sum())
        weights = np.where(label, num_pairs / (2.0 * positives),
                           num_pairs / (2.0 * (num_pairs - positives)))
    return np.where(trainable, weights, 0.0).astype(np.float32)


# -- options and results --------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingOptions:
    """How a learned measure is trained; part of the weight cache's key."""

    epochs: int = 5
    """Passes over the training tokens (5 in the study)."""
    batch_size: int = 256
    """Tokens per mini-batch (each with all its layers)."""
    learning_rate: float = 1e-3
    """Adam's step size."""
    weight_decay: float = 0.0
    """Adam's L2 penalty."""
    seed: int = 0
    """Seeds the initial weights and the shuffling."""
    label: str = "consistent"
    """``"consistent"`` (top-1 equals the final token) or ``"gold"`` (equals the reference)."""
    balance: str = "classes"
    """``"classes"`` (over all pairs) or ``"per_layer"`` (CALM's, within each layer)."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            problems.append(f"epochs={self.epochs!r} must be an integer >= 1")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size!r} must be an integer >= 1")
        if not float(self.learning_rate) > 0:
            problems.append(f"learning_rate={self.learning_rate!r} must be > 0")
        if not float(self.weight_decay) >= 0:
            problems.append(f"weight_decay={self.weight_decay!r} must be >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            problems.append(f"seed={self.seed!r} must be an integer")
        if self.label not in LABELS:
            problems.append(f"label={self.label!r} is not one of {', '.join(sorted(LABELS))}")
        if self.balance not in BALANCES:
            problems.append(f"balance={self.balance!r} is not one of {', '.join(BALANCES)}")
        if problems:
            raise ExitbenchError("invalid training options for a learned measure: "
                                 + "; ".join(problems))


@dataclass(frozen=True)
class FitResult:
    """What :meth:`LearnedMeasure.fit` did."""

    key: str
    """Content hash of the training inputs, options and code (the cache key)."""
    reused: bool
    """True when the weights were loaded from the cache instead of trained."""
    path: str | None
    """The cached weights file, when a cache directory was given."""
    epochs: int
    losses: tuple[float, ...]
    """Mean class-balanced cross-entropy per epoch (of the original training run)."""
    num_pairs: int
    """(token, layer) pairs trained on."""
    positive_fraction: float
    """Share of those pairs labelled "good enough to exit"."""
    seconds: float
    """Wall time of this fit (loading, when reused)."""


# -- the base class -------------------------------------------------------------------------
class LearnedMeasure(Measure):
    """A measure whose score is a small network's probability that the layer's prediction is
    good enough to exit. Subclasses set ``name``/``description``, implement
    :meth:`build_network` (``[B, L, d] -> [B, L, 2]`` logits, causal in the layer axis),
    :meth:`network_flops`, and declare their options in :meth:`architecture`."""

    reads = frozenset({"hidden"})
    fit_reads = frozenset({"top1_id", "final_id", "gold_id"})
    needs_fit = True
    first_scored_layer: ClassVar[int] = 0
    """Layers below this have no score (``-inf``) and are never checked."""

    default_balance: ClassVar[str] = "classes"
    """The measure's default for the ``balance`` option."""

    def __init__(self, *, epochs: int = 5, batch_size: int = 256, learning_rate: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, label: str = "consistent",
                 balance: str | None = None, cache_dir: str | Path | None = None):
        self.training = TrainingOptions(epochs=epochs, batch_size=batch_size,
                                        learning_rate=learning_rate, weight_decay=weight_decay,
                                        seed=seed, label=label,
                                        balance=balance or self.default_balance)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.network: nn.Module | None = None
        self.norm_mean: torch.Tensor | None = None
        self.norm_std: torch.Tensor | None = None
        self.d_model: int | None = None
        self.fit_result: FitResult | None = None

    # -- what subclasses provide ------------------------------------------------------------
    def architecture(self) -> dict[str, Any]:
        """The network's options (JSON-serialisable); part of the cache key."""
        return {}

    def build_network(self, d_model: int) -> nn.Module:  # pragma: no cover - abstract
        """A fresh network mapping ``[B, L, d_model]`` to ``[B, L, 2]`` logits (class 1:
        good enough to exit); the output at layer ``l`` may depend on layers ``<= l`` only."""
        raise NotImplementedError

    def network_flops(self, dims: ModelDims) -> float:  # pragma: no cover - abstract
        """Flops of the network for one check (one token at one layer)."""
        raise NotImplementedError

    def state_values(self, dims: ModelDims) -> int:
        """Values kept between checks (earlier layers' states), read at each check."""
        return 0

    # -- the contract -----------------------------------------------------------------------
    def checked_layers(self, num_layers: int) -> np.ndarray:
        mask = super().checked_layers(num_layers)
        mask[:self.first_scored_layer] = False
        return mask

    def check_cost(self, dims: ModelDims) -> CheckCost:
        with torch.device("meta"):  # counts parameters without allocating or drawing random numbers
            network = self.build_network(dims.d_model)
        parameters = sum(p.numel() for p in network.parameters())
        flops = (NORMALISE_FLOPS_PER_VALUE * dims.d_model + self.network_flops(dims)
                 + TWO_CLASS_SOFTMAX_FLOPS)
        values_read = parameters + self.state_values(dims) + dims.d_model
        return CheckCost(flops=float(flops), bytes=float(BYTES_PER_VALUE * values_read),
                         needs_lm_head=False)

    def fit(self, traces: TraceArrays, *, epochs: int | None = None, seed: int | None = None,
            cache_dir: str | Path | None = None, batch_size: int | None = None,
            learning_rate: float | None = None, label: str | None = None) -> FitResult:
        """Train on ``traces`` (which must carry hidden states); arguments override the
        constructor's options for this fit. Reuses cached weights when nothing changed."""
        started = time.perf_counter()
        overrides = {k: v for k, v in dict(epochs=epochs, seed=seed, batch_size=batch_size,
                                           learning_rate=learning_rate, label=label).items()
                     if v is not None}
        options = dataclasses.replace(self.training, **overrides)
        cache_dir = Path(cache_dir) if cache_dir is not None else self.cache_dir
        hidden = self._hidden_of(traces, "fit")
        label_matrix, defined = LABELS[options.label](traces)
        trainable = defined & self.checked_layers(traces.num_layers)[None, :]
        key = self._cache_key(hidden, label_matrix, trainable, options)
        path = cache_dir / f"{self.name}-{key[:20]}.pt" if cache_dir is not None else None

        if path is not None and path.is_file():
            loaded = self._load(path, key)
            if loaded is not None:
                self.fit_result = dataclasses.replace(loaded, reused=True, path=str(path),
                                                      seconds=time.perf_counter() - started)
                logger.info("%s: reusing trained weights %s", self.name, path)
                return self.fit_result

        losses = self._train(hidden, label_matrix, trainable, options)
        positives = int(label_matrix[trainable].sum())
        self.fit_result = FitResult(key=key, reused=False, path=str(path) if path else None,
                                    epochs=options.epochs, losses=tuple(losses),
                                    num_pairs=int(trainable.sum()),
                                    positive_fraction=positives / max(int(trainable.sum()), 1),
                                    seconds=time.perf_counter() - started)
        if path is not None:
            self._save(path)
        return self.fit_result

    def scores(self, traces: TraceArrays) -> np.ndarray:
        if self.network is None:
            raise ExitbenchError(f"measure {self.name!r} is learned and not fitted yet; call "
                                 f"fit() on train-split traces (with hidden states) first")
        hidden = self._hidden_of(traces, "scores")
        if hidden.shape[2] != self.d_model:
            raise ExitbenchError(f"measure {self.name!r} was fitted on hidden states of size "
                                 f"{self.d_model}, but these traces have {hidden.shape[2]}; "
                                 f"fit it on traces of the same model")
        num_tokens, num_layers = hidden.shape[:2]
        margin = np.empty((num_tokens, num_layers), dtype=np.float64)
        self.network.eval()
        with torch.no_grad():
            for start in range(0, num_tokens, SCORE_CHUNK_TOKENS):  # chunks bound memory only
                batch = self._normalise(torch.from_numpy(hidden[start:start + SCORE_CHUNK_TOKENS]))
                logits = self.network(batch)
                margin[start:start + batch.shape[0]] = (logits[..., 1] - logits[..., 0]).numpy()
        # the sigmoid in float64: a float32 softmax would round confident scores to exactly 1
        scores = 1.0 / (1.0 + np.exp(-margin))
        scores[:, :self.first_scored_layer] = -np.inf
        return scores

    # -- internals --------------------------------------------------------------------------
    def _hidden_of(self, traces: TraceArrays, purpose: str) -> np.ndarray:
        if traces.hidden is None:
            raise ExitbenchError(
                f"measure {self.name!r} reads hidden states, but the traces given to "
                f"{purpose}() carry none; re-materialise them with a teacher-forced pass "
                f"over the recorded tokens before fitting or scoring")
        hidden = np.asarray(traces.hidden)
        if hidden.ndim != 3 or hidden.shape[:2] != traces.top1_id.shape:
            raise ExitbenchError(f"hidden states have shape {hidden.shape}; expected "
                                 f"[tokens, layers, d_model] with tokens x layers = "
                                 f"{traces.top1_id.shape}")
        return np.ascontiguousarray(hidden, dtype=np.float32)

    def _normalise(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = _rms_normalise(hidden)
        return (hidden - self.norm_mean) / self.norm_std

    def _cache_key(self, hidden: np.ndarray, label_matrix: np.ndarray, trainable: np.ndarray,
                   options: TrainingOptions) -> str:
        digest = hashlib.sha256()
        header = {"measure": self.name, "architecture": self.architecture(),
                  "training": dataclasses.asdict(options), "shape": list(hidden.shape),
                  "measure_code": code_hash(type(self)), "learned_code": code_hash(LearnedMeasure)}
        digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
        for array in (hidden, label_matrix.astype(np.bool_), trainable.astype(np.bool_)):
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()

    def _train(self, hidden: np.ndarray, label_matrix: np.ndarray, trainable: np.ndarray,
               options: TrainingOptions) -> list[float]:
        num_tokens, _, d_model = hidden.shape
        num_pairs = int(trainable.sum())
        positives = int(label_matrix[trainable].sum())
        if num_pairs == 0 or positives in (0, num_pairs):
            raise ExitbenchError(
                f"measure {self.name!r}: the training traces give "
                f"{'no (token, layer) pairs' if num_pairs == 0 else 'only one class'} "
                f"({positives} of {num_pairs} pairs labelled good enough to exit, "
                f"label={options.label!r}); train on more or more varied traces")
        weights_all = torch.from_numpy(pair_weights(label_matrix, trainable, options.balance))
        if not float(weights_all.sum()) > 0:
            raise ExitbenchError(f"measure {self.name!r}: balance={options.balance!r} gives "
                                 f"every pair weight 0 (no layer has both classes); train on "
                                 f"more varied traces or use balance='classes'")
        self.d_model = d_model
        self.norm_mean, self.norm_std = _standardisation(hidden)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(options.seed)
            self.network = self.build_network(d_model)
        generator = torch.Generator().manual_seed(options.seed)
        optimiser = torch.optim.Adam(self.network.parameters(), lr=options.learning_rate,
                                     weight_decay=options.weight_decay)
        labels_all = torch.from_numpy(label_matrix.astype(np.int64))
        mask_all = torch.from_numpy(trainable)
        losses = []
        self.network.train()
        for epoch in range(options.epochs):
            order = torch.randperm(num_tokens, generator=generator).numpy()
            total, weight_total = 0.0, 0.0
            for start in range(0, num_tokens, options.batch_size):
                rows = np.sort(order[start:start + options.batch_size])
                mask = mask_all[rows]
                if not mask.any():
                    continue
                weight = weights_all[rows][mask]
                batch_weight = weight.sum()
                if not float(batch_weight) > 0:
                    continue
                logits = self.network(self._normalise(torch.from_numpy(hidden[rows])))
                targets = labels_all[rows][mask]
                loss_sum = (weight * nn.functional.cross_entropy(logits[mask], targets,
                                                                 reduction="none")).sum()
                optimiser.zero_grad()
                (loss_sum / batch_weight).backward()
                optimiser.step()
                total += float(loss_sum.detach())
                weight_total += float(batch_weight)
            losses.append(total / max(weight_total, 1e-12))
            logger.info("%s: epoch %d/%d, class-balanced cross-entropy %.4f", self.name,
                        epoch + 1, options.epochs, losses[-1])
        self.network.eval()
        return losses

    def _save(self, path: Path) -> None:
        assert self.network is not None and self.fit_result is not None
        payload = {"key": self.fit_result.key, "d_model": self.d_model,
                   "state_dict": self.network.state_dict(), "norm_mean": self.norm_mean,
                   "norm_std": self.norm_std, "fit_result": dataclasses.asdict(self.fit_result)}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def _load(self, path: Path, key: str) -> FitResult | None:
        """Load cached weights; ``None`` (and a warning) when the file is unusable."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if payload.get("key") != key:
                raise ValueError("the file's key does not match its name")
            network = self.build_network(int(payload["d_model"]))
            network.load_state_dict(payload["state_dict"])
            saved = dict(payload["fit_result"])
            saved["losses"] = tuple(saved["losses"])
            result = FitResult(**saved)
        except Exception as exc:  # noqa: BLE001 - any damage means: retrain and overwrite
            logger.warning("%s: cached weights %s are unusable (%s); retraining", self.name,
                           path, exc)
            return None
        network.eval()
        self.network, self.d_model = network, int(payload["d_model"])
        self.norm_mean, self.norm_std = payload["norm_mean"], payload["norm_std"]
        return result


def _rms_normalise(hidden: torch.Tensor) -> torch.Tensor:
    return hidden * torch.rsqrt(hidden.pow(2).mean(dim=-1, keepdim=True) + RMS_EPSILON)


def _standardisation(hidden: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation of the RMS-normalised training states."""
    d_model = hidden.shape[2]
    total = torch.zeros(d_model, dtype=torch.float64)
    total_sq = torch.zeros(d_model, dtype=torch.float64)
    count = 0
    for start in range(0, hidden.shape[0], SCORE_CHUNK_TOKENS):  # chunks bound memory only
        chunk = _rms_normalise(torch.from_numpy(hidden[start:start + SCORE_CHUNK_TOKENS]))
        chunk = chunk.reshape(-1, d_model).double()
        total += chunk.sum(dim=0)
        total_sq += chunk.pow(2).sum(dim=0)
        count += chunk.shape[0]
    mean = total / max(count, 1)
    std = (total_sq / max(count, 1) - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-4)
    return mean.float(), std.float()


# -- evaluation -----------------------------------------------------------------------------
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the binary ``labels`` (the probability that a
    random positive outscores a random negative, ties counting one half). ``-inf`` scores rank
    lowest; NaN is an error. Returns NaN when one class is absent."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels, dtype=bool).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in size")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; AUROC needs orderable scores")
    num_positive = int(labels.sum())
    num_negative = labels.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return float("nan")
    # average ranks (1-based) of tied groups: the Mann-Whitney U statistic
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0
    ranks = average_rank[inverse]
    u_statistic = ranks[labels].sum() - num_positive * (num_positive + 1) / 2.0
    return float(u_statistic / (num_positive * num_negative))


@dataclass(frozen=True)
class ChangeAuroc:
    """How well scores separate "the prediction will not change" from "will change"."""

    auroc: float
    """Over every evaluated (token, layer) pair."""
    per_layer: tuple[float, ...]
    """AUROC at each layer (NaN where a layer is not evaluated or has one class only)."""
    num_pairs: int
    positive_fraction: float
    """Share of pairs whose prediction equals the final one."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def will_not_change_auroc(scores: np.ndarray, traces: TraceArrays,
                          layers: np.ndarray | None = None) -> ChangeAuroc:
    """AUROC of ``scores`` ``[T, L]`` for "will not change" (``top1_id[:, l] == final_id``)
    against "will change", over the layers in the boolean mask ``layers`` (default: all but
    the last, whose prediction is the final one by definition)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != traces.top1_id.shape:
        raise ValueError(f"scores have shape {scores.shape}, traces {traces.top1_id.shape}")
    num_layers = traces.num_layers
    if layers is None:
        layers = np.arange(num_layers) < num_layers - 1
    layers = np.asarray(layers, dtype=bool)
    will_not_change = traces.top1_id == traces.final_id[:, None]
    per_layer = tuple(auroc(scores[:, layer], will_not_change[:, layer]) if layers[layer]
                      else float("nan") for layer in range(num_layers))  # a loop over layers
    selected = will_not_change[:, layers]
    return ChangeAuroc(auroc=auroc(scores[:, layers], selected), per_layer=per_layer,
                       num_pairs=int(selected.size),
                       positive_fraction=float(selected.mean()) if selected.size else float("nan"))


def compare_auroc(measures: Mapping[str, Measure], traces: TraceArrays,
                  layers: np.ndarray | None = None) -> dict[str, ChangeAuroc]:
    """:func:`will_not_change_auroc` of several (fitted) measures on the same held-out traces,
    over the same layers, so the numbers are comparable (e.g. learned measures next to
    softmax_margin)."""
    return {name: will_not_change_auroc(measure.scores(traces), traces, layers)
            for name, measure in measures.items()}
