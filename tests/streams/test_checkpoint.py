"""The checkpoint protocol (streams/checkpoint.py) as both workers use it: rows round trip
(long-lived models pickled once included), a row that cannot be read is rebuilt from the
archive, a failed write is retried.

No broker: records are fed as the workers feed them, the archive is written as the archiver
writes it, and the store is a real (SQLite) one.
"""

import asyncio
import json
import time
import zlib
from datetime import datetime
from functools import partial
from types import SimpleNamespace

import pytest
from sqlalchemy import select, text

from streams.agents import _Checkpointing
from streams.archive import encode_record, segment_path, write_segment
from streams.batches import publish_batch
from streams.checkpoint import Unacked, Unreadable, decode
from streams.emitter import Emitter
from streams.objects import ObjectStore
from streams.learner_agents import STATE_FORMAT as LEARNER_FORMAT
from streams.learner_agents import STATE_ROW, LiveLearner, UnconfirmedOutputs, _Deliveries
from streams.live import STATE_FORMAT, LivePipeline
from streams.pii import Scrubber
from streams.pipeline import PipelineSet
from streams.pseudonyms import KeyStore, Pseudonymizer
from streams.store import ArchiveSegment, StreamCheckpoint
from streams.topics import CONTROL, EVENTS, EXAMPLES
from tests.learners.conftest import ContextualEnvironment
from tests.learners.test_learning import CONFIG as LEARNERS
from tests.learners.test_learning import records as learner_records
from tests.learners.test_learning import run
from tests.streams.test_pipeline import CONFIG, at, signal, tick, turn

PIPELINE = CONFIG.model_copy(update={"batch_size": 8, "explicit_window_s": 100})


def traffic() -> list[tuple[str, int, int, bytes]]:
    """Events of partition 0 as (topic, partition, offset, value): turns with feedback, then a tick."""
    events = []
    for i in range(30):
        t = turn(i * 10, context={"cohort": "ab"[i % 2], "domain": "code"},
                 prompt=[{"role": "user", "content": f"another question number {i} on code {i * 37}"}])
        kind = ["thumbs", "copy", "rating"][i % 3]
        events += [t, signal(t, kind, i * 10 + 1, **({"value": 4} if kind == "rating" else {}))]
    events.append(tick(5000))
    return [(EVENTS.name, 0, offset, json.dumps(e).encode()) for offset, e in enumerate(events)]


def archive(sessions, objects, cluster: str, stream, per_segment: int = 25) -> None:
    """Seal ``stream`` as the archiver would: per topic partition, in segments; the broker
    timestamp of each record is its place in the stream (the order the worker saw), counted
    in milliseconds from a receive time after every event's (the worker, fed without one,
    checks no clock skew; the rebuild, which reads it, must find none either)."""
    received_ms = int(datetime.fromisoformat(at(10**6)).timestamp() * 1000)
    runs: dict[tuple[str, int], list] = {}
    for place, (topic, partition, offset, value) in enumerate(stream):
        runs.setdefault((topic, partition), []).append((offset, received_ms + place, value))
    with sessions.begin() as session:
        for (topic, partition), run_ in runs.items():
            for i in range(0, len(run_), per_segment):
                chunk = run_[i : i + per_segment]
                relative = segment_path(cluster, topic, partition, chunk[0][0])
                lines = [encode_record(topic, partition, offset, at, None, value) for offset, at, value in chunk]
                digest, size = write_segment(objects, relative, lines)
                session.add(ArchiveSegment(cluster_id=cluster, topic=topic, partition=partition,
                                           first_offset=chunk[0][0], last_offset=chunk[-1][0], event_count=len(chunk),
                                           path=str(relative), sha256=digest, size_bytes=size,
                                           first_timestamp_ms=chunk[0][1], last_timestamp_ms=chunk[-1][1]))


def spoil(sessions, consumer: str, key: int, how: str) -> None:
    """Make a row unreadable the three ways it happens."""
    moved = zlib.compress(b"cstreams.moved_away\nPartitionPipeline\n)\x81.")  # a pickle of a class that moved
    change = {"format": {"format_version": 999}, "moved": {"state": moved}, "corrupt": {"state": b"\x00not zlib"}}[how]
    with sessions.begin() as session:
        session.query(StreamCheckpoint).filter_by(consumer=consumer, partition=key).update(change)


