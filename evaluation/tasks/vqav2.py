"""VQAv2 (LLaVA-1.5 reports test-dev 2015 through the EvalAI server; val can be scored offline).

Questions: LLaVA's ``llava_vqav2_mscoco_test-dev2015.jsonl`` (``question_id``, ``image``, ``text`` =
question + short-answer suffix), or an official ``v2_OpenEnded_mscoco_<split>_questions.json`` from
which the same prompts are built (``image`` = ``COCO_<data_subtype>_<image_id:012d>.jpg``).

Scoring (``convention="llava"``, the default -- docs/benchmarks.md section 1): LLaVA's
``convert_vqav2_for_submission.py`` applies Normaliser B to the prediction; the server's
``vqaEval.py`` then strips it and the gt answers, applies Normaliser A to both **only when the 10 gt
answers are not unanimous** (unanimous gt are compared raw, case-sensitive) and computes the soft
accuracy. ``convention="lmms-eval"`` applies Normaliser A to both sides always (no unanimity rule,
no ``word_tokenize``). Metrics: ``accuracy``, ``per_answer_type``, ``per_question_type``.

The submission file is ``[{"question_id": int, "answer": B(text)}]`` over every question of the
questions file (LLaVA uses ``llava_vqav2_mscoco_test2015.jsonl``), with ``""`` for a missing answer
(needs ``allow_missing``, as test-dev answers cover only part of test2015).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from evaluation.answers import Answer, as_answers, canonical_id, match_answers
from evaluation.files import DataFileError, read_json, write_json
from evaluation.tasks.base import (
    SHORT_ANSWER_SUFFIX,
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

NAME = "vqav2"
TITLE = "VQAv2"
HEADLINE = "accuracy"
MAX_NEW_TOKENS = 128
CONVENTIONS = ("llava", "lmms-eval")
LLAVA_LAYOUT = {
    "folder": "vqav2",
    "questions": "llava_vqav2_mscoco_test-dev2015.jsonl",
    "submission_questions": "llava_vqav2_mscoco_test2015.jsonl",
    "image_folder": "test2015",
}


def load_questions(
    questions: str | os.PathLike, image_folder: str | os.PathLike | None = None
) -> list[EvalQuestion]:
    """LLaVA question jsonl, or an official questions json (prompts built as LLaVA's)."""
    path = Path(questions)
    if path.suffix == ".jsonl":
        return read_llava_question_jsonl(path, image_folder, max_new_tokens=MAX_NEW_TOKENS)
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("questions"), list):
        raise DataFileError(f"{path}: expected a LLaVA .jsonl or an official questions json with 'questions'")
    subtype = obj.get("data_subtype", "test2015")
    out = []
    for i, q in enumerate(obj["questions"]):
        try:
            qid, image_id, text = q["question_id"], int(q["image_id"]), q["question"]
        except (KeyError, TypeError, ValueError):
            raise DataFileError(f"{path}: questions[{i}] needs question_id, image_id and question") from None
        image = resolve_image(f"COCO_{subtype}_{image_id:012d}.jpg", image_folder)
        out.append(
            EvalQuestion(qid, text + SHORT_ANSWER_SUFFIX, image, MAX_NEW_TOKENS, meta={"image_id": image_id})
        )
    return out


def load_annotations(annotations: Any) -> dict[str, Mapping[str, Any]]:
    """Official ``v2_mscoco_<split>_annotations.json`` (path, dict or list) -> canonical id -> entry."""
    obj = load_json_or_value(annotations)
    items = obj.get("annotations") if isinstance(obj, dict) else obj
    if not isinstance(items, list):
        raise DataFileError("VQAv2 annotations: expected {'annotations': [...]} or a list")
    out = {}
    for i, a in enumerate(items):
        try:
            qid = canonical_id(a["question_id"])
            answers = [str(x["answer"]) for x in a["answers"]]
        except (KeyError, TypeError) as e:
            raise DataFileError(
                f"VQAv2 annotations[{i}]: needs question_id and answers[].answer ({e})"
            ) from None
        if not answers:
            raise DataFileError(f"VQAv2 annotations[{i}]: no answers")
        if qid in out:
            raise DataFileError(f"VQAv2 annotations: duplicate question_id {qid}")
        out[qid] = a
    return out


