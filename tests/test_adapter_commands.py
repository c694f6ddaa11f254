"""`feedloop adapters ...`: which hand-made transitions are allowed, and what they publish."""

import asyncio
import json
import uuid

import pytest
from click.testing import CliRunner

from app.adapter_commands import OperatorError, current_routing, pin, promote, rollback
from app.cli import main
from streams.config import LearnerSettings
from streams.store import Adapter, RouterSnapshot
from streams.contract import CONTROL_EVENT_ADAPTER, AdapterLoaded, AdapterPromoted, utcnow
from streams.learning import LearnerState
from streams.topics import CONTROL
from tests.conftest import make_settings


def add(sessions, name: str, state: str) -> None:
    with sessions.begin() as session:
        session.add(Adapter(name=name, state=state, path=f"/adapters/{name}", sha256="0" * 64,
                            base_model_sha256="1" * 64, lineage={"serving": {"swap_ms": 12.5}}))  # fmt: skip


def snapshot(sessions, learner: LearnerState) -> None:
    snap = learner.snapshot()
    with sessions.begin() as session:
        session.add(RouterSnapshot(learner="learners", version=snap.version, examples=snap.examples,
                                   arms=list(snap.arms), state=snap.data))  # fmt: skip


def loaded(name: str) -> AdapterLoaded:
    return AdapterLoaded(event_id=f"adapter-loaded-{name}", occurred_at=utcnow(), source="swap", adapter=name, replicas=[])


def test_only_live_adapters_can_be_promoted_or_pinned_and_the_champion_is_never_rolled_back(sessions):
    for name, state in (("a-1", "champion"), ("a-2", "challenger"), ("a-3", "failed"), ("a-4", "ready")):
        add(sessions, name, state)
    event = promote(sessions, "a-2")
    assert (event.adapter, event.previous_champion, event.source) == ("a-2", "a-1", "operator")
    assert CONTROL_EVENT_ADAPTER.validate_json(event.model_dump_json()) == event
    with pytest.raises(OperatorError, match="already the champion"):
        promote(sessions, "a-1")
    with pytest.raises(OperatorError, match="failed, not serving"):
        promote(sessions, "a-3")
    with pytest.raises(OperatorError, match="no adapter 'nope'"):
        pin(sessions, "nope")
    with pytest.raises(OperatorError, match="promote another live adapter first"):
        rollback(sessions, "a-1", "bad tone")
    with pytest.raises(OperatorError, match="cannot roll back 'a-3'"):
        rollback(sessions, "a-3", "x")
    assert rollback(sessions, "a-4", "bad tone").reason == "operator: bad tone"
    assert pin(sessions, None).adapter is None and pin(sessions, "a-2").adapter == "a-2"


def test_the_base_model_is_an_arm_until_a_promotion_retires_it(sessions):
    add(sessions, "a-1", "challenger")
    learner = LearnerState(LearnerSettings(initial_arms=["base"]))
    learner.apply_control(loaded("a-1"))
    snapshot(sessions, learner)
    assert pin(sessions, "base").adapter == "base"
    with pytest.raises(OperatorError, match="the base model is already the champion"):
        promote(sessions, "base")
    learner.apply_control(AdapterPromoted(event_id="promote-a-1", occurred_at=utcnow(), source="t", adapter="a-1"))
    snapshot(sessions, learner)
    assert current_routing(sessions).arms == ["a-1"]
    with pytest.raises(OperatorError, match="base model: it was retired"):
        pin(sessions, "base")


async def test_the_cli_lists_and_publishes_operator_events(sessions, tmp_path, broker):
    from aiokafka import AIOKafkaConsumer

    from app.broker import ensure_topics

    settings = make_settings(tmp_path, broker.port)
    await ensure_topics(settings)
    name = f"a-{uuid.uuid4().hex[:8]}"
    add(sessions, name, "challenger")
    env = {"FEEDLOOP_DATA_DIR": str(tmp_path), "FEEDLOOP_EMBEDDED_BROKER_PORT": str(broker.port)}
    runner = CliRunner()
    listing = runner.invoke(main, ["adapters", "list"], env=env)
    assert listing.exit_code == 0 and name in listing.output and "challenger" in listing.output
    assert "no snapshot yet" in listing.output
    refused = runner.invoke(main, ["adapters", "promote", "ghost"], env=env)
    assert refused.exit_code != 0 and "no adapter 'ghost'" in refused.output
    # In a thread: the command runs its own event loop, as it does from a shell.
    result = await asyncio.to_thread(runner.invoke, main, ["adapters", "rollback", name, "--reason", "tone"], env=env)
    assert result.exit_code == 0, result.output

    consumer = AIOKafkaConsumer(CONTROL.name, bootstrap_servers=settings.bootstrap_servers,
                                group_id=f"check-{uuid.uuid4().hex}", auto_offset_reset="earliest")  # fmt: skip
    await consumer.start()
    try:
        found = []
        for _ in range(20):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [json.loads(r.value) for r in records if r.key == name.encode()]
            if found:
                break
    finally:
        await consumer.stop()
    assert [(e["type"], e["reason"], e["source"]) for e in found] == [("adapter_rolled_back", "operator: tone", "operator")]
