import pickle

import numpy as np
import pytest

from learners.loss_weights import CHANNELS, LossWeights


def annotated_examples(rng, n, informative, noisy, missing=0.3):
    """Rewards per channel for ``n`` answers of latent quality q: explicit = q + N(0, 0.2),
    the informative channel = q + N(0, 0.1), the noisy one uniform and unrelated to q.
    Each channel is missing from an example with probability ``missing``."""
    quality = rng.random(n)
    rewards = {
        "explicit": np.clip(quality + rng.normal(0, 0.2, n), 0, 1),
        informative: np.clip(quality + rng.normal(0, 0.1, n), 0, 1),
        noisy: rng.random(n),
    }
    present = rng.random((n, len(CHANNELS))) >= missing
    return [
        {c: float(rewards[c][i]) for j, c in enumerate(CHANNELS) if present[i, j]} for i in range(n)
    ]


@pytest.mark.parametrize(
    "informative, noisy", [("implicit", "self_eval"), ("self_eval", "implicit")]
)
def test_noisy_channel_gets_less_weight_than_informative_one(informative, noisy):
    weights = LossWeights(floor=0.05)
    for example in annotated_examples(np.random.default_rng(0), 3_000, informative, noisy):
        weights.learn_one(example)
    w = weights.weights()
    print(f"\nweights {w}")
    assert w[informative] > 2 * w[noisy]
    assert sum(w.values()) == pytest.approx(1.0)
    assert min(w.values()) >= 0.05


def test_floor_binds_for_a_useless_channel():
    examples = annotated_examples(np.random.default_rng(3), 2_000, "implicit", "self_eval")
    floored, unfloored = LossWeights(floor=0.2), LossWeights(floor=0.0)
    for example in examples:
        floored.learn_one(example)
        unfloored.learn_one(example)
    assert unfloored.weights()["self_eval"] < 0.1
    w = floored.weights()
    assert 0.2 <= w["self_eval"] < 0.25
    assert min(w.values()) >= 0.2
    assert sum(w.values()) == pytest.approx(1.0)


def test_weights_follow_a_degrading_channel():
    rng = np.random.default_rng(1)
    weights = LossWeights(floor=0.1, fading_factor=0.01)
    for example in annotated_examples(rng, 2_000, "implicit", "self_eval", missing=0.0):
        weights.learn_one(example)
    good = weights.weights()
    # The implicit signal breaks (say a UI change): it becomes as unrelated as self_eval.
    for example in annotated_examples(rng, 2_000, "self_eval", "implicit", missing=0.0):
        example["self_eval"] = float(rng.random())
        weights.learn_one(example)
    broken = weights.weights()
    assert broken["implicit"] < good["implicit"] / 2
    assert broken["explicit"] == max(broken.values())
    assert min(broken.values()) >= 0.1
    assert sum(broken.values()) == pytest.approx(1.0)


def test_cold_start_trusts_explicit_and_examples_without_explicit_teach_nothing():
    weights = LossWeights()
    cold = weights.weights()
    assert cold["explicit"] > cold["implicit"] == cold["self_eval"]
    for _ in range(100):
        weights.learn_one({"implicit": 1.0, "self_eval": 0.0})
    assert weights.weights() == cold
    with pytest.raises(ValueError, match=r"unknown channels: \['thumbs'\]"):
        weights.learn_one({"thumbs": 1.0})


def test_state_pickles():
    weights = LossWeights()
    examples = annotated_examples(np.random.default_rng(2), 400, "implicit", "self_eval")
    for example in examples[:200]:
        weights.learn_one(example)
    restored = pickle.loads(pickle.dumps(weights))
    for example in examples[200:]:
        weights.learn_one(example)
        restored.learn_one(example)
    assert restored.weights() == weights.weights()
