"""Events posted to the gateway reach the topics and the archive; bad input is dead-lettered.

Real parts: the Tansu broker, uvicorn serving the gateway on loopback, the archiver, SQLite.
"""

import asyncio
import base64
import json
import uuid

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from feedloop_client import FeedloopClient, FeedloopError
from streams.topics import DEAD_LETTER, EVENTS
from app.rate_limit import RateLimit
from tests.conftest import API_KEYS, OPERATOR, archived_records, make_settings, start_stack, wait_until_archived
from tests.factories import annotation, feedback, interaction

AUTH = {"Authorization": f"Bearer {API_KEYS['app-a']}"}


async def post(stack, body, content_type="application/json", headers=AUTH):
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
        if not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        return await http.post("/v1/events", content=body, headers={**headers, "Content-Type": content_type})


async def marked_dead_letters(stack, marker: str, count: int) -> list[dict]:
    """The archived dead letters whose raw bytes carry this test's marker, once ``count`` are in."""
    for _ in range(300):
        letters = [json.loads(r.value) for r in archived_records(stack, DEAD_LETTER.name)]
        letters = [x for x in letters if marker.encode() in base64.b64decode(x["raw_b64"])]
        if len(letters) >= count:
            break
        await asyncio.sleep(0.1)
    return letters


def mine(records, ids):
    """Archive records whose value mentions one of this test's ids (topics are shared)."""
    return [r for r in records if r.value and any(i.encode() in r.value for i in ids)]


async def test_events_reach_topic_and_archive_with_feedback_beside_its_interaction(stack):
    turns = [interaction() for _ in range(20)]
    events = turns + [feedback(t, kind) for t in turns for kind in ("thumbs", "copy")]
    events.append(annotation(turns[0]))
    response = await post(stack, events)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 61, "rejected": 0, "errors": []}

    ids = [e["event_id"] for e in events]
    records = await wait_until_archived(stack, EVENTS.name, 61, where=lambda r: bool(mine([r], ids)))
    assert sorted(json.loads(r.value)["event_id"] for r in records) == sorted(ids)
    partition_of = {}
    for r in records:
        value = json.loads(r.value)
        assert r.key == value["session_id"].encode()
        assert r.headers["app_id"] == b"app-a"
        partition_of.setdefault(value["interaction_id"], set()).add(r.partition)
    assert all(len(parts) == 1 for parts in partition_of.values()), "feedback left its interaction's partition"
    assert len({p for parts in partition_of.values() for p in parts}) > 1  # keys do spread

    # The topic itself holds them too (the archive is a copy, not the only path).
    consumer = AIOKafkaConsumer(EVENTS.name, bootstrap_servers=stack.settings.bootstrap_servers,
                                auto_offset_reset="earliest", group_id=f"check-{uuid.uuid4().hex}")
    await consumer.start()
    try:
        seen = set()
        for _ in range(50):
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                seen.update(json.loads(m.value)["event_id"] for m in batch)
            if set(ids) <= seen:
                break
        assert set(ids) <= seen
    finally:
        await consumer.stop()


async def test_malformed_events_are_rejected_with_reasons_and_dead_lettered(stack):
    good = interaction()
    marker = uuid.uuid4().hex
    body = [
        good,
        {"type": "sparkle", "event_id": f"unknown-{marker}"},
        {**feedback(good, "sparkle"), "event_id": f"kind-{marker}"},
        {**interaction(response="x" * 300_000), "event_id": f"big-{marker}"},
        {**{k: v for k, v in interaction().items() if k != "session_id"}, "event_id": f"missing-{marker}"},
        {**interaction(prompt_tokens="many"), "event_id": f"type-{marker}"},
    ]
    response = await post(stack, body)
    assert response.status_code == 202
    result = response.json()
    assert result["accepted"] == 1 and result["rejected"] == 5
    reasons = {e["event_id"]: (e["index"], e["reason"]) for e in result["errors"]}
    assert reasons == {
        f"unknown-{marker}": (1, "unknown_type"),
        f"kind-{marker}": (2, "schema_violation"),
        f"big-{marker}": (3, "event_too_large"),
        f"missing-{marker}": (4, "schema_violation"),
        f"type-{marker}": (5, "schema_violation"),
    }
    details = {e["event_id"]: e["detail"] for e in result["errors"]}
    assert "session_id: Field required" in details[f"missing-{marker}"]
    assert "prompt_tokens" in details[f"type-{marker}"]

    bad_json = f'{{"type": "interaction", "event_id": "json-{marker}", '.encode()
    response = await post(stack, bad_json, headers={**AUTH, "X-Request-Id": f"req-{marker}"})
    assert response.status_code == 422
    assert response.headers["x-request-id"] == f"req-{marker}"
    assert response.json()["reason"] == "invalid_json"

    letters = await marked_dead_letters(stack, marker, 6)
    by_reason = sorted(letter["reason"] for letter in letters)
    assert by_reason == sorted(["unknown_type", "schema_violation", "event_too_large", "schema_violation",
                                "schema_violation", "invalid_json"])
    for letter in letters:
        assert letter["app_id"] == "app-a" and letter["stage"] == "gateway" and letter["detail"]
    whole_body = next(letter for letter in letters if letter["reason"] == "invalid_json")
    assert base64.b64decode(whole_body["raw_b64"]) == bad_json  # the exact bytes are kept
    assert await wait_until_archived(stack, EVENTS.name, 1, where=lambda r: bool(mine([r], [good["event_id"]])))


