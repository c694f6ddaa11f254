"""Prometheus metrics at ``GET /metrics`` (prometheus_client, text format 0.0.4).

Two kinds. Some are measured in this gateway process: the route latency (a histogram around
each ``/v1/route`` decision), every HTTP request by route template, the chat answers' time to
first token and tokens per second by adapter, and the process itself (``process_*``,
``python_info``). Everything else comes from ``app.overview`` at scrape time through a
custom collector, so a scrape always reads current values: the counters are counts of the
archive (the log of record), identical on every gateway replica and across restarts, and the
gauges are the store's current rows. docs/operations.md lists every metric.

Each app gets its own registry: several gateways in one process (the tests, the demo) must
not share or collide in the global one. So the process and platform collectors, which
prometheus_client registers only on the global registry, are registered on it too.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from app.gateway.auth import ApiKeys
from app.gateway.http import error
from app.overview import Overview, OverviewSource
from streams.contract import AdapterState

log = structlog.get_logger(__name__)

# Listed so that each has a series (at 0) before the first adapter or batch reaches it.
ADAPTER_STATES = tuple(AdapterState)
BATCH_STATUSES = ("emitted", "training", "trained", "failed")
# A decision is a few matrix products (tens of microseconds); a swap loads weights (seconds).
ROUTE_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25)
SWAP_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# An HTTP request is milliseconds, but a streamed chat answer lasts as long as its generation.
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# The first token waits for the prefill (and the queue); a small model on a GPU decodes
# hundreds of tokens a second, one on a CPU a few.
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TOKENS_PER_S_BUCKETS = (1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)


class OverviewCollector(Collector):
    """The overview's figures as metric families, read at each scrape."""

    def __init__(self, overview: OverviewSource) -> None:
        self.overview = overview

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("feedloop_overview_up", "1 if the store and archive could be read at this scrape.")
        try:
            snapshot = self.overview.read()
        except (SQLAlchemyError, OSError) as error:
            log.warning("metrics.overview_unavailable", error=str(error).splitlines()[0])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from archive_counters(snapshot)
        yield from store_gauges(snapshot)


def _labelled(family: Metric, values: dict[str, float]) -> Metric:
    for label, value in values.items():
        family.add_metric([label], value)
    return family


def archive_counters(snapshot: Overview) -> Iterator[Metric]:
    yield _labelled(CounterMetricFamily(
        "feedloop_events_accepted", "User events the gateway accepted, as counted in the archive.", labels=["type"]),
        snapshot.events_accepted)  # fmt: skip
    yield _labelled(CounterMetricFamily(
        "feedloop_dead_letters", "Records dead-lettered, by reason, as counted in the archive.", labels=["reason"]),
        snapshot.dead_letters)  # fmt: skip
    yield _labelled(CounterMetricFamily(
        "feedloop_archived_records", "Records in the archive per topic.", labels=["topic"]),
        snapshot.records_by_topic)  # fmt: skip
    yield CounterMetricFamily("feedloop_examples", "Annotated examples in the archive.", value=snapshot.examples)
    yield _labelled(CounterMetricFamily(
        "feedloop_drift_alarms", "Drift alarms on the control topic, by signal.", labels=["signal"]),
        snapshot.drift_alarms)  # fmt: skip


def store_gauges(snapshot: Overview) -> Iterator[Metric]:
    lag = GaugeMetricFamily("feedloop_consumer_lag_records",
                            "Archived offset minus the pipeline's checkpointed offset, per events partition.",
                            labels=["consumer", "partition"])  # fmt: skip
    for row in snapshot.lag:
        lag.add_metric([row.consumer, str(row.partition)], row.lag)
    yield lag
    yield _labelled(GaugeMetricFamily("feedloop_batches", "Training batches by status.", labels=["status"]),
                    {**dict.fromkeys(BATCH_STATUSES, 0), **snapshot.batches_by_status})  # fmt: skip
    states = Tally(adapter.state for adapter in snapshot.adapters)
    yield _labelled(GaugeMetricFamily("feedloop_adapters", "Adapters (training runs) by state.", labels=["state"]),
                    {**dict.fromkeys(ADAPTER_STATES, 0), **states})  # fmt: skip
    yield swap_latency(snapshot)
    yield GaugeMetricFamily("feedloop_privacy_epsilon_spent", "Epsilon spent by DP training runs (ledger).",
                            value=snapshot.privacy.spent_epsilon)  # fmt: skip
    yield GaugeMetricFamily("feedloop_privacy_epsilon_budget", "The deployment's total epsilon budget.",
                            value=snapshot.privacy.budget_epsilon)  # fmt: skip
    lift = GaugeMetricFamily("feedloop_ab_lift", "Running A/B tests: challenger minus champion mean reward, "
                             "with the confidence sequence's bounds.", labels=["challenger", "champion", "bound"])
    for experiment in snapshot.experiments:
        if experiment.status != "running":
            continue
        for bound, value in (("estimate", experiment.lift), ("lower", experiment.lower), ("upper", experiment.upper)):
            if value is not None:
                lift.add_metric([experiment.challenger, experiment.champion, bound], value)
    yield lift


