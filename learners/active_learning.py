"""Choosing feedback examples for human review under an hourly budget."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ReviewCandidate:
    """One served answer with the rewards gathered so far.

    ``rewards`` maps channels ("explicit", "implicit", "self_eval") to values in [0, 1],
    missing ones left out; ``judge_confidence`` in [0, 1] is the self-eval judge's own
    confidence, if it gave one; ``timestamp`` is the event's time in seconds; ``weights``
    how far each channel is trusted (the loss weights), None for all alike.
    """

    timestamp: float
    cohort: str
    rewards: Mapping[str, float] = field(default_factory=dict)
    judge_confidence: float | None = None
    weights: Mapping[str, float] | None = None


def disagreement(rewards: Mapping[str, float], weights: Mapping[str, float] | None = None) -> float:
    """How far the channels disagree, in [0, 1]: twice the weighted mean absolute deviation of
    their rewards from the weighted mean, weights renormalized over the channels present.

    Two channels alike in trust give ``|r1 - r2|``; when the odd one out is a channel the loss
    weights distrust, less. Unweighted (max - min), a biased judge that disagrees with the
    users on every answer it grades would draw the whole budget to examples whose label the
    trusted channels already agree on (measured in the demo: the reviewed examples' labels
    were wrong less often than a random example's).

    >>> disagreement({"explicit": 1.0, "implicit": 0.0})
    1.0
    >>> round(disagreement({"explicit": 1.0, "self_eval": 0.0}, {"explicit": 0.9, "self_eval": 0.1}), 2)
    0.36
    """
    if len(rewards) < 2:
        return 0.0
    trust = {c: 1.0 if weights is None else weights.get(c, 1.0) for c in rewards}
    total = sum(trust.values())
    if total <= 0:
        return 0.0
    mean = sum(trust[c] * r for c, r in rewards.items()) / total
    return min(1.0, 2 * sum(trust[c] * abs(r - mean) for c, r in rewards.items()) / total)


class ReviewSelector:
    """Picks the examples whose label is most uncertain, at most ``budget_per_hour`` per hour.

    Score, in [0, 1] when the weights sum to 1:

        score = w_d * disagreement(channel rewards present, their loss weights)
              + w_j * (1 - judge_confidence)
              + w_r / sqrt(1 + examples of this cohort seen before)

    A missing signal adds nothing (fewer than two channels: no disagreement; no judge
    confidence: no term). Hours are ``floor(timestamp / hour_s)`` of the examples themselves,
    never the wall clock, so a replay selects the same examples.

    A streaming selector cannot wait for the hour's best examples, and taking the first ones
    that come would spend the budget early on whatever arrives. So an example is selected
    when its score reaches a threshold and the hour still has budget; the threshold is the
    highest score-histogram bin edge such that at least ``budget_per_hour`` examples of the
    previous hour scored at or above it, so an hour like the last one spends its budget on
    its top scores (0 in the first hour, after an idle hour, or after a quieter one). The
    budget is a cap, not a quota: an hour whose scores run lower than the last (rarity falls
    as cohorts are seen) selects somewhat fewer. An
    example from an hour before the latest one seen comes too late: its hour is closed, it
    is counted for rarity and not selected.

    Parameters
    ----------
    budget_per_hour
        Most examples selected per hour.
    disagreement_weight, confidence_weight, rarity_weight
        ``w_d``, ``w_j``, ``w_r`` above.
    bins
        Resolution of the score histogram that sets the threshold.
    hour_s
        How long an hour of the budget lasts, in seconds of event time: 3600, unless time is
        compressed (the demo runs a day's loop in minutes and uses 30).

    Examples
    --------
    One example a minute, one in ten with disagreeing channels, two reviews an hour:

    >>> selector = ReviewSelector(budget_per_hour=2, rarity_weight=0.0)
    >>> def candidate(t):
    ...     implicit = 0.0 if t % 600 == 0 else 1.0
    ...     return ReviewCandidate(t, "a", {"explicit": 1.0, "implicit": implicit})
    >>> selector.score(candidate(0)), selector.score(candidate(60))
    (0.5, 0.0)

    The first hour has no threshold yet and spends its budget on the first examples; the
    next hour's threshold comes from the first hour's scores:

    >>> [t for t in range(0, 7200, 60) if selector.learn_one(candidate(t))]
    [0, 60, 3600, 4200]
    """

    hour_s = 3600.0  # for selectors pickled before the hour could be compressed

    def __init__(
        self,
        budget_per_hour: int,
        disagreement_weight: float = 0.5,
        confidence_weight: float = 0.3,
        rarity_weight: float = 0.2,
        bins: int = 100,
        hour_s: float = 3600.0,
    ):
        self.budget_per_hour = budget_per_hour
        self.hour_s = hour_s
        self.disagreement_weight = disagreement_weight
        self.confidence_weight = confidence_weight
        self.rarity_weight = rarity_weight
        self.bins = bins
        self._seen: dict[str, int] = {}
        self._hour: int | None = None
        self._selected_this_hour = 0
        self._this_hour_scores = np.zeros(bins)
        self._threshold = 0.0

    def terms(self, candidate: ReviewCandidate) -> dict[str, float]:
        """The score's weighted terms by name: why an example scored what it did (a reviewer
        reads them beside the example)."""
        spread = disagreement(candidate.rewards, candidate.weights)
        doubt = 0.0 if candidate.judge_confidence is None else 1.0 - candidate.judge_confidence
        rarity = 1.0 / math.sqrt(1 + self._seen.get(candidate.cohort, 0))
        return {
            "disagreement": self.disagreement_weight * spread,
            "judge_doubt": self.confidence_weight * doubt,
            "rarity": self.rarity_weight * rarity,
        }

    def score(self, candidate: ReviewCandidate) -> float:
        terms = self.terms(candidate)
        return terms["disagreement"] + terms["judge_doubt"] + terms["rarity"]

    def _start_hour(self, hour: int) -> None:
        if self._hour is not None and hour == self._hour + 1:
            # Highest bin whose tail (scores at or above its edge) still fills the budget.
            tail = np.cumsum(self._this_hour_scores[::-1])[::-1]
            fills = np.flatnonzero(tail >= self.budget_per_hour)
            self._threshold = fills[-1] / self.bins if fills.size else 0.0
        else:
            self._threshold = 0.0
        self._hour = hour
        self._selected_this_hour = 0
        self._this_hour_scores[:] = 0.0

    @property
    def threshold(self) -> float:
        """The score an example of the current hour must reach to be picked."""
        return self._threshold

    def learn_one(self, candidate: ReviewCandidate) -> bool:
        """Score the candidate, count it, and say whether to send it for review."""
        s = self.score(candidate)
        self._seen[candidate.cohort] = self._seen.get(candidate.cohort, 0) + 1
        hour = math.floor(candidate.timestamp / self.hour_s)
        if self._hour is not None and hour < self._hour:
            return False
        if hour != self._hour:
            self._start_hour(hour)
        self._this_hour_scores[min(max(int(s * self.bins), 0), self.bins - 1)] += 1
        if s >= self._threshold and self._selected_this_hour < self.budget_per_hour:
            self._selected_this_hour += 1
            return True
        return False
