"""`feedloop export`: the store, the archive and the key store around streams.export.

The core is pure (batches, event facts and an erasure rule in, files out); this module finds
those three where a deployment keeps them and shows progress: a rich bar on a terminal,
one structlog line per batch otherwise (cron jobs and CI keep a readable log).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import click
import structlog
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from app.settings import Settings
from streams.archive import iter_archive
from streams.export import event_facts, export_dataset, select_batches
from streams.pipeline import pseudonyms_erased
from streams.pseudonyms import Pseudonymizer
from streams.store import make_engine, make_sessionmaker
from streams.topics import EVENTS
from streams.training_data import BatchFolder

log = structlog.get_logger(__name__)


def _moment(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is no ISO 8601 time, e.g. 2026-12-01T00:00:00Z",
                                 param_hint=option) from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # the store keeps UTC


def run_export(settings: Settings, out_dir: Path, *, batch_ids: list[str], since: str | None,
               until: str | None, app: str | None) -> str:
    """Export and return a one-line summary; raises NoBatches with what to do next."""
    if batch_ids and (since or until):
        raise click.UsageError("--batch names the batches; --since/--until choose them by time: give one or the other")
    sessions = make_sessionmaker(make_engine(settings.store_url))
    with sessions() as session:
        rows = select_batches(session, batch_ids, _moment(since, "--since"), _moment(until, "--until"))
        batches = [(row.batch_id, BatchFolder(settings.objects, row.path)) for row in rows]
        wanted = {event_id for row in rows for event_id in row.manifest.get("source_event_ids", [])}
        log.info("export.reading_archive", batches=len(batches), source_events=len(wanted))
        facts = event_facts(iter_archive(session, settings.objects, EVENTS.name), wanted)
    is_erased = pseudonyms_erased(Pseudonymizer(settings.key_store()))
    exported_at = datetime.now(UTC)
    console = Console(stderr=True)
    if console.is_terminal:
        with Progress(TextColumn("[bold]export"), BarColumn(), MofNCompleteColumn(), console=console) as progress:
            task = progress.add_task("export", total=len(batches))
            summary = export_dataset(out_dir, batches, facts, is_erased, app=app, exported_at=exported_at,
                                     on_batch=lambda _: progress.advance(task))
    else:
        summary = export_dataset(out_dir, batches, facts, is_erased, app=app, exported_at=exported_at,
                                 on_batch=lambda batch_id: log.info("export.batch", batch_id=batch_id))
    log.info("export.done", out_dir=str(out_dir), rows=dict(summary.rows), left_out=dict(summary.left_out))
    return (f"exported {sum(summary.rows.values())} rows ({dict(sorted(summary.rows.items()))}) of "
            f"{len(batches)} batch(es) to {out_dir}; left out: {dict(sorted(summary.left_out.items()))}")
