"""The pipeline as the live worker runs it: checkpointed state, records acknowledged late.

Per partition the state is one :class:`~streams.pipeline.PartitionPipeline`, checkpointed by
the protocol of :mod:`streams.checkpoint`: every checkpoint interval the worker snapshots the
state of every partition it touched (pickled, with its last offset), waits until the outputs
of the records it covers are on the broker, writes it to the store, and only *then*
acknowledges the records. A worker that crashes and restarts (or a partition that moves to
another worker) loads the checkpoint, is redelivered the records after the committed offset,
and skips those the checkpoint already holds. No record is lost or counted twice; outputs
produced again after a crash carry the same ids (batches are byte-identical and published
idempotently). A checkpoint that cannot be read is rebuilt from the archived records of its
partition, exactly: the pipeline is deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from streams.archive import ArchivedRecord
from streams.checkpoint import Checkpoints, Position, Rebuild, pickled
from streams.objects import ObjectStore
from streams.pipeline import Outputs, PartitionPipeline, PipelineSet, Received, receive_time
from streams.topics import EVENTS

# The format of the pickled PartitionPipeline: bump it when a class in it moves or changes
# meaning, and the next start rebuilds every partition from the archive.
# 2: the join, de-duplication and users keyed by app (streams.pipeline, streams.join).
# 3: an open interaction keeps the ids of the feedback it consumed (upserts replace feedback),
#    and the closed examples kept for pairing are timed by their close, not their occurrence.
# 4: interactions and examples carry the router's probabilities (a pickle from before lacks them).
STATE_FORMAT = 4


@dataclass(frozen=True)
class Snapshot:
    partition: int
    offset: int
    state: bytes  # the pickled PartitionPipeline


class LivePipeline:
    def __init__(self, pipelines: PipelineSet, sessions: sessionmaker, *, objects: ObjectStore, consumer: str,
                 cluster_id: str) -> None:
        self.pipelines = pipelines
        self.sessions = sessions
        self.checkpoints = Checkpoints(sessions, objects, consumer=consumer, cluster_id=cluster_id,
                                       format_version=STATE_FORMAT)  # fmt: skip
        self.last_record_at: dict[int, float] = {}  # wall time, to tick idle partitions

    def restore(self, partitions: set[int]) -> dict[int, PartitionPipeline]:
        """The checkpointed state of those of these partitions that have one (blocking: it may
        rebuild from the archive; the caller adds it to ``pipelines``)."""
        restored = {p: self.checkpoints.load(p, self._rebuild(p)) for p in sorted(partitions)}
        return {p: state for p, state in restored.items() if state is not None}

    def _rebuild(self, partition: int) -> Rebuild[PartitionPipeline]:
        pipelines = self.pipelines

        def fold(pipeline: PartitionPipeline, record: ArchivedRecord) -> None:
            received = receive_time(record.headers, record.timestamp_ms / 1000)  # as the worker saw it
            pipeline.process(record.offset, record.value or b"", scrubber=pipelines.scrubber,
                             pseudonyms=pipelines.pseudonyms, received=received)  # fmt: skip

        def place(pipeline: PartitionPipeline, positions: dict[Position, int]) -> None:
            pipeline.offset = positions.get((EVENTS.name, partition), -1)

        return Rebuild(topics=(EVENTS.name,), partition=partition, fold=fold, place=place,
                       fresh=lambda: PartitionPipeline(partition, pipelines.config, pipelines.checks))  # fmt: skip

    def handle(
        self, partition: int, offset: int, value: bytes | None, received: Received | None = None
    ) -> Outputs | None:
        """Run one record (``received``: its receive time); None when the restored state already holds it."""
        self.last_record_at[partition] = time.monotonic()
        pipeline = self.pipelines.partitions.get(partition)
        if pipeline is not None and offset <= pipeline.offset:
            return None
        return self.pipelines.process(partition, offset, value, received)

    def snapshot(self, partitions: set[int]) -> list[Snapshot]:
        """The state of these partitions as of now (the caller must not await in between)."""
        return [
            Snapshot(partition, pipeline.offset, pickled(pipeline))
            for partition in sorted(partitions)
            if (pipeline := self.pipelines.partitions.get(partition)) is not None
        ]

    def commit(self, snapshots: list[Snapshot]) -> None:
        with self.sessions.begin() as session:
            for snapshot in snapshots:
                self.checkpoints.put(session, snapshot.partition, offset=snapshot.offset, state=snapshot.state,
                                     positions={(EVENTS.name, snapshot.partition): snapshot.offset})  # fmt: skip

    def revoke(self, partitions: set[int]) -> None:
        """Forget partitions this worker no longer owns; their next owner restores them."""
        for partition in partitions:
            self.pipelines.partitions.pop(partition, None)
            self.last_record_at.pop(partition, None)

    def idle_partitions(self, assigned: set[int], idle_s: float) -> list[int]:
        now = time.monotonic()
        return sorted(p for p in assigned if now - self.last_record_at.setdefault(p, now) >= idle_s)
