"""The benchmark object: everything a benchmark decides, in one value registered by name.

Each ``evaluation/tasks/<name>.py`` ends with ``TASK = Task(...)``; :func:`evaluation.tasks.get_benchmark`
returns it. The run (:mod:`evaluation.resolve`, :mod:`evaluation.scoring`), the scorer CLI
(:mod:`evaluation.score`) and the report (:mod:`evaluation.report`) ask the object, never the name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

__all__ = ["NEEDS", "PROMPT_FORMATS", "ScoreInput", "Task"]

#: how a scorer input is needed: ``required``; ``optional``; ``either`` (at least one of the benchmark's
#: ``either`` inputs is required)
NEEDS = ("required", "optional", "either")
#: how a question's prompt becomes model input (:attr:`Task.prompt_format`)
PROMPT_FORMATS = ("conversation", "text")


@dataclass(frozen=True)
class ScoreInput:
    """One input of a benchmark's scorer, as ``python -m evaluation.score --help`` lists it.

    Attributes:
        arg: the ``score_files`` keyword (``questions``, ``annotations``, ``split``, ``pid_splits``,
            ``convention``); the command-line flag is ``--<arg>`` with ``-`` for ``_``.
        need: one of :data:`NEEDS`.
        what: the file or value it takes.
    """

    arg: str
    need: str
    what: str

    def __post_init__(self) -> None:
        if self.need not in NEEDS:
            raise ValueError(f"ScoreInput.need must be one of {NEEDS}, got {self.need!r}")

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--pid-splits``."""
        return "--" + self.arg.replace("_", "-")


@dataclass(frozen=True)
class Task:
    """One benchmark.

    Attributes:
        name: registry name (``benchmarks=[<name>]``, ``data.<name>``, answer file name).
        title: column title in the report.
        headline: key of the headline metric in the scorer's result.
        max_new_tokens: LLaVA's generation length for its questions (128, or 1024 for the
            multiple-choice scripts).
        layout: where LLaVA's ``eval.zip`` puts the files: ``folder`` under ``playground/data/eval``,
            then file keys (``questions``, ``image_folder``, ``annotations``, extras) relative to it.
        load_questions: ``(questions, image_folder=None) -> list[EvalQuestion]``, LLaVA's prompts.
        score: the in-memory scorer ``(answers, annotations, ...) -> dict``.
        score_files: what ``python -m evaluation.score`` calls (``answers, *, questions, annotations,
            split, submission, allow_missing, allow_unknown`` + benchmark options).
        write_submission: the upload-file writer, where the benchmark has one.
        uses_split: whether the scorer reads ``split`` (``data.<name>.split``, ``--split``).
        scores_subset: whether the scorer restricts the expected ids to the questions it is given, so a
            ``limit`` run is scored on its own questions; otherwise the whole question file is
            expected and missing answers are allowed (reported in the coverage).
        annotations_optional: a missing annotation file means a test split without ground truth
            (answers + upload file only) rather than an error.
        extra_files: further file keys of ``layout`` / ``data.<name>`` the scorer uses, kept when the
            file exists.
        find_files: ``(overrides) -> {"questions", "image_folder", "annotations"}`` for a benchmark
            whose files are not under ``eval_root`` (easy-vqa: its cache); ``None``: ``layout``.
        score_inputs: ``(benchmark data) -> scorer keyword arguments`` beyond the generic ones (see
            :func:`evaluation.scoring.score_answers`).
        score_needs: the inputs ``score_files`` takes besides the answers, each with how it is needed
            (:class:`ScoreInput`); ``python -m evaluation.score --help`` lists them.
        prompt_format: ``"conversation"``: the question's user message goes through the conversation
            template (LLaVA's ``vicuna_v1``) and training's tokenization; ``"text"``: the prompt is the
            whole model input, tokenized as is with the tokenizer's special tokens (BOS), for a causal
            LM (the commonsense benchmarks' Alpaca prompt).
        num_beams: the benchmark's own beam count (1: greedy, LLaVA's scripts; 4: LLM-Adapters'
            ``commonsense_evaluate.py``); ``num_beams`` in ``conf/eval.yaml`` overrides it.
        postprocess: decoded text -> the answer written (LLM-Adapters keeps the text after the last
            ``### Response:``); ``None``: the text as decoded (LLaVA's ``.strip()``).
        suite: which paper table the benchmark's column belongs to in the report (``"llava"``: Table 3,
            LLaVA-1.5; ``"commonsense"``: the LLaMA commonsense table).
    """

    name: str
    title: str
    headline: str
    max_new_tokens: int
    layout: Mapping[str, str]
    load_questions: Callable[..., list]
    score: Callable[..., dict]
    score_files: Callable[..., dict]
    write_submission: Optional[Callable[..., Any]] = None
    uses_split: bool = False
    scores_subset: bool = True
    annotations_optional: bool = False
    extra_files: tuple[str, ...] = field(default=())
    find_files: Optional[Callable[[Mapping[str, Any]], dict[str, Path]]] = None
    score_inputs: Optional[Callable[[Any], dict[str, Any]]] = None
    score_needs: tuple[ScoreInput, ...] = field(default=())
    prompt_format: str = "conversation"
    num_beams: int = 1
    suite: str = "llava"
    postprocess: Optional[Callable[[str], str]] = None

    def __post_init__(self) -> None:
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"Task.prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if int(self.num_beams) < 1:
            raise ValueError(f"Task.num_beams must be >= 1, got {self.num_beams}")

    def llava_paths(self, eval_root: str | os.PathLike) -> dict[str, Path]:
        """The benchmark's files in LLaVA's ``eval.zip`` layout under ``eval_root``."""
        layout = dict(self.layout)
        folder = Path(eval_root) / layout.pop("folder", self.name)
        return {k: folder / v for k, v in layout.items()}

    def file_keys(self) -> tuple[str, ...]:
        """The ``data.<name>`` keys that name files: questions, images, annotations, extras."""
        return ("questions", "image_folder", "annotations", *self.extra_files)
