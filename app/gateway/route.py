"""``POST /v1/route``: which adapter should serve a request, and with what propensity.

Answered from the router the gateway holds in memory (``app.routing``): it never waits on the
broker or the store. The app sends the propensity back with the interaction, which is what
off-policy evaluation needs; the decision itself is logged here (``route.decided``).
"""

from __future__ import annotations

from typing import Any

import structlog
from fastapi import APIRouter, Request
from prometheus_client import Histogram
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from app.gateway.auth import ApiKeys
from app.gateway.http import UNAUTHENTICATED_DETAIL, ErrorBody, error, over_limit, read_limited
from app.rate_limit import RateLimiter
from app.gateway.openapi import body_schema, raw_body
from app.routing import RoutingService
from streams.contract import Context

log = structlog.get_logger(__name__)

# A route request is one context: anything much larger is a mistake, not a request.
ROUTE_MAX_BODY_BYTES = 64 * 1024


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


# Read raw, so that authentication comes first; the spec still documents it.
ROUTE_REQUEST = TypeAdapter(RouteRequest)


def route_router(keys: ApiKeys, limiter: RateLimiter, routing: RoutingService, latency: Histogram) -> APIRouter:
    """``latency`` times each decision (``feedloop_route_latency_seconds``)."""
    router = APIRouter()

    @router.post(
        "/v1/route",
        response_model=RouteAnswer,
        responses={401: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody},
                   429: {"model": ErrorBody}},
        openapi_extra=raw_body({"application/json": {"schema": body_schema(ROUTE_REQUEST)}}),
        summary="Choose the adapter that serves a request (in memory; never waits on the broker)",
    )  # fmt: skip
    async def route(request: Request) -> Any:
        app_id = keys.app_for_header(request)
        if app_id is None:
            return error(401, "unauthenticated", UNAUTHENTICATED_DETAIL)
        if (refused := over_limit(limiter, app_id)) is not None:
            return refused
        body, too_large = await read_limited(request, ROUTE_MAX_BODY_BYTES)
        if too_large:
            return error(413, "body_too_large", f"a route request is at most {ROUTE_MAX_BODY_BYTES} bytes")
        try:
            ask = RouteRequest.model_validate_json(body or b"{}")
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            return error(422, "invalid_request", f"{where}: {first['msg']}")
        if ask.app_id is not None and ask.app_id != app_id:
            return error(422, "app_id_mismatch", f"app_id '{ask.app_id}' is not the API key's app")
        with latency.time():
            decision = routing.decide(ask.context, app_id)
        # The decision log: with the interaction's propensity, what off-policy evaluation needs.
        log.info("route.decided", decision_id=decision.decision_id, app_id=app_id, adapter=decision.adapter,
                 propensity=decision.propensity, snapshot_version=decision.snapshot_version)  # fmt: skip
        return RouteAnswer(adapter=decision.adapter, propensity=decision.propensity,
                           probabilities=decision.probabilities, decision_id=decision.decision_id,
                           snapshot_version=decision.snapshot_version)  # fmt: skip

    return router
