"""The training loop, one function for every launcher: this process, or each worker of a
Ray Train ``TorchTrainer`` (PyTorch DDP; :mod:`suite.ray_train`).

**The global batch.** Step ``s`` trains on ``BatchPlan.batch(s)``, the same examples
whatever the number of workers: they are cut into ``workers x grad_accum_steps``
micro-batches and worker ``r`` runs micro-batches ``r * accum .. (r + 1) * accum - 1``.
Each micro-batch's loss (a mean over its target tokens) is weighted by its share of the
step's target tokens, times the number of workers (DDP averages gradients over workers),
so the summed gradient is that of the token mean over the whole global batch: one
process, N workers and gradient accumulation give the same update up to float rounding.
With dropout the masks differ (each worker draws its own), so only dropout-free runs are
equal across worker counts.

**Random numbers.** Dropout's generator is re-seeded at every step from
``(seed, worker rank, step)``, so a run resumed from a checkpoint draws what the
uninterrupted run drew without storing generator states.

**Checkpoints** hold the model (``save_pretrained``), its tokenizer files and
``trainer_state.pt`` (optimizer, scheduler, loss scaler, step, loss log, seconds). Where
they go is the launcher's :class:`CheckpointStore`: folders ``step-NNNNNNN`` beside the
output in this process, Ray Train's checkpoints (``ray.train.report``) in workers.

**Mixed precision.** ``precision: bf16`` runs forward and loss under
``torch.autocast(bfloat16)``; ``fp16`` adds a ``GradScaler`` (dynamic loss scaling, its
state checkpointed). Weights and optimizer state stay float32. Both are meant for CUDA;
on the CPU autocast works but is slower than float32.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from suite.errors import ExitbenchError

TRAINER_STATE_FILE = "trainer_state.pt"
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs to train (plain data: it travels to Ray workers)."""

    settings: Any
    """:class:`suite.training.TrainSettings`."""
    tokenizer_dir: str
    """Folder of the tokenizer (the init checkpoint's folder when fine-tuning)."""
    init_folder: str | None = None
    """Local folder of the pretrained checkpoint (``None``: a fresh model of the preset)."""
    data_dir: str | None = None
    eval_split: str | None = None
    eval_every: int | None = None
    """Per-layer held-out loss every N steps (rank 0), besides the one at the end."""
    checkpoint_every: int = 100
    keep_checkpoints: int = 1
    log_every: int = 10
    device: str = "cpu"
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time)."""
    threads: int | None = None
    """torch CPU threads per worker."""
    on_step: Callable[[int, float], None] | None = None
    """Called on every worker after each optimiser step (tests use it to kill a run)."""


@dataclass
class LoopOutcome:
    """What the loop leaves behind in the process that ran it."""

    model: Any
    """The trained model (the unwrapped module)."""
    loss_log: list[float]
    start_step: int
    seconds: float
    """Training time, earlier (resumed) runs included."""
    seconds_this_run: float
    eval_curve: list[tuple[int, list[float]]] = field(default_factory=list)


class CheckpointStore(Protocol):
    """Where a launcher keeps resumable checkpoints."""

    def load_latest(self, read: Callable[[Path], Any]) -> Any | None:
        """``read(folder)`` of the newest checkpoint, or ``None`` when there is none."""
        ...

    def save(self, step: int, fill: Callable[[Path], None] | None, metrics: dict[str, Any],
             final: bool = False) -> None:
        """Store the checkpoint ``fill(folder)`` writes (``fill`` is ``None`` on ranks that
        write nothing; every rank calls ``save`` at the same steps). ``final`` marks the
        end of training: a store that keeps the model in memory may skip it."""
        ...


class LocalCheckpoints:
    """``<root>/step-NNNNNNN`` folders, written atomically; the newest ``keep`` are kept."""

    def __init__(self, root: Path, keep: int = 1):
        self.root = Path(root)
        self.keep = keep

    def latest_folder(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / TRAINER_STATE_FILE).is_file())
        return done[-1] if done else None

    def load_latest(self, read):
        folder = self.latest_folder()
        return None if folder is None else read(folder)

    def save(self, step, fill, metrics, final=False):
        import shutil

        from suite.training import _write_folder

        if final or fill is None:
            return  # the finished model is written by the caller, from memory
        _write_folder(self.root / f"step-{step:07d}", fill)
        old = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for stale in old[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(stale, ignore_errors=True)


@dataclass(frozen=True)
class WorkerContext:
    """This worker's place in the group."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    distributed: bool = False
    """A ``torch.distributed`` process group is set up (Ray Train's workers)."""


