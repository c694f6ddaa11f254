"""The hot-swap controller against the real vLLM server, with adapters the real trainer made.

No broker here: the controller is plain Python (control events in, control events out), so
the events go straight in and the learner applies what comes out, as the live processes do
over the control topic (tests/integration covers that path).
"""

from __future__ import annotations

import shutil
from datetime import timedelta

import pytest

from streams.config import LearnerSettings
from streams.store import Adapter
from streams.contract import (
    AdapterLoaded,
    AdapterPromoted,
    AdapterRefused,
    AdapterRolledBack,
    AdapterUnloaded,
    DriftAlarm,
    utcnow,
)
from streams.learning import LearnerState
from tests.serving.conftest import PROMPTS, Models, Trained, registry_copy
from trainer.adapter_validation import ADAPTER_FILES, adapter_sha256
from trainer.hot_swap import SwapController
from trainer.replicas import AdapterSet, HotSwapper, ReplicaClient


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup(models: Models, trained: Trained, server, tmp_path, request):
    sessions = registry_copy(trained, tmp_path)
    clock = Clock()
    swapper = HotSwapper(AdapterSet(models.validator(), models.zero), [server.url])
    challengers = getattr(request, "param", 2)
    controller = SwapController(sessions, swapper, drain_s=5.0, reconcile_interval_s=60.0, max_challengers=challengers,
                                clock=clock)  # fmt: skip
    learner = LearnerState(LearnerSettings(initial_arms=["base"]))
    with ReplicaClient(server.url) as replica:
        yield controller, sessions, clock, learner, replica


def state(sessions, name: str) -> Adapter:
    with sessions() as session:
        return session.get(Adapter, name)


def answers(replica: ReplicaClient, adapter: str) -> list[str]:
    return [replica.complete(adapter, prompt, max_tokens=24) for prompt in PROMPTS[:4]]


def apply(learner: LearnerState, events) -> list:
    for event in events:
        learner.apply_control(event)
    return list(events)


def test_trained_adapters_are_swapped_in_and_each_answers_with_its_own_output(setup, trained: Trained, models):
    controller, sessions, _, learner, replica = setup
    for ready in (trained.concise, trained.detailed):
        # Other tests' adapters on the shared server are unloaded on the way (adapter_unloaded).
        (loaded,) = [e for e in apply(learner, controller.handle(ready)) if isinstance(e, AdapterLoaded)]
        assert isinstance(loaded, AdapterLoaded) and loaded.adapter == ready.adapter and loaded.replicas == [replica.url]
        row = state(sessions, ready.adapter)
        assert row.state == "challenger" and row.lineage["serving"]["swap_ms"] > 0
    assert set(replica.list_adapters()) == {models.zero.name, trained.concise.adapter, trained.detailed.adapter}
    assert learner.router.arms == ("base", trained.concise.adapter, trained.detailed.adapter)
    base, concise, detailed = (answers(replica, a) for a in (models.zero.name, trained.concise.adapter,
                                                                trained.detailed.adapter))  # fmt: skip
    assert concise != base and detailed != base and concise != detailed
    # The detailed adapter learned its style: bullet points, which concise answers never have.
    assert sum("\n- " in a for a in detailed) > sum("\n- " in a for a in concise)
    # At-least-once delivery: the same adapter_ready again loads nothing and announces nothing.
    assert controller.handle(trained.concise) == []


def test_a_corrupt_adapter_is_refused_without_touching_traffic(setup, trained: Trained, models):
    controller, sessions, _, learner, replica = setup
    apply(learner, controller.handle(trained.concise))
    before_adapters, before_answers = replica.list_adapters(), answers(replica, trained.concise.adapter)
    # A copy of a good adapter whose weights were damaged after its checksum was taken.
    corrupt = models.adapters_dir / "adapter-999999-deadbeef"
    shutil.copytree(models.adapters_dir / trained.concise.adapter, corrupt, dirs_exist_ok=True)
    expected = adapter_sha256(corrupt)
    weights = corrupt / ADAPTER_FILES[1]
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    event = trained.concise.model_copy(update={"event_id": "adapter-ready-corrupt", "adapter": corrupt.name,
                                               "path": str(corrupt), "sha256": expected})  # fmt: skip
    (refused,) = apply(learner, controller.handle(event))
    assert isinstance(refused, AdapterRefused) and refused.reason == "checksum_mismatch"
    assert replica.list_adapters() == before_adapters and answers(replica, trained.concise.adapter) == before_answers
    assert corrupt.name not in learner.router.arms
    # A path outside the adapters directory never reaches a replica either.
    outside = trained.detailed.model_copy(update={"event_id": "adapter-ready-outside", "adapter": "adapter-999998-0",
                                                  "path": str(models.adapters_dir / ".." / "outside")})  # fmt: skip
    (refused,) = controller.handle(outside)
    assert refused.reason == "outside_adapters_dir" and replica.list_adapters() == before_adapters


