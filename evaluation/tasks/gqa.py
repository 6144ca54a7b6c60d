"""GQA testdev-balanced.

Questions: LLaVA's ``llava_gqa_testdev_balanced.jsonl``, or the official
``testdev_balanced_questions.json`` (prompt = question + short-answer suffix, image ``<imageId>.jpg``).

Scoring (docs/benchmarks.md section 2): LLaVA's ``convert_gqa_for_eval.py`` turns each output into
``text.rstrip('.').lower()`` (the only normalisation), then the official ``eval.py`` compares it with
``answer`` by exact string match, over questions with ``isBalanced``. ``open`` = questions whose
``types.structural == "query"``, ``binary`` = the others. Answers to non-balanced questions of the
file are ignored (as ``eval.py`` does) and counted in ``n_ignored_unbalanced``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from evaluation.answers import as_answers, canonical_id, match_answers
from evaluation.files import DataFileError, write_json
from evaluation.tasks.base import (
    SHORT_ANSWER_SUFFIX,
    EvalQuestion,
    group_means,
    load_json_or_value,
    mean,
    read_llava_question_jsonl,
    resolve_image,
    result,
)
from evaluation.tasks.task import ScoreInput, Task

NAME = "gqa"
TITLE = "GQA"
HEADLINE = "accuracy"
MAX_NEW_TOKENS = 128
LLAVA_LAYOUT = {
    "folder": "gqa",
    "questions": "llava_gqa_testdev_balanced.jsonl",
    "image_folder": "data/images",
    "annotations": "data/testdev_balanced_questions.json",
}


def load_questions(
    questions: str | os.PathLike, image_folder: str | os.PathLike | None = None
) -> list[EvalQuestion]:
    """LLaVA question jsonl, or an official ``*_balanced_questions.json`` (prompts built as LLaVA's)."""
    path = Path(questions)
    if path.suffix == ".jsonl":
        return read_llava_question_jsonl(path, image_folder, max_new_tokens=MAX_NEW_TOKENS)
    gt = load_annotations(path)
    return [
        EvalQuestion(
            qid,
            q["question"] + SHORT_ANSWER_SUFFIX,
            resolve_image(f"{q['imageId']}.jpg", image_folder),
            MAX_NEW_TOKENS,
            meta={"image_id": q["imageId"]},
        )
        for qid, q in gt.items()
    ]


def load_annotations(annotations: Any) -> dict[str, Mapping[str, Any]]:
    """Official questions json (path or dict ``qid -> question``) -> canonical id -> question."""
    obj = load_json_or_value(annotations)
    if not isinstance(obj, dict):
        raise DataFileError("GQA annotations: expected a dict question_id -> question")
    for qid, q in obj.items():
        if not isinstance(q, dict) or "answer" not in q or "question" not in q:
            raise DataFileError(f"GQA annotations: question {qid} needs 'question' and 'answer'")
    return {canonical_id(k): v for k, v in obj.items()}


def parse_prediction(text: str) -> str:
    """LLaVA's ``convert_gqa_for_eval.py``: ``text.rstrip('.').lower()``."""
    return text.rstrip(".").lower()


def _structural(q: Mapping[str, Any]) -> str:
    return (q.get("types") or {}).get("structural", "unknown")


def _semantic(q: Mapping[str, Any]) -> str:
    return (q.get("types") or {}).get("semantic", "unknown")


def score(
    answers: Any,
    annotations: Any,
    *,
    questions: Any = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """Exact-match accuracy over balanced questions: ``accuracy``, ``open``, ``binary``,
    ``per_structural``, ``per_semantic``, counts and ``coverage``. ``questions`` (optional)
    restricts the expected ids to a questions file / list of :class:`EvalQuestion`."""
    gt = load_annotations(annotations)
    balanced = {k for k, q in gt.items() if q.get("isBalanced", True)}
    if questions is not None:
        qs = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else questions
        ids = [canonical_id(q.question_id) for q in qs]
        outside = [i for i in ids if i not in gt]
        if outside:
            raise ValueError(
                f"{len(outside)} question ids of the questions file are not in the annotations "
                f"(e.g. {outside[:5]})"
            )
        expected = [i for i in ids if i in balanced]
    else:
        expected = [k for k in gt if k in balanced]
    ans = as_answers(answers)
    unbalanced = set(gt) - balanced
    kept = [a for a in ans if canonical_id(a.question_id) not in unbalanced]
    matched = match_answers(kept, expected, allow_missing=allow_missing, allow_unknown=allow_unknown)
    matched.coverage.answered = len(ans)

    scores, opens, binaries, by_struct, by_sem = [], [], [], [], []
    for qid in expected:
        q = gt[qid]
        s = float(parse_prediction(matched.one(qid).text) == q["answer"])
        scores.append(s)
        (opens if _structural(q) == "query" else binaries).append(s)
        by_struct.append((_structural(q), s))
        by_sem.append((_semantic(q), s))
    metrics = {
        "accuracy": mean(scores),
        "open": mean(opens) if opens else None,
        "binary": mean(binaries) if binaries else None,
        "per_structural": group_means(by_struct),
        "per_semantic": group_means(by_sem),
        "n_questions": len(scores),
        "n_open": len(opens),
        "n_binary": len(binaries),
        "n_ignored_unbalanced": len(ans) - len(kept),
    }
    return result(NAME, HEADLINE, metrics, matched.coverage)


def write_predictions(path: str | os.PathLike, answers: Any) -> None:
    """The official ``eval.py`` input as LLaVA writes it: ``[{"questionId", "prediction"}]``."""
    write_json(
        path,
        [{"questionId": a.question_id, "prediction": parse_prediction(a.text)} for a in as_answers(answers)],
    )


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
    """CLI entry: needs ``annotations`` (``testdev_balanced_questions.json``); ``questions`` optional.
    ``submission`` (a path) also writes the ``eval.py`` predictions file."""
    if annotations is None:
        raise ValueError("gqa needs --annotations (the official *_balanced_questions.json)")
    out = score(
        answers, annotations, questions=questions, allow_missing=allow_missing, allow_unknown=allow_unknown
    )
    if submission not in (None, False, True):
        write_predictions(submission, answers)
        out["submission"] = str(submission)
    return out


TASK = Task(NAME, TITLE, HEADLINE, MAX_NEW_TOKENS, LLAVA_LAYOUT, load_questions, score, score_files,
            write_submission=write_predictions, score_needs=(
                ScoreInput("annotations", "required", "the official <split>_balanced_questions.json"),
                ScoreInput("questions", "optional", "LLaVA question jsonl (restricts the expected ids)")))
