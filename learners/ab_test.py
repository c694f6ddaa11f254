"""Rolling champion/challenger test with an always-valid confidence sequence on the lift."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The confidence sequence is the dual of the mixture sequential probability ratio test
# (mSPRT) with a normal mixture over the lift (Robbins 1970), as deployed for continuously
# monitored A/B tests by Johari, Koomen, Pekelis & Walsh, "Always Valid Inference: Continuous
# Monitoring of A/B Tests", Operations Research 70(3), 2022 (KDD 2017: "Peeking at A/B
# tests"). Chosen over Hoeffding / empirical-Bernstein sequences because it bounds the
# two-sample difference directly in closed form (no union bound over two one-sample
# sequences, no stitching), is tighter for rewards near 0.5, and vectorizes over simulated
# experiments. With plug-in variances its validity is asymptotic (Waudby-Smith et al.,
# "Time-uniform central limit theory and asymptotic confidence sequences", Ann. Statist.
# 2024); the minimum sample per arm and the A/A simulation in the tests cover the small-n side.


def lift_bounds(n_a, sum_a, sumsq_a, n_b, sum_b, sumsq_b, alpha, tau):
    """Lift ``mean_b - mean_a`` and its confidence-sequence bounds at level ``alpha``.

    From each variant's count, sum and sum of squares (numpy arrays broadcast):
    ``V = s2_a / n_a + s2_b / n_b`` and the bounds are ``lift -+ r`` with

        r = sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))

    which holds at every sample size simultaneously with probability >= 1 - alpha. The
    variance ``s2 = (sum of squared deviations + 1/4) / (n + 1)`` adds one pseudo-observation
    at the largest variance of a [0, 1] reward, so an arm that happens to return the same
    reward every time does not get a zero-width bound. ``tau`` is the mixture's scale: the
    sequence is tightest for lifts of about that size.

    >>> lift, lower, upper = lift_bounds(1000, 500, 500, 1000, 600, 600, 0.05, 0.05)
    >>> round(float(lift), 3), round(float(lower), 3), round(float(upper), 3)
    (0.1, 0.032, 0.168)
    """
    n_a, n_b = np.asarray(n_a, float), np.asarray(n_b, float)
    mean_a, mean_b = sum_a / n_a, sum_b / n_b
    var_a = (sumsq_a - sum_a * mean_a + 0.25) / (n_a + 1)
    var_b = (sumsq_b - sum_b * mean_b + 0.25) / (n_b + 1)
    v = var_a / n_a + var_b / n_b
    tau2 = tau * tau
    radius = np.sqrt(v * (v + tau2) / tau2 * (2 * np.log(1 / alpha) + np.log((v + tau2) / v)))
    lift = mean_b - mean_a
    return lift, lift - radius, lift + radius


def split_alpha(alpha: float, cohort_rank: int | None = None) -> float:
    """Level of one sequence: ``alpha / 2`` for the overall lift; the other half is spread over
    cohorts in order of first appearance, ``alpha / (2 k (k + 1))`` for the k-th, which sums
    to ``alpha / 2`` however many cohorts appear (earlier, usually larger, cohorts get more)."""
    if cohort_rank is None:
        return alpha / 2
    return alpha / (2 * cohort_rank * (cohort_rank + 1))


@dataclass(frozen=True)
class ABDecision:
    """``verdict`` is "continue", "promote" or "rollback"; ``lower``/``upper`` bound the lift
    (challenger minus champion mean reward); ``harmed_cohorts`` are cohorts where the
    challenger is significantly worse."""

    verdict: str
    lift: float
    lower: float
    upper: float
    n_champion: int
    n_challenger: int
    harmed_cohorts: tuple[str, ...]


@dataclass
class _Sums:
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, reward: float) -> None:
        self.n += 1
        self.total += reward
        self.total_sq += reward * reward


@dataclass
class _Cohort:
    rank: int
    sums: dict[str, _Sums]
    upper: float = math.inf


class ABTest:
    """Champion vs challenger on live rewards in [0, 1], safe to check after every event.

    Keeps the running intersection of the confidence sequences (still a confidence sequence,
    and the verdict cannot flip back to "continue"): on the overall lift at ``alpha / 2`` and
    on each cohort's lift at its share of the other half (``split_alpha``). A sequence starts
    once both variants have ``min_samples`` rewards in it. The verdict is:

    - "rollback" if the overall upper bound is below 0, or any cohort's is (guard: a
      challenger that significantly harms a cohort is not promoted);
    - "promote" if the overall lower bound is above 0;
    - "inconclusive" once both variants have ``max_samples`` rewards and neither holds: the
      lift, if any, is too small to matter at this traffic, and the champion stays (a
      rolling A/B must end so that the next challenger can start);
    - "continue" otherwise.

    The chance of any wrong promote or rollback in an experiment with no true difference, at
    any time, is at most ``alpha`` (asymptotically; see the module's comment).

    Parameters
    ----------
    champion, challenger
        Adapter names; ``update`` accepts only these two.
    alpha
        Total error level.
    min_samples
        Rewards each variant needs, overall and within a cohort, before that sequence counts.
    tau
        Mixture scale of the sequences: the lift the test detects fastest.
    max_samples
        Rewards per variant after which a test with no verdict ends "inconclusive"; None
        runs it until a verdict.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(1)
    >>> test = ABTest("code-v1", "code-v2")
    >>> for t in range(20_000):
    ...     variant = "code-v2" if t % 2 else "code-v1"
    ...     p = 0.6 if variant == "code-v2" else 0.5
    ...     test.update(variant, float(rng.random() < p), cohort="ab"[t % 4 // 2])
    ...     if test.decision().verdict != "continue":
    ...         break
    >>> decision = test.decision()
    >>> decision.verdict, decision.lower > 0, t < 20_000
    ('promote', True, True)
    """

    def __init__(
        self,
        champion: str,
        challenger: str,
        alpha: float = 0.05,
        min_samples: int = 200,
        tau: float = 0.05,
        max_samples: int | None = None,
    ):
        if champion == challenger:
            raise ValueError("champion and challenger must differ")
        if max_samples is not None and max_samples < min_samples:
            raise ValueError("max_samples must be at least min_samples")
        self.max_samples = max_samples
        self.champion = champion
        self.challenger = challenger
        self.alpha = alpha
        self.min_samples = min_samples
        self.tau = tau
        self._overall = self._new_sums()
        self._lower, self._upper = -math.inf, math.inf
        self._cohorts: dict[str, _Cohort] = {}

    def _new_sums(self) -> dict[str, _Sums]:
        return {self.champion: _Sums(), self.challenger: _Sums()}

    def _bounds(self, sums: dict[str, _Sums], alpha: float) -> tuple[float, float]:
        a, b = sums[self.champion], sums[self.challenger]
        if min(a.n, b.n) < self.min_samples:
            return -math.inf, math.inf
        _, lower, upper = lift_bounds(
            a.n, a.total, a.total_sq, b.n, b.total, b.total_sq, alpha, self.tau
        )
        return float(lower), float(upper)

    def update(self, variant: str, reward: float, cohort: str | None = None) -> None:
        if variant not in self._overall:
            raise ValueError(f"{variant!r} is neither {self.champion!r} nor {self.challenger!r}")
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"reward {reward} is outside [0, 1]")
        self._overall[variant].add(reward)
        lower, upper = self._bounds(self._overall, split_alpha(self.alpha))
        self._lower, self._upper = max(self._lower, lower), min(self._upper, upper)
        if cohort is None:
            return
        if cohort not in self._cohorts:
            self._cohorts[cohort] = _Cohort(rank=len(self._cohorts) + 1, sums=self._new_sums())
        state = self._cohorts[cohort]
        state.sums[variant].add(reward)
        _, upper = self._bounds(state.sums, split_alpha(self.alpha, state.rank))
        state.upper = min(state.upper, upper)

    def decision(self) -> ABDecision:
        a, b = self._overall[self.champion], self._overall[self.challenger]
        lift = b.total / b.n - a.total / a.n if a.n and b.n else math.nan
        harmed = tuple(c for c, state in self._cohorts.items() if state.upper < 0)
        if self._upper < 0 or harmed:
            verdict = "rollback"
        elif self._lower > 0:
            verdict = "promote"
        elif self.max_samples is not None and min(a.n, b.n) >= self.max_samples:
            verdict = "inconclusive"
        else:
            verdict = "continue"
        return ABDecision(verdict, lift, self._lower, self._upper, a.n, b.n, harmed)
