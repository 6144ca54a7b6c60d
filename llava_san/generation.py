"""Batched greedy generation for LLaVA models, with left padding: the one generator of the project.

``python -m evaluation`` (:func:`evaluation.generate.generate_answers`) and the easy-vqa check at the
end of training (:mod:`llava_san.training.easyvqa_eval`) both answer through :func:`answer_questions`:
batches of questions, their images prepared in threads ahead of the batch being generated, each batch
greedy-decoded by :func:`generate_batch`.

What it reproduces: LLaVA-1.5's evaluation scripts (``model_vqa_loader``, ``model_vqa_science``,
``model_vqa_mmbench``) call ``model.generate(do_sample=False, temperature=0, num_beams=1,
max_new_tokens=N, use_cache=True)`` one question at a time and keep
``tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()``. Here ``B`` questions share each
forward pass; the answer of every question is the same as with ``B = 1``:

* **left padding**: prompts are right-aligned so every row's next token is predicted at the last
  column ``(B, T)``; padded columns get ``attention_mask = 0``, so no real token attends to them;
* **position ids** are counted from each row's first real token (``cumsum(mask) - 1``), so a row
  sees the same rotary positions as alone; decode steps continue at ``last + 1`` per row;
* **greedy** = ``argmax`` of the last logits (first index on ties, as ``generate``); a row stops at
  ``eos_token_id`` (``</s>``) or at its own ``max_new_tokens``; the batch stops when every row has;
  finished rows are fed ``pad_token_id`` (masked out) until then;
* the image of a row: its ``<image>`` placeholder is already expanded to the model's image tokens in
  ``input_ids`` (training's own tokenization, :class:`PromptEncoder`), and ``pixel_values`` of the
  batch are the rows' images in row order, so LLaVA scatters each image into its own row. Rows
  without an image (text-only ScienceQA questions) mix freely with image rows.

Exactness: with the model in ``eval()`` every row is computed independently (SAN reads its stored γ̄
in eval mode; dropout is off). Padding changes only the *shapes* of the matrix products, so the
logits of a row may differ from the ``B = 1`` logits in the last float bits (different BLAS
blocking); a different argmax needs two logits tied within ~1e-6, which the tests check does not
happen on the tiny model (fp32, eager and SDPA attention). A model loaded in bf16/fp16 carries the
same caveat as any batched inference: near-ties may resolve differently than at ``B = 1``.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch

__all__ = [
    "GenerationInput",
    "PromptEncoder",
    "answer_questions",
    "decode",
    "generate",
    "generate_batch",
    "greedy_steps",
    "model_device_dtype",
    "stream_tokens",
]


@dataclass(frozen=True)
class GenerationInput:
    """One prompt, ready for the model.

    Attributes:
        input_ids: prompt token ids, ``<image>`` already expanded to the model's image tokens.
        pixel_values: ``(3, H, W)`` (one image) or ``(k, 3, H, W)``; ``None`` for a text-only prompt.
        max_new_tokens: greedy tokens at most (the stop token not counted).
    """

    input_ids: Sequence[int]
    pixel_values: Optional[torch.Tensor] = None
    max_new_tokens: int = 128

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0:
            raise ValueError("GenerationInput.input_ids is empty")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"GenerationInput.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def images(self) -> list[torch.Tensor]:
        """The prompt's images as ``(3, H, W)`` tensors (empty for text only)."""
        if self.pixel_values is None:
            return []
        pv = self.pixel_values
        return [pv] if pv.dim() == 3 else list(pv)


