"""Erasure in the trainer's store: batches not yet trained lose the user's records, and the
adapters already trained on them are named for retraining.

A user's erasure is one ``erasures`` row, keyed by the pseudonym they had (a batch manifest's
``users`` lists the pseudonyms of its records). :func:`record_erasure` writes it: the erase
itself (``app.erasure``) before it announces the ``user_erased`` event, and the trainer when
it reads that event (a fresh store rebuilt from the log gets its rows back that way).
:func:`apply_erasures` is the one transition that acts on the rows: the trainer runs it on
every ``user_erased`` and before every training, so a batch emitted before the erasure but
trained after it, whatever the order of the two events in the log, is trained without them.

An adapter is trained on a user's data when the batch it was registered for listed the user,
or when it continues from such an adapter (its weights start from its parent's).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from streams.contract import UserErased, utcnow
from streams.objects import ObjectStore
from streams.store import Adapter, Batch, BatchStatus, Erasure
from streams.training_data import SIGNAL_FILES, BatchFolder, recut_batch
from trainer.lock import TrainerLock, exclusive

log = structlog.get_logger(__name__)

# Batches the trainer may still train: waiting, left "training" by a crash (trained again from
# scratch), or failed (``feedloop train --retry`` trains them from their files).
UNTRAINED = (BatchStatus.EMITTED, BatchStatus.TRAINING, BatchStatus.FAILED)


def trained_on(session: Session, pseudonyms: set[str]) -> list[str]:
    """The adapters trained on any of these users' data, their descendants included."""
    named = {batch.adapter for batch in session.scalars(select(Batch).where(Batch.adapter.is_not(None)))
             if pseudonyms & (batch.manifest or {}).get("users", {}).keys()}  # fmt: skip
    children: dict[str | None, list[str]] = defaultdict(list)
    for name, parent in session.execute(select(Adapter.name, Adapter.parent)):
        children[parent].append(name)
    frontier = list(named)
    while frontier:
        for child in children[frontier.pop()]:
            if child not in named:
                named.add(child)
                frontier.append(child)
    return sorted(named)


def erasure_event(app_id: str, pseudonym: str, erased_at: datetime) -> UserErased:
    """An erasure's event; its id is derived from the pseudonym, so it dedupes when sent again.
    ``erased_at`` may come back from SQLite without its zone: it is UTC."""
    return UserErased(event_id=f"user-erased-{pseudonym}", source="erase", app_id=app_id, pseudonym=pseudonym,
                      occurred_at=erased_at if erased_at.tzinfo else erased_at.replace(tzinfo=UTC))  # fmt: skip


def record_erasure(sessions: sessionmaker, event: UserErased, *, announced: bool) -> Erasure:
    """The erasure's row, written once: the adapters trained on the user so far are named in it.
    Recording it again (the event read back, a replay) changes nothing but ``announced``."""
    with sessions.begin() as session:
        row = session.get(Erasure, event.pseudonym)
        if row is None:
            row = Erasure(pseudonym=event.pseudonym, app_id=event.app_id, erased_at=event.occurred_at,
                          event_id=event.event_id, announced=announced,
                          adapters=trained_on(session, {event.pseudonym}), recut_batches=[])  # fmt: skip
            session.add(row)
        elif announced:
            row.announced = True
    return row


def mark_announced(sessions: sessionmaker, pseudonym: str) -> None:
    with sessions.begin() as session:
        session.get(Erasure, pseudonym).announced = True


def apply_erasures(sessions: sessionmaker, objects: ObjectStore, adapters_dir: Path, *,
                   lock: TrainerLock | None = None) -> list[str]:
    """Cut every erased user out of the batches not yet trained, and name, in each erasure not
    applied yet, the adapters trained on the user's data since it was recorded (a training that
    was running then). Returns the batches re-cut.

    Holds the trainer's lock (``trainer.lock``; ``lock`` if the caller holds it already, and
    checked again before the commit), so no batch is in training meanwhile, on any host. A crash after a batch's
    manifest was rewritten and before its row was is healed by the next call: the manifest
    then lists none of the users, the parts that held them are swept, and the row takes the
    manifest (``streams.training_data.recut_batch``). A batch that cannot be read is
    left for the next call (every call checks every erasure against every untrained batch)."""
    with exclusive(sessions, adapters_dir, held=lock) as held, sessions.begin() as session:
        erasures = {row.pseudonym: row for row in session.scalars(select(Erasure))}
        now = utcnow()
        for row in erasures.values():
            if row.applied_at is None:
                row.adapters = sorted(set(row.adapters) | set(trained_on(session, {row.pseudonym})))
                row.applied_at = now
        recut: list[str] = []
        for batch in session.scalars(select(Batch).where(Batch.status.in_(UNTRAINED)).order_by(Batch.batch_id)):
            users = erasures.keys() & (batch.manifest or {}).get("users", {}).keys()
            if not users:
                continue
            try:
                manifest, digest = recut_batch(BatchFolder(objects, batch.path), set(users))
            except ValueError as exc:  # gone or tampered (or a path no key can be): training would refuse it too
                log.error("trainer.batch_not_recut", batch_id=batch.batch_id, reason=str(exc),
                          hint="restore the batch's objects; the erasure is applied to it before it is trained")
                continue
            batch.manifest, batch.manifest_sha256 = manifest.model_dump(mode="json"), digest
            batch.example_count = sum(manifest.counts[signal] for signal in SIGNAL_FILES)
            for user in users:
                erasures[user].recut_batches = sorted({*erasures[user].recut_batches, batch.batch_id})
            recut.append(batch.batch_id)
            log.info("trainer.batch_recut", batch_id=batch.batch_id, users=len(users), records=batch.example_count)
        held.check()  # lost: the rows roll back, and the next call re-cuts (the manifests say who is cut)
    return recut
