"""The generation loop of ``python -m evaluation``: questions -> LLaVA answer lines in an answer file.

Prompts are exactly as LLaVA-1.5 builds them (:mod:`evaluation.tasks`), encoded by the training data
code (:class:`llava_san.generation.PromptEncoder`) and answered greedily in batches by the project's
one answer loop (:func:`llava_san.generation.answer_questions`, shared with the easy-vqa check at the
end of training). Each batch is appended to the crash-safe journal (:class:`evaluation.journal.AnswerFile`):
a restarted run answers only what is missing.

Answer lines: ``question_id, prompt, text, answer_id, model_id, metadata`` + benchmark extras, in
question order.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from evaluation.answers import canonical_id
from evaluation.journal import AnswerFile
from evaluation.tasks.base import EvalQuestion

__all__ = ["generate_answers", "question_image"]

log = logging.getLogger(__name__)


def question_image(q: EvalQuestion) -> Any:
    """The question's image as a PIL image (``None`` for a text-only question); a missing or broken
    file raises naming it."""
    if q.image is None:
        return None
    if callable(q.image):
        return q.load_image()  # MMBench: decoded from base64
    # imported here: the training image code pulls in torch, which checking inputs and scoring do not need
    from llava_san.data.images import load_image

    return load_image(os.fspath(q.image))  # clear error naming the file


def generate_answers(
    model: Any,
    processor: Any,
    questions: Sequence[EvalQuestion],
    answers_file: str | os.PathLike,
    *,
    model_id: str,
    batch_size: int = 16,
    max_new_tokens: Optional[int] = None,
    template: str = "vicuna_v1",
    tokenization: str = "llava",
    image_aspect_ratio: str = "pad",
    num_workers: int = 2,
    log_every_s: float = 30.0,
) -> dict[str, Any]:
    """Answer ``questions`` into ``answers_file``, skipping those already answered there (resume).

    Each question's user message is :meth:`EvalQuestion.model_prompt` (``<image>\\n`` + prompt),
    encoded by :class:`llava_san.generation.PromptEncoder` (training's template, tokenization and
    image preprocessing) and answered greedily, ``batch_size`` at a time, for at most the question's
    ``max_new_tokens`` (or ``max_new_tokens`` when given); ``num_workers`` threads prepare the images
    of the next batches. Progress (answered / total, resumed counted): a bar on a terminal stderr, else a
    log line every ``log_every_s`` s (:class:`~llava_san.training.progress.AnswerProgress`). Returns counts.
    """
    # imported here: torch, which checking inputs and scoring do not need
    from llava_san.generation import GenerationInput, PromptEncoder, answer_questions
    from llava_san.training.progress import AnswerProgress

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder = PromptEncoder(processor, template, tokenization, image_aspect_ratio)
    ids = [canonical_id(q.question_id) for q in questions]
    t0 = time.perf_counter()
    with AnswerFile(answers_file, ids, model_id) as out:
        todo = [q for q, i in zip(questions, ids) if i not in out.done]
        resumed = len(questions) - len(todo)
        if resumed:
            log.info("%s: %d/%d questions already answered; resuming", answers_file, resumed, len(questions))
        def pixels(q: EvalQuestion) -> Any:  # in the prefetch threads (the tokenizer stays in this thread)
            image = question_image(q)
            return None if image is None else encoder.pixel_values(image)

        def encode(q: EvalQuestion, pv: Any) -> GenerationInput:
            message = q.model_prompt()
            if message.count("<image>") != (pv is not None):
                raise ValueError(f"question {q.question_id!r}: {message.count('<image>')} <image> "
                                 f"placeholder(s) for {int(pv is not None)} image(s) in {message[:80]!r}")
            return GenerationInput(encoder.encode_text(message), pv, max_new_tokens or q.max_new_tokens)

        def journal(batch: Sequence[EvalQuestion], texts: list[str]) -> None:
            out.append([q.answer_record(t, answer_id=uuid.uuid4().hex, model_id=model_id, metadata={})
                        for q, t in zip(batch, texts)])
            progress.add(len(batch))

        with AnswerProgress(Path(answers_file).name, len(questions), resumed, log_every_s) as progress:
            answer_questions(model, processor, todo, encode, prepare=pixels, batch_size=batch_size,
                             num_workers=num_workers, on_batch=journal)
    dt, n_done = time.perf_counter() - t0, progress.done
    return {"questions": len(questions), "resumed": resumed, "generated": n_done, "seconds": dt,
            "questions_per_s": n_done / dt if n_done and dt > 0 else None}
