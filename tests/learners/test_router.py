import json
import pickle

import numpy as np
import pytest
from river import bandit

from learners.router import LinUCBRouter

FLOOR = 0.1


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
    router = LinUCBRouter(environment.arms, floor=FLOOR, seed=11)
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
    # Every decision was a distribution with the floor, and propensity = p(chosen arm).
    totals = np.array([sum(d.probabilities.values()) for d in decisions])
    assert np.allclose(totals, 1.0)
    assert min(min(d.probabilities.values()) for d in decisions) >= FLOOR / 3 - 1e-12
    assert all(d.propensity == d.probabilities[d.arm] for d in decisions)


def test_sampled_arms_follow_the_propensities(environment):
    rng = np.random.default_rng(2)
    contexts, probabilities = environment.sample(rng, 2_000)
    router = LinUCBRouter(environment.arms, floor=0.3, seed=12)
    run_router(environment, router, contexts, probabilities, rng)

    context = {"domain": "code", "cohort": "a", "locale": "en", "client": "web"}
    expected = router.probabilities(context)
    assert max(expected.values()) == pytest.approx(1 - 0.3 + 0.3 / 3)  # not uniform
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
    router = LinUCBRouter(["base", "code-v1"], floor=0.2, seed=0)
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
    assert min(probabilities.values()) == pytest.approx(0.2 / 3)
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
    router = LinUCBRouter(environment.arms, floor=FLOOR, seed=3)
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
        LinUCBRouter.from_bytes(data.replace(b'"format": 1', b'"format": 9', 1), np.random.default_rng(0))
    with pytest.raises(ValueError, match="truncated"):
        LinUCBRouter.from_bytes(data[:-8], np.random.default_rng(0))


def test_bytes_stored_in_format_1_load_and_are_written_back_unchanged():
    # As the learner has stored routers for the gateway since format 1, written out by hand:
    # a sorted JSON header, then per arm A^-1 (row-major), b and w as little-endian float64.
    header = {"alpha": 1.0, "arms": [["base", 3], ["code-v1", 0]], "caps": {"code-v1": 0.1}, "dim": 2,
              "floor": 0.2, "format": 1, "l2": 1.0, "pinned": None}  # fmt: skip
    base = [0.5, 0.0, 0.0, 0.25, 1.0, 2.0, 0.5, 0.5]
    fresh = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    data = json.dumps(header, sort_keys=True).encode() + b"\n" + np.array(base + fresh, "<f8").tobytes()
    router = LinUCBRouter.from_bytes(data, np.random.default_rng(0))
    assert router.arms == ("base", "code-v1") and router.caps == {"code-v1": 0.1} and router.pinned is None
    # The empty context is the bias alone, x = (1, 0): base's bound 0.5 + sqrt(0.5) beats the
    # fresh arm's 0 + 1, so base gets the floor's share plus all the rest.
    assert router.probabilities({}) == pytest.approx({"base": 0.9, "code-v1": 0.1})
    assert router.to_bytes() == data


def test_each_decision_is_the_documented_distribution_over_five_arms(environment):
    """p(a | x) = floor / K + (1 - floor) [a greedy] / #greedy over the K live arms, the greedy
    arms being those with the highest upper confidence bound; a cap's excess goes to the
    uncapped arms in proportion to their probabilities. (Speed: benchmarks/route_latency.py.)"""
    arms = [f"adapter-{i}" for i in range(5)]
    floor = 0.2
    router = LinUCBRouter(arms, floor=floor, seed=14)
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
        bounds = {a: m.predict(x) + router.alpha * m.uncertainty(x) for a, m in router._models.items()}
        greedy = [a for a, bound in bounds.items() if bound == max(bounds.values())]
        expected = {a: floor / 5 + ((1 - floor) / len(greedy) if a in greedy else 0.0) for a in arms}
        decision = router.decide(context)
        assert decision.probabilities == pytest.approx(expected)
        assert decision.propensity == decision.probabilities[decision.arm]
        greedy_by_domain.setdefault(context["domain"], set()).update(greedy)
    # What it learned decides: each domain's own best arm is its greedy choice.
    assert greedy_by_domain == {domain: {arm} for domain, arm in good.items()}

    code = {"domain": "code", "cohort": "a"}
    before = router.probabilities(code)
    assert before["adapter-0"] == pytest.approx(floor / 5 + 1 - floor)
    router.set_cap("adapter-3", 0.01)  # below its floor share: 0.03 to give away
    after = router.probabilities(code)
    assert after["adapter-3"] == 0.01 and sum(after.values()) == pytest.approx(1.0)
    uncapped = sum(p for a, p in before.items() if a != "adapter-3")
    for arm in ("adapter-0", "adapter-1", "adapter-2", "adapter-4"):
        assert after[arm] == pytest.approx(before[arm] * (1 + (before["adapter-3"] - 0.01) / uncapped))
    assert after["adapter-0"] > after["adapter-1"] + 0.7  # the greedy arm took most of it
