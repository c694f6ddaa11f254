"""Publishes accepted events and dead-letter records, and returns only once the broker has them.

The gateway acknowledges a request (202) only after every record of it is acknowledged by the
broker with acks=all; if the broker is unreachable the request fails (503) and the client
retries with the same event ids. Idempotent producers are off because Tansu does not answer
the InitProducerId version aiokafka sends; duplicates from retries are removed downstream by
event id.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from streams import kafka
from streams.contract import DeadLetter
from streams.intake import Accepted
from streams.kafka import KafkaSettings
from streams.topics import CONTROL, DEAD_LETTER, EVENTS, control_key, dead_letter_key, event_key

log = structlog.get_logger(__name__)


class PublishError(RuntimeError):
    pass


class Publisher:
    """Built before the event loop runs (the gateway's routers are made with it), so the
    producer is made in ``start()``: aiokafka binds a producer to the loop running then."""

    def __init__(self, kafka_settings: KafkaSettings, *, max_request_bytes: int, timeout_s: float = 15.0) -> None:
        self.timeout_s = timeout_s
        self._kafka_settings = kafka_settings
        self._max_request_bytes = max_request_bytes
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = kafka.producer(
            self._kafka_settings,
            # No linger: a request's records are enqueued together and batch anyway, and a chat
            # answer waits for its interaction's ack: 0.2 ms on loopback, 2.6 ms with linger_ms=2
            # (the ingest ratio was the same either way: benchmarks/RESULTS.md).
            linger_ms=0,
            max_request_size=self._max_request_bytes,
            request_timeout_ms=int(self.timeout_s * 1000),
        )
        await self._producer.start()

    async def stop(self) -> None:
        await self._started().stop()

    def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("Publisher.start() was not awaited")
        return self._producer

    async def publish(
        self,
        accepted: list[Accepted],
        dead_letters: list[DeadLetter],
        *,
        app_id: str | None,
        received_at: datetime,
    ) -> None:
        """Send everything, then wait for every acknowledgement (or raise PublishError)."""
        headers = [("received_at", received_at.isoformat().encode())]
        if app_id is not None:
            headers.append(("app_id", app_id.encode()))
        records = [(EVENTS.name, a.payload, event_key(a.event)) for a in accepted] + [
            (DEAD_LETTER.name, d.model_dump_json().encode(), dead_letter_key(d)) for d in dead_letters
        ]
        try:
            await asyncio.wait_for(self._send_all(records, headers), self.timeout_s)
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.error("publish.failed", error=repr(exc), events=len(accepted), dead=len(dead_letters))
            raise PublishError(
                f"the broker did not acknowledge the events within {self.timeout_s}s ({exc!r}); "
                "nothing was accepted, retry with the same event ids"
            ) from exc

    async def publish_control(self, event: BaseModel) -> None:
        """One control event onto the control topic (an erasure's ``user_erased``), acknowledged."""
        try:
            await asyncio.wait_for(self._send_all([(CONTROL.name, event.model_dump_json().encode(),
                                                    control_key(event))], []), self.timeout_s)  # fmt: skip
        except (KafkaError, asyncio.TimeoutError) as exc:
            log.error("publish.control_failed", error=repr(exc), type=getattr(event, "type", None))
            raise PublishError(f"the broker did not acknowledge the {getattr(event, 'type', 'control')} event "
                               f"within {self.timeout_s}s ({exc!r}); send the request again") from exc  # fmt: skip

    async def _send_all(self, records: list[tuple[str, bytes, bytes]], headers: list) -> None:
        # send() only enqueues; gathering the returned futures waits for the acknowledgements.
        producer = self._started()
        pending = [
            await producer.send(topic, value, key=key, headers=headers)
            for topic, value, key in records
        ]
        await asyncio.gather(*pending)
