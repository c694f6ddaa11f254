"""The online learners as the live system runs them, as plain deterministic Python.

One :class:`LearnerState` holds everything the learners know: the router (which adapter
serves whom), a drift monitor, one A/B test per running experiment, the review selector and
the loss weights that combine reward channels. It reads two topics: annotated examples
(``learn_one``) and control events (``apply_control``: adapters loaded, promoted, rolled
back), and returns what the system must hear about: control events (drift alarms, A/B
verdicts) and review requests. Times come from the examples, never from the wall clock, so
the same records in the same order give the same state and the same outputs, live or in a
replay. The Faust worker (``streams.learner_agents``) only decodes, calls this and emits.

The gateway never sees this object: it routes with a :class:`RouterSnapshot`, a portable,
pickle-free copy of the router's numbers (``LinUCBRouter.to_bytes``/``from_bytes``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Union

import structlog
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from streams.config import LearnerSettings
from learners.ab_test import ABDecision, ABTest
from learners.active_learning import ReviewCandidate, ReviewSelector
from learners.drift import DriftAlarm as Detected
from learners.drift import DriftMonitor
from learners.loss_weights import LossWeights
from learners.router import LinUCBRouter
from streams.contract import (
    CONTROL_EVENT_ADAPTER,
    AdapterLoaded,
    AdapterPinned,
    AdapterPromoted,
    AdapterRolledBack,
    AnnotatedExample,
    Context,
    DriftAlarm,
)
from streams.topics import EXAMPLES

log = structlog.get_logger(__name__)

SOURCE = "learners"

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
    """A deterministic event id: the same decision taken again (after a crash) gets the same
    id, and consumers de-duplicate by it. Hashed because adapter names and drift signals may
    hold characters event ids do not allow."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:24]
    return f"{kind}-{digest}"


