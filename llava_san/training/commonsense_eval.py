"""Commonsense multiple-choice accuracy at the end of ``python -m train`` (the csr_tiny check), next to the
majority-answer baseline.

The test records are LLM-Adapters-format (``instruction``, ``answer``, and ``dataset``: the benchmark's
registry name, :data:`llava_san.commonsense.BENCHMARKS`), asked as LLM-Adapters' ``commonsense_evaluate.py``
asks them: the evaluation prompt of :func:`llava_san.commonsense.generate_prompt` (instruction only;
``prompt=training``: the training template's user part instead, see the class),
tokenized with BOS (:func:`llava_san.commonsense.encode_prompt`), greedy-decoded in left-padded batches
by the project's answer loop (:func:`llava_san.generation.answer_questions`), the response kept as the
official script keeps it (:func:`~llava_san.commonsense.response_text`) and scored by the official
extraction (:func:`~llava_san.commonsense.extract_answer`: first regex match of the dataset's style).

Baseline: per benchmark, always the most frequent answer of the training records of that benchmark
(``train_file``; without one, of the test records themselves). Accuracy and baseline are the mean
over the benchmarks present (the paper's "Avg." column) and per benchmark.

Metrics: ``test/commonsense_accuracy``, ``test/commonsense_majority_baseline``,
``test/commonsense_<benchmark>_{accuracy,majority_baseline}``, ``test/commonsense_n``, ``time/eval_s``.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any, Optional

from .progress import AnswerProgress

__all__ = ["CommonsenseEvaluator", "format_report", "should_evaluate"]


def _read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class CommonsenseEvaluator:
    """Answer and score a commonsense test file (``evaluate._target_`` of ``conf/experiment/csr_tiny.yaml``).

    Args:
        test_file: the test records (JSON array or lines).
        train_file: records whose per-benchmark majority answer is the baseline (None: the test's own).
        dataset: benchmark name for records without a ``dataset`` field.
        batch_size: prompts per generation batch.
        max_new_tokens: greedy tokens per answer (LLM-Adapters: 32; ``the correct answer is answer1`` is ~6).
        limit: the first N test records (None: all).
        prompt: ``official`` (default): the evaluation template of ``commonsense_evaluate.py``;
            ``training``: the training template's user part (``generate_prompt(instruction, input, "")``,
            the span ``train_on_inputs=False`` masks). The two official templates differ in whitespace
            (:mod:`llava_san.commonsense.prompt`); a pretrained LLaMA does not mind, the random tiny
            LLaMA of csr_tiny does (it answers 0 % on the official prompt after learning the facts), so
            ``experiment=csr_tiny`` asks with the template it was trained on.
    """

    def __init__(self, test_file: str, train_file: Optional[str] = None, dataset: Optional[str] = None,
                 batch_size: int = 64, max_new_tokens: int = 32, limit: Optional[int] = None,
                 prompt: str = "official", log_every_s: float = 30.0) -> None:
        if prompt not in ("official", "training"):
            raise ValueError(f"prompt must be 'official' or 'training', got {prompt!r}")
        self.prompt = prompt
        if int(batch_size) < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
        self.test_file, self.train_file, self.dataset = test_file, train_file, dataset
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.limit = None if limit is None else int(limit)
        self.log_every_s = float(log_every_s)

    def _name(self, rec: dict) -> str:
        from ..commonsense import benchmark

        name = rec.get("dataset") or self.dataset
        if not name:
            raise ValueError(f"{self.test_file}: a record has no 'dataset' field and evaluate.dataset is not set")
        return benchmark(name).name

    def majority(self, rows: list[dict]) -> dict[str, str]:
        """Per benchmark, the most frequent answer of ``train_file`` (or of ``rows``); ties: the smallest."""
        source = _read(self.train_file) if self.train_file else rows
        counts: dict[str, Counter] = {}
        for rec in source:
            if isinstance(rec, dict) and isinstance(rec.get("answer"), str):
                counts.setdefault(self._name(rec), Counter())[rec["answer"]] += 1
        return {k: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for k, c in counts.items()}

    def __call__(self, model: Any, processor: Any) -> dict[str, float]:
        """Answer the test records with ``model`` (restored to its mode afterwards) and score them."""
        from ..commonsense import encode_prompt, extract_answer, generate_prompt, response_text
        from ..generation import GenerationInput, answer_questions

        t0 = time.perf_counter()
        rows = _read(self.test_file)
        rows = rows[: self.limit] if self.limit else rows
        tok = getattr(processor, "tokenizer", processor)

        def encode(rec: dict, _: Any) -> GenerationInput:
            if self.prompt == "training":  # LLM-Adapters' user_prompt: tokenize(..., add_eos_token=False)
                ids = tok(generate_prompt(rec["instruction"], rec.get("input") or "", ""))["input_ids"]
            else:  # commonsense_evaluate.py: the instruction only
                ids = encode_prompt(tok, rec["instruction"])
            return GenerationInput(list(ids), None, self.max_new_tokens)

        with AnswerProgress("commonsense test", len(rows), every_s=self.log_every_s) as progress:
            texts = answer_questions(model, SimpleNamespace(tokenizer=tok), rows, encode, batch_size=self.batch_size,
                                     on_batch=lambda batch, _: progress.add(len(batch)))
        majority = self.majority(rows)
        hits: dict[str, list[int]] = {}
        base: dict[str, list[int]] = {}
        for rec, text in zip(rows, texts):
            name = self._name(rec)
            hits.setdefault(name, []).append(int(extract_answer(name, response_text(text)) == rec["answer"]))
            base.setdefault(name, []).append(int(majority.get(name) == rec["answer"]))
        metrics: dict[str, float] = {"test/commonsense_n": len(rows)}
        for name in hits:
            metrics[f"test/commonsense_{name}_accuracy"] = sum(hits[name]) / len(hits[name])
            metrics[f"test/commonsense_{name}_majority_baseline"] = sum(base[name]) / len(base[name])
        if hits:
            metrics["test/commonsense_accuracy"] = sum(metrics[f"test/commonsense_{n}_accuracy"] for n in hits) / len(hits)
            metrics["test/commonsense_majority_baseline"] = sum(
                metrics[f"test/commonsense_{n}_majority_baseline"] for n in hits) / len(hits)
        metrics["time/eval_s"] = time.perf_counter() - t0
        return metrics


def should_evaluate(when: str, data_target: Optional[str]) -> tuple[bool, str]:
    """``(score it?, why)``: ``when="auto"`` only after training on commonsense-format data
    (:class:`~llava_san.data.commonsense.CommonsenseDataModule` or a subclass); ``"always"``: whatever the data."""
    from ..data.commonsense import CommonsenseDataModule
    from .when import trained_on

    return trained_on(when, data_target, CommonsenseDataModule, "commonsense-format",
                      "set evaluate_commonsense.when=always to score it anyway")


def format_report(metrics: dict[str, Any]) -> str:
    """Model accuracy next to the majority-answer baseline, mean over benchmarks and per benchmark."""
    from ..commonsense import BENCHMARKS

    n = metrics.get("test/commonsense_n")
    lines = [f"commonsense test accuracy ({n} questions; extraction of LLM-Adapters' commonsense_evaluate.py)",
             f"  {'':<14}{'model':>8}{'majority':>10}"]
    for label, key in [("mean", "test/commonsense")] + [(b, f"test/commonsense_{b}") for b in BENCHMARKS]:
        if f"{key}_accuracy" in metrics:
            lines.append(f"  {label:<14}{metrics[f'{key}_accuracy']:>8.4f}{metrics[f'{key}_majority_baseline']:>10.4f}")
    return "\n".join(lines)
