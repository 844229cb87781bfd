"""Training on Ray Train: ``TorchTrainer`` workers (PyTorch DDP; gloo on CPUs, NCCL on
GPUs) each run :func:`suite.train_loop.run_training` over their share of every global
batch.

- **Where.** Ray in this process on 127.0.0.1, or the cluster at ``--address`` /
  ``ray.address``; ``--workers N`` workers, one GPU each with ``--device cuda``.
- **Checkpoints** go through Ray Train (``ray.train.report``) into
  ``<out>.checkpoints/ray/train`` (``--storage`` for a store every node can reach:
  NFS or S3 on a multi-node cluster). A worker that dies makes Ray Train restart the
  worker group from the newest checkpoint (up to ``max_failures`` times); a driver that
  dies is resumed by rerunning the same command: Ray Train finds the run's checkpoints
  under the same storage path and name.
- **Progress.** Rank 0 sends (step, loss) to a small actor that the driver polls for its
  progress bar, so progress shows on a cluster too (workers' stdout is not forwarded).
- The finished model is read back from the last checkpoint by the driver, which writes
  the model folder: no disk needs to be shared for the output itself.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from suite.errors import ExitbenchError
from suite.train_loop import LoopOutcome, TrainJob, WorkerContext, read_checkpoint_state

RUN_NAME = "train"


class RayCheckpoints:
    """Ray Train's checkpoints, seen through :class:`suite.train_loop.CheckpointStore`."""

    def load_latest(self, read):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return read(Path(folder))

    def save(self, step, fill, metrics, final=False):
        import ray.train

        with tempfile.TemporaryDirectory(prefix="exitbench-ckpt-") as tmp:
            checkpoint = None
            if fill is not None:
                fill(Path(tmp))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"step-{step:07d}")


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.step, self.loss = 0, float("nan")

        def update(self, step: int, loss: float) -> None:
            self.step, self.loss = step, loss

        def get(self) -> tuple[int, float]:
            return self.step, self.loss

    return Progress.remote()


def worker_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    from suite.train_loop import run_training

    job: TrainJob = config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = str(ray.train.torch.get_device()) if job.device.startswith("cuda") else "cpu"
    progress = config.get("progress")

    def on_log(step: int, loss: float, parts: dict[str, float]) -> None:
        if progress is not None and rank == 0:
            progress.update.remote(step, loss)

    run_training(job, WorkerContext(rank=rank, world_size=world, device=device,
                                    distributed=world > 1), RayCheckpoints(), on_log=on_log)


def train_on_ray(job: TrainJob, launch, checkpoint_root: Path, *,
                 progress: bool = True) -> LoopOutcome:
    """Run ``job`` on ``launch.workers`` Ray Train workers; return the trained model and
    its loss log, read from the final checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from suite.runner import init_ray

    cuda = launch.device.startswith("cuda")
    storage = launch.storage or str((Path(checkpoint_root) / "ray").resolve())
    started = init_ray(launch.address)
    try:
        tracker = _progress_actor() if progress else None
        trainer = TorchTrainer(
            worker_loop, train_loop_config={"job": job, "progress": tracker},
            torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
            scaling_config=ScalingConfig(num_workers=launch.workers, use_gpu=cuda,
                                         resources_per_worker={"CPU": launch.cpus_per_worker,
                                                               **({"GPU": 1} if cuda else {})}),
            run_config=RunConfig(name=RUN_NAME, storage_path=storage,
                                 failure_config=FailureConfig(max_failures=launch.max_failures),
                                 checkpoint_config=CheckpointConfig(
                                     num_to_keep=max(1, job.keep_checkpoints))))
        result = _fit_with_progress(trainer, tracker, job.settings.steps, job.settings.objective)
        if result.checkpoint is None:
            raise ExitbenchError("Ray Train finished without a checkpoint; rerun to resume")
        with result.checkpoint.as_directory() as folder:
            return _outcome_from(Path(folder))
    finally:
        if started:
            import ray

            ray.shutdown()


def _fit_with_progress(trainer, tracker, steps: int, objective: str):
    import ray

    bar, stop = None, threading.Event()
    if tracker is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"train {objective} (Ray Train)", unit="step",
                   mininterval=1.0, dynamic_ncols=True)

        def poll() -> None:
            while not stop.wait(1.0):
                try:
                    step, loss = ray.get(tracker.get.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - progress only
                    continue
                if step != bar.n:
                    bar.n = step
                    bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                    bar.refresh()

        threading.Thread(target=poll, daemon=True).start()
    try:
        return trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and friends
        raise ExitbenchError(f"training on Ray Train failed ({type(exc).__name__}: {exc}); "
                             f"rerunning the same command resumes from the newest "
                             f"checkpoint") from exc
    finally:
        stop.set()
        if bar is not None:
            bar.close()


def _outcome_from(folder: Path) -> LoopOutcome:
    from suite.backbones import family_for
    from suite.train_loop import _model_type

    model = family_for(_model_type(folder)).pretrained(folder, dropout_rate=None)
    state = read_checkpoint_state(folder)
    return LoopOutcome(model=model, loss_log=[float(x) for x in state["loss_log"]],
                       start_step=int(state.get("resumed_from", 0)),
                       seconds=float(state["seconds"]), seconds_this_run=float(state["seconds"]),
                       eval_curve=[(int(s), [float(v) for v in ce])
                                   for s, ce in state.get("eval_curve", [])])