def _clean(s: str) -> str:
    return s.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(text: str, gt_answers: Iterable[str], convention: str = "llava") -> float:
    """Soft accuracy of one raw model output against the gt answers under ``convention``."""
    gts = [_clean(str(g)) for g in gt_answers]
    if convention == "llava":
        res = _clean(normalize_evalai(text))  # submission converter, then the server
        if len(set(gts)) > 1:
            gts = [normalize_vqa(g) for g in gts]
            res = normalize_vqa(res)
    elif convention == "lmms-eval":
        gts = [normalize_vqa(g) for g in gts]
        res = normalize_vqa(text)
    else:
        raise ValueError(f"unknown VQAv2 convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    return vqa_soft_accuracy(res, gts)


def _expected_ids(gt: Mapping[str, Any], questions: Any) -> list[str]:
    if questions is None:
        return list(gt)
    qs = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else questions
    ids = [canonical_id(q.question_id) for q in qs]
    outside = [i for i in ids if i not in gt]
    if outside:
        raise ValueError(
            f"{len(outside)} question ids of the questions file have no annotation (e.g. {outside[:5]})"
        )
    return ids


def score(
    answers: Any,
    annotations: Any,
    *,
    questions: Any = None,
    convention: str = "llava",
    allow_missing: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """VQA accuracy of ``answers`` against the official annotations.

    ``questions`` (optional) restricts the expected ids to those of a questions file / list of
    :class:`EvalQuestion`. Returns ``accuracy``, ``per_answer_type``, ``per_question_type``,
    ``n_questions`` and ``coverage``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown VQAv2 convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    gt = load_annotations(annotations)
    expected = _expected_ids(gt, questions)
    matched = match_answers(
        as_answers(answers), expected, allow_missing=allow_missing, allow_unknown=allow_unknown
    )
    accs, by_atype, by_qtype = [], [], []
    for qid in expected:
        ann = gt[qid]
        acc = question_accuracy(matched.one(qid).text, [x["answer"] for x in ann["answers"]], convention)
        accs.append(acc)
        by_atype.append((ann.get("answer_type", "unknown"), acc))
        by_qtype.append((ann.get("question_type", "unknown"), acc))
    metrics = {
        "accuracy": mean(accs),
        "per_answer_type": group_means(by_atype),
        "per_question_type": group_means(by_qtype),
        "n_questions": len(accs),
        "convention": convention,
    }
    return result(NAME, HEADLINE, metrics, matched.coverage)


def write_submission(
    path: str | os.PathLike,
    answers: Any,
    questions: Any,
    *,
    allow_missing: bool = False,
    allow_unknown: bool = False,
):
    """Write the EvalAI upload ``[{"question_id", "answer"}]`` for every question of ``questions``
    (a questions file, a list of :class:`EvalQuestion`, or of question ids), answers normalised with
    Normaliser B, ``""`` where missing (only with ``allow_missing``). Returns the coverage."""
    if isinstance(questions, (str, os.PathLike)):
        questions = load_questions(questions)
    ids = [q.question_id if isinstance(q, EvalQuestion) else q for q in questions]
    matched = match_answers(
        as_answers(answers),
        [canonical_id(i) for i in ids],
        allow_missing=allow_missing,
        allow_unknown=allow_unknown,
    )
    records = [{"question_id": i, "answer": normalize_evalai(matched.one(canonical_id(i)).text)} for i in ids]
    write_json(path, records)
    return matched.coverage


def score_files(
    answers: Any,
    *,
    questions: Any = None,
    annotations: Any = None,
    split: str | None = None,
    submission: str | os.PathLike | bool | None = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
    convention: str = "llava",
) -> dict[str, Any]:
    """CLI entry: score against ``annotations`` (when given) and write the submission file over the
    ``questions`` ids (or the annotation ids). ``submission=None`` writes it beside the answers
    file, ``False`` skips it. Without annotations (test-dev) only the submission is produced."""
    if questions is None and annotations is None:
        raise ValueError("vqav2 needs --annotations (v2_mscoco_*_annotations.json) and/or --questions")
    answer_list: list[Answer] = as_answers(answers)
    qs = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else questions
    annotations = load_json_or_value(annotations)  # read once, used twice
    if annotations is not None:
        out = score(
            answer_list,
            annotations,
            questions=qs,
            convention=convention,
            allow_missing=allow_missing,
            allow_unknown=allow_unknown,
        )
    else:
        out = None
    if submission is not False:
        path = submission if submission not in (None, True) else default_submission_path(answers, ".json")
        if path is not None:
            ids = qs if qs is not None else [a["question_id"] for a in load_annotations(annotations).values()]
            cov = write_submission(
                path, answer_list, ids, allow_missing=allow_missing, allow_unknown=allow_unknown
            )
            if out is None:
                out = result(NAME, HEADLINE, {"n_questions": cov.expected}, cov)
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


def _score_inputs(data: Any) -> dict[str, Any]:
    """A full (not ``limit``-ed) run is scored over every test2015 id, as LLaVA's
    ``convert_vqav2_for_submission`` ("" where test-dev has no answer)."""
    if "submission_questions" in data.extra_files and not data.limited:
        return {"questions": data.extra_files["submission_questions"], "allow_missing": True}
    return {}


#: test-dev has no ground truth: answers + upload file only.
TASK = Task(NAME, TITLE, HEADLINE, MAX_NEW_TOKENS, LLAVA_LAYOUT, load_questions, score, score_files,
            write_submission=write_submission, annotations_optional=True,
            extra_files=("submission_questions",), score_inputs=_score_inputs, score_needs=(
                ScoreInput("annotations", "either", "v2_mscoco_<split>_annotations.json (without it, test-dev: "
                           "the upload file only)"),
                ScoreInput("questions", "either", "LLaVA question jsonl or official json (the upload file's ids)"),
                ScoreInput("convention", "optional", "llava (default) or lmms-eval")))
