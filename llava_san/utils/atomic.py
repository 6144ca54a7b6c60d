"""Atomic writes: a reader never sees a half-written file or folder, and a failure leaves nothing behind.
Files and folders get the modes the process umask gives a plain ``open``/``mkdir`` (not ``mkstemp``'s 0600).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_tree(folder: Path, mask: int) -> None:
    """Give a temporary folder (``mkdtemp``: 0700) and its files the modes a plain ``mkdir``/``open``
    would have had under ``mask`` -- so a team sharing a cluster can read each other's outputs."""
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; on success it replaces ``target`` in one rename.

    On an exception the temporary folder is removed and an existing ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _chmod_tree(tmp, _umask())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, mode: str = "w", *, keep_existing: bool = False,
                **open_kwargs) -> Iterator:
    """Open a temporary file beside ``target`` for writing; it replaces ``target`` only on success.

    ``keep_existing=True``: first writer wins -- the file is hard-linked into place, which never
    replaces an existing ``target``, so a process that already opened it is never handed a new inode
    by a concurrent writer (the loser's content is dropped).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask as open() would
        if keep_existing:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what :func:`atomic_file`/:func:`atomic_dir` leave behind when a process is killed mid-write
    (``.<name>.tmp-*`` and ``.<name>.old-*`` beside their targets); never a finished file. Call only
    when no other process writes into ``folder``. Returns what was removed."""
    removed = [*Path(folder).glob(".*.tmp-*"), *Path(folder).glob(".*.old-*")]
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed
