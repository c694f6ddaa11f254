"""Drift detection on per-arm rewards and on input feature statistics."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from river import drift, stats
from river.base import DriftDetector

from learners.features import Context


@dataclass(frozen=True)
class DriftAlarm:
    """A change detected in one monitored stream.

    ``what`` is ``"reward:<arm>"``, ``"feature:<name>"`` (mean of a numeric feature) or
    ``"feature:<name>=<value>"`` (share of a categorical value). ``index`` is the 0-based
    position, within that stream, of the observation that raised the alarm; ``timestamp`` is
    that observation's own time, as given by the caller. ``mean_before`` is the mean since the
    previous alarm (or the start) excluding the last ``recent_window`` observations, which
    give ``mean_after``; ``mean_before`` is NaN when the alarm comes before it has any data.
    """

    what: str
    detector: str
    index: int
    timestamp: float | None
    mean_before: float
    mean_after: float


@dataclass
class _Stream:
    detector: DriftDetector
    recent: deque[float]
    before: stats.Mean = field(default_factory=stats.Mean)
    n: int = 0


class DriftMonitor:
    """One river drift detector per monitored stream, each a clone of ``detector``.

    Streams are created on first sight: one per arm's reward, one per numeric feature (its
    raw value), and one per categorical (feature, value) pair fed 1.0 when the event has
    that value and 0.0 when it has another value of the feature, so a shift in the mix of
    values shows as a change of share. A value first seen late starts its stream then.
    After an alarm a stream's before/after means restart, as does the detector (river resets
    it on the next update).

    Categorical features with many distinct values (user ids) would each grow a detector per
    value: list the features to watch in ``features``.

    Parameters
    ----------
    detector
        Prototype detector; ``river.drift.ADWIN()`` when omitted. ``PageHinkley`` works too;
        its threshold is in units of the monitored values (its default of 50 suits counts,
        not rewards in [0, 1]).
    recent_window
        Number of latest observations averaged into ``mean_after``.
    features
        Context features to watch; every feature seen when omitted.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(7)
    >>> monitor = DriftMonitor()
    >>> for t in range(2000):
    ...     p = 0.8 if t < 1000 else 0.3
    ...     alarm = monitor.update_reward("code-v1", float(rng.random() < p), timestamp=t)
    ...     if alarm:
    ...         break
    >>> alarm.what, alarm.detector, alarm.index >= 1000
    ('reward:code-v1', 'ADWIN', True)
    >>> alarm.mean_before > 0.7 and alarm.mean_after < 0.4
    True
    """

    def __init__(
        self,
        detector: DriftDetector | None = None,
        recent_window: int = 30,
        features: Iterable[str] | None = None,
    ):
        self.detector = drift.ADWIN() if detector is None else detector
        self.recent_window = recent_window
        self.features = None if features is None else frozenset(features)
        self._streams: dict[str, _Stream] = {}
        # Categorical values seen per feature, in order of first sight.
        self._categories: dict[str, dict[str, None]] = {}

    def update(self, what: str, value: float, timestamp: float | None = None) -> DriftAlarm | None:
        """Feed one observation of the stream named ``what``."""
        stream = self._streams.get(what)
        if stream is None:
            stream = _Stream(self.detector.clone(), deque(maxlen=self.recent_window))
            self._streams[what] = stream
        if len(stream.recent) == stream.recent.maxlen:
            stream.before.update(stream.recent[0])
        stream.recent.append(value)
        stream.detector.update(value)
        stream.n += 1
        if not stream.detector.drift_detected:
            return None
        alarm = DriftAlarm(
            what=what,
            detector=type(stream.detector).__name__,
            index=stream.n - 1,
            timestamp=timestamp,
            mean_before=stream.before.get() if stream.before.n else float("nan"),
            mean_after=sum(stream.recent) / len(stream.recent),
        )
        stream.before = stats.Mean()
        stream.recent.clear()
        return alarm

    def forget_reward(self, arm: str) -> None:
        """Start the arm's reward stream afresh (it comes back after its rewards changed meaning)."""
        self._streams.pop(f"reward:{arm}", None)

    def update_reward(
        self, arm: str, reward: float, timestamp: float | None = None
    ) -> DriftAlarm | None:
        return self.update(f"reward:{arm}", reward, timestamp)

    def update_features(self, context: Context, timestamp: float | None = None) -> list[DriftAlarm]:
        """Feed one event's features. Returns a list: a change in the mix of a categorical
        feature moves several shares at once."""
        alarms = []
        for name, value in context.items():
            if value is None or (self.features is not None and name not in self.features):
                continue
            if isinstance(value, (str, bool)):
                seen = self._categories.setdefault(name, {})
                seen[str(value)] = None
                updates = [(f"feature:{name}={v}", float(v == str(value))) for v in seen]
            else:
                updates = [(f"feature:{name}", float(value))]
            for what, x in updates:
                alarm = self.update(what, x, timestamp)
                if alarm is not None:
                    alarms.append(alarm)
        return alarms