async def test_jsonl_bodies(stack):
    events = [interaction(), interaction()]
    body = "\n".join(json.dumps(e) for e in events) + "\n{broken\n"
    response = await post(stack, body, "application/x-ndjson")
    assert response.status_code == 202
    assert (response.json()["accepted"], response.json()["rejected"]) == (2, 1)
    assert response.json()["errors"][0]["reason"] == "invalid_json"


async def test_auth_and_size_limits(stack):
    marker = uuid.uuid4().hex
    response = await post(stack, [interaction(event_id=f"nokey-{marker}")], headers={})
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["detail"]
    response = await post(stack, [interaction()], headers={"X-API-Key": "wrong"})
    assert response.status_code == 401
    response = await post(stack, [interaction()], headers={"X-API-Key": API_KEYS["app-a"]})
    assert response.status_code == 202

    huge = json.dumps([interaction(response="y" * 100_000, event_id=f"huge-{marker}-{i}") for i in range(90)])
    assert len(huge) > stack.settings.max_body_bytes
    response = await post(stack, huge)
    assert response.status_code == 413
    assert "send smaller batches" in response.json()["detail"]

    # The oversized body is dead-lettered; the requests without a valid key are only counted:
    # anyone can send those, so keeping them would let anyone fill the disk.
    (letter,) = await marked_dead_letters(stack, marker, 1)
    assert letter["reason"] == "body_too_large" and letter["raw_truncated"] and letter["raw_size"] > 0
    await asyncio.sleep(1.0)  # the archiver's flush interval is 0.2 s: a nokey letter would be in by now
    assert [x["reason"] for x in await marked_dead_letters(stack, marker, 2)] == ["body_too_large"]
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        metrics = (await http.get("/metrics", headers=OPERATOR)).text
    assert 'feedloop_gateway_refused_requests_total{endpoint="/v1/events",status="401"} 2.0' in metrics


async def test_an_app_over_its_rate_limit_gets_429_with_retry_after_and_others_go_on(tmp_path, broker):
    limits = {"app-a": RateLimit(requests_per_s=0.05, burst=2), "*": RateLimit(requests_per_s=100, burst=100)}
    running, stop = await start_stack(make_settings(tmp_path, broker.port, rate_limits=limits))
    try:
        a, b = {"X-API-Key": API_KEYS["app-a"]}, {"X-API-Key": API_KEYS["app-b"]}
        async with httpx.AsyncClient(base_url=running.base_url, timeout=30) as http:
            answers = [await http.post("/v1/route", json={"context": {}}, headers=a) for _ in range(3)]
            assert [r.status_code for r in answers] == [200, 200, 429]
            assert answers[2].json()["reason"] == "rate_limited" and int(answers[2].headers["retry-after"]) >= 1
            events = await http.post("/v1/events", json=[interaction(app_id="app-a")], headers=a)
            assert events.status_code == 429, "one bucket per app, whatever the endpoint"
            assert (await http.post("/v1/route", json={"context": {}}, headers=b)).status_code == 200
            metrics = (await http.get("/metrics", headers=OPERATOR)).text
        assert 'feedloop_gateway_refused_requests_total{endpoint="/v1/route",status="429"} 1.0' in metrics
    finally:
        await stop()


