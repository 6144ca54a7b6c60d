"""Conversation templates of LLaVA-1.5 (``llava/conversation.py``), as a small registry.

Two templates are registered:

* ``vicuna_v1`` -- LLaVA's ``conv_vicuna_v1`` (``SeparatorStyle.TWO``): the Vicuna system prompt,
  ``USER:``/``ASSISTANT:`` roles, ``" "`` after a user message and ``"</s>"`` after each assistant
  message. This is the template of LLaVA-1.5 stage 2 (``--version v1``) and of its evaluation
  (``--conv-mode vicuna_v1``).
* ``plain`` -- LLaVA's ``conv_llava_plain`` (``SeparatorStyle.PLAIN``) used for stage-1 caption
  pre-training: the human message is replaced by the bare ``<image>`` and the caption is followed by
  ``"\\n"`` (LLaVA's ``preprocess_plain``).

A template renders text exactly like LLaVA's ``Conversation.get_prompt()`` (:meth:`Template.render`,
:meth:`Template.render_prompt`) and, for training, splits the same text into :class:`Piece` objects
that say which characters are trained (:meth:`Template.pieces`). ``"".join(p.text for p in pieces)``
is always the rendered conversation, so label masks are derived from the very text that is
tokenized instead of being re-counted afterwards (LLaVA's "tokenization mismatch" problem).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

IMAGE_PLACEHOLDER = "<image>"
HUMAN = "human"
GPT = "gpt"

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Piece:
    """A span of a rendered conversation.

    Attributes:
        text: the characters of the span.
        trained: whether the tokens of this span are trained (label = token id) or masked (-100).
        kind: ``"text"``; ``"image"`` for the ``<image>`` placeholder (expanded to the model's image
            tokens later); ``"sep"`` for a separator that the tokenizer may know as a single special
            token (``"</s>"``) -- the tokenizer never merges text across those, which lets the encoder
            tokenize the conversation in independent runs.
    """

    text: str
    trained: bool
    kind: str = "text"


@dataclass(frozen=True)
class Template:
    """One LLaVA conversation template (a frozen copy of LLaVA's ``Conversation`` fields).

    Attributes:
        name: registry name.
        system: system prompt rendered first.
        roles: display names of (human, gpt).
        style: ``"two"`` (LLaVA ``SeparatorStyle.TWO``) or ``"plain"`` (``SeparatorStyle.PLAIN``).
        sep: separator after human messages (``TWO``) / after every message (``PLAIN``).
        sep2: separator after assistant messages (``TWO``); ``None`` for ``PLAIN``.
    """

    name: str
    system: str
    roles: tuple[str, str]
    style: str
    sep: str
    sep2: Optional[str] = None

    # ------------------------------------------------------------------ rendering (evaluation)
    def render(self, messages: Sequence[tuple[str, Optional[str]]]) -> str:
        """Render ``messages`` exactly like LLaVA's ``Conversation.get_prompt()``.

        Args:
            messages: ``(speaker, text)`` pairs with speaker ``"human"``/``"gpt"`` (or the display
                roles); ``text`` ``None`` or ``""`` renders the bare role (a generation prompt).
        """
        seps = [self.sep, self.sep2]
        if self.style == "two":
            ret = self.system + seps[0]
            for i, (_, message) in enumerate(messages):
                role = self.roles[i % 2]
                if message:
                    ret += role + ": " + message + seps[i % 2]
                else:
                    ret += role + ":"
            return ret
        if self.style == "plain":
            ret = self.system
            for i, (_, message) in enumerate(messages):
                if message:
                    ret += message + (seps[i % 2] or "")
            return ret
        raise ValueError(f"template {self.name!r}: invalid style {self.style!r}")

    def render_prompt(self, question: str) -> str:
        """A generation prompt for one human turn, as LLaVA's evaluation scripts build it.

        Equals ``conv.append_message(USER, question); conv.append_message(ASSISTANT, None);
        conv.get_prompt()``; for ``vicuna_v1`` it ends in ``"ASSISTANT:"``. ``question`` is used
        verbatim: LLaVA's ``model_vqa*.py`` passes ``"<image>\\n" + question``.
        """
        return self.render([(HUMAN, question), (GPT, None)])

    @property
    def stop_str(self) -> str:
        """The string that ends an assistant answer (``"</s>"`` for vicuna_v1, ``"\\n"`` for plain)."""
        return self.sep2 if self.style == "two" else self.sep

    # ------------------------------------------------------------------ training pieces
    def pieces(self, turns: Sequence[tuple[str, str]]) -> list[Piece]:
        """Split the rendered training conversation into trained / masked pieces.

        ``turns`` must already be normalised (see :func:`llava_san.data.records.normalize_turns`):
        alternating ``human``/``gpt`` starting with ``human``, with ``<image>`` (if any) at the
        front of the first human turn. Only assistant answers and the separator that ends them are
        trained; an empty answer renders as LLaVA renders it (the bare role, no separator) and a
        whitespace-only one is rendered but masked. The concatenated texts equal the rendered conversation:

        * ``vicuna_v1``: ``render(turns)``; the space between ``"ASSISTANT:"`` and the answer
          belongs to the answer, because a LLaMA tokenizer emits it as the ``"▁"`` of the answer's
          first token (LLaVA trains that token too).
        * ``plain``: LLaVA's ``preprocess_plain`` text ``"<image>" + caption + "\\n"``.
        """
        if self.style == "plain":
            return self._plain_pieces(turns)
        if self.style != "two":
            raise ValueError(f"template {self.name!r}: invalid style {self.style!r}")
        out: list[Piece] = [Piece(self.system + self.sep, False)]
        for i, (_, message) in enumerate(turns):
            role = self.roles[i % 2]
            if i % 2 == 0:  # human: "USER: <msg> " -- all masked
                if message:
                    out.extend(_split_image(role + ": " + message + self.sep, trained=False))
                else:
                    out.append(Piece(role + ":", False))
            else:  # assistant: "ASSISTANT:" masked, " <answer>" and "</s>" trained
                out.append(Piece(role + ":", False))
                if message:
                    # a whitespace-only answer is rendered as LLaVA renders it (same ids) but not trained;
                    # an empty one renders the bare role with no "</s>", as LLaVA's get_prompt
                    trained = bool(message.strip())
                    out.append(Piece(" " + message, trained))
                    out.append(Piece(self.sep2, trained, "sep"))
        return _merge(out)

    def _plain_pieces(self, turns: Sequence[tuple[str, str]]) -> list[Piece]:
        if len(turns) != 2 or IMAGE_PLACEHOLDER not in turns[0][1]:
            raise ValueError(
                f"template {self.name!r} needs exactly one human turn with {IMAGE_PLACEHOLDER} and one "
                f"answer (LLaVA preprocess_plain); got {len(turns)} turns"
            )
        # LLaVA replaces the whole human message by the bare "<image>".
        return [
            Piece(self.system, False),
            Piece(IMAGE_PLACEHOLDER, False, "image"),
            Piece(turns[1][1] + self.sep, True),
        ]


def _split_image(text: str, trained: bool) -> list[Piece]:
    """Cut ``<image>`` placeholders out of ``text`` into their own ``image`` pieces."""
    parts = text.split(IMAGE_PLACEHOLDER)
    out: list[Piece] = []
    for k, part in enumerate(parts):
        if k:
            out.append(Piece(IMAGE_PLACEHOLDER, False, "image"))
        out.append(Piece(part, trained))
    return out


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Join neighbouring text pieces with the same ``trained`` flag (drops empty text pieces)."""
    out: list[Piece] = []
    for p in pieces:
        if p.kind == "text" and not p.text:
            continue
        if out and p.kind == "text" and out[-1].kind == "text" and out[-1].trained == p.trained:
            out[-1] = Piece(out[-1].text + p.text, p.trained)
        else:
            out.append(p)
    if not out or out[0].kind != "text":
        out.insert(0, Piece("", False))  # every conversation starts with a (possibly empty) text run
    return out


VICUNA_V1 = Template(
    name="vicuna_v1",
    system=VICUNA_V1_SYSTEM,
    roles=("USER", "ASSISTANT"),
    style="two",
    sep=" ",
    sep2="</s>",
)

PLAIN = Template(name="plain", system="", roles=("", ""), style="plain", sep="\n", sep2=None)

TEMPLATES: dict[str, Template] = {"vicuna_v1": VICUNA_V1, "plain": PLAIN}


def get_template(name: str) -> Template:
    """Look a template up by name (``vicuna_v1``, ``plain``).

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown conversation template {name!r}; valid: {sorted(TEMPLATES)}") from None


__all__ = ["IMAGE_PLACEHOLDER", "PLAIN", "Piece", "TEMPLATES", "Template", "VICUNA_V1", "get_template"]
