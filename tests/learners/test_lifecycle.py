"""The adapter lifecycle (streams/lifecycle.py) on its own: transitions, what they report, verdicts."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from streams.config import LearnerSettings
from streams.contract import AdapterState, BatchEmitted
from streams.lifecycle import PROMOTE, RESTARTED, ROLLBACK, Lifecycle

CONFIG = LearnerSettings(initial_arms=["base"], ab_min_samples=20, ab_max_samples=None)


def roles(life: Lifecycle) -> tuple:
    return life.champion, tuple(life.live), {c: t.champion for c, t in life.experiments.items()}, dict(life.ended)


def test_loading_starts_a_test_against_the_champion_once():
    life = Lifecycle(CONFIG)
    joined = life.load("code-v1")
    assert joined and joined.joined == ["code-v1"] and [t.challenger for t in joined.started] == ["code-v1"]
    assert life.state_of("code-v1") == AdapterState.CHALLENGER and life.state_of("base") == AdapterState.CHAMPION
    before = roles(life)
    test = life.experiments["code-v1"]
    assert not life.load("code-v1"), "replicas reloaded: nothing changes"
    assert roles(life) == before and life.experiments["code-v1"] is test
    assert life.state_of("never-seen") is None


@pytest.mark.parametrize("loaded_first", [True, False])
def test_a_rolled_back_adapter_never_comes_back(loaded_first):
    life = Lifecycle(CONFIG)
    if loaded_first:
        life.load("code-v1")
    rolled = life.roll_back("code-v1", "operator: off tone")
    # Rolled back before it was ever served: nothing to undo, but it is remembered.
    assert bool(rolled) is loaded_first and rolled.left == (["code-v1"] if loaded_first else [])
    assert life.ended == {"code-v1": AdapterState.ROLLED_BACK}
    assert not life.load("code-v1"), "the swap controller announcing it again after a restart"
    assert life.live == ["base"] and not life.experiments


def test_a_promotion_retires_the_champion_and_restarts_the_other_tests_in_their_order():
    life = Lifecycle(CONFIG)
    for name in ("a-v1", "b-v1", "c-v1"):
        life.load(name)
    old = dict(life.experiments)
    promoted = life.promote("b-v1")
    assert (promoted.promoted, promoted.retired, promoted.left) == ("b-v1", "base", ["base"])
    assert [(t.challenger, how) for t, how in promoted.ended] == [("b-v1", PROMOTE), ("a-v1", RESTARTED),
                                                                   ("c-v1", RESTARTED)]  # fmt: skip
    # In place: which of two verdicts on one reward comes first depends on this order.
    assert list(life.experiments) == ["a-v1", "c-v1"] and promoted.started == list(life.experiments.values())
    assert all(t.champion == "b-v1" and t is not old[c] for c, t in life.experiments.items())
    assert life.state_of("base") == AdapterState.RETIRED and life.live == ["a-v1", "b-v1", "c-v1"]
    assert not life.promote("b-v1"), "the verdict coming back on the control topic"
    refused = life.promote("base")
    assert not refused and "not live" in refused.refused


def test_the_last_arm_is_kept_and_a_champion_rolled_back_leaves_the_oldest_live_arm_champion():
    life = Lifecycle(LearnerSettings(initial_arms=["base", "chat-v1"]))
    life.load("code-v1")
    rolled = life.roll_back("base", "operator: broken")
    assert rolled.left == ["base"] and life.champion == "chat-v1"
    assert life.experiments["code-v1"].champion == "chat-v1"
    assert life.state_of("base") == AdapterState.ROLLED_BACK
    life.roll_back("code-v1", "operator: broken")
    kept = life.roll_back("chat-v1", "operator: broken")
    assert not kept and "last arm" in kept.refused and life.live == ["chat-v1"]


def test_other_events_change_nothing():
    life = Lifecycle(CONFIG)
    before = roles(life)
    event = BatchEmitted(event_id="batch-event-1", occurred_at=datetime(2026, 1, 1, tzinfo=timezone.utc),
                         source="curator", batch_id="b1", path="b1", manifest_sha256="0" * 64, example_count=1,
                         trigger="size")  # fmt: skip
    assert not life.apply(event) and roles(life) == before


@pytest.mark.parametrize("challenger_reward, verdict", [(1.0, "promote"), (0.0, "rollback")])
def test_a_verdict_is_applied_at_once(challenger_reward, verdict):
    life = Lifecycle(CONFIG.model_copy(update={"initial_arms": ["base", "chat-v1"]}))
    life.load("code-v1")
    outcomes, i = [], 0
    while not outcomes or outcomes[-1].decision.verdict == "continue":
        arm = ("base", "code-v1")[i % 2]
        reward = challenger_reward if arm == "code-v1" else float(i % 4 < 2)
        (outcome,) = life.observe(arm, reward, 0.5, cohort="a")
        outcomes.append(outcome)
        i += 1
        assert i < 1000, "no verdict"
    assert all(not o.transition for o in outcomes[:-1]), "no change while the test continues"
    last = outcomes[-1]
    assert last.decision.verdict == verdict and not life.experiments
    if verdict == "promote":
        assert last.transition.promoted == "code-v1" and life.champion == "code-v1"
        assert life.live == ["chat-v1", "code-v1"] and life.ended == {"base": AdapterState.RETIRED}
    else:
        assert last.transition.rolled_back == {"code-v1": "ab_test: challenger worse than base overall"}
        assert life.live == ["base", "chat-v1"] and life.ended == {"code-v1": AdapterState.ROLLED_BACK}
    life.load("math-v1")
    assert life.observe("base" if verdict == "promote" else "code-v1", 1.0, 0.5) == [], "late feedback reaches no test"
    assert life.experiments["math-v1"].decision().n_champion == 0


def test_a_test_takes_only_requests_the_router_chose_with_both_variants_possible():
    life = Lifecycle(CONFIG)
    life.load("code-v1")
    test = life.experiments["code-v1"]
    assert life.observe("base", 1.0, None) == [], "the client named the adapter: no experiment"
    # Decided before code-v1 went live, its feedback after: it must not count for base alone.
    assert life.observe("base", 1.0, 1.0, {"base": 1.0}) == []
    assert life.observe("base", 1.0, 0.9, {"base": 0.9, "code-v1": 0.0}) == []
    (outcome,) = life.observe("base", 1.0, 0.9, {"base": 0.9, "code-v1": 0.1})
    assert outcome.test is test and test.decision().n_champion == 1


def test_an_inconclusive_test_rolls_the_challenger_back_and_says_so():
    life = Lifecycle(CONFIG.model_copy(update={"ab_max_samples": 20}))
    life.load("code-v1")
    for i in range(40):
        outcomes = life.observe(("base", "code-v1")[i % 2], float(i % 4 < 2), 0.5)
    (last,) = outcomes
    assert last.decision.verdict == "inconclusive"
    assert last.transition.rolled_back == {"code-v1": "ab_test: no significant lift over base after 20 rewards each"}
    assert life.champion == "base" and life.live == ["base"]


def test_two_verdicts_on_one_reward_promote_only_the_first():
    life = Lifecycle(CONFIG)
    life.load("b-v1")
    life.load("c-v1")
    i = 0
    while life.champion == "base":
        # Each challenger's requests were split with base alone, so each test sees the same
        # sequence, and both are ready on the same reward of base's.
        for arm in ("b-v1", "c-v1"):
            life.observe(arm, float(i % 10 != 0), 0.5, {"base": 0.5, arm: 0.5})
        outcomes = life.observe("base", float(i % 10 < 2), 0.5, {"base": 0.5, "b-v1": 0.25, "c-v1": 0.25})
        i += 1
        assert i < 500, "no verdict"
    # Both tests were ready on this reward of base's; the promotion replaced c-v1's.
    (outcome,) = outcomes
    assert outcome.transition.promoted == "b-v1"
    assert life.experiments["c-v1"].champion == "b-v1" and life.experiments["c-v1"].decision().n_champion == 0


def test_preferences_moving_ends_the_tests_and_brings_the_base_model_back_then_restarts_its_test():
    life = Lifecycle(CONFIG)
    life.load("code-v1")
    life.promote("code-v1")
    life.load("chat-v1")
    moved = life.preferences_moved("reward:code-v1")
    reason = "drift: reward:code-v1 moved during the test; the challenger learned from feedback before it"
    assert moved.rolled_back == {"chat-v1": reason} and moved.left == ["chat-v1"] and moved.joined == ["base"]
    assert roles(life) == ("code-v1", ("code-v1", "base"), {"base": "code-v1"},
                           {"chat-v1": AdapterState.ROLLED_BACK})  # fmt: skip
    first = life.experiments["base"]
    life.observe("base", 1.0, 0.5)
    life.load("math-v1")
    again = life.preferences_moved("reward:code-v1")
    # The base model's test is the one that asks what the new preferences say: it starts afresh.
    assert [(t.challenger, how) for t, how in again.ended] == [("base", RESTARTED), ("math-v1", ROLLBACK)]
    assert life.experiments["base"] is not first and life.experiments["base"].decision().n_challenger == 0
    assert life.live == ["code-v1", "base"] and not again.joined
