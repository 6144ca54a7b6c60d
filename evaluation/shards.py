"""Sharding, as LLaVA's ``--num-chunks K --chunk-idx i``, and the merge of the chunk files.

The (limited) question list is split into ``K`` contiguous chunks of ``ceil(n / K)`` questions
(:func:`chunk_slice`, LLaVA's ``get_chunk``); chunk ``i`` is answered into
``answers/<benchmark>/<K>_<i>.jsonl`` (:func:`answer_paths`). :func:`merge_answer_files` checks every
chunk file complete (exactly its chunk's ids) and concatenates them in chunk order into
``answers/<benchmark>.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from evaluation.answers import canonical_id, read_answers
from evaluation.files import atomic_write

__all__ = ["answer_paths", "chunk_slice", "merge_answer_files"]


def chunk_slice(n: int, num_chunks: int, chunk_idx: int) -> slice:
    """LLaVA's ``get_chunk``: contiguous chunks of ``ceil(n / num_chunks)`` items; chunk ``chunk_idx``.

    A chunk past the end (more chunks than needed) is empty, where LLaVA raises ``IndexError``.
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"chunk_idx must be in [0, {num_chunks}), got {chunk_idx}")
    size = math.ceil(n / num_chunks) if n else 0
    start = min(chunk_idx * size, n)
    return slice(start, min(start + size, n))


def answer_paths(output_dir: str | os.PathLike, name: str, num_chunks: int = 1) -> tuple[Path, list[Path]]:
    """``(merged answer file, chunk files)``: ``answers/<name>.jsonl`` and, with ``num_chunks > 1``,
    ``answers/<name>/<K>_<i>.jsonl`` (LLaVA's naming); without sharding the chunk list is the file itself."""
    answers = Path(output_dir) / "answers"
    merged = answers / f"{name}.jsonl"
    if num_chunks == 1:
        return merged, [merged]
    return merged, [answers / name / f"{num_chunks}_{i}.jsonl" for i in range(num_chunks)]


def merge_answer_files(chunk_files: Sequence[str | os.PathLike], chunk_ids: Sequence[Sequence[str]],
                       out: str | os.PathLike) -> Path:
    """Concatenate complete chunk files in chunk order into ``out`` (atomically), each chunk's lines
    in its question order. A chunk file that is missing or does not hold exactly its chunk's ids
    raises ``ValueError`` naming the chunk and what to rerun."""
    problems = []
    lines: list[str] = []
    k = len(chunk_files)
    for i, (path, ids) in enumerate(zip(chunk_files, chunk_ids)):
        path = Path(path)
        if not path.exists():
            if ids:
                problems.append(f"chunk {i}/{k}: {path} is missing ({len(ids)} questions; run chunk_idx={i})")
            continue
        answers = read_answers(path)
        got = [canonical_id(a.question_id) for a in answers]
        want = set(ids)
        extra = [g for g in got if g not in want]
        dups = len(got) - len(set(got))
        missing = want - set(got)
        if extra or dups or missing:
            problems.append(
                f"chunk {i}/{k}: {path} has {len(set(got) & want)}/{len(want)} answers"
                + (f", {dups} duplicate(s)" if dups else "")
                + (f", {len(extra)} outside the chunk (e.g. {extra[:3]})" if extra else "")
                + (f"; rerun chunk_idx={i} to finish it" if missing else ""))
            continue
        order = {qid: n for n, qid in enumerate(ids)}
        for a in sorted(answers, key=lambda a: order[canonical_id(a.question_id)]):
            lines.append(json.dumps(dict(a.record), ensure_ascii=False) + "\n")
    if problems:
        raise ValueError(f"cannot merge into {out}: " + "; ".join(problems))
    with atomic_write(out) as f:
        f.writelines(lines)
    return Path(out)
