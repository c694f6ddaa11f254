"""Poison on the real broker: no record stops a reader of any topic, no body makes the gateway fail.

The corpus (tests/poison.py) is produced straight to the events topic while a `feedloop worker`
runs, then a valid interaction, an event dated 2096, its feedback and a resent copy of the
interaction: the worker is still alive, every bad record is a dead letter with its reason
that fits in one message, and the interaction becomes an example with its feedback (the
2096 event moved neither the windows nor the de-duplication memory). The same corpus posted
to the gateway gets 4xx or 202-with-errors, never 5xx, each rejection dead-lettered.
"""

import asyncio
import base64
import json
import uuid

import httpx
from click.testing import CliRunner

from app.cli import main
from app.processes import settings_env
from demo.base_model import ToyChats, build_tiny_model
from streams import kafka
from streams.intake import PRODUCER_MAX_REQUEST_BYTES, dead_letter_max_bytes
from streams.topics import CONTROL, DEAD_LETTER, EVENTS, EXAMPLES, REVIEW, control_key
from tests.conftest import API_KEYS, archived_records, free_port, make_settings, start_stack, wait_until_archived
from tests.factories import feedback, interaction
from tests.integration.test_pipeline_live import at, start_worker, stop_worker
from tests.poison import FAR_FUTURE, OVERSIZED, corpus
from tests.trainer.test_worker import emitted_at
from trainer.base_model import BaseModelConfig

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


async def test_poison_on_every_other_input_topic_is_dead_lettered_by_each_reader(tmp_path, own_broker):
    """The corpus on the examples, control and review topics while the worker, the learner, the
    trainer and the swap controller run: each reader of a topic dead-letters every record it
    cannot read (the learner: examples and control; the trainer and the swap controller:
    control), all of them keep running and keep working (the trainer still refuses a bad
    batch path after the corpus; a valid interaction and its feedback still become an
    example), and `feedloop status` renders an archive that holds it all."""
    settings = make_settings(tmp_path, own_broker.port)
    build_tiny_model(settings.model_path, ToyChats(count=40), BaseModelConfig(train_steps=1, log_every=1000))
    stack, stop = await start_stack(settings)
    elsewhere = {"FEEDLOOP_VLLM_URLS": f'["http://127.0.0.1:{free_port()}"]'}
    readers = {command: start_worker(settings, elsewhere, command=command) for command in ("learn", "train", "swap")}
    worker = start_worker(settings)
    readers_of = {EXAMPLES.name: ("learner",), CONTROL.name: ("learner", "trainer", "swap"), REVIEW.name: ()}
    expected: dict[str, str] = {}  # dead_letter_id -> reason, by the reader's own decoding
    producer = kafka.producer(settings.kafka, max_request_size=2_000_000)
    await producer.start()
    try:
        for topic, stages in readers_of.items():
            for case in corpus():
                sent = await producer.send_and_wait(topic, case.value, key=b"poison")
                for stage in stages:
                    expected[f"{stage}-{topic}-{sent.partition}-{sent.offset}"] = topic
            await producer.send_and_wait(topic, None, key=b"poison")  # a tombstone
        refused = emitted_at("../../etc", event_id=f"after-poison-{uuid.uuid4().hex[:8]}")
        await producer.send_and_wait(CONTROL.name, refused.model_dump_json().encode(), key=control_key(refused))
        expected[f"trainer-{refused.event_id}"] = "batch_path_refused"
        turn = interaction(occurred_at=at(0))
        for event in (turn, feedback(turn, "thumbs", occurred_at=at(5))):
            await producer.send_and_wait(EVENTS.name, json.dumps(event).encode(), key=turn["session_id"].encode())

        examples = await wait_until_archived(stack, EXAMPLES.name, 1, timeout_s=180,
                                             where=lambda r: turn["interaction_id"].encode() in (r.value or b""))
        ids = set(expected)
        dead = await wait_until_archived(stack, DEAD_LETTER.name, len(ids), timeout_s=180,
                                         where=lambda r: json.loads(r.value)["dead_letter_id"] in ids)
        for command, process in {**readers, "worker": worker}.items():
            assert process.poll() is None, f"`feedloop {command}` stopped"
    finally:
        await producer.stop()
        for process in (*readers.values(), worker):
            stop_worker(process)
        shown = await asyncio.to_thread(CliRunner().invoke, main, ["status"], env=settings_env(settings))
        await stop()

    assert len(examples) == 1
    letters = {json.loads(r.value)["dead_letter_id"]: json.loads(r.value) for r in dead}
    assert set(letters) == set(expected), "one dead letter per reader and record, none twice"
    for letter_id, letter in letters.items():
        assert letter["stage"] == letter_id.split("-")[0] and letter["reason"] and letter["detail"]
        assert len(json.dumps(letter)) <= dead_letter_max_bytes(settings.dead_letter_max_raw_bytes)
    assert letters[f"trainer-{refused.event_id}"]["reason"] == "batch_path_refused"
    nested = [x for x in letters.values() if x["raw_size"] == 10_000 and x["reason"] == "too_deeply_nested"]
    assert len(nested) == 4, "the learner twice, the trainer and the swap controller once each"
    assert shown.exit_code == 0 and "dead letters" in shown.output, shown.output[-2000:]
