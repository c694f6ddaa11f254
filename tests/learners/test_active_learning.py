import pickle
from collections import Counter

import numpy as np
import pytest

from learners.active_learning import ReviewCandidate, ReviewSelector, disagreement

HOUR = 3600.0


def stream(rng, hours, per_hour, disagree_share=0.1, lateness=0.0):
    """Candidates over ``hours`` hours, ``per_hour[h]`` in hour h, a ``disagree_share`` of them
    with explicit and implicit rewards at odds; timestamps jitter back by up to ``lateness``."""
    candidates = []
    for hour in range(hours):
        n = per_hour[hour]
        times = np.sort(hour * HOUR + rng.uniform(0, HOUR, n)) - rng.uniform(0, lateness, n)
        disagree = rng.random(n) < disagree_share
        cohorts = rng.choice(["a", "b", "c"], size=n, p=[0.6, 0.3, 0.1])
        for t, d, c in zip(times, disagree, cohorts):
            rewards = {"explicit": 1.0, "implicit": 0.0 if d else 1.0, "self_eval": 0.9}
            candidates.append(ReviewCandidate(float(t), str(c), rewards, 0.8))
    return candidates


def test_hourly_budget_is_never_exceeded_and_is_used():
    rng = np.random.default_rng(0)
    per_hour = [50, 3_000, 200, 0, 1_500, 1_500, 10, 2_000]
    candidates = stream(rng, len(per_hour), per_hour, lateness=120.0)
    selector = ReviewSelector(budget_per_hour=25)
    selected = Counter(int(c.timestamp // HOUR) for c in candidates if selector.learn_one(c))
    print(f"\nselected per hour {dict(sorted(selected.items()))}")
    assert max(selected.values()) <= 25
    # Hours with more traffic than budget (and a busy hour before them) spend most of it.
    assert all(selected[h] >= 20 for h in (1, 5, 7))


def test_disagreeing_examples_are_chosen_over_agreeing_ones():
    rng = np.random.default_rng(1)
    candidates = stream(rng, 6, [1_000] * 6, disagree_share=0.1)
    selector = ReviewSelector(budget_per_hour=50)
    picked = [c for c in candidates if selector.learn_one(c)]
    after_first_hour = [c for c in picked if c.timestamp >= HOUR]
    disagreeing = np.mean([c.rewards["implicit"] == 0.0 for c in after_first_hour])
    print(
        f"\nshare of disagreeing examples among those selected after hour 0: {disagreeing:.2f} "
        f"(base rate 0.10)"
    )
    assert len(after_first_hour) >= 0.8 * 5 * 50  # the budget is a cap, but mostly used
    assert disagreeing >= 0.9


def test_score_rises_with_disagreement_doubt_and_rarity():
    selector = ReviewSelector(budget_per_hour=10)
    base = ReviewCandidate(0.0, "common", {"explicit": 1.0, "implicit": 1.0}, 0.9)
    for _ in range(100):
        selector.learn_one(base)
    doubtful = ReviewCandidate(0.0, "common", {"explicit": 1.0, "implicit": 1.0}, 0.2)
    disagreeing = ReviewCandidate(0.0, "common", {"explicit": 1.0, "implicit": 0.4}, 0.9)
    rare = ReviewCandidate(0.0, "rare", {"explicit": 1.0, "implicit": 1.0}, 0.9)
    assert selector.score(doubtful) > selector.score(base)
    assert selector.score(disagreeing) > selector.score(base)
    assert selector.score(rare) > selector.score(base)
    assert selector.score(ReviewCandidate(0.0, "common", {"explicit": 1.0})) < selector.score(base)


def test_late_examples_are_not_selected_and_replay_is_deterministic():
    rng = np.random.default_rng(2)
    candidates = stream(rng, 4, [400] * 4)
    selector = ReviewSelector(budget_per_hour=20)
    first = [selector.learn_one(c) for c in candidates[:900]]
    restored = pickle.loads(pickle.dumps(selector))
    rest = candidates[900:]
    assert [selector.learn_one(c) for c in rest] == [restored.learn_one(c) for c in rest]

    replay = ReviewSelector(budget_per_hour=20)
    assert [replay.learn_one(c) for c in candidates[:900]] == first
    late = ReviewCandidate(0.0, "new", {"explicit": 1.0, "implicit": 0.0}, 0.0)
    assert replay.score(late) == pytest.approx(1.0)
    assert replay.learn_one(late) is False  # hour 0 is closed


def test_a_compressed_hour_selects_as_a_real_one_does_and_old_states_keep_an_hour():
    """The same stream with every time divided by 120 picks the same examples under hour_s=30."""
    rng = np.random.default_rng(3)
    candidates = stream(rng, 6, [400] * 6)
    hourly = ReviewSelector(budget_per_hour=10)
    compressed = ReviewSelector(budget_per_hour=10, hour_s=HOUR / 120)
    picks = [hourly.learn_one(c) for c in candidates]
    fast = [compressed.learn_one(ReviewCandidate(c.timestamp / 120, c.cohort, c.rewards, c.judge_confidence))
            for c in candidates]  # fmt: skip
    assert picks == fast and 30 <= sum(picks) <= 60  # a cap of 10 an hour, mostly spent
    old = pickle.loads(pickle.dumps(hourly))
    del old.__dict__["hour_s"]  # as a selector pickled before hour_s existed
    assert old.hour_s == HOUR


def test_a_distrusted_channel_at_odds_draws_less_attention_than_trusted_ones():
    """A biased judge that disagrees on every answer it grades must not take the budget from
    the examples where the channels the loss weights trust disagree with each other."""
    weights = {"explicit": 0.6, "implicit": 0.3, "self_eval": 0.1}
    selector = ReviewSelector(budget_per_hour=1, rarity_weight=0.0)
    judge_at_odds = ReviewCandidate(0.0, "a", {"explicit": 1.0, "self_eval": 0.0}, weights=weights)
    users_at_odds = ReviewCandidate(0.0, "a", {"explicit": 1.0, "implicit": 0.0}, weights=weights)
    assert selector.score(users_at_odds) > 1.5 * selector.score(judge_at_odds) > 0
    # Without weights (or alike), two channels at odds count fully, as max - min did.
    assert selector.score(ReviewCandidate(0.0, "a", {"explicit": 1.0, "self_eval": 0.0})) == 0.5
    assert disagreement({"explicit": 0.7}) == 0.0 and disagreement({"explicit": 1.0, "implicit": 1.0}, weights) == 0.0