def row(sessions, consumer: str, key: int) -> StreamCheckpoint:
    with sessions() as session:
        return session.get(StreamCheckpoint, (consumer, key))


def logged(caplog) -> list[str]:
    """The structlog events of warning level and above (the level the tests log at)."""
    return [r.msg["event"] for r in caplog.records if isinstance(r.msg, dict)]


class Stream:
    """Acknowledges events as a Faust stream does; remembers which."""

    def __init__(self) -> None:
        self.acked: list = []

    async def ack(self, event) -> None:
        self.acked.append(event)


class Producer:
    """Faust's producer as the emitter uses it: every record is on the broker at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []

    async def send(self, topic, key, value, partition, timestamp, headers):
        self.sent.append((topic, key, value))
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


# --- the pipeline ---------------------------------------------------------------------------------


@pytest.fixture
def objects(request, tmp_path) -> ObjectStore:
    """The store the archive is in: the test's directory, or (``indirect`` "s3") the S3 server."""
    if getattr(request, "param", "file") == "file":
        return ObjectStore(tmp_path.as_uri())
    storage = request.getfixturevalue("s3_storage")
    return ObjectStore(storage.url, storage)


@pytest.fixture
def pseudonyms(tmp_path):
    return Pseudonymizer(KeyStore.in_directory(tmp_path / "keys"))


def live_pipeline(sessions, objects: ObjectStore, pseudonyms, cluster: str = "c1") -> LivePipeline:
    return LivePipeline(PipelineSet(PIPELINE, Scrubber(), pseudonyms), sessions, objects=objects,
                        consumer="pipeline", cluster_id=cluster)  # fmt: skip


def feed(live: LivePipeline, stream) -> list:
    """Handle records as the worker does; everything they put out, in order."""
    out = []
    for _, partition, offset, value in stream:
        outputs = live.handle(partition, offset, value)
        if outputs is not None:
            out += [*outputs.dead_letters, *outputs.examples, *outputs.batches]
    return out


def test_a_pipeline_checkpoint_round_trips_with_its_format_and_position(sessions, objects, pseudonyms):
    stream = traffic()
    live = live_pipeline(sessions, objects, pseudonyms)
    feed(live, stream[:40])
    held = live.pipelines.partitions[0]
    assert held.join.open and held.curator.reservoir  # long-lived models of both kinds
    for _ in range(2):  # the second copies those models from pickles the first kept (streams/pickled_once.py)
        live.commit(live.snapshot({0}))
    written = row(sessions, "pipeline", 0)
    assert (written.format_version, written.offset, written.positions) == (STATE_FORMAT, 39, [[EVENTS.name, 0, 39]])

    again = live_pipeline(sessions, objects, pseudonyms)
    restored = again.restore({0, 1})
    assert set(restored) == {0}, "a partition without a checkpoint starts empty"
    again.pipelines.partitions.update(restored)
    assert again.handle(0, 39, stream[39][3]) is None, "a redelivered record is skipped"
    assert feed(again, stream[40:]) == feed(live, stream[40:])
    assert again.pipelines.counts() == live.pipelines.counts()

    other_broker = live_pipeline(sessions, objects, pseudonyms, cluster="c2").restore({0})[0]
    assert other_broker.offset == -1 and other_broker.stats.counts["records"] == 40


