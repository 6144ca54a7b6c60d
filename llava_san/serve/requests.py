"""An OpenAI chat-completions request body -> a checked :class:`ChatRequest` (turns + image reference).

What is accepted (everything else is a 400 naming the field):

* ``messages``: ``user``/``assistant`` messages alternating, starting and ending with ``user``.
  ``content`` is a string or a list of parts ``{"type": "text", "text": ...}`` and
  ``{"type": "image_url", "image_url": {"url": ...}}`` (``image_url`` may also be the bare URL string).
  Several text parts of one message are joined with ``"\\n"``.
* at most one image in the conversation (LLaVA-1.5 sees one image), in a ``user`` message; wherever it
  is attached, the model sees it in front of the first user turn (``"<image>\\n" + text``), as LLaVA's
  CLI and training data put it. The URL is a ``data:image/...;base64,`` URL, a ``file://`` URL or a
  path on the server's machine (:mod:`.images` loads it).
* ``system`` (or ``developer``) messages: the model answers with the fixed system prompt of the
  conversation template it was trained with (Vicuna v1's), so a system message is refused unless its
  text is that prompt verbatim (then it changes nothing). Silently dropping a client's instructions
  would look like the model ignoring them.
* ``max_completion_tokens`` (or the older ``max_tokens``): 1 .. the server's limit; left out, the
  answer may use what the context leaves (up to the server's limit).
* ``stream`` (Server-Sent Events) and ``stream_options.include_usage``.
* decoding is always greedy (LLaVA's evaluation setting): ``temperature``, ``top_p``, ``seed``,
  ``presence_penalty``, ``frequency_penalty``, ``user``... are accepted and ignored. What greedy
  decoding cannot honour is refused: ``n`` > 1, ``stop`` sequences, ``tools``/``functions``,
  ``logprobs``, a ``response_format`` other than text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..inference import Turn
from .errors import APIError

__all__ = ["ChatRequest", "ImageRef", "parse_chat_request"]

IMAGE_PLACEHOLDER = "<image>"  # llava_san.conversation.IMAGE_PLACEHOLDER (not imported: it is cheap to check)


@dataclass(frozen=True)
class ImageRef:
    """Where the conversation's image is: its ``url`` and the request field that gave it (for errors)."""

    url: str
    param: str


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat request.

    Attributes:
        turns: the conversation, ``user``/``assistant`` alternating, ending with ``user``.
        image: the one image of the conversation, or ``None``.
        max_tokens: the requested answer length limit, or ``None`` (what the context leaves).
        stream: answer as Server-Sent Events.
        include_usage: streaming: send a last chunk with ``usage`` (``stream_options.include_usage``).
    """

    turns: tuple[Turn, ...]
    image: Optional[ImageRef]
    max_tokens: Optional[int]
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is None:
        return  # one model is served: a client that leaves it out gets that one
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {type(model).__name__}", "model")
    if model != model_id:
        raise APIError(404, f"The model {model!r} does not exist on this server; it serves {model_id!r} "
                       "(GET /v1/models)", param="model", code="model_not_found")


def _max_tokens(body: dict, limit: int) -> Optional[int]:
    values = {k: body.get(k) for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(f"'{key}' must be an integer, got {value!r}", key)
        if value < 1:
            raise _bad(f"'{key}' must be at least 1, got {value}", key)
        if value > limit:
            raise _bad(f"'{key}' is {value}, over this server's limit of {limit} new tokens "
                       "(python -m llava_san.serve --max-new-tokens-limit)", key)
    if len(set(values.values())) > 1:
        raise _bad(f"'max_completion_tokens' ({values['max_completion_tokens']}) and 'max_tokens' "
                   f"({values['max_tokens']}) disagree; give one of them", "max_completion_tokens")
    return next(iter(values.values()), None)


def _check_unsupported(body: dict) -> None:
    """Refuse what greedy single-answer decoding cannot honour (see the module docstring)."""
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad(f"'n' must be 1: decoding is greedy, so every choice would be the same answer (got {n!r})",
                   "n")
    if body.get("stop") not in (None, [], ""):
        raise _bad("'stop' sequences are not supported: the answer ends at the model's end-of-answer token "
                   "or at max_completion_tokens", "stop")
    for key in ("tools", "functions"):
        if body.get(key):
            raise _bad(f"'{key}' is not supported: this model has no tool calling", key)
    if body.get("logprobs"):
        raise _bad("'logprobs' is not supported", "logprobs")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("'response_format' other than {\"type\": \"text\"} is not supported", "response_format")


def _image_url(part: dict, param: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise _bad(f"{param}.image_url must be {{\"url\": \"data:image/png;base64,...\" or a file path}}",
                   f"{param}.image_url")
    return url


def _content(message: dict, param: str, images: list[ImageRef]) -> str:
    """The text of one message; its image parts are appended to ``images``."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{param}.content must be a string or a list of content parts, got "
                   f"{type(content).__name__}", f"{param}.content")
    texts: list[str] = []
    for k, part in enumerate(content):
        where = f"{param}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.text must be a string", f"{where}.text")
            texts.append(text)
        elif kind == "image_url":
            images.append(ImageRef(_image_url(part, where), where))
        else:
            raise _bad(f"{where} must be {{\"type\": \"text\", ...}} or {{\"type\": \"image_url\", ...}}, "
                       f"got type {kind!r}", where)
    return "\n".join(texts)


