"""The learners as the live system runs them (streams/learning.py), the worker's checkpoint and
snapshots (streams/learner_agents.py), and the gateway's router (app/routing.py, /v1/route).

No broker here: records are fed as the worker would feed them, and the gateway runs in process
with a publisher that fails the test if anything touches it.
"""

from __future__ import annotations

import pickle
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
from pydantic import SecretStr
from sqlalchemy import func, select

from app.gateway import create_app
from app.routing import RoutingService
from app.settings import Settings
from streams.config import LearnerSettings
from streams.store import RouterSnapshot
from streams.contract import (
    CONTROL_EVENT_ADAPTER,
    AdapterLoaded,
    AdapterPinned,
    AdapterPromoted,
    AdapterRolledBack,
    AnnotatedExample,
    BatchEmitted,
    Context,
    DriftAlarm,
)
from streams.learner_agents import LiveLearner
from streams.objects import ObjectStore
from learners.router import LinUCBRouter
from streams.learning import LearnerState, combined_reward, route_features
from streams.topics import CONTROL, EXAMPLES

T0 = datetime(2026, 11, 21, tzinfo=timezone.utc)
CODE = {"domain": "code", "cohort": "a", "locale": "en"}
CHAT = {"domain": "chat", "cohort": "a", "locale": "en"}


def example(i: int, adapter: str, context: dict, rewards: dict, *, consent: bool = True,
            seconds: float | None = None) -> AnnotatedExample:
    at = T0 + timedelta(seconds=20 * i if seconds is None else seconds)
    named = {k: v for k, v in context.items() if k in Context.model_fields}
    features = {k: v for k, v in context.items() if k not in Context.model_fields}
    return AnnotatedExample(
        example_id=f"i-{i}", app_id="app-a", session_id=f"s-{i}", user="u", adapter=adapter, propensity=0.5,
        cohort=context.get("cohort") or "default", domain=context.get("domain") or "general",
        context=Context(**named, features=features), prompt=[{"role": "user", "content": "q"}], response="a",
        rewards={"explicit": None, "implicit": None, "self_eval": None, **rewards},
        feedback_kinds=["thumbs"], training_consent=consent, occurred_at=at, closed_at=at + timedelta(seconds=600),
        event_ids=[f"e-{i}"],
    )


def loaded(adapter: str) -> AdapterLoaded:
    return AdapterLoaded(event_id=f"load-{adapter}", occurred_at=T0, source="hotswap", adapter=adapter,
                         replicas=["r0"])


def records(environment, n: int = 600, seed: int = 3) -> list[tuple[str, int, int, bytes]]:
    """A deterministic stream as the worker sees it: examples on 2 partitions, adapters loaded
    on the control topic after 50 and 100 examples, a batch event the learners ignore."""
    rng = np.random.default_rng(seed)
    contexts, probabilities = environment.sample(rng, n)
    arms = ["general"]
    out, offsets = [], {}

    def add(topic: str, partition: int, value: bytes) -> None:
        offsets[(topic, partition)] = offsets.get((topic, partition), -1) + 1
        out.append((topic, partition, offsets[(topic, partition)], value))

    for i, (context, p) in enumerate(zip(contexts, probabilities)):
        if i in (50, 100):
            arms.append({50: "coder", 100: "mathy"}[i])
            add(CONTROL.name, 0, loaded(arms[-1]).model_dump_json().encode())
        if i == 70:
            add(CONTROL.name, 0, BatchEmitted(event_id="batch-event-1", occurred_at=T0, source="curator",
                                              batch_id="b1", path="batches/b1", manifest_sha256="0" * 64,
                                              example_count=1, trigger="size").model_dump_json().encode())
        arm = arms[i % len(arms)]
        success = float(rng.random() < p[environment.arms.index(arm)])
        rewards = {"explicit": success} if i % 3 else {"explicit": success, "implicit": float(rng.random() < 0.5)}
        add(EXAMPLES.name, i % 2, example(i, arm, context, rewards).model_dump_json().encode())
    return out


