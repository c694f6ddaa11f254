"""Poison on the real broker: no record stops the pipeline worker, no body makes the gateway fail.

The corpus (tests/poison.py) is produced straight to the events topic while a `feedloop worker`
runs, then a valid interaction, an event dated 2096, its feedback and a resent copy of the
interaction: the worker is still alive, every bad record is a dead letter with its reason
that fits in one message, and the interaction becomes an example with its feedback (the
2096 event moved neither the windows nor the de-duplication memory). The same corpus posted
to the gateway gets 4xx or 202-with-errors, never 5xx, each rejection dead-lettered.
"""

import base64
import json
import uuid

import httpx

from streams import kafka
from streams.intake import PRODUCER_MAX_REQUEST_BYTES, dead_letter_max_bytes
from streams.topics import DEAD_LETTER, EVENTS, EXAMPLES
from tests.conftest import API_KEYS, archived_records, make_settings, start_stack, wait_until_archived
from tests.factories import feedback, interaction
from tests.integration.test_pipeline_live import at, start_worker, stop_worker
from tests.poison import FAR_FUTURE, OVERSIZED, corpus

AUTH = {"Authorization": f"Bearer {API_KEYS['app-a']}", "Content-Type": "application/json"}


async def test_poison_on_the_events_topic_never_stops_the_worker(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    worker = start_worker(settings)
    session = f"s-poison-{uuid.uuid4().hex}"
    key = session.encode()
    expected: dict[str, str] = {}  # dead_letter_id -> reason
    producer = kafka.producer(settings.kafka, max_request_size=2_000_000)
    await producer.start()
    try:
        for case in corpus(session):
            sent = await producer.send_and_wait(EVENTS.name, case.value, key=key)
            expected[f"p{sent.partition}-{sent.offset}-{case.reason}"] = case.reason
        tombstone = await producer.send_and_wait(EVENTS.name, None, key=key)
        expected[f"p{tombstone.partition}-{tombstone.offset}-invalid_json"] = "invalid_json"

        # One batch, so nothing (no tick) comes between them in the partition.
        turn = interaction(session_id=session, occurred_at=at(0))
        future = interaction(session_id=session, occurred_at=FAR_FUTURE)
        thumbs = feedback(turn, "thumbs", occurred_at=at(5))
        batch = producer.create_batch()
        for event in (turn, future, thumbs, turn):
            batch.append(key=key, value=json.dumps(event).encode(), timestamp=None)
        first = (await (await producer.send_batch(batch, EVENTS.name, partition=tombstone.partition))).offset
        expected[f"p{tombstone.partition}-{first + 1}-clock_skew"] = "clock_skew"
        expected[f"p{tombstone.partition}-{first + 3}-duplicate_event"] = "duplicate_event"

        examples = await wait_until_archived(stack, EXAMPLES.name, 1, timeout_s=180)
        dead = await wait_until_archived(stack, DEAD_LETTER.name, len(expected), timeout_s=60)
        assert worker.poll() is None, "the worker stopped"
    finally:
        await producer.stop()
        stop_worker(worker)
        await stop()

    (example,) = [json.loads(r.value) for r in examples]
    assert example["example_id"] == turn["interaction_id"] and example["feedback_kinds"] == ["thumbs"]
    letters = {json.loads(r.value)["dead_letter_id"]: (json.loads(r.value), len(r.value)) for r in dead}
    assert {i: letter["reason"] for i, (letter, _) in letters.items()} == expected
    for letter, size in letters.values():
        assert size <= dead_letter_max_bytes(settings.dead_letter_max_raw_bytes) < PRODUCER_MAX_REQUEST_BYTES
        assert letter["stage"] == "pipeline" and letter["detail"]
    oversized = [letter for letter, _ in letters.values() if letter["reason"] == "event_too_large"]
    assert len(oversized) == 2 and all(x["raw_truncated"] and x["raw_size"] >= OVERSIZED for x in oversized)
    (skewed,) = [letter for letter, _ in letters.values() if letter.get("event_id") == future["event_id"]]
    assert FAR_FUTURE in skewed["detail"] and "Kafka record timestamp" in skewed["detail"]  # no gateway header


async def test_poison_bodies_get_4xx_or_202_with_errors_and_are_dead_lettered(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    cases = corpus()
    try:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as http:
            answers = [await http.post("/v1/events", content=case.value, headers=AUTH) for case in cases]
        dead = await wait_until_archived(stack, DEAD_LETTER.name, len(cases), timeout_s=60)
    finally:
        await stop()

    for case, answer in zip(cases, answers):
        status, reason = case.gateway
        assert answer.status_code == status, (case.name, answer.status_code, answer.text[:300])
        body = answer.json()
        if status == 202:
            assert (body["accepted"], [e["reason"] for e in body["errors"]]) == (0, [reason]), case.name
        else:
            assert body["reason"] == reason and body["detail"], case.name
    assert archived_records(stack, EVENTS.name) == [], "nothing of the corpus was accepted"
    letters = [json.loads(r.value) for r in dead]
    assert sorted(letter["reason"] for letter in letters) == sorted(case.gateway[1] for case in cases)
    assert all(len(r.value) <= dead_letter_max_bytes(settings.dead_letter_max_raw_bytes) for r in dead)
    assert {letter["stage"] for letter in letters} == {"gateway"}
    # A body rejected whole is kept byte for byte, up to the bound, with its size.
    kept = {base64.b64decode(letter["raw_b64"]) for letter in letters if letter["reason"] == "too_deeply_nested"}
    assert b"[" * 5000 + b"]" * 5000 in kept
    garbage = next(letter for letter in letters if letter["raw_size"] == OVERSIZED)
    assert garbage["raw_truncated"] and len(base64.b64decode(garbage["raw_b64"])) == settings.dead_letter_max_raw_bytes
