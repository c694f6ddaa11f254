import pickle
import random

import numpy as np
import pytest

from learners.ab_test import ABTest, lift_bounds, split_alpha

ALPHA, MIN_SAMPLES, TAU = 0.05, 200, 0.05
CONTINUE, PROMOTE, ROLLBACK = 0, 1, 2
VERDICTS = {"continue": CONTINUE, "promote": PROMOTE, "rollback": ROLLBACK}


def simulate(rng, runs, events, p_champion, p_challenger, cohort_probs):
    """Simulated experiments: a fair coin picks the variant, a categorical draw the cohort.
    ``p_champion`` / ``p_challenger`` give each cohort's success probability."""
    cohort = rng.choice(len(cohort_probs), size=(runs, events), p=cohort_probs)
    challenger = rng.random((runs, events)) < 0.5
    p = np.where(challenger, np.asarray(p_challenger)[cohort], np.asarray(p_champion)[cohort])
    reward = (rng.random((runs, events)) < p).astype(float)
    return challenger, cohort, reward


def running_bounds(in_a, in_b, reward, alpha):
    """Running intersection of ``lift_bounds`` after every event, as ``ABTest`` keeps it."""
    n_a, n_b = in_a.cumsum(axis=1), in_b.cumsum(axis=1)
    sum_a, sum_b = (in_a * reward).cumsum(axis=1), (in_b * reward).cumsum(axis=1)
    sumsq_a, sumsq_b = (in_a * reward**2).cumsum(axis=1), (in_b * reward**2).cumsum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        _, lower, upper = lift_bounds(n_a, sum_a, sumsq_a, n_b, sum_b, sumsq_b, alpha, TAU)
    started = (n_a >= MIN_SAMPLES) & (n_b >= MIN_SAMPLES)
    lower = np.maximum.accumulate(np.where(started, lower, -np.inf), axis=1)
    upper = np.minimum.accumulate(np.where(started, upper, np.inf), axis=1)
    return lower, upper


def verdicts(challenger, cohort, reward, n_cohorts):
    """The verdict after every event of every run (the rule of ``ABTest.decision``)."""
    champion = ~challenger
    lower, upper = running_bounds(champion, challenger, reward, split_alpha(ALPHA))
    first_seen = np.stack([np.argmax(cohort == c, axis=1) for c in range(n_cohorts)], axis=1)
    rank = first_seen.argsort(axis=1).argsort(axis=1) + 1
    harmed = np.zeros(reward.shape, dtype=bool)
    for c in range(n_cohorts):
        here = cohort == c
        alpha = split_alpha(ALPHA, rank[:, c])[:, None]
        _, cohort_upper = running_bounds(champion & here, challenger & here, reward, alpha)
        harmed |= cohort_upper < 0
    rollback = (upper < 0) | harmed
    return np.where(rollback, ROLLBACK, np.where(lower > 0, PROMOTE, CONTINUE))


def first_verdicts(seed, runs, events, p_champion, p_challenger, cohort_probs, chunk=100):
    """First verdict other than continue of each run and the event count it took (0 if none)."""
    rng = np.random.default_rng(seed)
    found, when = [], []
    for start in range(0, runs, chunk):
        sim = simulate(
            rng, min(chunk, runs - start), events, p_champion, p_challenger, cohort_probs
        )
        v = verdicts(*sim, len(cohort_probs))
        stopped = v != CONTINUE
        first = np.argmax(stopped, axis=1)
        found.append(np.where(stopped.any(axis=1), v[np.arange(len(v)), first], CONTINUE))
        when.append(np.where(stopped.any(axis=1), first + 1, 0))
    return np.concatenate(found), np.concatenate(when)


COHORTS = (0.5, 0.3, 0.2)


def test_class_matches_vectorized_verdicts_event_by_event():
    rng = np.random.default_rng(5)
    # Two runs with a plain lift, two where cohort 2 is harmed: promote, rollback, the guard.
    lift = simulate(rng, 2, 4_000, (0.5,) * 3, (0.6,) * 3, COHORTS)
    harm = simulate(rng, 2, 4_000, (0.5, 0.5, 0.6), (0.6, 0.6, 0.3), COHORTS)
    challenger, cohort, reward = (np.concatenate(pair) for pair in zip(lift, harm))
    expected = verdicts(challenger, cohort, reward, len(COHORTS))
    for run in range(4):
        test = ABTest("champion", "challenger", ALPHA, MIN_SAMPLES, TAU)
        seen = []
        for b, c, r in zip(challenger[run], cohort[run], reward[run]):
            test.update("challenger" if b else "champion", float(r), cohort=f"c{c}")
            seen.append(VERDICTS[test.decision().verdict])
        np.testing.assert_array_equal(seen, expected[run])
    assert {PROMOTE, ROLLBACK} <= set(np.unique(expected))