class _Synced:
    """The model as the objective functions see it: calls go through the DDP wrapper
    (which synchronises gradients), attributes (``config``, ``decoder``, ``lm_head``)
    come from the module inside."""

    def __init__(self, ddp):
        self._ddp = ddp

    def __call__(self, *args, **kwargs):
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._ddp.module, name)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The dropout generator's seed at ``step`` on worker ``rank``."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def micro_batches(indices: np.ndarray, world_size: int, accum: int, rank: int) -> list[np.ndarray]:
    """Worker ``rank``'s micro-batches of one step's global batch."""
    parts = np.array_split(np.asarray(indices), world_size * accum)
    return parts[rank * accum:(rank + 1) * accum]


def build_optimizer(model, settings):
    """AdamW (no weight decay on norms) or Adafactor as the Hugging Face Trainer builds it
    for FREE's scripts (``optim=adafactor``: a fixed learning rate, no relative step or
    parameter scaling)."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if "layer_norm" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=settings.learning_rate, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    return torch.optim.AdamW(groups, lr=settings.learning_rate)


def lr_factor(schedule: str, warmup: int, total: int, final_fraction: float
              ) -> Callable[[int], float]:
    """Linear warmup to the peak rate over ``warmup`` steps, then ``linear`` decay to
    ``final_fraction`` of it at the last step, ``cosine`` decay to the same, or
    ``constant``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        if schedule == "cosine":
            return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
        return max(final_fraction, 1.0 - (1.0 - final_fraction) * progress)
    return factor


