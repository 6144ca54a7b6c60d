"""easy-vqa test questions as a benchmark (runs on CPU end to end).

Questions: a LLaVA question jsonl (``question_id``, ``image``, ``text`` [, ``category``]); ``text`` is
the prompt verbatim, as in ``model_vqa_loader`` (:func:`build_prompt` adds LLaVA's short-answer
suffix to a bare question, for cache writers).

Annotations: a json object ``{question_id: {"answer": str, "question_type": str}}`` or a list of
``{"question_id", "answer", "question_type"}`` (``question_type`` optional; the question's
``category`` is the fallback, then ``"all"``).

Metric (:mod:`llava_san.easyvqa_score`, shared with the in-training check): VQA accuracy with the
single gt answer standing for all ten annotators, i.e. 1 when Normaliser B of the output equals
Normaliser B of the answer (as TextVQA normalises), else 0. ``accuracy`` overall and
``per_question_type``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from evaluation.answers import as_answers, canonical_id, match_answers
from evaluation.files import DataFileError
from evaluation.tasks.base import (
    SHORT_ANSWER_SUFFIX,
    EvalQuestion,
    load_json_or_value,
    read_llava_question_jsonl,
    result,
)
from evaluation.tasks.task import ScoreInput, Task
from llava_san.easyvqa_score import accuracy_by_type

NAME = "easyvqa"
TITLE = "easy-vqa"
HEADLINE = "accuracy"
MAX_NEW_TOKENS = 128
LLAVA_LAYOUT: dict[str, str] = {}


def build_prompt(question: str) -> str:
    """``question`` + LLaVA's short-answer suffix."""
    return question + SHORT_ANSWER_SUFFIX


def load_questions(
    questions: str | os.PathLike, image_folder: str | os.PathLike | None = None
) -> list[EvalQuestion]:
    """The easy-vqa question jsonl (prompt = ``text``; ``meta["category"]`` when present)."""
    return read_llava_question_jsonl(
        questions, image_folder, max_new_tokens=MAX_NEW_TOKENS, meta_keys=("category",)
    )


def load_annotations(annotations: Any) -> dict[str, dict[str, Any]]:
    """Annotations (path, dict or list) -> canonical id -> ``{"answer", "question_type"}``."""
    obj = load_json_or_value(annotations)
    if isinstance(obj, list):
        items = []
        for i, a in enumerate(obj):
            if not isinstance(a, dict) or "question_id" not in a:
                raise DataFileError(f"easy-vqa annotations[{i}]: needs 'question_id'")
            items.append((a["question_id"], a))
    elif isinstance(obj, dict):
        items = list(obj.items())
    else:
        raise DataFileError("easy-vqa annotations: expected a json object or list")
    out = {}
    for qid, a in items:
        if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
            raise DataFileError(f"easy-vqa annotation {qid!r}: needs a string 'answer'")
        try:
            key = canonical_id(qid)
        except TypeError as e:
            raise DataFileError(f"easy-vqa annotations: {e}") from None
        if key in out:
            raise DataFileError(f"easy-vqa annotations: duplicate question_id {qid!r}")
        out[key] = {"answer": a["answer"], "question_type": a.get("question_type")}
    return out


def score(
    answers: Any,
    annotations: Any,
    *,
    questions: Any = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """``accuracy``, ``per_question_type``, ``n_questions`` and coverage. ``questions`` (optional)
    restricts the expected ids and supplies ``category`` as the fallback question type."""
    gt = load_annotations(annotations)
    categories: dict[str, Any] = {}
    if questions is not None:
        qs = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else questions
        ids = [canonical_id(q.question_id) for q in qs]
        categories = {canonical_id(q.question_id): q.meta.get("category") for q in qs}
        outside = [i for i in ids if i not in gt]
        if outside:
            raise ValueError(f"{len(outside)} question ids have no annotation (e.g. {outside[:5]})")
    else:
        ids = list(gt)
    matched = match_answers(
        as_answers(answers), ids, allow_missing=allow_missing, allow_unknown=allow_unknown
    )
    accuracy, per_type = accuracy_by_type(
        (matched.one(qid).text, gt[qid]["answer"], gt[qid]["question_type"] or categories.get(qid) or "all")
        for qid in ids
    )
    metrics = {"accuracy": accuracy, "per_question_type": per_type, "n_questions": len(ids)}
    return result(NAME, HEADLINE, metrics, matched.coverage)


def score_files(
    answers: Any,
    *,
    questions: Any = None,
    annotations: Any = None,
    split: str | None = None,
    submission: Any = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """CLI entry: needs ``annotations``; ``questions`` optional."""
    if annotations is None:
        raise ValueError("easyvqa needs --annotations (question_id -> answer/question_type json)")
    return score(
        answers, annotations, questions=questions, allow_missing=allow_missing, allow_unknown=allow_unknown
    )


def _find_files(overrides: Mapping[str, Any]) -> dict[str, Path]:
    """The test files that the data pipeline writes in its cache (``data.easyvqa.cache_dir``)."""
    # imported here: the data pipeline pulls in torch and Lightning, which the scorers do not need
    from llava_san.data.easyvqa import prepare_easyvqa

    paths = prepare_easyvqa(str(overrides.get("cache_dir") or ".cache/easyvqa"))
    return {"questions": Path(paths.test_questions), "image_folder": Path(paths.image_folder),
            "annotations": Path(paths.test_answers)}


TASK = Task(NAME, TITLE, HEADLINE, MAX_NEW_TOKENS, LLAVA_LAYOUT, load_questions, score, score_files,
            find_files=_find_files, score_needs=(
                ScoreInput("annotations", "required", "{question_id: {answer, question_type}} json (the "
                           "easy-vqa cache's test_answers.json)"),
                ScoreInput("questions", "optional", "question jsonl (restricts the expected ids)")))
