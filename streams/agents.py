"""Faust agents of the stream pipeline: decode, call the pipeline, emit. No logic lives here.

- ``pipeline``: events topic -> :class:`~streams.live.LivePipeline` -> dead letters, annotated
  examples, published batches and their ``batch_emitted`` control events. Records are taken
  in batches (``noack_take``); every ``checkpoint_interval_s`` their batches are published,
  their outputs delivered, their partitions checkpointed, and only then are they acknowledged
  (:mod:`streams.checkpoint`; a checkpoint that fails is retried at the next interval).
- ``curation-triggers``: drift alarms on the control topic become
  :class:`~streams.contract.CurationTrigger` records in every events partition.
- ``tick``: a timer that writes a :class:`~streams.contract.WatermarkTick` into each idle
  partition, so windows close when traffic stops; ticks are in the log, so replay agrees.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial

import faust
import structlog
from pydantic import ValidationError
from sqlalchemy.orm import sessionmaker

from streams.batches import publish_batch
from streams.broker_life import BrokerLife, NewBrokerLife
from streams.checkpoint import Unacked
from streams.contract import CONTROL_EVENT_ADAPTER, BatchEmitted, CurationTrigger, DriftAlarm, WatermarkTick
from streams.curator import CutBatch
from streams.emitter import Emitter, Record, emitted_records, output_records
from streams.live import LivePipeline
from streams.objects import ObjectStore
from streams.pipeline import Outputs, receive_time
from streams.topics import CONTROL, EVENTS

log = structlog.get_logger(__name__)

# Keys of the records the worker writes into the events topic itself (ticks, triggers).
TICK_KEY, TRIGGER_KEY = b"__tick__", b"__trigger__"
PIPELINE_RECORD_KEYS = frozenset({TICK_KEY, TRIGGER_KEY})

TAKE_MAX = 1000
TAKE_WITHIN_S = 0.2


@dataclass
class _Produced:
    """What one batch of records gave the checkpoint to deliver: the partitions it touched,
    its outputs (serialized: see streams/emitter.py) and the batches it cut."""

    touched: set[int] = field(default_factory=set)
    records: list[Record] = field(default_factory=list)
    cuts: list[CutBatch] = field(default_factory=list)

    def add(self, partition: int, outputs: Outputs | None) -> None:
        if outputs is not None:
            self.touched.add(partition)
            if outputs.dead_letters or outputs.examples:
                self.records += output_records(outputs)
            self.cuts += outputs.batches


class _Checkpointing:
    """The pipeline's side of the checkpoint protocol (streams/checkpoint.py).

    A checkpoint pickles whole partition states, so it is written every checkpoint interval
    (by a timer, which also runs while Faust drains on shutdown). The state snapshot and the
    records it covers are taken with no await in between; then the cut batches are published,
    the outputs delivered, the snapshot written, and only then are the records acknowledged.
    File and store writes (and the snapshot's compression) run in a thread, beside the agent;
    so do restores, which may rebuild a partition from the archive. A revocation waits for a
    checkpoint or a restore under way, so that a write never lands after the next owner of
    the partition restored it, nor a restored state after its revocation.

    The snapshot is the one step that holds the event loop, and its cost grows with the
    state, not with the traffic: on the pipeline benchmark a checkpoint every interval spent
    ~15% of the worker's time pickling. So a snapshot that took ``t`` makes the next one start
    at least ``t / max_loop_share`` after it started (Flink's minimum pause between
    checkpoints, derived from the snapshot's own cost): snapshots take at most that share of
    the loop, and the interval stretches only while states are large."""

    def __init__(self, live: LivePipeline, emitter: Emitter, publish: Callable[[CutBatch], BatchEmitted],
                 max_loop_share: float = 1.0, life: BrokerLife | None = None) -> None:  # fmt: skip
        self.live = live
        self.emitter = emitter
        self.publish = publish
        self.max_loop_share = max_loop_share
        self.unacked: Unacked[_Produced] = Unacked(live.checkpoints.consumer, life)
        self._next_snapshot_at = 0.0  # time.monotonic()

    async def restore(self, partitions: set[int]) -> None:
        """Restore the partitions of a batch that this worker holds no state of yet."""
        missing = partitions - self.live.pipelines.partitions.keys()
        if missing:
            async with self.unacked.lock:
                self.live.pipelines.partitions.update(await asyncio.to_thread(self.live.restore, missing))

    def handle(self, stream: faust.Stream, batch: list) -> None:
        produced = _Produced()
        for event in batch:  # no await in here: the next snapshot must hold these outputs' records
            message = event.message
            received = receive_time(message.headers, message.timestamp)
            produced.add(message.partition, self.live.handle(message.partition, message.offset, message.value, received))
        self.unacked.add(stream, batch, produced)

    async def flush(self) -> None:
        if time.monotonic() >= self._next_snapshot_at:
            await self.unacked.flush(self._write)

    async def _write(self, produced: list[_Produced]) -> None:
        # Nothing is committed unless all of it is: the next checkpoint retries all of it
        # (publishing is idempotent, consumers de-duplicate by id), so no later one can skip it.
        started = time.monotonic()
        snapshots = self.live.snapshot(set().union(*(p.touched for p in produced)))  # before the first await
        took = time.monotonic() - started
        self._next_snapshot_at = started + took / self.max_loop_share
        cuts = [cut for p in produced for cut in p.cuts]
        emitted = await asyncio.to_thread(self._publish, cuts) if cuts else []
        await self.emitter.deliver([r for p in produced for r in p.records] + emitted_records(emitted))
        if snapshots:
            await asyncio.to_thread(self.live.commit, snapshots)

    def _publish(self, cuts: list[CutBatch]) -> list[BatchEmitted]:
        return [self.publish(cut) for cut in cuts]


def curation_triggers(
    trigger: str, cause: str, partitions: int, preferences_moved: bool = False
) -> list[CurationTrigger]:
    """One trigger per partition; ids derive from the cause, so a resend is a duplicate."""
    now = datetime.now(timezone.utc)
    return [
        CurationTrigger(event_id=f"{trigger}-{cause}-p{p}"[:128], occurred_at=now, partition=p,
                        trigger=trigger, cause=cause, preferences_moved=preferences_moved)
        for p in range(partitions)
    ]


def register_pipeline(
    app: faust.App,
    live: LivePipeline,
    *,
    objects: ObjectStore,
    sessions: sessionmaker,
    idle_tick_s: float,
    checkpoint_interval_s: float,
    checkpoint_max_loop_share: float,
    partitions: int,
    life: BrokerLife | None = None,
) -> None:
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    events = app.topic(EVENTS.name, **raw)
    control = app.topic(CONTROL.name, **raw)

    publish = partial(publish_batch, objects=objects, sessions=sessions)
    checkpointing = _Checkpointing(live, Emitter(app.producer), publish, max_loop_share=checkpoint_max_loop_share,
                                   life=life)

    @app.agent(events, name="pipeline")
    async def pipeline(stream: faust.Stream) -> None:
        async for batch in stream.noack_take(TAKE_MAX, within=TAKE_WITHIN_S):
            await checkpointing.restore({event.message.partition for event in batch})
            checkpointing.handle(stream, batch)

    @app.timer(interval=checkpoint_interval_s)
    async def checkpoint() -> None:
        try:
            await checkpointing.flush()
        except NewBrokerLife as error:
            error.log(await asyncio.to_thread(live.checkpoints.unprocessed, (EVENTS.name,)))
            await app.crash(error)  # the worker exits non-zero; started again, it reads the new broker

    @app.timer(interval=idle_tick_s)
    async def tick() -> None:
        assigned = {tp.partition for tp in app.consumer.assignment() if tp.topic == EVENTS.name}
        for partition in live.idle_partitions(assigned, idle_tick_s):
            record = WatermarkTick(event_id=f"tick-{uuid.uuid4().hex}", occurred_at=datetime.now(timezone.utc),
                                   partition=partition)
            await events.send(key=TICK_KEY, value=record.model_dump_json().encode(), partition=partition)

    @app.agent(control, name="curation-triggers")
    async def drift_to_curator(stream: faust.Stream) -> None:
        # A drift alarm asks every partition's curator for a batch now; the request goes into
        # the events topic itself, so replay cuts the same batches.
        async for value in stream:
            try:
                event = CONTROL_EVENT_ADAPTER.validate_json(value)
            except ValidationError:
                continue  # not a control event the pipeline reads
            if isinstance(event, DriftAlarm):
                moved = event.preferences_moved
                for record in curation_triggers("drift", event.event_id, partitions, preferences_moved=moved):
                    await events.send(key=TRIGGER_KEY, value=record.model_dump_json().encode(),
                                      partition=record.partition)

    @app.on_partitions_revoked.connect
    async def forget(sender: object, revoked: set, **kwargs: object) -> None:
        async with checkpointing.unacked.lock:
            live.revoke({tp.partition for tp in revoked if tp.topic == EVENTS.name})
