"""Exporting curated batches as a Hugging Face dataset: one Parquet file per signal and a card.

The batches (folders of the object store, read through ``streams.training_data``) are the
curated training data, but they are not safe to hand out as they are stored: a batch is cut once, and a user erased later still has records in it
(docs/privacy.md, "What erasure does not reach yet"). Records carry no user identity (the
curator keeps the user in its state only), so an export goes back to the events each record
was derived from (``event_ids``) and reads their app, user, time and consent from the archive:

- a record with an event of a user erased since that event (a feedback's user is its
  interaction's, as in the pipeline) is left out, by the one rule the curator applies at a
  cut (``streams.pipeline.pseudonyms_erased``, i.e. ``streams.pseudonyms.erased_by``),
  passed in as ``is_erased``;
- a record with an interaction whose user withheld training consent is left out (the
  curator never buffers one; checked again because an export leaves the deployment);
- a record with an event the archive no longer holds is left out too: neither its consent
  nor its user's erasure can be shown, and an export errs on the side of the user.

Everything else is kept field for field as the batch holds it, plus a ``batch_id`` column.
Each signal is one config with one split, ``train``; a batch's held-out part (the records the
gate judges candidates on, never trained: ``FEEDLOOP_PIPELINE__HELDOUT_SHARE``) comes as its own
configs, ``heldout_sft``, ``heldout_pairs`` and ``heldout_labels``, so a team that trains
elsewhere can evaluate on the same held-out feedback.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from streams.archive import ArchivedRecord
from streams.contract import USER_EVENT_ADAPTER, Interaction
from streams.pseudonyms import user_identity
from streams.store import Batch, BatchStatus
from streams.topics import EVENTS
from streams.training_data import HELDOUT_FILES, SIGNAL_FILES, BatchFolder, read_batch

SPLIT = "train"
EXPORTABLE = (BatchStatus.EMITTED, BatchStatus.TRAINED)  # training/failed ones may be retried or dropped


class NoBatches(LookupError):
    """Nothing to export; the message says how to find what there is."""


@dataclass(frozen=True)
class EventFacts:
    """What an export needs to know of one source event."""

    app_id: str
    user: str | None  # the streams.pseudonyms.user_identity of its interaction; None: not archived
    occurred_at: datetime
    training_consent: bool  # only interactions say; other events follow their interaction's


def event_facts(records: Iterable[ArchivedRecord], wanted: set[str]) -> dict[str, EventFacts]:
    """The facts of the ``wanted`` event ids found among archived ``records`` (one pass).

    A feedback or annotation is its interaction's user's, as the pipeline has it when it drops
    an erased user's events; every record lists its interaction's event id, so the interaction
    is among the ``wanted`` whenever its feedback is."""
    events = {}
    for record in records:
        if record.topic != EVENTS.name or record.value is None:
            continue
        try:
            event = USER_EVENT_ADAPTER.validate_python(json.loads(record.value))
        except (ValueError, ValidationError):
            continue  # curation triggers and rejected input share the topic; neither is a source
        if event.event_id in wanted:
            events[event.event_id] = event
    users = {(e.app_id, e.interaction_id): user_identity(e.app_id, e.user_id)
             for e in events.values() if isinstance(e, Interaction)}
    return {
        event_id: EventFacts(
            app_id=event.app_id,
            user=users.get((event.app_id, event.interaction_id)),
            occurred_at=event.occurred_at,
            training_consent=event.training_consent if isinstance(event, Interaction) else True,
        )
        for event_id, event in events.items()
    }


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite hands back naive UTC


def select_batches(session: Session, batch_ids: list[str], since: datetime | None,
                   until: datetime | None) -> list[Batch]:
    """The named batches, or every emitted or trained one created in [since, until)."""
    if batch_ids:
        rows = {row.batch_id: row for row in session.scalars(select(Batch).where(Batch.batch_id.in_(batch_ids)))}
        if missing := [b for b in batch_ids if b not in rows]:
            raise NoBatches(f"no batch {', '.join(missing)}: `feedloop status` lists the batches")
        return [rows[b] for b in batch_ids]
    rows = [
        row for row in session.scalars(select(Batch).where(Batch.status.in_(EXPORTABLE)).order_by(Batch.created_at))
        if (since is None or _utc(row.created_at) >= since) and (until is None or _utc(row.created_at) < until)
    ]
    if not rows:
        raise NoBatches("no emitted or trained batch in that time range: `feedloop status` lists the batches; "
                        "`feedloop curate` cuts one from what the worker holds")
    return rows


@dataclass
class ExportSummary:
    """What went into the dataset and what was left out, and why: the card is written from it."""

    batches: list[str]
    exported_at: datetime
    app: str | None
    rows: Counter = field(default_factory=Counter)  # signal -> rows
    strata: dict[str, Counter] = field(default_factory=dict)  # signal -> cohort/domain -> rows
    sources: dict[str, Counter] = field(default_factory=dict)  # signal -> source rule -> rows
    left_out: Counter = field(default_factory=Counter)  # reason -> records
    files: dict[str, str] = field(default_factory=dict)  # signal -> parquet file name


def _why_left_out(record, facts: dict[str, EventFacts], is_erased: Callable[[str, datetime], bool],
                  app: str | None) -> str | None:
    events = [facts.get(event_id) for event_id in record.event_ids]
    if any(e is None or e.user is None for e in events):  # a feedback without its interaction: whose?
        return "source_event_not_archived"
    if app is not None and any(e.app_id != app for e in events):
        return "other_app"
    if not all(e.training_consent for e in events):
        return "no_consent"
    if any(is_erased(e.user, e.occurred_at) for e in events):
        return "user_erased"
    return None


def export_dataset(out_dir: Path, batches: list[tuple[str, BatchFolder]], facts: dict[str, EventFacts],
                   is_erased: Callable[[str, datetime], bool], *, app: str | None = None,
                   exported_at: datetime, on_batch: Callable[[str], None] = lambda _: None) -> ExportSummary:
    """Write ``<signal>.parquet`` and ``README.md`` under ``out_dir`` from (batch id, folder) pairs.

    ``on_batch`` is called after each batch is read, so a caller can show progress."""
    summary = ExportSummary([b for b, _ in batches], exported_at, app)
    rows: dict[str, list[dict]] = {signal: [] for signal in SIGNAL_FILES | HELDOUT_FILES}
    for batch_id, batch in batches:
        _, records = read_batch(batch)
        for signal, items in records.items():
            for record in items:
                if reason := _why_left_out(record, facts, is_erased, app):
                    summary.left_out[reason] += 1
                    continue
                rows[signal].append({"batch_id": batch_id, **record.model_dump(mode="json")})
                summary.strata.setdefault(signal, Counter())[f"{record.cohort}/{record.domain}"] += 1
                summary.sources.setdefault(signal, Counter())[record.source] += 1
        on_batch(batch_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    for signal, items in rows.items():
        if not items:  # an empty file has no schema to load; the card says the signal has no rows
            (out_dir / f"{signal}.parquet").unlink(missing_ok=True)  # an earlier export's rows may be erased since
            continue
        summary.rows[signal] = len(items)
        summary.files[signal] = f"{signal}.parquet"
        pq.write_table(pa.Table.from_pylist(items), out_dir / summary.files[signal])
    (out_dir / "README.md").write_text(dataset_card(summary), encoding="utf-8")
    return summary


def _table(counts: Counter, heading: str) -> list[str]:
    return [f"| {heading} | rows |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in sorted(counts.items())), ""]


def dataset_card(summary: ExportSummary) -> str:
    """The README.md of the dataset: a ``configs:`` header per signal (so ``load_dataset(dir,
    "sft")`` finds the file), then the counts and the rules that shaped them."""
    header = ["---", "configs:"]
    for signal, filename in summary.files.items():
        header += [f"- config_name: {signal}", "  data_files:", f"  - split: {SPLIT}", f"    path: {filename}"]
    lines = [
        *header, "---", "", "# feedloop curated feedback dataset", "",
        f"Exported {summary.exported_at.isoformat()} from {len(summary.batches)} batch(es): "
        f"{', '.join(summary.batches)}." + (f" Only app `{summary.app}`." if summary.app else ""), "",
        "## Rows per signal", "", *_table(Counter({s: summary.rows.get(s, 0) for s in SIGNAL_FILES | HELDOUT_FILES}), "signal"),
    ]
    for signal in summary.files:
        lines += [f"## {signal}", "", *_table(summary.strata[signal], "stratum (cohort/domain)"),
                  *_table(summary.sources[signal], "source")]
    lines += [
        "## Consent and erasure", "",
        "Text was scrubbed of personal data before it was stored; no user id or pseudonym is in any row.",
        "Records were checked again against their source events at export time and left out when:", "",
        "- an interaction's user withheld training consent (`no_consent`);",
        "- a user was erased after the event (`user_erased`; the rule the curator applies at a cut);",
        "- a source event is no longer in the archive, so neither can be shown (`source_event_not_archived`);",
        "- `--app` was given and an event is of another app (`other_app`).", "",
        *_table(Counter({r: summary.left_out.get(r, 0) for r in
                         ("no_consent", "user_erased", "source_event_not_archived", "other_app")}), "left out"),
        "Erasures made after this export do not reach this copy: export again, and delete the old one.", "",
    ]
    return "\n".join(lines)
