"""The archive outlives the broker and the archiver: nothing acknowledged is lost or doubled."""

import asyncio
import json

import httpx
import pytest
from sqlalchemy import select

from app.broker import EmbeddedBroker, ensure_topics
from app.runtime import gateway_server, wait_started
from streams.store import ArchiveSegment
from streams.archive import verify_archive
from streams.topics import EVENTS
from tests.conftest import API_KEYS, archived_records, free_port, make_settings, start_stack, wait_until_archived
from tests.factories import feedback, interaction

AUTH = {"Authorization": f"Bearer {API_KEYS['app-a']}", "Content-Type": "application/json"}


async def post_events(base_url: str, count: int) -> list[str]:
    turns = [interaction() for _ in range(count // 2)]
    events = turns + [feedback(t) for t in turns]
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        response = await http.post("/v1/events", content=json.dumps(events), headers=AUTH)
    assert response.status_code == 202 and response.json()["accepted"] == len(events)
    return [e["event_id"] for e in events]


def event_ids(records) -> list[str]:
    return [json.loads(r.value)["event_id"] for r in records]


async def test_archive_survives_broker_kill_and_continues_on_a_new_broker(tmp_path):
    broker = EmbeddedBroker(free_port())
    broker.start()
    settings = make_settings(tmp_path, broker.port)
    stack, stop = await start_stack(settings)
    try:
        posted = await post_events(stack.base_url, 400)
        records = await wait_until_archived(stack, EVENTS.name, 400)
        assert sorted(event_ids(records)) == sorted(posted)
    finally:
        await stop()
    broker.kill()  # the memory-only broker forgets every topic

    with stack.sessions() as session:
        report = verify_archive(session, settings.archive_dir)
        recorded = sum(s.event_count for s in session.scalars(select(ArchiveSegment)))
    assert report.ok, report.problems
    assert report.records == recorded == 400
    assert sorted(event_ids(archived_records(stack, EVENTS.name))) == sorted(posted)

    # A new broker life starts offsets at zero again; its segments must not collide.
    second = EmbeddedBroker(broker.port)
    second.start()
    try:
        assert second.cluster_id != broker.cluster_id
        stack, stop = await start_stack(settings)
        try:
            more = await post_events(stack.base_url, 100)
            records = await wait_until_archived(stack, EVENTS.name, 500)
        finally:
            await stop()
    finally:
        second.stop()
    assert sorted(event_ids(records)) == sorted(posted + more)
    with stack.sessions() as session:
        clusters = set(session.scalars(select(ArchiveSegment.cluster_id)))
        assert clusters == {broker.cluster_id, second.cluster_id}
        assert verify_archive(session, settings.archive_dir).records == 500


@pytest.fixture
def own_broker():
    """A broker of the test's own: these tests count every record on the topics."""
    with EmbeddedBroker(free_port()) as broker:
        yield broker


async def test_archiver_crash_before_sealing_loses_nothing(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port, archive_flush_seconds=3600.0, archive_flush_events=100_000)
    stack, stop = await start_stack(settings)
    posted = await post_events(stack.base_url, 200)
    for _ in range(300):  # wait until consumed into the buffer; sealing is an hour away
        if sum(len(b.lines) for b in stack.archiver.buffers.values()) >= 200:
            break
        await asyncio.sleep(0.1)
    assert archived_records(stack, EVENTS.name) == []
    stack.archiver.consumer.commit = _crash  # die without committing what it had buffered
    with pytest.raises(RuntimeError, match="simulated crash"):
        await stop()

    settings = settings.model_copy(update={"archive_flush_seconds": 0.2})
    stack, stop = await start_stack(settings)
    try:
        records = await wait_until_archived(stack, EVENTS.name, 200)
        await asyncio.sleep(1)
        records = archived_records(stack, EVENTS.name)
    finally:
        await stop()
    assert sorted(event_ids(records)) == sorted(posted)


async def test_crash_between_recording_and_committing_doubles_nothing(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    stack.archiver.consumer.commit = _crash  # the segment is recorded, the offset never committed
    try:
        posted = await post_events(stack.base_url, 100)
        for _ in range(100):
            if archived_records(stack, EVENTS.name):
                break
            await asyncio.sleep(0.1)
    finally:
        with pytest.raises(Exception):
            await stop()
    first_life = archived_records(stack, EVENTS.name)
    assert first_life, "the archiver should have recorded a segment before its commit failed"

    stack, stop = await start_stack(settings)
    try:
        await wait_until_archived(stack, EVENTS.name, 100)
        await asyncio.sleep(1.5)  # give a duplicate time to show up
        records = archived_records(stack, EVENTS.name)
    finally:
        await stop()
    ids = event_ids(records)
    assert sorted(ids) == sorted(posted) and len(ids) == len(set(ids))


async def _crash(*args, **kwargs):
    raise RuntimeError("simulated crash")


async def test_gateway_answers_503_when_the_broker_is_gone_and_accepts_nothing(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port, publish_timeout_s=2.0)
    await ensure_topics(settings)
    server = gateway_server(settings)
    serving = asyncio.create_task(server.serve())
    await wait_started(server, serving)
    try:
        own_broker.kill()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.gateway_port}", timeout=30) as http:
            response = await http.post("/v1/events", content=json.dumps([interaction()]), headers=AUTH)
        assert response.status_code == 503
        assert response.json()["reason"] == "broker_unavailable"
        assert "retry with the same event ids" in response.json()["detail"]
    finally:
        server.should_exit = True
        await serving
