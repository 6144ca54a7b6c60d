"""The one error type of the server: an OpenAI-style error with its HTTP status.

Every check of a request raises :class:`APIError`; the app turns it into the JSON body OpenAI's API
answers with (``{"error": {"message", "type", "param", "code"}}``), so OpenAI clients show the message.
"""
from __future__ import annotations

from typing import Any, Optional

__all__ = ["APIError", "error_body"]


class APIError(Exception):
    """A request the server refuses (4xx) or could not answer (5xx).

    Args:
        status: the HTTP status code.
        message: what is wrong, for the client: names the field (``messages[1].content``) and the fix.
        param: the request field at fault (OpenAI's ``param``), if any.
        code: a short machine-readable code (``model_not_found``, ``context_length_exceeded``...).
        type: OpenAI's error type; ``invalid_request_error`` for 4xx, ``server_error`` for 5xx.
    """

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 type: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    """``{"error": {...}}`` as OpenAI's API writes it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
