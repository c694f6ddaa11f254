"""What a web page may call: feedback tokens for the interactions an app records itself, and CORS.

The chat gateway puts a feedback token in every answer (``app.feedback_tokens``). An app that
records its interactions itself (``POST /v1/events`` from its server) asks for one here, with its
key, for the interactions it shows a page, and hands the token to the page. Cross-origin
requests are answered only for the origins an app lists (``FEEDLOOP_BROWSER__CORS_ORIGINS``);
Starlette's CORS middleware answers the preflights (it cannot tell which app asks, so it allows
the union), and ``POST /v1/events`` checks a token's own app lists the request's ``Origin``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, Field, ValidationError

from app.feedback_tokens import BrowserSettings, FeedbackTokens
from app.gateway.auth import ApiKeys
from app.gateway.http import UNAUTHENTICATED_DETAIL, ErrorBody, error, over_limit, read_limited
from app.rate_limit import RateLimiter
from streams.contract import Id

MAX_TOKEN_BODY_BYTES = 64 * 1024


class TokenRequest(BaseModel):
    interaction_ids: list[Id] = Field(min_length=1, max_length=16, description="The interactions a page may rate.")


class TokenAnswer(BaseModel):
    feedback_token: str
    expires_at: float = Field(description="Unix time.")


def browser_router(keys: ApiKeys, limiter: RateLimiter, tokens: FeedbackTokens) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/feedback-tokens", response_model=TokenAnswer,
                 responses={401: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}},
                 summary="A feedback token for a web page: feedback on these interactions only, for a while")  # fmt: skip
    async def feedback_token(request: Request) -> Any:
        app_id = keys.app_for_header(request)
        if app_id is None:
            return error(401, "unauthenticated", UNAUTHENTICATED_DETAIL)
        if (refused := over_limit(limiter, app_id)) is not None:
            return refused
        body, too_large = await read_limited(request, MAX_TOKEN_BODY_BYTES)
        try:
            if too_large:
                raise ValueError(f"the body exceeds {MAX_TOKEN_BODY_BYTES} bytes")
            ask = TokenRequest.model_validate_json(body)
        except (ValueError, ValidationError) as exc:
            return error(422, "invalid_request", f'send {{"interaction_ids": ["..."]}}: {exc}')
        token = tokens.mint(app_id, ask.interaction_ids)
        return TokenAnswer(feedback_token=token, expires_at=tokens.verify(token).expires_at)

    return router


def allow_listed_origins(app: FastAPI, browser: BrowserSettings) -> None:
    """Answer cross-origin requests from the origins any app lists (none listed: no CORS at all)."""
    origins = sorted({origin for listed in browser.cors_origins.values() for origin in listed})
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["POST"],
                           allow_headers=["authorization", "content-type"], max_age=600)  # fmt: skip
