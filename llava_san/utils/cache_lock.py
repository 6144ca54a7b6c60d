"""``cache_lock(folder)``: one process at a time prepares a shared cache folder.

Runs started together on a fresh checkout (two terminals, a multirun launcher, the study's two workers)
all find the cache empty. Writing each file atomically is not enough: a second writer replaces a file
the first run has already indexed, whose index then refuses every record as "changed since its index
was built". Under this lock the second process waits, then finds the cache complete and reuses it.
POSIX ``flock`` on ``<folder>/.lock``; released when the block ends (or the process dies).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def cache_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the duration of the block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (prepare one run first there)
        yield
        return
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


__all__ = ["cache_lock"]