CONFIG = LearnerSettings(initial_arms=["general"], ab_min_samples=30, review_budget_per_hour=3)


def run(state: LearnerState, stream) -> list[str]:
    """Feed records; the outputs as JSON, in order."""
    outputs = []
    for record in stream:
        result = state.handle(*record)
        if result is not None:
            outputs += [e.model_dump_json() for e in result.control] + [r.model_dump_json() for r in result.reviews]
    return outputs


# --- pieces ------------------------------------------------------------------------------------


def test_route_features_are_the_same_for_the_gateway_and_the_learner():
    context = Context(domain="code", locale=None, features={"tier": "pro", "domain": "shadowed", "tokens": 12})
    assert route_features(context, "app-a") == {"tier": "pro", "domain": "code", "tokens": 12, "app_id": "app-a"}


def test_combined_reward_weighs_the_channels_present_and_is_none_without_any():
    weights = {"explicit": 0.6, "implicit": 0.3, "self_eval": 0.1}
    assert combined_reward({"explicit": 1.0, "implicit": 0.0, "self_eval": None}, weights) == pytest.approx(2 / 3)
    assert combined_reward({"explicit": None, "implicit": 0.4}, weights) == pytest.approx(0.4)
    assert combined_reward({"explicit": None, "implicit": None}, weights) is None


# --- replay and restart ------------------------------------------------------------------------


def test_the_same_records_in_the_same_order_rebuild_the_same_state(environment):
    stream = records(environment)
    first, second = LearnerState(CONFIG), LearnerState(CONFIG)
    out_first, out_second = run(first, stream), run(second, stream)
    assert out_first == out_second and out_first  # drift alarms, verdicts, review picks
    assert first.snapshot() == second.snapshot()
    assert first.version == second.version and first.router.arms == second.router.arms
    assert pickle.dumps(first.drift) == pickle.dumps(second.drift)
    assert pickle.dumps(first.review) == pickle.dumps(second.review)
    # The comparison has power: another order is another state.
    shuffled = LearnerState(CONFIG)
    run(shuffled, stream[:200] + stream[200:][::-1])
    assert shuffled.snapshot().data != first.snapshot().data


def test_a_restored_checkpoint_goes_on_as_if_never_stopped_and_skips_redelivered_records(environment):
    stream = records(environment)
    whole = LearnerState(CONFIG)
    expected = run(whole, stream)
    before = LearnerState(CONFIG)
    outputs = run(before, stream[:300])
    after = pickle.loads(pickle.dumps(before))  # what the worker's checkpoint holds
    # The broker redelivers from the committed offset, which may lag the checkpoint.
    outputs += run(after, stream[250:])
    assert outputs == expected
    assert after.snapshot() == whole.snapshot()
    assert after.examples == sum(1 for r in stream if r[0] == EXAMPLES.name)


def test_an_example_emitted_again_at_a_new_offset_is_learned_once(environment):
    # The pipeline emits a window's examples again when a checkpoint failed after they went out.
    stream = records(environment)
    once = LearnerState(CONFIG)
    expected = run(once, stream)
    examples = [r for r in stream if r[0] == EXAMPLES.name]
    offsets: dict[int, int] = {}
    for topic, partition, offset, _ in stream:
        offsets[partition] = max(offsets.get(partition, -1), offset) if topic == EXAMPLES.name else offsets.get(partition, -1)
    again = [(topic, partition, offsets[partition] + 1 + i, value)
             for i, (topic, partition, _, value) in enumerate(examples[100:160])]  # fmt: skip
    twice = LearnerState(CONFIG)
    assert run(twice, stream + again) == expected
    assert twice.snapshot() == once.snapshot() and twice.examples == once.examples
    # Memory is bounded: with room for 10 ids, the oldest re-emitted ones are learned again.
    forgetful = LearnerState(CONFIG.model_copy(update={"example_memory": 10}))
    run(forgetful, stream + again)
    assert len(forgetful.seen_examples) == 10 and forgetful.examples == once.examples + len(again)

