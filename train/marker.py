"""The ``FAILED`` marker of a run folder: a new run that stops on an exception says so in its folder.

Hydra creates the run folder (``.hydra/``, the log file) before training starts, so a run that fails at
start-up -- a wrong data path, a missing file -- would otherwise leave a folder that looks like a run
that never started or is still going. ``FAILED`` holds the exception (its first line), the time and the
traceback. Nothing is removed: the folder keeps what the failed run wrote.

Only a run started in a fresh folder (nothing in it but Hydra's own files, :func:`is_fresh`) marks it: a
command refused on an existing run folder (a resume whose checkpoint does not match) leaves that run's
folder as it was. A later run in the folder that finishes (``ckpt_path=last`` after fixing the cause)
removes the marker.
"""
from __future__ import annotations

import datetime
import os
import traceback
from pathlib import Path
from typing import Optional

from llava_san.utils.atomic import atomic_file

__all__ = ["MARKER", "clear_failed", "is_fresh", "mark_failed", "read_failed"]

MARKER = "FAILED"


def is_fresh(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds nothing but what Hydra writes before the job starts (``.hydra/`` and the
    job's ``*.log``): a run started here is the folder's first."""
    folder = Path(folder)
    if not folder.is_dir():
        return True
    return all(p.name == ".hydra" or (p.suffix == ".log" and p.is_file()) for p in folder.iterdir())


def mark_failed(folder: str | os.PathLike, error: BaseException) -> Optional[Path]:
    """Write ``<folder>/FAILED`` for ``error``; returns its path (None when the folder does not exist,
    e.g. the run failed before Hydra made it)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    what = "".join(traceback.format_exception_only(type(error), error)).strip().splitlines()[-1]
    text = (f"{what}\n"
            f"at {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}. Fix the cause and start "
            "again (with ckpt_path=last hydra.run.dir=<this folder> training continues from the last "
            "checkpoint, if one was written).\n\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    path = folder / MARKER
    with atomic_file(path, "w") as fh:
        fh.write(text)
    return path


def clear_failed(folder: str | os.PathLike) -> bool:
    """Remove ``<folder>/FAILED`` left by an earlier run (this one finished); returns whether there was one."""
    path = Path(folder) / MARKER
    if path.is_file():
        path.unlink()
        return True
    return False


def read_failed(folder: str | os.PathLike) -> Optional[str]:
    """The first line of ``<folder>/FAILED`` (the exception), or None when the folder has no marker."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return lines[0] if lines else ""
