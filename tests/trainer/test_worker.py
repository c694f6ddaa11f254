"""The trainer worker on the real broker: batch_emitted in, adapter_ready out, once."""

import asyncio
import json
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from app.broker import ensure_topics
from demo.base_model import ToyChats, build_tiny_model
from streams import kafka
from streams.store import Adapter, Batch
from streams.contract import BatchEmitted, DeadLetter, utcnow
from streams.topics import CONTROL, DEAD_LETTER, control_key
from streams.objects import ObjectStore
from streams.training_data import BatchFolder, read_batch, write_batch
from tests.conftest import make_settings
from tests.trainer import batches
from tests.trainer.test_recipe import FAST, rows
from trainer.base_model import BaseModelConfig
from trainer.config import GateConfig
from trainer.recipe import train_batch
from trainer.registry import BatchAlreadyDone, Registry
from trainer.worker import TrainerWorker, parent_for_next, retry_batch


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
    batch_dir = batches.write(settings.data_dir, batch_id, batches.sft_records(seed=3, count=24))
    emitted = BatchEmitted(event_id=f"{batch_id}.emitted", occurred_at=utcnow(), source="test", batch_id=batch_id,
                           path=batch_dir.folder, manifest_sha256="x" * 64,
                           example_count=24, trigger="manual")
    producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    await producer.start()
    for _ in range(2):  # delivered twice (at-least-once): trained once, announced with one id
        await producer.send_and_wait(CONTROL.name, emitted.model_dump_json().encode(), key=batch_id.encode())
    await producer.stop()

    worker = TrainerWorker(settings.trainer, settings.kafka, sessions, objects=settings.objects,
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


# --- crashes and lost announcements ---------------------------------------------------------------
#
# A `feedloop train` that dies is started again: here, a TrainerWorker that ends with an error
# is replaced by a new one in the same consumer group, which re-reads what was not committed.
# Each test has a broker of its own: a new group reads the control topic from the start, and
# other tests' batch_emitted events (of batches in their own directories) must not be in it.


@pytest.fixture(scope="module")
def small_base(tmp_path_factory):
    """A base model pretrained briefly (seconds): these tests need an adapter trained, not a good one."""
    config = BaseModelConfig(seed=0, train_steps=40, batch_size=8, log_every=1000)
    return build_tiny_model(tmp_path_factory.mktemp("small-base"), ToyChats(count=300), config)


# A gate that passes whatever the small base model's adapter answers, and no rehearsal chats.
# No suites plugged in: the gate checks only that a candidate is sound (finite losses and weights).
QUICK = FAST.model_copy(update={"rehearsal_per_batch": 0, "gate": GateConfig()})


def new_worker(settings, sessions, group: str) -> TrainerWorker:
    return TrainerWorker(settings.trainer, settings.kafka, sessions, objects=settings.objects,
                         base_model_dir=settings.model_path, adapters_dir=settings.adapters_path, group=group)


async def emit_batch(settings, records: list) -> BatchEmitted:
    """A batch written in the real format and its batch_emitted on the control topic."""
    batch_id = f"batch-{uuid.uuid4().hex[:8]}"
    batch_dir = batches.write(settings.data_dir, batch_id, records)
    emitted = BatchEmitted(event_id=f"{batch_id}.emitted", occurred_at=utcnow(), source="test", batch_id=batch_id,
                           path=batch_dir.folder, manifest_sha256="x" * 64,
                           example_count=len(records), trigger="manual")
    await announce(settings, emitted)
    return emitted


async def announce(settings, emitted: BatchEmitted) -> None:
    """The batch_emitted on the control topic, as the curator publishes it."""
    producer = kafka.producer(settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(CONTROL.name, emitted.model_dump_json().encode(), key=control_key(emitted))
    finally:
        await producer.stop()


def emitted_at(path: str, event_id: str = "b.emitted") -> BatchEmitted:
    """A batch_emitted for ``path`` (relative to the data dir), as anyone on the control topic could send it."""
    return BatchEmitted(event_id=event_id, occurred_at=utcnow(), source="test", batch_id="b", path=path,
                        manifest_sha256="x" * 64, example_count=1, trigger="manual")  # fmt: skip


async def run_until(worker: TrainerWorker, done, timeout_s: float = 120) -> BaseException | None:
    """Run the worker until it dies or ``done()`` holds; the error it died of, if it did."""
    task = asyncio.create_task(worker.run())
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not task.done() and not done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.wait([task], timeout=0.2)
    if not task.done():
        worker.stop()
    await asyncio.wait([task])
    return task.exception()


def batch_status(sessions, batch_id: str) -> str | None:
    with sessions() as session:
        row = session.get(Batch, batch_id)
        return None if row is None else row.status


async def test_a_batch_whose_training_crashes_is_restarted_up_to_max_attempts_then_marked_failed(
    sessions, tmp_path, own_broker
):
    # A base model directory with nothing in it: every attempt claims the batch, then crashes
    # loading the model, as a worker killed mid-training leaves it: "training", uncommitted.
    empty = tmp_path / "no-model"
    empty.mkdir()
    settings = make_settings(tmp_path, own_broker.port, base_model_path=empty, adapter_dir=tmp_path / "adapters",
                             trainer=FAST.model_copy(update={"max_attempts": 2}))
    await ensure_topics(settings)
    emitted = await emit_batch(settings, batches.sft_records(seed=3, count=12))
    group = f"trainer-{uuid.uuid4().hex[:8]}"

    for attempt in (1, 2):  # each run crashes and leaves the batch "training", its offset uncommitted
        error = await run_until(new_worker(settings, sessions, group), lambda: False)
        assert isinstance(error, ValueError), f"attempt {attempt}: {error!r}"  # loading the model
        assert batch_status(sessions, emitted.batch_id) == "training"
    # The third run does not train again: the batch is marked failed.
    error = await run_until(new_worker(settings, sessions, group),
                            lambda: batch_status(sessions, emitted.batch_id) == "failed")
    assert batch_status(sessions, emitted.batch_id) == "failed"
    assert not isinstance(error, ValueError), "a third attempt at training"
    assert rows(sessions, Adapter) == [] and not list(settings.adapters_path.glob("adapter-*"))


async def test_a_batch_marked_failed_does_not_keep_the_worker_from_the_next_batch(sessions, tmp_path, own_broker):
    empty = tmp_path / "no-model"
    empty.mkdir()
    settings = make_settings(tmp_path, own_broker.port, base_model_path=empty, adapter_dir=tmp_path / "adapters",
                             trainer=FAST.model_copy(update={"max_attempts": 1}))
    await ensure_topics(settings)
    first = await emit_batch(settings, batches.sft_records(seed=3, count=12))
    second = await emit_batch(settings, batches.sft_records(seed=4, count=12))
    group = f"trainer-{uuid.uuid4().hex[:8]}"
    for _ in range(4):  # restarts; a run ends when a training crashes (the model cannot load)
        await run_until(new_worker(settings, sessions, group),
                        lambda: batch_status(sessions, second.batch_id) is not None, timeout_s=60)
        if batch_status(sessions, second.batch_id) is not None:
            break
    assert batch_status(sessions, first.batch_id) == "failed"
    assert batch_status(sessions, second.batch_id) is not None, "the worker never reached the second batch"


async def test_a_trained_adapter_whose_announcement_was_lost_is_announced_on_restart(
    small_base, sessions, tmp_path, own_broker
):
    settings = make_settings(tmp_path, own_broker.port, base_model_path=small_base, trainer=QUICK,
                             adapter_dir=tmp_path / "adapters")
    await ensure_topics(settings)
    emitted = await emit_batch(settings, batches.sft_records(seed=3, count=24))
    group = f"trainer-{uuid.uuid4().hex[:8]}"

    # The worker trained the batch (its handler's call, made here), then died before its
    # adapter_ready reached the broker: never published, the batch_emitted's offset never committed.
    lost = (await asyncio.to_thread(train_batch, BatchFolder(settings.objects, emitted.path), settings.trainer,
                                    sessions, base_model_dir=settings.model_path, adapters_dir=settings.adapters_path,
                                    objects=settings.objects,
                                    parent=parent_for_next(sessions))).event  # fmt: skip
    (adapter,) = rows(sessions, Adapter)
    assert lost.adapter == adapter.name and batch_status(sessions, emitted.batch_id) == "trained"

    async def restart(group: str, announcements: int) -> list[dict]:
        """A worker in ``group`` runs until the topic holds this many adapter_ready of the adapter."""
        worker = new_worker(settings, sessions, group)
        running = asyncio.create_task(worker.run())
        try:
            return await control_events(settings, "adapter_ready", announcements, timeout_s=120,
                                        where=lambda e: e["adapter"] == adapter.name)
        finally:
            worker.stop()
            await running

    (announced,) = await restart(group, 1)
    assert announced == json.loads(lost.model_dump_json()), "the same event, with the same id"
    (again,) = rows(sessions, Adapter)
    assert again.lineage["attempt"] == 1 and again.lineage == adapter.lineage, "announced, not trained again"

    # A crash in the publish itself, after the adapter's directory moved into place and before
    # the registry rows were committed, leaves: the published directory, the intent file the
    # registry wrote before the move, no adapter row, the batch "training". Rebuilt here.
    intent = settings.adapters_path / "_staging" / emitted.batch_id / "publish.json"
    intent.parent.mkdir(parents=True)
    intent.write_text(json.dumps({c: getattr(adapter, c) for c in ("name", "state", "path", "sha256",
                                 "base_model_sha256", "parent", "reason", "lineage")}))  # fmt: skip
    with sessions.begin() as session:
        batch = session.get(Batch, emitted.batch_id)
        batch.status, batch.adapter = "training", None
        session.delete(session.get(Adapter, adapter.name))
    assert rows(sessions, Adapter) == []

    # A group that re-reads the batch_emitted; the first announcement is on the topic already.
    announced = await restart(f"trainer-{uuid.uuid4().hex[:8]}", 2)
    assert len(announced) == 2 and {e["event_id"] for e in announced} == {lost.event_id}
    (registered,) = rows(sessions, Adapter)
    assert (registered.name, registered.lineage) == (adapter.name, adapter.lineage), "registered, not trained again"
    assert batch_status(sessions, emitted.batch_id) == "trained"
    assert sorted(p.name for p in settings.adapters_path.glob("adapter-*")) == [adapter.name]
    assert not (settings.adapters_path / "_staging" / emitted.batch_id).exists()


def _never_trained(*args, **kwargs):
    raise AssertionError("train_batch was called")


@pytest.mark.parametrize("path", ["../elsewhere/batch-p0-000001", "/etc", "batches/../../elsewhere", "models/base",
                                  "batches", "batches/../keys", "keys/u_a", "batches/b/sft.jsonl", "batches/"])
async def test_a_batch_path_outside_the_batches_directory_is_dead_lettered_untrained(sessions, tmp_path, monkeypatch,
                                                                                     path):  # fmt: skip
    # Anyone who can write to the control topic could otherwise point the trainer anywhere.
    settings = make_settings(tmp_path, 1)
    monkeypatch.setattr("trainer.worker.train_batch", _never_trained)
    emitted = emitted_at(path)
    worker = TrainerWorker(settings.trainer, settings.kafka, sessions, objects=settings.objects,
                           base_model_dir=settings.model_path, adapters_dir=settings.adapters_path)
    (refused,) = await worker.handle(emitted)
    assert isinstance(refused, DeadLetter) and refused.reason == "batch_path_refused" and refused.stage == "trainer"
    assert refused.event_id == "b.emitted" and path in refused.detail


async def test_the_trainer_publishes_its_dead_letters_on_the_dead_letter_topic(sessions, tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    await ensure_topics(settings)
    await announce(settings, emitted_at("/etc"))
    consumer = kafka.consumer(settings.kafka, DEAD_LETTER.name, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    found: list[DeadLetter] = []
    try:
        worker = new_worker(settings, sessions, f"trainer-{uuid.uuid4().hex[:8]}")
        task = asyncio.create_task(worker.run())
        deadline = asyncio.get_running_loop().time() + 60
        while not found and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [DeadLetter.model_validate_json(r.value) for r in records]
        worker.stop()
        await asyncio.wait([task], timeout=30)
    finally:
        await consumer.stop()
    assert [(d.reason, d.event_id) for d in found] == [("batch_path_refused", "b.emitted")]


async def test_a_missing_or_corrupt_batch_is_not_trainable_and_the_worker_goes_on(sessions, tmp_path, caplog):
    settings = make_settings(tmp_path, 1)
    kept = batches.write(settings.data_dir, "batch-p0-000001", batches.sft_records(seed=3, count=4))
    kept.store.put(kept.key("sft.jsonl"), b"tampered\n")
    for i, path in enumerate(("batches/batch-p0-000001", "batches/never-written")):
        emitted = emitted_at(path, event_id=f"b{i}.emitted")
        assert await new_worker(settings, sessions, "g").handle(emitted) == []
    events = [r.msg["event"] for r in caplog.records if isinstance(r.msg, dict)]
    assert events.count("trainer.batch_not_trainable") == 2


async def test_the_trainer_reads_batches_from_object_storage_not_from_its_disk(sessions, tmp_path, monkeypatch,
                                                                                 s3_storage, caplog):  # fmt: skip
    objects = ObjectStore(s3_storage.url, s3_storage)
    records = batches.sft_records(seed=3, count=4)
    for batch_id in ("batch-p0-000001", "batch-p0-000002"):
        write_batch(BatchFolder.of(objects, batch_id), batch_id=batch_id, trigger="size", event_time="t",
                    records=records, loss_weights={"explicit": 1.0})  # fmt: skip
    objects.put("batches/batch-p0-000002/sft.jsonl", b"tampered\n")
    settings = make_settings(tmp_path, 1)
    worker = TrainerWorker(settings.trainer, settings.kafka, sessions, objects=objects,
                           base_model_dir=settings.model_path, adapters_dir=settings.adapters_path)  # fmt: skip

    # The recipe's own read: a part that does not match its manifest on the bucket is refused.
    assert await worker.handle(emitted_at("batches/batch-p0-000002", event_id="b2.emitted")) == []
    assert [r.msg["event"] for r in caplog.records if isinstance(r.msg, dict)].count("trainer.batch_not_trainable") == 1

    seen = []

    def train(batch, *args, **kwargs):  # what the recipe is handed, and what it reads from it
        seen.append(read_batch(batch))
        raise BatchAlreadyDone("read; not trained here")

    monkeypatch.setattr("trainer.worker.train_batch", train)
    assert await worker.handle(emitted_at("batches/batch-p0-000001", event_id="b1.emitted")) == []
    ((manifest, read),) = seen
    assert manifest.batch_id == "batch-p0-000001" and read["sft"] == sorted(records, key=lambda r: r.example_id)
    assert not (settings.data_dir / "batches").exists(), "nothing of the batch came to the trainer's disk"


def test_a_batch_id_that_is_not_a_plain_name_never_names_a_staging_directory(sessions, tmp_path):
    from trainer.registry import BatchNotTrainable, Registry

    store = Registry(sessions, tmp_path / "adapters")
    assert store.staging("run-1.batch-p0-000001").parent == tmp_path / "adapters" / "_staging"
    for bad in ("../x", "a/../../b", "/abs", "..", "a/b"):
        with pytest.raises(BatchNotTrainable, match="not a plain name"):
            store.staging(bad)


def curated(settings, sessions, batch_id: str, records: list) -> BatchEmitted:
    """A batch as the curator leaves it: files, its ``emitted`` row, and its batch_emitted."""
    batch_dir = batches.write(settings.data_dir, batch_id, records)
    path = batch_dir.folder
    with sessions.begin() as session:
        session.add(Batch(batch_id=batch_id, path=path, manifest_sha256="x" * 64, example_count=len(records),
                          trigger="size", status="emitted", manifest={"loss_weights": {"explicit": 1.0}}))
    return BatchEmitted(event_id=f"{batch_id}.emitted", occurred_at=utcnow(), source="curator", batch_id=batch_id,
                        path=path, manifest_sha256="x" * 64, example_count=len(records), trigger="size")


async def test_a_failed_batch_keeps_its_reason_and_trains_once_retried(small_base, sessions, tmp_path):
    settings = make_settings(tmp_path, 1, base_model_path=small_base, trainer=QUICK, adapter_dir=tmp_path / "adapters")
    records = batches.sft_records(seed=3, count=12)
    emitted = curated(settings, sessions, "run.batch-p0-000001", records)
    sft = settings.data_dir / emitted.path / "sft.jsonl"
    good = sft.read_bytes()
    sft.write_text("tampered\n")
    worker = new_worker(settings, sessions, "g")
    assert await worker.handle(emitted) == []
    with sessions() as session:
        row = session.get(Batch, emitted.batch_id)
        assert row.status == "failed" and "cannot be read" in row.reason
    assert await worker.handle(emitted) == [], "read again, it stays failed"

    sft.write_bytes(good)  # the operator mends the cause, then retries
    retry = retry_batch(sessions, settings.adapters_path, emitted.batch_id)
    assert (retry.batch_id, retry.path, retry.trigger, retry.source) == (emitted.batch_id, emitted.path, "size", "operator")
    assert retry.event_id != emitted.event_id and retry.loss_weights == {"explicit": 1.0}
    with sessions() as session:
        row = session.get(Batch, emitted.batch_id)
        assert (row.status, row.reason) == ("emitted", None)
    (ready,) = await worker.handle(retry)
    assert ready.batch_ids == [emitted.batch_id] and batch_status(sessions, emitted.batch_id) == "trained"
    with pytest.raises(ValueError, match="is trained, not failed"):
        retry_batch(sessions, settings.adapters_path, emitted.batch_id)
    with pytest.raises(LookupError, match="no batch"):
        retry_batch(sessions, settings.adapters_path, "never-emitted")


async def test_a_batch_over_the_privacy_budget_is_marked_failed_with_what_to_raise(sessions, tmp_path):
    dp = FAST.privacy.model_copy(update={"enabled": True, "budget_epsilon": 1e-6})
    settings = make_settings(tmp_path, 1, trainer=FAST.model_copy(update={"privacy": dp}),
                             adapter_dir=tmp_path / "adapters")
    emitted = curated(settings, sessions, "run.batch-p0-000002", batches.sft_records(seed=3, count=12))
    assert await new_worker(settings, sessions, "g").handle(emitted) == []
    with sessions() as session:
        row = session.get(Batch, emitted.batch_id)
        assert row.status == "failed" and "budget" in row.reason


async def test_train_retry_puts_the_batch_back_on_the_control_topic(sessions, tmp_path, own_broker, monkeypatch):
    from click.testing import CliRunner

    from app.cli import main
    from app.processes import settings_env

    settings = make_settings(tmp_path, own_broker.port, database_url=str(sessions.kw["bind"].url),
                             adapter_dir=tmp_path / "adapters")
    await ensure_topics(settings)
    emitted = curated(settings, sessions, "run.batch-p0-000003", batches.sft_records(seed=3, count=4))
    Registry(sessions, settings.adapters_path).fail_batch(emitted.batch_id, "gone for a test")
    env = settings_env(settings)
    done = await asyncio.to_thread(CliRunner().invoke, main, ["train", "--retry", emitted.batch_id], env=env)
    assert done.exit_code == 0 and "back in line" in done.output, done.output
    (event,) = await control_events(settings, "batch_emitted", 1, where=lambda e: e["batch_id"] == emitted.batch_id,
                                    timeout_s=30)
    assert event["source"] == "operator" and event["path"] == emitted.path
    assert batch_status(sessions, emitted.batch_id) == "emitted"
    again = await asyncio.to_thread(CliRunner().invoke, main, ["train", "--retry", emitted.batch_id], env=env)
    assert again.exit_code == 1 and "not failed" in again.output
