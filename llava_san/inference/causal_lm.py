"""The :class:`~llava_san.inference.Assistant` of a text-only causal LM (the LLaMA commonsense path).

A LLaMA model trained with ``experiment=llama*`` or ``csr_tiny`` learned LLM-Adapters' single-turn
Alpaca prompt (:func:`llava_san.commonsense.generate_prompt`), so a message is asked exactly as the
evaluation asks a test question: the prompt of the latest user message alone, BOS first
(:func:`llava_san.commonsense.encode_prompt`), answered greedily by the project's generator (the
evaluation's official decoding is a 4-beam search; chat, predict and the API stream greedy tokens).
Earlier turns of a conversation are not part of the prompt: the model never saw a multi-turn one.
Images are refused with a message saying the model reads text only.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Optional, Sequence

from .assistant import ASSISTANT, USER, Assistant, PromptSettings, Turn
from .loading import LoadedModel

__all__ = ["CausalLmAssistant", "ALPACA"]

#: the prompt-settings name of LLM-Adapters' Alpaca prompt
ALPACA = "alpaca"


class CausalLmAssistant(Assistant):
    """Answers with a causal LM and LLM-Adapters' prompt (see the module docstring)."""

    def __init__(self, loaded: LoadedModel, settings: Optional[PromptSettings] = None) -> None:
        self.loaded = loaded
        self.settings = PromptSettings(ALPACA, "processor", "pad")
        self.model = loaded.model
        self.tokenizer = loaded.processor  # load_model gives a causal LM's tokenizer as its processor
        self.processor = SimpleNamespace(tokenizer=self.tokenizer)  # what the batched generator reads
        self.encoder = None
        self.model_id = loaded.model_id

    def render(self, turns: Sequence[Turn], has_image: bool) -> str:
        """The Alpaca prompt of the latest user message (earlier turns are checked, not used)."""
        from ..commonsense import generate_prompt

        if has_image:
            raise ValueError("this model is a text-only causal LM (LLaMA): it takes no image; ask without one")
        if not turns or turns[-1].role != USER:
            raise ValueError("a conversation must end with a user message")
        for i, turn in enumerate(turns):
            expected = USER if i % 2 == 0 else ASSISTANT
            if turn.role != expected:
                raise ValueError(f"message {i} has role {turn.role!r}; roles must alternate user, assistant, "
                                 "... starting with user")
        return generate_prompt(turns[-1].text)

    def _prompt_ids(self, turns: Sequence[Turn], has_image: bool) -> list[int]:
        from ..commonsense import encode_prompt

        self.render(turns, has_image)  # the checks
        return encode_prompt(self.tokenizer, turns[-1].text)

    def encode(self, turns: Sequence[Turn], image: Any = None, max_new_tokens: int = 512):
        ids = self._prompt_ids(turns, image is not None)
        return self._generation_input(ids, None, max_new_tokens)

    def answer_many(self, questions: Sequence[tuple[str, Any]], *, max_new_tokens: int = 128,
                    batch_size: int = 16, num_workers: int = 0, on_batch=None) -> list[str]:
        """Answers of single-turn ``(question, None)`` pairs, batched; a question with an image is refused
        before anything is generated."""
        from ..generation import answer_questions

        for i, (_, image) in enumerate(questions):
            if image is not None:
                raise ValueError(f"question {i} has an image, but this model is a text-only causal LM (LLaMA)")

        def encode(q: tuple[str, Any], _: Any):
            return self._generation_input(self._prompt_ids([Turn(USER, q[0])], False), None, max_new_tokens)

        return answer_questions(self.model, self.processor, list(questions), encode, batch_size=batch_size,
                                num_workers=0, on_batch=on_batch)
