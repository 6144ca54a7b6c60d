"""Reading LLaVA answer files and matching them to the questions a benchmark expects.

An answer file is LLaVA's answer jsonl: one JSON object per line with at least ``question_id`` and
``text`` (``prompt``, ``answer_id``, ``model_id``, ``metadata``, MMBench's ``round_id``... are kept in
:attr:`Answer.record`). Malformed lines raise :class:`AnswerFileError` with the line number.

:func:`match_answers` pairs answers with the expected question keys. Missing, duplicate and unknown
ids are never scored silently: by default any of them raises :class:`AnswerSetError`, whose message
gives the counts and a few examples. ``allow_missing`` scores a missing answer as an empty output
(``""``: what LLaVA's converters submit for a missing VQAv2 answer, and a wrong answer everywhere
except POPE, where LLaVA's parser reads an empty string as "yes"); ``allow_unknown`` ignores answers
to questions outside the ground truth. Both are reported in :class:`Coverage` either way. Duplicates
always raise: there is no right way to choose between two answers.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping

from evaluation.files import DataFileError, atomic_write, iter_jsonl

__all__ = [
    "Answer",
    "AnswerFileError",
    "AnswerSetError",
    "Coverage",
    "Matched",
    "as_answers",
    "canonical_id",
    "match_answers",
    "read_answers",
    "write_answers",
]

log = logging.getLogger(__name__)

#: How many example ids an error message or a coverage report lists.
N_EXAMPLES = 5


class AnswerFileError(DataFileError):
    """An answer file has a malformed line (bad JSON, missing or ill-typed field)."""


class AnswerSetError(ValueError):
    """The answers do not match the expected questions (missing, duplicate or unknown ids)."""

    def __init__(self, message: str, coverage: "Coverage"):
        super().__init__(message)
        self.coverage = coverage


@dataclass(frozen=True)
class Answer:
    """One line of an answer file."""

    question_id: int | str
    text: str
    line: int | None = None  # 1-based line in the answer file; None for in-memory or synthesised answers
    record: Mapping[str, Any] = field(default_factory=dict, repr=False)  # the whole JSON object

    @property
    def prompt(self) -> str | None:
        """The ``prompt`` field LLaVA saves with each answer (None when absent)."""
        p = self.record.get("prompt")
        return p if isinstance(p, str) else None

    def where(self) -> str:
        """``"line N"`` for messages."""
        return f"line {self.line}" if self.line is not None else "in memory"


def canonical_id(question_id: Any) -> str:
    """The id as matched across files: ``str(id)`` for an int or a str (``5`` and ``"5"`` are the
    same question). Anything else raises ``TypeError``."""
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
        raise TypeError(f"question_id must be an int or a string, got {question_id!r}")
    return str(question_id)


def _answer_from_record(obj: Mapping[str, Any], line: int | None, source: str) -> Answer:
    where = f"{source}:{line}" if line is not None else source
    if "question_id" not in obj:
        raise AnswerFileError(f"{where}: missing 'question_id'")
    if "text" not in obj:
        raise AnswerFileError(f"{where}: missing 'text'")
    qid, text = obj["question_id"], obj["text"]
    try:
        canonical_id(qid)
    except TypeError as e:
        raise AnswerFileError(f"{where}: {e}") from None
    if not isinstance(text, str):
        raise AnswerFileError(f"{where}: 'text' must be a string, got {type(text).__name__}")
    return Answer(qid, text, line, dict(obj))


def read_answers(path: str | os.PathLike) -> list[Answer]:
    """Read a LLaVA answer jsonl file. Raises :class:`AnswerFileError` naming ``path:line`` for a
    line that is not a JSON object, lacks ``question_id``/``text``, or has ill-typed values."""
    path = Path(path)
    out = []
    try:
        for lineno, obj in iter_jsonl(path):
            out.append(_answer_from_record(obj, lineno, str(path)))
    except DataFileError as e:
        if isinstance(e, AnswerFileError):
            raise
        raise AnswerFileError(str(e)) from None
    return out


def write_answers(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """Write answer records (e.g. :meth:`EvalQuestion.answer_record` results) as jsonl, atomically."""
    with atomic_write(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(path)


def as_answers(answers: str | os.PathLike | Iterable[Answer | Mapping[str, Any]]) -> list[Answer]:
    """Accept a path to an answer jsonl, a list of :class:`Answer`, or a list of answer dicts
    (numbered 1.. as if they were lines)."""
    if isinstance(answers, (str, os.PathLike)):
        return read_answers(answers)
    out = []
    for i, a in enumerate(answers, start=1):
        out.append(a if isinstance(a, Answer) else _answer_from_record(a, i, "answers"))
    return out


@dataclass
class Coverage:
    """How the answers covered the expected questions."""

    expected: int = 0
    answered: int = 0  # answers in the file
    missing: int = 0
    unknown: int = 0
    duplicates: int = 0
    missing_examples: list[str] = field(default_factory=list)
    unknown_examples: list[str] = field(default_factory=list)
    duplicate_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``examples`` only for non-zero counts)."""
        d: dict[str, Any] = {
            "expected": self.expected,
            "answered": self.answered,
            "missing": self.missing,
            "unknown": self.unknown,
            "duplicates": self.duplicates,
        }
        for kind in ("missing", "unknown", "duplicate"):
            ex = getattr(self, f"{kind}_examples")
            if ex:
                d[f"{kind}_examples"] = list(ex)
        return d

    def problems(self) -> str:
        """A one-line description of what is wrong ('' when nothing is)."""
        parts = []
        if self.missing:
            parts.append(f"{self.missing} missing (e.g. {', '.join(self.missing_examples)})")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate (e.g. {', '.join(self.duplicate_examples)})")
        if self.unknown:
            parts.append(f"{self.unknown} unknown (e.g. {', '.join(self.unknown_examples)})")
        return "; ".join(parts)


