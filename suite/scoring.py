"""Scoring predictions against a task's references."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from suite.errors import DataError
from suite.metrics import MetricResult, get_metric
from suite.tasks import Example, TaskSpec


@dataclass(frozen=True)
class ScoreReport:
    result: MetricResult
    num_examples: int
    missing_ids: list[str]
    """Examples without a prediction; scored as empty answers."""
    unknown_ids: list[str]
    """Prediction ids that are not in the split; ignored."""


def read_predictions(path: str | Path) -> dict[str, str]:
    """``{"id": ..., "prediction": ...}`` per line -> id -> prediction."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"predictions file {path} not found")
    predictions: dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for line_number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                example_id, prediction = str(record["id"]), record["prediction"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{path}:{line_number}: expected a JSON object with 'id' and "
                                f"'prediction' ({exc})") from exc
            if not isinstance(prediction, str):
                raise DataError(f"{path}:{line_number}: 'prediction' must be a string")
            if example_id in predictions:
                raise DataError(f"{path}:{line_number}: id {example_id!r} appears twice")
            predictions[example_id] = prediction
    return predictions


def score_predictions(task: TaskSpec, examples: Sequence[Example],
                      predictions: Mapping[str, str]) -> ScoreReport:
    known = {ex.id for ex in examples}
    missing = [ex.id for ex in examples if ex.id not in predictions]
    unknown = [i for i in predictions if i not in known]
    outputs = [predictions.get(ex.id, "") for ex in examples]
    result = get_metric(task.metric)(outputs, [ex.references for ex in examples])
    return ScoreReport(result=result, num_examples=len(examples), missing_ids=missing,
                       unknown_ids=unknown)
