"""easy-vqa evaluation at the end of ``python -m train``: greedy answers, accuracy, and two baselines.

* accuracy: the first word of the greedy answer (``max_new_tokens`` tokens, batched, left padding)
  equals the ground truth; overall and per question type (``shape``, ``color``, ``yes/no``, read off
  the answer vocabulary).
* majority baseline: always the most frequent training answer (~0.37 on the test set).
* blind baseline: for each question text, the most frequent training answer to that same text; it
  needs no image (~0.67). A model must beat it clearly to show it uses the image.

Metrics (fractions): ``test/easyvqa_accuracy``, ``test/easyvqa_<type>_accuracy``,
``test/easyvqa_blind_baseline``, ``test/easyvqa_majority_baseline``, ``test/easyvqa_n``.
"""
from __future__ import annotations

import collections
import re
import time
from typing import Any, Optional

import torch
from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
SHORT_ANSWER = "Answer the question using a single word or phrase."


def question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def baselines(limit: Optional[int] = None) -> tuple[dict[str, float], list[str], list[str]]:
    """(baseline metrics, majority-predictions, blind-predictions) on the first ``limit`` test questions."""
    from easy_vqa import get_test_questions, get_train_questions

    tq, ta, _ = get_train_questions()
    q, a, _ = get_test_questions()
    if limit:
        q, a = q[:limit], a[:limit]
    majority = collections.Counter(ta).most_common(1)[0][0]
    per_q: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for qq, aa in zip(tq, ta):
        per_q[qq][aa] += 1
    blind = [per_q[qq].most_common(1)[0][0] if qq in per_q else majority for qq in q]
    maj = [majority] * len(q)
    m = {
        "test/easyvqa_majority_baseline": sum(p == t for p, t in zip(maj, a)) / len(a),
        "test/easyvqa_blind_baseline": sum(p == t for p, t in zip(blind, a)) / len(a),
    }
    return m, maj, blind


def first_word(text: str) -> str:
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""


class EasyVqaEvaluator:
    """Callable ``(model, processor) -> metrics``; see the module docstring.

    Args:
        template: conversation template of :mod:`llava_san.conversation` (as the training data used).
        question_format: the human turn; ``{question}`` is replaced (LLaVA's short-answer prompt).
        batch_size: questions per generate call.
        max_new_tokens: greedy tokens per answer (answers are one word).
        limit: evaluate the first ``limit`` test questions only (``None``: all 9,673).
    """

    def __init__(self, template: str = "vicuna_v1", question_format: str = "<image>\n{question}\n" + SHORT_ANSWER,
                 batch_size: int = 256, max_new_tokens: int = 3, limit: Optional[int] = None) -> None:
        self.template, self.question_format = template, question_format
        self.batch_size, self.max_new_tokens, self.limit = int(batch_size), int(max_new_tokens), limit

    def prompt(self, question: str) -> str:
        from llava_san.conversation import get_template

        return get_template(self.template).render_prompt(self.question_format.format(question=question))

    @torch.no_grad()
    def predict(self, model: Any, processor: Any, questions: list[str], images: list[str]) -> list[str]:
        tok = processor.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        answers: list[str] = []
        try:
            for i in range(0, len(questions), self.batch_size):
                qs, ims = questions[i:i + self.batch_size], images[i:i + self.batch_size]
                pil = [Image.open(p).convert("RGB") for p in ims]
                inputs = processor(images=pil, text=[self.prompt(q) for q in qs], padding=True, return_tensors="pt")
                inputs = {k: v.to(device) for k, v in inputs.items()}
                out = model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                new = out[:, inputs["input_ids"].shape[1]:]
                answers += [first_word(t) for t in tok.batch_decode(new, skip_special_tokens=True)]
        finally:
            tok.padding_side = old_side
            model.train(was_training)
        return answers

    def __call__(self, model: Any, processor: Any) -> dict[str, float]:
        from easy_vqa import get_test_image_paths, get_test_questions

        t0 = time.perf_counter()
        q, a, ids = get_test_questions()
        if self.limit:
            q, a, ids = q[:self.limit], a[:self.limit], ids[:self.limit]
        paths = get_test_image_paths()
        preds = self.predict(model, processor, q, [paths[i] for i in ids])
        metrics, _, _ = baselines(self.limit)
        metrics["test/easyvqa_accuracy"] = sum(p == t for p, t in zip(preds, a)) / len(a)
        by_type: dict[str, list[bool]] = collections.defaultdict(list)
        for p, t in zip(preds, a):
            by_type[question_type(t)].append(p == t)
        for t, hits in sorted(by_type.items()):
            metrics[f"test/easyvqa_{t.replace('/', '_')}_accuracy"] = sum(hits) / len(hits)
        metrics["test/easyvqa_n"] = len(a)
        metrics["time/eval_s"] = time.perf_counter() - t0
        return metrics


def format_report(metrics: dict[str, float]) -> str:
    """A short human-readable table of the easy-vqa metrics."""
    rows = [(k.removeprefix("test/easyvqa_"), v) for k, v in sorted(metrics.items())
            if k.startswith("test/easyvqa_") and k != "test/easyvqa_n"]
    n = metrics.get("test/easyvqa_n")
    lines = [f"easy-vqa test ({n} questions):"] + [f"  {k:<24} {v:.4f}" for k, v in rows]
    return "\n".join(lines)
