"""easy-vqa test accuracy at the end of ``python -m train``, next to two image-blind baselines.

The questions are the test file that the data pipeline writes (:func:`llava_san.data.easyvqa.prepare_easyvqa`:
``test_questions.jsonl`` + ``test_answers.json``), asked exactly as the training data asks them:

* message ``"<image>\\n" + text`` (LLaVA's ``model_vqa``; ``text`` = question + the short-answer
  prompt, so the message is the human turn of the training records verbatim);
* rendered by the same conversation template (``get_template(template).render_prompt``), tokenized by
  the training tokenizer code and image-processed by the training image code
  (:class:`llava_san.generation.PromptEncoder`, same ``tokenization`` and ``image_aspect_ratio`` as
  ``conf/data``): the prompt ids are the training sample's ids up to its answer;
* answered greedily in batches with left padding by the answer loop of ``python -m evaluation``
  (:func:`llava_san.generation.answer_questions`);
* scored by the easy-vqa scorer of ``python -m evaluation`` (:mod:`llava_san.easyvqa_score`:
  normalised exact match), overall and per question type (``colour``, ``shape``, ``yes-no``).

Baselines, scored the same way on the same questions: *majority* (always the most frequent training
answer, ~0.37) and *blind* (per question text, its most frequent training answer, ~0.67 -- it needs
no image). A model that uses the image must beat the blind baseline clearly.

Metrics (fractions): ``test/easyvqa_accuracy``, ``test/easyvqa_blind_baseline``,
``test/easyvqa_majority_baseline``, per type ``test/easyvqa_<type>_{accuracy,blind_baseline,
majority_baseline}`` (type ``colour``, ``shape``, ``yes_no``), ``test/easyvqa_n``, ``time/eval_s``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

import torch

from ..conversation import IMAGE_PLACEHOLDER
from ..data.images import load_image
from ..easyvqa_score import accuracy_by_type
from ..generation import GenerationInput, PromptEncoder, answer_questions
from .progress import AnswerProgress

TYPES = ("colour", "shape", "yes-no")


def _key(question_type: str) -> str:
    return question_type.replace("-", "_")


def _scores(predictions: dict[str, str], truth: dict[str, dict]) -> tuple[float, dict[str, float]]:
    """(accuracy, accuracy per question type) of ``{question_id: text}`` with the project's scorer."""
    return accuracy_by_type((text, truth[qid]["answer"], truth[qid].get("question_type") or "all")
                            for qid, text in predictions.items())


