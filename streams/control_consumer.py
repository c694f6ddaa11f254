"""A worker on the control topic: each control event handled, what it answers published, then committed.

The trainer (``feedloop train``) and the hot-swap controller (``feedloop swap``) both read
``feedloop.control.v1`` in their own consumer group. For each record: decode it (a record
that is no control event becomes this reader's dead letter, ``streams.intake.refused_record``),
``await handle(event)``, publish the control events it returns and the dead letters of what it
refused (acks=all), and only then commit the offset: a crash re-reads the record, and
handlers are idempotent (stable event ids, registry states). ``tick`` runs between polls for
work driven by time (drains, replica retries).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog
from pydantic import BaseModel, ValidationError

from streams.contract import CONTROL_EVENT_ADAPTER, DeadLetter
from streams.intake import refused_record
from streams import kafka
from streams.kafka import KafkaSettings
from streams.topics import CONTROL, DEAD_LETTER, control_key, dead_letter_key

log = structlog.get_logger(__name__)

Handler = Callable[[BaseModel], Awaitable[Sequence[BaseModel]]]
Ticker = Callable[[], Awaitable[Sequence[BaseModel]]]


class ControlConsumer:
    def __init__(
        self,
        kafka_settings: KafkaSettings,
        group: str,
        handle: Handler,
        *,
        stage: str,
        tick: Ticker | None = None,
        max_poll_interval_s: float = 300.0,
    ) -> None:
        self.handle, self.stage = handle, stage  # stage: who refused, in its dead letters
        self.tick = tick
        self._stopping = asyncio.Event()
        self.consumer = kafka.consumer(
            kafka_settings,
            CONTROL.name,
            group_id=group,
            # A handler may work for minutes (training): the group must not take it for dead.
            max_poll_interval_ms=int(max_poll_interval_s * 1000),
        )
        self.producer = kafka.producer(kafka_settings)

    async def publish(self, events: Sequence[BaseModel]) -> None:
        """Control events onto the control topic; dead letters (a record refused) onto theirs."""
        for event in events:
            if isinstance(event, DeadLetter):
                topic, key = DEAD_LETTER.name, dead_letter_key(event)
            else:
                topic, key = CONTROL.name, control_key(event)
            await self.producer.send_and_wait(topic, event.model_dump_json().encode(), key=key)

    async def run(self) -> None:
        await self.consumer.start()
        await self.producer.start()
        try:
            while not self._stopping.is_set():
                if self.tick is not None:
                    await self.publish(await self.tick())
                batches = await self.consumer.getmany(timeout_ms=500, max_records=1)
                for tp, records in batches.items():
                    for record in records:
                        value = record.value or b""
                        try:
                            event = CONTROL_EVENT_ADAPTER.validate_json(value)
                        except ValidationError as error:
                            refused = refused_record(error, value, topic=tp.topic, partition=tp.partition,
                                                     offset=record.offset, timestamp_s=record.timestamp / 1000,
                                                     stage=self.stage)  # fmt: skip
                            log.warning("control.undecodable", offset=record.offset, reason=refused.reason,
                                        hint="dead-lettered and skipped; find who writes it to the control topic")
                            await self.publish([refused])
                        else:
                            await self.publish(await self.handle(event))
                        await self.consumer.commit({tp: record.offset + 1})
        finally:
            await self.producer.stop()
            await self.consumer.stop()

    def stop(self) -> None:
        self._stopping.set()
