"""Faust agents of the stream pipeline: decode, call the pipeline, emit. No logic lives here.

- ``pipeline``: events topic -> :class:`~streams.live.LivePipeline` -> dead letters, annotated
  examples, published batches and their ``batch_emitted`` control events. Records are taken
  in batches (``noack_take``) and acknowledged only after their partitions are checkpointed,
  which happens every ``checkpoint_interval_s``.
- ``curation-triggers``: drift alarms on the control topic become
  :class:`~streams.contract.CurationTrigger` records in every events partition.
- ``tick``: a timer that writes a :class:`~streams.contract.WatermarkTick` into each idle
  partition, so windows close when traffic stops; ticks are in the log, so replay agrees.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

import faust
import structlog
from pydantic import ValidationError
from sqlalchemy.orm import sessionmaker

from streams.batches import publish_batch
from streams.contract import CONTROL_EVENT_ADAPTER, CurationTrigger, DriftAlarm, WatermarkTick
from streams.live import LivePipeline
from streams.topics import CONTROL, DEAD_LETTER, EVENTS, EXAMPLES

log = structlog.get_logger(__name__)

# Keys of the records the worker writes into the events topic itself (ticks, triggers).
TICK_KEY, TRIGGER_KEY = b"__tick__", b"__trigger__"
PIPELINE_RECORD_KEYS = frozenset({TICK_KEY, TRIGGER_KEY})

TAKE_MAX = 1000
TAKE_WITHIN_S = 0.2


class _PendingAcks:
    """Records handled but not yet covered by a checkpoint, and the partitions they touched.

    A checkpoint pickles whole partition states, so it is written every checkpoint interval
    (by a timer, which also runs while Faust drains on shutdown), and only then are the
    records it covers acknowledged."""

    def __init__(self, live: LivePipeline) -> None:
        self.live = live
        self.events: list[tuple[faust.Stream, object]] = []
        self.touched: set[int] = set()

    def add(self, stream: faust.Stream, event: object, partition: int | None) -> None:
        self.events.append((stream, event))
        if partition is not None:
            self.touched.add(partition)

    async def flush(self) -> None:
        events, touched = self.events, self.touched
        self.events, self.touched = [], set()
        if touched:
            self.live.checkpoint(touched)
        for stream, event in events:
            await stream.ack(event)


def curation_triggers(trigger: str, cause: str, partitions: int) -> list[CurationTrigger]:
    """One trigger per partition; ids derive from the cause, so a resend is a duplicate."""
    now = datetime.now(timezone.utc)
    return [
        CurationTrigger(event_id=f"{trigger}-{cause}-p{p}"[:128], occurred_at=now, partition=p,
                        trigger=trigger, cause=cause)
        for p in range(partitions)
    ]


def register_pipeline(
    app: faust.App,
    live: LivePipeline,
    *,
    data_dir: Path,
    batches_dir: Path,
    sessions: sessionmaker,
    idle_tick_s: float,
    checkpoint_interval_s: float,
    partitions: int,
) -> None:
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    events = app.topic(EVENTS.name, **raw)
    dead_letters = app.topic(DEAD_LETTER.name, **raw)
    examples = app.topic(EXAMPLES.name, **raw)
    control = app.topic(CONTROL.name, **raw)

    pending = _PendingAcks(live)

    @app.agent(events, name="pipeline")
    async def pipeline(stream: faust.Stream) -> None:
        async for batch in stream.noack_take(TAKE_MAX, within=TAKE_WITHIN_S):
            for event in batch:
                message = event.message
                outputs = live.handle(message.partition, message.offset, message.value)
                if outputs is not None:
                    for letter in outputs.dead_letters:
                        key = (letter.app_id or "unknown").encode()
                        await dead_letters.send(key=key, value=letter.model_dump_json().encode())
                    for example in outputs.examples:
                        await examples.send(key=example.session_id.encode(), value=example.model_dump_json().encode())
                    for cut in outputs.batches:
                        emitted = publish_batch(cut, data_dir=data_dir, batches_dir=batches_dir, sessions=sessions)
                        await control.send(key=cut.batch_id.encode(), value=emitted.model_dump_json().encode())
                pending.add(stream, event, None if outputs is None else message.partition)

    @app.timer(interval=checkpoint_interval_s)
    async def checkpoint() -> None:
        await pending.flush()

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
                for record in curation_triggers("drift", event.event_id, partitions):
                    await events.send(key=TRIGGER_KEY, value=record.model_dump_json().encode(),
                                      partition=record.partition)

    @app.on_partitions_revoked.connect
    async def forget(sender: object, revoked: set, **kwargs: object) -> None:
        live.revoke({tp.partition for tp in revoked if tp.topic == EVENTS.name})
