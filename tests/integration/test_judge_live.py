"""`feedloop judge` on the real embedded broker, against a fake judge endpoint.

The judge is :class:`FakeJudge`, a real HTTP server speaking the OpenAI chat API, because a
real judge model cannot be made to fail on demand (an outage of a set length, then answers)
nor to answer with prose where a verdict was asked, and those are the cases under test.
Everything on this side of the socket is real: the openai client and its errors, the
annotator's consumer group and commits, the broker, and the pipeline (run on the records
the topic holds, as the worker runs it) that joins the annotations into examples.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import pytest
from aiohttp import web

from app.broker import ensure_topics
from app.runtime import build_annotator
from streams import kafka
from streams.contract import DeadLetter, EVENTS_TOPIC_ADAPTER, Annotation
from streams.pii import Scrubber
from streams.pipeline import PipelineSet
from streams.pseudonyms import Pseudonymizer
from streams.self_eval import JudgeSettings, annotation_id
from streams.topics import DEAD_LETTER, EVENTS
from tests.conftest import free_port, make_settings
from tests.factories import interaction

VERDICT = {"score": 0.9, "confidence": 0.8}


class FakeJudge:
    """``POST /v1/chat/completions``: 503 for the first ``outage`` requests, then a verdict, or
    prose for a conversation that says MALFORMED. Counts the requests per interaction."""

    def __init__(self, outage: int) -> None:
        self.outage, self.port = outage, free_port()
        self.requests: list[str] = []  # the user message of each

    async def __aenter__(self) -> FakeJudge:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.answer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def answer(self, request: web.Request) -> web.Response:
        asked = (await request.json())["messages"][-1]["content"]
        self.requests.append(asked)
        if len(self.requests) <= self.outage:
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        reply = "It is a good answer, 0.9." if "MALFORMED" in asked else json.dumps(VERDICT)
        return web.json_response({
            "id": "c", "object": "chat.completion", "created": 0, "model": "judge-1",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}],
            "usage": {"prompt_tokens": 90, "completion_tokens": 10, "total_tokens": 100},
        })  # fmt: skip


def turn(tag: str, **overrides) -> dict:
    now = datetime.now(timezone.utc).isoformat()
    return interaction(occurred_at=now, prompt=[{"role": "user", "content": f"question {tag}"}], **overrides)


async def publish(settings, events: list[dict]) -> None:
    producer = kafka.producer(settings.kafka)
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(EVENTS.name, json.dumps(event).encode(), key=event["session_id"].encode())
    finally:
        await producer.stop()


async def topic_records(settings, until, timeout_s: float = 60.0) -> tuple[list[bytes], list[DeadLetter]]:
    """Every events record (raw, in offset order: one partition) and every dead letter, read
    again from the start until ``until(annotations, dead_letters)`` holds or the time is up."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        consumer = kafka.consumer(settings.kafka, EVENTS.name, DEAD_LETTER.name, group_id=None)
        await consumer.start()
        events, dead = [], []
        try:
            while batches := await consumer.getmany(timeout_ms=1_000):
                for tp, records in batches.items():
                    for record in records:
                        if tp.topic == EVENTS.name:
                            events.append(record.value)
                        else:
                            dead.append(DeadLetter.model_validate_json(record.value))
        finally:
            await consumer.stop()
        annotations = [e for e in map(EVENTS_TOPIC_ADAPTER.validate_json, events) if isinstance(e, Annotation)]
        if until(annotations, dead) or asyncio.get_running_loop().time() > deadline:
            return events, dead
        await asyncio.sleep(0.5)


def annotations_in(events: list[bytes]) -> list[Annotation]:
    return [e for e in map(EVENTS_TOPIC_ADAPTER.validate_json, events) if isinstance(e, Annotation)]


@pytest.fixture
def judge_settings(tmp_path, own_broker):
    def make(port: int):
        judge = JudgeSettings(base_url=f"http://127.0.0.1:{port}/v1", model="judge-1", max_per_hour=6,
                              retries=6, backoff_s=0.05, backoff_max_s=0.2, timeout_s=5)  # fmt: skip
        return make_settings(tmp_path, own_broker.port, topic_partitions=1, judge=judge)  # one order to read

    return make


async def test_one_annotation_per_judged_interaction_across_an_outage_and_a_restart(judge_settings):
    async with FakeJudge(outage=3) as judge:
        settings = judge_settings(judge.port)
        await ensure_topics(settings)
        good = [turn(f"good-{i}") for i in range(4)]
        malformed, opted_out = turn("MALFORMED"), turn("opted-out", training_consent=False)
        last, over_budget = turn("good-4"), turn("over-budget")
        first = [*good, malformed, opted_out, last, over_budget]
        await publish(settings, first)

        annotator = await build_annotator(settings)
        running = asyncio.create_task(annotator.run())
        events, dead = await topic_records(settings, lambda a, d: annotator.counts.skipped.get("over_budget"))
        assert annotator.counts.skipped == {"no_consent": 1, "over_budget": 1}  # 6 requests answered this hour
        annotator.stop()
        await running

        judged = [*good, last]
        assert sorted(a.event_id for a in annotations_in(events)) == sorted(
            annotation_id("app-a", t["interaction_id"], "helpful-v1") for t in judged)  # one each, no more
        assert {(a.score, a.confidence, a.source, a.annotator, a.rubric) for a in annotations_in(events)} == {
            (0.9, 0.8, "model", "judge-1", "helpful-v1")}  # fmt: skip
        assert [(d.reason, d.event_id) for d in dead] == [("judge_malformed", malformed["event_id"])]
        assert len(judge.requests) == 3 + 6  # the outage's three, then one answered request per judged interaction
        assert annotator.budget.total_tokens == 600

        # A restarted judge goes on after what the first committed: nothing is judged twice.
        later = [turn("after-restart-0"), turn("after-restart-1")]
        await publish(settings, later)
        restarted = await build_annotator(settings)
        running = asyncio.create_task(restarted.run())
        events, dead = await topic_records(settings, lambda a, d: len(a) >= 7)
        restarted.stop()
        await running
        assert len(judge.requests) == 9 + 2 and restarted.counts.annotated == 2 and not restarted.counts.skipped
        assert len(annotations_in(events)) == len({a.event_id for a in annotations_in(events)}) == 7

    # The pipeline joins them: each judged interaction's example carries self_eval, and an
    # annotation delivered twice (a judge killed between its send and its commit) counts once.
    again = next(e for e in events if b'"annotation"' in e)
    pipelines = PipelineSet(settings.pipeline, Scrubber(), Pseudonymizer(settings.key_store()))
    for offset, value in enumerate([*events, again]):
        pipelines.process(0, offset, value)
    examples = {e.example_id: e.rewards["self_eval"] for e in pipelines.finish().examples}
    assert examples == {t["interaction_id"]: 0.9 if t in [*judged, *later] else None for t in [*first, *later]}
    assert pipelines.counts()["duplicate_event"] == 1
