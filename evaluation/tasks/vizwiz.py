"""VizWiz-VQA (LLaVA-1.5 reports test through EvalAI; val can be scored offline).

Questions: LLaVA's ``llava_test.jsonl`` (``question_id``, ``image``, ``text`` = question + the
"Unanswerable" instruction + short-answer suffix), or an official ``val.json``/``test.json`` list
(``question_id`` = position in the list, prompts built as LLaVA's).

Scoring (``docs/benchmarks.md`` section 3, LLaVA pipeline): ``convert_vizwiz_for_submission.py`` applies
Normaliser B to the prediction; the official VizWiz evaluation then applies Normaliser A to the
prediction only and compares it with the **raw** gt answers (soft accuracy, leave-one-out by
annotator index, no unanimity rule). Answers are joined to ``val.json`` through the question's
``image``. The official tool's contraction table maps to back-ticks; it is not reproduced because it
cannot change a B-normalised string (B already expanded every key; tested in
``tests/evaluation/test_eval_normalize.py``).

The submission file is ``[{"image", "answer": B(text)}]`` over every question of the questions file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from evaluation.answers import as_answers, canonical_id, match_answers
from evaluation.files import DataFileError, read_json, write_json
from evaluation.tasks.base import (
    VIZWIZ_SUFFIX,
    EvalQuestion,
    default_submission_path,
    group_means,
    load_json_or_value,
    mean,
    read_llava_question_jsonl,
    resolve_image,
    result,
)
from evaluation.tasks.task import ScoreInput, Task
from llava_san.normalize import normalize_evalai, normalize_vqa, vqa_soft_accuracy

NAME = "vizwiz"
TITLE = "VizWiz"
HEADLINE = "accuracy"
MAX_NEW_TOKENS = 128
LLAVA_LAYOUT = {"folder": "vizwiz", "questions": "llava_test.jsonl", "image_folder": "test"}


def load_questions(questions: Any, image_folder: str | os.PathLike | None = None) -> list[EvalQuestion]:
    """LLaVA question jsonl, or an official VizWiz json list (path or loaded list)."""
    if isinstance(questions, (str, os.PathLike)) and Path(questions).suffix == ".jsonl":
        return read_llava_question_jsonl(questions, image_folder, max_new_tokens=MAX_NEW_TOKENS)
    items = read_json(questions) if isinstance(questions, (str, os.PathLike)) else questions
    if not isinstance(items, list):
        raise DataFileError(f"{questions}: expected a LLaVA .jsonl or an official VizWiz json list")
    out = []
    for i, q in enumerate(items):
        if not isinstance(q, dict) or "image" not in q or "question" not in q:
            raise DataFileError(f"VizWiz questions[{i}]: needs 'image' and 'question'")
        out.append(
            EvalQuestion(
                i,
                q["question"] + VIZWIZ_SUFFIX,
                resolve_image(q["image"], image_folder),
                MAX_NEW_TOKENS,
                meta={"image_name": q["image"]},
            )
        )
    return out


def _image_name(q: EvalQuestion) -> str:
    return q.meta.get("image_name") or Path(q.image).name


def load_annotations(annotations: Any) -> dict[str, Mapping[str, Any]]:
    """Official ``val.json`` (path or list) -> image file name -> entry."""
    items = load_json_or_value(annotations)
    if not isinstance(items, list):
        raise DataFileError("VizWiz annotations: expected the official json list")
    out = {}
    for i, a in enumerate(items):
        try:
            image, answers = a["image"], [x["answer"] for x in a["answers"]]
        except (KeyError, TypeError) as e:
            raise DataFileError(f"VizWiz annotations[{i}]: needs image and answers[].answer ({e})") from None
        if not answers:
            raise DataFileError(f"VizWiz annotations[{i}]: no answers")
        out[image] = a
    return out


def question_accuracy(text: str, gt_answers: list[str]) -> float:
    """LLaVA pipeline: B on the raw output (submission), then the server's A on the prediction; gt raw."""
    res = normalize_vqa(normalize_evalai(text))
    return vqa_soft_accuracy(res, list(gt_answers))


