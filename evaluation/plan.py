"""What a run answers: its benchmarks (files resolved, questions read), its chunks and, per answer
file, the questions that go into it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from evaluation.answers import canonical_id
from evaluation.config import EvalConfig
from evaluation.resolve import BenchmarkData, resolve_benchmark
from evaluation.shards import answer_paths, chunk_slice
from evaluation.tasks import BENCHMARKS, get_benchmark
from evaluation.tasks.base import EvalQuestion

__all__ = ["Plan", "WorkItem", "benchmark_names", "make_plan"]


@dataclass(frozen=True)
class WorkItem:
    """One answer file to fill: a benchmark's questions of one chunk (all of them unsharded)."""

    benchmark: str
    answers_file: Path
    questions: list[EvalQuestion]


@dataclass(frozen=True)
class Plan:
    """A run's benchmarks and answer files.

    ``chunk_idx`` set: a chunk worker, which answers its chunk and stops. ``num_chunks > 1`` without
    ``chunk_idx``: the parent, which starts the chunk workers and then merges, scores and reports.
    """

    output_dir: Path
    benchmarks: dict[str, BenchmarkData]
    num_chunks: int
    chunk_idx: Optional[int]
    work: list[WorkItem]

    @property
    def is_worker(self) -> bool:
        """Whether this process answers one chunk only."""
        return self.chunk_idx is not None

    @property
    def launches_workers(self) -> bool:
        """Whether this process starts the chunk workers rather than answering itself."""
        return self.num_chunks > 1 and self.chunk_idx is None

    def answer_files(self, name: str) -> tuple[Path, list[Path]]:
        """``(merged answer file, chunk files)`` of benchmark ``name``."""
        return answer_paths(self.output_dir, name, self.num_chunks)

    def chunk_ids(self, name: str) -> list[list[str]]:
        """The canonical question ids of each chunk of benchmark ``name``, in chunk order."""
        ids = [canonical_id(q.question_id) for q in self.benchmarks[name].questions]
        return [ids[chunk_slice(len(ids), self.num_chunks, i)] for i in range(self.num_chunks)]


def benchmark_names(benchmarks: Any) -> list[str]:
    """The configured benchmark names (a list, or one name), each checked against the registry."""
    names = [benchmarks] if isinstance(benchmarks, str) else list(benchmarks)
    if not names:
        raise ValueError(f"benchmarks is empty; choose from {', '.join(BENCHMARKS)}")
    for n in names:
        get_benchmark(n)  # an unknown name lists the valid ones
    return names


def _check_sharding(k: int, idx: Optional[int]) -> None:
    if k < 1:
        raise ValueError(f"num_chunks must be >= 1, got {k}")
    if idx is not None and not 0 <= idx < k:
        raise ValueError(f"chunk_idx must be in [0, {k}), got {idx}")


def make_plan(config: EvalConfig) -> Plan:
    """Resolve every benchmark (files checked, questions read: a wrong input fails before any model
    is loaded) and list the answer files this process fills, with their questions."""
    names = benchmark_names(config.benchmarks)
    k, idx = config.num_chunks, config.chunk_idx
    _check_sharding(k, idx)
    overrides = config.data_overrides
    # only scoring reads the annotations: a run with score=false, or a chunk worker (which only
    # generates), does not need them
    scores = bool(config.score) and idx is None
    data = {n: resolve_benchmark(n, eval_root=config.eval_root, overrides=overrides.get(n), limit=config.limit,
                                 need_annotations=scores)
            for n in names}
    out = Path(config.output_dir)
    chunks = [idx] if idx is not None else list(range(k))
    work = []
    for n in names:
        _, files = answer_paths(out, n, k)
        qs = data[n].questions
        work += [WorkItem(n, files[i], qs[chunk_slice(len(qs), k, i)]) for i in chunks]
    return Plan(out, data, k, idx, work)
