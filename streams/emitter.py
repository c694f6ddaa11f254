"""Delivering the live pipeline's outputs to Kafka, a checkpoint's worth at a time.

Dead letters, annotated examples and ``batch_emitted`` control events of every record a
checkpoint covers are handed to the producer together and awaited until the broker has them
(acks=all); only then is the checkpoint written. One ``Topic.send`` per output, awaited in
the agent, cost several times more (a future, callbacks and a task switch per record).

Outputs wait for their checkpoint serialized (topic, key, value bytes), not as models: a model
is several objects the garbage collector would walk while it waits.
"""

from __future__ import annotations

import asyncio

from streams.contract import BatchEmitted
from streams.pipeline import Outputs
from streams.topics import CONTROL, DEAD_LETTER, EXAMPLES, control_key, dead_letter_key

Record = tuple[str, bytes, bytes]  # topic, key, value


def output_records(outputs: Outputs) -> list[Record]:
    """Dead letters and annotated examples, in the order the pipeline produced them."""
    return [
        *((DEAD_LETTER.name, dead_letter_key(d), d.model_dump_json().encode()) for d in outputs.dead_letters),
        *((EXAMPLES.name, e.session_id.encode(), e.model_dump_json().encode()) for e in outputs.examples),
    ]


def emitted_records(emitted: list[BatchEmitted]) -> list[Record]:
    return [(CONTROL.name, control_key(e), e.model_dump_json().encode()) for e in emitted]


class Emitter:
    def __init__(self, producer) -> None:
        self.producer = producer  # faust's producer: send() hands a record to aiokafka

    async def deliver(self, records: list[Record]) -> None:
        """Send in order; return once the broker acknowledged every record."""
        send = self.producer.send
        pending = [await send(topic, key, value, None, None, None) for topic, key, value in records]
        await asyncio.gather(*pending)
