"""A crash-safe JSON-lines journal: a file of one record per line that a restarted job appends to.

Each record is one line written in one ``write`` and flushed; every :meth:`JsonlJournal.append`
call ends with an ``fsync``. A job killed mid-write leaves at most one torn line: the bytes after
the last newline. On reopening, the complete lines are parsed (:attr:`JsonlJournal.lines`) and
the caller checks that they belong to its job *before* :meth:`JsonlJournal.repair` cuts the torn
tail, so a file that is not the job's own is left exactly as it was.

Users: ``python -m evaluation``'s answer files (:class:`evaluation.journal.AnswerFile`) and
``python -m llava_san.predict``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Type

__all__ = ["JsonlJournal"]

log = logging.getLogger(__name__)


class JsonlJournal:
    """An existing (or new) JSON-lines file, read on opening, appended to afterwards.

    Args:
        path: the file; created with its folder on the first :meth:`append` when absent.
        error: the exception class raised for a complete line that is not JSON (its message names
            ``path:line``); callers pass their own ``ValueError`` subclass.

    Attributes:
        lines: ``(line number, parsed JSON value)`` of every complete non-blank line, in order.
        torn_bytes: bytes after the last newline (a line torn by a crash); 0 when the file is whole.
    """

    def __init__(self, path: str | os.PathLike, error: Type[Exception] = ValueError) -> None:
        self.path = Path(path)
        self.lines: list[tuple[int, Any]] = []
        self.torn_bytes = 0
        self._keep = 0
        self._fh = None
        if not self.path.exists():
            return
        if not self.path.is_file():
            raise error(f"{self.path} exists and is not a file")
        data = self.path.read_bytes()
        self._keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn line
        self.torn_bytes = len(data) - self._keep
        for lineno, raw in enumerate(data[:self._keep].split(b"\n")[:-1], start=1):
            if not raw.strip():
                continue
            try:
                self.lines.append((lineno, json.loads(raw)))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise error(f"{self.path}:{lineno}: not a JSON line ({e}); only a torn *last* line is "
                            "repaired on resume: fix or delete the file") from None

    def repair(self) -> None:
        """Cut the torn last line, if any (call once the complete lines are known to be this job's)."""
        if not self.torn_bytes:
            return
        log.warning("%s: cutting a torn last line (%d bytes) left by an interrupted run", self.path,
                    self.torn_bytes)
        with open(self.path, "r+b") as f:
            f.truncate(self._keep)
            f.flush()
            os.fsync(f.fileno())
        self.torn_bytes = 0

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append ``records``, one JSON object per line, each flushed; fsync once at the end."""
        if self.torn_bytes:
            raise RuntimeError(f"{self.path}: repair() the torn last line before appending")
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        for r in records:
            self._fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        """Close the file (appending again reopens it)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "JsonlJournal":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
