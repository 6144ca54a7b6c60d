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
from typing import Any, Sequence

from .assistant import Assistant, PromptSettings, Turn, check_turns
from .loading import LoadedModel

__all__ = ["CausalLmAssistant", "ALPACA"]

#: the prompt-settings name of LLM-Adapters' Alpaca prompt
ALPACA = "alpaca"
_NO_IMAGE = "this model is a text-only causal LM (LLaMA): it takes no image; ask without one"


class CausalLmAssistant(Assistant):
    """Answers with a causal LM and LLM-Adapters' prompt (see the module docstring). The base class's
    ``encode``, ``stream`` and ``answer_many`` work unchanged: the prompt is made here, and an image is
    refused here before it would be read."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.settings = PromptSettings(ALPACA, "processor", "pad")
        self.model = loaded.model
        self.tokenizer = loaded.processor  # load_model gives a causal LM's tokenizer as its processor
        self.processor = SimpleNamespace(tokenizer=self.tokenizer)  # what the batched generator reads
        self.encoder = None
        self.model_id = loaded.model_id

    def _instruction(self, turns: Sequence[Turn], has_image: bool) -> str:
        """The latest user message, after the checks (earlier turns are checked, not used)."""
        if has_image:
            raise ValueError(_NO_IMAGE)
        check_turns(turns)
        return turns[-1].text

    def render(self, turns: Sequence[Turn], has_image: bool) -> str:
        """The Alpaca prompt of the latest user message."""
        from ..commonsense import generate_prompt

        return generate_prompt(self._instruction(turns, has_image))

    def _prompt_ids(self, turns: Sequence[Turn], has_image: bool) -> list[int]:
        from ..commonsense import encode_prompt

        return encode_prompt(self.tokenizer, self._instruction(turns, has_image))

    def answer_many(self, questions: Sequence[tuple[str, Any]], **kwargs: Any) -> list[str]:
        """:meth:`Assistant.answer_many` for ``(question, None)`` pairs; a question with an image is refused
        before anything is generated."""
        for i, (_, image) in enumerate(questions):
            if image is not None:
                raise ValueError(f"question {i}: {_NO_IMAGE}")
        return super().answer_many(questions, **kwargs)
