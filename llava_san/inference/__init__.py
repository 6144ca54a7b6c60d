"""Using a trained model: loading any model folder (:mod:`.loading`) and answering conversations
(:mod:`.assistant`; a text-only causal LM: :mod:`.causal_lm`); ``python -m llava_san.chat``,
``llava_san.predict`` and ``llava_san.serve`` are built on :class:`Assistant`."""
from .assistant import Assistant, PromptSettings, PromptTooLong, Turn, prompt_settings, text_pieces
from .causal_lm import CausalLmAssistant
from .loading import LoadedModel, describe_path, load_model

__all__ = ["Assistant", "CausalLmAssistant", "LoadedModel", "PromptSettings", "PromptTooLong", "Turn", "describe_path",
           "load_model", "prompt_settings", "text_pieces"]
