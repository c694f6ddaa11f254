"""The archive outlives the broker and the archiver: nothing acknowledged is lost or doubled."""

import asyncio
import gzip
import json
import os
import signal
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import select

import migrations
from app.broker import EmbeddedBroker, ensure_topics
from app.processes import Child
from app.runtime import build_archiver, gateway_server, wait_started
from streams.store import ArchiveSegment, make_engine, make_sessionmaker
from streams.archive import ResumeUnconfirmed, SegmentUnreadable, iter_archive, segment_key, verify_archive
from streams.replay import TimeRange, archive_records
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
        report = verify_archive(session, settings.objects)
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
        assert verify_archive(session, settings.objects).records == 500


def archived_ids(settings) -> list[str]:
    """Event ids of the archived user events, as often as each was archived."""
    engine = make_engine(settings.store_url)
    try:
        with make_sessionmaker(engine)() as session:
            return event_ids(iter_archive(session, settings.objects, EVENTS.name))
    finally:
        engine.dispose()


def log_events(path: Path, name: str) -> list[dict]:
    """The JSON log lines named ``name`` a child process has written so far."""
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill, or not ours
        if isinstance(record, dict) and record.get("event") == name:
            found.append(record)
    return found


async def wait_for(condition, what: str, child: Child, attempts: int = 600) -> None:
    for _ in range(attempts):
        if condition():
            return
        assert child.running, f"{child.name} exited: {child.log_tail()}"
        await asyncio.sleep(0.1)
    raise AssertionError(f"never saw {what}; {child.name} log:\n{child.log_tail()}")


async def test_archiver_killed_before_sealing_loses_and_doubles_nothing(tmp_path, own_broker):
    """`feedloop archive run` as its own process, SIGKILLed with one segment sealed and
    committed and 60 more records consumed into its buffer but not sealed; restarted."""
    # One partition, so "sealed" and "buffered" are one buffer's state; a segment seals at 100
    # records, or after an hour: the 60 that follow the first 100 stay in memory.
    settings = make_settings(tmp_path, own_broker.port, topic_partitions=1, archive_flush_events=100,
                             archive_flush_seconds=3600.0, log_level="debug", log_format="json")  # fmt: skip
    migrations.upgrade(settings.store_url)
    await ensure_topics(settings)
    server = gateway_server(settings)
    serving = asyncio.create_task(server.serve())
    await wait_started(server, serving)
    base_url = f"http://127.0.0.1:{settings.gateway_port}"
    first_log, second_log = tmp_path / "archive-1.log", tmp_path / "archive-2.log"
    first = Child(["archive", "run"], settings, first_log).start()
    second = None
    try:
        sealed = await post_events(base_url, 100)
        await wait_for(lambda: len(archived_ids(settings)) == 100, "the first segment sealed", first)
        buffered = await post_events(base_url, 60)
        await wait_for(lambda: any(e["records"] == 60 and e["last_offset"] == 159
                                   for e in log_events(first_log, "archive.buffered")),
                       "the next 60 records buffered", first)  # fmt: skip
        os.killpg(first.process.pid, signal.SIGKILL)  # no stop(): nothing sealed, nothing committed
        assert first.process.wait(30) == -signal.SIGKILL
        assert sorted(archived_ids(settings)) == sorted(sealed), "the buffered 60 were never sealed"
        assert not log_events(first_log, "archive.stopped")

        restarted = settings.model_copy(update={"archive_flush_seconds": 0.2})
        second = Child(["archive", "run"], restarted, second_log).start()
        await wait_for(lambda: len(archived_ids(settings)) >= 160, "all 160 records archived", second)
        assert second.stop() == 0, second.log_tail()  # SIGTERM: it seals what it holds, so a
        # duplicate it had read would be in the archive now
    finally:
        for child in (first, second):
            if child is not None and child.running:
                os.killpg(child.process.pid, signal.SIGKILL)
                child.process.wait(30)
        server.should_exit = True
        await serving

    ids = archived_ids(settings)
    assert sorted(ids) == sorted(sealed + buffered) and len(ids) == len(set(ids)) == 160
    engine = make_engine(settings.store_url)
    with make_sessionmaker(engine)() as session:
        report = verify_archive(session, settings.objects)
        segments = session.scalars(select(ArchiveSegment).where(ArchiveSegment.topic == EVENTS.name)).all()
    engine.dispose()
    assert report.ok, report.problems
    # The second life resumed at the committed offset: its segments go on where the first ended.
    ranges = sorted((s.first_offset, s.last_offset) for s in segments)
    assert ranges[0] == (0, 99) and ranges[-1][1] == 159
    assert all(later[0] == earlier[1] + 1 for earlier, later in zip(ranges, ranges[1:]))


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


