"""The one checkpoint protocol of the stream workers (the pipeline and the learner).

A worker keeps its state in memory, folded from its input records, and every checkpoint
interval writes it to one ``stream_checkpoints`` row per key (the pipeline: per events
partition; the learner: one row). A row holds:

- ``state``: the pickled state, zlib-compressed;
- ``format_version``: the format of that pickle, a constant of the worker's module that is
  bumped when the pickled classes move or change their meaning. Rows written before format
  versions existed are version 1, the bytes version 1 writes (zlib of a pickle);
- ``positions``: the last offset handled per input (topic, partition), in plain JSON, so
  what the state covers can be read without unpickling it (rows from before: none);
- ``cluster_id``: the broker life those offsets belong to (a memory-only broker restarts
  them at zero; a row of another life keeps its state and forgets its positions);
- ``offset``: the worker's own progress figure for ``feedloop status`` (the pipeline: the
  partition's last offset; the learner: its state version).

**Saving.** :class:`Unacked` holds the records handled since the last written checkpoint.
A checkpoint snapshots (pickles) the state on the event loop, with no await between the
snapshot and taking the records, so the snapshot covers exactly them; then the worker's write
runs (outputs delivered, and the row written in one transaction with whatever else must agree
with it), compression and the store in a thread. Only after it returns are the records
acknowledged, so the committed offset never passes a checkpoint: after a crash the broker
redelivers from the committed offset and the state skips what it already holds. If any step
fails, the records stay unacknowledged in front of those handled since, a warning says so,
and the next interval writes a checkpoint covering all of them: an outage of the store or
the broker delays acknowledgements (a longer redelivery after a crash) and stops nothing.

**Loading.** A row that cannot be read (another format version, a class that moved, corrupt
bytes) must not become a crash loop, and its state need not be lost: the archive holds every
record the state was folded from. So the state is rebuilt by folding the archived input
records again through the worker's own handling code, from an empty state, up to the row's
positions, and the worker goes on from there as from a readable row. Outputs of the rebuild
are dropped: they were delivered before the checkpoint was written. Which records a row
covers: every broker life archived before the row's, whole (the state carried across them),
and the row's own life up to its positions (all of it for a row without positions); lives
after the row's not at all. Within one life the inputs' records are merged by their broker
timestamps; a partition's own order is always the log's. That rebuilds the pipeline's state
exactly (one partition), and the learner's up to the interleaving of its input partitions,
which the log does not record (docs/learners.md, "Replay"). Erasures apply as of now, as in
a replay. Why a rebuild and not an empty state: the records after the committed offset are
all the broker redelivers; an empty state would forget everything before them.

What can still go wrong is said in the log, with what to do: the archive may not yet hold
every record the row covered (the archiver lags behind the worker by its flush interval, or
lost records); the state then lacks them (``checkpoint.rebuild_short``). Setting a row's
``format_version`` to 0 makes the next start rebuild it again.
"""

from __future__ import annotations

import asyncio
import heapq
import pickle
import zlib
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from streams.archive import ArchivedRecord, read_segment, segments
from streams.broker_life import BrokerLife, NewBrokerLife
from streams.objects import ObjectStore
from streams.lease import LeaseLost
from streams.store import ArchiveSegment, StreamCheckpoint

log = structlog.get_logger(__name__)

S = TypeVar("S")
T = TypeVar("T")
Position = tuple[str, int]  # (topic, partition)


class Unreadable(Exception):
    """A checkpoint row whose state this code cannot restore."""


def pickled(state: object) -> bytes:
    """The state's bytes for a checkpoint; call on the event loop, where nothing changes it."""
    return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)


def decode(row: StreamCheckpoint, format_version: int) -> Any:
    """The state of a row written in ``format_version``, else :class:`Unreadable`."""
    if row.format_version != format_version:
        raise Unreadable(f"format version {row.format_version}, this code reads {format_version}")
    try:
        return pickle.loads(zlib.decompress(row.state))
    except Exception as error:  # corrupt bytes, a class that moved or changed: the same remedy
        raise Unreadable(f"{type(error).__name__}: {error}") from error


