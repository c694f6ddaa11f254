"""Publishing a cut batch: a folder of the object store, a row in the store, a control event.

Idempotent, because the live worker may publish a batch again after a crash (it reprocesses
from its last checkpoint and cuts the same batch, byte for byte): a batch whose manifest
already exists with the same checksum is left as it is, and one whose publisher died between
its parts and its manifest is completed (``streams.training_data``: the manifest is the
commit marker). A *different* batch under an existing id means two runs wrote into one store:
that is refused (:class:`~streams.training_data.BatchConflict`), so a what-if replay never
overwrites the live batches (give it its own data directory).
"""

from __future__ import annotations

import structlog
from sqlalchemy.orm import sessionmaker

from streams.contract import BatchEmitted
from streams.curator import CutBatch
from streams.objects import ObjectStore
from streams.store import Batch, BatchStatus
from streams.training_data import BatchFolder, write_batch

log = structlog.get_logger(__name__)


def publish_batch(cut: CutBatch, *, objects: ObjectStore, sessions: sessionmaker) -> BatchEmitted:
    """Write the batch into ``batches/<batch_id>`` of ``objects``, record its row, and return
    the event that announces it; its ``path`` is the folder's key."""
    batch = BatchFolder.of(objects, cut.batch_id)
    manifest, digest = write_batch(batch, batch_id=cut.batch_id, trigger=cut.trigger,
                                   event_time=cut.event_time.isoformat(), records=cut.records,
                                   loss_weights=cut.loss_weights, heldout=cut.heldout, users=cut.users)  # fmt: skip
    with sessions.begin() as session:
        if session.get(Batch, cut.batch_id) is None:
            session.add(Batch(batch_id=cut.batch_id, path=batch.folder, manifest_sha256=digest,
                              example_count=len(cut.records), trigger=cut.trigger, status=BatchStatus.EMITTED,
                              manifest=manifest.model_dump(mode="json")))
    log.info("batch.published", batch_id=cut.batch_id, records=len(cut.records), trigger=cut.trigger,
             strata=len(manifest.strata), replayed=manifest.replayed)
    return BatchEmitted(
        event_id=f"{cut.batch_id}.emitted",
        occurred_at=cut.event_time,
        source="curator",
        batch_id=cut.batch_id,
        path=batch.folder,
        manifest_sha256=digest,
        example_count=len(cut.records),
        trigger=cut.trigger,
        loss_weights=cut.loss_weights,
    )
