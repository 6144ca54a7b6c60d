"""ScienceQA (LLaVA-1.5 reports IMG-accuracy on the test split).

Questions: LLaVA's ``llava_test_CQM-A.json`` (a json list with ``id``, optional ``image`` and
``conversations``), or ``problems.json`` + ``pid_splits.json`` from which the same prompts are built
(:func:`build_prompt`, LLaVA's ``convert_sqa_to_llava`` with format ``CQM-A``)::

    Context: <hint or N/A>\\nQuestion: <question>\\nOptions: (A) x (B) y

``model_vqa_science --single-pred-prompt`` appends "Answer with the option's letter from the given
choices directly." and puts the image first; the saved prompt keeps ``<image>\\n`` in front.

Scoring (``docs/benchmarks.md`` section 4, LLaVA's ``eval_science_qa.py``): the letter is the whole text
if it is one of A-E; else ``text[0]`` when ``text[1:3] == ". "``; else the single match of
``r'The answer is ([A-Z]).'`` (exactly one match, else FAILED). A letter beyond the problem's
choices, FAILED and a missing answer count as wrong. ``accuracy`` is over all problems of the split,
``img_accuracy`` (the headline) over those whose ``image`` field is set (ScienceQA's own definition;
LLaVA's prompt-based test agrees whenever every answer is present).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from evaluation.answers import as_answers, canonical_id, match_answers
from evaluation.files import DataFileError, read_json
from evaluation.tasks.base import (
    DEFAULT_IMAGE_TOKEN,
    MCQ_SUFFIX,
    EvalQuestion,
    group_means,
    load_json_or_value,
    mean,
    resolve_image,
    result,
)
from evaluation.tasks.task import ScoreInput, Task

NAME = "scienceqa"
TITLE = "SQA-IMG"
HEADLINE = "img_accuracy"
MAX_NEW_TOKENS = 1024
OPTIONS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
USES_SPLIT = True  # the only benchmark that reads --split
LLAVA_LAYOUT = {
    "folder": "scienceqa",
    "questions": "llava_test_CQM-A.json",
    "image_folder": "images/test",
    "annotations": "problems.json",
    "pid_splits": "pid_splits.json",
}

_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def build_prompt(problem: Mapping[str, Any], options: tuple[str, ...] = OPTIONS) -> str:
    """The ``CQM-A`` test prompt of ``convert_sqa_to_llava`` as ``model_vqa_science`` reads it
    (no image token, no letter instruction)."""
    context = " ".join([problem.get("hint") or "", ""]).strip() or "N/A"  # use_caption=False
    choices = " ".join(f"({options[i]}) {c}" for i, c in enumerate(problem["choices"]))
    text = f"Context: {context}\nQuestion: {problem['question']}\nOptions: {choices}\n"
    text = text.replace("  ", " ").strip()
    if problem.get("image"):
        text = f"{text}\n{DEFAULT_IMAGE_TOKEN}"
    return text.replace(DEFAULT_IMAGE_TOKEN, "").strip()  # model_vqa_science


def _question(pid: str, qs: str, image: Path | None) -> EvalQuestion:
    saved = (f"{DEFAULT_IMAGE_TOKEN}\n{qs}" if image is not None else qs) + MCQ_SUFFIX
    return EvalQuestion(pid, qs + MCQ_SUFFIX, image, MAX_NEW_TOKENS, answer_prompt=saved)


def resolve_split(annotations: Any, split: str | None = "test", pid_splits: Any = None) -> list[str]:
    """Problem ids of ``split``: from ``pid_splits`` (path or dict), else ``pid_splits.json`` beside
    ``problems.json``. ``split`` may also be a path to a json list of problem ids."""
    split = split or "test"
    if pid_splits is None and Path(split).suffix == ".json" and Path(split).is_file():
        ids = read_json(split)
        if not isinstance(ids, list):
            raise DataFileError(f"{split}: expected a json list of problem ids")
        return [canonical_id(i) for i in ids]
    if pid_splits is None:
        if not isinstance(annotations, (str, os.PathLike)):
            raise ValueError("scienceqa: pass pid_splits (pid_splits.json) with in-memory problems")
        pid_splits = Path(annotations).with_name("pid_splits.json")
    splits = load_json_or_value(pid_splits)
    if not isinstance(splits, dict) or split not in splits:
        valid = ", ".join(sorted(splits)) if isinstance(splits, dict) else "?"
        raise ValueError(f"scienceqa: split {split!r} not in pid_splits (valid: {valid})")
    return [canonical_id(i) for i in splits[split]]


def load_problems(annotations: Any) -> dict[str, Mapping[str, Any]]:
    """``problems.json`` (path or dict) -> canonical pid -> problem."""
    obj = load_json_or_value(annotations)
    if not isinstance(obj, dict):
        raise DataFileError("ScienceQA problems: expected a dict pid -> problem")
    for pid, p in obj.items():
        if (
            not isinstance(p, dict)
            or not isinstance(p.get("choices"), list)
            or not isinstance(p.get("answer"), int)
        ):
            raise DataFileError(f"ScienceQA problem {pid}: needs 'choices' (list) and 'answer' (int)")
    return {canonical_id(k): v for k, v in obj.items()}


def load_questions(
    questions: Any,
    image_folder: str | os.PathLike | None = None,
    *,
    split: str | None = "test",
    pid_splits: Any = None,
) -> list[EvalQuestion]:
    """LLaVA's ``llava_test_CQM-A.json`` (list), or ``problems.json`` (dict; ``split`` ids from
    ``pid_splits``, images at ``image_folder/<pid>/<image>``)."""
    obj = load_json_or_value(questions)
    if isinstance(obj, list):
        out = []
        for i, line in enumerate(obj):
            try:
                qs = line["conversations"][0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
                pid = line["id"]
            except (KeyError, IndexError, TypeError, AttributeError):
                raise DataFileError(f"{questions}: item {i} needs 'id' and conversations[0].value") from None
            image = resolve_image(line["image"], image_folder) if "image" in line else None
            out.append(_question(pid, qs, image))
        return out
    problems = load_problems(obj)
    out = []
    for pid in resolve_split(questions, split, pid_splits):
        p = problems[pid]
        image = resolve_image(str(Path(pid) / p["image"]), image_folder) if p.get("image") else None
        out.append(_question(pid, build_prompt(p), image))
    return out


def parse_letter(text: str) -> str:
    """The option letter LLaVA's ``eval_science_qa.py`` reads from an output, or ``"FAILED"``."""
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def pred_index(letter: str, n_choices: int) -> int:
    """``options.index(letter)`` when the letter is among the first ``n_choices`` options, else -1."""
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def score(
    answers: Any,
    annotations: Any,
    *,
    split: str | None = "test",
    pid_splits: Any = None,
    questions: Any = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """``accuracy`` over the split, ``img_accuracy`` over its problems with an image, per subject,
    counts and coverage. ``questions`` (optional) replaces the split's ids by those of a questions
    file / :class:`EvalQuestion` list."""
    problems = load_problems(annotations)
    if questions is not None:
        qs = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else questions
        ids = [canonical_id(q.question_id) for q in qs]
    else:
        ids = resolve_split(annotations, split, pid_splits)
    outside = [i for i in ids if i not in problems]
    if outside:
        raise ValueError(f"{len(outside)} problem ids are not in problems.json (e.g. {outside[:5]})")
    matched = match_answers(
        as_answers(answers), ids, allow_missing=allow_missing, allow_unknown=allow_unknown
    )
    hits, img_hits, by_subject, n_failed = [], [], [], 0
    for pid in ids:
        p = problems[pid]
        letter = parse_letter(matched.one(pid).text)
        n_failed += letter == FAILED
        hit = float(pred_index(letter, len(p["choices"])) == p["answer"])
        hits.append(hit)
        if p.get("image"):
            img_hits.append(hit)
        by_subject.append((p.get("subject", "unknown"), hit))
    metrics = {
        "accuracy": mean(hits),
        "img_accuracy": mean(img_hits) if img_hits else None,
        "per_subject": group_means(by_subject),
        "n_questions": len(hits),
        "n_img": len(img_hits),
        "n_failed": n_failed,
    }
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
    pid_splits: Any = None,
) -> dict[str, Any]:
    """CLI entry: needs ``annotations`` (``problems.json``); ``--split`` (default test) with
    ``pid_splits.json`` beside it, or ``pid_splits``."""
    if annotations is None:
        raise ValueError("scienceqa needs --annotations (problems.json)")
    return score(
        answers,
        annotations,
        split=split or "test",
        pid_splits=pid_splits,
        questions=questions,
        allow_missing=allow_missing,
        allow_unknown=allow_unknown,
    )


def _score_inputs(data: Any) -> dict[str, Any]:
    """``pid_splits.json`` when the run found it (else the scorer looks beside problems.json)."""
    if "pid_splits" in data.extra_files:
        return {"pid_splits": data.extra_files["pid_splits"]}
    return {}


TASK = Task(NAME, TITLE, HEADLINE, MAX_NEW_TOKENS, LLAVA_LAYOUT, load_questions, score, score_files,
            uses_split=USES_SPLIT, extra_files=("pid_splits",), score_inputs=_score_inputs, score_needs=(
                ScoreInput("annotations", "required", "problems.json"),
                ScoreInput("questions", "optional", "LLaVA question json (restricts the expected ids)"),
                ScoreInput("split", "optional", "split name (default test) or a json list of problem ids"),
                ScoreInput("pid_splits", "optional", "pid_splits.json (default: beside problems.json)")))
