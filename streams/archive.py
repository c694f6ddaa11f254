"""The archive: every record of every feedloop topic, kept durably in the object store.

The embedded broker forgets everything when it stops, and even Kafka expires old segments, yet
the log is feedloop's source of truth. The archiver therefore copies each topic partition into
sealed, gzip-compressed JSON-lines *segments* under the store's ``archive/`` folder
(``streams.objects``: on the default ``file://`` store, ``<data_dir>/archive`` as it always
was; on ``s3://``, a bucket every host reads) and records each in the database with its
offsets, count and checksum. ``feedloop replay`` reads them back.

A segment is published with one atomic ``put`` and then its row is committed: the row is the
commit marker. A crash between the two leaves an *orphan* object that no reader sees (readers
find segments through their rows); the archiver re-reads those records on restart, seals them
again under the same name (named by the first offset) and replaces the orphan. A segment that
has a row is never replaced: see :func:`write_segment`. Every reader checks the bytes it got
against the row's checksum (:func:`read_segment`), so a damaged or half-copied object is an
error that names ``feedloop archive verify``, never wrong records.

Delivery: offsets are committed to the broker only after a segment is stored and recorded, so
a crash re-reads what was not yet sealed (nothing acknowledged is lost). On restart the store's
last archived offset wins over the group's committed offset, so a crash between recording and
committing writes nothing twice. Offsets are scoped by the broker's cluster id because a
memory-only broker restarts its offsets at zero.

Why not a Faust agent: Faust acknowledges an event when the agent moves past it and commits on
a timer, which for a sink that buffers into files would commit offsets of records not yet on
disk. A plain consumer with manual commits states the rule directly.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from streams import kafka
from streams.broker_life import BrokerLife, NewBrokerLife
from streams.kafka import KafkaSettings
from streams.objects import ObjectStore
from streams.store import ArchiveSegment

log = structlog.get_logger(__name__)


# --- the on-disk line format ---------------------------------------------------------------


def _text_or_b64(data: bytes | None) -> tuple[str, Any]:
    """("text", str) when the bytes are UTF-8, else ("b64", base64 str); keeps bytes exact."""
    if data is None:
        return "text", None
    try:
        return "text", data.decode("utf-8")
    except UnicodeDecodeError:
        return "b64", base64.b64encode(data).decode("ascii")


def encode_record(
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    key: bytes | None,
    value: bytes | None,
    headers: list[tuple[str, bytes]] | tuple = (),
) -> str:
    """One archive line. ``key``/``value`` hold the exact bytes as text (or ``*_b64``)."""
    line: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp_ms": timestamp_ms,
    }
    for name, data in (("key", key), ("value", value)):
        kind, encoded = _text_or_b64(data)
        line[name if kind == "text" else f"{name}_b64"] = encoded
    if headers:
        line["headers"] = {
            name: (enc if kind == "text" else {"b64": enc})
            for name, (kind, enc) in ((n, _text_or_b64(v)) for n, v in headers)
        }
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class ArchivedRecord:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


def decode_record(line: str | bytes) -> ArchivedRecord:
    data = json.loads(line)

    def raw(name: str) -> bytes | None:
        if f"{name}_b64" in data:
            return base64.b64decode(data[f"{name}_b64"])
        return None if data.get(name) is None else data[name].encode("utf-8")

    headers = {
        name: base64.b64decode(v["b64"]) if isinstance(v, dict) else v.encode("utf-8")
        for name, v in data.get("headers", {}).items()
    }
    return ArchivedRecord(
        data["topic"], data["partition"], data["offset"], data["timestamp_ms"],
        raw("key"), raw("value"), headers,
    )  # fmt: skip


# --- segments -------------------------------------------------------------------------------


@dataclass
class PartitionBuffer:
    """Lines of one topic partition waiting to be sealed into a segment."""

    topic: str
    partition: int
    lines: list[str] = field(default_factory=list)
    first_offset: int = -1
    last_offset: int = -1
    # The segment's time range, earliest and latest: not its first and last record's times, since
    # producers set record timestamps (CreateTime) and one partition's are not in order.
    first_timestamp_ms: int = 0
    last_timestamp_ms: int = 0
    opened_at: float = 0.0  # monotonic time of the first buffered line

    def add(self, offset: int, timestamp_ms: int, line: str, now: float) -> None:
        if not self.lines:
            self.first_offset, self.opened_at = offset, now
            self.first_timestamp_ms = self.last_timestamp_ms = timestamp_ms
        self.lines.append(line)
        self.last_offset = offset
        self.first_timestamp_ms = min(self.first_timestamp_ms, timestamp_ms)
        self.last_timestamp_ms = max(self.last_timestamp_ms, timestamp_ms)

    def due(self, now: float, max_events: int, max_seconds: float) -> bool:
        return bool(self.lines) and (
            len(self.lines) >= max_events or now - self.opened_at >= max_seconds
        )

    def clear(self) -> None:
        self.lines = []


ARCHIVE_FOLDER = "archive"


def segment_path(cluster_id: str, topic: str, partition: int, first_offset: int) -> Path:
    """Relative path of a segment (its row's ``path``). Named by its first offset so a rewrite
    after a crash replaces the unrecorded object instead of leaving a second copy."""
    return Path(cluster_id) / topic / f"p{partition:03d}" / f"{first_offset:020d}.jsonl.gz"


def segment_key(relative: Path | str) -> str:
    """The store key of a segment: ``archive/<relative path>``, so on a ``file://`` store the
    file sits where the archive directory always had it."""
    return f"{ARCHIVE_FOLDER}/{Path(relative).as_posix()}"


class SegmentRecorded(RuntimeError):
    """A segment is already recorded under the name a new one would take: replacing it would
    lose archived records."""


class SegmentUnreadable(RuntimeError):
    """A recorded segment's object is missing or is not the bytes its row recorded."""

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"archive segment {path}: {problem}; run `feedloop archive verify` to list every "
                         "damaged segment, and restore them from the store's backup (or its object versions)")


