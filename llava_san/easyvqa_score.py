"""easy-vqa scoring: the one metric of the in-training check and of ``python -m evaluation``.

VQA accuracy with the single gt answer standing for all ten annotators, i.e. 1 when Normaliser B of
the output equals Normaliser B of the answer (as TextVQA normalises), else 0; the mean overall and
per question type. :mod:`llava_san.training.easyvqa_eval` and the benchmark
:mod:`evaluation.tasks.easyvqa` (which adds answer-file coverage checks) both score with it.
"""

from __future__ import annotations

from typing import Iterable

from .normalize import normalize_evalai, vqa_soft_accuracy

__all__ = ["N_ANNOTATORS", "accuracy_by_type", "question_accuracy"]

N_ANNOTATORS = 10


def question_accuracy(text: str, answer: str) -> float:
    """Soft accuracy against ten identical annotators (= normalised exact match)."""
    return vqa_soft_accuracy(normalize_evalai(text), [normalize_evalai(answer)] * N_ANNOTATORS)


def _mean(values: list[float]) -> float:
    if not values:
        raise ValueError("no questions to score")
    return float(sum(values)) / len(values)


def accuracy_by_type(items: Iterable[tuple[str, str, str]]) -> tuple[float, dict[str, float]]:
    """``(accuracy, {question type: accuracy})`` of ``(output text, gt answer, question type)``
    triples; types sorted by name. No item raises ``ValueError``."""
    accs: list[float] = []
    groups: dict[str, list[float]] = {}
    for text, answer, question_type in items:
        acc = question_accuracy(text, answer)
        accs.append(acc)
        groups.setdefault(str(question_type), []).append(acc)
    return _mean(accs), {g: _mean(v) for g, v in sorted(groups.items())}
