"""Replay: run the archived log (or a JSON-lines file) through the pipeline again.

``--offline`` runs the pipeline code in this process with no broker: rebuild state, backfill
batches, or try other settings (``FEEDLOOP_PIPELINE__*``) into another data directory.
``--republish`` puts the records back onto the events topic for the live workers.

At the end of its input an offline replay closes every window by default (a finished log:
one example per interaction, every record cut into a batch); ``close_at_end=False`` stops
where the input stops, as a running worker's state does, and says what is left open.

Records are processed per partition in offset order, exactly as the live worker saw them, so
the same log gives byte-identical batch manifests.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from aiokafka.partitioner import DefaultPartitioner
from sqlalchemy.orm import sessionmaker

from streams.archive import ArchivedRecord, decode_record, read_segment, segments
from streams.batches import publish_batch
from streams.contract import BatchEmitted, with_default_session
from streams.importer import for_run
from streams.objects import ObjectStore
from streams.pipeline import Outputs, PipelineSet, receive_time
from streams.topics import EVENTS


@dataclass(frozen=True)
class TimeRange:
    since_ms: int | None = None
    until_ms: int | None = None

    @classmethod
    def parse(cls, since: str | None, until: str | None) -> TimeRange:
        def ms(value: str | None) -> int | None:
            return None if value is None else int(datetime.fromisoformat(value).timestamp() * 1000)

        return cls(ms(since), ms(until))

    def __contains__(self, timestamp_ms: int) -> bool:
        return (self.since_ms is None or timestamp_ms >= self.since_ms) and (
            self.until_ms is None or timestamp_ms < self.until_ms
        )


def archive_records(sessions: sessionmaker, objects: ObjectStore, window: TimeRange
                    ) -> tuple[Iterator[ArchivedRecord], int]:
    """Events-topic records of the archive, partition by partition in sealed order, and their count."""
    with sessions() as session:
        chosen = [
            s for s in segments(session, EVENTS.name)
            if (window.since_ms is None or s.last_timestamp_ms >= window.since_ms)
            and (window.until_ms is None or s.first_timestamp_ms < window.until_ms)
        ]
    chosen.sort(key=lambda s: (s.partition, s.id))
    total = sum(s.event_count for s in chosen)

    def records() -> Iterator[ArchivedRecord]:
        for segment in chosen:
            for record in read_segment(objects, segment):
                if record.timestamp_ms in window:
                    yield record

    return records(), total


def file_records(path: Path, partitions: int, window: TimeRange) -> Iterator[ArchivedRecord]:
    """Records of a JSON-lines file (optionally .gz): archive lines as they are, or bare events,
    which are assigned to partitions by their session id as Kafka's default partitioner would
    and timed by their ``occurred_at`` (they carry no broker receive time). A line that is not
    an event is kept (timed 0) for the pipeline to dead-letter with its reason."""
    partitioner = DefaultPartitioner()
    opener = gzip.open if path.suffix == ".gz" else open
    offsets: dict[int, int] = {}
    with opener(path, "rt", encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    decoded = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            data = None  # the pipeline dead-letters it (invalid_json), raw bytes kept
        if not isinstance(data, dict):
            data = {}
        if "topic" in data and "offset" in data:
            record = decode_record(line)
            if record.topic != EVENTS.name:
                continue
        else:
            key = str(with_default_session(data).get("session_id", "")).encode()
            partition = partitioner(key, list(range(partitions)), list(range(partitions)))
            offsets[partition] = offsets.get(partition, -1) + 1
            try:
                received_ms = int(datetime.fromisoformat(data["occurred_at"]).timestamp() * 1000)
            except (KeyError, TypeError, ValueError):
                received_ms = 0  # no readable time: the pipeline dead-letters it (schema_violation)
            record = ArchivedRecord(EVENTS.name, partition, offsets[partition], received_ms, key,
                                    line.strip().encode(), {})
        if record.timestamp_ms in window:
            decoded.append(record)
    decoded.sort(key=lambda r: (r.partition, r.offset))
    return iter(decoded)


@dataclass
class ReplaySummary:
    records: int = 0
    examples: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    batches: list[BatchEmitted] = field(default_factory=list)
    pii_scrubbed: dict[str, int] = field(default_factory=dict)  # replacements per PII type
    closed_at_end: int = 0  # examples of windows closed by the end of the input
    open_at_end: int = 0  # interactions whose window is still open when the replay stops
    orphans_at_end: int = 0  # feedback still waiting for its interaction
    buffered_at_end: int = 0  # training records still waiting for a batch

    def count(self, outputs: Outputs) -> None:
        self.examples += len(outputs.examples)
        for letter in outputs.dead_letters:
            self.dead_letters[letter.reason] = self.dead_letters.get(letter.reason, 0) + 1

    def finish(self, pipelines: PipelineSet) -> None:
        """What is left in the state once the input is done, and the PII replaced."""
        for pipeline in pipelines.partitions.values():
            self.open_at_end += len(pipeline.join.open)
            self.orphans_at_end += sum(len(waiting) for waiting in pipeline.join.orphans.values())
            self.buffered_at_end += len(pipeline.curator.buffer)
            for kind, count in pipeline.stats.pii.items():
                self.pii_scrubbed[kind] = self.pii_scrubbed.get(kind, 0) + count


def replay_offline(
    records: Iterator[ArchivedRecord],
    pipelines: PipelineSet,
    *,
    objects: ObjectStore,
    sessions: sessionmaker,
    on_record=None,
    close_at_end: bool = True,
    import_run: str | None = None,
) -> ReplaySummary:
    """Run the records through the pipeline and publish the batches cut (objects and store rows).

    ``close_at_end``: the input is a finished log. Event time then runs on past its end until
    every window has closed and every buffered record is cut (``PipelineSet.finish``): one
    example per interaction. Without it, the state stops where the input stops, as a running
    worker's does, and the summary says what is still open. ``import_run``: the records are
    that historical import's input (``streams.importer.archived_run``); its ids are used."""
    summary = ReplaySummary()

    def take(outputs: Outputs) -> None:
        if import_run is not None:
            outputs = for_run(import_run, outputs)
        summary.count(outputs)
        for cut in outputs.batches:
            summary.batches.append(publish_batch(cut, objects=objects, sessions=sessions))

    for record in records:
        received = receive_time(record.headers, record.timestamp_ms / 1000)
        take(pipelines.process(record.partition, record.offset, record.value or b"", received))
        summary.records += 1
        if on_record is not None:
            on_record(summary.records)
    if close_at_end:
        outputs = pipelines.finish()
        summary.closed_at_end = len(outputs.examples)
        take(outputs)
    summary.finish(pipelines)
    return summary