def test_the_router_learns_which_adapter_suits_which_context(environment):
    # No verdict (all arms stay) and no canary cap (it would hide what the router learned).
    state = LearnerState(CONFIG.model_copy(update={"ab_min_samples": 10_000, "ab_max_samples": None, "canary_share": 1.0}))
    run(state, records(environment, n=3000))
    assert state.router.arms == ("general", "coder", "mathy")
    for domain, best in (("code", "coder"), ("math", "mathy"), ("chat", "general")):
        probabilities = state.router.probabilities(route_features(Context(domain=domain, cohort="a"), "app-a"))
        assert max(probabilities, key=probabilities.get) == best, (domain, probabilities)


# --- arms and experiments ----------------------------------------------------------------------


def test_arms_follow_the_adapter_lifecycle_and_events_are_idempotent():
    state = LearnerState(LearnerSettings(initial_arms=["base"]))
    for _ in range(20):
        state.learn_one(example(0, "base", CODE, {"explicit": 1.0}))
    state.apply_control(loaded("code-v1"))
    assert state.router.arms == ("base", "code-v1") and set(state.lifecycle.experiments) == {"code-v1"}
    # Warm start: the new arm predicts what the champion learned.
    x = state.router.featurizer.transform(route_features(Context(**CODE), "app-a"))
    models = state.router._models
    assert models["code-v1"].predict(x) == pytest.approx(models["base"].predict(x))
    version = state.version
    state.apply_control(loaded("code-v1"))  # replicas reloaded: nothing changes
    assert state.version == version and state.lifecycle.experiments["code-v1"] is not None
    state.apply_control(loaded("chat-v1"))
    state.apply_control(AdapterRolledBack(event_id="rollback-chat-v1", occurred_at=T0, source="ops", adapter="chat-v1",
                                          reason="manual"))  # fmt: skip
    assert state.router.arms == ("base", "code-v1") and set(state.lifecycle.experiments) == {"code-v1"}
    state.apply_control(loaded("chat-v1"))  # the swap controller announces again after a restart
    assert "chat-v1" not in state.router.arms, "a rolled-back adapter never comes back"
    state.apply_control(AdapterPromoted(event_id="promote-code-v1", occurred_at=T0, source="ops", adapter="code-v1"))
    assert state.router.arms == ("code-v1",) and state.lifecycle.champion == "code-v1"
    assert not state.lifecycle.experiments
    state.apply_control(AdapterRolledBack(event_id="rollback-code-v1", occurred_at=T0, source="ops", adapter="code-v1",
                                          reason="manual"))  # fmt: skip
    assert state.router.arms == ("code-v1",), "the last arm must stay: every request needs one"


def test_promoting_one_challenger_restarts_the_other_experiments_against_the_new_champion():
    state = LearnerState(LearnerSettings(initial_arms=["base"]))
    state.apply_control(loaded("a-v1"))
    state.apply_control(loaded("b-v1"))
    state.apply_control(AdapterPromoted(event_id="promote-a-v1", occurred_at=T0, source="ops", adapter="a-v1"))
    assert state.lifecycle.champion == "a-v1" and state.router.arms == ("a-v1", "b-v1")
    assert state.lifecycle.experiments["b-v1"].champion == "a-v1"


def test_two_challengers_ready_on_the_same_reward_promote_one_and_the_other_restarts():
    # b-v1 and c-v1 earn the same rewards, so both tests against base reach their verdict on
    # the same base-served example. The first promotion restarts c-v1's test against b-v1;
    # the old test against the retired champion must not promote c-v1 too.
    state = LearnerState(LearnerSettings(initial_arms=["base"], ab_min_samples=30))
    state.apply_control(loaded("b-v1"))
    state.apply_control(loaded("c-v1"))
    published, i = [], 0
    while not published:
        for arm in ("b-v1", "c-v1", "base"):
            reward = float(i % 10 != 0) if arm != "base" else float(i % 10 < 2)
            published += state.learn_one(example(i, arm, CODE, {"explicit": reward})).control
        i += 1
        assert i < 500, "no verdict"
    assert [(type(e), e.adapter) for e in published] == [(AdapterPromoted, "b-v1")]
    assert state.lifecycle.champion == "b-v1" and state.router.arms == ("b-v1", "c-v1")
    fresh = state.lifecycle.experiments["c-v1"]
    assert fresh.champion == "b-v1" and fresh.decision().n_champion == 0