def blind_predictions(questions: dict[str, str], answer_map: Optional[dict[str, str]] = None
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """(majority, blind) predictions ``{question_id: answer}`` for test ``{question_id: question text}``,
    from the easy-vqa training answers, renamed by ``answer_map`` (:mod:`llava_san.data.easyvqa`
    helpers; ties: alphabetical)."""
    from easy_vqa import get_train_questions

    from ..data.easyvqa import majority_answer, per_question_answers

    train_q, train_a, _ = get_train_questions()
    if answer_map:
        train_a = [answer_map.get(a, a) for a in train_a]
    majority = majority_answer(train_a)
    per_question = per_question_answers(train_q, train_a)
    return ({qid: majority for qid in questions},
            {qid: per_question.get(q, majority) for qid, q in questions.items()})


class EasyVqaEvaluator:
    """Callable ``(model, processor) -> metrics``; see the module docstring.

    Args:
        cache_dir: the easy-vqa cache of the data pipeline (``conf/data/easyvqa.yaml: cache_dir``); the
            files are written there if missing.
        template: conversation template of the training data.
        tokenization: ``llava`` | ``processor``, as the training data (``data.tokenization``).
        image_aspect_ratio: ``pad`` | ``crop``, as the training data.
        batch_size: questions per batched greedy generation.
        max_new_tokens: greedy tokens per answer (answers are one word, then ``</s>``).
        limit: the first ``limit`` test questions in file order (``None``: all 9,673).
        question_types: ask only the test questions of these types (``None``: all), e.g. ``[colour]``
            in the SAN study's pretrained regime; ``limit`` then counts within them.
        answer_map: the training data's answer renaming (``conf/data: answer_map``): the expected
            answers and the baselines are renamed the same way.
        log_every_s: seconds between progress log lines when stderr is not a terminal (on a terminal:
            a progress bar; :class:`~llava_san.training.progress.AnswerProgress`).
    """

    def __init__(self, cache_dir: str = ".cache/easyvqa", template: str = "vicuna_v1",
                 tokenization: str = "llava", image_aspect_ratio: str = "pad", batch_size: int = 128,
                 max_new_tokens: int = 4, limit: Optional[int] = None,
                 question_types: Optional[list[str]] = None, answer_map: Optional[dict] = None,
                 log_every_s: float = 30.0) -> None:
        from ..data.easyvqa import check_answer_map, check_question_types

        if int(batch_size) < 1 or int(max_new_tokens) < 1:
            raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, "
                             f"{max_new_tokens}")
        if limit is not None and int(limit) < 1:
            raise ValueError(f"limit must be >= 1 or null, got {limit}")
        self.cache_dir, self.template, self.tokenization = cache_dir, template, tokenization
        self.image_aspect_ratio = image_aspect_ratio
        self.batch_size, self.max_new_tokens = int(batch_size), int(max_new_tokens)
        self.limit = None if limit is None else int(limit)
        self.question_types = check_question_types(question_types)
        self.answer_map = check_answer_map(answer_map)
        self.log_every_s = float(log_every_s)

    def questions(self) -> tuple[list[dict], dict[str, dict], str]:
        """(question rows, ground truth by question id, image folder) of the evaluated test questions."""
        from ..data.easyvqa import prepare_easyvqa

        paths = prepare_easyvqa(self.cache_dir)
        with open(paths.test_questions, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if self.question_types is not None:
            rows = [r for r in rows if r["category"] in self.question_types]
        with open(paths.test_answers, encoding="utf-8") as f:
            truth = json.load(f)
        if self.answer_map:
            truth = {q: dict(t, answer=self.answer_map.get(t["answer"], t["answer"])) for q, t in truth.items()}
        return (rows[: self.limit] if self.limit else rows), truth, paths.image_folder

    @staticmethod
    def message(row: dict) -> str:
        """The human turn of a test question: ``"<image>\\n" + text`` (LLaVA's ``model_vqa``)."""
        return IMAGE_PLACEHOLDER + "\n" + row["text"]

    def encoding(self, processor: Any, image_folder: str) -> tuple[Callable[[dict], torch.Tensor],
                                                                   Callable[[dict, torch.Tensor], GenerationInput]]:
        """``(prepare, encode)`` of a question row for :func:`~llava_san.generation.answer_questions`:
        pixel values per image file and token ids per message, each computed once (the caches are not
        locked: prepare in the calling thread)."""
        encoder = PromptEncoder(processor, self.template, self.tokenization, self.image_aspect_ratio)
        ids: dict[str, list[int]] = {}
        pixels: dict[str, torch.Tensor] = {}

        def prepare(row: dict) -> torch.Tensor:
            if row["image"] not in pixels:
                pixels[row["image"]] = encoder.pixel_values(load_image(os.path.join(image_folder, row["image"])))
            return pixels[row["image"]]

        def encode(row: dict, pv: torch.Tensor) -> GenerationInput:
            msg = self.message(row)
            if msg not in ids:
                ids[msg] = encoder.encode_text(msg)
            return GenerationInput(ids[msg], pv, self.max_new_tokens)

        return prepare, encode

    def inputs(self, processor: Any, rows: list[dict], image_folder: str) -> list[GenerationInput]:
        """:class:`~llava_san.generation.GenerationInput` per row, as :meth:`__call__` encodes them."""
        prepare, encode = self.encoding(processor, image_folder)
        return [encode(row, prepare(row)) for row in rows]

    def __call__(self, model: Any, processor: Any) -> dict[str, float]:
        """Answer the test questions with ``model`` (restored to its mode afterwards) and score them."""
        t0 = time.perf_counter()
        rows, truth, image_folder = self.questions()
        prepare, encode = self.encoding(processor, image_folder)
        with AnswerProgress("easy-vqa test", len(rows), every_s=self.log_every_s) as progress:
            texts = answer_questions(model, processor, rows, encode, prepare=prepare, batch_size=self.batch_size,
                                     on_batch=lambda batch, _: progress.add(len(batch)))
        qids = [str(r["question_id"]) for r in rows]
        acc, by_type = _scores(dict(zip(qids, texts)), truth)
        majority, blind = blind_predictions({q: truth[q]["question"] for q in qids}, self.answer_map)
        metrics: dict[str, float] = {"test/easyvqa_accuracy": acc, "test/easyvqa_n": len(rows)}
        for name, preds in (("majority_baseline", majority), ("blind_baseline", blind)):
            b_acc, b_types = _scores(preds, truth)
            metrics[f"test/easyvqa_{name}"] = b_acc
            metrics.update({f"test/easyvqa_{_key(t)}_{name}": v for t, v in b_types.items()})
        metrics.update({f"test/easyvqa_{_key(t)}_accuracy": v for t, v in by_type.items()})
        metrics["time/eval_s"] = time.perf_counter() - t0
        return metrics


#: ``evaluate.when`` values: ``auto`` scores easy-vqa only after training on easy-vqa, ``always`` after any data
def should_evaluate(when: str, data_target: Optional[str]) -> tuple[bool, str]:
    """``(score easy-vqa?, why)``: ``when="auto"`` only when the training data is easy-vqa
    (:class:`~llava_san.data.easyvqa.EasyVQADataModule` or a subclass); ``"always"``: whatever the data."""
    from ..data.easyvqa import EasyVQADataModule
    from .when import trained_on

    return trained_on(when, data_target, EasyVQADataModule, "easy-vqa",
                      "set evaluate.when=always to score easy-vqa anyway, or evaluate the run with "
                      "`python -m evaluation path=<run folder>`")


def format_report(metrics: dict[str, Any]) -> str:
    """The easy-vqa table: model accuracy next to the blind and majority baselines, overall and per type."""
    n = metrics.get("test/easyvqa_n")
    lines = [f"easy-vqa test accuracy ({n} questions)", f"  {'':<10}{'model':>8}{'blind':>8}{'majority':>10}"]
    for label, key in [("overall", "test/easyvqa")] + [(t, f"test/easyvqa_{_key(t)}") for t in TYPES]:
        if f"{key}_accuracy" not in metrics:
            continue
        lines.append(f"  {label:<10}{metrics[f'{key}_accuracy']:>8.4f}"
                     f"{metrics[f'{key}_blind_baseline']:>8.4f}{metrics[f'{key}_majority_baseline']:>10.4f}")
    return "\n".join(lines)
