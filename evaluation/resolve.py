"""Benchmark -> its files and the questions of this run, before any model is loaded.

Every problem (no question file, no image folder, a missing image, duplicate ids) raises with the
path in the message, so a wrong ``eval_root`` or override fails in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from evaluation.answers import canonical_id
from evaluation.files import DataFileError
from evaluation.tasks import get_benchmark
from evaluation.tasks.base import EvalQuestion
from evaluation.tasks.task import Task

__all__ = ["BenchmarkData", "resolve_benchmark"]


@dataclass
class BenchmarkData:
    """A benchmark's files and the questions of this run (after ``limit``, before sharding)."""

    task: Task
    questions_file: Path
    image_folder: Optional[Path]
    annotations: Optional[Path]
    questions: list[EvalQuestion]
    split: Optional[str] = None  # data.<name>.split, for a task that reads one
    extra_files: dict[str, Path] = field(default_factory=dict)  # the task's extra_files that exist
    total: int = 0  # questions in the file (before limit)

    @property
    def name(self) -> str:
        """The benchmark's registry name."""
        return self.task.name

    @property
    def limited(self) -> bool:
        """Whether ``limit`` dropped questions."""
        return len(self.questions) < self.total


def _set_overrides(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """The overrides that are set (``null`` and ``""`` mean "not set")."""
    return {k: v for k, v in (overrides or {}).items() if v not in (None, "")}


def _files(task: Task, eval_root: str | os.PathLike | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """The task's own files (its finder, else LLaVA's layout under ``eval_root``), then the overrides."""
    if task.find_files is not None:
        files: dict[str, Any] = dict(task.find_files(overrides))
    else:
        if eval_root is None and "questions" not in overrides:
            raise ValueError(
                f"{task.name}: set eval_root (LLaVA's playground/data/eval) or data.{task.name}.questions")
        files = task.llava_paths(eval_root) if eval_root is not None else {}
    for key in task.file_keys():
        if key in overrides:
            files[key] = Path(str(overrides[key])).expanduser()
    return files


def _check_files(task: Task, files: dict[str, Any], eval_root: Any,
                 need_annotations: bool = True) -> tuple[Path, Optional[Path], Optional[Path]]:
    """``(questions file, image folder, annotations)``, each checked to exist; missing annotations are
    ``None`` when they are not needed (a run that only generates)."""
    name = task.name
    questions_file = files.get("questions")
    if questions_file is None or not Path(questions_file).is_file():
        raise FileNotFoundError(
            f"{name}: question file not found: {questions_file} (LLaVA's eval.zip layout under "
            f"eval_root={eval_root}; or set data.{name}.questions=...)")
    image_folder = files.get("image_folder")
    if image_folder is not None and not Path(image_folder).is_dir():
        raise FileNotFoundError(
            f"{name}: image folder not found: {image_folder} (set data.{name}.image_folder=... or eval_root)")
    annotations = files.get("annotations")
    if annotations is not None and not Path(annotations).exists():
        if need_annotations and not task.annotations_optional:
            raise FileNotFoundError(
                f"{name}: annotations not found: {annotations} (needed to score; set "
                f"data.{name}.annotations=..., or score=false to generate the answers only)")
        annotations = None  # not scored here, or a test split: answers + upload file only
    return (Path(questions_file), Path(image_folder) if image_folder is not None else None,
            Path(annotations) if annotations is not None else None)


def _check_questions(name: str, questions: list[EvalQuestion], questions_file: Path,
                     image_folder: Optional[Path], check_images: bool) -> None:
    """Unique ids (answers are resumed by id) and, with ``check_images``, every image file present."""
    ids = [canonical_id(q.question_id) for q in questions]
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dups = [i for i in ids if i in seen or seen.add(i)]
        raise DataFileError(
            f"{questions_file}: duplicate question_id(s) {dups[:5]}; answers could not be resumed")
    if check_images:
        missing = [q.image for q in questions
                   if isinstance(q.image, (str, os.PathLike)) and not Path(q.image).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{name}: {len(missing)} of {len(questions)} image files not found, "
                f"e.g. {[str(m) for m in missing[:3]]} "
                f"(image folder: {image_folder})")


def resolve_benchmark(
    name: str,
    *,
    eval_root: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    limit: Optional[int] = None,
    check_images: bool = True,
    need_annotations: bool = True,
) -> BenchmarkData:
    """Find ``name``'s files and read its questions; every problem raises with the path in the message.

    Files: ``overrides`` (``data.<name>``: ``questions``, ``image_folder``, ``annotations``, the
    task's extra files, ``split``; easy-vqa: ``cache_dir``) win over the task's own files (LLaVA's
    ``eval.zip`` layout under ``eval_root``, or the task's finder). ``limit`` keeps the first
    questions. With ``check_images`` every image file of the kept questions must exist. The annotations
    are only read to score: with ``need_annotations=False`` (``score=false``, a chunk worker) a missing
    annotation file is no error and ``annotations`` is ``None``.
    """
    task = get_benchmark(name)  # unknown names list the valid ones
    over = _set_overrides(overrides)
    files = _files(task, eval_root, over)
    questions_file, image_folder, annotations = _check_files(task, files, eval_root, need_annotations)
    extra = {k: Path(files[k]) for k in task.extra_files
             if files.get(k) is not None and Path(files[k]).is_file()}
    questions = task.load_questions(questions_file, image_folder)
    total = len(questions)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be a positive number of questions, got {limit}")
        questions = questions[: int(limit)]
    _check_questions(name, questions, questions_file, image_folder, check_images)
    split = str(over["split"]) if task.uses_split and "split" in over else None
    return BenchmarkData(task, questions_file, image_folder, annotations, questions, split, extra, total)
