"""The generation loop of ``python -m evaluation``: questions -> LLaVA answer lines in an answer file.

Prompts are exactly as LLaVA-1.5 builds them (:mod:`evaluation.tasks`), encoded by the training data
code (:class:`llava_san.generation.PromptEncoder`) and answered greedily in batches by the project's
one answer loop (:func:`llava_san.generation.answer_questions`, shared with the easy-vqa check at the
end of training). Each batch is appended to the crash-safe journal (:class:`evaluation.journal.AnswerFile`):
a restarted run answers only what is missing.

A benchmark with ``prompt_format="text"`` (the commonsense benchmarks, for causal LMs) sends its prompt
as the whole model input, tokenized with the tokenizer's special tokens; with ``num_beams > 1`` its
batches are decoded by :func:`llava_san.commonsense.beam.beam_generate` (LLM-Adapters' beam search);
``postprocess`` turns the decoded text into the answer (LLM-Adapters keeps the text after the last
``### Response:``).

Answer lines: ``question_id, prompt, text, answer_id, model_id, metadata`` + benchmark extras, in
question order.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

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


def _text_encoder(processor: Any) -> Callable[[str], list[int]]:
    """``prompt -> ids`` for a ``text`` benchmark: the tokenizer's own call, special tokens included
    (BOS for LLaMA), as LLM-Adapters' ``tokenizer(prompts, ...)``."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return lambda prompt: list(tokenizer(prompt)["input_ids"])


def _beam_loop(model: Any, processor: Any, questions: Sequence[EvalQuestion], encode: Callable, *,
               num_beams: int, batch_size: int, on_batch: Callable) -> None:
    """Answer ``questions`` by beam search, ``batch_size`` at a time (text-only prompts)."""
    from llava_san.commonsense.beam import beam_generate
    from llava_san.generation import decode

    tok = getattr(processor, "tokenizer", processor)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(questions), batch_size):
            batch = questions[i:i + batch_size]
            new = beam_generate(model, [encode(q, None) for q in batch], num_beams=num_beams,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            on_batch(batch, [decode(tok, x) for x in new])
    finally:
        model.train(was_training)


def _question_encoder(encode_text: Callable[[str], list[int]], text: bool,
                      max_new_tokens: Optional[int]) -> Callable[[EvalQuestion, Any], Any]:
    """``(question, pixel values) -> GenerationInput``: the user message (``text``: the prompt as is)
    encoded, the image count checked against the ``<image>`` placeholders."""
    from llava_san.generation import GenerationInput

    def encode(q: EvalQuestion, pv: Any) -> GenerationInput:
        message = q.prompt if text else q.model_prompt()
        if (text and q.has_image) or (not text and message.count("<image>") != (pv is not None)):
            raise ValueError(f"question {q.question_id!r}: {message.count('<image>')} <image> "
                             f"placeholder(s) for {int(q.has_image)} image(s) in {message[:80]!r}")
        return GenerationInput(encode_text(message), pv, max_new_tokens or q.max_new_tokens)

    return encode


def _encoders(processor: Any, text: bool, template: str, tokenization: str,
              image_aspect_ratio: str) -> tuple[Any, Callable[[str], list[int]]]:
    """``(PromptEncoder or None, message -> ids)`` for a ``conversation`` or ``text`` benchmark."""
    if text:
        return None, _text_encoder(processor)
    from llava_san.generation import PromptEncoder

    encoder = PromptEncoder(processor, template, tokenization, image_aspect_ratio)
    return encoder, encoder.encode_text


def _answer(model: Any, processor: Any, todo: Sequence[EvalQuestion], encode: Callable, *,
            prepare: Optional[Callable], num_beams: int, batch_size: int, num_workers: int,
            on_batch: Callable) -> None:
    """Greedy through the project's answer loop (``num_beams=1``), else beam search (text only).
    ``prepare=None``: nothing to prepare ahead (text-only prompts)."""
    if num_beams > 1:
        _beam_loop(model, processor, todo, encode, num_beams=num_beams, batch_size=batch_size,
                   on_batch=on_batch)
        return
    from types import SimpleNamespace

    from llava_san.generation import answer_questions

    proc = processor if hasattr(processor, "tokenizer") else SimpleNamespace(tokenizer=processor)
    if prepare is None:
        answer_questions(model, proc, todo, encode, batch_size=batch_size, on_batch=on_batch)
    else:
        answer_questions(model, proc, todo, encode, prepare=prepare, batch_size=batch_size,
                         num_workers=num_workers, on_batch=on_batch)


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
    prompt_format: str = "conversation",
    num_beams: int = 1,
    postprocess: Optional[Callable[[str], str]] = None,
) -> dict[str, Any]:
    """Answer ``questions`` into ``answers_file``, skipping those already answered there (resume).

    ``prompt_format="conversation"``: each question's user message is :meth:`EvalQuestion.model_prompt`
    (``<image>\\n`` + prompt), encoded by :class:`llava_san.generation.PromptEncoder` (training's
    template, tokenization and image preprocessing); ``"text"``: the prompt is tokenized as is
    (:func:`_text_encoder`; ``processor`` may be a plain tokenizer). Answered greedily (``num_beams=1``,
    the project's answer loop) or by beam search, ``batch_size`` at a time, for at most the question's
    ``max_new_tokens`` (or ``max_new_tokens`` when given); ``postprocess`` maps each decoded text to
    the answer written; ``num_workers`` threads prepare the next batches' images. Progress: a bar on a
    terminal, else a log line every ``log_every_s`` s (:class:`~llava_san.training.progress.AnswerProgress`).
    """
    # imported here: torch, which checking inputs and scoring do not need
    from llava_san.training.progress import AnswerProgress

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    text = prompt_format == "text"
    encoder, encode_text = _encoders(processor, text, template, tokenization, image_aspect_ratio)
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

        def journal(batch: Sequence[EvalQuestion], texts: list[str]) -> None:
            texts = [postprocess(t) for t in texts] if postprocess is not None else texts
            out.append([q.answer_record(t, answer_id=uuid.uuid4().hex, model_id=model_id, metadata={})
                        for q, t in zip(batch, texts)])
            progress.add(len(batch))

        with AnswerProgress(Path(answers_file).name, len(questions), resumed, log_every_s) as progress:
            encode = _question_encoder(encode_text, text, max_new_tokens)
            _answer(model, processor, todo, encode, prepare=None if text else pixels, num_beams=num_beams,
                    batch_size=batch_size, num_workers=num_workers, on_batch=journal)
    dt, n_done = time.perf_counter() - t0, progress.done
    return {"questions": len(questions), "resumed": resumed, "generated": n_done, "seconds": dt,
            "questions_per_s": n_done / dt if n_done and dt > 0 else None}