class ReviewRequest(BaseModel):
    """An annotated example picked for human review, on ``feedloop.review.v1``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    type: Literal["review_request"] = "review_request"
    review_id: str
    score: float
    selected_at: AwareDatetime
    example: AnnotatedExample


ControlOut = Union[DriftAlarm, AdapterPromoted, AdapterRolledBack]


@dataclass
class LearnerOutputs:
    control: list[ControlOut] = field(default_factory=list)
    reviews: list[ReviewRequest] = field(default_factory=list)


@dataclass(frozen=True)
class RouterSnapshot:
    """The router at one version, as the gateway loads it."""

    version: int
    examples: int
    arms: tuple[str, ...]
    data: bytes


class LearnerState:
    """All learner state; pickles whole (the worker checkpoints it).

    ``version`` counts the changes applied (examples learned, arms added or removed), so a
    snapshot or checkpoint names the state it holds. ``positions`` is the last offset handled
    per (topic, partition), so records redelivered after a crash are recognized and skipped.
    """

    def __init__(self, config: LearnerSettings) -> None:
        self.config = config
        self.router = LinUCBRouter(config.initial_arms, alpha=config.alpha, floor=config.floor,
                                   dim=config.feature_dim, l2=config.l2, seed=config.seed)  # fmt: skip
        self.champion = config.initial_arms[0]  # always a live arm: the last arm is never removed
        self.drift = DriftMonitor(recent_window=config.drift_recent_window, features=config.drift_features)
        self.experiments: dict[str, ABTest] = {}  # challenger -> its test against the champion
        self.ended: set[str] = set()  # retired or rolled back: names are never reused, never re-added
        self.review = ReviewSelector(config.review_budget_per_hour)
        self.loss_weights = LossWeights()
        self.version = 0
        self.examples = 0
        self.positions: dict[tuple[str, int], int] = {}

    # --- records as they come off the topics -------------------------------------------------

    def handle(self, topic: str, partition: int, offset: int, value: bytes) -> LearnerOutputs | None:
        """One record of the examples or the control topic; None when the state already holds it."""
        if offset <= self.positions.get((topic, partition), -1):
            return None
        self.positions[(topic, partition)] = offset
        try:
            record = (AnnotatedExample.model_validate_json(value) if topic == EXAMPLES.name
                      else CONTROL_EVENT_ADAPTER.validate_json(value))  # fmt: skip
        except ValidationError as error:
            # Another producer's bad record must not stop learning; it stays in the archive.
            log.error("learners.undecodable", topic=topic, partition=partition, offset=offset,
                      error=str(error)[:500])  # fmt: skip
            return LearnerOutputs()
        if isinstance(record, AnnotatedExample):
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
                out.control += self._end_experiments(alarm.what, example.closed_at)
                self._reopen_fallback()
            out.control += self._feed_experiments(example, reward)
        if example.training_consent:  # review feeds training: never for users who opted out
            present = {c: r for c, r in example.rewards.items() if r is not None}
            candidate = ReviewCandidate(at, example.cohort, present)
            score = self.review.score(candidate)
            if self.review.learn_one(candidate):
                out.reviews.append(ReviewRequest(review_id=f"review-{example.example_id}", score=score,
                                                 selected_at=example.closed_at, example=example))  # fmt: skip
        return out

    def _drift_event(self, alarm: Detected, example: AnnotatedExample) -> DriftAlarm:
        details = {"index": float(alarm.index), "mean_after": alarm.mean_after}
        if not math.isnan(alarm.mean_before):  # NaN has no JSON form: absent means "no data before"
            details["mean_before"] = alarm.mean_before
        log.info("learners.drift", signal=alarm.what, detector=alarm.detector, **details)
        return DriftAlarm(event_id=_event_id("drift", alarm.what, str(alarm.index)),
                          occurred_at=example.closed_at, source=SOURCE, signal=alarm.what,
                          detector=alarm.detector, detected_at=example.occurred_at, details=details)  # fmt: skip

    def _feed_experiments(self, example: AnnotatedExample, reward: float) -> list[ControlOut]:
        verdicts = []
        for test in list(self.experiments.values()):
            # A verdict earlier in this loop may have replaced the test (a promotion restarts
            # the others against the new champion): the old one must not decide anything.
            current = self.experiments.get(test.challenger) is test
            if not current or example.adapter not in (test.champion, test.challenger):
                continue
            test.update(example.adapter, reward, cohort=example.cohort)
            decision = test.decision()
            if decision.verdict != "continue":
                verdicts.append(self._conclude(test, decision, example.closed_at))
            elif test.challenger in self.router.caps and _canary_cleared(decision, test.min_samples):
                self.router.set_cap(test.challenger, None)
                log.info("learners.canary_cleared", challenger=test.challenger, lift=decision.lift,
                         n_challenger=decision.n_challenger)  # fmt: skip
        return verdicts

    def _end_experiments(self, signal: str, at: datetime) -> list[ControlOut]:
        """The users' preferences moved under the running tests (a reward drift alarm): their
        challengers were trained on feedback from before, and their sums mix two populations
        under changing traffic shares. They are rolled back, which frees the experiment slot
        for adapters trained after the shift. A test of the fallback (opened by an earlier
        alarm) starts afresh instead: it is the test that asks what the new preferences say."""
        reason = f"drift: {signal} moved during the test; the challenger learned from feedback before it"
        fallback = self.config.initial_arms[0]
        if fallback in self.experiments:
            self.experiments[fallback] = self._new_test(fallback)
            self.drift.forget_reward(fallback)
        return [self._conclude(test, test.decision(), at, ended_by=reason)
                for test in list(self.experiments.values()) if test.challenger != fallback]  # fmt: skip

    def _reopen_fallback(self) -> None:
        """The champion, too, learned from feedback before the preferences moved. The fallback
        (the first initial arm: the base model, which is always served) comes back as a
        challenger with its reward detector reset, so that the router can send traffic back
        to it, and its A/B test decides under the new preferences whether the champion is
        still better than no adaptation at all."""
        fallback = self.config.initial_arms[0]
        if fallback in self.router.arms:
            return
        self.ended.discard(fallback)
        self.drift.forget_reward(fallback)  # its rewards from before the shift are another population's
        self._load(fallback)
        self._changed()

    def _conclude(self, test: ABTest, decision: ABDecision, at: datetime, ended_by: str | None = None) -> ControlOut:
        evidence = {k: float(v) for k, v in (("lift", decision.lift), ("lower", decision.lower),
                    ("upper", decision.upper), ("n_champion", decision.n_champion),
                    ("n_challenger", decision.n_challenger)) if math.isfinite(v)}  # fmt: skip
        if ended_by is None and decision.verdict == "promote":
            event: ControlOut = AdapterPromoted(
                event_id=_event_id("promote", test.challenger), occurred_at=at, source=SOURCE,
                adapter=test.challenger, previous_champion=test.champion, evidence=evidence,
            )  # fmt: skip
        else:
            if ended_by is not None:
                reason = ended_by
            elif decision.verdict == "inconclusive":
                reason = f"ab_test: no significant lift over {test.champion} after {test.max_samples} rewards each"
            else:
                where = f"in cohorts {', '.join(decision.harmed_cohorts)}" if decision.harmed_cohorts else "overall"
                reason = f"ab_test: challenger worse than {test.champion} {where}"
            event = AdapterRolledBack(
                event_id=_event_id("rollback", test.challenger), occurred_at=at, source=SOURCE,
                adapter=test.challenger, reason=reason, evidence=evidence,
            )  # fmt: skip
        log.info("learners.ab_verdict", verdict="ended_by_drift" if ended_by else decision.verdict,
                 challenger=test.challenger, champion=test.champion, **evidence)  # fmt: skip
        # The same transition as when the event comes back on the control topic (then a
        # no-op), so the verdict is in the state at once and is never published twice.
        self.apply_control(event)
        return event

    # --- adapter lifecycle ---------------------------------------------------------------------

    def apply_control(self, event: object) -> None:
        """Adapters loaded, promoted, rolled back or pinned; other control events do not
        concern the learners. Idempotent: an event seen twice (or the learner's own verdict
        coming back) changes nothing the second time."""
        if isinstance(event, AdapterLoaded):
            changed = self._load(event.adapter)
        elif isinstance(event, AdapterPromoted):
            changed = self._promote(event.adapter)
        elif isinstance(event, AdapterRolledBack):
            changed = self._retire(event.adapter)
        elif isinstance(event, AdapterPinned):
            changed = self._pin(event.adapter)
        else:
            changed = False
        if changed:
            self._changed()

    def _changed(self) -> None:
        self.version += 1
        log.info("learners.arms", arms=self.router.arms, champion=self.champion,
                 experiments=sorted(self.experiments))  # fmt: skip

    def _new_test(self, challenger: str) -> ABTest:
        c = self.config
        return ABTest(self.champion, challenger, alpha=c.ab_alpha, min_samples=c.ab_min_samples, tau=c.ab_tau,
                      max_samples=c.ab_max_samples)

    def _load(self, adapter: str) -> bool:
        """A new adapter joins the router as a canary (at most ``canary_share`` of traffic),
        warm-started at the champion's weights (it was trained from it), and an experiment
        against the champion starts. An adapter already live (replicas reloaded) starts nothing."""
        if adapter in self.router.arms or adapter in self.ended:
            return False
        self.router.add_arm(adapter, warm_start_from=self.champion)
        self.router.set_cap(adapter, self.config.canary_share)
        self.experiments[adapter] = self._new_test(adapter)
        return True

    def _promote(self, adapter: str) -> bool:
        """The challenger replaces the champion: the old champion is retired from routing."""
        if adapter == self.champion:
            return False
        if adapter not in self.router.arms:
            log.warning("learners.promote_unknown_adapter", adapter=adapter)
            return False
        retired = self.champion
        self.experiments.pop(adapter, None)
        self._set_champion(adapter)
        self.router.set_cap(adapter, None)
        self.router.remove_arm(retired)
        self.ended.add(retired)
        return True

    def _retire(self, adapter: str) -> bool:
        ended = self.experiments.pop(adapter, None) is not None
        if adapter not in self.router.arms:
            self.ended.add(adapter)  # a late adapter_loaded must not bring it back
            return ended
        if len(self.router.arms) == 1:
            log.warning("learners.last_arm_kept", adapter=adapter)  # every request needs an arm
            return ended
        self.router.remove_arm(adapter)
        self.ended.add(adapter)
        if adapter == self.champion:
            self._set_champion(self.router.arms[0])  # the oldest live arm
        return True

    def _pin(self, adapter: str | None) -> bool:
        if adapter is not None and adapter not in self.router.arms:
            log.warning("learners.pin_unknown_adapter", adapter=adapter, arms=self.router.arms)
            return False
        if adapter == self.router.pinned:
            return False
        self.router.pin(adapter)
        return True

    def _set_champion(self, adapter: str) -> None:
        # Running experiments compared their challengers with the old champion, whose rewards
        # stop now: they start again against the new one.
        self.champion = adapter
        self.experiments = {c: self._new_test(c) for c in self.experiments if c != adapter}

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
