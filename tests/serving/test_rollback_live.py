"""A rollback, live: the learner's A/B verdict goes over the control topic to the hot-swap
controller, which unloads the adapter from the real vLLM server.

Real parts: the Tansu broker, `feedloop learn` and `feedloop swap` as their own processes, the
vLLM server and an adapter the real trainer made (tests/serving/conftest.py), the SQLite store.
The annotated examples go straight onto the examples topic, as the pipeline worker writes them
(its own tests cover how it makes them): every answer of the challenger was thumbed down,
every answer of the champion up.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

from sqlalchemy import select

from app.broker import EmbeddedBroker, ensure_topics
from streams import kafka
from streams.contract import AnnotatedExample, Context, Message, utcnow
from streams.store import Adapter, RouterSnapshot
from streams.topics import CONTROL, EXAMPLES, control_key
from tests.conftest import free_port, make_settings
from tests.integration.test_pipeline_live import start_worker, stop_worker, wait_for
from tests.serving.conftest import MAX_LORA_RANK, SERVED_NAME, Models, Trained, registry_copy
from trainer.replicas import ReplicaClient

CHAMPION = "base"  # the learner's first arm: the base model, served through the zero-delta adapter
LEARNERS = {"initial_arms": [CHAMPION], "ab_min_samples": 15, "checkpoint_interval_s": 0.5, "canary_share": 1.0}


def process_env(settings, models: Models, server_url: str) -> dict[str, str]:
    """What `feedloop learn` and `feedloop swap` read: this test's broker, store, models and replica."""
    return {
        "FEEDLOOP_DATABASE_URL": settings.store_url,
        "FEEDLOOP_BASE_MODEL_PATH": str(models.base_dir),
        "FEEDLOOP_ADAPTER_DIR": str(models.adapters_dir),
        "FEEDLOOP_VLLM_URLS": json.dumps([server_url]),
        "FEEDLOOP_SERVING__SERVED_MODEL_NAME": SERVED_NAME,
        "FEEDLOOP_SERVING__MAX_LORA_RANK": str(MAX_LORA_RANK),
        "FEEDLOOP_SERVING__DRAIN_S": "0",  # the drain has its own test (test_swap_controller.py)
        **{f"FEEDLOOP_LEARNERS__{k.upper()}": json.dumps(v) for k, v in LEARNERS.items()},
    }


def example(adapter: str, thumbs_up: bool, n: int) -> AnnotatedExample:
    closed = utcnow()
    return AnnotatedExample(
        example_id=f"i-{uuid.uuid4().hex}", app_id="app-a", session_id=f"s-{n}", user=f"u_{n % 7}",
        adapter=adapter, propensity=0.5, cohort="a", domain="code", context=Context(domain="code", cohort="a"),
        prompt=[Message(role="user", content=f"question {n}")], response=f"answer {n}",
        rewards={"explicit": 1.0 if thumbs_up else 0.0, "implicit": None, "self_eval": None},
        feedback_kinds=["thumbs"], training_consent=True, occurred_at=closed - timedelta(minutes=30),
        closed_at=closed, event_ids=[f"ev-{uuid.uuid4().hex}"],
    )  # fmt: skip


class ControlTopic:
    """Everything on the control topic, read as it comes."""

    def __init__(self, consumer) -> None:
        self.consumer = consumer
        self.seen: list[dict] = []

    async def events(self, kind: str, adapter: str) -> list[dict]:
        """The ``kind`` events about ``adapter`` read so far."""
        for records in (await self.consumer.getmany(timeout_ms=200)).values():
            self.seen += [json.loads(r.value) for r in records]
        return [e for e in self.seen if e["type"] == kind and e.get("adapter") == adapter]

    async def wait(self, kind: str, adapter: str, timeout_s: float = 120) -> list[dict]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not (found := await self.events(kind, adapter)):
            assert asyncio.get_running_loop().time() < deadline, f"no {kind} for {adapter} on the control topic"
        return found


def arms(sessions) -> list[str]:
    with sessions() as session:
        newest = session.scalar(select(RouterSnapshot).order_by(RouterSnapshot.id.desc()).limit(1))
    return [] if newest is None else list(newest.arms)


def registry_state(sessions, name: str) -> tuple[str, str | None]:
    with sessions() as session:
        row = session.get(Adapter, name)
        return row.state, row.reason


async def test_a_clearly_worse_challenger_is_rolled_back_by_the_learner_and_unloaded_from_vllm(
    models: Models, trained: Trained, server, tmp_path
):
    challenger = trained.detailed.adapter
    sessions = registry_copy(trained, tmp_path)
    with sessions.begin() as session:  # one adapter in this test: the controller would load the newer one only
        row = session.get(Adapter, trained.concise.adapter)
        row.state, row.reason = "superseded", "not part of this test"
    with EmbeddedBroker(free_port()) as broker, ReplicaClient(server.url) as replica:
        settings = make_settings(tmp_path, broker.port, database_url=f"sqlite:///{tmp_path / 'registry.db'}")
        await ensure_topics(settings)
        env = process_env(settings, models, server.url)
        swap, learner = start_worker(settings, env, command="swap"), start_worker(settings, env, command="learn")
        producer = kafka.producer(settings.kafka)
        watcher = kafka.consumer(settings.kafka, CONTROL.name, group_id=f"watch-{uuid.uuid4().hex[:8]}")
        await producer.start()
        await watcher.start()
        control = ControlTopic(watcher)
        try:
            # The trainer's announcement: the controller loads the adapter on the replica and
            # announces adapter_loaded; the learner adds it as an arm and starts its A/B test.
            ready = trained.detailed
            await producer.send_and_wait(CONTROL.name, ready.model_dump_json().encode(), key=control_key(ready))
            await wait_for(lambda: challenger in replica.list_adapters(), 120, "the adapter loaded in vLLM")
            await wait_for(lambda: challenger in arms(sessions), 120, "the learner's arm for the adapter")
            assert registry_state(sessions, challenger)[0] == "challenger"
            assert await control.wait("adapter_loaded", challenger)
            assert await control.events("adapter_rolled_back", challenger) == []

            for n in range(40):  # alternating, as traffic split between the two would come
                adapter, up = (challenger, False) if n % 2 else (CHAMPION, True)
                record = example(adapter, up, n)
                await producer.send_and_wait(EXAMPLES.name, record.model_dump_json().encode(),
                                             key=record.session_id.encode())

            (rolled_back,) = await control.wait("adapter_rolled_back", challenger)
            assert rolled_back["source"] == "learners"
            assert rolled_back["reason"].startswith(f"ab_test: challenger worse than {CHAMPION}")
            await wait_for(lambda: challenger not in replica.list_adapters(), 120, "the adapter unloaded from vLLM")
            (unloaded,) = await control.wait("adapter_unloaded", challenger)
            assert unloaded["source"] == "swap" and unloaded["replicas"] == [server.url]
            await wait_for(lambda: challenger not in arms(sessions), 60, "the arm removed from the router")
        finally:
            await watcher.stop()
            await producer.stop()
            stop_worker(learner)
            stop_worker(swap)
        loaded = replica.list_adapters()
        assert challenger not in loaded and models.zero.name in loaded, "the base model still serves"
        assert registry_state(sessions, challenger) == ("rolled_back", rolled_back["reason"])
        assert arms(sessions) == [CHAMPION]
