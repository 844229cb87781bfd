"""``exitbench train``: train a small T5 backbone from scratch, or fine-tune a pretrained
checkpoint (``--init``), with an early-exit objective; in this process or on Ray Train
(``--workers N``)."""

from __future__ import annotations

import argparse

from suite.train_loop import PRECISIONS
from suite.training import LR_SCHEDULES, OBJECTIVES, OPTIMIZERS, PRESETS, TrainSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = TrainSettings()
    parser = subparsers.add_parser(
        "train", help="train or fine-tune a T5 (vanilla, CALM or FREE objective) or a "
                      "decoder-only Llama-style model (vanilla, CALM or LayerSkip) on task data",
        description="Train a small T5 (or, with a llama-* preset, a Llama-style decoder-only) "
                    "backbone from scratch on task examples with a "
                    "tokenizer from `exitbench train-tokenizer`, or fine-tune a pretrained "
                    "checkpoint (--init HUB_ID_OR_FOLDER; t5, t5-v1_1, flan-t5, mt5, Llama, "
                    "Mistral, Qwen2, Qwen3) with its own tokenizer. With --workers N it runs on Ray Train (PyTorch "
                    "DDP) on this machine or the cluster at --address; --batch-size is the "
                    "global batch either way. Checkpoints go to <out>.checkpoints/ every "
                    "--checkpoint-every steps; rerunning the same command resumes from the "
                    "newest one. The finished folder holds the model (save_pretrained), the "
                    "tokenizer and exitbench_model.json.")
    parser.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective,
                        help=f"training loss (default {defaults.objective})")
    parser.add_argument("--init", default=None,
                        help="pretrained checkpoint to fine-tune: a hub id "
                             "(google-t5/t5-large) or a folder written by save_pretrained")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="model size: " + "; ".join(f"{p.name}: d_model {p.d_model}, "
                                                       f"{p.num_layers}+{p.num_layers} layers"
                                                       for p in PRESETS.values())
                        + f" (default {defaults.preset}; not with --init)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder written by `exitbench train-tokenizer` (fresh "
                             "models; --init uses the checkpoint's own)")
    parser.add_argument("--task", action="append", dest="tasks", required=True,
                        help="task to train on (repeat for several)")
    parser.add_argument("--split", default=defaults.split,
                        help="training split, hub slice syntax allowed (e.g. 'validation[200:]')")
    parser.add_argument("--eval-split", default=None,
                        help="split to report per-layer held-out loss on at the end "
                             "(e.g. 'validation[:200]')")
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--data-dir", default=None,
                        help="folder of JSON Lines in the hub layout (default: $EXITBENCH_DATA_DIR, "
                             "else the hub)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--max-source-tokens", type=int, default=None,
                        help="truncate inputs to this many tokens (default: the task's limit; "
                             "256 halves SQuAD's cost on a CPU)")
    parser.add_argument("--max-target-tokens", type=int, default=None)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, dest="learning_rate")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--dropout", type=float, default=None, dest="dropout_rate",
                        help="dropout rate (default: the preset's)")
    parser.add_argument("--shallow-layer", type=int, default=None,
                        help="FREE's shallow exit layer, 1-based (default: L/4, FREE's 6 of 24)")
    parser.add_argument("--layer-map", default=defaults.layer_map,
                        choices=("dyna", "uniform", "last"),
                        help="FREE's distillation layer map (default dyna, FREE's)")
    parser.add_argument("--kd-weight", type=float, default=defaults.kd_weight,
                        help="FREE's weight of the layer-wise distillation loss (default 0.5)")
    parser.add_argument("--layer-dropout", type=float, default=None,
                        help="LayerSkip: the last layer's dropout rate, rising exponentially "
                             "from 0 at the first layer (default 0.2)")
    parser.add_argument("--early-exit-scale", type=float, default=None,
                        help="LayerSkip: scale of the early exits' losses (default 1.0)")
    parser.add_argument("--curriculum", choices=("gradual", "none"), default=None,
                        help="LayerSkip: exits whose losses count, enabled from the last layer "
                             "down over the first half of training (gradual, the default)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer,
                        help="adamw, or adafactor as FREE's scripts use it (default adamw)")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=defaults.lr_schedule,
                        help="after the warmup: linear or cosine decay to --final-lr-fraction "
                             "of the peak, or constant (default linear)")
    parser.add_argument("--final-lr-fraction", type=float, default=defaults.final_lr_fraction)
    parser.add_argument("--grad-accum-steps", type=int, default=defaults.grad_accum_steps,
                        help="micro-batches per worker per optimiser step (default 1)")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="fp32, bf16 (autocast) or fp16 (autocast + loss scaling); the "
                             "last two are for CUDA")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass to save memory")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--eval-every", type=int, default=None,
                        help="also report per-layer held-out loss every N steps")
    parser.add_argument("--workers", type=int, default=None,
                        help="train on Ray Train with N workers (PyTorch DDP); default: in "
                             "this process")
    parser.add_argument("--address", default=None,
                        help="Ray cluster for --workers: 'auto' or HOST:PORT (default: start "
                             "Ray here on 127.0.0.1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per worker)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--storage", default=None,
                        help="Ray Train checkpoint storage (shared by all nodes on a "
                             "cluster; default <out>.checkpoints/ray)")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="restarts of a failed Ray Train worker group from the newest "
                             "checkpoint (default 2)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="save a resumable checkpoint every N steps (default 100)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from suite.errors import ExitbenchError
    from suite.training import Launch, train

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.checkpoint_every < 1:
        raise ExitbenchError(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if args.init and args.preset:
        raise ExitbenchError("--preset and --init exclude each other: a fine-tuned model has "
                             "its checkpoint's architecture")
    settings = TrainSettings(
        objective=args.objective, preset=args.preset or TrainSettings().preset,
        tasks=tuple(args.tasks), split=args.split, limit=args.limit,
        max_source_tokens=args.max_source_tokens, max_target_tokens=args.max_target_tokens,
        shallow_layer=args.shallow_layer, kd_weight=args.kd_weight, layer_map=args.layer_map,
        steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        dropout_rate=args.dropout_rate, seed=args.seed, init=args.init,
        optimizer=args.optimizer, lr_schedule=args.lr_schedule,
        final_lr_fraction=args.final_lr_fraction, grad_accum_steps=args.grad_accum_steps,
        precision=args.precision, layer_dropout=args.layer_dropout,
        early_exit_scale=args.early_exit_scale, curriculum=args.curriculum)
    launch = Launch(workers=args.workers, address=args.address, device=args.device,
                    cpus_per_worker=args.cpus_per_worker, storage=args.storage,
                    max_failures=args.max_failures)
    result = train(settings, args.tokenizer, args.out, data_dir=args.data_dir,
                   eval_split=args.eval_split, eval_every=args.eval_every,
                   checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
                   launch=launch, gradient_checkpointing=args.gradient_checkpointing,
                   threads=args.threads)
    meta = result.metadata
    if result.already_done:
        print(f"model {result.folder} is already trained with these settings; nothing to do")
    else:
        resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
        print(f"model {result.folder}: {result.steps} steps in {result.seconds:.0f} s{resumed}")
    print(f"  {meta['label']}")
    curve = result.loss_curve
    if curve:
        shown = curve[:: max(1, len(curve) // 8)]
        if shown[-1] != curve[-1]:
            shown = [*shown, curve[-1]]
        print("  loss   " + "  ".join(f"{step}:{loss:.3f}" for step, loss in shown))
    if result.eval_layer_ce:
        print(f"  held-out CE per layer ({meta['eval']['split']}): "
              + " ".join(f"{v:.3f}" for v in result.eval_layer_ce))
    return 0
