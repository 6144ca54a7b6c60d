"""MMBench dev (``mmbench_dev_20230712.tsv``), circular evaluation.

Questions: the TSV itself (``index, question, hint, A, B, C, D, answer, category, image (base64),
source, l2-category, comment, split``). The circular copies are already rows of the file (``index =
base + r * 1,000,000`` with rotated options); LLaVA answers every row once (``model_vqa_mmbench``
without ``--all-rounds``). The prompt is ``[hint\\n]question\\nA. ...\\nB. ...`` plus "Answer with the
option's letter from the given choices directly."; options stop at the first empty one. Empty cells
are read as pandas' ``read_table`` would (its default NA strings: ``""``, ``"NA"``, ``"None"``,
``"nan"``...), and LLaVA's ``is_none`` also treats any-case ``nan``/``none`` as empty.

Scoring (``docs/benchmarks.md`` section 7): the 2023 ``can_infer`` (bare letter A-E with the "A might be a
quantifier" guard, then the ``X.``/``(X)``/``:X`` forms, then a unique option text contained in the
prediction). The official ChatGPT fallback cannot run offline; an unparsed row scores 0 (VLMEvalKit
``exact_matching``). A base question counts only if **every** row of its group (``index % 1e6``)
parses to that row's ``answer``: ``circular_accuracy`` (headline) over base questions,
``vanilla_accuracy`` over the base rows alone, both also per ``category`` and ``l2-category``.

The submission spreadsheet is LLaVA's ``convert_mmbench_for_submission.py`` layout: the TSV columns
without ``hint, category, source, image, comment, l2-category``, with ``prediction`` (the raw output)
inserted as the 7th column.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from evaluation.answers import as_answers, canonical_id, match_answers
from evaluation.files import DataFileError, check_utf8
from evaluation.tasks.base import (
    MCQ_SUFFIX,
    EvalQuestion,
    default_submission_path,
    group_means,
    mean,
    result,
)
from evaluation.tasks.task import ScoreInput, Task
from evaluation.xlsx import write_xlsx

NAME = "mmbench"
TITLE = "MMBench"
HEADLINE = "circular_accuracy"
MAX_NEW_TOKENS = 1024
CIRCULAR_BASE = 1_000_000
PROMPT_OPTIONS = ("A", "B", "C", "D")  # model_vqa_mmbench's all_options
CHOICE_LETTERS = "ABCDE"  # the 2023 evaluator's letters
CN_SUFFIX = "\n请直接回答选项字母。"
LLAVA_LAYOUT = {
    "folder": "mmbench",
    "questions": "mmbench_dev_20230712.tsv",
    "annotations": "mmbench_dev_20230712.tsv",
}
SUBMISSION_DROP = ("hint", "category", "source", "image", "comment", "l2-category")

# fmt: off
#: pandas' default ``na_values`` for ``read_table``.
PANDAS_NA = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
_OPTION_FORMS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."),
                 (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."))
# fmt: on


def is_na(value: Any) -> bool:
    """A cell pandas reads as NaN."""
    return value is None or value in PANDAS_NA


def is_none(value: Any) -> bool:
    """LLaVA's ``is_none``: NaN, or a string equal to ``nan``/``none`` in any case."""
    return is_na(value) or (isinstance(value, str) and value.lower() in ("nan", "none"))


class Table(NamedTuple):
    """An MMBench TSV: column names and row dicts."""

    header: list[str]
    rows: list[dict[str, Any]]


def read_table(path: str | os.PathLike) -> Table:
    """The MMBench TSV (``index`` as int, NA cells as None); image references (a short all-digit
    ``image`` naming another row's index, as in deduplicated TSVs) are resolved."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    path = Path(path)
    check_utf8(path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = list(reader.fieldnames or [])
        for col in ("index", "question"):
            if col not in header:
                raise DataFileError(f"{path}: missing column {col!r}")
        rows = []
        for lineno, raw in enumerate(reader, start=2):
            row = {k: (None if is_na(v) else v) for k, v in raw.items() if k is not None}
            try:
                row["index"] = int(row["index"])
            except (TypeError, ValueError):
                raise DataFileError(
                    f"{path}:{lineno}: 'index' must be an integer, got {raw['index']!r}"
                ) from None
            row["_line"] = lineno
            rows.append(row)
    by_index = {r["index"]: r for r in rows}
    for r in rows:
        img = r.get("image")
        if isinstance(img, str) and len(img) <= 64 and img.isdigit() and int(img) in by_index:
            r["image"] = by_index[int(img)]["image"]
    return Table(header, rows)


def read_tsv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of :func:`read_table`."""
    return read_table(path).rows


def _table(annotations: Any) -> Table:
    if isinstance(annotations, Table):
        return annotations
    if isinstance(annotations, (str, os.PathLike)):
        return read_table(annotations)
    rows = list(annotations)
    return Table(list(rows[0]) if rows else [], rows)