def test_promotion_retires_the_champion_and_rollback_unloads_after_the_drain(setup, trained: Trained, models):
    controller, sessions, clock, learner, replica = setup
    concise, detailed = trained.concise.adapter, trained.detailed.adapter
    apply(learner, controller.handle(trained.concise))
    promoted = AdapterPromoted(event_id="promote-concise", occurred_at=utcnow(), source="learners", adapter=concise,
                               previous_champion="base")  # fmt: skip
    apply(learner, [promoted, *controller.handle(promoted)])
    assert state(sessions, concise).state == "champion" and learner.lifecycle.champion == concise
    apply(learner, controller.handle(trained.detailed))
    assert learner.router.arms == (concise, detailed)

    rollback = AdapterRolledBack(event_id="rollback-detailed", occurred_at=utcnow(), source="learners",
                                 adapter=detailed, reason="ab_test: challenger worse")  # fmt: skip
    apply(learner, [rollback, *controller.handle(rollback)])
    row = state(sessions, detailed)
    assert (row.state, row.reason) == ("rolled_back", "ab_test: challenger worse")
    assert learner.router.arms == (concise,), "traffic goes back to the champion at once"
    assert detailed in replica.list_adapters(), "still loaded while requests routed before drain"
    assert controller.tick() == []
    clock.now += timedelta(seconds=5).total_seconds()
    (unloaded,) = controller.tick()
    assert isinstance(unloaded, AdapterUnloaded) and unloaded.adapter == detailed
    assert set(replica.list_adapters()) == {models.zero.name, concise}
    # A late verdict for the rolled-back adapter changes nothing: made champion, it would be
    # served by no replica.
    late = promoted.model_copy(update={"event_id": "promote-detailed", "adapter": detailed,
                                       "previous_champion": concise})  # fmt: skip
    assert controller.handle(late) == []
    assert state(sessions, detailed).state == "rolled_back" and state(sessions, concise).state == "champion"

    # A restarted controller resumes from the registry: the champion stays, nothing is re-announced
    # for the learner to act on (it ignores adapters it has or has ended), nothing is unloaded.
    again = SwapController(sessions, HotSwapper(AdapterSet(models.validator(), models.zero), [replica.url]),
                           drain_s=5.0, reconcile_interval_s=60.0)  # fmt: skip
    resumed = again.resume()
    assert [type(e) for e in resumed] == [AdapterLoaded] and resumed[0].adapter == concise
    assert set(replica.list_adapters()) == {models.zero.name, concise}


@pytest.mark.parametrize("setup", [1], indirect=True)
def test_one_experiment_at_a_time_the_newest_waiting_adapter_goes_next(setup, trained: Trained, models):
    controller, sessions, _, learner, replica = setup
    concise = trained.concise.adapter
    # A third adapter, newer than the detailed one: a copy under its own immutable name.
    newest = models.adapters_dir / "adapter-000099-0000beef"
    shutil.copytree(models.adapters_dir / trained.detailed.adapter, newest, dirs_exist_ok=True)
    newest_ready = trained.detailed.model_copy(update={"event_id": "adapter-ready-newest", "adapter": newest.name,
                                                       "path": str(newest), "sha256": adapter_sha256(newest)})  # fmt: skip
    apply(learner, controller.handle(trained.concise))
    assert controller.handle(trained.detailed) == [] and controller.handle(newest_ready) == []
    assert set(replica.list_adapters()) == {models.zero.name, concise}, "the others wait while concise is tested"
    assert state(sessions, trained.detailed.adapter).state == "ready"

    rollback = AdapterRolledBack(event_id="rollback-concise", occurred_at=utcnow(), source="learners",
                                 adapter=concise, reason="ab_test")  # fmt: skip
    superseded, loaded = apply(learner, [rollback, *controller.handle(rollback)])[1:]
    assert isinstance(superseded, AdapterRefused) and superseded.reason == "superseded"
    assert superseded.adapter == trained.detailed.adapter and state(sessions, superseded.adapter).state == "superseded"
    assert isinstance(loaded, AdapterLoaded) and loaded.adapter == newest.name
    assert learner.router.arms == ("base", newest.name)


@pytest.mark.parametrize("setup", [1], indirect=True)
def test_the_same_drift_alarm_again_supersedes_nothing_that_came_after_it(setup, trained: Trained, models):
    controller, sessions, _, learner, _ = setup
    concise, detailed = trained.concise.adapter, trained.detailed.adapter
    apply(learner, controller.handle(trained.concise))
    alarm = DriftAlarm(event_id="drift-reward", occurred_at=utcnow(), source="learners", signal=f"reward:{concise}",
                       detector="ADWIN", detected_at=utcnow())  # fmt: skip
    assert controller.handle(alarm) == [], "nothing waited"
    assert controller.handle(trained.detailed) == [], "trained after the alarm, it waits while concise is tested"
    # A copy (an output the learner sent again, or one a standby re-derived after a takeover).
    assert controller.handle(alarm) == []
    assert state(sessions, detailed).state == "ready"


@pytest.mark.parametrize("setup", [1], indirect=True)
def test_a_reward_drift_alarm_supersedes_what_waits(setup, trained: Trained, models):
    controller, sessions, _, learner, replica = setup
    concise, detailed = trained.concise.adapter, trained.detailed.adapter
    apply(learner, controller.handle(trained.concise))
    assert controller.handle(trained.detailed) == [], "waits while concise is tested"
    feature_alarm = DriftAlarm(event_id="drift-domain", occurred_at=utcnow(), source="learners",
                               signal="feature:domain", detector="ADWIN", detected_at=utcnow())  # fmt: skip
    assert controller.handle(feature_alarm) == [], "the questions changed, not what users want: it still waits"
    alarm = feature_alarm.model_copy(update={"event_id": "drift-reward", "signal": f"reward:{concise}"})
    (superseded,) = controller.handle(alarm)
    assert isinstance(superseded, AdapterRefused) and superseded.adapter == detailed
    assert state(sessions, detailed).state == "superseded" and "preferences moved" in state(sessions, detailed).reason
    # The learner ends the running test for the same alarm; nothing stale is loaded after it.
    rollback = AdapterRolledBack(event_id="rollback-concise", occurred_at=utcnow(), source="learners",
                                 adapter=concise, reason="drift")  # fmt: skip
    assert controller.handle(rollback) == []
    assert detailed not in replica.list_adapters()
