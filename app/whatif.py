"""`feedloop whatif`: what a router setting, or a pin, would have earned on the logged traffic.

The learner is replayed over the archived examples and control events, exactly as a rebuild
of its checkpoint folds them (``streams.learner_agents.rebuild_learners``): same order, same
lifecycle, same rewards (the loss-weighted channels). Before each example is learned, the
candidate is asked what it would have done with that request: the router as it was at that
moment with other exploration settings (``--alpha``, ``--floor``), or a pinned adapter. Its
answer and the logged decision (adapter, propensity) go to an ``OffPolicyEvaluator``, which
gives IPS, SNIPS and DR with their intervals; the mean reward of the same examples is the
logged policy's value beside them.

Why replay rather than score the newest router: the candidate must be judged on what it
could have known at each request. A router fitted on the whole week and scored on that week
has seen every reward it is judged on. Asked before it learns each example, the candidate
is a function of the past only, so the logged propensities keep IPS unbiased for it (the
policy sequence is predictable; Li, Chu, Langford & Wang, "Unbiased offline evaluation of
contextual-bandit-based news article recommendation algorithms", WSDM 2011). Not modelled:
that a different router would have collected different rewards and learned differently;
the candidate learns from the logged rewards, as the live router did.

Only requests the router chose count (a propensity; an adapter the client named is no
decision). A pin counts the requests in which its adapter was live: before it was loaded, or
after it ended, pinning it was not an option.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from pydantic import ValidationError

from app.settings import Settings
from learners.off_policy import Estimate, OffPolicyEvaluator
from learners.router import LinUCBRouter
from streams.archive import ArchivedRecord
from streams.checkpoint import Checkpoints, Rebuild
from streams.contract import AnnotatedExample
from streams.learner_agents import rebuild_learners
from streams.learning import LearnerState, combined_reward, route_features
from streams.replay import TimeRange
from streams.store import make_engine, make_sessionmaker
from streams.topics import EXAMPLES


@dataclass(frozen=True)
class Candidate:
    """A router's exploration settings (None: as logged) or one adapter pinned."""

    alpha: float | None = None
    floor: float | None = None
    min_propensity: float | None = None
    pin: str | None = None

    def __post_init__(self) -> None:
        if self.pin is not None and self.settings():
            raise ValueError("a pin sends everything to one adapter: it has no exploration settings")
        for name in ("floor", "min_propensity"):
            if (value := getattr(self, name)) is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")

    def settings(self) -> dict[str, float]:
        """The exploration settings it changes."""
        return {name: value for name in ("alpha", "floor", "min_propensity")
                if (value := getattr(self, name)) is not None}  # fmt: skip

    def probabilities(self, router: LinUCBRouter, context: dict[str, Any]) -> dict[str, float] | None:
        """What it would have done with this request, or None when it was not an option."""
        if self.pin is not None:
            return {self.pin: 1.0} if self.pin in router.arms else None
        view = copy.copy(router)  # shares the arms' models, read only; the settings are its own
        view.pinned = None  # the candidate is this router, not whatever an operator had pinned
        for name, value in self.settings().items():
            setattr(view, name, value)
        return view.probabilities(context)

    def describe(self) -> str:
        if self.pin is not None:
            return f"pin {self.pin}"
        settings = [f"{name}={value}" for name, value in self.settings().items()]
        return "router " + (", ".join(settings) or "as logged") + ", as it was at each request"


@dataclass(frozen=True)
class WhatIf:
    candidate: str
    estimates: dict[str, Estimate]  # "ips", "snips", "dr", "logged"
    n: int
    confidence: float

    def to_json(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "n": self.n, "confidence": self.confidence,
                "estimates": {k: {"value": e.value, "lower": e.lower, "upper": e.upper}
                              for k, e in self.estimates.items()}}  # fmt: skip

    def render(self) -> str:
        lines = [f"what if: {self.candidate}; {self.n} logged decisions; {self.confidence:.0%} intervals",
                 f"{'estimator':<10} {'value':>7}  interval"]  # fmt: skip
        for name, e in self.estimates.items():
            lines.append(f"{name:<10} {e.value:>7.3f}  [{e.lower:.3f}, {e.upper:.3f}]")
        return "\n".join(lines)


class _Evaluation:
    """The fold of one what-if: the learner's own, with the candidate asked before each example."""

    def __init__(self, candidate: Candidate, window: TimeRange, confidence: float) -> None:
        self.candidate = candidate
        self.window = window
        self.evaluator = OffPolicyEvaluator(None, confidence=confidence)
        self.rewards = self.rewards_sq = 0.0  # of the evaluated examples: the logged policy's value

    def fold(self, base: Rebuild[LearnerState]):
        def fold(state: LearnerState, record: ArchivedRecord) -> None:
            example = self._decision(record)
            if example is None:
                base.fold(state, record)
                return
            features = route_features(example.context, example.app_id)
            target = self.candidate.probabilities(state.router, features)
            learned = state.examples
            base.fold(state, record)
            if state.examples == learned or target is None:
                return  # a duplicate or redelivery the learner skipped, or the candidate had no say
            reward = combined_reward(example.rewards, state.loss_weights.weights())  # the learner's own
            if reward is not None:
                self.evaluator.learn_one(features, example.adapter, reward, example.propensity, target)
                self.rewards += reward
                self.rewards_sq += reward * reward

        return fold

    def _decision(self, record: ArchivedRecord) -> AnnotatedExample | None:
        """The example of a router decision inside the window, else None."""
        if record.topic != EXAMPLES.name:
            return None
        try:
            example = AnnotatedExample.model_validate_json(record.value or b"")
        except ValidationError:
            return None  # the learner's fold makes it a dead letter
        inside = int(example.occurred_at.timestamp() * 1000) in self.window
        return example if inside and example.propensity is not None else None

    def result(self) -> WhatIf:
        e, n = self.evaluator, self.evaluator.n
        if n < 2:
            raise ValueError(f"{n} logged decision(s) with a reward to evaluate on: an interval needs 2")
        mean = self.rewards / n
        se = math.sqrt(max(0.0, (self.rewards_sq - self.rewards * mean) / (n - 1)) / n)
        z = NormalDist().inv_cdf(0.5 + e.confidence / 2)
        logged = Estimate(mean, mean - z * se, mean + z * se, n)
        return WhatIf(self.candidate.describe(), {"IPS": e.ips(), "SNIPS": e.snips(), "DR": e.doubly_robust(),
                                                  "logged": logged}, n, e.confidence)  # fmt: skip


def run_whatif(settings: Settings, candidate: Candidate, *, since: str | None, until: str | None,
               confidence: float = 0.95) -> WhatIf:
    """Replay the archived learner inputs with ``candidate`` asked before each example."""
    evaluation = _Evaluation(candidate, TimeRange.parse(since, until), confidence)
    base = rebuild_learners(settings.learners)
    rebuild = Rebuild(topics=base.topics, partition=base.partition, fresh=base.fresh, fold=evaluation.fold(base),
                      place=base.place)  # fmt: skip
    engine = make_engine(settings.store_url)
    try:
        # No broker life of its own (""): every archived life is folded, in order.
        Checkpoints(make_sessionmaker(engine), settings.objects, consumer="feedloop-whatif", cluster_id="",
                    format_version=0).fold_archive(rebuild)  # fmt: skip
    finally:
        engine.dispose()
    return evaluation.result()
