"""POPE on COCO (adversarial / popular / random), as LLaVA-1.5 evaluates it.

Questions: LLaVA's ``llava_pope_test.jsonl`` (``question_id``, ``image``, ``text``, ``category``).
Labels: the folder of POPE's ``coco_pope_<category>.json`` files (jsonl, one ``{"question_id",
"image", "text", "label"}`` per line; LLaVA used the old POPE commit where random has 2,910 lines).

Pairing: LLaVA's ``eval_pope.py`` zips a split's label lines with that split's answers *by
position*. Here the k-th question of a category in the question file gets the k-th label line of
that category's file (checked: same image, label text contained in the prompt), and answers are
joined to questions by ``question_id`` -- the same pairing when the answers are in question order,
and robust when they are not.

Answer parsing (``eval_pope.py``): keep the text before the first ``.``, delete ``,``, split on
single spaces; any token ``No``/``not``/``no`` means "no", anything else (empty included) "yes".
Metrics per split with "yes" as positive: ``accuracy``, ``precision``, ``recall``, ``f1``,
``yes_ratio`` (share of *predictions* parsed as yes); a zero denominator gives 0 (LLaVA would
raise). The headline ``f1_mean`` is the mean of the split F1s (LLaVA-1.5's 85.9).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evaluation.answers import as_answers, canonical_id, match_answers
from evaluation.files import DataFileError, iter_jsonl
from evaluation.tasks.base import EvalQuestion, mean, read_llava_question_jsonl, result
from evaluation.tasks.task import ScoreInput, Task

NAME = "pope"
TITLE = "POPE"
HEADLINE = "f1_mean"
MAX_NEW_TOKENS = 128
CATEGORIES = ("adversarial", "popular", "random")
LLAVA_LAYOUT = {
    "folder": "pope",
    "questions": "llava_pope_test.jsonl",
    "image_folder": "val2014",
    "annotations": "coco",
}


def load_questions(
    questions: str | os.PathLike, image_folder: str | os.PathLike | None = None
) -> list[EvalQuestion]:
    """LLaVA's POPE question jsonl; ``meta["category"]`` holds the split."""
    qs = read_llava_question_jsonl(
        questions, image_folder, max_new_tokens=MAX_NEW_TOKENS, meta_keys=("category",)
    )
    for q in qs:
        if "category" not in q.meta:
            raise DataFileError(f"{questions}:{q.meta['line']}: missing 'category'")
    return qs


def parse_yes_no(text: str) -> str:
    """``eval_pope.py``'s rule: "no" if the first sentence has a token ``No``, ``not`` or ``no``."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def load_labels(annotations: str | os.PathLike, category: str) -> list[dict]:
    """The label lines of ``<annotations>/coco_pope_<category>.json``."""
    path = Path(annotations) / f"coco_pope_{category}.json"
    if not path.is_file():
        raise FileNotFoundError(f"POPE labels for split {category!r} not found: {path}")
    labels = []
    for lineno, obj in iter_jsonl(path):
        if "label" not in obj:
            raise DataFileError(f"{path}:{lineno}: missing 'label'")
        labels.append({**obj, "line": lineno, "path": str(path)})
    return labels


def binary_metrics(preds: list[int], labels: list[int]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and yes-ratio with 1 = yes as the positive class."""
    tp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 1)
    fp = sum(1 for p, y in zip(preds, labels) if p == 1 and y == 0)
    tn = sum(1 for p, y in zip(preds, labels) if p == 0 and y == 0)
    fn = sum(1 for p, y in zip(preds, labels) if p == 0 and y == 1)
    n = len(preds)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": preds.count(1) / n if n else 0.0,
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def attach_labels(
    questions: list[EvalQuestion], annotations: str | os.PathLike
) -> dict[str, list[tuple[EvalQuestion, int]]]:
    """Category -> [(question, label 0/1)] pairing the k-th question of a category with the k-th
    label line; a count, image or text mismatch raises ``ValueError``."""
    by_cat: dict[str, list[EvalQuestion]] = {}
    for q in questions:
        by_cat.setdefault(q.meta["category"], []).append(q)
    out = {}
    for cat in sorted(by_cat):
        qs, labels = by_cat[cat], load_labels(annotations, cat)
        if len(qs) != len(labels):
            raise ValueError(
                f"POPE split {cat!r}: {len(qs)} questions but {len(labels)} label lines "
                f"in {Path(annotations) / f'coco_pope_{cat}.json'}"
            )
        pairs = []
        for q, lab in zip(qs, labels):
            q_image = Path(q.image).name if q.image is not None else None
            if ("image" in lab and Path(lab["image"]).name != q_image) or (
                "text" in lab and lab["text"] not in q.prompt
            ):
                raise ValueError(
                    f"POPE split {cat!r}: question {q.question_id} (line {q.meta.get('line')}) "
                    "does not match "
                    f"{lab['path']}:{lab['line']} ({lab.get('image')!r}, {lab.get('text')!r})"
                )
            pairs.append((q, 0 if lab["label"] == "no" else 1))
        out[cat] = pairs
    return out


def score(
    answers: Any,
    annotations: str | os.PathLike,
    *,
    questions: Any,
    allow_missing: bool = False,
    allow_unknown: bool = False,
) -> dict[str, Any]:
    """Per-split metrics (``{split: {accuracy, precision, recall, f1, yes_ratio, n, tp, fp, tn, fn}}``),
    ``f1_mean``, ``accuracy_mean`` and coverage. ``questions`` is the LLaVA question jsonl (or its
    :class:`EvalQuestion` list); ``annotations`` the folder of ``coco_pope_*.json``."""
    qs = load_questions(questions) if isinstance(questions, (str, os.PathLike)) else list(questions)
    labelled = attach_labels(qs, annotations)
    matched = match_answers(
        as_answers(answers),
        [canonical_id(q.question_id) for q in qs],
        allow_missing=allow_missing,
        allow_unknown=allow_unknown,
    )
    metrics: dict[str, Any] = {}
    for cat, pairs in labelled.items():
        preds = [
            0 if parse_yes_no(matched.one(canonical_id(q.question_id)).text) == "no" else 1 for q, _ in pairs
        ]
        metrics[cat] = binary_metrics(preds, [y for _, y in pairs])
    metrics["f1_mean"] = mean([metrics[c]["f1"] for c in labelled])
    metrics["accuracy_mean"] = mean([metrics[c]["accuracy"] for c in labelled])
    metrics["n_questions"] = len(qs)
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
    """CLI entry: needs ``questions`` (``llava_pope_test.jsonl``) and ``annotations`` (the folder of
    ``coco_pope_*.json``)."""
    if questions is None or annotations is None:
        raise ValueError(
            "pope needs --questions (llava_pope_test.jsonl) and --annotations (folder of coco_pope_*.json)"
        )
    return score(
        answers, annotations, questions=questions, allow_missing=allow_missing, allow_unknown=allow_unknown
    )


#: POPE pairs labels with answers by position, so it is scored on the whole question file.
TASK = Task(NAME, TITLE, HEADLINE, MAX_NEW_TOKENS, LLAVA_LAYOUT, load_questions, score, score_files,
            scores_subset=False, score_needs=(
                ScoreInput("questions", "required", "llava_pope_test.jsonl"),
                ScoreInput("annotations", "required", "the folder of coco_pope_<category>.json")))
