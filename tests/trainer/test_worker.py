"""The trainer worker on the real broker: batch_emitted in, adapter_ready out, once."""

import asyncio
import json
import uuid

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app.broker import ensure_topics
from streams.store import Adapter, Batch
from streams.contract import BatchEmitted, utcnow
from streams.topics import CONTROL
from tests.conftest import make_settings
from tests.trainer import batches
from tests.trainer.test_recipe import FAST, rows
from trainer.worker import TrainerWorker, parent_for_next


async def control_events(settings, kind: str, count: int, where=lambda e: True, timeout_s: float = 300) -> list[dict]:
    """``count`` control events of ``kind`` that match ``where``: other tests share the topic."""
    consumer = AIOKafkaConsumer(CONTROL.name, bootstrap_servers=settings.bootstrap_servers,
                                group_id=f"check-{uuid.uuid4().hex}", auto_offset_reset="earliest")
    await consumer.start()
    found: list[dict] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < count and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [e for e in (json.loads(r.value) for r in records) if e["type"] == kind and where(e)]
        return found
    finally:
        await consumer.stop()


async def test_emitted_batch_becomes_one_announced_adapter(trained_base, sessions, tmp_path, broker):
    settings = make_settings(tmp_path, broker.port, base_model_path=trained_base, trainer=FAST,
                             adapter_dir=tmp_path / "adapters")
    await ensure_topics(settings)
    batch_id = f"batch-{uuid.uuid4().hex[:8]}"
    batch_dir = batches.write(settings.data_dir / "batches", batch_id, batches.sft_records(seed=3, count=24))
    emitted = BatchEmitted(event_id=f"{batch_id}.emitted", occurred_at=utcnow(), source="test", batch_id=batch_id,
                           path=str(batch_dir.relative_to(settings.data_dir)), manifest_sha256="x" * 64,
                           example_count=24, trigger="manual")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    for _ in range(2):  # delivered twice (at-least-once): trained once, announced with one id
        await producer.send_and_wait(CONTROL.name, emitted.model_dump_json().encode(), key=batch_id.encode())
    await producer.stop()

    worker = TrainerWorker(settings.trainer, settings.kafka, sessions, data_dir=settings.data_dir,
                           base_model_dir=settings.model_path, adapters_dir=settings.adapters_path,
                           group=f"trainer-{uuid.uuid4().hex[:8]}")
    running = asyncio.create_task(worker.run())
    try:
        ready = await control_events(settings, "adapter_ready", 2, where=lambda e: batch_id in e["batch_ids"])
    finally:
        worker.stop()
        await running
    assert ready, "no adapter_ready for the batch"
    assert len({e["event_id"] for e in ready}) == 1
    (adapter,) = rows(sessions, Adapter)
    assert adapter.name == ready[0]["adapter"] and (settings.adapters_path / adapter.name).is_dir()
    assert [b.status for b in rows(sessions, Batch)] == ["trained"]


def test_the_next_adapter_continues_from_the_newest_still_in_line_to_serve(sessions):
    def register(name: str, state: str) -> None:
        with sessions.begin() as session:
            session.add(Adapter(name=name, state=state, path=name, sha256="0" * 64, base_model_sha256="0" * 64))

    assert parent_for_next(sessions) is None  # the base model
    register("adapter-000001-aa", "champion")
    assert parent_for_next(sessions) == "adapter-000001-aa"
    register("adapter-000002-bb", "challenger")  # under test: training need not wait for its verdict
    register("adapter-000003-cc", "failed")  # rejected by the gate
    assert parent_for_next(sessions) == "adapter-000002-bb"
    register("adapter-000004-dd", "ready")  # waiting for the test slot
    assert parent_for_next(sessions) == "adapter-000004-dd"
    for name, state in (("adapter-000004-dd", "superseded"), ("adapter-000002-bb", "rolled_back")):
        with sessions.begin() as session:
            session.get(Adapter, name).state = state
    assert parent_for_next(sessions) == "adapter-000001-aa"
