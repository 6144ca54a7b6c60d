"""The map-style dataset over a :class:`RecordIndex`, with bad-sample accounting across workers."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, get_worker_info

from .errors import REASONS, BadSample, BadSampleError, where
from .index import RecordIndex
from .preprocess import LlavaPreprocessor

log = logging.getLogger(__name__)

ON_BAD_SAMPLE = ("skip", "raise")
_COLUMNS = ("seen",) + REASONS + ("truncated", "image_cached")


class BadSampleCounter:
    """Per-reason counters shared by the main process and its dataloader workers.

    A ``(slots, columns)`` int64 tensor in shared memory; each process writes only its own row
    (slot 0 = main process, slot ``1 + worker_id`` = worker), so no lock is needed and the main
    process reads the sum. Survives ``fork`` and ``spawn`` (torch shares the storage).
    """

    def __init__(self, num_workers: int = 0):
        self.slots = max(int(num_workers), 0) + 1
        self.table = torch.zeros(self.slots, len(_COLUMNS), dtype=torch.int64).share_memory_()
        self._col = {c: i for i, c in enumerate(_COLUMNS)}
        self._logged: dict[str, int] = {}

    def _row(self) -> int:
        info = get_worker_info()
        if info is None or self.slots == 1:
            return 0
        return 1 + info.id % (self.slots - 1)

    def add(self, column: str, n: int = 1) -> None:
        """Increment ``column`` (``"seen"``, a reason, ``"truncated"`` or ``"image_cached"``) in this process's
        row."""
        self.table[self._row(), self._col[column]] += n

    def reset(self) -> None:
        """Zero all rows (main process, between epochs)."""
        self.table.zero_()

    def totals(self) -> dict[str, int]:
        """Sum over processes: ``{"seen": n, "truncated": t, <reason>: count, ...}`` (non-zero only)."""
        sums = self.table.sum(0).tolist()
        return {c: int(v) for c, v in zip(_COLUMNS, sums) if v or c == "seen"}

    def bad(self) -> int:
        """Number of skipped samples."""
        t = self.totals()
        return sum(v for k, v in t.items() if k in REASONS)

    def should_log(self, reason: str, limit: int = 10) -> bool:
        """Whether this process should still log individual messages for ``reason``."""
        n = self._logged.get(reason, 0)
        self._logged[reason] = n + 1
        return n < limit

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_logged"] = {}
        return state


class LlavaDataset(Dataset):
    """``dataset[i]`` is the prepared sample of record ``i`` of ``index``, or ``None`` if skipped.

    Args:
        index: the packed record index.
        preprocessor: record -> sample (:class:`LlavaPreprocessor`).
        on_bad_sample: ``"skip"`` (return ``None``, count the reason, log the message) or
            ``"raise"`` (:class:`BadSampleError`).
        counter: shared counters (one is created if omitted).
    """

    def __init__(self, index: RecordIndex, preprocessor: LlavaPreprocessor, on_bad_sample: str = "skip",
                 counter: Optional[BadSampleCounter] = None):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.index = index
        self.preprocessor = preprocessor
        self.on_bad_sample = on_bad_sample
        self.counter = counter or BadSampleCounter(0)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def modality_lengths(self):
        """LLaVA's ``modality_lengths`` (numpy int32; > 0 image, < 0 text-only)."""
        return self.index.lengths

    def __getitem__(self, i: int) -> Optional[dict[str, Any]]:
        i = int(i)
        position = self.index.position(i)
        self.counter.add("seen")
        rec: Any = None
        cache = getattr(self.preprocessor, "pixel_cache", None)
        hits = cache.hits if cache is not None else 0
        try:
            rec = self.index[i]
            sample = self.preprocessor(rec, position, self.index.path)
        except BadSample as bad:
            return self._bad(bad)
        except Exception as err:  # any other failure on one record is that record's problem, not the run's
            rid = rec.get("id") if isinstance(rec, dict) else None
            return self._bad(BadSample("preprocess_error", f"{where(rid, position, self.index.path)}: "
                                       f"{type(err).__name__}: {err}"), err)
        if sample["truncated"]:
            self.counter.add("truncated")
        if cache is not None and cache.hits > hits:
            self.counter.add("image_cached")
        return sample

    def _bad(self, bad: BadSample, cause: Optional[BaseException] = None) -> None:
        """Skip (count, log the first few) or raise :class:`BadSampleError`, by the policy."""
        if self.on_bad_sample == "raise":
            raise BadSampleError(bad.message, bad.reason) from cause
        self.counter.add(bad.reason)
        if self.counter.should_log(bad.reason):
            log.warning("skipping bad sample [%s] %s (pid %d)", bad.reason, bad.message, os.getpid())
        return None