def test_aa_false_decision_rate_is_at_most_alpha():
    found, _ = first_verdicts(
        seed=1,
        runs=1_000,
        events=5_000,
        p_champion=(0.5,) * 3,
        p_challenger=(0.5,) * 3,
        cohort_probs=COHORTS,
    )
    false_rate = np.mean(found != CONTINUE)
    print(
        f"\nA/A: false promote-or-rollback rate {false_rate:.3f} over 1000 runs x 5000 events "
        f"(promote {np.mean(found == PROMOTE):.3f}, rollback {np.mean(found == ROLLBACK):.3f})"
    )
    assert false_rate <= ALPHA


def test_ab_five_point_lift_is_promoted():
    found, when = first_verdicts(
        seed=2,
        runs=200,
        events=20_000,
        p_champion=(0.50,) * 3,
        p_challenger=(0.55,) * 3,
        cohort_probs=COHORTS,
        chunk=50,
    )
    promoted = found == PROMOTE
    median = float(np.median(when[promoted]))
    print(
        f"\nA/B 0.50 vs 0.55: promoted {promoted.mean():.2f} of 200 runs within 20000 events, "
        f"rolled back {np.mean(found == ROLLBACK):.3f}, median events to promote {median:.0f}"
    )
    assert promoted.mean() >= 0.8
    assert np.mean(found == ROLLBACK) <= ALPHA
    assert np.isfinite(median)


def test_cohort_guard_rolls_back_a_challenger_that_harms_one_cohort():
    # Better by 10 points in two cohorts, worse by 30 in the third: overall lift +2 points.
    p_champion, p_challenger = (0.5, 0.5, 0.6), (0.6, 0.6, 0.3)
    found, _ = first_verdicts(
        seed=3,
        runs=200,
        events=10_000,
        p_champion=p_champion,
        p_challenger=p_challenger,
        cohort_probs=COHORTS,
        chunk=50,
    )
    print(
        f"\ncohort guard: rollback {np.mean(found == ROLLBACK):.2f}, "
        f"promote {np.mean(found == PROMOTE):.2f}"
    )
    assert np.mean(found == ROLLBACK) >= 0.8

    rng = np.random.default_rng(4)
    challenger, cohort, reward = simulate(rng, 1, 10_000, p_champion, p_challenger, COHORTS)
    test = ABTest("champion", "challenger")
    for b, c, r in zip(challenger[0], cohort[0], reward[0]):
        test.update("challenger" if b else "champion", float(r), cohort="abc"[c])
        if test.decision().verdict != "continue":
            break
    decision = test.decision()
    assert decision.verdict == "rollback"
    assert decision.harmed_cohorts == ("c",)
    assert decision.upper > 0  # the overall lift alone would not have rolled back


def test_no_decision_before_minimum_samples():
    test = ABTest("a", "b", min_samples=50)
    for _ in range(49):
        test.update("a", 0.0)
        test.update("b", 1.0)
    assert test.decision().verdict == "continue"
    test.update("a", 0.0)
    assert test.decision().verdict == "continue"
    test.update("b", 1.0)
    decision = test.decision()
    assert (decision.verdict, decision.n_champion, decision.n_challenger) == ("promote", 50, 50)
    assert 0 < decision.lower < decision.lift == 1.0 < decision.upper


def test_a_test_without_a_verdict_ends_inconclusive_at_max_samples():
    rng = random.Random(3)
    test = ABTest("a", "b", min_samples=50, max_samples=300)
    verdicts = []
    for _ in range(300):
        for variant in ("a", "b"):  # no true difference
            test.update(variant, float(rng.random() < 0.5))
        verdicts.append(test.decision().verdict)
    assert set(verdicts[:-1]) == {"continue"} and verdicts[-1] == "inconclusive"
    with pytest.raises(ValueError, match="max_samples"):
        ABTest("a", "b", min_samples=50, max_samples=10)


def test_rejects_unknown_variants_and_rewards_out_of_range():
    test = ABTest("a", "b")
    with pytest.raises(ValueError, match="'c' is neither 'a' nor 'b'"):
        test.update("c", 0.5)
    with pytest.raises(ValueError, match=r"reward 1.5 is outside \[0, 1\]"):
        test.update("a", 1.5)


def test_split_alpha_sums_to_alpha():
    total = split_alpha(ALPHA) + sum(split_alpha(ALPHA, k) for k in range(1, 100_000))
    assert total == pytest.approx(ALPHA, rel=1e-4)
    assert total < ALPHA


def test_state_pickles_mid_experiment():
    rng = np.random.default_rng(6)
    challenger, cohort, reward = simulate(rng, 1, 3_000, (0.5,) * 3, (0.56,) * 3, COHORTS)
    events = [
        ("b" if b else "a", float(r), "xyz"[c])
        for b, c, r in zip(challenger[0], cohort[0], reward[0])
    ]
    test = ABTest("a", "b")
    for event in events[:1_000]:
        test.update(*event)
    restored = pickle.loads(pickle.dumps(test))
    for event in events[1_000:]:
        test.update(*event)
        restored.update(*event)
        assert restored.decision() == test.decision()