def test_a_new_adapter_is_a_canary_until_promoted_and_a_pin_takes_all_traffic():
    state = LearnerState(LearnerSettings(initial_arms=["base"], canary_share=0.1, floor=0.1))
    state.apply_control(loaded("code-v1"))
    features = route_features(Context(**CODE), "app-a")
    # Untrained and wide, the new arm is the greedy choice; the canary cap holds it at 10%.
    assert state.router.probabilities(features) == pytest.approx({"base": 0.9, "code-v1": 0.1})
    version = state.version
    state.apply_control(AdapterPinned(event_id="pin-event-1", occurred_at=T0, source="ops", adapter="base"))
    assert state.router.probabilities(features) == {"base": 1.0, "code-v1": 0.0} and state.version == version + 1
    state.apply_control(AdapterPinned(event_id="pin-event-2", occurred_at=T0, source="ops", adapter="nobody"))
    assert state.router.pinned == "base", "an unknown adapter cannot be pinned"
    # Pins and caps travel with the snapshot the gateway routes with.
    restored = LinUCBRouter.from_bytes(state.snapshot().data, np.random.default_rng(0))
    assert restored.pinned == "base" and restored.caps == {"code-v1": 0.1}
    state.apply_control(AdapterPinned(event_id="pin-event-3", occurred_at=T0, source="ops", adapter=None))
    state.apply_control(AdapterPromoted(event_id="promote-code-v1", occurred_at=T0, source="ops", adapter="code-v1"))
    assert state.router.probabilities(features) == {"code-v1": 1.0} and state.router.caps == {}