def _questions(questions: Any, annotations: Any) -> list[EvalQuestion]:
    if questions is None:
        return load_questions(load_json_or_value(annotations))
    if isinstance(questions, (str, os.PathLike)):
        return load_questions(questions)
    return list(questions)


def score(
    answers: Any,
    annotations: Any,
    *,
    questions: Any = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """Soft accuracy over the questions (LLaVA question jsonl; default: ``annotations`` itself with
    positional ids). Returns ``accuracy``, ``per_answer_type``, ``n_questions``, ``coverage``."""
    gt = load_annotations(annotations)
    qs = _questions(questions, annotations)
    no_gt = [q for q in qs if _image_name(q) not in gt]
    if no_gt:
        raise ValueError(
            f"{len(no_gt)} questions have no annotation for their image "
            f"(e.g. {[_image_name(q) for q in no_gt[:5]]})"
        )
    ids = [canonical_id(q.question_id) for q in qs]
    matched = match_answers(
        as_answers(answers), ids, allow_missing=allow_missing, allow_unknown=allow_unknown
    )
    accs, by_type = [], []
    for qid, q in zip(ids, qs):
        ann = gt[_image_name(q)]
        acc = question_accuracy(matched.one(qid).text, [x["answer"] for x in ann["answers"]])
        accs.append(acc)
        by_type.append((ann.get("answer_type", "unknown"), acc))
    metrics = {"accuracy": mean(accs), "per_answer_type": group_means(by_type), "n_questions": len(accs)}
    return result(NAME, HEADLINE, metrics, matched.coverage)


def write_submission(
    path: str | os.PathLike,
    answers: Any,
    questions: Any,
    *,
    allow_missing: bool = False,
    allow_unknown: bool = False,
):
    """Write the EvalAI upload ``[{"image", "answer"}]`` (answer = Normaliser B of the output, ``""``
    where missing with ``allow_missing``) for every question. Returns the coverage."""
    qs = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else list(questions)
    ids = [canonical_id(q.question_id) for q in qs]
    matched = match_answers(
        as_answers(answers), ids, allow_missing=allow_missing, allow_unknown=allow_unknown
    )
    write_json(
        path,
        [{"image": _image_name(q), "answer": normalize_evalai(matched.one(i).text)} for i, q in zip(ids, qs)],
    )
    return matched.coverage


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
    """CLI entry: score against ``annotations`` (val.json) when given; write the upload file
    (beside the answers unless ``submission`` is a path or ``False``)."""
    if questions is None and annotations is None:
        raise ValueError(
            "vizwiz needs --questions (LLaVA question jsonl) and/or --annotations (official val.json)"
        )
    answer_list = as_answers(answers)
    annotations = load_json_or_value(annotations)  # read once
    qs = _questions(questions, annotations)
    out = None
    if annotations is not None:
        out = score(
            answer_list, annotations, questions=qs, allow_missing=allow_missing, allow_unknown=allow_unknown
        )
    if submission is not False:
        path = submission if submission not in (None, True) else default_submission_path(answers, ".json")
        if path is not None:
            cov = write_submission(
                path, answer_list, qs, allow_missing=allow_missing, allow_unknown=allow_unknown
            )
            out = out or result(NAME, HEADLINE, {"n_questions": cov.expected}, cov)
            out["submission"] = str(path)
    if out is None:
        matched = match_answers(
            answer_list,
            [canonical_id(q.question_id) for q in qs],
            allow_missing=allow_missing,
            allow_unknown=allow_unknown,
        )
        out = result(NAME, HEADLINE, {"n_questions": matched.coverage.expected}, matched.coverage)
    return out


#: the test split has no ground truth: answers + upload file only.
TASK = Task(NAME, TITLE, HEADLINE, MAX_NEW_TOKENS, LLAVA_LAYOUT, load_questions, score, score_files,
            write_submission=write_submission, annotations_optional=True, score_needs=(
                ScoreInput("questions", "either", "LLaVA question jsonl (image join, upload file)"),
                ScoreInput("annotations", "either", "the official val.json (omit for test: upload file only)")))
