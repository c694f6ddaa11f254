"""Per-channel weights for the trainer's multi-objective loss."""

from __future__ import annotations

from collections.abc import Mapping

from river import stats

CHANNELS = ("explicit", "implicit", "self_eval")


class LossWeights:
    """Inverse-noise-variance weights of the reward channels, learnt online.

    Explicit feedback (a person's rating) is the reference. For ``c`` in implicit and
    self_eval, on examples that carry both ``c`` and explicit, with ``s2_e`` the assumed
    noise variance of explicit ratings:

        s2_c = max(EWMean[(r_c - r_explicit)^2] - s2_e, min_noise_var)

    since ``E[(r_c - r_e)^2] = s2_c + s2_e`` when both measure the same quality with
    independent noise. Bias and scale mismatch count as noise, on purpose: the trainer uses
    each channel's reward as it is. Until a channel has ``min_pairs`` such examples its
    variance is 0.25, that of a fair coin on {0, 1}: an unproven channel is trusted like
    noise. The weights are inverse variances normalised with a floor:

        w_c = floor + (1 - 3 * floor) * (1 / s2_c) / sum_k (1 / s2_k)

    so they sum to 1 and none is below ``floor``. The exponentially weighted mean (river's
    ``EWMean``) lets the weights follow a channel whose quality changes (say a UI change
    that breaks an implicit signal).

    Parameters
    ----------
    floor
        Least weight of any channel, at most 1/3.
    explicit_noise_var
        Assumed noise variance of explicit rewards; sets their weight.
    fading_factor
        Weight of the newest squared difference in the running mean (memory ~ 2/factor).
    min_pairs
        Paired examples a channel needs before its own estimate is used.
    min_noise_var
        Lower bound of an estimated variance, so no channel takes all the weight from a
        lucky run of agreement.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(0)
    >>> weights = LossWeights()
    >>> for _ in range(2000):
    ...     quality = rng.random()
    ...     weights.learn_one({
    ...         "explicit": quality + rng.gauss(0, 0.2),
    ...         "implicit": quality + rng.gauss(0, 0.3),
    ...         "self_eval": rng.random(),  # unrelated to quality
    ...     })
    >>> w = weights.weights()
    >>> w["explicit"] > w["implicit"] > w["self_eval"], round(sum(w.values()), 9)
    (True, 1.0)
    >>> {c: round(v, 2) for c, v in weights.noise_variances().items()}
    {'explicit': 0.05, 'implicit': 0.09, 'self_eval': 0.19}
    """

    def __init__(
        self,
        floor: float = 0.05,
        explicit_noise_var: float = 0.05,
        fading_factor: float = 0.01,
        min_pairs: int = 30,
        min_noise_var: float = 0.01,
    ):
        if not 0.0 <= floor <= 1.0 / len(CHANNELS):
            raise ValueError("floor must be in [0, 1/3]")
        self.floor = floor
        self.explicit_noise_var = explicit_noise_var
        self.min_pairs = min_pairs
        self.min_noise_var = min_noise_var
        self._squared_diff = {c: stats.EWMean(fading_factor) for c in CHANNELS[1:]}
        self._pairs = {c: 0 for c in CHANNELS[1:]}

    def learn_one(self, rewards: Mapping[str, float | None]) -> None:
        """Learn from one example's rewards; missing channels are absent or ``None``."""
        unknown = set(rewards) - set(CHANNELS)
        if unknown:
            raise ValueError(f"unknown channels: {sorted(unknown)}")
        explicit = rewards.get("explicit")
        if explicit is None:
            return
        for channel, squared_diff in self._squared_diff.items():
            reward = rewards.get(channel)
            if reward is not None:
                squared_diff.update((reward - explicit) ** 2)
                self._pairs[channel] += 1

    def noise_variances(self) -> dict[str, float]:
        variances = {"explicit": self.explicit_noise_var}
        for channel, squared_diff in self._squared_diff.items():
            if self._pairs[channel] < self.min_pairs:
                variances[channel] = 0.25
            else:
                own = squared_diff.get() - self.explicit_noise_var
                variances[channel] = max(own, self.min_noise_var)
        return variances

    def weights(self) -> dict[str, float]:
        precisions = {c: 1.0 / v for c, v in self.noise_variances().items()}
        total = sum(precisions.values())
        scale = 1.0 - len(CHANNELS) * self.floor
        return {c: self.floor + scale * p / total for c, p in precisions.items()}
