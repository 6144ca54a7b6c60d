"""A loaded model that answers conversations: the one inference object behind chat, predict and serve.

:class:`Assistant` holds a model in eval mode, its processor and the prompt settings training used
(conversation template, tokenization, image aspect ratio), and answers with the project's one greedy
generator (:mod:`llava_san.generation`), so its answers are token for token those of
``python -m evaluation`` and of the easy-vqa check at the end of training.

A conversation is a list of :class:`Turn` (``user``/``assistant``, alternating, starting with
``user``, ending with ``user``) plus at most one image, which LLaVA-1.5 places at the front of the
first user turn (``"<image>\\n" + text``), as its CLI and evaluation scripts do.

A prompt must fit the model's context (:attr:`Assistant.context_length`: the tokenizer's
``model_max_length`` and the language model's ``max_position_embeddings``): a longer one raises
:class:`PromptTooLong`, and an answer stops where the context is full.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

from .loading import LoadedModel, describe_path, load_model

__all__ = ["Assistant", "PromptSettings", "PromptTooLong", "Turn", "prompt_settings", "text_pieces"]

USER, ASSISTANT = "user", "assistant"
#: a SentencePiece byte-fallback token (one raw UTF-8 byte)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class PromptTooLong(ValueError):
    """A conversation does not fit the model's context; the message says by how much."""


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: ``role`` is ``"user"`` or ``"assistant"``."""

    role: str
    text: str


@dataclass(frozen=True)
class PromptSettings:
    """How prompts are built for a model: the settings of the data it was trained on."""

    template: str = "vicuna_v1"
    tokenization: str = "llava"
    image_aspect_ratio: str = "pad"


def _from_run(run: Path) -> PromptSettings:
    from omegaconf import OmegaConf

    from ..export import run_config_file

    data = OmegaConf.load(run_config_file(run)).get("data") or {}
    return PromptSettings(str(data.get("template", "vicuna_v1")), str(data.get("tokenization", "llava")),
                          str(data.get("image_aspect_ratio", "pad")))


def _image_processor_config(folder: Path) -> Optional[dict]:
    """The saved image processor settings: transformers 5 keeps them in ``processor_config.json``
    (``image_processor``), earlier exports and hub checkpoints in ``preprocessor_config.json``."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        file = folder / name
        if not file.is_file():
            continue
        try:
            cfg = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file} is not valid JSON ({err}); the checkpoint folder is damaged") from None
        cfg = cfg.get(key) if key and isinstance(cfg, dict) else cfg
        if isinstance(cfg, dict):
            return cfg
    return None


def _from_checkpoint(folder: Path) -> PromptSettings:
    """An exported folder: the template whose chat template it carries, pad or crop by its image
    processor (``do_pad``); a llava-hf checkpoint of other origin: LLaVA-1.5's template, and the
    aspect its image processor gives (a plain CLIP processor centre-crops)."""
    from ..chat_template import chat_template
    from ..conversation import TEMPLATES

    template = "vicuna_v1"
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        text = jinja.read_text()
        template = next((name for name in TEMPLATES if chat_template(name) == text), template)
    aspect = "pad"
    cfg = _image_processor_config(folder)
    if cfg is not None and (cfg.get("do_pad") is False
                            or (cfg.get("do_pad") is None and cfg.get("do_center_crop"))):
        aspect = "crop"
    return PromptSettings(template, "llava", aspect)


def prompt_settings(path: str | os.PathLike) -> PromptSettings:
    """The prompt settings of a model folder (:func:`describe_path`): a training run's
    ``config.yaml`` data settings; a checkpoint's chat template and image processor; an adapter
    folder: LLaVA-1.5's."""
    p = Path(path).expanduser()
    kind = describe_path(p)
    if kind == "run":
        return _from_run(p)
    if kind == "checkpoint":
        return _from_checkpoint(p)
    return PromptSettings()