class PromptEncoder:
    """A user message (+ image) -> :class:`GenerationInput`, with the code that prepares training data.

    The message (``"<image>\\n" + question`` for an image question, as LLaVA puts the image first) is
    rendered with the conversation template (``vicuna_v1``: LLaVA's ``conv.get_prompt()`` ending in
    ``"ASSISTANT:"``), tokenized by :class:`llava_san.data.tokenize.PieceEncoder` (``tokenization="llava"``
    reproduces LLaVA's ``tokenizer_image_token``) with ``<image>`` expanded to
    :func:`~llava_san.data.tokenize.image_token_count` tokens, and the image is padded to a square
    with the CLIP mean colour and CLIP-processed by :func:`llava_san.data.images.process_image`
    (``image_aspect_ratio="pad"``, LLaVA-1.5's setting).

    Args:
        processor: the model's ``LlavaProcessor`` (tokenizer + CLIP image processor).
        template: conversation template name.
        tokenization: ``"llava"`` (default, as the training data) or ``"processor"``.
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5) or ``"crop"``.
    """

    def __init__(self, processor: Any, template: str = "vicuna_v1", tokenization: str = "llava",
                 image_aspect_ratio: str = "pad") -> None:
        from .conversation import get_template
        from .data.images import background_color
        from .data.tokenize import PieceEncoder, image_token_count

        if image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {image_aspect_ratio!r}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = get_template(template)
        self.image_token_id = int(processor.image_token_id)
        self.image_tokens = image_token_count(processor)
        self.encoder = PieceEncoder(self.tokenizer, self.image_token_id, self.image_tokens, tokenization)
        self.image_aspect_ratio = image_aspect_ratio
        self.fill = background_color(processor.image_processor.image_mean)

    def render(self, message: str) -> str:
        """The full prompt text: the template around one user turn, ending with the assistant role."""
        return self.template.render_prompt(message)

    def encode_text(self, message: str) -> list[int]:
        """Token ids of :meth:`render` ``(message)`` with every ``<image>`` expanded."""
        from .data.tokenize import prompt_pieces

        return self.encoder.encode(prompt_pieces(self.render(message))).input_ids

    def pixel_values(self, image: Any) -> torch.Tensor:
        """``(3, H, W)`` float32 tensor of an RGB PIL image (pad to square, CLIP processor)."""
        from .data.images import process_image

        return process_image(image, self.processor.image_processor, self.image_aspect_ratio, self.fill)

    def __call__(self, message: str, image: Any = None, max_new_tokens: int = 128) -> GenerationInput:
        """Encode one prompt. The number of ``<image>`` placeholders in ``message`` must equal the
        number of images given (0 or 1), else ``ValueError``."""
        from .conversation import IMAGE_PLACEHOLDER

        n_placeholders = message.count(IMAGE_PLACEHOLDER)
        n_images = 0 if image is None else 1
        if n_placeholders != n_images:
            raise ValueError(f"the message has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                             f"{n_images} image(s) were given: {message[:80]!r}")
        pv = self.pixel_values(image) if image is not None else None
        return GenerationInput(self.encode_text(message), pv, int(max_new_tokens))


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's inputs go: the device of its first parameter and its floating dtype."""
    param = next(model.parameters())
    dtype = getattr(model, "dtype", None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        dtype = param.dtype
    return param.device, dtype


def generate_batch(model: torch.nn.Module, inputs: Sequence[GenerationInput], *, pad_token_id: int,
                   eos_token_id: Optional[int | Sequence[int]]) -> list[list[int]]:
    """Greedy-decode one batch of prompts together; returns the new token ids of each prompt, the
    stop token excluded. The model must be in ``eval()`` mode (a model in train mode raises: dropout
    and SAN's batch statistics would make answers depend on the batch).
    """
    if not inputs:
        return []
    steps = list(greedy_steps(model, inputs, pad_token_id=pad_token_id, eos_token_id=eos_token_id))
    if not steps:
        return [[] for _ in inputs]
    tokens = torch.stack(steps, dim=1)  # (B, steps), -1 = nothing
    return [[int(v) for v in row if v >= 0] for row in tokens]


def stream_tokens(model: torch.nn.Module, prompt: GenerationInput, *, pad_token_id: int,
                  eos_token_id: Optional[int | Sequence[int]]) -> Iterator[int]:
    """The new token ids of one prompt as they are decoded (greedy; the stop token excluded): the
    same tokens as ``generate_batch(model, [prompt], ...)[0]``, one at a time (chat and the API
    stream them)."""
    for step in greedy_steps(model, [prompt], pad_token_id=pad_token_id, eos_token_id=eos_token_id):
        if int(step[0]) >= 0:
            yield int(step[0])


@torch.no_grad()
def greedy_steps(model: torch.nn.Module, inputs: Sequence[GenerationInput], *, pad_token_id: int,
                 eos_token_id: Optional[int | Sequence[int]]) -> Iterator[torch.Tensor]:
    """The greedy decode loop: yields, after each step, the ``(B,)`` CPU tensor of the token each row
    produced (``-1`` where the row has stopped or just produced its stop token).

    Shapes: ``input_ids``/``attention_mask``/``position_ids`` ``(B, T)`` left-padded;
    ``pixel_values`` ``(N_img, 3, H, W)``; each decode step feeds ``(B, 1)``.
    """
    if model.training:
        raise ValueError("generate_batch needs the model in eval() mode (call model.eval() first)")
    if not inputs:
        return
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: the tokenizer needs a pad token for batched generation")
    stops = [] if eos_token_id is None else (
        [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id])
    device, dtype = model_device_dtype(model)
    b = len(inputs)
    lengths = [len(x.input_ids) for x in inputs]
    t = max(lengths)
    input_ids = torch.full((b, t), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    for row, (x, n) in enumerate(zip(inputs, lengths)):
        input_ids[row, t - n:] = torch.as_tensor(list(x.input_ids), dtype=torch.long)
        attention_mask[row, t - n:] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0.. from each row's first token
    images = [im for x in inputs for im in x.images()]
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["pixel_values"] = torch.stack(images).to(device=device, dtype=dtype)  # (N_img, 3, H, W)
    input_ids, attention_mask, position_ids = (v.to(device) for v in (input_ids, attention_mask,
                                                                       position_ids))

    limits = torch.tensor([int(x.max_new_tokens) for x in inputs], device=device)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device) if stops else None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **kwargs)
    for step in range(int(limits.max())):
        nxt = out.logits[:, -1, :].argmax(dim=-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, int(pad_token_id)), nxt)
        is_stop = torch.isin(nxt, stop_ids) if stop_ids is not None else torch.zeros_like(done)
        # a stop token is not kept; a token beyond the row's own limit is never produced
        yield torch.where(done | is_stop, torch.full_like(nxt, -1), nxt).cpu()
        done = done | is_stop | (limits <= step + 1)
        if bool(done.all()):
            break
        ones = torch.ones((b, 1), dtype=attention_mask.dtype, device=device)
        attention_mask = torch.cat([attention_mask, ones], dim=1)  # (B, T + step + 1)
        position_ids = position_ids[:, -1:] + 1  # (B, 1)
        out = model(input_ids=nxt[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    cache=out.cache, use_cache=True, logits_to_keep=1)


def decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """LLaVA's answer text: ``decode(ids, skip_special_tokens=True).strip()``."""
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


Q = TypeVar("Q")


def _prefetched(batches: Sequence[Sequence[Q]], prepare: Callable[[Q], Any], workers: int,
                depth: int = 2) -> Iterator[tuple[Sequence[Q], list[Any]]]:
    """``(batch, [prepare(q) for q in batch])`` in order; with ``workers > 0`` the next ``depth``
    batches are prepared in threads (image decoding + CLIP preprocessing) while one generates."""
    if workers <= 0:
        for b in batches:
            yield b, [prepare(q) for q in b]
        return
    ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval-prep")
    pending: deque = deque()
    it = iter(batches)

    def submit() -> None:
        b = next(it, None)
        if b is not None:
            pending.append((b, [ex.submit(prepare, q) for q in b]))

    try:
        for _ in range(depth):
            submit()
        while pending:
            b, futures = pending.popleft()
            submit()
            yield b, [f.result() for f in futures]
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _no_preparation(question: Any) -> None:
    return None


def answer_questions(model: torch.nn.Module, processor: Any, questions: Sequence[Q],
                     encode: Callable[[Q, Any], GenerationInput], *,
                     prepare: Callable[[Q], Any] = _no_preparation, batch_size: int = 16,
                     num_workers: int = 0,
                     on_batch: Optional[Callable[[Sequence[Q], list[str]], None]] = None) -> list[str]:
    """The batched answer loop: answer texts of ``questions`` in order.

    ``batch_size`` questions at a time: ``prepare(q)`` (image loading and preprocessing; run in
    ``num_workers`` threads, two batches ahead, when ``num_workers > 0``), then ``encode(q, prepared)``
    -> :class:`GenerationInput` in this thread (tokenizers are not shared across threads), then one
    :func:`generate_batch` and :func:`decode`; ``on_batch(batch, texts)`` runs after each batch (an
    answer file appends there). The model is put in ``eval()`` and restored to its mode afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok = processor.tokenizer
    batches = [questions[i:i + batch_size] for i in range(0, len(questions), batch_size)]
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for batch, prepared in _prefetched(batches, prepare, num_workers):
            inputs = [encode(q, x) for q, x in zip(batch, prepared)]
            new = generate_batch(model, inputs, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            batch_texts = [decode(tok, x) for x in new]
            if on_batch is not None:
                on_batch(batch, batch_texts)
            texts += batch_texts
    finally:
        model.train(was_training)
    return texts


def _as_input(x: GenerationInput, prepared: Any) -> GenerationInput:
    return x


def generate(model: torch.nn.Module, processor: Any, inputs: Sequence[GenerationInput], *,
             batch_size: int = 16) -> list[str]:
    """Answer texts of already encoded ``inputs`` in order (:func:`answer_questions`, ``batch_size``
    prompts per :func:`generate_batch` call). Puts the model in ``eval()`` for the call and restores
    its mode afterwards.
    """
    return answer_questions(model, processor, inputs, _as_input, batch_size=batch_size)
