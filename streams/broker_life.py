"""Whether the broker under a running process is still the one it started on.

Offsets mean something only within one broker life, named by its cluster id: every checkpoint
row (streams/checkpoint.py) and archive segment carries it. Kafka keeps its cluster id and its
log across restarts, so there a life lasts as long as the cluster. A memory-only broker (the
embedded one) comes back empty, with a new id and offsets from zero; a process still running
would take the new life's first records for redeliveries of records it already holds (their
offsets are at or below its positions) and drop them, and the archiver would file them under
the old life's name, over its segments.

So a process asks the broker again before every acknowledgement: the worker and the learner
before each checkpoint acknowledges its records, the archiver before each commit and whenever
partitions are assigned to it; one request per checkpoint. (Asking only
when a record came at or below a held offset is not enough: Faust itself drops records below
the offset it last read, so after the broker's restart the first records that reach the agent
can be new-looking ones above it.) On a new life the process stops with
:class:`NewBrokerLife` before acknowledging anything of it. Started again (compose
and systemd do), it reads the new id; its checkpoint keeps the state and forgets the old life's
positions, and it reads the new life from the start. What the old life held and no one
archived is gone with it: that is why production runs Kafka (docs/operations.md).
"""

from __future__ import annotations

from datetime import datetime, timezone

import structlog

from streams import kafka
from streams.kafka import KafkaSettings

log = structlog.get_logger(__name__)


async def cluster_id(kafka_settings: KafkaSettings) -> str:
    """The broker's cluster id: offsets are only meaningful within one cluster."""
    admin = kafka.admin(kafka_settings)
    await admin.start()
    try:
        return (await admin.describe_cluster())["cluster_id"]
    finally:
        await admin.close()


class NewBrokerLife(RuntimeError):
    """The broker's cluster id changed under a running process: it must stop and start again."""

    def __init__(self, process: str, started_on: str, now: str) -> None:
        super().__init__(f"{process}: the broker is not the one it started on (cluster {started_on}, now {now})")
        self.process, self.started_on, self.now = process, started_on, now

    def log(self, unprocessed: tuple[dict[str, int], int | None] = ({}, None)) -> None:
        """Say so, with what the archive holds of the old life that this process's checkpoints
        do not (``Checkpoints.unprocessed``) and the command that puts it back."""
        counts, earliest_ms = unprocessed
        since = None if earliest_ms is None else datetime.fromtimestamp(earliest_ms / 1000, timezone.utc).isoformat()
        log.error("broker.new_life", process=self.process, started_on=self.started_on, now=self.now,
                  unprocessed=counts, republish=since and f"feedloop replay --republish --since {since}",
                  action="the broker restarted empty or was replaced; this process acknowledged nothing "
                         "of the new one and stops: start it again (compose restarts it) and it reads the "
                         "new broker from its start. Records the old broker held that the archive does "
                         "not are lost: run Kafka in production (docs/operations.md)")  # fmt: skip


class BrokerLife:
    """The broker life a process started on; :meth:`confirm` checks it still is the broker's."""

    def __init__(self, kafka_settings: KafkaSettings, started_on: str, process: str) -> None:
        self.kafka_settings = kafka_settings
        self.started_on = started_on
        self.process = process

    async def confirm(self) -> None:
        """Raise :class:`NewBrokerLife` if the broker's cluster id changed (errors reaching the
        broker propagate: the caller acknowledges nothing and tries again). A client per call:
        one kept open was shared by concurrent callers and failed with NodeNotReadyError."""
        now = await cluster_id(self.kafka_settings)
        if now != self.started_on:
            raise NewBrokerLife(self.process, self.started_on, now)