@pytest.mark.parametrize("objects", ["file", "s3"], indirect=True)
@pytest.mark.parametrize("how", ["format", "moved", "corrupt"])
def test_an_unreadable_pipeline_checkpoint_is_rebuilt_from_the_archive(sessions, objects, pseudonyms, caplog, how):
    stream = traffic()
    live = live_pipeline(sessions, objects, pseudonyms)
    feed(live, stream[:40])
    live.commit(live.snapshot({0}))
    held = live.pipelines.partitions[0]
    assert held.join.open and held.curator.buffer and held.curator.reservoir, "the comparison has power"
    # The archiver is ahead of the checkpoint; other partitions and topics are not this state's.
    archive(sessions, objects, "c1", stream)
    archive(sessions, objects, "c1", [(EVENTS.name, 1, o, v) for _, _, o, v in stream[:10]]
            + [(EXAMPLES.name, 0, o, v) for _, _, o, v in stream[:10]])
    spoil(sessions, "pipeline", 0, how)
    with pytest.raises(Unreadable):
        decode(row(sessions, "pipeline", 0), STATE_FORMAT)

    rebuilt = live_pipeline(sessions, objects, pseudonyms)
    rebuilt.pipelines.partitions.update(rebuilt.restore({0}))
    assert "checkpoint.unreadable" in logged(caplog) and "checkpoint.rebuild_short" not in logged(caplog)
    assert rebuilt.pipelines.partitions[0].offset == 39
    assert rebuilt.pipelines.counts() == live.pipelines.counts()
    assert rebuilt.pipelines.partitions[0].stats.pii == live.pipelines.partitions[0].stats.pii
    # The broker redelivers from the committed offset: what the rebuild holds is skipped, the
    # rest comes out exactly as from the state that was checkpointed.
    assert feed(rebuilt, stream[30:]) == feed(live, stream[40:])
    assert rebuilt.pipelines.counts() == live.pipelines.counts()


def test_a_rebuild_the_archive_falls_short_of_warns_and_keeps_the_checkpoint_position(sessions, objects, pseudonyms,
                                                                                      caplog):  # fmt: skip
    stream = traffic()
    live = live_pipeline(sessions, objects, pseudonyms)
    feed(live, stream[:40])
    live.commit(live.snapshot({0}))
    archive(sessions, objects, "c1", stream[:30])  # the archiver lags
    spoil(sessions, "pipeline", 0, "format")
    rebuilt = live_pipeline(sessions, objects, pseudonyms).restore({0})[0]
    assert "checkpoint.rebuild_short" in logged(caplog)
    assert rebuilt.stats.counts["records"] == 30
    assert rebuilt.offset == 39, "records the checkpoint covered are not handled twice"


def test_a_row_of_an_earlier_broker_life_is_rebuilt_from_that_life_only(sessions, objects, pseudonyms):
    stream = traffic()
    live = live_pipeline(sessions, objects, pseudonyms)
    feed(live, stream[:40])
    live.commit(live.snapshot({0}))
    archive(sessions, objects, "c1", stream[:45])
    later = [(EVENTS.name, 0, offset, value) for offset, (_, _, _, value) in enumerate(stream[45:])]
    archive(sessions, objects, "c2", later)
    spoil(sessions, "pipeline", 0, "format")
    rebuilt = live_pipeline(sessions, objects, pseudonyms, cluster="c2").restore({0})[0]
    assert rebuilt.offset == -1, "a new broker life redelivers from offset 0"
    assert rebuilt.stats.counts == live.pipelines.partitions[0].stats.counts


def test_what_the_archive_holds_after_the_checkpoints_is_counted_with_its_earliest_time(sessions, objects,
                                                                                       pseudonyms):
    stream = traffic()
    live = live_pipeline(sessions, objects, pseudonyms)
    assert live.checkpoints.unprocessed((EVENTS.name,)) == ({}, None)
    feed(live, stream[:40])
    live.commit(live.snapshot({0}))  # covers offsets 0-39
    feed(live, stream[40:50])  # handled, not yet checkpointed: a new broker life would lose these
    archive(sessions, objects, "c1", stream[:52])
    archive(sessions, objects, "c0", stream)  # another life: not this one's business
    archive(sessions, objects, "c1", [("other.topic", 0, 0, b"{}")])  # not read by this consumer
    counts, earliest_ms = live.checkpoints.unprocessed((EVENTS.name,))
    assert counts == {f"{EVENTS.name}:0": 12}
    with sessions() as session:
        first_of_second = min(s.first_timestamp_ms for s in session.scalars(select(ArchiveSegment))
                              if s.cluster_id == "c1" and s.first_offset == 25)  # fmt: skip
    assert earliest_ms == first_of_second + 15  # offset 40: the 16th of the segment from 25


