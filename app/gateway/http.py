"""What every router does with a request: read its body within a limit, answer an error.

The routers read bodies raw instead of letting FastAPI parse them, so that the API key is
checked first, a body over the limit is cut off rather than read whole, and what cannot be
parsed is answered (and, for events, dead-lettered) in feedloop's own error shape,
``{"reason", "detail"}`` (:class:`ErrorBody`; the chat path answers in OpenAI's instead).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.rate_limit import RateLimiter

UNAUTHENTICATED_DETAIL = "send your app's API key as 'Authorization: Bearer <key>'"


class ErrorBody(BaseModel):
    reason: str
    detail: str


def error(status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"reason": reason, "detail": detail}, status_code=status, headers=headers)


def over_limit(limiter: RateLimiter, app_id: str) -> JSONResponse | None:
    """429 with Retry-After when the app is over its rate limit (a token is taken otherwise)."""
    wait = limiter.wait_s(app_id)
    if not wait:
        return None
    return error(429, "rate_limited", limiter.detail(app_id, wait), headers=limiter.retry_after(wait))


async def read_limited(request: Request, limit: int) -> tuple[bytes, bool]:
    """The body, or its first ``limit`` bytes and True when it is longer (read no further)."""
    declared = request.headers.get("content-length")
    chunks: list[bytes] = []
    size = 0
    if declared is not None and declared.isdigit() and int(declared) > limit:
        # Keep a prefix for the dead-letter record without reading a huge body.
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
        return b"".join(chunks)[:limit], True
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False