def swap_latency(snapshot: Overview) -> HistogramMetricFamily:
    """From each adapter's ``lineage["serving"]["swap_ms"]`` (adapter_ready to loaded)."""
    seconds = [a.swap_ms / 1000 for a in snapshot.adapters if a.swap_ms is not None]
    buckets = [(str(le), sum(1 for s in seconds if s <= le)) for le in SWAP_BUCKETS_S]
    buckets.append(("+Inf", len(seconds)))
    return HistogramMetricFamily("feedloop_swap_latency_seconds", "Adapter hot-swap latency, adapter_ready to "
                                 "loaded.", buckets=buckets, sum_value=sum(seconds))  # fmt: skip


class ChatMetrics:
    """The chat service's observer (:class:`app.gateway.chat_observer.ChatObserver`): its
    timings as histograms by adapter, so a slower adapter shows beside the others. Adapters are
    a bounded label set: the router's arms and the base."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram("feedloop_chat_time_to_first_token_seconds", "Streamed chat answers: time from the "
                              "request to the first content chunk relayed, by adapter.", ["adapter"],
                              buckets=TTFT_BUCKETS_S, registry=registry)  # fmt: skip
        self.tokens_per_s = Histogram("feedloop_chat_tokens_per_second", "Chat answers: completion tokens (vLLM's "
                                      "usage) per second of generation, by adapter.", ["adapter"],
                                      buckets=TOKENS_PER_S_BUCKETS, registry=registry)  # fmt: skip

    def first_token(self, adapter: str, seconds: float) -> None:
        self.ttft.labels(adapter).observe(seconds)

    def generated(self, adapter: str, completion_tokens: int, seconds: float) -> None:
        self.tokens_per_s.labels(adapter).observe(completion_tokens / seconds)


class GatewayMetrics:
    """The gateway's registry: the process, the HTTP requests, the route latency, the refused
    requests, the chat timings and the overview collector."""

    def __init__(self, overview: OverviewSource) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter("feedloop_http_requests", "HTTP responses of this gateway process, by route template, "
                                "method and status.", ["route", "method", "status"], registry=self.registry)  # fmt: skip
        self.request_duration = Histogram("feedloop_http_request_duration_seconds", "Time from a request to the end "
                                          "of its response (a stream's last chunk), by route template and method.",
                                          ["route", "method"], buckets=HTTP_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.route_latency = Histogram("feedloop_route_latency_seconds", "Time to decide a /v1/route request.",
                                       buckets=ROUTE_BUCKETS_S, registry=self.registry)  # fmt: skip
        self.refused = Counter("feedloop_gateway_refused_requests", "Requests answered 401 (no or unknown key) or "
                               "429 (over the app's rate limit), by endpoint; in this gateway process since its start.",
                               ["endpoint", "status"], registry=self.registry)  # fmt: skip
        self.chat = ChatMetrics(self.registry)
        self.registry.register(OverviewCollector(overview))

    def router(self, keys: ApiKeys) -> APIRouter:
        router = APIRouter()

        @router.get("/metrics", summary="Prometheus metrics (docs/operations.md)")
        async def metrics(request: Request) -> Response:
            if (refused := keys.refusal(request)) is not None:
                return error(*refused)
            body = await asyncio.to_thread(generate_latest, self.registry)  # the collector reads the store
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        return router


# The endpoints a refusal is counted under; any other path is "other" (a label per user id
# or per scanner's guess would grow without bound).
_ENDPOINTS = ("/v1/events", "/v1/route", "/v1/chat/completions", "/v1/models", "/v1/overview", "/metrics",
              "/dashboard")


def endpoint_of(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    if path.startswith("/v1/users/") and path.endswith("/erase"):
        return "/v1/users/{user_id}/erase"
    return "other"


# The route of a request no route matched (a 404): one label for every path a scanner tries;
# likewise a method HTTP does not define (uvicorn's httptools parser refuses those, its h11
# one passes any token).
UNROUTED = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestMetrics:
    """ASGI middleware: counts and times every HTTP response by route template, and the 401
    and 429 ones in the refused counter. Refused requests are counted, not kept: anyone can
    send them.

    Plain ASGI, as :class:`app.gateway.request_id.RequestIdMiddleware` argues. The route is the
    template the router matched (``scope["route"]``, set as the request passes through it), not
    the raw path: a label per user id would grow without bound. A request is counted when the
    app returns, after the last body chunk, so a streamed answer is timed to its end; one that
    raised before answering counts as the 500 Starlette answers it with."""

    def __init__(self, app: Any, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def watching(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status in (401, 429):
                    self.metrics.refused.labels(endpoint_of(scope["path"]), str(status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, watching)
        finally:
            route = getattr(scope.get("route"), "path", UNROUTED)
            method = scope["method"] if scope["method"] in METHODS else UNROUTED
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.request_duration.labels(route, method).observe(time.perf_counter() - started)
