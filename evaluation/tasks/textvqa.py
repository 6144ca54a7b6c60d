"""TextVQA val (v0.5.1), with LLaVA's OCR-token prompts.

Questions: LLaVA's ``llava_textvqa_val_v051_ocr.jsonl``; ``question_id`` is the TextVQA **image_id**
and ``text`` is ``"<question>\\nReference OCR token: tok1, tok2, ...\\nAnswer the question using a
single word or phrase."`` (kept verbatim: the OCR tokens are part of the prompt). :func:`build_prompt`
makes the same string from a question and its OCR tokens.

Scoring (``docs/benchmarks.md`` section 5): like LLaVA's ``eval_textvqa.py``, an answer is joined to its
annotation by ``(question_id, question recovered from the saved prompt, lower-cased)`` against
``(image_id, question.lower())`` -- the last annotation wins when a pair repeats, as in LLaVA's dict.
The m4c ``TextVQAAccuracyEvaluator`` applies Normaliser B to the prediction and all gt answers and
computes the soft accuracy.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from typing import Any, Iterable, Mapping

from evaluation.answers import Answer, AnswerFileError, as_answers, canonical_id, match_answers
from evaluation.files import DataFileError
from evaluation.tasks.base import (
    SHORT_ANSWER_SUFFIX,
    EvalQuestion,
    load_json_or_value,
    mean,
    read_llava_question_jsonl,
    result,
)
from evaluation.tasks.task import ScoreInput, Task
from llava_san.normalize import normalize_evalai, vqa_soft_accuracy

NAME = "textvqa"
TITLE = "TextVQA"
HEADLINE = "accuracy"
MAX_NEW_TOKENS = 128
LLAVA_LAYOUT = {
    "folder": "textvqa",
    "questions": "llava_textvqa_val_v051_ocr.jsonl",
    "image_folder": "train_images",
    "annotations": "TextVQA_0.5.1_val.json",
}

_OCR_QA = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def build_prompt(question: str, ocr_tokens: Iterable[str] = ()) -> str:
    """``question\\nReference OCR token: a, b\\n<short-answer suffix>`` (no OCR line without tokens)."""
    tokens = list(ocr_tokens)
    ocr = f"\nReference OCR token: {', '.join(tokens)}" if tokens else ""
    return f"{question}{ocr}{SHORT_ANSWER_SUFFIX}"


def load_questions(
    questions: str | os.PathLike, image_folder: str | os.PathLike | None = None
) -> list[EvalQuestion]:
    """LLaVA's TextVQA question jsonl (prompt = ``text`` verbatim)."""
    return read_llava_question_jsonl(questions, image_folder, max_new_tokens=MAX_NEW_TOKENS)


def prompt_to_question(prompt: str) -> str:
    """LLaVA's ``prompt_processor``: the lower-cased question inside a saved prompt.

    Handles ``"OCR tokens: ... Question: ... Short answer:"``, the 3-line OCR prompt (question on the
    first line, or the second when the prompt starts with the OCR line) and the 2-line prompt.
    Raises ``ValueError`` for anything else (LLaVA asserts).
    """
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = _OCR_QA.search(prompt)
        if m is None:
            raise ValueError("prompt starts with 'OCR tokens: ' but has no 'Question: ... Short answer:'")
        question = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        raise ValueError(f"cannot recover the question from prompt {prompt[:80]!r}")
    return question.lower()


def load_annotations(annotations: Any) -> dict[tuple[str, str], Mapping[str, Any]]:
    """``TextVQA_0.5.1_val.json`` (path or dict) -> (image_id, question.lower()) -> entry (last wins),
    with the multiplicity of each key in ``_count``."""
    obj = load_json_or_value(annotations)
    items = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise DataFileError("TextVQA annotations: expected {'data': [...]}")
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for i, a in enumerate(items):
        try:
            key = (canonical_id(a["image_id"]), a["question"].lower())
            if not a["answers"]:
                raise ValueError("no answers")
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DataFileError(
                f"TextVQA annotations data[{i}]: needs image_id, question, answers ({e})"
            ) from None
        out[key] = a
    return out


def _counts(annotations: Any) -> Counter:
    obj = load_json_or_value(annotations)
    return Counter((canonical_id(a["image_id"]), a["question"].lower()) for a in obj["data"])


def _answer_key(a: Answer) -> tuple[str, str]:
    if a.prompt is None:
        raise AnswerFileError(
            f"answers {a.where()}: TextVQA answers need the saved 'prompt' (the question is read from it)"
        )
    try:
        return canonical_id(a.question_id), prompt_to_question(a.prompt)
    except ValueError as e:
        raise AnswerFileError(f"answers {a.where()}: {e}") from None


def question_accuracy(text: str, gt_answers: list[str]) -> float:
    """m4c ``TextVQAAccuracyEvaluator``: Normaliser B on both sides, soft accuracy."""
    return vqa_soft_accuracy(normalize_evalai(text), [normalize_evalai(g) for g in gt_answers])


def score(
    answers: Any,
    annotations: Any,
    *,
    questions: Any = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """TextVQA accuracy. ``questions`` (optional LLaVA question jsonl or :class:`EvalQuestion` list)
    restricts the expected questions; by default every annotation is expected."""
    obj = load_json_or_value(annotations)
    gt = load_annotations(obj)
    if questions is not None:
        qs = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else questions
        keys = [(canonical_id(q.question_id), prompt_to_question(q.answer_prompt or q.prompt)) for q in qs]
        outside = [k for k in keys if k not in gt]
        if outside:
            raise ValueError(f"{len(outside)} questions are not in the annotations (e.g. {outside[:3]})")
        expected: Counter = Counter(keys)
    else:
        expected = _counts(obj)
    matched = match_answers(
        as_answers(answers),
        expected,
        key=_answer_key,
        allow_missing=allow_missing,
        allow_unknown=allow_unknown,
    )
    accs = [question_accuracy(a.text, gt[k]["answers"]) for k, lst in matched.by_key.items() for a in lst]
    return result(NAME, HEADLINE, {"accuracy": mean(accs), "n_questions": len(accs)}, matched.coverage)


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
    """CLI entry: needs ``annotations`` (``TextVQA_0.5.1_val.json``); ``questions`` optional."""
    if annotations is None:
        raise ValueError("textvqa needs --annotations (TextVQA_0.5.1_val.json)")
    return score(
        answers, annotations, questions=questions, allow_missing=allow_missing, allow_unknown=allow_unknown
    )


TASK = Task(NAME, TITLE, HEADLINE, MAX_NEW_TOKENS, LLAVA_LAYOUT, load_questions, score, score_files, score_needs=(
    ScoreInput("annotations", "required", "TextVQA_0.5.1_val.json"),
    ScoreInput("questions", "optional", "LLaVA question jsonl (restricts the expected ids)")))
