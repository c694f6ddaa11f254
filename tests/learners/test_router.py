import json
import pickle

import numpy as np
import pytest
from river import bandit

from learners.router import FORMAT, LinUCBRouter


def run_router(environment, router, contexts, probabilities, rng):
    """Route every context, learn from a simulated reward; return regret and the decisions."""
    index = {arm: i for i, arm in enumerate(environment.arms)}
    regret, decisions = 0.0, []
    for context, p in zip(contexts, probabilities):
        decision = router.decide(context)
        reward = float(rng.random() < p[index[decision.arm]])
        router.learn_one(decision.arm, context, reward)
        regret += p.max() - p[index[decision.arm]]
        decisions.append(decision)
    return regret, decisions


def test_regret_beats_uniform_and_epsilon_greedy(environment):
    rng = np.random.default_rng(1)
    contexts, probabilities = environment.sample(rng, 20_000)
    router = LinUCBRouter(environment.arms, seed=11)
    regret, decisions = run_router(environment, router, contexts, probabilities, rng)

    uniform_regret = float((probabilities.max(axis=1) - probabilities.mean(axis=1)).sum())

    greedy = bandit.EpsilonGreedy(epsilon=0.1, seed=21)
    greedy_regret = 0.0
    arms = list(environment.arms)
    for p in probabilities:
        arm = greedy.pull(arms)
        i = arms.index(arm)
        greedy.update(arm, float(rng.random() < p[i]))
        greedy_regret += p.max() - p[i]

    print(
        f"\nregret over 20k: LinUCB {regret:.0f}, EpsilonGreedy {greedy_regret:.0f}, "
        f"uniform {uniform_regret:.0f}"
    )
    assert regret < 0.3 * uniform_regret
    assert regret < 0.5 * greedy_regret
    # Every decision was a distribution keeping every arm possible, and propensity = p(chosen arm).
    totals = np.array([sum(d.probabilities.values()) for d in decisions])
    assert np.allclose(totals, 1.0)
    assert min(min(d.probabilities.values()) for d in decisions) >= router.min_propensity - 1e-12
    assert all(d.propensity == d.probabilities[d.arm] for d in decisions)


def test_sampled_arms_follow_the_propensities(environment):
    rng = np.random.default_rng(2)
    contexts, probabilities = environment.sample(rng, 2_000)
    router = LinUCBRouter(environment.arms, floor=0.0, min_propensity=0.1, seed=12)
    run_router(environment, router, contexts, probabilities, rng)

    context = {"domain": "code", "cohort": "a", "locale": "en", "client": "web"}
    expected = router.probabilities(context)
    assert max(expected.values()) == pytest.approx(1 - 0.3 + 0.1)  # not uniform
    n = 20_000
    counts = {arm: 0 for arm in environment.arms}
    for _ in range(n):
        counts[router.decide(context).arm] += 1
    chi_square = sum((counts[a] - n * p) ** 2 / (n * p) for a, p in expected.items())
    assert chi_square < 13.82  # 99.9% quantile of chi-square with 2 degrees of freedom
    assert router.probabilities(context) == expected  # deciding does not learn


def test_pickle_mid_stream_gives_identical_next_decisions(environment):
    rng = np.random.default_rng(3)
    contexts, probabilities = environment.sample(rng, 700)
    router = LinUCBRouter(environment.arms, seed=13)
    run_router(environment, router, contexts[:500], probabilities[:500], rng)

    restored = pickle.loads(pickle.dumps(router))
    state = rng.bit_generator.state
    _, original = run_router(environment, router, contexts[500:], probabilities[500:], rng)
    rng.bit_generator.state = state
    _, replayed = run_router(environment, restored, contexts[500:], probabilities[500:], rng)
    assert original == replayed
    assert len({d.arm for d in original}) > 1  # the RNG was exercised, not a constant choice