async def test_a_failed_pipeline_checkpoint_keeps_its_records_and_the_next_one_covers_them(sessions, tmp_path, objects,
                                                                                           pseudonyms, caplog):
    stream = traffic()
    live = live_pipeline(sessions, objects, pseudonyms)
    producer = Producer()
    publish = partial(publish_batch, objects=ObjectStore(tmp_path.as_uri()), sessions=sessions)
    checkpointing = _Checkpointing(live, Emitter(producer), publish)
    events = [SimpleNamespace(message=SimpleNamespace(partition=p, offset=o, value=v, headers=[], timestamp=None)) for _, p, o, v in stream]
    agent = Stream()

    checkpointing.handle(agent, events[:40])
    with sessions.begin() as session:  # the store goes away
        session.execute(text("ALTER TABLE stream_checkpoints RENAME TO away"))
    await checkpointing.flush()
    assert agent.acked == [] and "checkpoint.write_failed" in logged(caplog)
    first_try = list(producer.sent)
    assert first_try, "the outputs went out before the write failed"

    checkpointing.handle(agent, events[40:])
    with sessions.begin() as session:
        session.execute(text("ALTER TABLE away RENAME TO stream_checkpoints"))
    await checkpointing.flush()
    assert agent.acked == events
    assert set(first_try) <= set(producer.sent[len(first_try) :]), "the failed checkpoint's outputs go out again"
    assert row(sessions, "pipeline", 0).offset == len(stream) - 1
    again = live_pipeline(sessions, objects, pseudonyms).restore({0})[0]
    assert again.stats.counts == live.pipelines.partitions[0].stats.counts



async def test_a_slow_snapshot_pauses_the_next_checkpoint_in_proportion(sessions, tmp_path, objects, pseudonyms,
                                                                         monkeypatch):
    stream = traffic()
    live = live_pipeline(sessions, objects, pseudonyms)
    publish = partial(publish_batch, objects=ObjectStore(tmp_path.as_uri()), sessions=sessions)
    checkpointing = _Checkpointing(live, Emitter(Producer()), publish, max_loop_share=0.1)
    events = [SimpleNamespace(message=SimpleNamespace(partition=p, offset=o, value=v, headers=[], timestamp=None))
              for _, p, o, v in stream]  # fmt: skip
    agent = Stream()
    snapshot, started = live.snapshot, []

    def slow_snapshot(partitions):
        started.append(time.monotonic())
        time.sleep(0.2)  # a large state: the snapshot holds the loop 0.2 s
        return snapshot(partitions)

    monkeypatch.setattr(live, "snapshot", slow_snapshot)
    checkpointing.handle(agent, events[:40])
    await checkpointing.flush()
    assert agent.acked == events[:40]
    checkpointing.handle(agent, events[40:])
    await checkpointing.flush()  # at once: a 0.2 s snapshot at share 0.1 asks for 2 s from its start
    assert agent.acked == events[:40], "no snapshot before the pause is over"
    while agent.acked != events and time.monotonic() - started[0] < 20:  # the timer, every 50 ms
        await asyncio.sleep(0.05)
        await checkpointing.flush()
    assert agent.acked == events
    assert started[1] - started[0] >= 1.9, "the next snapshot waited 10 times the last one's time (share 0.1)"
    assert row(sessions, "pipeline", 0).offset == len(stream) - 1


def learner(sessions, objects: ObjectStore, cluster: str = "c2") -> LiveLearner:
    return LiveLearner(LEARNERS, sessions, objects=objects, consumer="learners", cluster_id=cluster,
                       snapshots_kept=3)  # fmt: skip


def lives() -> tuple[list, list]:
    """The learner's inputs, the broker restarted halfway: offsets start at zero again."""
    stream = learner_records(ContextualEnvironment(), n=600)
    second, offsets = [], {}
    for topic, partition, _, value in stream[300:]:
        offsets[(topic, partition)] = offsets.get((topic, partition), -1) + 1
        second.append((topic, partition, offsets[(topic, partition)], value))
    return stream[:300], second


