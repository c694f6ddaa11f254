import pickle

import numpy as np
import pytest
from river import drift

from learners.drift import DriftMonitor

BEFORE, AFTER, SEEDS = 1_000, 500, 50
DETECTORS = {
    "adwin": drift.ADWIN,
    # Page-Hinkley's defaults suit large values; for rewards in [0, 1] the tolerance is half
    # the smallest shift worth catching and the threshold a few dozen reward units.
    "page_hinkley": lambda: drift.PageHinkley(delta=0.05, threshold=25),
}


def reward_alarms(detector, rewards):
    monitor = DriftMonitor(detector())
    return [
        alarm
        for t, reward in enumerate(rewards)
        if (alarm := monitor.update_reward("code-v1", float(reward), timestamp=1e9 + t))
    ]


@pytest.mark.parametrize("name", DETECTORS)
def test_abrupt_reward_drop_is_alarmed_and_stationary_stream_is_not(name):
    detected, quiet, before_means, after_means = 0, 0, [], []
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        p = np.r_[np.full(BEFORE, 0.7), np.full(AFTER, 0.4)]
        alarms = reward_alarms(DETECTORS[name], rng.random(BEFORE + AFTER) < p)
        first = alarms[0] if alarms else None
        if first is not None and BEFORE <= first.index < BEFORE + 500:
            detected += 1
            assert first.what == "reward:code-v1"
            assert first.timestamp == 1e9 + first.index
            before_means.append(first.mean_before)
            after_means.append(first.mean_after)
        quiet += not reward_alarms(DETECTORS[name], rng.random(BEFORE + AFTER) < 0.7)

    print(
        f"\n{name}: drop 0.7 -> 0.4 alarmed within 500 events in {detected / SEEDS:.0%} of "
        f"seeds; stationary stream quiet in {quiet / SEEDS:.0%}"
    )
    assert detected / SEEDS >= 0.8
    assert quiet / SEEDS >= 0.8
    assert np.median(before_means) == pytest.approx(0.7, abs=0.05)
    assert np.median(after_means) == pytest.approx(0.4, abs=0.1)


def feature_events(rng, n, code_share, mean_tokens):
    domains = rng.choice(["code", "chat", "math"], size=n, p=[code_share, 0.8 - code_share, 0.2])
    tokens = rng.normal(mean_tokens, 30, size=n)
    return [{"domain": str(d), "prompt_tokens": float(t)} for d, t in zip(domains, tokens)]


def feature_alarms(events):
    monitor = DriftMonitor()
    return [
        (t, alarm) for t, event in enumerate(events) for alarm in monitor.update_features(event, t)
    ]


@pytest.mark.parametrize(
    "changed, what",
    [(dict(code_share=0.2), "feature:domain="), (dict(mean_tokens=150), "feature:prompt_tokens")],
)
def test_feature_shift_is_alarmed_and_stationary_features_are_not(changed, what):
    seeds, detected, quiet = 30, 0, 0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        base = dict(code_share=0.5, mean_tokens=120)
        events = feature_events(rng, BEFORE, **base) + feature_events(rng, AFTER, **base | changed)
        alarms = feature_alarms(events)
        first = alarms[0] if alarms else None
        detected += first is not None and first[0] >= BEFORE and first[1].what.startswith(what)
        quiet += not feature_alarms(feature_events(rng, BEFORE + AFTER, **base))
    print(
        f"\n{what}: shift alarmed within {AFTER} events in {detected / seeds:.0%} of seeds, ",
        end="",
    )
    print(f"stationary features quiet in {quiet / seeds:.0%}")
    assert detected / seeds >= 0.8
    assert quiet / seeds >= 0.8


def test_only_listed_features_are_watched_and_state_pickles():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(features=["prompt_tokens"])
    events = feature_events(rng, BEFORE, 0.5, 120) + feature_events(rng, AFTER, 0.1, 120)
    for t, event in enumerate(events[:1_200]):
        assert monitor.update_features(event, t) == []
    restored = pickle.loads(pickle.dumps(monitor))
    rest = events[1_200:] + feature_events(rng, 500, 0.5, 200)
    original = [a for t, e in enumerate(rest) for a in monitor.update_features(e, t)]
    replayed = [a for t, e in enumerate(rest) for a in restored.update_features(e, t)]
    assert original == replayed
    assert original and all(a.what == "feature:prompt_tokens" for a in original)
