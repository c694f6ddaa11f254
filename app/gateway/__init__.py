"""The HTTP gateway: chat apps post events, ask for routes and chat here; operators watch here.

One router per concern, each made from only the settings and services it uses:

- ``events``: ``POST /v1/events``, validated and published (API keys or a feedback token, the
  publisher, the intake limits);
- ``browser``: ``POST /v1/feedback-tokens`` for web pages, and the CORS allowlist;
- ``route``: ``POST /v1/route``, from the router in memory (keys, the routing service, the
  route-latency histogram);
- ``chat``: ``POST /v1/chat/completions``, OpenAI-compatible, routed, answered by vLLM and
  recorded (keys, the chat service, the body limit);
- ``erase``: ``POST /v1/users/{id}/erase`` (keys, the pseudonym key directory, the store, the
  publisher for its ``user_erased``);
- ``schemas``: ``GET /v1/schemas``, the event contract; ``health``: ``GET /healthz``;
- ``dashboard``: ``/dashboard`` and ``GET /v1/overview``; ``metrics``: ``GET /metrics``
  (keys, the overview source);
- ``review``: the review desk, ``/dashboard/review`` and ``/v1/review/...`` (keys, the review
  queue folded from the archive, the publisher, the intake limits).

:func:`create_app` is the only part of the gateway that reads ``Settings`` (the overview
source, shared with ``feedloop status``, takes them too): it builds the services, includes the
routers, and owns the lifespan. The services are built with the app, before any event loop runs
(``feedloop gateway`` makes the app, then runs uvicorn), so that each router can be handed the
service itself; what needs the loop (the publisher's connection, the first router snapshot,
the reload task) starts in the lifespan and is closed there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from app.broker import ensure_topics
from app.feedback_tokens import FeedbackTokens
from app.gateway.auth import ApiKeys
from app.gateway.browser import allow_listed_origins, browser_router
from app.gateway.chat import ChatService, chat_router
from app.gateway.dashboard import dashboard_router
from app.gateway.erase import erase_router
from app.gateway.events import events_router
from app.gateway.health import health_router
from app.gateway.metrics import GatewayMetrics, RequestMetrics
from app.gateway.openapi import with_components
from app.rate_limit import RateLimiter
from app.gateway.request_id import RequestIdMiddleware
from app.gateway.review import review_router
from app.gateway.route import ROUTE_REQUEST, route_router
from app.gateway.schemas import schemas_router
from app.overview import OverviewSource
from app.publisher import Publisher
from app.review_desk import ReviewDesk
from app.routing import RoutingService
from app.settings import Settings
from streams.contract import USER_EVENT_ADAPTER
from streams.intake import Limits
from streams.store import make_engine, make_sessionmaker

log = structlog.get_logger(__name__)


def create_app(settings: Settings, publisher: Publisher | None = None) -> FastAPI:
    """The gateway's ASGI app. Pass a publisher to share one; else it makes its own."""
    keys = ApiKeys(settings.api_keys, settings.operator_keys, settings.reviewer_keys)
    limiter = RateLimiter(settings.rate_limits)
    owns_publisher = publisher is None
    pub = publisher if publisher is not None else Publisher(
        settings.kafka, max_request_bytes=settings.max_body_bytes, timeout_s=settings.publish_timeout_s
    )
    engine = make_engine(settings.store_url)
    sessions = make_sessionmaker(engine)
    routing = RoutingService(settings.learners, sessions)
    tokens = FeedbackTokens(settings.api_keys, settings.browser.token_ttl_s)
    overview = OverviewSource(settings)  # read by the dashboard, /v1/overview and /metrics
    desk = ReviewDesk(make_sessionmaker(engine), settings.objects)
    metrics = GatewayMetrics(overview)
    chat = ChatService(routing, pub, vllm_urls=settings.vllm_urls, serving=settings.serving,
                       base_model_path=settings.model_path, lora_rank=settings.trainer.lora.rank,
                       adapter_choice=settings.adapter_choice, tokens=tokens, observer=metrics.chat)  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_keys:
            log.warning("gateway.no_api_keys", hint="set FEEDLOOP_API_KEYS='{\"app\": \"key\"}'")
        if owns_publisher:
            await ensure_topics(settings)
            await pub.start()
        await routing.poll()  # serve the newest router from the first request on
        reloads = asyncio.create_task(routing.run(settings.learners.snapshot_poll_s))
        try:
            yield
        finally:
            reloads.cancel()
            await chat.close()
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
    limits = Limits(
        max_event_bytes=settings.max_event_bytes,
        max_events=settings.max_events_per_request,
        dead_letter_max_raw_bytes=settings.dead_letter_max_raw_bytes,
        # The pipeline's bounds on event time, applied at the door.
        max_clock_skew_s=settings.pipeline.max_clock_skew_s,
        event_time_span_s=settings.pipeline.event_time_span_s,
    )
    for router in (
        dashboard_router(keys, overview),
        review_router(keys, desk, pub, limits),
        metrics.router(keys),
        events_router(keys, limiter, pub, limits, settings.max_body_bytes, tokens, settings.browser),
        browser_router(keys, limiter, tokens),
        route_router(keys, limiter, routing, metrics.route_latency),
        chat_router(keys, limiter, chat, settings.max_body_bytes),
        erase_router(keys, limiter, settings.key_store, sessions, pub),
        schemas_router(),
        health_router(),
    ):
        app.include_router(router)
    allow_listed_origins(app, settings.browser)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    with_components(app, USER_EVENT_ADAPTER, ROUTE_REQUEST)
    return app
