"""Off-policy evaluation of a candidate routing policy from logged decisions."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from statistics import NormalDist
from typing import Protocol

from learners.features import Context, HashingFeaturizer
from learners.ridge import OnlineRidge

Policy = Callable[[Context], Mapping[str, float]]


@dataclass(frozen=True)
class Estimate:
    """A policy value with its two-sided confidence interval over ``n`` records."""

    value: float
    lower: float
    upper: float
    n: int


class RewardModel(Protocol):
    def predict_one(self, context: Context, arm: str) -> float: ...

    def learn_one(self, context: Context, arm: str, reward: float) -> None: ...


class RidgeRewardModel:
    """Per-arm online ridge regression of reward on hashed context features.

    Predictions are clipped to [0, 1], the range of rewards. An arm never seen predicts 0.5.

    Examples
    --------
    >>> model = RidgeRewardModel()
    >>> for _ in range(200):
    ...     model.learn_one({"domain": "code"}, "coder", 0.9)
    >>> round(model.predict_one({"domain": "code"}, "coder"), 2)
    0.9
    >>> model.predict_one({"domain": "code"}, "other")
    0.5
    """

    def __init__(self, dim: int = 32, l2: float = 1.0):
        self.featurizer = HashingFeaturizer(dim)
        self.l2 = l2
        self._models: dict[str, OnlineRidge] = {}

    def predict_one(self, context: Context, arm: str) -> float:
        model = self._models.get(arm)
        if model is None:
            return 0.5
        return min(1.0, max(0.0, model.predict(self.featurizer.transform(context))))

    def learn_one(self, context: Context, arm: str, reward: float) -> None:
        if arm not in self._models:
            self._models[arm] = OnlineRidge(self.featurizer.dim, self.l2)
        self._models[arm].learn_one(self.featurizer.transform(context), reward)


class OffPolicyEvaluator:
    """Streams logged ``(context, arm, reward, propensity)`` records and estimates the value
    (mean reward) the candidate ``policy`` would have had.

    With ``w = pi(arm | x) / propensity`` for each record and ``q(x, a)`` the reward model:

    - IPS: ``mean(w * r)``. Unbiased when every arm the policy may pick had propensity > 0.
    - SNIPS: ``sum(w * r) / sum(w)``. Slightly biased, lower variance, stays in [0, 1].
    - DR: ``mean(sum_a pi(a | x) q(x, a) + w * (r - q(x, arm)))``. Unbiased if either the
      propensities or the reward model are right; lower variance when ``q`` is good.

    Intervals are normal approximations: ``value +- z * se`` with ``se = sd(terms) / sqrt(n)``
    over the per-record terms (IPS, DR), and the delta-method
    ``se = sqrt(mean(w^2 (r - V)^2) / n) / mean(w)`` for SNIPS. They need enough records for
    the mean of the terms to be near-normal (hundreds, more when weights are large).

    The reward model predicts each record before it learns from it (progressive validation),
    so a DR term never uses a model fitted on its own reward.

    Parameters
    ----------
    policy
        Candidate policy: context -> probability of each arm (missing arms have 0).
        ``LinUCBRouter.probabilities`` is one. None when every record brings its ``target``.
    reward_model
        Model of the reward of an arm in a context; a ``RidgeRewardModel`` when omitted.
    confidence
        Coverage of the intervals.

    Examples
    --------
    >>> evaluator = OffPolicyEvaluator(lambda context: {"a": 1.0})
    >>> for i in range(100):
    ...     arm = "ab"[i % 2]
    ...     evaluator.learn_one({"domain": "code"}, arm, 1.0 if arm == "a" else 0.0, 0.5)
    >>> evaluator.ips().value, evaluator.snips().value
    (1.0, 1.0)
    """

    def __init__(
        self,
        policy: Policy | None,
        reward_model: RewardModel | None = None,
        confidence: float = 0.95,
    ):
        self.policy = policy
        self.reward_model = RidgeRewardModel() if reward_model is None else reward_model
        self.confidence = confidence
        # Running sums over records; every interval below is a function of these.
        self.n = 0
        self._sum_w = self._sum_wr = self._sum_ww = self._sum_wwr = self._sum_wwrr = 0.0
        self._sum_dr = self._sum_dr2 = 0.0

    def learn_one(self, context: Context, arm: str, reward: float, propensity: float,
                  target: Mapping[str, float] | None = None) -> None:  # fmt: skip
        """One logged record. ``target``: the policy's probabilities for it, when the caller
        asked the policy itself; a policy that learns from the log (a router replayed over it)
        must answer before it learns the record, and the caller knows when that is."""
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"propensity {propensity} must be in (0, 1]")
        if target is None:
            target = self.policy(context)
        w = target.get(arm, 0.0) / propensity
        direct = sum(p * self.reward_model.predict_one(context, a) for a, p in target.items())
        dr = direct + w * (reward - self.reward_model.predict_one(context, arm))
        self.reward_model.learn_one(context, arm, reward)

        self.n += 1
        self._sum_w += w
        self._sum_wr += w * reward
        self._sum_ww += w * w
        self._sum_wwr += w * w * reward
        self._sum_wwrr += w * w * reward * reward
        self._sum_dr += dr
        self._sum_dr2 += dr * dr

    def _interval(self, value: float, se: float) -> Estimate:
        z = NormalDist().inv_cdf(0.5 + self.confidence / 2)
        return Estimate(value, value - z * se, value + z * se, self.n)

    def _mean_and_se(self, total: float, total_sq: float) -> tuple[float, float]:
        if self.n < 2:
            raise ValueError("an interval needs at least 2 records")
        mean = total / self.n
        variance = max(0.0, (total_sq - total * mean) / (self.n - 1))
        return mean, math.sqrt(variance / self.n)

    def ips(self) -> Estimate:
        return self._interval(*self._mean_and_se(self._sum_wr, self._sum_wwrr))

    def doubly_robust(self) -> Estimate:
        return self._interval(*self._mean_and_se(self._sum_dr, self._sum_dr2))

    def snips(self) -> Estimate:
        if self.n < 2 or self._sum_w == 0.0:
            raise ValueError("SNIPS needs at least 2 records, one the policy could choose")
        value = self._sum_wr / self._sum_w
        # mean of w^2 (r - V)^2, expanded into the running sums.
        spread = (self._sum_wwrr - 2 * value * self._sum_wwr + value**2 * self._sum_ww) / self.n
        se = math.sqrt(max(0.0, spread) / self.n) / (self._sum_w / self.n)
        return self._interval(value, se)
