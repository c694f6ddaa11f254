"""Historical import: a finished log of old events through the pipeline, in event time, beside
the live loop.

The live worker's watermark ticks carry wall-clock time, so events sent hours or months late
find their windows closed (``late_feedback``). An import therefore never goes through the
events topic. It runs the same :class:`~streams.pipeline.PipelineSet` code in a state of its
own: its own windows, de-duplication, quality memory and curator, created fresh for each run.
Within each partition (assigned by session id, as Kafka's default partitioner would) records
are taken in ``occurred_at`` order, so every feedback meets its interaction as it would have
live, and at the end of the input every window is closed and every buffered record cut
(:meth:`~streams.pipeline.PipelineSet.finish`). Live partitions never see an imported
record, and live traffic never moves an import's event time.

Each run has an id (``--run``, or ``import-`` plus a digest of its records in order), which
prefixes what the run makes that the live worker makes too: batch ids are
``<run>.batch-p<partition>-<n>`` and dead-letter ids ``<run>.p<partition>-<n>-<reason>``.
Example ids stay the interaction ids (they name the interaction). So an import's ids never
collide with live ones, and the same input under the same run id gives the same outputs,
byte for byte.

The raw records go to ``feedloop.imports.v1`` (which the archive keeps, like every topic)
with headers naming the run and each record's place (partition, position), so
:func:`archived_run` gives a later replay exactly the input the import ran.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from datetime import datetime

from sqlalchemy.orm import sessionmaker

from streams.archive import ArchivedRecord, read_segment, segments
from streams.objects import ObjectStore
from streams.pipeline import Outputs, PipelineSet
from streams.topics import EVENTS, IMPORTS

RUN_HEADER = "feedloop-import-run"
PARTITION_HEADER = "feedloop-import-partition"
POSITION_HEADER = "feedloop-import-position"
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # no dot: "<run>." prefixes ids


def check_run_id(run: str) -> str:
    if not RUN_ID.match(run):
        raise ValueError(f"import run id {run!r}: 1-64 letters, digits, '_' or '-', starting with a letter or digit")
    return run


def _event_time(record: ArchivedRecord) -> float:
    """The record's ``occurred_at`` in seconds; the broker's receive time if it has none
    readable (such a record is dead-lettered by the pipeline wherever it sits)."""
    try:
        return datetime.fromisoformat(json.loads(record.value)["occurred_at"]).timestamp()
    except (TypeError, ValueError, KeyError):
        return record.timestamp_ms / 1000


def in_event_time(records: Iterable[ArchivedRecord]) -> list[ArchivedRecord]:
    """Records per partition (partitions in order), each partition's sorted by ``occurred_at``
    (stable: ties keep their input order), offsets renumbered 0, 1, ... in that order."""
    by_partition: dict[int, list[ArchivedRecord]] = {}
    for record in records:
        by_partition.setdefault(record.partition, []).append(record)
    ordered = []
    for partition in sorted(by_partition):
        ranked = sorted(by_partition[partition], key=_event_time)
        ordered += [dataclasses.replace(r, topic=EVENTS.name, offset=i) for i, r in enumerate(ranked)]
    return ordered


def run_digest(records: list[ArchivedRecord]) -> str:
    """sha256 of a run's input as the run takes it (partition, position, bytes). Recorded with
    the run's progress, so a run id reused for another input is refused."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.partition}:{record.offset}:{len(record.value or b'')}:".encode())
        digest.update(record.value or b"")
    return digest.hexdigest()


def default_run_id(digest: str) -> str:
    """``import-`` and the start of the input's digest: the same input, with the same
    partition count, gets the same id, so running it again is recognized."""
    return f"import-{digest[:16]}"


def for_run(run: str, outputs: Outputs) -> Outputs:
    """The outputs with the run's prefix on the ids the live worker also makes."""
    return Outputs(
        dead_letters=[d.model_copy(update={"dead_letter_id": f"{run}.{d.dead_letter_id}"})
                      for d in outputs.dead_letters],
        examples=outputs.examples,
        batches=[dataclasses.replace(cut, batch_id=f"{run}.{cut.batch_id}") for cut in outputs.batches],
    )


def import_steps(records: list[ArchivedRecord], pipelines: PipelineSet, run: str
                 ) -> Iterator[tuple[ArchivedRecord | None, Outputs]]:  # fmt: skip
    """Each record (in the order given) with its outputs, then ``(None, outputs)`` of the end
    of the input, where every window closes and every buffered record is cut."""
    for record in records:
        yield record, for_run(run, pipelines.process(record.partition, record.offset, record.value or b""))
    yield None, for_run(run, pipelines.finish())


def run_headers(run: str) -> list[tuple[str, bytes]]:
    return [(RUN_HEADER, run.encode())]


def raw_headers(run: str, record: ArchivedRecord) -> list[tuple[str, bytes]]:
    """Headers of a raw record on the imports topic: the run, and its place in the run."""
    return [*run_headers(run), (PARTITION_HEADER, str(record.partition).encode()),
            (POSITION_HEADER, str(record.offset).encode())]  # fmt: skip


def archived_run(sessions: sessionmaker, objects: ObjectStore, run: str) -> list[ArchivedRecord]:
    """The input of import ``run`` as the import took it, from the archived imports topic.

    A record sent twice (a run resumed after a crash sends its last unacknowledged chunk
    again) is taken once, by its place in the run."""
    with sessions() as session:
        chosen = segments(session, IMPORTS.name)
    wanted = run.encode()
    found: dict[tuple[int, int], ArchivedRecord] = {}
    for segment in chosen:
        for record in read_segment(objects, segment):
            if record.headers.get(RUN_HEADER) != wanted:
                continue
            place = (int(record.headers[PARTITION_HEADER]), int(record.headers[POSITION_HEADER]))
            found.setdefault(place, ArchivedRecord(EVENTS.name, place[0], place[1], record.timestamp_ms,
                                                   record.key, record.value, {}))
    return [found[place] for place in sorted(found)]


def archived_runs(sessions: sessionmaker, objects: ObjectStore) -> dict[str, int]:
    """Import runs in the archive and how many records each sent."""
    with sessions() as session:
        chosen = segments(session, IMPORTS.name)
    runs: dict[str, int] = {}
    for segment in chosen:
        for record in read_segment(objects, segment):
            run = record.headers.get(RUN_HEADER, b"?").decode()
            runs[run] = runs.get(run, 0) + 1
    return runs
