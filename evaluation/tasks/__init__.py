"""Benchmark registry: ``get_benchmark("pope")`` returns that benchmark's :class:`Task`.

Each module ``evaluation/tasks/<name>.py`` holds one benchmark (question reader with LLaVA's prompts,
scorer, submission writer; shared pieces in :mod:`evaluation.tasks.base`) and ends with
``TASK = Task(...)`` (:mod:`evaluation.tasks.task`). Modules are imported on first use. Adding a
benchmark: its module, one line in :data:`BENCHMARKS`, its ``data.<name>`` entry in ``conf/eval.yaml``.

Where the tools disagree (``docs/benchmarks.md`` section 8) every scorer follows the LLaVA-1.5 pipeline:

=========  ===============================================================================
VQAv2      Normaliser B on the prediction, then vqaEval (A on both only when the gt is not
           unanimous). ``convention="lmms-eval"`` (A on both, always) is available.
VizWiz     B on the prediction, then the official eval (A on the prediction, raw gt).
TextVQA    B on prediction and gt (m4c evaluator).
GQA        ``rstrip('.').lower()``, exact match, balanced questions; open = structural query.
ScienceQA  letter / "X. " / single "The answer is X." match; IMG subset by the problem's image.
POPE       first-sentence No/not/no rule; P = R = F1 = 0 on a zero denominator; mean split F1.
MMBench    2023 ``can_infer`` + circular; the ChatGPT fallback is replaced by "unparsed = wrong".
=========  ===============================================================================

The eight commonsense benchmarks (BoolQ ... OBQA, :mod:`evaluation.tasks.commonsense`) follow
LLM-Adapters' ``commonsense_evaluate.py``: Alpaca prompt as raw text, 4-beam search, 32 new tokens,
the first regex match of the answer family (``true|false``, ``solution1|2``...) against ``answer``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from evaluation.tasks.base import EvalQuestion
from evaluation.tasks.task import Task

__all__ = ["BENCHMARKS", "COMMONSENSE_BENCHMARKS", "PAPER_BENCHMARKS", "EvalQuestion", "Task", "get_benchmark", "llava_paths"]

#: name -> module path. The seven LLaVA-1.5 benchmarks in the paper's column order, then easy-vqa.
BENCHMARKS: dict[str, str] = {
    "vqav2": "evaluation.tasks.vqav2",
    "gqa": "evaluation.tasks.gqa",
    "vizwiz": "evaluation.tasks.vizwiz",
    "scienceqa": "evaluation.tasks.scienceqa",
    "textvqa": "evaluation.tasks.textvqa",
    "pope": "evaluation.tasks.pope",
    "mmbench": "evaluation.tasks.mmbench",
    "easyvqa": "evaluation.tasks.easyvqa",
    # LLM-Adapters' commonsense benchmarks (LLaMA causal LMs), in the paper's column order
    "boolq": "evaluation.tasks.boolq",
    "piqa": "evaluation.tasks.piqa",
    "social_i_qa": "evaluation.tasks.social_i_qa",
    "hellaswag": "evaluation.tasks.hellaswag",
    "winogrande": "evaluation.tasks.winogrande",
    "arc_easy": "evaluation.tasks.arc_easy",
    "arc_challenge": "evaluation.tasks.arc_challenge",
    "openbookqa": "evaluation.tasks.openbookqa",
}

#: The seven benchmarks of the paper's tables, in column order.
PAPER_BENCHMARKS: tuple[str, ...] = ("vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "pope", "mmbench")

#: The eight commonsense benchmarks of the paper's LLaMA table, in column order (BoolQ, PIQA, SIQA,
#: HellaSwag, WinoGrande, ARC-e, ARC-c, OBQA).
COMMONSENSE_BENCHMARKS: tuple[str, ...] = (
    "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def get_benchmark(name: str) -> Task:
    """The benchmark registered as ``name`` (its module's ``TASK``); an unknown name raises
    ``ValueError`` listing the valid ones."""
    try:
        module = BENCHMARKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}") from None
    return importlib.import_module(module).TASK


def llava_paths(name: str, eval_root: str | os.PathLike) -> dict[str, Path]:
    """Where LLaVA's ``eval.zip`` layout puts a benchmark's files under ``eval_root``
    (``playground/data/eval``): ``{"questions": ..., "image_folder": ..., "annotations": ...}``
    as far as the benchmark has them (easy-vqa has none)."""
    return get_benchmark(name).llava_paths(eval_root)
