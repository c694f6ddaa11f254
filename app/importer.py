"""`feedloop import FILE`: a historical log into the live loop, in event time (streams.importer).

What a run sends, record by record in the order the pipeline takes them: the raw record on
``feedloop.imports.v1``, then its dead letters and annotated examples, and the
``batch_emitted`` event of every batch it cut (whose objects and store row are written first,
idempotently, as the live worker does). Every record sent carries the run id in a header.

Progress is kept in ``<data_dir>/imports/<run>/progress.json``: the input's digest, how many
of the run's output records the broker has acknowledged (chunks of ``CHUNK``, acks=all), and
once it ended, its summary. The outputs are a deterministic function of the input, so a run
started again computes them again and sends only those past the acknowledged count: after a
crash at most one chunk goes out twice (same ids), and a finished run is not sent again.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import migrations
from app.broker import ensure_topics
from app.replay import batches_table
from app.runtime import tune_gc
from app.settings import Settings
from streams import kafka
from streams.batches import publish_batch
from streams.importer import (
    check_run_id,
    default_run_id,
    import_steps,
    in_event_time,
    raw_headers,
    run_digest,
    run_headers,
)
from streams.pii import Scrubber
from streams.pipeline import PipelineSet
from streams.pseudonyms import Pseudonymizer
from streams.replay import ReplaySummary, TimeRange, file_records
from streams.store import make_engine, make_sessionmaker
from streams.topics import CONTROL, DEAD_LETTER, EXAMPLES, IMPORTS, control_key, dead_letter_key
from streams.training_data import BATCHES

CHUNK = 1000


class ImportProgress:
    """``<data_dir>/imports/<run>/progress.json``, rewritten atomically after every chunk."""

    def __init__(self, directory: Path, run: str, digest: str) -> None:
        self.path = directory / "progress.json"
        self.run, self.digest = run, digest
        self.delivered = 0
        self.summary: dict | None = None
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved["digest"] != digest:
                raise SystemExit(f"import run {run} already holds another input (digest {saved['digest'][:16]}, "
                                 f"this one {digest[:16]}): give this one its own --run")  # fmt: skip
            self.delivered, self.summary = saved["delivered"], saved.get("summary")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps({"run": self.run, "digest": self.digest, "delivered": self.delivered,
                                       "summary": self.summary}, indent=2) + "\n")  # fmt: skip
        os.replace(partial, self.path)


def _summary_json(summary: ReplaySummary) -> dict:
    return {"records": summary.records, "examples": summary.examples, "closed_at_end": summary.closed_at_end,
            "dead_letters": dict(sorted(summary.dead_letters.items())), "batches": [b.batch_id for b in summary.batches],
            "pii_scrubbed": dict(sorted(summary.pii_scrubbed.items()))}  # fmt: skip


async def _run(settings: Settings, records, run: str, progress: ImportProgress, on_record) -> ReplaySummary:
    sessions = make_sessionmaker(make_engine(settings.store_url))
    pipelines = PipelineSet(settings.pipeline, Scrubber(), Pseudonymizer(settings.key_store()))
    summary = ReplaySummary()
    headers = run_headers(run)
    producer = kafka.producer(settings.kafka, linger_ms=5)
    await producer.start()
    try:
        position = 0  # of the next output record in the run's sequence
        chunk: list = []

        async def flush() -> None:
            pending = [await producer.send(topic, value, key=key, headers=h) for topic, key, value, h in chunk]
            await asyncio.gather(*pending)
            chunk.clear()
            progress.delivered = position
            progress.save()

        for record, outputs in import_steps(records, pipelines, run):
            out = []
            if record is not None:
                out.append((IMPORTS.name, record.key, record.value, raw_headers(run, record)))
            else:
                summary.closed_at_end = len(outputs.examples)
            summary.count(outputs)
            out += [(DEAD_LETTER.name, dead_letter_key(d), d.model_dump_json().encode(), headers)
                    for d in outputs.dead_letters]
            out += [(EXAMPLES.name, e.session_id.encode(), e.model_dump_json().encode(), headers)
                    for e in outputs.examples]
            for cut in outputs.batches:  # its objects and store row first: the trainer reads them on the event
                emitted = publish_batch(cut, objects=settings.objects, sessions=sessions)
                summary.batches.append(emitted)
                out.append((CONTROL.name, control_key(emitted), emitted.model_dump_json().encode(), headers))
            for item in out:
                if position >= progress.delivered:
                    chunk.append(item)
                position += 1
            if record is not None:
                summary.records += 1
                on_record(summary.records)
            if len(chunk) >= CHUNK:
                await flush()
        await flush()
    finally:
        await producer.stop()
    summary.finish(pipelines)
    return summary


def run_import(settings: Settings, *, source: str, run: str | None) -> int:
    path = Path(source)
    if not path.is_file():
        raise SystemExit(f"no such file: {path}; `feedloop import` takes a .jsonl/.jsonl.gz file of events")
    console = Console(stderr=True)
    records = in_event_time(file_records(path, settings.topic_partitions, TimeRange()))
    digest = run_digest(records)
    try:
        run = check_run_id(run) if run else default_run_id(digest)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    progress = ImportProgress(settings.data_dir / "imports" / run, run, digest)
    if progress.summary is not None:
        console.print(f"import {run} already ran to the end ({progress.summary['records']} records, "
                      f"{progress.summary['examples']} examples, {len(progress.summary['batches'])} batches); "
                      f"nothing sent again ({progress.path})")  # fmt: skip
        return 0
    tune_gc(batch=True)
    migrations.upgrade(settings.store_url)
    asyncio.run(ensure_topics(settings))
    started = time.monotonic()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(f"import {run}", total=len(records), rate="")

        def on_record(done: int) -> None:
            if done % 500 == 0 or done == len(records):
                rate = done / max(time.monotonic() - started, 1e-9)
                bar.update(task, completed=done, rate=f"{rate:,.0f} records/s")

        summary = asyncio.run(_run(settings, records, run, progress, on_record))
    progress.summary = _summary_json(summary)
    progress.save()
    seconds = time.monotonic() - started
    console.print(batches_table(f"import {run}: {summary.records} records in {seconds:.1f} s", summary.batches))
    console.print(f"examples: {summary.examples} ({summary.closed_at_end} closed at the end of the input) "
                  f"on {EXAMPLES.name}; dead letters: {dict(sorted(summary.dead_letters.items()))}")  # fmt: skip
    console.print(f"PII replaced: {dict(sorted(summary.pii_scrubbed.items()))}")
    console.print(f"raw events on {IMPORTS.name} (header run={run}); batches under {BATCHES}/ of "
                  f"{settings.objects.url}, "
                  f"announced on {CONTROL.name}; progress in {progress.path}")  # fmt: skip
    return 0
