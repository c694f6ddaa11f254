"""The review desk: ``GET /dashboard/review``, its queue ``GET /v1/review/queue`` and a
reviewer's verdict ``POST /v1/review/{app_id}/{example_id}``.

Operators review every app, a reviewer key its own app; an app's key is refused (403;
``app.gateway.auth``). The queue is ``app.review_desk``'s fold of the archive; a verdict is
turned into events (``app.review_desk.review_events``), checked like any app's events
(``streams.intake``) and published to the events topic under the example's app.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import TypeAdapter, ValidationError

from app.gateway.auth import ApiKeys, set_session_cookie
from app.gateway.dashboard import PAGE_HEADERS, STATIC
from app.gateway.http import ErrorBody, error, read_limited
from app.gateway.openapi import body_schema, raw_body
from app.publisher import Publisher, PublishError
from app.review_desk import Labels, NothingLabelled, ReviewDesk, review_correction, review_events
from streams.contract import utcnow
from streams.intake import Accepted, Limits, check_body
from streams.learning import ReviewRequest

log = structlog.get_logger(__name__)

SIGN_IN = """<!doctype html><meta charset="utf-8"><title>feedloop review desk</title>
<p>{message}</p><p>Open <code>/dashboard/review?key=&lt;your key&gt;</code> once with an operator key or a
reviewer key (FEEDLOOP_REVIEWER_KEYS); the browser then keeps a session cookie (docs/operations.md).</p>"""
MAX_LABELS_BYTES = 64 * 1024
LABELS = TypeAdapter(Labels)


def item_json(request: ReviewRequest) -> dict[str, Any]:
    """What a reviewer reads: the scrubbed example and why it was picked; never the user's pseudonym."""
    return request.model_dump(mode="json", exclude={"example": {"user"}})


def review_router(keys: ApiKeys, desk: ReviewDesk, publisher: Publisher, limits: Limits) -> APIRouter:
    router = APIRouter()

    @router.get("/dashboard/review", include_in_schema=False)
    async def page(request: Request, key: str | None = None) -> Response:
        if key is not None:
            operator, reviewer = keys.operator_for_key(key), keys.reviewer_for_key(key)
            if operator is None and reviewer is None:
                message = ("An app's key does not open the review desk." if keys.app_for_key(key) is not None
                           else "That key is not one of this gateway's operator or reviewer keys.")  # fmt: skip
                return HTMLResponse(SIGN_IN.format(message=message), 403 if keys.app_for_key(key) else 401)
            # Trade the key for the cookie and drop it from the address bar and history.
            response = RedirectResponse("/dashboard/review", status_code=303, headers={"Referrer-Policy": "no-referrer"})
            set_session_cookie(response, request, key, "operator" if operator is not None else "reviewer")
            log.info("review.signed_in", operator=operator, reviewer=reviewer)
            return response
        if (refused := keys.review_refusal(request)) is not None:
            return HTMLResponse(SIGN_IN.format(message=refused[2]), refused[0])
        return FileResponse(STATIC / "review.html", media_type="text/html", headers=PAGE_HEADERS)

    @router.get("/v1/review/queue", summary="Examples picked for human review, not yet reviewed (docs/operations.md)")
    async def queue(request: Request) -> Any:
        if (refused := keys.review_refusal(request)) is not None:
            return error(*refused)
        reviewer = keys.reviewer(request)
        waiting = await asyncio.to_thread(desk.waiting, reviewer.app_id)  # segment reads block
        return JSONResponse({"reviewer": reviewer.name, "app_id": reviewer.app_id,
                             "items": [item_json(r) for r in waiting]}, headers={"Cache-Control": "no-store"})  # fmt: skip

    @router.post(
        "/v1/review/{app_id}/{example_id}",
        status_code=202,
        responses={status: {"model": ErrorBody} for status in (401, 403, 409, 413, 415, 422, 503)},
        openapi_extra=raw_body({"application/json": {"schema": body_schema(LABELS)}}),
        summary="A reviewer's labels on a picked example: a human annotation and feedback events",
    )
    async def review(request: Request, app_id: str, example_id: str) -> Any:
        if (refused := keys.review_refusal(request)) is not None:
            return error(*refused)
        reviewer = keys.reviewer(request)
        if reviewer.app_id not in (None, app_id):
            return error(403, "forbidden", f"reviewer '{reviewer.name}' reviews app '{reviewer.app_id}' only")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "unsupported_media_type", "send the labels as 'Content-Type: application/json'")
        body, too_large = await read_limited(request, MAX_LABELS_BYTES)
        if too_large:
            return error(413, "body_too_large", f"labels exceed {MAX_LABELS_BYTES} bytes")
        try:
            labels = Labels.model_validate_json(body)
        except ValidationError as exc:
            return error(422, "invalid_labels", "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                          for e in exc.errors()))  # fmt: skip
        picked = await asyncio.to_thread(desk.get, app_id, example_id)
        if picked is None:
            return error(409, "not_waiting", f"example {example_id} of app {app_id} is not waiting for review "
                         "(reviewed already, never picked, or its user was erased): reload the queue")  # fmt: skip
        received_at = utcnow()
        try:
            events = review_events(picked, labels, reviewer.name, received_at)
        except NothingLabelled as exc:
            return error(422, "invalid_labels", str(exc))
        # The checks every app's events pass (size, event time); a refusal here is the desk's bug.
        results = check_body(json.dumps(events).encode(), "application/json", app_id, limits, received_at)
        if refusals := [r for r in results if not isinstance(r, Accepted)]:
            log.error("review.events_refused", app_id=app_id, example_id=example_id,
                      reasons=[r.reason for r in refusals])  # fmt: skip
            return error(422, refusals[0].reason, refusals[0].detail)
        if (correction := review_correction(picked, labels, reviewer.name, received_at)) is not None:
            # Not a user event, so not through the app's checks: the desk built it from the pick.
            payload = correction.model_dump_json().encode()
            if len(payload) > limits.max_event_bytes:  # the pipeline would dead-letter it
                return error(413, "body_too_large", f"the correction with its example is {len(payload)} bytes; "
                             f"the limit is {limits.max_event_bytes} (FEEDLOOP_MAX_EVENT_BYTES): shorten it")
            results.append(Accepted(len(results), correction, payload))
        try:
            await publisher.publish(results, [], app_id=app_id, received_at=received_at)
        except PublishError as exc:
            return error(503, "broker_unavailable", str(exc))
        desk.reviewed(app_id, example_id)
        log.info("review.labelled", app_id=app_id, example_id=example_id, reviewer=reviewer.name,
                 kinds=[e.get("kind", e["type"]) for e in events], corrected=correction is not None)  # fmt: skip
        return {"review_id": picked.review_id, "events": [r.event.event_id for r in results]}

    return router