@dataclass(frozen=True)
class Rebuild(Generic[S]):
    """How a worker's state is folded from its input records, to rebuild an unreadable row."""

    topics: tuple[str, ...]
    partition: int | None  # of each topic; None: every partition
    fresh: Callable[[], S]
    fold: Callable[[S, ArchivedRecord], None]
    place: Callable[[S, dict[Position, int]], None]  # set the positions; {}: a new broker life

    def reads(self, segment: ArchiveSegment) -> bool:
        return segment.topic in self.topics and self.partition in (None, segment.partition)


class Checkpoints:
    """The checkpoint rows of one consumer in one broker life: load them, put them."""

    def __init__(self, sessions: sessionmaker, objects: ObjectStore, *, consumer: str, cluster_id: str,
                 format_version: int) -> None:
        self.sessions = sessions
        self.objects = objects
        self.consumer = consumer
        self.cluster_id = cluster_id
        self.format_version = format_version

    def put(self, session: Session, key: int, *, offset: int, positions: dict[Position, int], state: bytes) -> None:
        """Write a row in the caller's transaction (in a thread: this compresses)."""
        session.merge(StreamCheckpoint(
            consumer=self.consumer, partition=key, cluster_id=self.cluster_id, offset=offset,
            format_version=self.format_version, positions=sorted([t, p, o] for (t, p), o in positions.items()),
            state=zlib.compress(state, 1),
        ))  # fmt: skip

    def load(self, key: int, rebuild: Rebuild[S]) -> S | None:
        """The state of the row, rebuilt from the archive if it cannot be read; None: no row."""
        with self.sessions() as session:
            row = session.get(StreamCheckpoint, (self.consumer, key))
        if row is None:
            return None
        positions = None if row.positions is None else {(t, p): o for t, p, o in row.positions}
        try:
            state = decode(row, self.format_version)
        except Unreadable as error:
            log.warning("checkpoint.unreadable", consumer=self.consumer, key=key, reason=str(error),
                        action="rebuilding the state from the archive; nothing to do unless "
                               "checkpoint.rebuild_short follows")  # fmt: skip
            state = self._rebuild(key, rebuild, row.cluster_id, positions)
        else:
            log.info("checkpoint.restored", consumer=self.consumer, key=key, offset=row.offset,
                     from_cluster=row.cluster_id)  # fmt: skip
        if row.cluster_id != self.cluster_id:
            rebuild.place(state, {})  # a new broker life restarts offsets at zero
        return state

    def unprocessed(self, topics: Iterable[str]) -> tuple[dict[str, int], int | None]:
        """What the archive holds of these topics in this broker life after this consumer's
        checkpoints (a new life will not redeliver it): the count per ``topic:partition``, and
        the broker timestamp (ms) of the earliest, for ``feedloop replay --republish --since``."""
        wanted = set(topics)
        with self.sessions() as session:
            rows = session.scalars(select(StreamCheckpoint).where(StreamCheckpoint.consumer == self.consumer))
            positions = {(t, p): o for row in rows if row.cluster_id == self.cluster_id for t, p, o in row.positions or ()}
            chosen = [s for s in segments(session) if s.cluster_id == self.cluster_id and s.topic in wanted
                      and s.last_offset > positions.get((s.topic, s.partition), -1)]  # fmt: skip
        counts: dict[str, int] = {}
        earliest: int | None = None
        for segment in chosen:
            after = positions.get((segment.topic, segment.partition), -1)
            for record in read_segment(self.objects, segment):
                if record.offset > after:
                    key = f"{record.topic}:{record.partition}"
                    counts[key] = counts.get(key, 0) + 1
                    earliest = record.timestamp_ms if earliest is None else min(earliest, record.timestamp_ms)
        return counts, earliest

    def fold_archive(self, rebuild: Rebuild[S]) -> S:
        """The state folded from the archived input records, as a rebuild with no row to stop
        at: the broker lives up to this one, or every life when this one archived nothing (an
        offline tool replaying a worker, ``feedloop whatif``, passes cluster id "")."""
        return self._rebuild(0, rebuild, self.cluster_id, None)

    def _rebuild(self, key: int, rebuild: Rebuild[S], cluster_id: str, positions: dict[Position, int] | None) -> S:
        state = rebuild.fresh()
        reached: dict[Position, int] = {}
        folded = 0
        for life, records in self._covered(rebuild, cluster_id, positions):
            rebuild.place(state, {})  # each life's offsets start at zero
            for record in records:
                rebuild.fold(state, record)
                folded += 1
                if life == cluster_id:
                    reached[(record.topic, record.partition)] = record.offset
        log.info("checkpoint.rebuilt", consumer=self.consumer, key=key, records=folded)
        if positions is None:
            return state
        short = {f"{t}:{p}": {"archived_to": reached.get((t, p), -1), "checkpoint_at": o}
                 for (t, p), o in positions.items() if reached.get((t, p), -1) < o}  # fmt: skip
        if short:
            log.warning("checkpoint.rebuild_short", consumer=self.consumer, key=key, partitions=short,
                        action="the archive did not hold every record the checkpoint covered, so the state "
                               "lacks them; once `feedloop archive verify` passes and the archiver has "
                               "caught up, stop the worker, set this row's format_version to 0, start it "
                               "again")  # fmt: skip
        rebuild.place(state, positions)  # where the broker redelivers from, as the row said
        return state

    def _covered(self, rebuild: Rebuild, cluster_id: str, positions: dict[Position, int] | None
                 ) -> Iterator[tuple[str, Iterator[ArchivedRecord]]]:
        """Per broker life, in archive order, the archived input records the row covers."""
        with self.sessions() as session:
            chosen = [s for s in segments(session) if rebuild.reads(s)]
        lives = list(dict.fromkeys(s.cluster_id for s in chosen))  # in the order first archived
        if cluster_id in lives:
            lives = lives[: lives.index(cluster_id) + 1]
        else:  # the row's life archived nothing: every life before this one
            lives = [life for life in lives if life != self.cluster_id]
        for life in lives:
            bound = positions if life == cluster_id else None
            runs: dict[Position, list[ArchiveSegment]] = {}
            for s in chosen:
                if s.cluster_id == life and (bound is None or (s.topic, s.partition) in bound):
                    runs.setdefault((s.topic, s.partition), []).append(s)
            yield life, heapq.merge(
                *(self._records(run, None if bound is None else bound[tp]) for tp, run in runs.items()),
                key=lambda record: record.timestamp_ms,
            )

    def _records(self, run: list[ArchiveSegment], last: int | None) -> Iterator[ArchivedRecord]:
        for segment in run:
            for record in read_segment(self.objects, segment):
                if last is not None and record.offset > last:
                    return
                yield record


