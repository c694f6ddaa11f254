"""Rolling champion/challenger test with an always-valid confidence sequence on the lift."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Why pseudo-outcomes. The router does not split traffic at random within a context: it sends
# each arm the contexts it expects to do well in, and moves those shares as it learns. Two
# plain per-arm means then compare different populations (a challenger sent the easy requests
# looks better with no true lift; the A/A test in tests/learners/test_ab_test.py measures it).
# The logged propensity of the served arm fixes that: for every request in which both arms
# could be chosen, the augmented inverse-propensity pseudo-outcome
#
#     d_t = (m_B - m_A) + 1[a_t = B] (r_t - m_B) / p_t(a_t) - 1[a_t = A] (r_t - m_A) / p_t(a_t)
#
# (A the champion, B the challenger, m_A and m_B their mean rewards over the test's earlier
# requests) has conditional mean E[mu_B(x) - mu_A(x)] given the past, whatever the router did
# before: each inverse-propensity term (Horvitz & Thompson 1952) corrects the baseline m of
# its arm by exactly its error, in expectation. It is the augmented IPW estimator (Robins,
# Rotnitzky & Zhao 1994) with a per-arm constant reward model; any model fitted on earlier
# requests only keeps the mean. The model cuts the variance, E[d^2] ~ sum_a E[(r - m_a)^2] / p(a)
# instead of plain IPS's sum_a E[r^2] / p(a): half at a 50/50 split around 0.5, as small as
# the old two-sample test's, and far less for a champion that a small propensity serves and
# that earns little. So the d_t minus the lift form a martingale difference sequence, and a
# one-sample confidence sequence on their mean is one on the lift under adaptive allocation.
# The estimand is the lift of sending *every* request to the challenger rather than to the
# champion: what a promotion does.
#
# The sequence is the normal mixture (Robbins 1970), dual of the mixture sequential
# probability ratio test as deployed for continuously monitored A/B tests by Johari, Koomen,
# Pekelis & Walsh, "Always Valid Inference", Operations Research 70(3), 2022. With a plug-in
# variance its validity is asymptotic: Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas,
# "Time-uniform central limit theory and asymptotic confidence sequences", Ann. Statist. 2024,
# prove it for martingale means such as these inverse-propensity terms in sequential
# experiments; the minimum sample and the A/A simulations in the tests cover the small-n side.
# Chosen over a randomized holdout (which would spend traffic on a uniform split and needs the
# router to change) and over betting sequences for IPS (Waudby-Smith et al., "Anytime-valid
# off-policy inference for contextual bandits", 2024: tighter for small propensities, but no
# closed form to vectorize over simulated experiments). The price is variance: a challenger
# served with propensity 0.1 (a canary) contributes terms up to 10, so a test under a small
# canary share needs more traffic than a 50/50 split.


def radius(variance, alpha, tau):
    """Half-width of the normal-mixture confidence sequence for an estimate with ``variance``.

        r = sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))

    holds at every sample size simultaneously with probability >= 1 - alpha. ``tau`` is the
    mixture's scale: the sequence is tightest for effects of about that size.

    >>> round(float(radius(0.25 / 1000, 0.05, 0.05)), 3)
    0.048
    """
    tau2 = tau * tau
    v = np.asarray(variance, float)
    return np.sqrt(v * (v + tau2) / tau2 * (2 * np.log(1 / alpha) + np.log((v + tau2) / v)))


def lift_bounds(n, total, total_sq, alpha, tau):
    """Lift (mean of the ``n`` pseudo-outcomes) and its confidence-sequence bounds.

    From the count, sum and sum of squares of the pseudo-outcomes (numpy arrays broadcast):
    ``V = s2 / n`` with ``s2 = (sum of squared deviations + 1/4) / (n + 1)``, one
    pseudo-observation at the largest variance of a [0, 1] reward, so that a run of equal
    rewards does not give a zero-width bound. The class and the vectorized simulations of the
    tests share it.

    >>> lift, lower, upper = lift_bounds(2000, 200, 2000, 0.05, 0.05)
    >>> round(float(lift), 3), round(float(lower), 3), round(float(upper), 3)
    (0.1, 0.032, 0.168)
    """
    n = np.asarray(n, float)
    lift = total / n
    variance = (total_sq - total * lift + 0.25) / (n + 1)
    r = radius(variance / n, alpha, tau)
    return lift, lift - r, lift + r


def split_alpha(alpha: float, cohort_rank: int | None = None) -> float:
    """Level of one sequence: ``alpha / 2`` for the overall lift; the other half is spread over
    cohorts in order of first appearance, ``alpha / (2 k (k + 1))`` for the k-th, which sums
    to ``alpha / 2`` however many cohorts appear (earlier, usually larger, cohorts get more)."""
    if cohort_rank is None:
        return alpha / 2
    return alpha / (2 * cohort_rank * (cohort_rank + 1))


@dataclass(frozen=True)
class ABDecision:
    """``verdict`` is "continue", "promote", "rollback" or "inconclusive"; ``lift`` is the
    estimated lift (challenger minus champion mean reward, over the traffic both could serve),
    ``lower``/``upper`` bound it; ``n_champion``/``n_challenger`` count the rewards each served;
    ``harmed_cohorts`` are cohorts where the challenger is significantly worse."""

    verdict: str
    lift: float
    lower: float
    upper: float
    n_champion: int
    n_challenger: int
    harmed_cohorts: tuple[str, ...]


@dataclass
class _Sequence:
    """One confidence sequence: its pseudo-outcomes' sums, the rewards each variant served,
    and the running intersection of its bounds."""

    rank: int = 0  # a cohort's, in order of first appearance (``split_alpha``)
    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    served_champion: int = 0
    served_challenger: int = 0
    lower: float = -math.inf
    upper: float = math.inf

    def add(self, term: float, served: int) -> None:
        """``served``: -1 the champion, 1 the challenger, 0 another arm."""
        self.n += 1
        self.total += term
        self.total_sq += term * term
        self.served_champion += served < 0
        self.served_challenger += served > 0

    def tighten(self, alpha: float, tau: float, min_samples: int) -> None:
        if min(self.served_champion, self.served_challenger) < min_samples:
            return
        _, lower, upper = lift_bounds(self.n, self.total, self.total_sq, alpha, tau)
        self.lower, self.upper = max(self.lower, float(lower)), min(self.upper, float(upper))


class ABTest:
    """Champion vs challenger on live rewards in [0, 1] under adaptive routing, safe to check
    after every event.

    Fed every rewarded request in which both variants could have been chosen, whichever arm
    served it, with the propensity of the arm that did. Each adds the inverse-propensity
    augmented pseudo-outcome ``(m_B - m_A) + (r - m_a) (1[challenger] - 1[champion]) /
    propensity`` (``m``: each variant's mean reward so far; a third arm adds ``m_B - m_A``), whose
    mean is the lift of serving everyone the challenger instead of the champion even when the
    router sends each variant different contexts (see the module's comment). A one-sample
    confidence sequence on that mean (``lift_bounds``) is kept overall at ``alpha / 2`` and in
    each cohort at its share of the other half (``split_alpha``), as the running intersection
    of its bounds (still a confidence sequence, and the verdict cannot flip back to
    "continue"). A sequence starts once both variants served ``min_samples`` rewards in it.
    The verdict is:

    - "rollback" if the overall upper bound is below 0, or any cohort's is (guard: a
      challenger that significantly harms a cohort is not promoted);
    - "promote" if the overall lower bound is above 0;
    - "inconclusive" once both variants served ``max_samples`` rewards and neither holds: the
      lift, if any, is too small to matter at this traffic, and the champion stays (a
      rolling A/B must end so that the next challenger can start);
    - "continue" otherwise.

    The chance of any wrong promote or rollback in an experiment with no true difference, at
    any time, is at most ``alpha`` (asymptotically; see the module's comment).

    Parameters
    ----------
    champion, challenger
        Adapter names.
    alpha
        Total error level.
    min_samples
        Rewards each variant must serve, overall and within a cohort, before that sequence
        counts.
    tau
        Mixture scale of the sequences: the lift the test detects fastest.
    max_samples
        Rewards per variant after which a test with no verdict ends "inconclusive"; None
        runs it until a verdict.

    Examples
    --------
    A router that sends the challenger most of the easy requests (cohort "a", where both
    variants earn 0.8) and few of the hard ones ("b", 0.3 for both): plain per-arm means
    would see a lift of 0.3; the pseudo-outcomes see none.

    >>> import random
    >>> rng = random.Random(1)
    >>> test = ABTest("code-v1", "code-v2")
    >>> for t in range(20_000):
    ...     cohort = "ab"[t % 2]
    ...     p_challenger = 0.8 if cohort == "a" else 0.2
    ...     served = "code-v2" if rng.random() < p_challenger else "code-v1"
    ...     propensity = p_challenger if served == "code-v2" else 1 - p_challenger
    ...     reward = float(rng.random() < (0.8 if cohort == "a" else 0.3))
    ...     test.update(served, reward, propensity, cohort=cohort)
    >>> decision = test.decision()
    >>> decision.verdict, decision.lower < 0 < decision.upper
    ('continue', True)
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
        self._overall = _Sequence()
        self._cohorts: dict[str, _Sequence] = {}
        self._served_rewards = {-1: 0.0, 1: 0.0}  # champion's, challenger's: their means are the baselines

    def update(self, adapter: str, reward: float, propensity: float, cohort: str | None = None) -> None:
        """One request both variants could have served: ``adapter`` served it with
        ``propensity`` (the probability the router gave it) and earned ``reward``."""
        if not 0.0 <= reward <= 1.0:
            raise ValueError(f"reward {reward} is outside [0, 1]")
        if not 0.0 < propensity <= 1.0:
            raise ValueError(f"propensity {propensity} must be in (0, 1]")
        served = 1 if adapter == self.challenger else -1 if adapter == self.champion else 0
        # Each mean starts from one pseudo-reward of 0.5 and uses only earlier requests.
        o, sums = self._overall, self._served_rewards
        m_champion = (0.5 + sums[-1]) / (1 + o.served_champion)
        m_challenger = (0.5 + sums[1]) / (1 + o.served_challenger)
        term = m_challenger - m_champion
        if served:
            term += served * (reward - (m_challenger if served > 0 else m_champion)) / propensity
            sums[served] += reward
        self._overall.add(term, served)
        self._overall.tighten(split_alpha(self.alpha), self.tau, self.min_samples)
        if cohort is None:
            return
        # The same term: baselines fixed before the request keep each cohort's mean its lift.
        state = self._cohorts.setdefault(cohort, _Sequence(rank=len(self._cohorts) + 1))
        state.add(term, served)
        state.tighten(split_alpha(self.alpha, state.rank), self.tau, self.min_samples)

    def decision(self) -> ABDecision:
        o = self._overall
        lift = o.total / o.n if o.served_champion and o.served_challenger else math.nan
        harmed = tuple(c for c, state in self._cohorts.items() if state.upper < 0)
        if o.upper < 0 or harmed:
            verdict = "rollback"
        elif o.lower > 0:
            verdict = "promote"
        elif self.max_samples is not None and min(o.served_champion, o.served_challenger) >= self.max_samples:
            verdict = "inconclusive"
        else:
            verdict = "continue"
        return ABDecision(verdict, lift, o.lower, o.upper, o.served_champion, o.served_challenger, harmed)