def text_pieces(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """The answer text of ``tokens`` (new token ids, as they are generated) in pieces whose
    concatenation is :func:`llava_san.generation.decode` of all of them (LLaVA's answer text).

    A piece is sent once no later token can change it: a SentencePiece tokenizer decodes a run of
    byte tokens (``<0xC3>``: byte fallback) as one group and replaces *every* byte of a group that
    is not valid UTF-8, so the text of a run is held until the run ends; so is a text ending in an
    unfinished character (U+FFFD), and trailing spaces (the answer is stripped).
    """
    from ..generation import decode

    ids: list[int] = []
    sent = ""
    for token in tokens:
        ids.append(int(token))
        if _BYTE_TOKEN.fullmatch(str(tokenizer.convert_ids_to_tokens(int(token)))):
            continue
        text = decode(tokenizer, ids)
        if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
            yield text[len(sent):]
            sent = text
    final = decode(tokenizer, ids)
    if not final.startswith(sent):  # sent text is final: only the held-back end may change
        raise RuntimeError(f"streamed text {sent!r} diverged from the decoded answer {final!r}")
    if final != sent:
        yield final[len(sent):]


def check_turns(turns: Sequence[Turn]) -> None:
    """``ValueError`` unless the roles alternate user, assistant, ... and the last message is the user's."""
    if not turns or turns[-1].role != USER:
        raise ValueError("a conversation must end with a user message")
    for i, turn in enumerate(turns):
        expected = USER if i % 2 == 0 else ASSISTANT
        if turn.role != expected:
            raise ValueError(f"message {i} has role {turn.role!r}; roles must alternate user, assistant, "
                             "... starting with user")


class Assistant:
    """A model that answers conversations with training's prompt format (see the module docstring).

    Args:
        loaded: a model in eval mode and its processor (:func:`llava_san.inference.loading.load_model`).
        settings: the prompt settings (:func:`prompt_settings`).
    """

    def __init__(self, loaded: LoadedModel, settings: PromptSettings = PromptSettings()) -> None:
        from ..generation import PromptEncoder

        self.loaded = loaded
        self.settings = settings
        self.model = loaded.model
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.encoder = PromptEncoder(loaded.processor, settings.template, settings.tokenization,
                                     settings.image_aspect_ratio)
        self.model_id = loaded.model_id

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: Optional[str] = "auto", dtype: Optional[str] = "auto",
             model_id: Optional[str] = None, template: Optional[str] = None,
             image_aspect_ratio: Optional[str] = None) -> "Assistant":
        """Load a training run folder, a merged/exported folder or a llava-hf checkpoint (LoRA/DoRA/SAN
        merged into the weights); ``template``/``image_aspect_ratio`` override what the folder says.
        A text-only causal LM (a LLaMA run or export) gives a
        :class:`~llava_san.inference.causal_lm.CausalLmAssistant` (LLM-Adapters' prompt; no image)."""
        from transformers import PreTrainedTokenizerBase

        settings = prompt_settings(path)
        settings = PromptSettings(template or settings.template, settings.tokenization,
                                  image_aspect_ratio or settings.image_aspect_ratio)
        loaded = load_model(path=path, merge=True, dtype=dtype, device=device, model_id=model_id)
        if isinstance(loaded.processor, PreTrainedTokenizerBase):  # a causal LM comes with its tokenizer alone
            from .causal_lm import ALPACA, CausalLmAssistant

            if template not in (None, ALPACA) or image_aspect_ratio is not None:
                raise ValueError(f"{path} is a text-only causal LM: it is prompted with LLM-Adapters' Alpaca "
                                 "prompt, so a template or image aspect ratio does not apply")
            return CausalLmAssistant(loaded)
        return cls(loaded, settings)

    # ------------------------------------------------------------------ prompts
    def render(self, turns: Sequence[Turn], has_image: bool) -> str:
        """The prompt text of a conversation ending with a user turn, as training renders it; the
        image placeholder goes at the front of the first user turn."""
        from ..conversation import GPT, HUMAN, IMAGE_PLACEHOLDER

        check_turns(turns)
        messages: list[tuple[str, Optional[str]]] = []
        for i, turn in enumerate(turns):
            if IMAGE_PLACEHOLDER in turn.text:
                raise ValueError(f"message {i} contains {IMAGE_PLACEHOLDER!r}; attach the image instead")
            text = turn.text
            if i == 0 and has_image:
                text = f"{IMAGE_PLACEHOLDER}\n{text}"
            messages.append((HUMAN if turn.role == USER else GPT, text))
        messages.append((GPT, None))
        return self.encoder.template.render(messages)

    @property
    def context_length(self) -> Optional[int]:
        """Tokens the model reads at most (prompt + answer): the smaller of the tokenizer's
        ``model_max_length`` and the language model's ``max_position_embeddings``; ``None`` when
        neither is known."""
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10**9:  # transformers' "no limit" is int(1e30)
            limits.append(tok_max)
        config = getattr(self.model, "config", None)
        text_config = getattr(config, "text_config", None) or config
        pos_max = getattr(text_config, "max_position_embeddings", None)
        if isinstance(pos_max, int) and pos_max > 0:
            limits.append(pos_max)
        return min(limits) if limits else None

    def _prompt_ids(self, turns: Sequence[Turn], has_image: bool) -> list[int]:
        from ..data.tokenize import prompt_pieces

        return list(self.encoder.encoder.encode(prompt_pieces(self.render(turns, has_image))).input_ids)

    def _generation_input(self, ids: list[int], pixels: Any, max_new_tokens: int):
        """``ids`` + pixels as a GenerationInput whose answer ends where the context is full;
        :class:`PromptTooLong` when the prompt leaves no room for an answer."""
        from ..generation import GenerationInput

        limit = self.context_length
        if limit is not None and len(ids) >= limit:
            raise PromptTooLong(
                f"the prompt is {len(ids)} tokens (image tokens included) but the model reads at most "
                f"{limit} (tokenizer model_max_length / max_position_embeddings); shorten it or start a new "
                "conversation")
        room = int(max_new_tokens) if limit is None else min(int(max_new_tokens), limit - len(ids))
        return GenerationInput(ids, pixels, room)

    def encode(self, turns: Sequence[Turn], image: Any = None, max_new_tokens: int = 512):
        """The :class:`~llava_san.generation.GenerationInput` of a conversation (+ one PIL image);
        :class:`PromptTooLong` when it does not fit the context (``max_new_tokens`` is cut to the
        room left)."""
        ids = self._prompt_ids(turns, image is not None)
        pixels = self.encoder.pixel_values(image) if image is not None else None
        return self._generation_input(ids, pixels, max_new_tokens)

    def prompt_tokens(self, turns: Sequence[Turn], image: Any = None) -> int:
        """How many tokens the prompt of a conversation takes (image tokens included; ``image`` is
        only tested for ``None``, nothing is decoded)."""
        return len(self._prompt_ids(turns, image is not None))

    # ------------------------------------------------------------------ answers
    def answer(self, turns: Sequence[Turn], image: Any = None, max_new_tokens: int = 512) -> str:
        """The greedy answer of a conversation (the text of :meth:`stream`, joined)."""
        return "".join(self.stream(turns, image, max_new_tokens))

    def stream(self, turns: Sequence[Turn], image: Any = None, max_new_tokens: int = 512) -> Iterator[str]:
        """The answer as text pieces while it is generated; their concatenation equals the batched
        answer (:meth:`answer_many`) of the same conversation. The prompt is encoded by this call,
        so a bad conversation (:class:`PromptTooLong`, roles out of order) raises here, before the
        first piece."""
        return self._pieces(self.encode(turns, image, max_new_tokens))

    def _pieces(self, prompt: Any) -> Iterator[str]:
        from ..generation import stream_tokens

        was_training = self.model.training
        self.model.eval()
        try:
            tok = self.tokenizer
            yield from text_pieces(tok, stream_tokens(self.model, prompt, pad_token_id=tok.pad_token_id,
                                                      eos_token_id=tok.eos_token_id))
        finally:
            self.model.train(was_training)

    def answer_many(self, questions: Sequence[tuple[str, Any]], *, max_new_tokens: int = 128,
                    batch_size: int = 16, num_workers: int = 0, on_batch=None) -> list[str]:
        """Answers of single-turn ``(question, image)`` pairs, batched (the evaluation loop,
        :func:`llava_san.generation.answer_questions`); ``on_batch(batch, texts)`` after each batch.

        ``image`` is a PIL image, an image file path (read when its batch comes, by
        :func:`llava_san.data.images.load_image`, in ``num_workers`` threads ahead of generation when
        ``num_workers > 0``) or ``None`` (text only).
        """
        from ..data.images import load_image
        from ..generation import answer_questions

        def pixels(q: tuple[str, Any]):  # in the prefetch threads: the tokenizer stays in this one
            image = q[1]
            if image is None:
                return None
            if isinstance(image, (str, os.PathLike)):
                image = load_image(os.fspath(image))
            return self.encoder.pixel_values(image)

        def encode(q: tuple[str, Any], pv: Any):
            ids = self._prompt_ids([Turn(USER, q[0])], pv is not None)
            return self._generation_input(ids, pv, max_new_tokens)

        return answer_questions(self.model, self.processor, list(questions), encode, prepare=pixels,
                                batch_size=batch_size, num_workers=num_workers, on_batch=on_batch)