def prompt_options(row: Mapping[str, Any]) -> list[str]:
    """``get_options``: A-D values up to the first empty one."""
    out = []
    for c in PROMPT_OPTIONS:
        v = row.get(c)
        if is_none(v):
            break
        out.append(v)
    return out


def build_prompt(row: Mapping[str, Any], options: list[str]) -> str:
    """``[hint\\n]question\\nA. opt\\nB. opt...`` (the prompt LLaVA saves, without the suffix)."""
    question = row["question"]
    hint = row.get("hint")
    if not is_none(hint):
        question = hint + "\n" + question
    for ch, opt in zip(PROMPT_OPTIONS, options):
        question = question + "\n" + ch + ". " + opt
    return question


def _image_loader(b64: str) -> Callable[[], Any]:
    def load():
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode(b64)))

    return load


def load_questions(
    questions: str | os.PathLike,
    image_folder: Any = None,
    *,
    all_rounds: bool = False,
    lang: str = "en",
) -> list[EvalQuestion]:
    """One question per TSV row (LLaVA's default). ``all_rounds=True`` adds LLaVA's ``--all-rounds``
    rotations (same ``question_id``, ``extra["round_id"]`` = r); such answers are not scorable here.
    Images are decoded from base64 on :meth:`EvalQuestion.load_image`."""
    if lang not in ("en", "cn"):
        raise ValueError(f"mmbench lang must be 'en' or 'cn', got {lang!r}")
    suffix = CN_SUFFIX if lang == "cn" else MCQ_SUFFIX
    out = []
    for row in read_tsv(questions):
        options = prompt_options(row)
        chars = list(PROMPT_OPTIONS[: len(options)])
        for r in range(len(options) if all_rounds else 1):
            text = build_prompt(row, options)
            image = _image_loader(row["image"]) if row.get("image") else None
            extra = {"round_id": r, "options": list(options), "option_char": list(chars)}
            meta = {
                "category": row.get("category"),
                "l2-category": row.get("l2-category"),
                "line": row["_line"],
            }
            out.append(
                EvalQuestion(
                    row["index"],
                    text + suffix,
                    image,
                    MAX_NEW_TOKENS,
                    answer_prompt=text,
                    meta=meta,
                    extra=extra,
                )
            )
            options, chars = options[1:] + options[:1], chars[1:] + chars[:1]
    return out


def can_infer_option(answer: str, choices: str = CHOICE_LETTERS) -> str | bool:
    """The 2023 ``can_infer_option``: a letter, or ``False``."""
    if "Failed to obtain answer via API" in answer:
        return False
    splits = [x.strip() for x in answer.split()]

    def count(prefix: str = "", suffix: str = "") -> int:
        return sum(1 for c in choices if prefix + c + suffix in splits)

    if count() == 1 and not ("A" in splits and len(splits) > 3):  # "A might be a quantifier"
        for ch in choices:
            if ch in splits:
                return ch
    for prefix, suffix in _OPTION_FORMS:
        if count(prefix, suffix) == 1:
            for ch in choices:
                if prefix + ch + suffix in splits:
                    return ch
    return False


def can_infer_text(answer: str, choices: Mapping[str, Any]) -> str | bool:
    """The 2023 ``can_infer_text``: the letter of the only option text contained in the answer."""
    answer = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in answer]
    return cands[0] if len(cands) == 1 else False


def can_infer(answer: str, choices: Mapping[str, Any]) -> str | bool:
    """``can_infer_option`` or else ``can_infer_text``."""
    return can_infer_option(answer) or can_infer_text(answer, choices)


def row_choices(row: Mapping[str, Any]) -> dict[str, Any]:
    """``build_choices``: every non-empty option A-E of the row."""
    return {k: row[k] for k in CHOICE_LETTERS if k in row and not is_na(row[k])}


