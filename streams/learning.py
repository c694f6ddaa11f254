"""The online learners as the live system runs them, as plain deterministic Python.

One :class:`LearnerState` holds everything the learners know: the router (which adapter
serves whom), the adapter lifecycle (champion, challengers and their A/B tests, ended
adapters: ``streams.lifecycle``, whose transitions the router follows), a drift monitor, the
review selector and the loss weights that combine reward channels. It reads two topics:
annotated examples (``learn_one``) and control events (``apply_control``: adapters loaded,
promoted, rolled back, pinned), and returns what the system must hear about: control events
(drift alarms, A/B verdicts) and review requests. Times come from the examples, never from
the wall clock, so the same records in the same order give the same state and the same
outputs, live or in a replay. The Faust worker (``streams.learner_agents``) only decodes,
calls this and emits.

The gateway never sees this object: it routes with a :class:`RouterSnapshot`, a portable,
pickle-free copy of the router's numbers (``LinUCBRouter.to_bytes``/``from_bytes``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal, Union

import structlog
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from streams.config import LearnerSettings
from learners.ab_test import ABDecision, ABTest
from learners.active_learning import ReviewCandidate, ReviewSelector
from learners.drift import DriftAlarm as Detected
from learners.drift import DriftMonitor
from learners.loss_weights import LossWeights
from learners.router import LinUCBRouter
from streams.contract import (
    CONTROL_EVENT_ADAPTER,
    AdapterPinned,
    AdapterPromoted,
    AdapterRolledBack,
    AnnotatedExample,
    Context,
    DeadLetter,
    DriftAlarm,
)
from streams.intake import refused_record
from streams.lifecycle import ROLLBACK, Lifecycle, Transition
from streams.topics import EXAMPLES

log = structlog.get_logger(__name__)

SOURCE = "learners"
STAGE = "learner"  # of its dead letters

Feature = Union[str, int, float, bool]


def route_features(context: Context, app_id: str | None) -> dict[str, Feature]:
    """The router's view of a request. The gateway (deciding) and the learner (learning from
    the example) must build the same dict from the same context, so both call this.

    The named context fields win over free-form ``features`` of the same name."""
    named = {"app_id": app_id, "domain": context.domain, "locale": context.locale,
             "client": context.client, "cohort": context.cohort}  # fmt: skip
    return {**context.features, **{k: v for k, v in named.items() if v is not None}}


def combined_reward(rewards: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """One reward in [0, 1] from the channels present, weighted by the loss weights.

    The weights are renormalized over the channels present: an example with only implicit
    signals is judged by them alone, not pulled towards 0 by the missing ones. No channel at
    all is no observation (None), never a neutral 0.5."""
    present = {c: r for c, r in rewards.items() if r is not None}
    if not present:
        return None
    total = sum(weights[c] for c in present)
    # Clipped because float rounding may leave a weighted mean of [0, 1] values just outside.
    return min(1.0, max(0.0, sum(weights[c] * r for c, r in present.items()) / total))


def _event_id(kind: str, *parts: str) -> str:
    """A deterministic event id: the same decision taken again (after a crash or a takeover,
    replayed from the checkpoint) gets the same id, and consumers de-duplicate by it. Its
    parts name the example that caused it (app id, example id: each is learned once), so two
    decisions never share an id: the base model can be rolled back twice (a drift alarm
    reopens it), and its reward detector restarts its index. Hashed because adapter names and
    drift signals may hold characters event ids do not allow."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]
    return f"{kind}-{digest}"


