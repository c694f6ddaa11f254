"""The pipeline as the live worker runs it: checkpointed state, records acknowledged late.

Per partition the state is one :class:`~streams.pipeline.PartitionPipeline`. Every checkpoint
interval the worker snapshots the state of every partition it touched (pickled, with the last
offset), waits until the outputs of the records it covers are on the broker, writes it to the
store (zlib-compressed), and only *then* acknowledges the records to the broker. So the
committed offset never passes the checkpoint: a worker that crashes and
restarts (or a partition that moves to another worker) loads the checkpoint, is redelivered
the records after the committed offset, and skips those the checkpoint already holds. No
record is lost or counted twice; outputs produced again after a crash carry the same ids
(batches are byte-identical and published idempotently).

Offsets are only meaningful within one broker life: a checkpoint from another cluster id
keeps its state (sessions and windows go on) but not its offset.
"""

from __future__ import annotations

import pickle
import time
import zlib
from collections import Counter
from dataclasses import dataclass

import structlog
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from streams.store import StreamCheckpoint
from streams.pipeline import Outputs, PartitionPipeline, PipelineSet, Received

log = structlog.get_logger(__name__)


def checkpointed_stats(sessions: sessionmaker, consumer: str) -> tuple[Counter, Counter, int]:
    """Counts, PII replacements and buffered records over every partition's last checkpoint."""
    counts: Counter = Counter()
    pii: Counter = Counter()
    buffered = 0
    with sessions() as session:
        rows = session.scalars(select(StreamCheckpoint).where(StreamCheckpoint.consumer == consumer))
        for row in rows:
            pipeline: PartitionPipeline = pickle.loads(zlib.decompress(row.state))
            counts.update(pipeline.stats.counts)
            pii.update(pipeline.stats.pii)
            buffered += len(pipeline.curator.buffer)
    return counts, pii, buffered


@dataclass(frozen=True)
class Snapshot:
    partition: int
    offset: int
    state: bytes  # the pickled PartitionPipeline


class LivePipeline:
    def __init__(self, pipelines: PipelineSet, sessions: sessionmaker, *, consumer: str, cluster_id: str) -> None:
        self.pipelines = pipelines
        self.sessions = sessions
        self.consumer = consumer
        self.cluster_id = cluster_id
        self.last_record_at: dict[int, float] = {}  # wall time, to tick idle partitions

    def _restore(self, partition: int) -> PartitionPipeline | None:
        with self.sessions() as session:
            row = session.get(StreamCheckpoint, (self.consumer, partition))
        if row is None:
            return None
        pipeline: PartitionPipeline = pickle.loads(zlib.decompress(row.state))
        if row.cluster_id != self.cluster_id:
            pipeline.offset = -1  # a new broker life restarts offsets at zero
        log.info("pipeline.restored", partition=partition, offset=pipeline.offset, from_cluster=row.cluster_id)
        return pipeline

    def handle(
        self, partition: int, offset: int, value: bytes | None, received: Received | None = None
    ) -> Outputs | None:
        """Run one record (``received``: its receive time); None when the restored state already holds it."""
        self.last_record_at[partition] = time.monotonic()
        if partition not in self.pipelines.partitions:
            restored = self._restore(partition)
            if restored is not None:
                self.pipelines.partitions[partition] = restored
        pipeline = self.pipelines.partitions.get(partition)
        if pipeline is not None and offset <= pipeline.offset:
            return None
        return self.pipelines.process(partition, offset, value, received)

    def snapshot(self, partitions: set[int]) -> list[Snapshot]:
        """The state of these partitions as of now (the caller must not await in between)."""
        return [
            Snapshot(partition, pipeline.offset, pickle.dumps(pipeline, protocol=pickle.HIGHEST_PROTOCOL))
            for partition in sorted(partitions)
            if (pipeline := self.pipelines.partitions.get(partition)) is not None
        ]

    def commit(self, snapshots: list[Snapshot]) -> None:
        with self.sessions.begin() as session:
            for snapshot in snapshots:
                session.merge(StreamCheckpoint(consumer=self.consumer, partition=snapshot.partition,
                                               cluster_id=self.cluster_id, offset=snapshot.offset,
                                               state=zlib.compress(snapshot.state, 1)))

    def revoke(self, partitions: set[int]) -> None:
        """Forget partitions this worker no longer owns; their next owner restores them."""
        for partition in partitions:
            self.pipelines.partitions.pop(partition, None)
            self.last_record_at.pop(partition, None)

    def idle_partitions(self, assigned: set[int], idle_s: float) -> list[int]:
        now = time.monotonic()
        return sorted(p for p in assigned if now - self.last_record_at.setdefault(p, now) >= idle_s)
