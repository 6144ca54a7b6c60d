"""Small file helpers shared by the scorers and the report: atomic writes and line-numbered jsonl.

Every file this package writes (submission files, metrics, reports) goes through
:func:`atomic_write`: the content is written to a temporary file in the destination folder and
renamed over the target only when complete, so an error never leaves a partial file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator

from llava_san.utils.atomic import atomic_file

__all__ = ["DataFileError", "atomic_write", "check_utf8", "iter_jsonl", "read_json", "write_json", "write_text"]


class DataFileError(ValueError):
    """A question, annotation or answer file is malformed. The message names the file (and line)."""


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success rename it to ``path``, on error delete it.

    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary). Parent folders are created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    with atomic_file(path, mode, encoding=None if "b" in mode else encoding) as f:
        yield f


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None) -> Path:
    """Serialise ``obj`` first (so a non-serialisable object fails before any file exists), then
    write it atomically; returns the path."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return write_text(path, text + ("\n" if indent is not None else ""))


def check_utf8(path: str | os.PathLike) -> None:
    """:class:`DataFileError` naming the file and line if ``path`` is not valid UTF-8."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the "
                                    "line); save the file as UTF-8") from None


def _check_encodable(obj: Any, where: str) -> None:
    """JSON may carry lone UTF-16 surrogates, which no UTF-8 file can hold: refuse them up front."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataFileError(f"{where}: text that cannot be encoded as UTF-8 ({e.reason}: a lone surrogate "
                            f"such as \\ud800?)") from None


def read_json(path: str | os.PathLike) -> Any:
    """Load a JSON file; a syntax error, invalid UTF-8 or unencodable text raises :class:`DataFileError`
    naming the file and line."""
    path = Path(path)
    check_utf8(path)
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise DataFileError(f"{path}: JSON nested deeper than the parser allows") from None
    _check_encodable(obj, str(path))
    return obj


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a jsonl file (1-based numbers).

    A line that is not valid JSON, or not a JSON object, raises :class:`DataFileError` with
    ``path:line``. Blank lines (e.g. a trailing newline) are skipped.
    """
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start} of the "
                                    "line); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFileError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataFileError(f"{path}:{lineno}: JSON nested deeper than the parser allows") from None
            if not isinstance(obj, dict):
                raise DataFileError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if not line.isascii() or "\\u" in line:
                _check_encodable(obj, f"{path}:{lineno}")
            yield lineno, obj
