"""Run a function in a fresh process, cheaply: for the per-arm peak-memory measurements of the benchmarks.

A memory figure taken in the process that built and stepped the other arms would carry their leftovers
(allocator caches, the high-water mark), so each arm is measured in a process of its own. Starting a
Python process and importing torch + transformers + Lightning costs seconds each time; here one
``forkserver`` process imports them once and every measurement is a fork of it — a new process whose
memory holds the imported modules and nothing else (no model, no tensor, no OpenMP pool: the server never
computes). The function must be importable (module level in the calling script is fine; the script's
top level runs again in the child as ``__mp_main__``, so guard work with ``if __name__ == "__main__"``).

    if __name__ == "__main__":
        _fresh.start()         # before the script's own heavy imports: the server imports alongside
    ...
    _fresh.wait_ready()        # before timing anything (the server's import would compete)
    result = _fresh.run_fresh(measure, arg1, arg2)
"""
from __future__ import annotations

import multiprocessing as mp
from multiprocessing import forkserver
from typing import Any, Callable

#: modules the fork server imports once (what every benchmark child needs)
PRELOAD = ["torch", "transformers", "peft", "lightning", "psutil", "llava_san.module", "llava_san.models"]
_ctx = None


def start() -> None:
    """Start the fork server (it imports :data:`PRELOAD` in the background); idempotent."""
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
        forkserver.ensure_running()


def _nothing() -> None:
    return None


def wait_ready() -> None:
    """Return once the fork server has finished its imports (one empty child)."""
    run_fresh(_nothing)


def run_fresh(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new process forked from the fork server (started if needed); its return value."""
    start()
    with _ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(fn, args)


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS high-water mark (Linux ``clear_refs`` 5), so that ``ru_maxrss``
    afterwards measures from here; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