def score(
    answers: Any, annotations: Any, *, allow_missing: bool = False, allow_unknown: bool = False
) -> dict[str, Any]:
    """Circular and vanilla accuracy (overall, per ``category``, per ``l2-category``), counts and
    coverage. ``annotations`` is the dev TSV (path, :class:`Table` or rows)."""
    rows = _table(annotations).rows
    if any(r.get("answer") is None for r in rows):
        raise ValueError("mmbench: the TSV has rows without 'answer' (a test split cannot be scored offline)")
    ids = [canonical_id(r["index"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise DataFileError("mmbench: duplicate 'index' values in the TSV")
    matched = match_answers(
        as_answers(answers), ids, allow_missing=allow_missing, allow_unknown=allow_unknown
    )
    parsed = {r["index"]: can_infer(matched.one(canonical_id(r["index"])).text, row_choices(r)) for r in rows}
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["index"] % CIRCULAR_BASE, []).append(r)
    circ, van = [], []
    for r in rows:
        if r["index"] >= CIRCULAR_BASE:
            continue
        cat, l2 = r.get("category") or "unknown", r.get("l2-category") or "unknown"
        circ_hit = float(all(parsed[g["index"]] == g["answer"] for g in groups[r["index"]]))
        circ.append((cat, l2, circ_hit))
        van.append((cat, l2, float(parsed[r["index"]] == r["answer"])))
    if not circ:
        raise ValueError("mmbench: no base question (index < 1,000,000) in the TSV")
    metrics = {
        "circular_accuracy": mean([h for _, _, h in circ]),
        "vanilla_accuracy": mean([h for _, _, h in van]),
        "per_category": group_means((c, h) for c, _, h in circ),
        "per_l2_category": group_means((l2, h) for _, l2, h in circ),
        "vanilla_per_category": group_means((c, h) for c, _, h in van),
        "n_questions": len(circ),
        "n_rows": len(rows),
        "n_unparsed": sum(1 for v in parsed.values() if v is False),
    }
    return result(NAME, HEADLINE, metrics, matched.coverage)


def write_submission(
    path: str | os.PathLike,
    answers: Any,
    annotations: Any,
    *,
    allow_missing: bool = False,
    allow_unknown: bool = False,
):
    """LLaVA's upload spreadsheet: TSV columns minus ``SUBMISSION_DROP``, ``prediction`` (raw
    output; empty where missing with ``allow_missing``) inserted at position 6. ``annotations`` is
    the TSV path or its :class:`Table`. Returns the coverage."""
    table_in = _table(annotations)
    header = [h for h in table_in.header if h not in SUBMISSION_DROP]
    rows = table_in.rows
    matched = match_answers(
        as_answers(answers),
        [canonical_id(r["index"]) for r in rows],
        allow_missing=allow_missing,
        allow_unknown=allow_unknown,
    )
    pos = min(6, len(header))
    header = header[:pos] + ["prediction"] + header[pos:]
    table = []
    for r in rows:
        a = matched.one(canonical_id(r["index"]))
        values = {**r, "prediction": a.text if a.line is not None or a.record else None}
        table.append([values.get(h) for h in header])
    write_xlsx(path, header, table)
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
    """CLI entry: ``annotations`` (or ``questions``) is the TSV. Scores when it has answers and writes
    the spreadsheet (beside the answers unless ``submission`` is a path or ``False``)."""
    tsv = annotations if annotations is not None else questions
    if tsv is None:
        raise ValueError("mmbench needs --annotations (the dev TSV)")
    answer_list = as_answers(answers)
    table = _table(tsv)
    out = None
    if "answer" in table.header:
        empty = [r for r in table.rows if is_none(r.get("answer")) or not str(r.get("answer")).strip()]
        if empty and len(empty) < len(table.rows):  # a dev TSV with holes: score nothing rather than part
            where = f"{tsv}:{empty[0].get('_line', '?')}" if isinstance(tsv, (str, os.PathLike)) else "the TSV"
            raise DataFileError(f"{where}: row index={empty[0]['index']} has an empty 'answer' cell "
                                f"({len(empty)} of {len(table.rows)} rows); fill it or drop the row")
    if "answer" in table.header and all(r.get("answer") is not None for r in table.rows):
        out = score(answer_list, table, allow_missing=allow_missing, allow_unknown=allow_unknown)
    if submission is not False:
        path = submission if submission not in (None, True) else default_submission_path(answers, ".xlsx")
        if path is not None:
            cov = write_submission(
                path, answer_list, table, allow_missing=allow_missing, allow_unknown=allow_unknown
            )
            out = out or result(NAME, HEADLINE, {"n_rows": cov.expected}, cov)
            out["submission"] = str(path)
    if out is None:
        matched = match_answers(
            answer_list,
            [canonical_id(r["index"]) for r in table.rows],
            allow_missing=allow_missing,
            allow_unknown=allow_unknown,
        )
        out = result(NAME, HEADLINE, {"n_rows": matched.coverage.expected}, matched.coverage)
    return out


def _score_inputs(data: Any) -> dict[str, Any]:
    """The question TSV holds the answers too: it is the ground truth unless another is given."""
    return {"annotations": data.annotations or data.questions_file}


#: MMBench ids come from the TSV, so it is scored on the whole file.
TASK = Task(NAME, TITLE, HEADLINE, MAX_NEW_TOKENS, LLAVA_LAYOUT, load_questions, score, score_files,
            write_submission=write_submission, scores_subset=False, score_inputs=_score_inputs, score_needs=(
                ScoreInput("annotations", "either", "the dev TSV (scored when it has answers; the upload "
                           "spreadsheet in any case)"),
                ScoreInput("questions", "either", "the same TSV")))