@pytest.mark.parametrize("objects", ["file", "s3"], indirect=True)
@pytest.mark.parametrize("how", ["format", "corrupt"])
async def test_an_unreadable_learner_checkpoint_is_rebuilt_from_the_archive_across_broker_lives(
        sessions, objects, caplog, how):  # fmt: skip
    first_life, second_life = lives()
    live = learner(sessions, objects, cluster="c1")
    for record in first_life:
        live.handle(*record)
    await live.save()
    live = learner(sessions, objects, cluster="c2")  # the broker restarted: offsets from zero
    for record in second_life[:150]:
        live.handle(*record)
    await live.save()
    archive(sessions, objects, "c1", first_life)
    archive(sessions, objects, "c2", second_life)
    spoil(sessions, "learners", STATE_ROW, how)

    rebuilt = learner(sessions, objects, cluster="c2")
    assert "checkpoint.unreadable" in logged(caplog) and "checkpoint.rebuild_short" not in logged(caplog)
    assert rebuilt.state.snapshot() == live.state.snapshot()
    assert rebuilt.state.positions == live.state.positions
    assert (rebuilt.state.version, rebuilt.state.examples) == (live.state.version, live.state.examples)
    assert rebuilt.handle(*second_life[149]) is None, "a redelivered record is skipped"
    # Drift alarms, A/B verdicts and review picks: the detectors, tests and selector agree too.
    going_on = run(rebuilt.state, second_life[150:])
    assert going_on == run(live.state, second_life[150:]) and going_on
    assert rebuilt.state.snapshot() == live.state.snapshot()


async def test_the_learner_checkpoint_carries_its_format_and_positions(sessions, objects):
    first_life, _ = lives()
    live = learner(sessions, objects)
    for record in first_life:
        live.handle(*record)
    await live.save()
    written = row(sessions, "learners", STATE_ROW)
    ends = {(topic, partition): offset for topic, partition, offset, _ in first_life}
    assert set(ends) == {(EXAMPLES.name, 0), (EXAMPLES.name, 1), (CONTROL.name, 0)}
    assert written.format_version == LEARNER_FORMAT and written.offset == live.state.version
    assert written.positions == sorted([t, p, o] for (t, p), o in ends.items())


async def test_a_failed_learner_checkpoint_keeps_its_records_and_the_next_one_covers_them(sessions, objects, caplog):
    stream, _ = lives()
    live, agent = learner(sessions, objects), Stream()
    unacked: Unacked[None] = Unacked(live.consumer)
    for record in stream[:150]:
        live.handle(*record)
        unacked.add(agent, [record])
    with sessions.begin() as session:
        session.execute(text("ALTER TABLE stream_checkpoints RENAME TO away"))
    await unacked.flush(lambda _: live.save())
    assert agent.acked == [] and "checkpoint.write_failed" in logged(caplog)
    for record in stream[150:]:
        live.handle(*record)
        unacked.add(agent, [record])
    with sessions.begin() as session:
        session.execute(text("ALTER TABLE away RENAME TO stream_checkpoints"))
    await unacked.flush(lambda _: live.save())
    assert agent.acked == stream
    assert learner(sessions, objects).state.snapshot() == live.state.snapshot()
    with sessions() as session:
        assert session.scalar(select(StreamCheckpoint.offset)) == live.state.version


async def test_a_flush_cancelled_midway_keeps_its_records_for_the_next():
    unacked: Unacked[str] = Unacked("c")
    agent = Stream()
    unacked.add(agent, ["e1"], "produced-1")

    async def hangs(produced):
        await asyncio.Event().wait()

    flushing = asyncio.ensure_future(unacked.flush(hangs))
    await asyncio.sleep(0)
    unacked.add(agent, ["e2"], "produced-2")
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    seen = []

    async def writes(produced):
        seen.extend(produced)

    await unacked.flush(writes)
    assert seen == ["produced-1", "produced-2"] and agent.acked == ["e1", "e2"]


class Topic:
    """A Faust topic whose first delivery of each value fails (the broker lost it)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, key: bytes, value: bytes) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if value in self.sent:
            future.set_result("delivered")
        else:
            future.set_exception(RuntimeError("the broker went away"))
        self.sent.append(value)
        return future


async def test_the_learner_checkpoint_waits_for_its_outputs_and_sends_lost_ones_again():
    topic, deliveries = Topic(), _Deliveries()
    await deliveries.send(topic, b"k", b"rollback verdict")
    with pytest.raises(UnconfirmedOutputs, match="sent again"):
        await deliveries.confirm()  # the checkpoint fails: the state is not saved
    assert topic.sent == [b"rollback verdict", b"rollback verdict"]
    await deliveries.confirm()  # the second delivery was confirmed: now it may be saved
    assert deliveries.pending == []
