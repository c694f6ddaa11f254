"""The trainer worker: ``batch_emitted`` in, one adapter trained, ``adapter_ready`` out.

It also applies erasures (``user_erased``, trainer/erasure.py): the batches it has not
trained lose the user's records, on the event and again before every training.

Reads the control topic in its own consumer group, trains each emitted batch with
:func:`trainer.recipe.train_batch` (in a thread, one batch at a time, so training never
competes with itself and the event loop keeps its heartbeats), publishes the resulting
``AdapterReady`` event, and only then commits the record's offset. A crash re-reads the
batch's event; ``train_batch`` is exactly-once per batch (it returns the recorded result
for a batch already trained), and the ``adapter_ready`` sent again carries the same event
id. A candidate the gate rejects is recorded in the registry with its reason and announced
nowhere: there is nothing to serve. A batch that would exceed the privacy budget is left
``emitted`` with an error in the log, for an operator to decide.

The parent of each new adapter is the newest one still in line to serve
(:func:`parent_for_next`): waiting, under test or champion; the base model before any.

With object storage (``trainer.adapter_store``), the parent is staged from it before
training (this trainer may not be the one that trained it), and a new adapter's files are
uploaded before its ``adapter_ready`` goes out: the event is what makes it exist for the
other hosts, and one sent again after a crash uploads again.

Trainers on several hosts take turns on the trainer's lock (``trainer.lock``), held in the
store from the batch's erasures to the upload of its adapter: the parent is chosen under it,
so two trainers never continue from the same adapter.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from pathlib import Path

import structlog
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from streams.contract import AdapterReady, AdapterState, BatchEmitted, DeadLetter, UserErased, utcnow
from streams.control_consumer import ControlConsumer
from streams.intake import DEFAULT_DEAD_LETTER_MAX_RAW_BYTES, dead_letter
from streams.kafka import KafkaSettings
from streams.objects import ObjectStore
from streams.store import Adapter
from streams.training_data import BATCHES, BatchFolder, batch_folder
from trainer.adapter_store import AdapterStore
from trainer.config import TrainerConfig
from trainer.erasure import apply_erasures, record_erasure
from trainer.gate import EvalSuite
from trainer.ledger import PrivacyBudgetExceeded
from trainer.lock import TrainerLock
from trainer.registry import BatchAlreadyDone, BatchNotTrainable, Registry
from trainer.recipe import train_batch

log = structlog.get_logger(__name__)

GROUP = "feedloop-trainer"
MAX_TRAINING_S = 6 * 3600  # the consumer group must not take a long training for a dead worker


def parent_for_next(sessions: sessionmaker) -> str | None:
    """The newest adapter still in line to serve: ready (waiting for its test), challenger or
    champion. None: the base model.

    Continuing from the newest rather than from the champion lets training compound while
    A/B tests run: each round of feedback builds on the last instead of every batch starting
    again from the champion and the newest superseding the others. Each adapter still faces
    its own A/B test against the champion before it serves more than a canary share, so one
    built on an adapter that is later rolled back costs at most that test.
    """
    with sessions() as session:
        return session.scalar(
            select(Adapter.name)
            .where(Adapter.state.in_((AdapterState.READY, AdapterState.CHALLENGER, AdapterState.CHAMPION)))
            .order_by(Adapter.created_at.desc(), Adapter.name.desc())  # names count up: ties in a second
            .limit(1)
        )


def retry_batch(sessions: sessionmaker, adapters_dir: Path, batch_id: str) -> BatchEmitted:
    """A failed batch back in line (``feedloop train --retry``): its row to emitted, its attempts
    forgotten, and the ``batch_emitted`` to publish again. The event id is new, so no reader
    takes it for the original redelivered; the batch keeps its id, files and trigger."""
    row = Registry(sessions, adapters_dir).reopen(batch_id)
    return BatchEmitted(event_id=f"{batch_id}.retry-{uuid.uuid4().hex[:8]}", occurred_at=utcnow(), source="operator",
                        batch_id=row.batch_id, path=row.path, manifest_sha256=row.manifest_sha256,
                        example_count=row.example_count, trigger=row.trigger,
                        loss_weights=dict((row.manifest or {}).get("loss_weights", {})))  # fmt: skip


class TrainerWorker:
    """Trains what the control topic announces.

    ``objects`` is the store a ``batch_emitted`` event's path is a folder of, read from there
    (the batch need not be on this host's disk), and the path must be a batch's folder,
    ``batches/<name>``: anyone who can write to the control topic could otherwise point the
    trainer at any object of the store (keys, archive), so another path is refused with a dead
    letter. ``base_model_dir`` and ``adapters_dir`` are where the base model is read and
    adapters are written; ``suites`` are the gate's evaluation suites
    (``trainer.gate.load_suites(config.gate.suites)``)."""

    def __init__(self, config: TrainerConfig, kafka: KafkaSettings, sessions: sessionmaker, *, objects: ObjectStore,
                 base_model_dir: Path, adapters_dir: Path, suites: Sequence[EvalSuite] = (),
                 group: str = GROUP, adapter_store: AdapterStore | None = None) -> None:  # fmt: skip
        self.config = config
        self.adapter_store = adapter_store or AdapterStore(ObjectStore(adapters_dir.absolute().as_uri()), adapters_dir)
        self.sessions = sessions
        self.suites = tuple(suites)
        self.objects, self.base_model_dir, self.adapters_dir = objects, base_model_dir, adapters_dir
        self.consumer = ControlConsumer(kafka, group, self.handle, stage="trainer",
                                        max_poll_interval_s=MAX_TRAINING_S)
        self.training: str | None = None

    async def handle(self, event: BaseModel) -> list[AdapterReady | DeadLetter]:
        if isinstance(event, UserErased):
            await asyncio.to_thread(record_erasure, self.sessions, event, announced=True)
            recut = await asyncio.to_thread(apply_erasures, self.sessions, self.objects, self.adapters_dir)
            log.info("trainer.user_erased", app_id=event.app_id, recut=recut)
            return []
        if not isinstance(event, BatchEmitted):
            return []
        folder = batch_folder(event.path)  # an absolute path, "..", another folder: None
        if folder is None:
            detail = (f"batch {event.batch_id}: path {event.path!r} is not a batch's folder, {BATCHES}/<name>, "
                      f"of {self.objects.url}; the trainer reads batches only there")  # fmt: skip
            log.error("trainer.batch_path_refused", batch_id=event.batch_id, path=event.path,
                      hint="dead-lettered and skipped; batch_emitted events come from the curator, check who else "
                           "writes to the control topic")  # fmt: skip
            return [dead_letter(reason="batch_path_refused", detail=detail, raw=event.model_dump_json().encode(),
                                received_at=utcnow(), stage="trainer", max_raw_bytes=DEFAULT_DEAD_LETTER_MAX_RAW_BYTES,
                                event_id=event.event_id, dead_letter_id=f"trainer-{event.event_id}")]  # fmt: skip
        # One batch at a time per store, whichever host trains it (trainer.lock): held from the
        # erasures through the parent's choice and the upload, so the next trainer continues from
        # this adapter, and finds its files in the adapter store.
        lock = await asyncio.to_thread(TrainerLock(self.sessions, self.adapters_dir).acquire)
        try:
            return await self._train(event, folder, lock)
        finally:
            lock.release()

    async def _train(self, event: BatchEmitted, folder: str, lock: TrainerLock) -> list[AdapterReady | DeadLetter]:
        # Erasures first, whatever their order in the log: this batch may hold an erased user.
        await asyncio.to_thread(apply_erasures, self.sessions, self.objects, self.adapters_dir, lock=lock)
        self.training = event.batch_id
        parent = parent_for_next(self.sessions)
        try:
            if parent is not None:
                await asyncio.to_thread(self._stage, parent)
            result = await asyncio.to_thread(
                train_batch, BatchFolder(self.objects, folder), self.config, self.sessions,
                base_model_dir=self.base_model_dir, adapters_dir=self.adapters_dir, objects=self.objects,
                parent=parent, suites=self.suites, lock=lock,
            )  # fmt: skip
            if result.event is not None:
                await asyncio.to_thread(self.adapter_store.publish, result.adapter, Path(result.event.path))
        except BatchAlreadyDone as exc:
            log.info("trainer.batch_done_already", batch_id=event.batch_id, reason=str(exc))
            return []
        except (BatchNotTrainable, PrivacyBudgetExceeded) as exc:
            # Marked failed with its reason (feedloop status shows it); later batches go on.
            budget = isinstance(exc, PrivacyBudgetExceeded)
            log.error("trainer.budget_exceeded" if budget else "trainer.batch_not_trainable",
                      batch_id=event.batch_id, reason=str(exc),
                      hint=("raise FEEDLOOP_TRAINER__PRIVACY__BUDGET_EPSILON" if budget else "fix the cause")
                      + f", then `feedloop train --retry {event.batch_id}`; later batches go on")  # fmt: skip
            await asyncio.to_thread(Registry(self.sessions, self.adapters_dir).fail_batch, event.batch_id, str(exc))
            return []
        finally:
            self.training = None
        if result.event is None:
            log.warning("trainer.rejected", batch_id=event.batch_id, adapter=result.adapter, reason=result.reason)
            return []
        log.info("trainer.adapter_ready", batch_id=event.batch_id, adapter=result.adapter, metrics=result.metrics)
        return [result.event]

    def _stage(self, name: str) -> None:
        with self.sessions() as session:
            row = session.get(Adapter, name)
        if row is not None and Path(row.path) == self.adapters_dir / name:  # staged where the registry says
            self.adapter_store.stage(name, row.sha256)

    def liveness_detail(self) -> dict[str, str]:
        """What its heartbeat says it does (app/liveness.py): the batch in training, if any."""
        return {"training": self.training} if self.training else {}

    async def run(self) -> None:
        await self.consumer.run()

    def stop(self) -> None:
        self.consumer.stop()
