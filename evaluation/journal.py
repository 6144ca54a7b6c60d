"""The crash-safe answer journal: an answer jsonl that a (possibly restarted) run appends to.

Each answer is one line written in one ``write`` and flushed; every batch is fsynced. When a run
restarts on the same file, bytes after the last newline (a line torn by a crash) are cut off, the
answered ``question_id`` s are skipped, and the rest is generated: no duplicate, no loss. A complete
line that is not JSON, a duplicate id, an id outside the run's questions or a different ``model_id``
stop the run with the line number (the file is not ours to fix).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from evaluation.answers import AnswerFileError, canonical_id

__all__ = ["AnswerFile"]

log = logging.getLogger(__name__)


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
        self.path = Path(path)
        self.expected = set(expected_ids)
        self.model_id = model_id
        self.done: set[str] = set()
        self.truncated_bytes = 0
        self._fh = None
        self._scan()

    def _scan(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
        if keep < len(data):
            self.truncated_bytes = len(data) - keep
            log.warning("%s: cutting a torn last line (%d bytes) left by an interrupted run",
                        self.path, self.truncated_bytes)
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        for lineno, raw in enumerate(data[:keep].split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            where = f"{self.path}:{lineno}"
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AnswerFileError(
                    f"{where}: not a JSON line ({e}); only a torn *last* line is repaired on resume: "
                    "fix or delete the file") from None
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
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        for r in records:
            qid = canonical_id(r["question_id"])
            if qid in self.done:
                raise AnswerFileError(f"{self.path}: question_id {qid!r} would be written twice")
            self._fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            self._fh.flush()
            self.done.add(qid)
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file (appending again reopens it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "AnswerFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
