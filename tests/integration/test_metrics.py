"""``/metrics`` of a real gateway after real requests: the process, the HTTP requests by route
template, and the chat answers' timings by adapter; and the Grafana dashboard's queries
against what it exposes.

Real parts: the Tansu broker, the gateway under uvicorn, the archiver, the ``openai`` package.
Mocked: the model server (the ``gateway`` fixture's :class:`tests.integration.fake_vllm.FakeVllm`).
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.gateway.metrics import GatewayMetrics, RequestMetrics
from tests.conftest import OPERATOR
from tests.integration.fake_vllm import ask, client
from tests.integration.test_dashboard import scrape


DASHBOARD = Path(__file__).parents[2] / "docker" / "grafana" / "feedloop.json"
# What a query names beyond a family: a counter's sample, a histogram's series.
SERIES_SUFFIX = re.compile(r"_(total|bucket|count|sum)$")


async def get_metrics(stack) -> str:
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        response = await http.get("/metrics", headers=OPERATOR)
    assert response.status_code == 200
    return response.text


def by_labels(series: dict[tuple, float], *names: str) -> dict[tuple, float]:
    return {tuple(dict(labels)[n] for n in names): value for labels, value in series.items()}


async def test_metrics_count_requests_by_route_and_time_chat_answers_by_adapter(gateway):
    stack, _ = gateway
    scanned = f"/wp-admin/{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.post("/v1/users/u-1/erase")).status_code == 401
        assert (await http.get(scanned)).status_code == 404
    session_id = f"s-{uuid.uuid4().hex}"
    async with client(stack) as c:
        await c.chat.completions.create(**ask("hi", session_id))
        assert [part async for part in await c.chat.completions.create(**ask("hi", session_id, stream=True))]
    metrics = scrape(await get_metrics(stack))

    assert "process_cpu_seconds_total" in metrics and "process_resident_memory_bytes" in metrics
    assert "python_info" in metrics
    requests = by_labels(metrics["feedloop_http_requests_total"], "route", "method", "status")
    assert requests[("/healthz", "GET", "200")] == 1
    assert requests[("/v1/users/{user_id}/erase", "POST", "401")] == 1, "the template, not the user's path"
    assert requests[("other", "GET", "404")] == 1
    assert requests[("/v1/chat/completions", "POST", "200")] == 2, "the streamed answer counts once it ended"
    assert not any(scanned in route for route, _, _ in requests), "no label per raw path"
    durations = by_labels(metrics["feedloop_http_request_duration_seconds_count"], "route", "method")
    assert durations[("/v1/chat/completions", "POST")] == 2

    ttft = by_labels(metrics["feedloop_chat_time_to_first_token_seconds_count"], "adapter")
    assert ttft == {("base",): 1}, "only the streamed answer has a first token"
    tokens = by_labels(metrics["feedloop_chat_tokens_per_second_count"], "adapter")
    assert tokens == {("base",): 2}, "both answers report their completion tokens"
    assert metrics["feedloop_chat_tokens_per_second_sum"][(("adapter", "base"),)] > 0


async def test_the_grafana_dashboard_queries_only_metrics_the_gateway_exposes(stack):
    exposed = {family.name for family in text_string_to_metric_families(await get_metrics(stack))}
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queried = {SERIES_SUFFIX.sub("", name) for panel in panels for target in panel["targets"]
               for name in re.findall(r"\b(?:feedloop|process)_[a-z_]+", target["expr"])}  # fmt: skip
    assert {"feedloop_http_requests", "feedloop_chat_tokens_per_second", "feedloop_consumer_lag_records"} <= queried
    assert queried <= exposed, f"not on /metrics: {sorted(queried - exposed)}"


async def test_a_made_up_method_is_counted_as_other():
    """Through the middleware alone: uvicorn's default parser answers such a request 400 itself."""
    class Unreadable:  # a scrape then says feedloop_overview_up 0
        def read(self) -> None:
            raise OSError("no store in this test")

    metrics = GatewayMetrics(Unreadable())

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 405, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def ignore(message) -> None:
        pass

    await RequestMetrics(app, metrics)({"type": "http", "method": "BREW", "path": "/healthz"}, None, ignore)
    assert metrics.registry.get_sample_value("feedloop_http_requests_total",
                                             {"route": "other", "method": "other", "status": "405"}) == 1  # fmt: skip