def write_segment(objects: ObjectStore, relative: Path, lines: list[str], *,
                  recorded: Callable[[], bool] = lambda: True) -> tuple[str, int]:
    """Publish a segment with one atomic put; returns (sha256, size in bytes).

    The key is claimed with ``put_new``, so a segment is never replaced by accident. When the
    name is taken, ``recorded()`` says whether a row holds it: if so :class:`SegmentRecorded`
    is raised (the archiver would be filing records over archived ones, e.g. a broker
    restart it did not notice); if not, the object is an orphan a crash left between the put
    and the row, and the new bytes replace it (the records re-read since may be more or
    fewer). Without ``recorded`` every taken name counts as recorded.

    gzip's header time is fixed at 0 so the same records always give the same bytes.
    """
    payload = gzip.compress(("\n".join(lines) + "\n").encode("utf-8"), compresslevel=6, mtime=0)
    key = segment_key(relative)
    if not objects.put_new(key, payload):
        if recorded():
            raise SegmentRecorded(
                f"archive segment {relative} is already recorded; the archiver stops rather than replace "
                "archived records: check for a second archiver of this broker life, then start it again")
        log.warning("archive.orphan_replaced", path=str(relative),
                    action="none: a crash left this segment unrecorded; its records were read again")
        objects.put(key, payload)
    return hashlib.sha256(payload).hexdigest(), len(payload)


