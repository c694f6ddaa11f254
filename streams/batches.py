"""Publishing a cut batch: files under the data directory, a row in the store, a control event.

Idempotent, because the live worker may publish a batch again after a crash (it reprocesses
from its last checkpoint and cuts the same batch, byte for byte): a batch whose directory and
row already exist with the same manifest checksum is left as it is. A *different* batch under
an existing id means two runs wrote into one data directory: that is refused, so a what-if
replay never overwrites the live batches (give it its own data directory).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import structlog
from sqlalchemy.orm import sessionmaker

from streams.store import Batch, BatchStatus
from streams.contract import BatchEmitted
from streams.curator import CutBatch
from streams.training_data import MANIFEST, write_batch

log = structlog.get_logger(__name__)


class BatchConflict(RuntimeError):
    pass


def _write(cut: CutBatch, directory: Path):
    return write_batch(directory, batch_id=cut.batch_id, trigger=cut.trigger,
                       event_time=cut.event_time.isoformat(), records=cut.records, loss_weights=cut.loss_weights,
                       heldout=cut.heldout, users=cut.users)  # fmt: skip


def publish_batch(cut: CutBatch, *, data_dir: Path, batches_dir: Path, sessions: sessionmaker) -> BatchEmitted:
    directory = batches_dir / cut.batch_id
    if (directory / MANIFEST).exists():
        existing = hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
        check = batches_dir / f".check-{cut.batch_id}"
        shutil.rmtree(check, ignore_errors=True)
        manifest, digest = _write(cut, check)
        shutil.rmtree(check)
        if digest != existing:
            raise BatchConflict(
                f"{directory} already holds a different batch {cut.batch_id}; replay what-if runs into "
                "their own data directory (--data-dir)"
            )
    else:
        directory.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(directory.with_name(directory.name + ".partial"), ignore_errors=True)
        manifest, digest = _write(cut, directory)
    relative = str(directory.relative_to(data_dir)) if directory.is_relative_to(data_dir) else str(directory)
    with sessions.begin() as session:
        if session.get(Batch, cut.batch_id) is None:
            session.add(Batch(batch_id=cut.batch_id, path=relative, manifest_sha256=digest,
                              example_count=len(cut.records), trigger=cut.trigger, status=BatchStatus.EMITTED,
                              manifest=manifest.model_dump(mode="json")))
    log.info("batch.published", batch_id=cut.batch_id, records=len(cut.records), trigger=cut.trigger,
             strata=len(manifest.strata), replayed=manifest.replayed)
    return BatchEmitted(
        event_id=f"{cut.batch_id}.emitted",
        occurred_at=cut.event_time,
        source="curator",
        batch_id=cut.batch_id,
        path=relative,
        manifest_sha256=digest,
        example_count=len(cut.records),
        trigger=cut.trigger,
        loss_weights=cut.loss_weights,
    )
