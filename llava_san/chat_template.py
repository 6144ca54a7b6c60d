"""Jinja chat templates that render a conversation template's prompt, for exported processors.

An exported folder carries one of these as its processor's ``chat_template`` (``chat_template.jinja``),
so that ``processor.apply_chat_template(messages, add_generation_prompt=True)`` in another tool gives
the very string :meth:`llava_san.conversation.Template.render_prompt` gives here. The jinja text is
generated from the :class:`~llava_san.conversation.Template` fields, so it cannot drift from them.

Messages are transformers chat messages: ``{"role": "user" | "assistant" | "system", "content": ...}``
where ``content`` is a string (used verbatim) or a list of parts ``{"type": "image"}`` /
``{"type": "text", "text": ...}``. A list renders its images first, as LLaVA puts the image first,
then its texts, one ``<image>`` per image and everything joined by ``"\\n"``:
``[{"type": "image"}, {"type": "text", "text": q}]`` renders ``"<image>\\n" + q``, LLaVA's
``model_vqa*.py`` prompt. A leading ``system`` message replaces the template's system prompt.
"""
from __future__ import annotations

import json

from .conversation import IMAGE_PLACEHOLDER, get_template

__all__ = ["chat_template"]


def _lit(text: str) -> str:
    """``text`` as a jinja string literal (JSON escapes are valid jinja escapes)."""
    return json.dumps(text)


# one message's content -> its text (shared by both styles)
_CONTENT_MACRO = (
    "{%- macro render_content(c) -%}"
    "{%- if c is string -%}{{- c -}}"
    "{%- else -%}"
    "{%- set n_images = c | selectattr('type', 'equalto', 'image') | list | length -%}"
    "{%- set texts = c | selectattr('type', 'equalto', 'text') | map(attribute='text') | list -%}"
    "{{- ([" + _lit(IMAGE_PLACEHOLDER) + "] * n_images + texts) | join('\\n') -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
)

# the system prompt: the template's own, or the content of a leading system message
_SYSTEM = (
    "{%- set system = {system} -%}"
    "{%- set turns = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = render_content(messages[0]['content']) -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- endif -%}"
)

_BAD_ROLE = ("{{- raise_exception('this chat template knows the roles user and assistant (and a leading "
             "system message), got ' + m['role']) -}}")


def _two(system: str, user: str, assistant: str, sep: str, sep2: str) -> str:
    """LLaVA ``SeparatorStyle.TWO``: ``system + sep``, ``"USER: " + text + sep``,
    ``"ASSISTANT: " + text + sep2``, and the bare ``"ASSISTANT:"`` as the generation prompt."""
    return (
        _CONTENT_MACRO + _SYSTEM.replace("{system}", _lit(system))
        + "{{- system + " + _lit(sep) + " -}}"
        + "{%- for m in turns -%}"
        + "{%- if m['role'] == 'user' -%}{{- " + _lit(user + ": ") + " + render_content(m['content']) + "
        + _lit(sep) + " -}}"
        + "{%- elif m['role'] == 'assistant' -%}{{- " + _lit(assistant + ": ")
        + " + render_content(m['content']) + " + _lit(sep2) + " -}}"
        + "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
        + "{%- endfor -%}"
        + "{%- if add_generation_prompt -%}{{- " + _lit(assistant + ":") + " -}}{%- endif -%}"
    )


def _plain(system: str, sep: str) -> str:
    """LLaVA ``SeparatorStyle.PLAIN`` as :meth:`Template.render` renders it: each user message followed
    by ``sep``, each assistant message bare; the generation prompt is empty."""
    return (
        _CONTENT_MACRO + _SYSTEM.replace("{system}", _lit(system))
        + "{{- system -}}"
        + "{%- for m in turns -%}"
        + "{%- if m['role'] == 'user' -%}{{- render_content(m['content']) + " + _lit(sep) + " -}}"
        + "{%- elif m['role'] == 'assistant' -%}{{- render_content(m['content']) -}}"
        + "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
        + "{%- endfor -%}"
    )


def chat_template(name: str) -> str:
    """The jinja chat template of the conversation template ``name`` (``vicuna_v1``, ``plain``).

    For one user message ``m`` and ``add_generation_prompt=True`` it renders
    ``get_template(name).render_prompt(m)`` exactly.
    """
    t = get_template(name)
    if t.style == "two":
        return _two(t.system, t.roles[0], t.roles[1], t.sep, t.sep2 or "")
    if t.style == "plain":
        return _plain(t.system, t.sep)
    raise ValueError(f"template {name!r}: no chat template for style {t.style!r}")