class _UnrecordedSeal:
    """The archiver's sessions, crashing where a seal records its segment: after the put."""

    def __init__(self, sessions) -> None:
        self.sessions = sessions

    def __call__(self):
        return self.sessions()

    def begin(self):
        raise RuntimeError("simulated crash between the segment's put and its row")


async def test_on_s3_a_crash_before_the_row_leaves_an_orphan_that_the_next_seal_replaces(tmp_path, own_broker,
                                                                                          s3_storage):
    """The archive in an S3 bucket (the data dir holds none of it): a segment put but never
    recorded is invisible; the restarted archiver seals its records again over it; verify and
    a replay read the bucket, and a damaged object is caught."""
    settings = make_settings(tmp_path, own_broker.port, storage=s3_storage)
    objects = settings.objects
    stack, stop = await start_stack(settings)
    stack.archiver.sessions = _UnrecordedSeal(stack.archiver.sessions)
    try:
        posted = await post_events(stack.base_url, 100)
        for _ in range(200):
            if objects.keys("archive"):
                break
            await asyncio.sleep(0.05)
    finally:
        with pytest.raises(RuntimeError, match="simulated crash"):
            await stop()
    orphans = objects.keys("archive")
    assert orphans, "the first seal should have put its segment before the crash"
    assert archived_records(stack) == [], "a segment without its row is no reader's"

    stack, stop = await start_stack(settings)
    try:
        records = await wait_until_archived(stack, EVENTS.name, 100)
        await asyncio.sleep(1.0)  # give a duplicate time to show up
        records = archived_records(stack, EVENTS.name)
    finally:
        await stop()
    ids = event_ids(records)
    assert sorted(ids) == sorted(posted) and len(ids) == len(set(ids))
    assert not (settings.data_dir / "archive").exists()
    with stack.sessions() as session:
        rows = session.scalars(select(ArchiveSegment)).all()
        report = verify_archive(session, objects)
    assert set(objects.keys("archive")) == {segment_key(row.path) for row in rows} >= set(orphans)
    assert report.ok and report.records == sum(row.event_count for row in rows), report.problems
    replayed, total = archive_records(stack.sessions, objects, TimeRange(None, None))
    assert sorted(event_ids(replayed)) == sorted(posted) and total == 100

    damaged = next(row for row in rows if row.topic == EVENTS.name)
    objects.put(segment_key(damaged.path), gzip.compress(b'{"tampered": 1}\n'))
    with stack.sessions() as session:
        report = verify_archive(session, objects)
    assert report.problems == [f"{damaged.path}: checksum {report.problems[0].split()[2]} != recorded {damaged.sha256}"]
    with pytest.raises(SegmentUnreadable, match=damaged.path):
        list(archive_records(stack.sessions, objects, TimeRange(None, None))[0])


async def test_an_offset_committed_into_a_new_broker_life_skips_nothing(tmp_path, own_broker):
    """An archiver of the last broker life, rebalanced onto the restarted broker before it
    noticed, used to commit its old positions into the new broker's group: the next archiver
    then started there and skipped the new life's first records (seen in benchmarks/chaos.py).
    With no segment of this life, every partition is read from its beginning."""
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    try:  # the group commits an old life's positions while this life has nothing archived
        consumer = stack.archiver.consumer
        for _ in range(200):
            if consumer.assignment():
                break
            await asyncio.sleep(0.05)
        await consumer.commit({tp: 5 for tp in consumer.assignment() if tp.topic == EVENTS.name})
    finally:
        await stop()
    posted = await post_events_directly(settings, 40)

    stack, stop = await start_stack(settings)
    try:
        records = await wait_until_archived(stack, EVENTS.name, len(posted))
    finally:
        await stop()
    assert sorted(event_ids(records)) == sorted(posted)


async def test_partitions_assigned_while_the_broker_cannot_say_its_life_stop_the_archiver(tmp_path, own_broker):
    """Where to resume depends on which broker life it is; unknown, the archiver stops (and is
    started again) rather than guess and skip or mislabel records."""
    settings = make_settings(tmp_path, own_broker.port)
    migrations.upgrade(settings.store_url)
    archiver = await build_archiver(settings)

    async def unreachable():
        raise ConnectionError("broker away")

    archiver.life.confirm = unreachable
    with pytest.raises(ResumeUnconfirmed, match="could not be asked which life"):
        await asyncio.wait_for(archiver.run(), 60)


async def post_events_directly(settings, count: int) -> list[str]:
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    events = [interaction() for _ in range(count)]
    for i, event in enumerate(events):
        await producer.send_and_wait(EVENTS.name, json.dumps(event).encode(), partition=i % settings.topic_partitions)
    await producer.stop()
    return [e["event_id"] for e in events]


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
