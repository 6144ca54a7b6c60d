"""The JSON objects of OpenAI's chat API: ``model`` list entries, ``chat.completion`` and the
``chat.completion.chunk`` events of a stream (as Server-Sent Events ``data:`` lines)."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Optional

from .engine import Result

__all__ = ["completion", "completion_id", "chunk", "model_entry", "sse", "usage", "SSE_DONE"]

#: the line that ends an OpenAI stream
SSE_DONE = "data: [DONE]\n\n"

_STARTED = int(time.time())


def completion_id() -> str:
    """A new ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def model_entry(model_id: str) -> dict[str, Any]:
    """One ``model`` object of ``GET /v1/models``."""
    return {"id": model_id, "object": "model", "created": _STARTED, "owned_by": "llava-san"}


def usage(result: Result) -> dict[str, int]:
    """The ``usage`` object: prompt tokens count the image's tokens."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def completion(cid: str, model_id: str, result: Result) -> dict[str, Any]:
    """A ``chat.completion`` object with the one answer."""
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason, "logprobs": None}],
        "usage": usage(result),
    }


def chunk(cid: str, model_id: str, delta: dict[str, Any], finish_reason: Optional[str] = None,
          usage_: Optional[dict[str, int]] = None, created: Optional[int] = None) -> dict[str, Any]:
    """A ``chat.completion.chunk``; with ``usage_`` it is the usage-only last chunk (no choices)."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk",
                           "created": created or int(time.time()), "model": model_id}
    if usage_ is not None:
        out["choices"] = []
        out["usage"] = usage_
    else:
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    return out


def sse(obj: Any) -> str:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