def _autocast(device: str, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def run_training(job: TrainJob, context: WorkerContext, store: CheckpointStore, *,
                 on_log: Callable[[int, float, dict[str, float]], None] | None = None
                 ) -> LoopOutcome:
    """Train ``job`` on this worker from the newest checkpoint in ``store`` (or from the
    start) to ``settings.steps``; see the module docstring."""
    import torch

    from suite.backbones import FAMILIES, FRESH_FAMILY, copy_tokenizer, family_for
    from suite.tokenizer import load_tokenizer as load_suite_tokenizer
    from suite.training import BatchPlan, _load_examples, evaluate_layer_losses, get_preset

    settings = job.settings
    if job.threads:
        torch.set_num_threads(job.threads)
    tokenizer_dir = Path(job.tokenizer_dir)
    if job.init_folder is None:
        tokenizer = load_suite_tokenizer(tokenizer_dir)
    else:
        from suite.models import load_tokenizer

        tokenizer = load_tokenizer(str(tokenizer_dir))
    data, _, _, _ = _load_examples(settings, settings.split, job.data_dir, tokenizer)
    eval_data = None
    if job.eval_every and job.eval_split and context.rank == 0:
        eval_data, _, _, _ = _load_examples(settings, job.eval_split, job.data_dir, tokenizer)

    def read(folder: Path):
        config = _model_type(folder)
        model = family_for(config, str(folder)).pretrained(folder, dropout_rate=None)
        return model, torch.load(folder / TRAINER_STATE_FILE, weights_only=True)

    resumed = store.load_latest(read)
    if resumed is not None:
        model, state = resumed
    elif job.init_folder is not None:
        folder = Path(job.init_folder)
        model = family_for(_model_type(folder), f"--init {folder}").pretrained(
            folder, dropout_rate=settings.dropout_rate)
        state = None
    else:
        torch.manual_seed(settings.seed)
        preset = get_preset(settings.preset)
        model = FAMILIES[preset.family if preset.family in FAMILIES else FRESH_FAMILY].fresh(
            preset, len(tokenizer), seed=settings.seed, dropout_rate=settings.dropout_rate)
        state = None
    family = family_for(model.config.model_type)
    objective = settings.objective_spec.resolved(family.num_layers(model))
    device = torch.device(context.device)
    model.to(device)
    if job.gradient_checkpointing:
        model.config.use_cache = False
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    optimizer = build_optimizer(model, settings)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(settings.lr_schedule, settings.warmup_steps, settings.steps,
                             settings.final_lr_fraction))
    scaler = torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16")
    start_step, loss_log, earlier_seconds, eval_curve = 0, [], 0.0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        loss_log = [float(x) for x in state["loss_log"]]
        earlier_seconds = float(state["seconds"])
        eval_curve = [(int(s), [float(v) for v in ce]) for s, ce in state.get("eval_curve", [])]

    view = model
    ddp = None
    if context.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
        view = _Synced(ddp)

    began = time.perf_counter()

    def save(step: int, final: bool = False) -> None:
        def fill(folder: Path) -> None:
            model.save_pretrained(str(folder))
            copy_tokenizer(tokenizer_dir, folder)
            torch.save({"step": step, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                        "loss_log": torch.tensor(loss_log, dtype=torch.float64),
                        "seconds": earlier_seconds + time.perf_counter() - began,
                        "resumed_from": start_step,
                        "eval_curve": eval_curve}, folder / TRAINER_STATE_FILE)
        store.save(step, fill if context.rank == 0 else None,
                   {"step": step, "loss": loss_log[-1] if loss_log else float("nan")}, final)

    plan = BatchPlan([len(s) for s in data.sources], settings.batch_size, settings.seed)
    accum = settings.grad_accum_steps
    if settings.batch_size < context.world_size * accum:
        raise ExitbenchError(f"batch size {settings.batch_size} cannot be cut into "
                             f"{context.world_size} workers x {accum} accumulation steps; use "
                             f"a batch size of at least {context.world_size * accum}")
    for step in range(start_step + 1, settings.steps + 1):
        torch.manual_seed(step_seed(settings.seed, context.rank, step))
        indices = plan.batch(step)
        total_tokens = sum(len(data.targets[i]) for i in indices)
        mine = micro_batches(indices, context.world_size, accum, context.rank)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        parts: dict[str, float] = {}
        for j, idx in enumerate(mine):
            if len(idx) == 0:
                continue
            batch = {k: v.to(device) for k, v in family.collate(data, idx).items()}
            share = sum(len(data.targets[i]) for i in idx) / total_tokens
            sync = ddp is None or j == len(mine) - 1
            with contextlib.nullcontext() if sync else ddp.no_sync():
                with _autocast(context.device, settings.precision):
                    result = family.loss(view, batch,
                                         objective.at_step(step, settings.steps, settings.seed))
                scaler.scale(result.total * (share * context.world_size)).backward()
            loss_sum += float(result.total.detach()) * share
            parts = result.parts
        if ddp is not None:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(loss_sum)
        if not math.isfinite(loss):
            raise ExitbenchError(f"the training loss became {loss} at step {step}; lower "
                                 f"--lr (now {settings.learning_rate}) and rerun into a new "
                                 f"--out")
        loss_log.append(loss)
        if on_log is not None:
            on_log(step, float(np.mean(loss_log[-job.log_every:])), parts)
        if eval_data is not None and step % job.eval_every == 0 and step < settings.steps:
            eval_curve.append((step, evaluate_layer_losses(model, eval_data)))
            model.train()
        if step % job.checkpoint_every == 0 and step < settings.steps:
            save(step)
        if job.on_step is not None:
            job.on_step(step, loss)
    save(settings.steps, final=True)
    this_run = time.perf_counter() - began
    return LoopOutcome(model=model, loss_log=loss_log, start_step=start_step,
                       seconds=earlier_seconds + this_run, seconds_this_run=this_run,
                       eval_curve=eval_curve)


def _model_type(folder: Path) -> str:
    import json

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ExitbenchError(f"{folder} has no config.json: it is not a model checkpoint")
    return json.loads(path.read_text("utf-8")).get("model_type", "")


def read_checkpoint_state(folder: Path) -> dict[str, Any]:
    """``trainer_state.pt`` of a checkpoint folder."""
    import torch

    return torch.load(Path(folder) / TRAINER_STATE_FILE, weights_only=True)
