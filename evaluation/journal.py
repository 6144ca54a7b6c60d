"""The crash-safe answer journal: an answer jsonl that a (possibly restarted) run appends to.

Each answer is one line written in one ``write`` and flushed; every batch is fsynced
(:class:`llava_san.utils.jsonl_journal.JsonlJournal`). When a run restarts on the same file, bytes
after the last newline (a line torn by a crash) are cut off, the answered ``question_id`` s are
skipped, and the rest is generated: no duplicate, no loss. A complete line that is not JSON, a
duplicate id, an id outside the run's questions or a different ``model_id`` stop the run with the
line number, and leave the file as it was (the file is not ours to fix).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

from evaluation.answers import AnswerFileError, canonical_id
from llava_san.utils.jsonl_journal import JsonlJournal

__all__ = ["AnswerFile"]


class AnswerFile:
    """An answer jsonl that a (possibly restarted) run appends to.

    On opening, an existing file is checked and repaired (see the module docstring): ``done`` holds
    the canonical ids already answered. :meth:`append` writes records one line each, flushed, and
    fsyncs once per call.

    Args:
        path: the answer file (created with its folder when absent).
        expected_ids: the question ids this file may hold (canonical form, :func:`canonical_id`).
        model_id: when given, every existing line must have this ``model_id``.
    """

    def __init__(self, path: str | os.PathLike, expected_ids: Sequence[str], model_id: Optional[str] = None):
        self.expected = set(expected_ids)
        self.model_id = model_id
        self.done: set[str] = set()
        self._journal = JsonlJournal(path, AnswerFileError)
        self.path = self._journal.path
        self.truncated_bytes = self._journal.torn_bytes
        for lineno, obj in self._journal.lines:
            self._check(f"{self.path}:{lineno}", obj)
        self._journal.repair()

    def _check(self, where: str, obj: Any) -> None:
        if not isinstance(obj, dict) or "question_id" not in obj or not isinstance(obj.get("text"), str):
            raise AnswerFileError(f"{where}: not an answer line (needs question_id and text)")
        qid = canonical_id(obj["question_id"])
        if qid in self.done:
            raise AnswerFileError(f"{where}: question_id {qid!r} answered twice")
        if qid not in self.expected:
            raise AnswerFileError(
                f"{where}: question_id {qid!r} is not a question of this run (another benchmark, "
                "chunk or limit wrote this file?); use another output_dir or delete the file")
        if self.model_id is not None and obj.get("model_id") not in (None, self.model_id):
            raise AnswerFileError(
                f"{where}: answered by model_id {obj.get('model_id')!r}, this run is {self.model_id!r}; "
                "use another output_dir (or delete the file) to evaluate another model")
        self.done.add(qid)

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Append ``records`` (one JSON object per line), flush each line, fsync the batch."""
        new: set[str] = set()
        for r in records:  # nothing of the batch is written when one id would be written twice
            qid = canonical_id(r["question_id"])
            if qid in self.done or qid in new:
                raise AnswerFileError(f"{self.path}: question_id {qid!r} would be written twice")
            new.add(qid)
        self._journal.append(records)
        self.done |= new

    def close(self) -> None:
        """Close the file (appending again reopens it)."""
        self._journal.close()

    def __enter__(self) -> "AnswerFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
