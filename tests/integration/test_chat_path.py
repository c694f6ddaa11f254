"""The chat path as the ``openai`` package sees it, with every way an answer can go wrong.

Real parts: the Tansu broker, the gateway under uvicorn, the archiver, the ``openai`` package
(sync, async, streaming) and httpx. **Mocked: the model server**, by
:class:`tests.integration.fake_vllm.FakeVllm` (why there). tests/serving/test_chat_gateway.py
runs the same path against the real vLLM server.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import openai
import pytest

from app.gateway.chat import INTERACTION_HEADER
from streams.topics import EVENTS
from tests.conftest import API_KEYS, wait_until_archived
from tests.integration.fake_vllm import KEY, ask, client


async def session_events(stack, session_id: str, count: int) -> list[dict]:
    records = await wait_until_archived(stack, EVENTS.name, count,
                                        where=lambda r: json.loads(r.value).get("session_id") == session_id)  # fmt: skip
    return [json.loads(r.value) for r in records]


async def recorded_only_the_later_answer(stack, session_id: str) -> None:
    """A good answer in the session after the failed one: once it is archived, anything the
    failed one recorded (published before it, on the same partition) would be too."""
    async with client(stack) as later:
        await later.chat.completions.create(**ask("fine", session_id))
    events = await session_events(stack, session_id, 1)
    assert [e["prompt"][-1]["content"] for e in events] == ["fine"], "the failed answer was recorded"


async def test_models_lists_auto_and_the_adapters_the_app_may_name(gateway):
    stack, _ = gateway
    async with client(stack) as a, client(stack, API_KEYS["app-b"]) as b:
        assert [m.id for m in (await a.models.list()).data] == ["auto", "base"]
        assert [m.id for m in (await b.models.list()).data] == ["auto"], "app-b would be refused 'base'"
        with pytest.raises(openai.AuthenticationError) as refused:
            await client(stack, "wrong").models.list()
    assert refused.value.code == "invalid_api_key" and refused.value.body["type"] == "authentication_error"


async def test_bad_requests_raise_the_exception_openai_raises(gateway):
    stack, vllm = gateway
    async with client(stack) as c:
        with pytest.raises(openai.BadRequestError) as empty:
            await c.chat.completions.create(model="auto", messages=[])
        assert empty.value.param == "messages" and empty.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as role:
            await c.chat.completions.create(model="auto", messages=[{"role": "robot", "content": "hi"}])
        assert role.value.param == "messages[0].role"
        with pytest.raises(openai.NotFoundError) as unknown:
            await c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert unknown.value.code == "model_not_found" and unknown.value.param == "model"
    async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        broken = await http.post("/v1/chat/completions", content=b'{"model": "auto", "messages": [',
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert vllm.bodies == [], "nothing refused reached the model server"


@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_error_keeps_its_status_and_records_nothing(gateway, stream):
    stack, _ = gateway
    session_id = f"s-{uuid.uuid4().hex}"
    async with client(stack) as c:
        with pytest.raises(openai.BadRequestError) as refused:
            await c.chat.completions.create(**ask("refuse", session_id, stream=stream))
    assert refused.value.body["message"] == "max_tokens is too large" and refused.value.param == "max_tokens"
    assert refused.value.body["type"] == "invalid_request_error", "vLLM's exception name is not an OpenAI type"
    assert INTERACTION_HEADER.lower() not in refused.value.response.headers, "no id for feedback to join"
    await recorded_only_the_later_answer(stack, session_id)


@pytest.mark.parametrize("script", ["fail", "break"])
async def test_a_stream_that_fails_midway_raises_in_the_client_and_records_nothing(gateway, script):
    stack, _ = gateway
    session_id = f"s-{uuid.uuid4().hex}"
    received = []
    async with client(stack) as c:
        with pytest.raises(openai.APIError) as failed:
            async for part in await c.chat.completions.create(**ask(script, session_id, stream=True)):
                received.append(part.choices[0].delta.content if part.choices else None)
    assert received == ["Cats "], "what came before the failure was relayed"
    assert ("engine died" if script == "fail" else "broke off") in failed.value.message
    await recorded_only_the_later_answer(stack, session_id)


async def test_two_streamed_choices_are_two_interactions_and_a_tool_call_is_recorded_as_one(gateway):
    stack, vllm = gateway
    session_id = f"s-{uuid.uuid4().hex}"
    extra = {"metadata": {"conversation": "c-1"}, "safety_identifier": "user-9"}
    async with client(stack) as c:
        stream = await c.chat.completions.create(**ask("two", session_id, stream=True, n=2, **extra))
        parts = [part async for part in stream]
    ids = parts[0].feedloop["interaction_ids"]
    assert len(ids) == 2 and parts[0].feedloop["session_id"] == session_id
    assert all(part.choices for part in parts), "the usage chunk only when the client asks for it"
    assert "metadata" not in vllm.bodies[-1] and "safety_identifier" not in vllm.bodies[-1]
    assert vllm.bodies[-1]["stream_options"] == {"include_usage": True}, "token counts are asked for all the same"
    events = {e["interaction_id"]: e for e in await session_events(stack, session_id, 2)}
    assert sorted(events) == sorted(ids)
    first, second = events[ids[0]], events[ids[1]]
    assert (first["response"], first["tool_calls"]) == ("Cats eat fish.", [])
    assert second["response"] == "" and second["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"animal": "cat"}'}}]
    assert first["user_id"] == "user-9" and first["metadata"] == {"conversation": "c-1"}
    assert first["prompt_tokens"] == 7 and first["completion_tokens"] is None, "usage counts both choices"


async def test_the_sync_client_reads_the_ids_from_the_body_and_usage_when_it_asks(gateway):
    stack, _ = gateway
    session_id = f"s-{uuid.uuid4().hex}"

    def chat() -> tuple:  # the sync client, in a thread: the gateway runs on this loop
        with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=KEY, max_retries=0) as c:
            return c.chat.completions.create(**ask("tool", session_id)), list(c.chat.completions.create(
                **ask("hi", session_id, stream=True, stream_options={"include_usage": True})))  # fmt: skip

    completion, parts = await asyncio.to_thread(chat)
    assert completion.feedloop["session_id"] == session_id and completion.feedloop["recorded"] is True
    assert completion.choices[0].message.tool_calls[0].function.name == "lookup"
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == 9
    ids = {completion.feedloop["interaction_id"], parts[0].feedloop["interaction_id"]}
    events = await session_events(stack, session_id, 2)
    tool = next(e for e in events if e["interaction_id"] == completion.feedloop["interaction_id"])
    assert {e["interaction_id"] for e in events} == ids
    assert tool["response"] == "" and tool["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'


async def test_a_client_that_leaves_mid_stream_records_what_it_got_marked_interrupted(gateway):
    stack, _ = gateway
    session_id = f"s-{uuid.uuid4().hex}"
    body = {"model": "auto", "stream": True, "messages": [{"role": "user", "content": "stall"}],
            "feedloop": {"session_id": session_id}}  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    break  # the first chunk, then the user closes the tab
    (event,) = await session_events(stack, session_id, 1)
    assert event["response"] == "Cats " and event["metadata"] == {"stream_interrupted": True}