@pytest.mark.parametrize("challenger_mean, cleared", [(0.75, True), (0.25, False)])
def test_a_canary_not_behind_the_champion_after_min_samples_is_no_longer_capped(challenger_mean, cleared):
    state = LearnerState(LearnerSettings(initial_arms=["base"], canary_share=0.1, ab_min_samples=20))
    state.apply_control(loaded("code-v1"))
    features = route_features(Context(**CODE), "app-a")

    def reward(i: int) -> float:  # 0/1 rewards: the champion's mean is 0.5, the challenger's as given
        if i % 2 == 0:
            return float(i % 4 == 0)
        return float((i // 2) % 4 < 4 * challenger_mean)

    for i in range(38):  # 19 rewards each: one short of min_samples, the cap holds whatever they say
        state.learn_one(example(i, ("base", "code-v1")[i % 2], CODE, {"explicit": reward(i)}))
    assert state.router.caps == {"code-v1": 0.1}
    for i in range(38, 40):
        state.learn_one(example(i, ("base", "code-v1")[i % 2], CODE, {"explicit": reward(i)}))
    assert "code-v1" in state.lifecycle.experiments, "the test goes on to its verdict"
    assert state.router.caps == ({} if cleared else {"code-v1": 0.1})
    share = state.router.probabilities(features)["code-v1"]
    # Cleared, the router's estimates decide: the better arm is the greedy choice (the other
    # keeps an exploration share that fades with its uncertainty); capped and worse, it is not.
    assert (share > 0.9) if cleared else (0.001 <= share < 0.1)
    assert LinUCBRouter.from_bytes(state.snapshot().data, np.random.default_rng(0)).caps == state.router.caps


def test_a_reward_drift_alarm_ends_the_running_experiment():
    rng = np.random.default_rng(2)
    state = LearnerState(LearnerSettings(initial_arms=["base"], ab_min_samples=1000))  # no verdict of its own
    state.apply_control(loaded("code-v1"))
    published = []
    for i in range(600):
        arm = ("base", "code-v1")[i % 2]
        p = 0.5 if arm == "code-v1" else (0.9 if i < 300 else 0.1)  # the champion's users change their minds
        out = state.learn_one(example(i, arm, CODE, {"explicit": float(rng.random() < p)}))
        published += out.control
        if any(isinstance(e, AdapterRolledBack) for e in out.control):
            break
    alarm = next(e for e in published if isinstance(e, DriftAlarm))
    assert alarm.signal == "reward:base" and published.index(alarm) < len(published) - 1
    assert 300 <= i < 600, "ended by the alarm, after the shift"
    rolled_back = published[-1]
    assert isinstance(rolled_back, AdapterRolledBack) and rolled_back.adapter == "code-v1"
    assert rolled_back.reason.startswith("drift: reward:base moved during the test")
    assert state.router.arms == ("base",) and not state.lifecycle.experiments and "code-v1" in state.lifecycle.ended


def test_after_the_champions_reward_drifts_the_base_model_is_tested_against_it_again():
    rng = np.random.default_rng(4)
    state = LearnerState(LearnerSettings(initial_arms=["base"], ab_min_samples=40, ab_tau=0.2, floor=0.2))
    state.apply_control(loaded("code-v1"))
    state.apply_control(AdapterPromoted(event_id="promote-code-v1", occurred_at=T0, source="ops", adapter="code-v1"))
    assert state.router.arms == ("code-v1",) and "base" in state.lifecycle.ended
    published, i = [], 0
    while not any(isinstance(e, DriftAlarm) for e in published):  # the users change their minds about it
        p = 0.9 if i < 300 else 0.1
        published += state.learn_one(example(i, "code-v1", CODE, {"explicit": float(rng.random() < p)})).control
        i += 1
        assert i < 900, "no drift alarm"
    assert i > 300
    # The base model is a canary again, under test against the champion, its old rewards forgotten.
    assert state.router.arms == ("code-v1", "base") and state.router.caps["base"] == state.config.canary_share
    assert state.lifecycle.experiments["base"].champion == "code-v1" and "base" not in state.lifecycle.ended
    for j in range(i, i + 600):  # now the base model suits them better than the champion does
        arm = ("code-v1", "base")[j % 2]
        p = 0.1 if arm == "code-v1" else 0.6
        published += state.learn_one(example(j, arm, CODE, {"explicit": float(rng.random() < p)})).control
        if state.lifecycle.champion == "base":
            break
    promoted = published[-1]
    assert isinstance(promoted, AdapterPromoted) and promoted.adapter == "base"
    assert promoted.previous_champion == "code-v1"
    assert state.router.arms == ("base",) and "code-v1" in state.lifecycle.ended


def test_a_second_reward_alarm_restarts_the_base_models_test_instead_of_ending_it():
    rng = np.random.default_rng(5)
    state = LearnerState(LearnerSettings(initial_arms=["base"], ab_min_samples=10_000, ab_max_samples=None))  # no verdict
    state.apply_control(loaded("code-v1"))
    state.apply_control(AdapterPromoted(event_id="promote-code-v1", occurred_at=T0, source="ops", adapter="code-v1"))
    published, alarms = [], 0
    for i in range(3000):
        arm = "code-v1" if i < 300 or i % 2 else "base"
        p = 0.9 if i < 300 or i >= 1500 else 0.1  # the users change their minds twice
        published += state.learn_one(example(i, arm, CODE, {"explicit": float(rng.random() < p)})).control
        alarms = sum(isinstance(e, DriftAlarm) for e in published)
        if alarms == 1 and "base" in state.lifecycle.experiments:
            first_test = state.lifecycle.experiments["base"]
        if alarms == 2:
            break
    assert alarms == 2, "two drift alarms"
    assert not any(isinstance(e, AdapterRolledBack) for e in published), "the base model's test is not ended"
    assert state.router.arms == ("code-v1", "base") and state.lifecycle.experiments["base"] is not first_test
    fresh = state.lifecycle.experiments["base"].decision()
    assert fresh.n_champion + fresh.n_challenger <= 1  # at most the example that raised the alarm


def test_an_experiment_without_a_verdict_ends_and_the_champion_stays():
    rng = np.random.default_rng(4)
    state = LearnerState(LearnerSettings(initial_arms=["base"], ab_min_samples=30, ab_max_samples=120))
    state.apply_control(loaded("code-v1"))
    published = []
    for i in range(400):
        arm = ("base", "code-v1")[i % 2]
        out = state.learn_one(example(i, arm, CODE, {"explicit": float(rng.random() < 0.5)}))
        published += [e for e in out.control if not isinstance(e, DriftAlarm)]
    (event,) = published
    assert isinstance(event, AdapterRolledBack) and "no significant lift over base after 120" in event.reason
    assert state.router.arms == ("base",) and state.lifecycle.champion == "base" and not state.lifecycle.experiments


@pytest.mark.parametrize("challenger_reward, verdict", [(0.9, AdapterPromoted), (0.1, AdapterRolledBack)])
def test_an_ab_verdict_is_published_once_and_applied(challenger_reward, verdict):
    rng = np.random.default_rng(0)
    state = LearnerState(LearnerSettings(initial_arms=["base"], ab_min_samples=50))
    state.apply_control(loaded("code-v1"))
    published = []
    for i in range(2000):
        arm = ("base", "code-v1")[i % 2]
        p = challenger_reward if arm == "code-v1" else 0.5
        out = state.learn_one(example(i, arm, CODE, {"explicit": float(rng.random() < p)}))
        published += [e for e in out.control if not isinstance(e, DriftAlarm)]
    assert [type(e) for e in published] == [verdict]
    event = published[0]
    assert event.adapter == "code-v1" and event.source == "learners"
    assert event.evidence["n_challenger"] >= 50
    assert not state.lifecycle.experiments
    if verdict is AdapterPromoted:
        assert event.previous_champion == "base" and event.evidence["lower"] > 0
        assert state.lifecycle.champion == "code-v1" and state.router.arms == ("code-v1",)
    else:
        assert event.evidence["upper"] < 0 and state.router.arms == ("base",)
    # The verdict comes back on the control topic: a no-op.
    version = state.version
    state.handle(CONTROL.name, 0, 0, event.model_dump_json().encode())
    assert state.version == version
    assert CONTROL_EVENT_ADAPTER.validate_json(event.model_dump_json()) == event


# --- drift and review -------------------------------------------------------------------------------


def test_drift_in_the_context_mix_and_in_an_arms_reward_raises_control_events():
    rng = np.random.default_rng(1)
    state = LearnerState(LearnerSettings(initial_arms=["base"]))
    alarms = []
    for i in range(1200):
        context = CODE if i < 600 or i % 2 else CHAT  # chat traffic appears at 600
        p = 0.8 if i < 600 else 0.2  # and base's answers get worse
        alarms += [e for e in state.learn_one(example(i, "base", context, {"explicit": float(rng.random() < p)})).control]
    signals = {a.signal for a in alarms}
    assert {"feature:domain=code", "reward:base"} <= signals, signals
    reward = next(a for a in alarms if a.signal == "reward:base")
    assert reward.detector == "ADWIN" and reward.details["mean_before"] > 0.6 > 0.4 > reward.details["mean_after"]
    assert reward.detected_at >= T0 + timedelta(seconds=20 * 600)
    assert len({a.event_id for a in alarms}) == len(alarms)
    assert all(CONTROL_EVENT_ADAPTER.validate_json(a.model_dump_json()) == a for a in alarms)


def test_review_picks_stay_within_the_hourly_budget_and_skip_users_who_opted_out():
    state = LearnerState(LearnerSettings(review_budget_per_hour=4))
    picks = []
    for i in range(3 * 180):  # three hours, one example every 20 s; every 7th one disagrees
        implicit = 0.0 if i % 7 == 0 else 1.0
        out = state.learn_one(example(i, "base", CODE, {"explicit": 1.0, "implicit": implicit}, consent=i % 5 != 0))
        picks += out.reviews
    per_hour = {}
    for pick in picks:
        hour = int(pick.example.occurred_at.timestamp() // 3600)
        per_hour[hour] = per_hour.get(hour, 0) + 1
    # A cap, not a quota: the second hour's scores run below the first's (rarity falls), so
    # it may select fewer; the third takes its threshold from the second.
    assert max(per_hour.values()) == 4 and len(picks) >= 8
    assert all(pick.example.training_consent for pick in picks)
    later = [p for p in picks if p.example.occurred_at >= T0 + timedelta(hours=1)]
    assert all(p.example.rewards["implicit"] == 0.0 for p in later), "after the first hour: the disagreeing ones"
    # Why each was picked, for the reviewer: the score's terms, and the threshold it reached.
    assert all(p.score == sum(p.terms.values()) and p.score >= p.threshold for p in picks)
    # Disagreement weighted by trust: explicit is trusted more than implicit, so less than 0.5 x 1.
    assert all(0.25 < p.terms["disagreement"] < 0.5 for p in later), [p.terms for p in later]


# --- the snapshot the gateway routes with ----------------------------------------------------------


async def test_the_learner_checkpoints_publishes_snapshots_and_restores(tmp_path, sessions, environment):
    archive = ObjectStore(tmp_path.as_uri())
    learner = LiveLearner(CONFIG, sessions, objects=archive, consumer="learners", cluster_id="c1",
                          snapshots_kept=3)  # fmt: skip
    await learner.save()  # a (re)started learner publishes what it holds
    stream = records(environment)
    for chunk in range(0, len(stream), 100):
        for record in stream[chunk : chunk + 100]:
            learner.handle(*record)
        await learner.save()
    await learner.save()  # nothing changed: nothing written
    with sessions() as session:
        rows = session.scalars(select(RouterSnapshot).order_by(RouterSnapshot.id)).all()
        total = session.scalar(select(func.max(RouterSnapshot.id)))
    assert len(rows) == 3 and total == 1 + -(-len(stream) // 100), "older snapshots are pruned"
    assert rows[-1].version == learner.state.version and rows[-1].state == learner.state.snapshot().data
    assert rows[-1].arms == ["general", "coder", "mathy"]

    again = LiveLearner(CONFIG, sessions, objects=archive, consumer="learners", cluster_id="c1", snapshots_kept=3)
    assert again.state.snapshot() == learner.state.snapshot()
    assert again.handle(*stream[-1]) is None, "a redelivered record is skipped"
    other_broker = LiveLearner(CONFIG, sessions, objects=archive, consumer="learners", cluster_id="c2",
                               snapshots_kept=3)  # fmt: skip
    assert other_broker.state.positions == {} and other_broker.state.version == learner.state.version


async def test_the_gateway_router_starts_cold_and_picks_up_newer_snapshots(tmp_path, sessions, environment):
    archive = ObjectStore(tmp_path.as_uri())
    routing = RoutingService(LearnerSettings(initial_arms=["general"], route_seed=1), sessions)
    context = Context(domain="code", cohort="a")
    cold = routing.decide(context, "app-a")
    assert cold.adapter == "general" and cold.probabilities == {"general": 1.0} and cold.snapshot_version == 0
    assert routing.refresh() is False  # no snapshot yet

    learner = LiveLearner(CONFIG.model_copy(update={"ab_min_samples": 10_000, "ab_max_samples": None}), sessions,
                          objects=archive, consumer="learners", cluster_id="c1", snapshots_kept=3)  # fmt: skip
    for record in records(environment, n=2000):
        learner.handle(*record)
    await learner.save()
    assert routing.refresh() is True and routing.refresh() is False
    decisions = [routing.decide(context, "app-a") for _ in range(300)]
    expected = learner.state.router.probabilities(route_features(context, "app-a"))
    assert all(d.probabilities == expected and d.propensity == expected[d.adapter] for d in decisions)
    assert all(d.snapshot_version == learner.state.version for d in decisions)
    share = sum(d.adapter == "coder" for d in decisions) / len(decisions)
    assert abs(share - expected["coder"]) < 0.1
    assert len({d.decision_id for d in decisions}) == len(decisions)

    # A snapshot in a format this gateway refuses (an older learner's, during an upgrade): the
    # gateway keeps the router it has, and takes the next one it can read.
    with sessions() as session, session.begin():
        newest = session.scalar(select(RouterSnapshot).order_by(RouterSnapshot.id.desc()).limit(1))
        session.add(RouterSnapshot(learner=newest.learner, version=newest.version + 1, examples=newest.examples,
                                   arms=newest.arms, state=newest.state.replace(b'"format": 2', b'"format": 1', 1)))  # fmt: skip
    assert routing.refresh() is False and routing.refresh() is False
    assert routing.decide(context, "app-a").probabilities == expected
    for record in records(environment, n=2100)[2000:]:
        learner.handle(*record)
    await learner.save()
    assert routing.refresh() is True and routing.decide(context, "app-a").snapshot_version == learner.state.version


class _NoBroker:
    """A publisher that fails the test if routing ever goes near the broker."""

    async def publish(self, *args, **kwargs):
        raise AssertionError("POST /v1/route touched the broker")


async def test_route_endpoint_answers_from_memory_and_checks_the_key(tmp_path, sessions, environment):
    archive = ObjectStore(tmp_path.as_uri())
    url = str(sessions.kw["bind"].url)
    learner = LiveLearner(CONFIG, sessions, objects=archive, consumer="learners", cluster_id="c1",
                          snapshots_kept=3)  # fmt: skip
    for record in records(environment, n=300):
        learner.handle(*record)
    await learner.save()
    settings = Settings(database_url=url, data_dir=tmp_path, embedded_broker_port=1,  # nothing listens there
                        api_keys={"app-a": SecretStr("key-a-0123456789")})  # fmt: skip
    auth = {"Authorization": "Bearer key-a-0123456789"}
    app = create_app(settings, publisher=_NoBroker())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        answer = await client.post("/v1/route", json={"context": {"domain": "math", "cohort": "b"}}, headers=auth)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert set(body["probabilities"]) == {"general", "coder", "mathy"}
        assert body["propensity"] == body["probabilities"][body["adapter"]]
        assert body["snapshot_version"] == learner.state.version
        assert (await client.post("/v1/route", json={"context": {}})).status_code == 401
        mismatch = await client.post("/v1/route", json={"context": {}, "app_id": "app-b"}, headers=auth)
        assert mismatch.status_code == 422 and mismatch.json()["reason"] == "app_id_mismatch"
        bad = await client.post("/v1/route", json={"context": {"domain": 3}}, headers=auth)
        assert bad.status_code == 422 and bad.json()["reason"] == "invalid_request"


@pytest.mark.parametrize("value, reason", [
    (b"\xff\xfe not json", "invalid_json"),
    (b"[" * 5000 + b"]" * 5000, "too_deeply_nested"),
    (b'{"type": "nonsense"}', None),
    (b"", "invalid_json"),
])  # fmt: skip
def test_a_record_the_learner_cannot_read_becomes_a_dead_letter_and_learning_goes_on(environment, value, reason):
    stream = records(environment)
    state = LearnerState(CONFIG)
    run(state, stream[:100])
    for topic in (EXAMPLES.name, CONTROL.name):
        out = state.handle(topic, 99, 0, value, timestamp_s=1_700_000_000.0)  # a partition of its own
        (dead,) = out.dead_letters
        assert dead.stage == "learner" and dead.dead_letter_id == f"learner-{topic}-99-0"
        assert reason is None or dead.reason == reason
        assert dead.received_at.timestamp() == 1_700_000_000.0 and out.control == [] and out.reviews == []
    whole = LearnerState(CONFIG)
    run(whole, stream)
    run(state, stream[100:])
    assert state.snapshot() == whole.snapshot(), "the bad records changed nothing else"
