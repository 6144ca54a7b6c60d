"""Scoring glue of ``python -m evaluation``: a run's answer file -> :func:`evaluation.score.score_benchmark`
with the files LLaVA's converters use."""

from __future__ import annotations

import os
from typing import Any

from evaluation.resolve import BenchmarkData
from evaluation.score import score_benchmark

__all__ = ["score_answers"]


def score_answers(data: BenchmarkData, answers: str | os.PathLike) -> dict[str, Any]:
    """Score an answer file on ``data``'s benchmark. A ``limit`` run is scored on its own questions
    where the task allows it (:attr:`Task.scores_subset`), else over the whole question file with
    missing answers allowed; the task adds its own inputs (:attr:`Task.score_inputs`)."""
    task = data.task
    kwargs: dict[str, Any] = {"annotations": data.annotations}
    if task.scores_subset:
        kwargs["questions"] = data.questions
    else:
        kwargs["questions"] = data.questions_file
        kwargs["allow_missing"] = data.limited
    if task.score_inputs is not None:
        kwargs.update(task.score_inputs(data))
    return score_benchmark(task.name, str(answers), split=data.split, **kwargs)
