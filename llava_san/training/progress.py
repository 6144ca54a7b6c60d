"""Progress of an answer loop (``python -m evaluation``, the easy-vqa check at the end of training):
questions answered / total.

On a terminal it is a tqdm bar on stderr (resumed answers counted from the start, the speed measured on
this run's answers only). When stderr is not a terminal -- a log file, CI, a pipe -- a bar would write a
line per refresh or nothing readable, so a log line is written every ``every_s`` seconds instead, and one
at the end.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import IO, Optional

log = logging.getLogger(__name__)


def _is_terminal(stream: IO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams (pytest's capture) are not terminals
        return False


class AnswerProgress:
    """Counts answered questions; see the module doc. Use as a context manager (or call :meth:`close`).

    Args:
        name: what is answered (the answer file's name, ``easy-vqa test``).
        total: questions in all, the resumed ones included.
        resumed: questions answered by an earlier run (the bar starts there).
        every_s: seconds between log lines when stderr is not a terminal.
        stream: where the bar goes (default: stderr).
    """

    def __init__(self, name: str, total: int, resumed: int = 0, every_s: float = 30.0,
                 stream: Optional[IO] = None) -> None:
        self.name, self.total, self.resumed, self.every_s = name, int(total), int(resumed), float(every_s)
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        stream = sys.stderr if stream is None else stream
        self.bar = None
        if _is_terminal(stream):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.resumed, desc=name, unit="q", file=stream,
                            dynamic_ncols=True, leave=True)

    def add(self, n: int) -> None:
        """Count ``n`` more answers (the bar moves; a log line is written when due)."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif time.perf_counter() - self.last > self.every_s:
            self._log()
            self.last = time.perf_counter()

    def _log(self) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.resumed - self.done) / max(rate, 1e-9)
        log.info("%s: %d/%d answered (%.2f questions/s, ~%.0f s left)", self.name, self.resumed + self.done,
                 self.total, rate, left)

    def close(self) -> None:
        """Close the bar, or log the final count (when anything was answered)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.done:
            self._log()

    def __enter__(self) -> "AnswerProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["AnswerProgress"]
