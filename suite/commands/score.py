"""``exitbench score``: score a predictions file against a task's references."""

from __future__ import annotations

import argparse

from suite.scoring import read_predictions, score_predictions
from suite.tasks import get_task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "score", help="score a JSON Lines file of {id, prediction} with the task's metric")
    parser.add_argument("--task", required=True, help="task name (see `exitbench ls tasks`)")
    parser.add_argument("--predictions", required=True, help='JSON Lines: {"id": ..., "prediction": ...}')
    parser.add_argument("--split", default="validation")
    parser.add_argument("--data-dir", default=None,
                        help="folder of JSON Lines in the hub layout (default: $EXITBENCH_DATA_DIR, else the hub)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from suite.tasks import load_examples

    task = get_task(args.task)
    examples = load_examples(task, args.split, args.data_dir)
    predictions = read_predictions(args.predictions)
    report = score_predictions(task, examples, predictions)
    print(f"task {task.name}  split {args.split}  examples {report.num_examples}  "
          f"metric {task.metric}")
    for key, value in report.result.scores.items():
        print(f"  {key:<12} {value:8.2f}")
    if report.result.signature:
        print(f"  signature    {report.result.signature}")
    if report.missing_ids:
        shown = ", ".join(report.missing_ids[:5]) + (" ..." if len(report.missing_ids) > 5 else "")
        print(f"  missing      {len(report.missing_ids)} example(s) had no prediction and count "
              f"as empty answers: {shown}")
    if report.unknown_ids:
        print(f"  ignored      {len(report.unknown_ids)} prediction(s) with ids not in the split: "
              + ", ".join(report.unknown_ids[:5]))
    return 0
