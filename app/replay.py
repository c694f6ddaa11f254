"""`feedloop replay`: progress, output locations and the summary around streams.replay."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import structlog
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import migrations
from app.broker import ensure_topics
from app.runtime import tune_gc
from app.settings import Settings
from streams import kafka
from streams.archive import ArchivedRecord
from streams.contract import BatchEmitted
from streams.pii import Scrubber
from streams.importer import archived_run, archived_runs
from streams.objects import ObjectStore
from streams.pipeline import PipelineSet
from streams.pseudonyms import Pseudonymizer
from streams.replay import TimeRange, archive_records, file_records, replay_offline
from streams.store import make_engine, make_sessionmaker
from streams.topics import EVENTS, IMPORTS
from streams.training_data import BATCHES

log = structlog.get_logger(__name__)
REPUBLISH_CHUNK = 1000
REPUBLISH_ATTEMPTS = 5


def _source(settings: Settings, source: str, window: TimeRange) -> tuple[Iterator[ArchivedRecord], int | None]:
    if source == "archive":
        return archive_records(make_sessionmaker(make_engine(settings.store_url)), settings.objects, window)
    path = Path(source)
    if not path.exists():
        raise SystemExit(f"no such file: {path}; --source takes 'archive' or a .jsonl/.jsonl.gz file")
    records = list(file_records(path, settings.topic_partitions, window))
    return iter(records), len(records)


def _import_source(settings: Settings, run: str) -> tuple[Iterator[ArchivedRecord], int]:
    archive_sessions = make_sessionmaker(make_engine(settings.store_url))
    records = archived_run(archive_sessions, settings.objects, run)
    if not records:
        known = archived_runs(archive_sessions, settings.objects)
        raise SystemExit(f"no import {run} in the archive's {IMPORTS.name}; archived runs: "
                         + (", ".join(f"{r} ({n} records)" for r, n in sorted(known.items())) or "none"))
    return iter(records), len(records)


async def _republish(settings: Settings, records: Iterator[ArchivedRecord], on_record) -> int:
    await ensure_topics(settings)
    producer = kafka.producer(settings.kafka, linger_ms=5)
    await producer.start()
    sent = 0
    try:
        chunk: list[ArchivedRecord] = []
        for record in records:
            chunk.append(record)
            if len(chunk) == REPUBLISH_CHUNK:
                sent += await _send_chunk(producer, chunk)
                on_record(sent)
                chunk = []
        sent += await _send_chunk(producer, chunk)
        on_record(sent)
    finally:
        await producer.stop()
    return sent


async def _send_chunk(producer, chunk: list[ArchivedRecord]) -> int:
    """Send ``chunk`` until the broker has taken all of it, a few tries apart. A record sent
    twice is harmless (the worker drops it by event id); a broker that has just restarted
    refuses produce requests for a moment (UnknownError), and one refusal must not end the
    republish with the rest unsent."""
    attempt = 1
    while True:
        try:
            pending = [await producer.send(EVENTS.name, r.value, key=r.key, headers=list(r.headers.items()))
                       for r in chunk]  # fmt: skip
            await asyncio.gather(*pending)
            return len(chunk)
        except KafkaError as error:
            if attempt == REPUBLISH_ATTEMPTS:
                raise SystemExit(f"the broker refused the republish {attempt} times ({error!r}): check the broker, "
                                 "then run the same command again (records sent twice are dropped by event id)") from error
            log.warning("replay.republish_retry", attempt=attempt, error=repr(error), records=len(chunk))
            await asyncio.sleep(attempt)
            attempt += 1


def _closing(settings: Settings, source: str, data_dir: Path | None, close_at_end: bool | None,
             import_run: str | None) -> bool:
    """Whether the replay closes every window at the end of its input (see the --close-at-end help)."""
    live_partitions = source == "archive" and import_run is None and data_dir is None
    if import_run is not None:
        if close_at_end is False:
            raise SystemExit("an import closed every window at the end of its input: --keep-open would not "
                             "replay it as it ran")  # fmt: skip
        return True
    if live_partitions:
        if close_at_end:
            raise SystemExit(f"--close-at-end into the live data directory ({settings.data_dir}) would cut batches "
                             "the running worker cuts later, under the same ids; give the replay its own "
                             "--data-dir")  # fmt: skip
        return False
    return close_at_end is not False


def run_replay(settings: Settings, *, mode: str, source: str, since: str | None, until: str | None,
               data_dir: Path | None, close_at_end: bool | None = None, import_run: str | None = None) -> int:
    if import_run is not None and (mode != "offline" or source != "archive" or since or until):
        raise SystemExit("--import RUN replays that import offline from the archive: no --republish, --source, "
                         "--since or --until with it")  # fmt: skip
    closing = False
    if mode == "offline":
        tune_gc(batch=True)
        closing = _closing(settings, source, data_dir, close_at_end, import_run)
    console = Console(stderr=True)
    if import_run is not None:
        records, total = _import_source(settings, import_run)
    else:
        records, total = _source(settings, source, TimeRange.parse(since, until))
    started = time.monotonic()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console) as progress:
        task = progress.add_task(f"replay ({mode})", total=total, rate="")

        def on_record(done: int) -> None:
            if done % 500 == 0 or done == total:
                rate = done / max(time.monotonic() - started, 1e-9)
                progress.update(task, completed=done, rate=f"{rate:,.0f} records/s")

        if mode == "republish":
            sent = asyncio.run(_republish(settings, records, on_record))
            progress.update(task, completed=sent)
            console.print(f"republished {sent} records to {EVENTS.name}")
            return 0

        output = settings if data_dir is None else settings.model_copy(
            update={"data_dir": data_dir, "database_url": None}
        )
        migrations.upgrade(output.store_url)
        # The users' own keys, wherever the output goes: another data dir's would be new pseudonyms.
        pipelines = PipelineSet(output.pipeline, Scrubber(), Pseudonymizer(settings.key_store()),
                                max_event_bytes=output.max_event_bytes,
                                dead_letter_max_raw_bytes=output.dead_letter_max_raw_bytes)
        # Its own data directory is its own store: the copy's store would still be the shared
        # bucket where FEEDLOOP_STORAGE__URL names one.
        objects = settings.objects if data_dir is None else ObjectStore(output.data_dir.resolve().as_uri())
        summary = replay_offline(records, pipelines, objects=objects,
                                 sessions=make_sessionmaker(make_engine(output.store_url)), on_record=on_record,
                                 close_at_end=closing, import_run=import_run)  # fmt: skip
        progress.update(task, completed=summary.records)
    seconds = time.monotonic() - started
    console.print(batches_table(f"replay --offline: {summary.records} records in {seconds:.1f} s "
                                f"({summary.records / max(seconds, 1e-9):,.0f}/s)", summary.batches))
    console.print(f"examples: {summary.examples}; dead letters: {dict(sorted(summary.dead_letters.items()))}")
    if closing:
        console.print(f"closed at the end of the input: {summary.closed_at_end} interactions (one example each)")
    else:
        console.print(f"left open at the end of the input: {summary.open_at_end} interactions (no example yet), "
                      f"{summary.orphans_at_end} feedback waiting for their interaction, {summary.buffered_at_end} "
                      "training records waiting for a batch" + ("" if summary.open_at_end + summary.buffered_at_end == 0
                      else "; the running worker closes them as its event time moves (a replay into its own "
                           "--data-dir closes them at the end)"))  # fmt: skip
    console.print(f"PII replaced: {dict(sorted(summary.pii_scrubbed.items()))}")
    console.print(f"batches written under {BATCHES}/ of {objects.url}")
    return 0


def batches_table(title: str, batches: Iterable[BatchEmitted]) -> Table:
    """The batches a replay or an import cut, one row each."""
    table = Table(title=title)
    table.add_column("batch")
    table.add_column("records", justify="right")
    table.add_column("trigger")
    table.add_column("manifest sha256")
    for batch in batches:
        table.add_row(batch.batch_id, str(batch.example_count), batch.trigger, batch.manifest_sha256[:16])
    return table