def test_add_and_remove_arms():
    router = LinUCBRouter(["base", "code-v1"], floor=0.0, min_propensity=0.05, seed=0)
    context = {"domain": "code", "cohort": "a"}
    for _ in range(100):
        router.learn_one("code-v1", context, 0.9)
        router.learn_one("base", context, 0.2)

    router.add_arm("code-v2", warm_start_from="code-v1")
    router.add_arm("cold")
    x = router.featurizer.transform(context)
    models = router._models
    assert models["code-v2"].predict(x) == pytest.approx(models["code-v1"].predict(x))
    assert models["code-v2"].uncertainty(x) > models["code-v1"].uncertainty(x)
    assert models["cold"].predict(x) == 0.0
    assert set(router.probabilities(context)) == {"base", "code-v1", "code-v2", "cold"}

    router.remove_arm("code-v1")
    assert router.arms == ("base", "code-v2", "cold")
    probabilities = router.probabilities(context)
    assert min(probabilities.values()) == pytest.approx(0.05)
    assert "code-v1" not in {router.decide(context).arm for _ in range(300)}
    router.learn_one("code-v1", context, 1.0)  # late feedback for a retired arm is dropped
    assert router.probabilities(context) == probabilities

    with pytest.raises(ValueError, match="'base' is already live"):
        router.add_arm("base")
    with pytest.raises(KeyError):
        router.remove_arm("code-v1")
    for arm in router.arms:
        router.remove_arm(arm)
    with pytest.raises(ValueError, match="no live arms"):
        router.decide(context)