def read_segment(objects: ObjectStore, segment: ArchiveSegment) -> Iterator[ArchivedRecord]:
    """The records of a recorded segment, once its bytes match the row's checksum: the whole
    object is fetched and checked before the first record, so a reader that fails on
    :class:`SegmentUnreadable` has folded nothing of it."""
    payload = objects.find(segment_key(segment.path))
    if payload is None:
        raise SegmentUnreadable(segment.path, "missing")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != segment.sha256:
        raise SegmentUnreadable(segment.path, f"checksum {digest} != recorded {segment.sha256}")
    with gzip.open(io.BytesIO(payload), "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield decode_record(line)


# --- reading the archive back --------------------------------------------------------------


def segments(session: Session, topic: str | None = None) -> list[ArchiveSegment]:
    """Recorded segments in the order they were sealed."""
    query = select(ArchiveSegment).order_by(ArchiveSegment.id)
    if topic is not None:
        query = query.where(ArchiveSegment.topic == topic)
    return list(session.scalars(query))


def iter_archive(session: Session, objects: ObjectStore, topic: str | None = None) -> Iterator[ArchivedRecord]:
    for segment in segments(session, topic):
        yield from read_segment(objects, segment)


@dataclass
class VerifyReport:
    segments: int = 0
    records: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_archive(session: Session, objects: ObjectStore) -> VerifyReport:
    """Check every recorded segment: object present, checksum and record count as recorded."""
    report = VerifyReport()
    for segment in segments(session):
        report.segments += 1
        try:
            count = sum(1 for _ in read_segment(objects, segment))
        except SegmentUnreadable as error:
            report.problems.append(f"{segment.path}: {error.problem}")
            continue
        if count != segment.event_count:
            report.problems.append(f"{segment.path}: {count} records, recorded {segment.event_count}")
        report.records += count
    return report


# --- the archiver process ------------------------------------------------------------------


class ResumeUnconfirmed(RuntimeError):
    """Partitions were assigned while the broker could not say which life it is: where to
    resume is unknown, so the archiver stops and is started again."""

    def log(self) -> None:
        log.error("archive.resume_unconfirmed", error=str(self),
                  action="the archiver stops rather than guess where to resume; start it again (compose "
                         "restarts it) once the broker answers")  # fmt: skip


class Archiver:
    """Consumes the given topics and seals them into archive segments.

    Run with ``await archiver.run()``; ``archiver.stop()`` seals what is buffered and returns.
    On a new broker life (streams/broker_life.py: checked before every commit, whenever
    partitions are assigned, and when a record comes below an offset already taken) ``run`` raises
    :class:`~streams.broker_life.NewBrokerLife` before sealing or committing anything of it:
    the segments carry the life they were read from, and a new life's records filed under
    the old one would take its segments' names (:func:`write_segment` refuses to replace a
    recorded one, :class:`SegmentRecorded`, should a new life ever go unnoticed).
    """

    group_id = "feedloop-archive"

    def __init__(
        self,
        *,
        kafka_settings: KafkaSettings,
        life: BrokerLife,
        topics: tuple[str, ...],
        objects: ObjectStore,
        sessions: sessionmaker,
        flush_events: int,
        flush_seconds: float,
    ) -> None:
        self.life = life
        self.cluster_id = life.started_on
        self.topics = topics
        self.objects = objects
        self.sessions = sessions
        self.flush_events = flush_events
        self.flush_seconds = flush_seconds
        self.buffers: dict[TopicPartition, PartitionBuffer] = {}
        self.sealed_records = 0
        self._next_offsets: dict[TopicPartition, int] = {}  # what each partition should deliver next
        # Why the rebalance listener found it must stop (aiokafka logs and drops what a listener
        # raises), raised by run().
        self._must_stop: NewBrokerLife | ResumeUnconfirmed | None = None
        self._stopping = asyncio.Event()
        self.consumer = kafka.consumer(kafka_settings, group_id=self.group_id, max_poll_records=flush_events)

    def last_archived_offset(self, tp: TopicPartition) -> int | None:
        with self.sessions() as session:
            return session.scalar(
                select(func.max(ArchiveSegment.last_offset)).where(
                    ArchiveSegment.cluster_id == self.cluster_id,
                    ArchiveSegment.topic == tp.topic,
                    ArchiveSegment.partition == tp.partition,
                )
            )

    def _recorded(self, tp: TopicPartition, first_offset: int) -> bool:
        with self.sessions() as session:
            return session.scalar(
                select(func.count()).where(
                    ArchiveSegment.cluster_id == self.cluster_id,
                    ArchiveSegment.topic == tp.topic,
                    ArchiveSegment.partition == tp.partition,
                    ArchiveSegment.first_offset == first_offset,
                )
            ) > 0

    async def _resume_positions(self, assigned: set[TopicPartition]) -> None:
        """Start each assigned partition where the archive of this broker life ends, or at
        its beginning when this life has no segment of it yet. The group's committed offset is
        not asked: an archiver of the last life may have committed its old positions into the
        new broker before it noticed the restart (the new life's first records would be
        skipped), and a crash between sealing and committing leaves it behind the archive."""
        try:
            await self.life.confirm()  # a broker that restarted empty assigns partitions again
        except NewBrokerLife as error:
            self._must_stop = error
            return
        except Exception as error:  # noqa: BLE001 - which life these offsets belong to is unknown
            self._must_stop = ResumeUnconfirmed(f"{self.life.process}: partitions were assigned while the broker "
                                                  f"could not be asked which life it is ({error!r})")  # fmt: skip
            return
        resumed = {}
        for tp in assigned:
            self._next_offsets.pop(tp, None)
            last = self.last_archived_offset(tp)
            if last is None:  # offset 0, or the earliest retained (auto_offset_reset) where Kafka expired it
                self.consumer.seek(tp, 0)
                continue
            self.consumer.seek(tp, last + 1)
            self._next_offsets[tp] = resumed[tp] = last + 1
            log.info("archive.resume", topic=tp.topic, partition=tp.partition, offset=last + 1)
        try:
            if resumed:
                await self.consumer.commit(resumed)  # only tells the group (its lag) where the archive is
        except Exception:  # noqa: BLE001 - positions come from the archive, not from this commit
            log.warning("archive.resume_commit_failed", exc_info=True, action="none: the next seal commits")

    async def seal(self, tp: TopicPartition, commit: bool = True) -> None:
        """Write the partition's buffer as a segment, record it, then commit its offset."""
        buffer = self.buffers.get(tp)
        if buffer is None or not buffer.lines:
            return
        first = buffer.first_offset
        relative = segment_path(self.cluster_id, tp.topic, tp.partition, first)
        digest, size = await asyncio.to_thread(
            write_segment, self.objects, relative, buffer.lines, recorded=lambda: self._recorded(tp, first)
        )
        with self.sessions.begin() as session:
            session.add(
                ArchiveSegment(
                    cluster_id=self.cluster_id,
                    topic=tp.topic,
                    partition=tp.partition,
                    first_offset=buffer.first_offset,
                    last_offset=buffer.last_offset,
                    event_count=len(buffer.lines),
                    path=str(relative),
                    sha256=digest,
                    size_bytes=size,
                    first_timestamp_ms=buffer.first_timestamp_ms,
                    last_timestamp_ms=buffer.last_timestamp_ms,
                )
            )
        if commit:
            await self.consumer.commit({tp: buffer.last_offset + 1})
        self.sealed_records += len(buffer.lines)
        log.info(
            "archive.segment_sealed", topic=tp.topic, partition=tp.partition,
            first_offset=buffer.first_offset, last_offset=buffer.last_offset,
            records=len(buffer.lines), bytes=size,
        )  # fmt: skip
        buffer.clear()

    async def run(self) -> None:
        archiver = self

        class _Listener(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
                # Sealed either way; committed only into the life they were read from (the
                # assignment that follows resumes from the archive, not from the commit).
                try:
                    commit = await archiver._confirmed()
                except NewBrokerLife as error:
                    archiver._must_stop, commit = error, False
                for tp in revoked:
                    await archiver.seal(tp, commit=commit)

            async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
                await archiver._resume_positions(assigned)

        self.consumer.subscribe(list(self.topics), listener=_Listener())
        await self.consumer.start()
        log.info("archive.started", topics=self.topics, cluster_id=self.cluster_id)
        try:
            while not self._stopping.is_set():
                batches = await self.consumer.getmany(timeout_ms=100, max_records=self.flush_events)
                await self._same_life(batches)
                now = time.monotonic()
                for tp, records in batches.items():
                    buffer = self.buffers.setdefault(tp, PartitionBuffer(tp.topic, tp.partition))
                    for r in records:
                        line = encode_record(
                            r.topic, r.partition, r.offset, r.timestamp, r.key, r.value, r.headers
                        )
                        buffer.add(r.offset, r.timestamp, line, now)
                    self._next_offsets[tp] = records[-1].offset + 1
                    log.debug("archive.buffered", topic=tp.topic, partition=tp.partition,
                              last_offset=buffer.last_offset, records=len(buffer.lines))  # fmt: skip
                due = [tp for tp, b in self.buffers.items() if b.due(now, self.flush_events, self.flush_seconds)]
                if due and not await self._confirmed():
                    due = []  # the next round tries again; the buffers wait
                for tp in due:
                    await self.seal(tp)
            confirmed = await self._confirmed()
            for tp in list(self.buffers):  # unconfirmed: archived, the offsets not committed
                await self.seal(tp, commit=confirmed)
        except (NewBrokerLife, ResumeUnconfirmed) as error:
            error.log()
            for tp in list(self.buffers):  # records read before it: archived, their offsets not committed
                await self.seal(tp, commit=False)
            raise
        finally:
            await self.consumer.stop()
            log.info("archive.stopped", sealed_records=self.sealed_records)

    async def _confirmed(self) -> bool:
        """Whether the broker is still this archiver's (sealing commits: never an offset into
        a new broker life); False when it cannot be asked. Raises NewBrokerLife."""
        try:
            await self.life.confirm()
        except NewBrokerLife:
            raise
        except Exception:  # noqa: BLE001 - the broker is away: seal later
            log.warning("archive.broker_unconfirmed", exc_info=True,
                        action="the archiver seals once the broker answers; check the broker if this repeats")
            return False
        return True

    async def _same_life(self, batches: dict[TopicPartition, list]) -> None:
        if self._must_stop is not None:
            raise self._must_stop
        if any(records[0].offset < self._next_offsets.get(tp, 0) for tp, records in batches.items() if records):
            await self.life.confirm()

    def stop(self) -> None:
        self._stopping.set()
