"""The adapter lifecycle: which adapters serve, which one is the champion, which are on trial.

One :class:`Lifecycle` holds the champion, the live arms (in the order they joined), one
:class:`~learners.ab_test.ABTest` per challenger against the champion, and the adapters that
ended, retired or rolled back. Control events move it (``apply``); rewards feed its tests,
and a verdict is applied at once (``observe``); a reward drift alarm ends the tests and
brings the base model back (``preferences_moved``). Each returns a :class:`Transition`, what
changed, for the caller to act on.

The rules are written here once, for the two that follow them. The learner
(``streams.learning``) makes its router follow each transition and publishes the verdicts.
The overview (``app.overview``) folds the archived log through the same machine and only
draws what it returns, so the dashboard cannot tell a story the learner does not: an
adapter the learner has ended stays ended there too. Pure and deterministic: no clock, no
I/O, no logging; the same calls in the same order give the same state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from learners.ab_test import ABDecision, ABTest
from streams.config import LearnerSettings
from streams.contract import AdapterLoaded, AdapterPromoted, AdapterRolledBack, AdapterState

# How a test ends: its challenger promoted or rolled back, or restarted against a new champion.
PROMOTE, ROLLBACK, RESTARTED = "promote", "rollback", "restarted"


@dataclass
class Transition:
    """What one event changed; false when it changed nothing (seen before, or refused: then
    ``refused`` says why).

    ``joined``: arms that went live, canaries to warm-start at the champion's weights (they
    were trained from it). ``left``: arms that stopped serving. ``promoted`` became the
    champion over ``retired``. ``rolled_back``: each adapter rolled back, with why. ``ended``:
    the tests stopped, each with how (``PROMOTE``, ``ROLLBACK`` or ``RESTARTED``), in order;
    ``started``: the tests begun. No test is both started and ended in one transition.
    """

    joined: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    promoted: str | None = None
    retired: str | None = None
    rolled_back: dict[str, str] = field(default_factory=dict)
    ended: list[tuple[ABTest, str]] = field(default_factory=list)
    started: list[ABTest] = field(default_factory=list)
    refused: str | None = None

    def __bool__(self) -> bool:
        return bool(self.joined or self.left or self.promoted or self.rolled_back or self.ended or self.started)


@dataclass(frozen=True)
class Outcome:
    """A test fed one reward: its decision after it, and what its verdict changed (nothing
    while the verdict is "continue")."""

    test: ABTest
    decision: ABDecision
    transition: Transition


class Lifecycle:
    """Champion, live arms, experiments and ended adapters, moved only by the rules below.

    Invariants: the champion is live; every challenger under test is live, and its test is
    against the current champion; the last live arm is never removed (every request needs
    one); an ended adapter never comes back, since names are never reused, except the
    fallback (the first initial arm, the base model the hot-swap controller always serves),
    which a reward drift alarm reopens. Idempotent: an event applied twice (the learner's own
    verdict coming back on the control topic) changes nothing the second time.

    Parameters
    ----------
    config
        The initial arms (the first is the champion and the fallback) and the A/B test's
        parameters.

    Examples
    --------
    >>> life = Lifecycle(LearnerSettings(initial_arms=["base"]))
    >>> life.load("code-v1").joined, life.experiments["code-v1"].champion
    (['code-v1'], 'base')
    >>> moved = life.roll_back("code-v1", "operator: wrong tone")
    >>> moved.left, moved.ended[0][1], life.state_of("code-v1")
    (['code-v1'], 'rollback', <AdapterState.ROLLED_BACK: 'rolled_back'>)
    >>> bool(life.load("code-v1"))  # a late announcement: an ended adapter never comes back
    False
    >>> life.load("code-v2").started[0].challenger
    'code-v2'
    >>> promoted = life.promote("code-v2")
    >>> promoted.retired, life.champion, life.live, life.state_of("base")
    ('base', 'code-v2', ['code-v2'], <AdapterState.RETIRED: 'retired'>)
    >>> drift = life.preferences_moved("reward:code-v2")  # the base model is tested again
    >>> drift.joined, life.experiments["base"].champion
    (['base'], 'code-v2')
    """

    def __init__(self, config: LearnerSettings) -> None:
        self.config = config
        self.live: list[str] = list(config.initial_arms)
        self.champion = self.live[0]
        self.experiments: dict[str, ABTest] = {}  # challenger -> its test against the champion
        self.ended: dict[str, AdapterState] = {}  # adapter -> RETIRED or ROLLED_BACK

    @property
    def fallback(self) -> str:
        return self.config.initial_arms[0]

    def state_of(self, adapter: str) -> AdapterState | None:
        """Its role here; None for an adapter this lifecycle has not met."""
        if adapter == self.champion:
            return AdapterState.CHAMPION
        if adapter in self.experiments:
            return AdapterState.CHALLENGER
        if adapter in self.live:
            return AdapterState.LOADED
        return self.ended.get(adapter)

    # --- control events ------------------------------------------------------------------

    def apply(self, event: object) -> Transition:
        """An adapter loaded, promoted or rolled back; any other event changes nothing. (A
        drift alarm is ``preferences_moved``, called by whoever acts on it.)"""
        if isinstance(event, AdapterLoaded):
            return self.load(event.adapter)
        if isinstance(event, AdapterPromoted):
            return self.promote(event.adapter)
        if isinstance(event, AdapterRolledBack):
            return self.roll_back(event.adapter, event.reason)
        return Transition()

    def load(self, adapter: str) -> Transition:
        """A new adapter joins as a challenger under a test against the champion. One already
        live (replicas reloaded) or ended (a restarted swap controller announcing again)
        starts nothing."""
        t = Transition()
        if adapter not in self.live and adapter not in self.ended:
            self._join(adapter, t)
        return t

    def promote(self, adapter: str) -> Transition:
        """The adapter replaces the champion, which is retired; the other tests restart."""
        if adapter == self.champion:
            return Transition()
        if adapter not in self.live:
            return Transition(refused=f"{adapter} is not live: it cannot be promoted")
        t = Transition(promoted=adapter, retired=self.champion)
        self.live.remove(self.champion)
        t.left.append(self.champion)
        self.ended[self.champion] = AdapterState.RETIRED
        self._crown(adapter, t)
        return t

    def roll_back(self, adapter: str, reason: str) -> Transition:
        """The adapter stops serving and its test ends; the oldest live arm follows a champion
        rolled back. One not live yet is remembered, so that its late ``adapter_loaded``
        does not bring it in."""
        t = Transition()
        self._roll_back(adapter, reason, t)
        return t

    def preferences_moved(self, signal: str) -> Transition:
        """A reward drift alarm on ``signal``: the users' preferences moved under the tests.

        Their challengers were trained on feedback from before, and their sums mix two
        populations under changing traffic shares: they are rolled back, which frees the
        experiment slot for adapters trained after the shift. A test of the fallback (opened
        by an earlier alarm) starts afresh instead: it is the test that asks what the new
        preferences say.

        The champion, too, learned from feedback from before. The fallback comes back as a
        challenger if it was retired, so that the router can send traffic back to it, and
        its test decides under the new preferences whether the champion is still better than
        no adaptation at all."""
        t = Transition()
        if self.fallback in self.experiments:
            self._restart(self.fallback, t)
        reason = f"drift: {signal} moved during the test; the challenger learned from feedback before it"
        for challenger in [c for c in self.experiments if c != self.fallback]:
            self._roll_back(challenger, reason, t)
        if self.fallback not in self.live:
            self.ended.pop(self.fallback, None)  # the one name that comes back: the base model
            self._join(self.fallback, t)
        return t

    # --- rewards ---------------------------------------------------------------------------

    def observe(self, adapter: str, reward: float, propensity: float | None,
                probabilities: Mapping[str, float] | None = None, cohort: str | None = None) -> list[Outcome]:  # fmt: skip
        """Feed one reward of ``adapter``, served with ``propensity``, to every test whose two
        variants both had a chance in that request; a verdict is applied at once.

        A test weights each reward by its propensity (``ABTest``), so it takes only requests
        the router chose (``propensity`` given; an adapter the client named is no experiment)
        and, when the whole distribution was logged (``probabilities``), only those in which
        both of its variants had a positive probability: a request decided before the
        challenger went live, whose feedback comes in after, must not count for the champion
        alone. Without ``probabilities`` both are assumed live. A test is fed requests served
        by a third arm too: its lift is over all the traffic both could serve.
        Rewards of an adapter no longer live reach no test (late feedback)."""
        if propensity is None or adapter not in self.live:
            return []
        outcomes = []
        for test in list(self.experiments.values()):
            # A verdict earlier in this loop may have replaced the test (a promotion restarts
            # the others against the new champion): the old one must not decide anything.
            if self.experiments.get(test.challenger) is not test:
                continue
            if probabilities is not None and min(probabilities.get(test.champion, 0.0),
                                                 probabilities.get(test.challenger, 0.0)) <= 0.0:  # fmt: skip
                continue
            test.update(adapter, reward, propensity, cohort=cohort)
            decision = test.decision()
            if decision.verdict == "promote":
                t = self.promote(test.challenger)
            elif decision.verdict == "continue":
                t = Transition()
            else:
                t = self.roll_back(test.challenger, _verdict_reason(test, decision))
            outcomes.append(Outcome(test, decision, t))
        return outcomes

    # --- the steps every transition is made of --------------------------------------------

    def _join(self, adapter: str, t: Transition) -> None:
        self.live.append(adapter)
        t.joined.append(adapter)
        test = self._new_test(adapter)
        self.experiments[adapter] = test
        t.started.append(test)

    def _roll_back(self, adapter: str, reason: str, t: Transition) -> None:
        if adapter not in self.live:
            self.ended.setdefault(adapter, AdapterState.ROLLED_BACK)
            return
        if len(self.live) == 1:
            t.refused = f"{adapter} is the last arm: it is kept, every request needs one"
            return
        t.rolled_back[adapter] = reason
        self._stop(adapter, ROLLBACK, t)
        self.live.remove(adapter)
        t.left.append(adapter)
        self.ended[adapter] = AdapterState.ROLLED_BACK
        if adapter == self.champion:
            self._crown(self.live[0], t)  # the oldest live arm

    def _crown(self, adapter: str, t: Transition) -> None:
        # The running tests compared their challengers with the old champion, whose rewards
        # stop now: they start again against the new one.
        self._stop(adapter, PROMOTE, t)
        self.champion = adapter
        for challenger in list(self.experiments):
            self._restart(challenger, t)

    def _restart(self, challenger: str, t: Transition) -> None:
        # In place: the order of the tests is the order they are fed a reward in, which
        # decides which of two verdicts on the same reward comes first.
        t.ended.append((self.experiments[challenger], RESTARTED))
        self.experiments[challenger] = self._new_test(challenger)
        t.started.append(self.experiments[challenger])

    def _stop(self, challenger: str, how: str, t: Transition) -> None:
        test = self.experiments.pop(challenger, None)
        if test is not None:
            t.ended.append((test, how))

    def _new_test(self, challenger: str) -> ABTest:
        c = self.config
        return ABTest(self.champion, challenger, alpha=c.ab_alpha, min_samples=c.ab_min_samples, tau=c.ab_tau,
                      max_samples=c.ab_max_samples)  # fmt: skip


def _verdict_reason(test: ABTest, decision: ABDecision) -> str:
    if decision.verdict == "inconclusive":
        return f"ab_test: no significant lift over {test.champion} after {test.max_samples} rewards each"
    where = f"in cohorts {', '.join(decision.harmed_cohorts)}" if decision.harmed_cohorts else "overall"
    return f"ab_test: challenger worse than {test.champion} {where}"
