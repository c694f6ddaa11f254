"""Errors in OpenAI's shape, so that OpenAI clients raise the exception their users catch.

The ``openai`` package picks the exception class by HTTP status (400 ``BadRequestError``, 401
``AuthenticationError``, 403 ``PermissionDeniedError``, 404 ``NotFoundError``, 429
``RateLimitError``, 5xx ``InternalServerError``) and reads ``{"error": {"message", "type",
"param", "code"}}``; ``param`` names the request field at fault. vLLM's errors are passed on
with their status; their body is brought into that shape (older vLLM answers a flat
``{"object": "error", "message", "type", "param", "code"}``, some failures plain text).
"""

from __future__ import annotations

from typing import Any

import httpx
from fastapi.responses import JSONResponse

# OpenAI's error types by status.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class OpenAIError(ValueError):
    """A request the chat path refuses: its status, OpenAI ``code``, message and ``param``."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": error_type(self.status), "param": self.param,
                          "code": self.code}}  # fmt: skip

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def upstream_error(error: Any, status: int, text: str = "") -> dict[str, Any]:
    """vLLM's error (its ``error`` object, its flat error body, or ``text``) in OpenAI's shape."""
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]
    if not isinstance(error, dict):
        error = {}
    message = error.get("message") or text[:2000] or f"the model server answered {status}"
    kind = error.get("type")
    return {"error": {
        "message": str(message),
        # vLLM names its exception ("BadRequestError"); clients expect OpenAI's types.
        "type": kind if kind in set(_TYPES.values()) | {"server_error"} else error_type(status),
        "param": error.get("param"),
        "code": error.get("code") if isinstance(error.get("code"), str) else None,
    }}  # fmt: skip


def upstream_error_response(response: httpx.Response, headers: dict[str, str]) -> JSONResponse:
    """A read vLLM error response, passed on with its status."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    return JSONResponse(upstream_error(payload, response.status_code, response.text), status_code=response.status_code,
                        headers=headers)  # fmt: skip
