"""The HTTP gateway: chat apps post events here; feedloop validates and publishes them.

``POST /v1/events`` takes a JSON array (or JSON lines) of events with an app's API key and
answers 202 with how many were accepted and why each rejected one was rejected. Rejected input
is never dropped: it is published to the dead-letter topic with its reason and raw bytes.
Errors: 401 no or unknown API key, 413 body too large, 422 body unreadable, 503 broker down.

``POST /v1/route`` answers which adapter should serve a request, with its propensity, from
the router the gateway holds in memory (``app.routing``): it never waits on the broker.

``POST /v1/chat/completions`` is OpenAI-compatible: routed, answered by vLLM, and recorded as
an interaction event by the gateway itself (``app.chat``).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.auth import app_for_header
from app.broker import ensure_topics
from app.chat import ChatRequestError, ChatService
from app.dashboard import dashboard_router
from app.metrics import GatewayMetrics
from app.overview import OverviewSource
from app.publisher import Publisher, PublishError
from app.routing import RoutingService
from app.settings import Settings
from streams.store import make_engine, make_sessionmaker
from streams.contract import SCHEMAS, USER_EVENT_ADAPTER, Context, DeadLetter, json_schema, utcnow
from streams.intake import (
    Accepted,
    BodyRejected,
    Limits,
    Rejected,
    check_body,
    dead_letter,
)
from streams.pseudonyms import FileKeyStore, Pseudonymizer

log = structlog.get_logger(__name__)

# An unauthenticated request is dead-lettered too, but only its first bytes: anyone can send one.
UNAUTHENTICATED_RAW_BYTES = 4096
# A route request is one context: anything much larger is a mistake, not a request.
ROUTE_MAX_BODY_BYTES = 64 * 1024


class RejectedEvent(BaseModel):
    index: int
    event_id: str | None
    reason: str
    detail: str


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    errors: list[RejectedEvent]


class ErrorBody(BaseModel):
    reason: str
    detail: str


class RouteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context: Context = Field(default_factory=Context, description="The request's routing features.")
    app_id: str | None = Field(None, description="Must be the API key's app when given.")


class RouteAnswer(BaseModel):
    adapter: str = Field(description="Serve the request with this adapter.")
    propensity: float = Field(description="Probability it had: send it as the interaction's propensity.")
    probabilities: dict[str, float] = Field(description="The whole distribution over live adapters.")
    decision_id: str
    snapshot_version: int = Field(description="Version of the learner state the router came from.")


_REF = "#/components/schemas/{model}"


def _events_request_body() -> dict[str, Any]:
    """OpenAPI request body of /v1/events; the body is read raw, so FastAPI cannot infer it."""
    schema = USER_EVENT_ADAPTER.json_schema(ref_template=_REF)
    schema.pop("$defs", None)
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"type": "array", "items": schema}},
                "application/x-ndjson": {"schema": {"type": "string", "description": "JSON lines"}},
            },
        }
    }


def _route_request_body() -> dict[str, Any]:
    """OpenAPI request body of /v1/route, read raw so that authentication comes first."""
    schema = RouteRequest.model_json_schema(ref_template=_REF)
    schema.pop("$defs", None)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _with_event_schemas(app: FastAPI) -> None:
    """Add the models the raw request bodies refer to to the OpenAPI components."""
    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = base_openapi()
            defs = USER_EVENT_ADAPTER.json_schema(ref_template=_REF).get("$defs", {})
            defs.update(RouteRequest.model_json_schema(ref_template=_REF).get("$defs", {}))
            spec.setdefault("components", {}).setdefault("schemas", {}).update(defs)
        return app.openapi_schema or spec

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings, publisher: Publisher | None = None) -> FastAPI:
    """The gateway's ASGI app. Pass a publisher to share one; else it makes its own."""
    limits = Limits(
        max_event_bytes=settings.max_event_bytes,
        max_events=settings.max_events_per_request,
        dead_letter_max_raw_bytes=settings.dead_letter_max_raw_bytes,
    )
    owns_publisher = publisher is None
    overview = OverviewSource(settings)  # read by the dashboard, /v1/overview and /metrics
    metrics = GatewayMetrics(overview)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_keys:
            log.warning("gateway.no_api_keys", hint="set FEEDLOOP_API_KEYS='{\"app\": \"key\"}'")
        pub = publisher
        if pub is None:
            await ensure_topics(settings)
            pub = Publisher(
                settings.kafka,
                max_request_bytes=settings.max_body_bytes,
                timeout_s=settings.publish_timeout_s,
            )
            await pub.start()
        app.state.publisher = pub
        engine = make_engine(settings.store_url)
        routing = RoutingService(settings.learners, make_sessionmaker(engine))
        await routing.poll()  # serve the newest router from the first request on
        app.state.routing = routing
        reloads = asyncio.create_task(routing.run(settings.learners.snapshot_poll_s))
        app.state.chat = ChatService(settings, routing, pub)
        try:
            yield
        finally:
            reloads.cancel()
            await app.state.chat.close()
            engine.dispose()
            overview.close()
            if owns_publisher:
                await pub.stop()

    app = FastAPI(
        title="feedloop gateway",
        version="1",
        lifespan=lifespan,
        description="Ingest chat interactions and feedback. Event contract: /v1/schemas.",
    )
    app.include_router(dashboard_router(settings, overview))
    app.include_router(metrics.router(settings))

    app.add_middleware(RequestIdMiddleware)

    async def _dead_letter_only(request: Request, record: DeadLetter) -> None:
        try:
            await request.app.state.publisher.publish([], [record], app_id=record.app_id, received_at=record.received_at)
        except PublishError:
            log.error("gateway.dead_letter_failed", reason=record.reason)

    def _error(status: int, reason: str, detail: str) -> JSONResponse:
        return JSONResponse({"reason": reason, "detail": detail}, status_code=status)

    @app.post(
        "/v1/events",
        status_code=202,
        response_model=IngestResult,
        responses={
            401: {"model": ErrorBody}, 413: {"model": ErrorBody},
            422: {"model": ErrorBody}, 503: {"model": ErrorBody},
        },  # fmt: skip
        openapi_extra=_events_request_body(),
        summary="Post interaction, feedback and annotation events",
    )
    async def post_events(request: Request) -> Any:
        received_at = utcnow()
        stage = "gateway"
        app_id = app_for_header(request, settings)
        body, too_large = await _read_limited(request, settings.max_body_bytes)
        if app_id is None:
            await _dead_letter_only(
                request,
                dead_letter(
                    reason="unauthenticated",
                    detail="no or unknown API key",
                    raw=body, received_at=received_at, stage=stage,
                    max_raw_bytes=UNAUTHENTICATED_RAW_BYTES,
                ),  # fmt: skip
            )
            return _error(
                401, "unauthenticated",
                "send your app's API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            )  # fmt: skip
        if too_large:
            detail = f"request body exceeds {settings.max_body_bytes} bytes; send smaller batches"
            await _dead_letter_only(
                request,
                dead_letter(
                    reason="body_too_large", detail=detail, raw=body, received_at=received_at,
                    stage=stage, max_raw_bytes=limits.dead_letter_max_raw_bytes, app_id=app_id,
                ),  # fmt: skip
            )
            return _error(413, "body_too_large", detail)
        content_type = request.headers.get("content-type", "application/json")
        try:
            results = check_body(body, content_type, app_id, limits)
        except BodyRejected as exc:
            await _dead_letter_only(
                request,
                dead_letter(
                    reason=exc.reason, detail=exc.detail, raw=body, received_at=received_at,
                    stage=stage, max_raw_bytes=limits.dead_letter_max_raw_bytes, app_id=app_id,
                ),  # fmt: skip
            )
            return _error(422, exc.reason, exc.detail)
        accepted = [r for r in results if isinstance(r, Accepted)]
        rejected = [r for r in results if isinstance(r, Rejected)]
        dead = [
            dead_letter(
                reason=r.reason, detail=r.detail, raw=r.raw, received_at=received_at, stage=stage,
                max_raw_bytes=limits.dead_letter_max_raw_bytes, app_id=app_id,
                event_id=r.event_id, issues=r.issues,
            )  # fmt: skip
            for r in rejected
        ]
        try:
            await request.app.state.publisher.publish(accepted, dead, app_id=app_id, received_at=received_at)
        except PublishError as exc:
            return _error(503, "broker_unavailable", str(exc))
        for r in rejected:
            log.info("gateway.rejected", app_id=app_id, event_id=r.event_id, index=r.index, reason=r.reason)
        log.debug("gateway.ingested", app_id=app_id, accepted=len(accepted), rejected=len(rejected))
        return IngestResult(
            accepted=len(accepted),
            rejected=len(rejected),
            errors=[RejectedEvent(index=r.index, event_id=r.event_id, reason=r.reason, detail=r.detail) for r in rejected],
        )

    @app.post(
        "/v1/route",
        response_model=RouteAnswer,
        responses={401: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody}},
        openapi_extra=_route_request_body(),
        summary="Choose the adapter that serves a request (in memory; never waits on the broker)",
    )  # fmt: skip
    async def route(request: Request) -> Any:
        app_id = app_for_header(request, settings)
        if app_id is None:
            return _error(401, "unauthenticated", "send your app's API key as 'Authorization: Bearer <key>'")
        body, too_large = await _read_limited(request, ROUTE_MAX_BODY_BYTES)
        if too_large:
            return _error(413, "body_too_large", f"a route request is at most {ROUTE_MAX_BODY_BYTES} bytes")
        try:
            ask = RouteRequest.model_validate_json(body or b"{}")
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return _error(422, "invalid_request", f"{where}: {first['msg']}")
        if ask.app_id is not None and ask.app_id != app_id:
            return _error(422, "app_id_mismatch", f"app_id '{ask.app_id}' is not the API key's app")
        with metrics.route_latency.time():
            decision = request.app.state.routing.decide(ask.context, app_id)
        # The decision log: with the interaction's propensity, what off-policy evaluation needs.
        log.info("route.decided", decision_id=decision.decision_id, app_id=app_id, adapter=decision.adapter,
                 propensity=decision.propensity, snapshot_version=decision.snapshot_version)  # fmt: skip
        return RouteAnswer(adapter=decision.adapter, propensity=decision.propensity,
                           probabilities=decision.probabilities, decision_id=decision.decision_id,
                           snapshot_version=decision.snapshot_version)  # fmt: skip

    def _openai_error(status: int, reason: str, detail: str) -> JSONResponse:
        # The shape OpenAI clients parse into their exceptions.
        return JSONResponse({"error": {"message": detail, "type": reason, "code": reason}}, status_code=status)

    @app.post(
        "/v1/chat/completions",
        summary="OpenAI-compatible chat completions: routed to an adapter, served by vLLM, recorded",
        description="Point an OpenAI client's base_url at the gateway. Optional body field `feedloop`: "
        "session_id, user_id, context, training_consent, regenerates. The answer carries the "
        "X-Feedloop-Interaction-Id header: post feedback for it to /v1/events.",
    )
    async def chat_completions(request: Request) -> Any:
        app_id = app_for_header(request, settings)
        if app_id is None:
            return _openai_error(401, "unauthenticated", "use your app's feedloop API key as the OpenAI api_key")
        body, too_large = await _read_limited(request, settings.max_body_bytes)
        if too_large:
            return _openai_error(413, "body_too_large", f"request body exceeds {settings.max_body_bytes} bytes")
        try:
            ask = json.loads(body)
        except ValueError as exc:
            return _openai_error(422, "invalid_json", f"the body is not JSON: {exc}")
        if not isinstance(ask, dict):
            return _openai_error(422, "invalid_request", "the body must be a JSON object")
        try:
            return await request.app.state.chat.complete(ask, app_id)
        except ChatRequestError as exc:
            return _openai_error(exc.status, exc.reason, exc.detail)

    @app.post(
        "/v1/users/{user_id}/erase",
        status_code=202,
        responses={401: {"model": ErrorBody}},
        summary="Erase a user: no later training batch holds anything of theirs",
    )
    async def erase_user(user_id: str, request: Request) -> Any:
        if app_for_header(request, settings) is None:
            return _error(401, "unauthenticated", "send your app's API key as 'Authorization: Bearer <key>'")
        pseudonyms = Pseudonymizer(FileKeyStore(settings.keys_path))
        pseudonyms.erase(user_id)
        log.info("gateway.user_erased")  # the user id is deliberately not logged
        return {"erased_at": pseudonyms.erased_at(user_id).isoformat()}

    @app.get("/v1/schemas", summary="Names of the event contract's JSON Schemas")
    async def list_schemas() -> dict[str, list[str]]:
        return {"schemas": sorted(SCHEMAS)}

    @app.get("/v1/schemas/{name}.json", summary="One JSON Schema of the event contract")
    async def get_schema(name: str) -> dict[str, Any]:
        if name not in SCHEMAS:
            raise HTTPException(404, f"no schema '{name}'; see /v1/schemas")
        return json_schema(name)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    _with_event_schemas(app)
    return app


class RequestIdMiddleware:
    """Every log line of one request carries its id, and the response says it (X-Request-Id).

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware copies
    each response through a memory stream (the chat path's median overhead fell from 7.7 to
    5.2 ms without it, benchmarks/serving_overhead.py)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id")
        request_id = given.decode("latin-1") if given else uuid.uuid4().hex

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            await self.app(scope, receive, send_with_id)


async def _read_limited(request: Request, limit: int) -> tuple[bytes, bool]:
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