async def test_same_event_twice_is_archived_per_arrival_with_one_event_id(stack):
    event = interaction()
    with FeedloopClient(stack.base_url, api_key=API_KEYS["app-a"], app_id="app-a") as client:
        for _ in range(2):
            result = await asyncio.to_thread(client.send_raw, json.dumps([event]).encode())
            assert result.accepted == 1
    copies = await wait_until_archived(stack, EVENTS.name, 2, where=lambda r: bool(mine([r], [event["event_id"]])))
    assert len(copies) == 2
    assert copies[0].offset != copies[1].offset
    assert json.loads(copies[0].value) == json.loads(copies[1].value)


async def test_python_client_builds_valid_events_and_raises_clear_errors(stack):
    with FeedloopClient(stack.base_url, api_key=API_KEYS["app-b"], app_id="app-b") as client:
        turn = client.interaction(user_id="u", session_id="s", adapter="base",
                                  prompt=[{"role": "user", "content": "hi"}], response="hello")
        result = await asyncio.to_thread(client.send, [turn, client.feedback(turn, "rating", value=5)])
        assert (result.accepted, result.rejected) == (2, 0)
    with FeedloopClient(stack.base_url, api_key="nope", app_id="app-b") as client:
        try:
            await asyncio.to_thread(client.send, [])
        except FeedloopError as error:
            assert error.status == 401 and error.reason == "unauthenticated"
        else:
            raise AssertionError("a bad key must raise")


async def test_openapi_and_schemas_are_served(stack):
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        spec = (await http.get("/openapi.json")).json()
        body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["type"] == "array"
        assert {"Interaction", "Feedback", "Annotation"} <= set(spec["components"]["schemas"])
        schema = (await http.get("/v1/schemas/feedback.json")).json()
        assert "kind" in schema["properties"]
        assert (await http.get("/v1/schemas/nope.json")).status_code == 404


async def test_erase_endpoint_shreds_the_users_key(stack):
    from streams.pseudonyms import Pseudonymizer, user_identity

    user = user_identity("app-a", "user-to-erase")  # AUTH is app-a's key
    pseudonyms = Pseudonymizer(stack.settings.key_store())
    before = pseudonyms.pseudonym(user)
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        assert (await http.post("/v1/users/user-to-erase/erase")).status_code == 401
        response = await http.post("/v1/users/user-to-erase/erase", headers=AUTH)
    assert response.status_code == 202 and response.json()["erased_at"] and response.json()["app_id"] == "app-a"
    fresh = Pseudonymizer(stack.settings.key_store())
    assert fresh.erased_at(user) is not None
    assert fresh.pseudonym(user) != before


async def test_python_client_routes_through_the_gateway(stack):
    with FeedloopClient(stack.base_url, api_key=API_KEYS["app-a"], app_id="app-a") as client:
        answer = await asyncio.to_thread(client.route, {"domain": "code", "locale": "en"})
    # Before any learner snapshot, the router serves the configured initial arms.
    assert answer.adapter == stack.settings.learners.initial_arms[0]
    assert answer.probabilities[answer.adapter] == answer.propensity
    assert abs(sum(answer.probabilities.values()) - 1) < 1e-9
    with FeedloopClient(stack.base_url, api_key="nope", app_id="app-a") as client:
        try:
            await asyncio.to_thread(client.route, {})
        except FeedloopError as error:
            assert error.status == 401
        else:
            raise AssertionError("a bad key must raise")


async def test_the_openai_package_sees_a_rate_limited_app_as_its_own_rate_limit_error(tmp_path, broker):
    import openai

    limits = {"app-a": RateLimit(requests_per_s=0.05, burst=1)}
    settings = make_settings(tmp_path, broker.port, rate_limits=limits, vllm_urls=["http://127.0.0.1:9"])
    running, stop = await start_stack(settings)
    try:
        client = openai.AsyncOpenAI(base_url=f"{running.base_url}/v1", api_key=API_KEYS["app-a"], max_retries=0)
        ask = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(openai.APIError) as first:  # the token is taken; no vLLM answers behind it
            await client.chat.completions.create(**ask)
        assert not isinstance(first.value, openai.RateLimitError)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.chat.completions.create(**ask)
        assert limited.value.code == "rate_limit_exceeded" and int(limited.value.response.headers["retry-after"]) >= 1
        await client.close()
    finally:
        await stop()
