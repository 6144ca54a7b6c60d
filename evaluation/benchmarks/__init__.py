"""Benchmark registry: ``get_benchmark("pope")`` returns the module for that benchmark.

Each module follows the protocol described in :mod:`evaluation.benchmarks.base` (question reader,
scorer, submission writer). Modules are imported on first use.

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
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

from evaluation.benchmarks.base import EvalQuestion

__all__ = ["BENCHMARKS", "PAPER_BENCHMARKS", "EvalQuestion", "get_benchmark", "llava_paths"]

#: name -> module path. The seven LLaVA-1.5 benchmarks in the paper's column order, then easy-vqa.
BENCHMARKS: dict[str, str] = {
    "vqav2": "evaluation.benchmarks.vqav2",
    "gqa": "evaluation.benchmarks.gqa",
    "vizwiz": "evaluation.benchmarks.vizwiz",
    "scienceqa": "evaluation.benchmarks.scienceqa",
    "textvqa": "evaluation.benchmarks.textvqa",
    "pope": "evaluation.benchmarks.pope",
    "mmbench": "evaluation.benchmarks.mmbench",
    "easyvqa": "evaluation.benchmarks.easyvqa",
}

#: The seven benchmarks of the paper's tables, in column order.
PAPER_BENCHMARKS: tuple[str, ...] = ("vqav2", "gqa", "vizwiz", "scienceqa", "textvqa", "pope", "mmbench")


def get_benchmark(name: str) -> ModuleType:
    """The benchmark module registered as ``name``; an unknown name raises ``ValueError`` listing
    the valid ones."""
    try:
        module = BENCHMARKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}") from None
    return importlib.import_module(module)


def llava_paths(name: str, eval_root: str | os.PathLike) -> dict[str, Path]:
    """Where LLaVA's ``eval.zip`` layout puts a benchmark's files under ``eval_root``
    (``playground/data/eval``): ``{"questions": ..., "image_folder": ..., "annotations": ...}``
    as far as the benchmark has them (easy-vqa has none)."""
    layout = dict(get_benchmark(name).LLAVA_LAYOUT)
    folder = Path(eval_root) / layout.pop("folder", name)
    return {k: folder / v for k, v in layout.items()}