@dataclass
class Matched:
    """Answers grouped by expected key, plus the coverage report.

    ``by_key[k]`` lists the answers for key ``k`` in file order; with ``allow_missing`` a missing
    one is an ``Answer(text="")`` with ``line=None``.
    """

    by_key: dict[Hashable, list[Answer]]
    coverage: Coverage

    def one(self, key: Hashable) -> Answer:
        """The single answer for ``key``."""
        return self.by_key[key][0]


def _describe(key: Hashable) -> str:
    if isinstance(key, tuple):
        return repr(" / ".join(str(k) for k in key))
    return repr(key)


def _coverage(want: Counter, by_key: dict[Hashable, list[Answer]], unknown: list[Answer], answered: int,
              key: Callable[[Answer], Hashable]) -> tuple[Coverage, list[Hashable]]:
    """The :class:`Coverage` of a pairing, and the keys with fewer answers than expected."""
    cov = Coverage(expected=sum(want.values()), answered=answered)
    dup_keys = [k for k, lst in by_key.items() if len(lst) > want[k]]
    cov.duplicates = sum(len(by_key[k]) - want[k] for k in dup_keys)
    cov.duplicate_examples = [
        f"{_describe(k)} on lines {', '.join(str(a.line) for a in by_key[k])}" for k in dup_keys[:N_EXAMPLES]
    ]
    missing_keys = [k for k, n in want.items() if len(by_key.get(k, ())) < n]
    cov.missing = sum(want[k] - len(by_key.get(k, ())) for k in missing_keys)
    cov.missing_examples = [_describe(k) for k in missing_keys[:N_EXAMPLES]]
    cov.unknown = len(unknown)
    cov.unknown_examples = [f"{_describe(key(a))} ({a.where()})" for a in unknown[:N_EXAMPLES]]
    return cov, missing_keys


def match_answers(
    answers: Iterable[Answer],
    expected: Iterable[Hashable] | Mapping[Hashable, int],
    *,
    key: Callable[[Answer], Hashable] | None = None,
    allow_missing: bool = False,
    allow_unknown: bool = False,
    source: str = "answers",
    what: str = "question id",
) -> Matched:
    """Pair ``answers`` with the ``expected`` keys (an iterable of keys, or key -> multiplicity).

    ``key(answer)`` gives an answer's key (default: :func:`canonical_id` of its ``question_id``;
    expected keys must use the same form). Raises :class:`AnswerSetError` for duplicates always, and
    for missing/unknown keys unless allowed; allowed problems are logged as warnings and reported in
    :attr:`Matched.coverage`.
    """
    key = key or (lambda a: canonical_id(a.question_id))
    want: Counter = Counter(expected) if not isinstance(expected, Mapping) else Counter(dict(expected))
    answers = list(answers)
    by_key: dict[Hashable, list[Answer]] = {}
    unknown: list[Answer] = []
    for a in answers:
        k = key(a)
        if k in want:
            by_key.setdefault(k, []).append(a)
        else:
            unknown.append(a)

    cov, missing_keys = _coverage(want, by_key, unknown, len(answers), key)
    fatal = cov.duplicates or (cov.missing and not allow_missing) or (cov.unknown and not allow_unknown)
    if fatal:
        hints = []
        if cov.missing and not allow_missing:
            hints.append("allow_missing (--allow-missing) scores missing answers as empty outputs")
        if cov.unknown and not allow_unknown:
            hints.append("allow_unknown (--allow-unknown) ignores unknown ones")
        msg = f"{source}: {what}s do not match the ground truth: {cov.problems()}"
        if hints:
            msg += "; " + " and ".join(hints)
        raise AnswerSetError(msg, cov)
    if cov.missing or cov.unknown:
        log.warning("%s: %s %ss (allowed)", source, cov.problems(), what)

    for k in missing_keys:
        have = by_key.setdefault(k, [])
        have.extend(
            Answer(k if not isinstance(k, tuple) else k[0], "", None, {}) for _ in range(want[k] - len(have))
        )
    return Matched(by_key, cov)