def test_bytes_restore_the_router_exactly(environment):
    rng = np.random.default_rng(5)
    contexts, probabilities = environment.sample(rng, 600)
    router = LinUCBRouter(environment.arms, seed=3)
    run_router(environment, router, contexts, probabilities, rng)
    router.set_cap("mathy", 0.2)
    data = router.to_bytes()
    first, second = (LinUCBRouter.from_bytes(data, np.random.default_rng(7)) for _ in range(2))
    context = {"domain": "math", "cohort": "b"}
    assert first.arms == router.arms and first.caps == {"mathy": 0.2}
    assert first.probabilities(context) == router.probabilities(context)
    assert [first.decide(context) for _ in range(20)] == [second.decide(context) for _ in range(20)]
    # Every number came across: both go on learning to the same state.
    for copy in (first, router):
        copy.learn_one("coder", context, 1.0)
    assert first.to_bytes() == router.to_bytes() != data
    router.pin("coder")
    assert LinUCBRouter.from_bytes(router.to_bytes(), np.random.default_rng(0)).pinned == "coder"
    with pytest.raises(ValueError, match="format"):
        LinUCBRouter.from_bytes(data.replace(f'"format": {FORMAT}'.encode(), b'"format": 9', 1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="truncated"):
        LinUCBRouter.from_bytes(data[:-8], np.random.default_rng(0))


def test_bytes_written_by_hand_in_format_2_load_and_are_written_back_unchanged():
    # The layout the gateway reads, written out by hand: a sorted JSON header, then per arm
    # A^-1 (row-major), b, w and the sum of squares sum y^2 + l2 ||prior||^2, little-endian float64.
    header = {"alpha": 0.5, "arms": [["base", 3], ["code-v1", 0]], "caps": {"code-v1": 0.1}, "dim": 2, "held": {},
              "floor": 0.2, "format": 2, "l2": 1.0, "min_propensity": 0.01, "noise_prior_weight": 2.0,
              "pinned": None}  # fmt: skip
    base = [0.5, 0.0, 0.0, 0.25, 1.0, 2.0, 0.5, 0.5, 2.5]  # residual: 2.5 - w.b = 1.0
    fresh = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    data = json.dumps(header, sort_keys=True).encode() + b"\n" + np.array(base + fresh, "<f8").tobytes()
    router = LinUCBRouter.from_bytes(data, np.random.default_rng(0))
    assert router.arms == ("base", "code-v1") and router.caps == {"code-v1": 0.1} and router.pinned is None
    # Noise: all arms (2 * 0.25 + 1.0) / (2 + 3) = 0.3; base (2 * 0.3 + 1.0) / (2 + 3) = 0.32;
    # the fresh arm has only the router-wide estimate, 0.3.
    assert router.noise_sd("base") ** 2 == pytest.approx(0.32) and router.noise_sd("code-v1") ** 2 == pytest.approx(0.3)
    # The empty context is the bias alone, x = (1, 0): base's width sqrt(0.32 * 0.5) = 0.4 and
    # bound 0.5 + 0.5 * 0.4 beat the fresh arm's 0 + 0.5 sqrt(0.3). Exploration shares: the
    # floor's 0.1 each times the width left of the prior 0.5 (at most all of it): 0.08 and 0.1.
    assert router.probabilities({}) == pytest.approx({"base": 0.08 + 0.82, "code-v1": 0.1})
    assert router.to_bytes() == data


def test_bytes_of_format_1_are_refused():
    """Format 1 had no sums of squares: the gateway refuses it rather than read the arms wrong,
    and the learner, whose checkpoint format changed with it, rebuilds from the archive."""
    header = {"alpha": 1.0, "arms": [["base", 0]], "caps": {}, "dim": 2, "floor": 0.1, "format": 1, "l2": 1.0,
              "pinned": None}  # fmt: skip
    data = json.dumps(header, sort_keys=True).encode() + b"\n" + np.array([1.0, 0, 0, 1.0, 0, 0, 0, 0], "<f8").tobytes()
    with pytest.raises(ValueError, match="router format 1 is not 2"):
        LinUCBRouter.from_bytes(data, np.random.default_rng(0))


def test_the_bonus_is_scaled_by_each_arms_noise():
    router = LinUCBRouter(["steady", "noisy"], floor=0.0, min_propensity=0.0, seed=0)
    context = {"domain": "code"}
    assert router.noise_sd("steady") == router.noise_sd("noisy") == 0.5  # the prior: a new arm is unsure
    for i in range(200):  # the same mean, 0.5; one arm always 0.5, the other 0 or 1
        router.learn_one("steady", context, 0.5)
        router.learn_one("noisy", context, float(i % 2))
    assert router.noise_sd("steady") < 0.1 < 0.45 < router.noise_sd("noisy") < 0.55
    x = router.featurizer.transform(context)
    models = router._models
    assert models["steady"].uncertainty(x) == pytest.approx(models["noisy"].uncertainty(x))
    assert models["steady"].predict(x) == pytest.approx(models["noisy"].predict(x), abs=0.01)
    # Same data size, same mean: only the noise tells them apart, and the noisy arm's wider
    # bound makes it the one still worth exploring.
    assert router.probabilities(context) == {"steady": 0.0, "noisy": 1.0}
    # The same two arms with rewards ten times smaller: the bonus shrinks in proportion, so the
    # decision does not change with the reward's scale.
    small = LinUCBRouter(["steady", "noisy"], floor=0.0, min_propensity=0.0, noise_prior_weight=0.01, seed=0)
    for i in range(200):
        small.learn_one("steady", context, 0.05)
        small.learn_one("noisy", context, 0.1 * (i % 2))
    assert small.noise_sd("noisy") == pytest.approx(router.noise_sd("noisy") / 10, rel=0.05)
    assert small.probabilities(context) == {"steady": 0.0, "noisy": 1.0}


def test_the_floor_fades_as_estimates_firm_up_but_never_below_min_propensity():
    router = LinUCBRouter(["good", "bad", "worse"], floor=0.3, min_propensity=0.01, seed=0)
    context = {"domain": "chat", "cohort": "a"}
    # Before any reward the whole floor is spread evenly, and all three are greedy.
    assert router.probabilities(context) == pytest.approx(dict.fromkeys(router.arms, 1 / 3))
    rng = np.random.default_rng(0)
    losers = []
    for n in range(1, 401):
        for arm, p in (("good", 0.7), ("bad", 0.4), ("worse", 0.2)):
            router.learn_one(arm, context, float(rng.random() < p))
        if n in (2, 5, 20, 400):
            probabilities = router.probabilities(context)
            assert max(probabilities, key=probabilities.get) == "good"
            losers.append(probabilities["bad"])
    assert losers[0] > losers[1] > losers[2] > losers[3] and losers[0] > 0.03
    assert losers[-1] == pytest.approx(0.01)  # shrunk to the minimum propensity, which holds
    # More arms than 1 / min_propensity: nothing can be spared for a greedy choice.
    crowded = LinUCBRouter([f"a{i}" for i in range(5)], min_propensity=0.25)
    assert crowded.probabilities(context) == pytest.approx(dict.fromkeys(crowded.arms, 0.2))
    for bad in ({"floor": 1.5}, {"min_propensity": -0.1}, {"noise_prior_weight": 0.0}):
        with pytest.raises(ValueError):
            LinUCBRouter(["a"], **bad)


@pytest.mark.parametrize("others, best_rate", [(0.04, 0.08), (0.5, 0.65)])
def test_the_defaults_find_each_contexts_best_arm_at_low_and_high_reward_rates(others, best_rate):
    """The same defaults at a 4% and a 50% reward rate: each domain's best arm takes nearly
    all its traffic, with no setting tuned to the rate. (At 4%, a bonus of half a standard
    deviation dropped the code domain's best arm for good after a few unlucky zeros.)"""
    arms = ("a", "b", "c")
    best = {"code": "a", "chat": "b", "math": "c"}
    router = LinUCBRouter(arms, seed=1)
    rng = np.random.default_rng(5)
    share = {domain: [] for domain in best}
    for i in range(12_000):
        domain = ("code", "chat", "math")[i % 3]
        context = {"domain": domain, "client": ("web", "api")[int(rng.random() < 0.5)]}
        decision = router.decide(context)
        p = best_rate if best[domain] == decision.arm else others
        router.learn_one(decision.arm, context, float(rng.random() < p))
        if i >= 9_000:
            share[domain].append(decision.probabilities[best[domain]])
    for domain, shares in share.items():
        assert np.mean(shares) > 0.9, (domain, np.mean(shares))


def test_each_decision_is_the_documented_distribution_over_five_arms(environment):
    """p(a | x) = e_a(x) + (1 - sum_b e_b(x)) [a greedy] / #greedy over the K live arms, the
    greedy arms being those with the highest upper confidence bound, with the exploration
    shares e_a(x) = max(min_propensity, floor / K * min(1, width_a / prior width)); a cap's
    excess goes to the uncapped arms in proportion to their probabilities. (Speed:
    benchmarks/route_latency.py.)"""
    arms = [f"adapter-{i}" for i in range(5)]
    floor, least = 0.2, 0.01
    router = LinUCBRouter(arms, floor=floor, min_propensity=least, seed=14)
    # Untrained, every arm has the same bound: all five are greedy and share the bonus.
    assert router.probabilities({"domain": "code"}) == pytest.approx(dict.fromkeys(arms, 0.2))

    rng = np.random.default_rng(4)
    contexts, _ = environment.sample(rng, 3_000)
    good = {"code": "adapter-0", "chat": "adapter-1", "math": "adapter-2"}  # 3 and 4 are never best
    for i, context in enumerate(contexts[:1_000]):
        arm = arms[i % len(arms)]
        router.learn_one(arm, context, float(rng.random() < (0.8 if good[context["domain"]] == arm else 0.3)))

    greedy_by_domain: dict[str, set[str]] = {}
    for context in contexts[1_000:]:
        x = router.featurizer.transform(context)
        widths = {a: router.noise_sd(a) * m.uncertainty(x) for a, m in router._models.items()}
        bounds = {a: m.predict(x) + router.alpha * widths[a] for a, m in router._models.items()}
        greedy = [a for a, bound in bounds.items() if bound == max(bounds.values())]
        explore = {a: max(least, floor / 5 * min(1.0, w / (0.5 * np.sqrt(x @ x)))) for a, w in widths.items()}
        rest = 1 - sum(explore.values())
        expected = {a: e + (rest / len(greedy) if a in greedy else 0.0) for a, e in explore.items()}
        decision = router.decide(context)
        assert decision.probabilities == pytest.approx(expected)
        assert decision.propensity == decision.probabilities[decision.arm]
        greedy_by_domain.setdefault(context["domain"], set()).update(greedy)
    # What it learned decides: each domain's own best arm is its greedy choice.
    assert greedy_by_domain == {domain: {arm} for domain, arm in good.items()}

    code = {"domain": "code", "cohort": "a"}
    before = router.probabilities(code)
    assert before["adapter-0"] > 1 - floor and before["adapter-3"] > least  # the floor has faded, not gone
    router.set_cap("adapter-3", 0.005)  # below its floor share and min_propensity: the cap wins
    after = router.probabilities(code)
    assert after["adapter-3"] == 0.005 and sum(after.values()) == pytest.approx(1.0)
    uncapped = sum(p for a, p in before.items() if a != "adapter-3")
    for arm in ("adapter-0", "adapter-1", "adapter-2", "adapter-4"):
        assert after[arm] == pytest.approx(before[arm] * (1 + (before["adapter-3"] - 0.005) / uncapped))
    assert after["adapter-0"] > after["adapter-1"] + 0.7  # the greedy arm took most of it


def test_a_held_arm_keeps_its_share_however_sure_the_router_is():
    router = LinUCBRouter(["champ", "challenger", "other"], min_propensity=0.001, seed=1)
    context = {"domain": "code"}
    for _ in range(400):
        router.learn_one("champ", context, 1.0)
        router.learn_one("challenger", context, 0.0)
        router.learn_one("other", context, 0.0)
    assert router.probabilities(context)["challenger"] < 0.01  # known worse: faded to the minimum
    router.hold({"champ": 0.05, "challenger": 0.05})
    held = router.probabilities(context)
    assert held["challenger"] >= 0.05 and held["other"] < 0.01
    assert LinUCBRouter.from_bytes(router.to_bytes(), np.random.default_rng(0)).probabilities(context) == held
    router.remove_arm("challenger")
    router.hold({})
    assert router.probabilities(context)["other"] < 0.01