class ReviewRequest(BaseModel):
    """An annotated example picked for human review, on ``feedloop.review.v1``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    type: Literal["review_request"] = "review_request"
    review_id: str
    score: float
    # Why it was picked: the score's weighted terms (ReviewSelector.terms); absent from
    # requests emitted before they were recorded.
    terms: dict[str, float] = Field(default_factory=dict)
    threshold: float | None = Field(None, description="The hour's threshold the score reached.")
    selected_at: AwareDatetime
    example: AnnotatedExample


ControlOut = Union[DriftAlarm, AdapterPromoted, AdapterRolledBack]


@dataclass
class LearnerOutputs:
    control: list[ControlOut] = field(default_factory=list)
    reviews: list[ReviewRequest] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)  # input records it could not read


@dataclass(frozen=True)
class RouterSnapshot:
    """The router at one version, as the gateway loads it."""

    version: int
    examples: int
    arms: tuple[str, ...]
    data: bytes


class LearnerState:
    """All learner state; pickles whole (the worker checkpoints it).

    ``version`` counts the changes applied (examples learned, lifecycle transitions, pins), so
    a snapshot or checkpoint names the state it holds. ``positions`` is the last offset handled
    per (topic, partition), so records redelivered after a crash are recognized and skipped.
    """

    def __init__(self, config: LearnerSettings) -> None:
        self.config = config
        self.router = LinUCBRouter(config.initial_arms, alpha=config.alpha, floor=config.floor,
                                   min_propensity=config.min_propensity, noise_prior_weight=config.noise_prior_weight,
                                   dim=config.feature_dim, l2=config.l2, seed=config.seed)  # fmt: skip
        self.lifecycle = Lifecycle(config)  # its live arms are the router's, in the same order
        self.drift = DriftMonitor(recent_window=config.drift_recent_window, features=config.drift_features)
        self.review = ReviewSelector(config.review_budget_per_hour, hour_s=config.review_hour_s)
        self.loss_weights = LossWeights()
        self.version = 0
        self.examples = 0
        self.positions: dict[tuple[str, int], int] = {}
        # The last example_memory example ids, oldest first (a dict: an ordered set). Offsets
        # alone miss an example emitted again at a new offset, which the pipeline does when a
        # checkpoint fails after its outputs went out.
        self.seen_examples: dict[tuple[str, str], None] = {}  # (app id, example id)

    # --- records as they come off the topics -------------------------------------------------

    def handle(self, topic: str, partition: int, offset: int, value: bytes | None,
               timestamp_s: float | None = None) -> LearnerOutputs | None:  # fmt: skip
        """One record of the examples or the control topic (``timestamp_s``: its broker
        timestamp); None when the state already holds it."""
        if offset <= self.positions.get((topic, partition), -1):
            return None
        self.positions[(topic, partition)] = offset
        value = value or b""
        try:
            record = (AnnotatedExample.model_validate_json(value) if topic == EXAMPLES.name
                      else CONTROL_EVENT_ADAPTER.validate_json(value))  # fmt: skip
        except ValidationError as error:
            # Another producer's bad record must not stop learning: it becomes a dead letter.
            refused = refused_record(error, value, topic=topic, partition=partition, offset=offset,
                                     timestamp_s=timestamp_s, stage=STAGE)  # fmt: skip
            log.error("learners.undecodable", topic=topic, partition=partition, offset=offset, reason=refused.reason)
            return LearnerOutputs(dead_letters=[refused])
        if isinstance(record, AnnotatedExample):
            if (key := record.key) in self.seen_examples:
                log.info("learners.duplicate_example", example_id=record.example_id, topic=topic, partition=partition,
                         offset=offset)  # fmt: skip
                return LearnerOutputs()
            self.seen_examples[key] = None
            if len(self.seen_examples) > self.config.example_memory:
                del self.seen_examples[next(iter(self.seen_examples))]
            return self.learn_one(record)
        self.apply_control(record)
        return LearnerOutputs()

    # --- examples ------------------------------------------------------------------------------

    def learn_one(self, example: AnnotatedExample) -> LearnerOutputs:
        out = LearnerOutputs()
        self.examples += 1
        self.version += 1
        at = example.occurred_at.timestamp()
        features = route_features(example.context, example.app_id)
        for alarm in self.drift.update_features(features, at):
            out.control.append(self._drift_event(alarm, example))
        self.loss_weights.learn_one(example.rewards)
        reward = combined_reward(example.rewards, self.loss_weights.weights())
        if reward is not None and example.adapter in self.router.arms:
            # Rewards of removed arms are late feedback for a retired adapter: nothing to learn.
            self.router.learn_one(example.adapter, features, reward)
            if alarm := self.drift.update_reward(example.adapter, reward, at):
                out.control.append(self._drift_event(alarm, example))
                out.control += self._preferences_moved(alarm.what, example)
            out.control += self._feed_experiments(example, reward)
        if example.training_consent:  # review feeds training: never for users who opted out
            present = {c: r for c, r in example.rewards.items() if r is not None}
            candidate = ReviewCandidate(at, example.cohort, present, weights=self.loss_weights.weights())
            terms = self.review.terms(candidate)
            if self.review.learn_one(candidate):
                out.reviews.append(ReviewRequest(review_id=f"review-{example.example_id}", score=sum(terms.values()),
                                                 terms=terms, threshold=self.review.threshold,
                                                 selected_at=example.closed_at, example=example))  # fmt: skip
        return out

    def _drift_event(self, alarm: Detected, example: AnnotatedExample) -> DriftAlarm:
        details = {"index": float(alarm.index), "mean_after": alarm.mean_after}
        if not math.isnan(alarm.mean_before):  # NaN has no JSON form: absent means "no data before"
            details["mean_before"] = alarm.mean_before
        log.info("learners.drift", signal=alarm.what, detector=alarm.detector, **details)
        return DriftAlarm(event_id=_event_id("drift", alarm.what, str(alarm.index), *example.key),
                          occurred_at=example.closed_at, source=SOURCE, signal=alarm.what,
                          detector=alarm.detector, detected_at=example.occurred_at, details=details)  # fmt: skip

    def _feed_experiments(self, example: AnnotatedExample, reward: float) -> list[ControlOut]:
        verdicts = []
        for outcome in self.lifecycle.observe(example.adapter, reward, example.propensity, example.probabilities,
                                              example.cohort):
            test, decision = outcome.test, outcome.decision
            if decision.verdict != "continue":
                verdicts.append(self._verdict(test, decision, outcome.transition, example,
                                              decision.verdict))  # fmt: skip
                self._follow(outcome.transition)
            elif test.challenger in self.router.caps and _canary_cleared(decision, test.min_samples):
                self.router.set_cap(test.challenger, None)
                log.info("learners.canary_cleared", challenger=test.challenger, lift=decision.lift,
                         n_challenger=decision.n_challenger)  # fmt: skip
        return verdicts

    def _preferences_moved(self, signal: str, example: AnnotatedExample) -> list[ControlOut]:
        """A reward drift alarm: the lifecycle rolls the tests back and reopens the base model
        (``Lifecycle.preferences_moved`` says why). The learner publishes the rollbacks, and
        forgets the base model's rewards when its test starts afresh: those from before the
        shift are another population's."""
        moved = self.lifecycle.preferences_moved(signal)
        if any(test.challenger == self.lifecycle.fallback for test in moved.started):
            self.drift.forget_reward(self.lifecycle.fallback)
        self._follow(moved)
        return [self._verdict(test, test.decision(), moved, example, "ended_by_drift")
                for test, how in moved.ended if how == ROLLBACK]  # fmt: skip

    def _verdict(self, test: ABTest, decision: ABDecision, transition: Transition, example: AnnotatedExample,
                 verdict: str) -> ControlOut:  # fmt: skip
        """The control event of a test the lifecycle has ended at ``example``; applied already,
        so that when it comes back on the control topic it is a no-op and it is never
        published twice."""
        at, cause = example.closed_at, example.key
        evidence = {k: float(v) for k, v in (("lift", decision.lift), ("lower", decision.lower),
                    ("upper", decision.upper), ("n_champion", decision.n_champion),
                    ("n_challenger", decision.n_challenger)) if math.isfinite(v)}  # fmt: skip
        if transition.promoted == test.challenger:
            event: ControlOut = AdapterPromoted(
                event_id=_event_id("promote", test.challenger, *cause), occurred_at=at, source=SOURCE,
                adapter=test.challenger, previous_champion=test.champion, evidence=evidence,
            )  # fmt: skip
        else:
            event = AdapterRolledBack(
                event_id=_event_id("rollback", test.challenger, *cause), occurred_at=at, source=SOURCE,
                adapter=test.challenger, reason=transition.rolled_back[test.challenger], evidence=evidence,
            )  # fmt: skip
        log.info("learners.ab_verdict", verdict=verdict, challenger=test.challenger, champion=test.champion,
                 **evidence)  # fmt: skip
        return event

    # --- adapter lifecycle ---------------------------------------------------------------------

    def apply_control(self, event: object) -> None:
        """Adapters loaded, promoted or rolled back (the lifecycle's rules) or pinned (the
        router's); other control events do not concern the learners. Drift alarms are the
        learner's own, applied when it raised them. Idempotent: an event seen twice (or the
        learner's own verdict coming back) changes nothing the second time."""
        if isinstance(event, AdapterPinned):
            if self._pin(event.adapter):
                self._changed()
        else:
            self._follow(self.lifecycle.apply(event))

    def _follow(self, transition: Transition) -> None:
        """The router serves what the lifecycle has live: an arm that joined as a canary (at
        most ``canary_share`` of traffic) warm-started at the champion's weights, which it
        was trained from; a promoted one uncapped."""
        if transition.refused is not None:
            log.warning("learners.lifecycle_refused", why=transition.refused)
        if not transition:
            return
        for arm in transition.left:
            self.router.remove_arm(arm)
        for arm in transition.joined:
            self.router.add_arm(arm, warm_start_from=self.lifecycle.champion)
            self.router.set_cap(arm, self.config.canary_share)
        if transition.promoted is not None:
            self.router.set_cap(transition.promoted, None)
        share = self.config.ab_min_share
        self.router.hold({arm: share for test in self.lifecycle.experiments.values()
                          for arm in (test.champion, test.challenger)})  # fmt: skip
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        log.info("learners.arms", arms=self.router.arms, champion=self.lifecycle.champion,
                 experiments=sorted(self.lifecycle.experiments))  # fmt: skip

    def _pin(self, adapter: str | None) -> bool:
        if adapter is not None and adapter not in self.router.arms:
            log.warning("learners.pin_unknown_adapter", adapter=adapter, arms=self.router.arms)
            return False
        if adapter == self.router.pinned:
            return False
        self.router.pin(adapter)
        return True

    # --- the router for the gateway --------------------------------------------------------------

    def snapshot(self) -> RouterSnapshot:
        return RouterSnapshot(self.version, self.examples, self.router.arms, self.router.to_bytes())


def _canary_cleared(decision: ABDecision, min_samples: int) -> bool:
    """The cap guards traffic from an adapter nobody has measured, whose wide confidence
    bound would make it the router's greedy choice. Once both arms have ``min_samples``
    rewards in its test and it is not behind the champion, the router's own estimates decide
    (as a progressive rollout steps up a canary whose metrics look healthy); the test goes on
    to its verdict."""
    return min(decision.n_champion, decision.n_challenger) >= min_samples and decision.lift >= 0