class Unacked(Generic[T]):
    """Records handled since the last written checkpoint, acknowledged once one covers them.

    The worker adds each handled batch of records with what it produced for the checkpoint
    to deliver (or None). :meth:`flush` first confirms the broker life (``life``:
    streams/broker_life.py), so that nothing of a new one is ever acknowledged, then hands
    that to ``write``, which must take its snapshot of the state before its first await. The
    lock also keeps a revocation or a restore from running in the middle of a checkpoint."""

    def __init__(self, consumer: str, life: BrokerLife | None = None) -> None:
        self.consumer = consumer
        self.life = life
        self.lock = asyncio.Lock()
        self._events: list[tuple[Any, list[object]]] = []  # (the stream that acks them, events)
        self._produced: list[T] = []

    def add(self, stream: Any, events: Iterable[object], produced: T | None = None) -> None:
        self._events.append((stream, list(events)))
        if produced is not None:
            self._produced.append(produced)

    async def flush(self, write: Callable[[list[T]], Awaitable[None]]) -> None:
        """Write a checkpoint covering every record added; acknowledge them if it is written.

        Raises :class:`~streams.broker_life.NewBrokerLife` (nothing acknowledged) when the
        broker is no longer the one the process started on."""
        async with self.lock:
            events, produced = self._events, self._produced
            self._events, self._produced = [], []
            try:
                if self.life is not None:  # idle too: a broker restart is noticed without new records
                    await self.life.confirm()
                await write(produced)
            except BaseException as error:
                self._events, self._produced = events + self._events, produced + self._produced
                if not isinstance(error, Exception) or isinstance(error, (NewBrokerLife, LeaseLost)):
                    raise  # cancelled (shutting down), a new broker, another learner active: the process stops
                log.warning("checkpoint.write_failed", consumer=self.consumer, exc_info=True,
                            unacknowledged=sum(len(e) for _, e in self._events),
                            action="the records stay unacknowledged and the next checkpoint retries them; "
                                   "check the store and the broker if this repeats")  # fmt: skip
                return
            for stream, handled in events:
                for event in handled:
                    await stream.ack(event)