def _turns(messages: Any, system_prompt: Optional[str]) -> tuple[list[Turn], list[ImageRef]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of {\"role\", \"content\"} messages", "messages")
    turns: list[Turn] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{param} must be an object with 'role' and 'content'", param)
        role = message.get("role")
        if role in ("system", "developer"):
            found: list[ImageRef] = []
            text = _content(message, param, found)
            if found:
                raise _bad(f"{param}: a {role} message cannot carry an image; attach it to a user message",
                           f"{param}.content")
            if turns or text.strip() != (system_prompt or "").strip():
                raise _bad(f"{param}: {role} messages are not supported: the model answers with the system "
                           f"prompt of the conversation template it was trained with ({system_prompt!r}); "
                           "remove the message", f"{param}.role")
            continue
        if role not in ("user", "assistant"):
            raise _bad(f"{param}.role must be 'user' or 'assistant' (or a leading 'system'), got {role!r}",
                       f"{param}.role")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise _bad(f"{param}.role is {role!r} but {expected!r} was expected: messages must alternate "
                       "user, assistant, user, ... starting with user", f"{param}.role")
        found = []
        text = _content(message, param, found)
        if found and role != "user":
            raise _bad(f"{param}: an assistant message cannot carry an image", f"{param}.content")
        if IMAGE_PLACEHOLDER in text:
            raise _bad(f"{param}.content contains {IMAGE_PLACEHOLDER!r}; attach the image as an image_url "
                       "part instead", f"{param}.content")
        images += found
        turns.append(Turn(role, text))
    if not turns:
        raise _bad("'messages' has no user message", "messages")
    if turns[-1].role != "user":
        raise _bad("the last message must be a user message (the one to answer)",
                   f"messages[{len(messages) - 1}]")
    if len(images) > 1:
        raise _bad(f"at most one image per conversation (LLaVA-1.5 sees one image); got {len(images)}: "
                   + ", ".join(im.param for im in images) + ". Start a new conversation for another image",
                   images[1].param, "too_many_images")
    return turns, images


def parse_chat_request(body: Any, *, model_id: str, max_new_tokens_limit: int,
                       system_prompt: Optional[str] = None) -> ChatRequest:
    """Check a decoded ``POST /v1/chat/completions`` body; raises :class:`APIError` (400, or 404 for an
    unknown model) naming the field at fault. ``system_prompt`` is the template's own system prompt
    (the only system message accepted)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {type(body).__name__}")
    _check_model(body, model_id)
    _check_unsupported(body)
    turns, images = _turns(body.get("messages"), system_prompt)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    include_usage = bool((options or {}).get("include_usage"))
    return ChatRequest(tuple(turns), images[0] if images else None, _max_tokens(body, max_new_tokens_limit),
                       bool(stream), include_usage)
