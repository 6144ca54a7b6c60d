"""The model behind the server: one :class:`~llava_san.inference.Assistant`, one generation at a time.

The model and its tokenizer are not thread-safe, so every use of them (prompt encoding, image
preprocessing, the decode loop) runs on a single worker thread: requests queue in arrival order while
the event loop stays free for other requests (``GET /v1/models``, new requests queueing, streams being
sent). A client that goes away stops its generation at the next token (or before it starts).

The prompt is :meth:`Assistant.encode <llava_san.inference.Assistant.encode>`'s and the answer is
decoded by :func:`llava_san.generation.stream_tokens` and cut into text pieces by
:func:`llava_san.inference.assistant.text_pieces`, as :meth:`Assistant.stream
<llava_san.inference.Assistant.stream>` does, so the text equals ``Assistant.answer`` token for token;
the server counts the tokens as well (``usage``, ``finish_reason``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from .errors import APIError

__all__ = ["Engine", "Result"]

@dataclass(frozen=True)
class Result:
    """A finished answer: its text, the token counts and why it ended (``"stop"``: the model's
    end-of-answer token; ``"length"``: ``max_tokens`` reached)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


class _Cancelled(Exception):
    """The client went away before its generation started."""


class Engine:
    """Answers :class:`~llava_san.serve.requests.ChatRequest` turns with one model, one at a time.

    Args:
        assistant: the loaded model (:meth:`Assistant.load <llava_san.inference.Assistant.load>`).
        model_id: the id clients name (default: the assistant's).
        max_new_tokens_limit: the most new tokens one request may ask for.
    """

    def __init__(self, assistant: Any, *, model_id: Optional[str] = None,
                 max_new_tokens_limit: int = 1024) -> None:
        if max_new_tokens_limit < 1:
            raise ValueError(f"max_new_tokens_limit must be >= 1, got {max_new_tokens_limit}")
        self.assistant = assistant
        self.model_id = str(model_id or assistant.model_id)
        self.max_new_tokens_limit = int(max_new_tokens_limit)
        #: prompt + answer tokens at most (tokenizer model_max_length / max_position_embeddings), or None
        self.context_length: Optional[int] = assistant.context_length
        self.system_prompt = assistant.encoder.template.system
        assistant.model.eval()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-san-generate")

    def close(self) -> None:
        """Stop taking work; queued generations are dropped, a running one finishes."""
        self._worker.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ on the worker thread
    def _too_long(self, detail: str) -> APIError:
        return APIError(400, f"This model's maximum context length is {self.context_length} tokens. {detail}",
                        param="messages", code="context_length_exceeded")

    def _budget(self, prompt_tokens: int, max_tokens: Optional[int]) -> int:
        """The new-token limit of a request, or a 400 when prompt + answer do not fit the context."""
        if self.context_length is None:
            return max_tokens or self.max_new_tokens_limit
        room = self.context_length - prompt_tokens
        if max_tokens is None and room >= 1:
            return min(room, self.max_new_tokens_limit)
        wanted = max_tokens or 1
        if prompt_tokens + wanted > self.context_length:
            raise self._too_long(
                f"However, you requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, "
                f"the image included, and {wanted} in the completion). Please reduce the length of the "
                "messages or of max_completion_tokens.")
        return wanted

    def _generate(self, turns: Sequence[Any], image: Any, max_tokens: Optional[int],
                  cancelled: threading.Event, emit: Callable[[str, Any], None]) -> Result:
        """Encode, check the length, decode greedily; ``emit("start", prompt_tokens)`` then
        ``emit("text", piece)`` for each piece of the answer."""
        from ..generation import stream_tokens
        from ..inference.assistant import PromptTooLong, text_pieces

        if cancelled.is_set():
            raise _Cancelled()
        assistant = self.assistant
        try:
            prompt = assistant.encode(turns, image, 1)
        except PromptTooLong as err:  # the prompt alone fills the context
            raise self._too_long(str(err)[:1].upper() + str(err)[1:] + ".") from None
        n_prompt = len(prompt.input_ids)
        limit = self._budget(n_prompt, max_tokens)
        prompt = dataclasses.replace(prompt, max_new_tokens=limit)
        emit("start", n_prompt)
        tok = assistant.tokenizer
        ids: list[int] = []

        def tokens():  # the decoded ids, counted; a client that went away stops the loop
            for token in stream_tokens(assistant.model, prompt, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id):
                ids.append(token)
                yield token
                if cancelled.is_set():
                    return

        pieces = []
        for piece in text_pieces(tok, tokens()):
            pieces.append(piece)
            emit("text", piece)
        final = "".join(pieces)
        return Result(final, n_prompt, len(ids), "length" if len(ids) >= limit else "stop")

    # ------------------------------------------------------------------ on the event loop
    async def stream(self, turns: Sequence[Any], image: Any = None,
                     max_tokens: Optional[int] = None) -> AsyncIterator[tuple[str, Any]]:
        """The events of one generation, in order: ``("start", prompt_tokens)``, ``("text", piece)``...,
        ``("end", Result)``. A refused request (too long) raises :class:`APIError` before ``start``.
        Closing the iterator early (the client went away) stops the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(kind: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is closed: the server is shutting down
                cancelled.set()

        def job() -> None:
            try:
                emit("end", self._generate(turns, image, max_tokens, cancelled, emit))
            except _Cancelled:
                pass
            except BaseException as err:  # noqa: BLE001 - handed to the request's coroutine
                emit("error", err)

        future = self._worker.submit(job)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "end":
                    return
        finally:
            cancelled.set()
            future.cancel()  # not started yet: never starts

    async def complete(self, turns: Sequence[Any], image: Any = None,
                       max_tokens: Optional[int] = None) -> Result:
        """The whole answer of one conversation (:meth:`stream`, collected)."""
        events = self.stream(turns, image, max_tokens)
        try:
            async for kind, value in events:
                if kind == "end":
                    return value
        finally:
            await events.aclose()
        raise RuntimeError("the generation ended without a result")
