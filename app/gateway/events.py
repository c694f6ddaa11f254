"""``POST /v1/events``: a chat app's interactions, feedback and annotations, onto the log.

The body is a JSON array (or JSON lines) of events, sent with an app's API key (or, from a
browser, a feedback token: feedback on its interactions only; ``app.feedback_tokens``); the answer
is 202 with how many were accepted and why each rejected one was rejected. Rejected input is
never dropped: each rejected event, or the whole body when it cannot be read, is published to
the dead-letter topic with its reason and raw bytes. Errors: 401 no or unknown API key (or token), 403 a token's request outside its scope or from
an origin its app does not list, 413
body too large, 422 body unreadable (not JSON, not an array, nested too deep), 429 over the
app's rate limit, 503 broker down; no input answers 500. A request without a valid key is
answered before its body is read and is not dead-lettered (anyone can send one, so keeping
them would let anyone fill the disk): ``/metrics`` counts them. The checks are ``streams.intake``'s;
this router reads the request and publishes what they decide.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from fastapi import APIRouter, Request
from pydantic import BaseModel

from app.feedback_tokens import BrowserSettings, FeedbackTokens
from app.gateway.auth import ApiKeys, header_key
from app.gateway.http import UNAUTHENTICATED_DETAIL, ErrorBody, error, over_limit, read_limited
from app.rate_limit import RateLimiter
from app.gateway.openapi import body_schema, raw_body
from app.publisher import Publisher, PublishError
from streams.contract import USER_EVENT_ADAPTER, DeadLetter, utcnow
from streams.intake import Accepted, BodyRejected, Limits, Rejected, check_body, dead_letter

log = structlog.get_logger(__name__)

STAGE = "gateway"


class RejectedEvent(BaseModel):
    index: int
    event_id: str | None
    reason: str
    detail: str


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    errors: list[RejectedEvent]


def events_router(keys: ApiKeys, limiter: RateLimiter, publisher: Publisher, limits: Limits, max_body_bytes: int,
                  tokens: FeedbackTokens, browser: BrowserSettings) -> APIRouter:  # fmt: skip
    router = APIRouter()

    async def dead_letter_only(record: DeadLetter) -> None:
        try:
            await publisher.publish([], [record], app_id=record.app_id, received_at=record.received_at)
        except PublishError:
            log.error("gateway.dead_letter_failed", reason=record.reason)

    @router.post(
        "/v1/events",
        status_code=202,
        response_model=IngestResult,
        responses={
            401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 413: {"model": ErrorBody},
            422: {"model": ErrorBody}, 429: {"model": ErrorBody}, 503: {"model": ErrorBody},
        },  # fmt: skip
        openapi_extra=raw_body({
            "application/json": {"schema": {"type": "array", "items": body_schema(USER_EVENT_ADAPTER)}},
            "application/x-ndjson": {"schema": {"type": "string", "description": "JSON lines"}},
        }),  # fmt: skip
        summary="Post interaction, feedback and annotation events",
    )
    async def post_events(request: Request) -> Any:
        received_at = utcnow()
        app_id, scope = keys.app_for_header(request), None
        if app_id is None and (key := header_key(request)) is not None and (scope := tokens.verify(key)) is not None:
            app_id = scope.app_id
            origin = request.headers.get("origin")
            if origin is not None and origin not in browser.cors_origins.get(app_id, ()):
                return error(403, "origin_not_allowed", f"app '{app_id}' does not allow feedback from {origin}: "
                             "list it in FEEDLOOP_BROWSER__CORS_ORIGINS")  # fmt: skip
        if app_id is None:  # the body is not read: anyone can send these (counted in /metrics)
            return error(401, "unauthenticated", f"{UNAUTHENTICATED_DETAIL} or 'X-API-Key: <key>', or a feedback "
                         "token (expired?)")  # fmt: skip
        if (refused := over_limit(limiter, app_id)) is not None:
            return refused
        body, too_large = await read_limited(request, max_body_bytes)

        async def refuse(status: int, reason: str, detail: str) -> Any:
            """The whole body refused: kept as one dead letter, answered with its reason."""
            # Off the event loop: scrubbing up to FEEDLOOP_DEAD_LETTER_MAX_RAW_BYTES of text takes ~0.2 s.
            await dead_letter_only(await asyncio.to_thread(
                dead_letter, reason=reason, detail=detail, raw=body, received_at=received_at,
                stage=STAGE, max_raw_bytes=limits.dead_letter_max_raw_bytes, app_id=app_id,
            ))  # fmt: skip
            return error(status, reason, detail)

        if too_large:
            return await refuse(413, "body_too_large", f"request body exceeds {max_body_bytes} bytes; send smaller batches")
        content_type = request.headers.get("content-type", "application/json")
        try:
            results = check_body(body, content_type, app_id, limits, received_at)
        except BodyRejected as exc:
            return await refuse(422, exc.reason, exc.detail)
        except Exception as exc:  # noqa: BLE001 - no input may answer 500: a sender would retry it forever
            log.exception("gateway.intake_failed", app_id=app_id, size=len(body))
            return await refuse(422, "unprocessable",
                                f"the gateway could not read this body ({type(exc).__name__}); it was dead-lettered")
        accepted = [r for r in results if isinstance(r, Accepted)]
        rejected = [r for r in results if isinstance(r, Rejected)]
        if scope is not None and (outside := next(filter(None, (scope.refusal(a.event) for a in accepted)), None)):
            # Nothing of it is kept: a token's holder is a browser, not the app (like a bad key).
            return error(403, "outside_token_scope", outside)
        def letters() -> list[DeadLetter]:  # scrubbing each rejected event's raw bytes: off the loop too
            return [dead_letter(reason=r.reason, detail=r.detail, raw=r.raw, received_at=received_at, stage=STAGE,
                                max_raw_bytes=limits.dead_letter_max_raw_bytes, app_id=app_id,
                                event_id=r.event_id, issues=r.issues) for r in rejected]  # fmt: skip

        dead = await asyncio.to_thread(letters) if rejected else []
        try:
            await publisher.publish(accepted, dead, app_id=app_id, received_at=received_at)
        except PublishError as exc:
            return error(503, "broker_unavailable", str(exc))
        for r in rejected:
            log.info("gateway.rejected", app_id=app_id, event_id=r.event_id, index=r.index, reason=r.reason)
        log.debug("gateway.ingested", app_id=app_id, accepted=len(accepted), rejected=len(rejected))
        return IngestResult(
            accepted=len(accepted),
            rejected=len(rejected),
            errors=[RejectedEvent(index=r.index, event_id=r.event_id, reason=r.reason, detail=r.detail) for r in rejected],
        )

    return router
