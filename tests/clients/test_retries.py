"""Retries against the real gateway: its rate limiter's 429 is retried after Retry-After;
any other 4xx is raised at once with the gateway's own reason."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.rate_limit import RateLimit
from feedloop_client import AsyncFeedloopClient, FeedloopClient, FeedloopError, RetryPolicy
from tests.clients.recording import AsyncRecordingTransport, Recording, RecordingTransport
from tests.conftest import API_KEYS, make_settings, start_stack


async def test_a_429_is_retried_no_sooner_than_its_retry_after(tmp_path, broker):
    # One request, then one every 2 s: the second send meets the limit and must wait it out.
    settings = make_settings(tmp_path, broker.port, rate_limits={"app-a": RateLimit(requests_per_s=0.5, burst=1)})
    stack, stop = await start_stack(settings)
    recording = Recording()
    try:
        with FeedloopClient(stack.base_url, api_key=API_KEYS["app-a"], app_id="app-a",
                            transport=RecordingTransport(recording)) as client:  # fmt: skip
            turn = client.interaction(user_id="u", session_id="s", adapter="base",
                                      prompt=[{"role": "user", "content": "hi"}], response="hello")  # fmt: skip
            first = await asyncio.to_thread(client.send, [turn])
            second = await asyncio.to_thread(client.send, [client.feedback(turn, "thumbs", value=1)])
    finally:
        await stop()
    assert (first.accepted, second.accepted) == (1, 1)
    assert recording.statuses == [202, 429, 202]
    refused, retried = recording.exchanges[1:]
    assert retried.sent_at - refused.answered_at >= float(refused.retry_after)


async def test_another_4xx_is_raised_with_the_gateways_reason_and_not_retried(stack):
    body = b"[{not json"
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        plain = await http.post("/v1/events", content=body, headers={
            "Authorization": f"Bearer {API_KEYS['app-a']}", "Content-Type": "application/json"})  # fmt: skip
    assert plain.status_code == 422
    for key, sent, status, reason in [(API_KEYS["app-a"], body, 422, plain.json()["reason"]),
                                      ("not-a-key", b"[]", 401, "unauthenticated")]:  # fmt: skip
        recording = Recording()
        async with AsyncFeedloopClient(stack.base_url, api_key=key, app_id="app-a",
                                       retry=RetryPolicy(attempts=5, base_delay_s=0.01),
                                       transport=AsyncRecordingTransport(recording)) as client:  # fmt: skip
            with pytest.raises(FeedloopError) as raised:
                await client.send_raw(sent)
        assert (raised.value.status, raised.value.reason) == (status, reason)
        assert raised.value.detail and raised.value.detail in str(raised.value)
        assert recording.statuses == [status], "a 4xx other than 429 must not be retried"


async def test_an_unreachable_gateway_is_retried_then_raised():
    recording = Recording()
    with FeedloopClient("http://127.0.0.1:9", api_key="k", app_id="app-a",
                        retry=RetryPolicy(attempts=3, base_delay_s=0.01),
                        transport=RecordingTransport(recording)) as client:  # fmt: skip
        with pytest.raises(httpx.TransportError):
            await asyncio.to_thread(client.send, [])
    assert (recording.sent, recording.statuses) == (3, [])
