"""The loop at a glance: every figure the dashboard, `feedloop status` and /metrics show.

One :class:`OverviewSource` gathers them, so the three never disagree:

- the archive (the log of record): user events accepted per type, dead letters per reason,
  the control topic (adapter lifecycle, drift alarms, batches emitted) and the annotated
  examples (traffic per serving adapter, rewards per adapter, the A/B confidence sequences);
- the store: the adapter registry (state, swap latency), batches (size, strata, channel
  weights), the newest router snapshot, and the pipeline's checkpointed offsets against the
  archived ones (consumer lag), and every process's last heartbeat (app/liveness.py);
- the trainer's privacy ledger (epsilon spent against the budget).

Cheap enough to call every few seconds: segments are immutable once sealed, so each one is
read once, in the order it was sealed, and folded into running totals (:class:`ArchiveFold`);
a call reads only the segments sealed since the previous call plus a few small store queries.

The adapter roles and the A/B figures are recomputed from the archived examples and control
events through the learner's own machine (``streams.lifecycle``: an ``ABTest`` per challenger
against the champion, restarted when the champion changes; ended adapters stay ended) and its
loss-weighted rewards (``streams.learning``), not read from the learner process. They match
the learner's up to the interleaving of the examples and control topics, which the log does
not record (docs/learners.md, "Replay").
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import structlog
from sqlalchemy import func, select
from sqlalchemy.orm import sessionmaker

from app.liveness import ProcessView, process_views
from app.sealed_segments import SealedSegments
from app.settings import Settings
from streams.store import (Adapter, ArchiveSegment, Batch, BatchStatus, Erasure, RouterSnapshot, StreamCheckpoint,
                           make_engine, make_sessionmaker)
from learners.ab_test import ABTest
from learners.loss_weights import LossWeights
from streams.archive import ArchivedRecord
from streams.contract import (
    CONTROL_EVENT_ADAPTER,
    AdapterLoaded,
    AdapterPromoted,
    AdapterReady,
    AdapterRolledBack,
    AdapterState,
    AnnotatedExample,
    BatchEmitted,
    DriftAlarm,
)
from streams.learning import combined_reward
from streams.lifecycle import Lifecycle, Transition
from streams.objects import StorageUnavailable
from streams.topics import CONTROL, DEAD_LETTER, EVENTS, EXAMPLES
from trainer.ledger import FOLDER as LEDGER_FOLDER, LEGACY_FILE, PrivacyLedger, spent_epsilon

log = structlog.get_logger(__name__)

USER_EVENT_TYPES = ("interaction", "feedback", "annotation")
PIPELINE_CONSUMER = "feedloop-pipeline"  # app.runtime.PIPELINE_CONSUMER, which imports the gateway
RECENT = 20  # dead letters and drift alarms listed
LEARNER_DECISIONS = (DriftAlarm, AdapterPromoted, AdapterRolledBack)  # control events with stable ids
RECENT_BATCHES = 30
SMOOTHING_BUCKETS = 6  # buckets averaged into each traffic and reward point
PROMOTED = "promoted"  # the one timeline entry that is not a state the adapter entered


def _timestamp(value: str | datetime) -> float:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment.timestamp()


# The calendar's ends as timestamps: an event dated at them (written straight to the topic; the
# gateway and the pipeline refuse such dates) is drawn at the edge instead of breaking the view.
_FIRST_S = datetime(1, 1, 2, tzinfo=timezone.utc).timestamp()
_LAST_S = datetime(9999, 12, 30, tzinfo=timezone.utc).timestamp()


def _clock(seconds: float) -> str:
    """UTC time as Plotly reads dates (it ignores zone suffixes, so none is written)."""
    moment = datetime.fromtimestamp(min(max(seconds, _FIRST_S), _LAST_S), timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# --- time series ---------------------------------------------------------------------------


class TimeBuckets:
    """Values per name in event-time buckets; a value added to an occupied cell is merged.

    When there are more than ``max_buckets`` buckets the width doubles and neighbours merge,
    so memory stays bounded however long the archive grows, and a short run still gets
    fine-grained points.
    """

    def __init__(self, merge: Callable[[Any, Any], Any], width_s: float = 10.0, max_buckets: int = 720) -> None:
        self.merge, self.width_s, self.max_buckets = merge, width_s, max_buckets
        self.buckets: dict[float, dict[Any, Any]] = {}

    def put(self, at: float, name: Any, value: Any) -> None:
        cells = self.buckets.setdefault(at - at % self.width_s, {})
        cells[name] = self.merge(cells[name], value) if name in cells else value
        if len(self.buckets) > self.max_buckets:
            self._coarsen()

    def _coarsen(self) -> None:
        self.width_s *= 2
        merged: dict[float, dict[Any, Any]] = {}
        for start in sorted(self.buckets):
            target = merged.setdefault(start - start % self.width_s, {})
            for name, value in self.buckets[start].items():
                target[name] = self.merge(target[name], value) if name in target else value
        self.buckets = merged

    def rows(self) -> list[tuple[float, dict[Any, Any]]]:
        return sorted(self.buckets.items())


def _add_counts(a: tuple[int, float], b: tuple[int, float]) -> tuple[int, float]:
    return a[0] + b[0], a[1] + b[1]


def _keep_later(_earlier: Any, later: Any) -> Any:
    return later


# --- what the dashboard shows --------------------------------------------------------------


@dataclass
class LifecycleEvent:
    at: str
    kind: str  # PROMOTED, or the AdapterState entered: ready, loaded, retired, rolled_back, failed
    detail: str = ""


@dataclass
class AdapterView:
    name: str
    state: str
    parent: str | None = None
    reason: str | None = None
    swap_ms: float | None = None
    created_at: str | None = None
    events: list[LifecycleEvent] = field(default_factory=list)


@dataclass
class ExperimentView:
    challenger: str
    champion: str
    status: str  # running, promote, rollback, restarted (the champion changed)
    lift: float | None
    lower: float | None
    upper: float | None
    n_champion: int
    n_challenger: int
    times: list[str] = field(default_factory=list)
    lifts: list[float | None] = field(default_factory=list)
    lowers: list[float | None] = field(default_factory=list)
    uppers: list[float | None] = field(default_factory=list)


@dataclass
class Series:
    """Per-name values at shared times (None where a name has no value at that time)."""

    times: list[str] = field(default_factory=list)
    values: dict[str, list[float | None]] = field(default_factory=dict)


@dataclass
class BatchView:
    batch_id: str
    size: int
    status: str
    trigger: str
    adapter: str | None
    created_at: str | None
    strata: dict[str, int]
    loss_weights: dict[str, float]
    reason: str | None = None  # why it failed


@dataclass
class RetrainView:
    """An adapter trained on the data of users erased since (trainer/erasure.py): retrain it."""

    adapter: str
    state: str | None  # the registry's; None for an adapter the registry no longer has
    erasures: int
    apps: list[str]
    first_erased_at: str | None


@dataclass
class LagView:
    consumer: str
    partition: int
    archived_offset: int
    checkpointed_offset: int
    lag: int


@dataclass
class PrivacyView:
    enabled: bool
    budget_epsilon: float
    spent_epsilon: float
    entries: dict[str, dict[str, Any]]


@dataclass
class RouterView:
    version: int
    examples: int
    arms: list[str]
    created_at: str | None


@dataclass
class Overview:
    generated_at: str
    segments: int
    records_by_topic: dict[str, int]
    events_accepted: dict[str, int]
    dead_letters: dict[str, int]
    recent_dead_letters: list[dict[str, Any]]
    examples: int
    undecodable: int
    champion: str
    challengers: list[str]
    adapters: list[AdapterView]
    traffic_share: Series
    reward_mean: Series
    experiments: list[ExperimentView]
    drift_alarms: dict[str, int]
    recent_drift_alarms: list[dict[str, Any]]
    batches_emitted: int
    batches_by_status: dict[str, int]
    recent_batches: list[BatchView]
    failed_batches: list[BatchView]  # the newest, with why; `feedloop train --retry BATCH`
    lag: list[LagView]
    processes: list[ProcessView]
    privacy: PrivacyView
    router: RouterView | None
    app_id: str | None = None  # None: every app (an operator's view); else the one app this view shows
    retrain: list[RetrainView] = field(default_factory=list)  # adapters trained on erased users' data

    def to_json(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def _json_safe(value: Any) -> Any:
    """Non-finite floats (a drift alarm's details may hold one) as None: JSON has no inf or NaN."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


# --- the archive, folded -------------------------------------------------------------------


@dataclass
class _Experiment:
    key: int  # names its points in ``ab_paths``: the same pair may be tested again later
    test: ABTest
    status: str = "running"
    # Newest closed_at it has seen. Its points are placed there: examples arrive in partition
    # order, not time order, and the sequence drawn must be the one the test went through.
    frontier: float = -math.inf


class Totals:
    """The archive's per-record counts over one scope: every app, or one app (what its key
    sees: its own events, dead letters and examples; never another app's)."""

    def __init__(self) -> None:
        self.events_accepted: Counter = Counter()
        self.dead_letters: Counter = Counter()
        self.recent_dead_letters: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.examples = 0
        self.traffic = TimeBuckets(_add_counts)  # interactions per serving adapter (occurred_at)
        self.rewards = TimeBuckets(_add_counts)  # combined reward per adapter (closed_at)

    def count_event(self, kind: str, value: dict[str, Any]) -> None:
        self.events_accepted[kind] += 1
        if kind == "interaction":
            self.traffic.put(_timestamp(value["occurred_at"]), value["adapter"], (1, 1.0))

    def count_dead_letter(self, value: dict[str, Any]) -> None:
        self.dead_letters[value["reason"]] += 1
        self.recent_dead_letters.append({k: value.get(k) for k in ("received_at", "reason", "app_id", "stage",
                                                                   "event_id", "detail")})  # fmt: skip

    def count_example(self, example: AnnotatedExample, reward: float | None) -> None:
        self.examples += 1
        if reward is not None:
            self.rewards.put(example.closed_at.timestamp(), example.adapter, (1, reward))

    def traffic_share(self) -> Series:
        """Each arm's share of the interactions in the trailing window ending at each bucket."""
        series = Series()
        rows = _trailing(self.traffic.rows())
        names = sorted({name for _, cells in rows for name in cells})
        series.values = {name: [] for name in names}
        for start, cells in rows:
            total = sum(n for n, _ in cells.values())
            series.times.append(_clock(start))
            for name in names:
                series.values[name].append(cells[name][0] / total if name in cells else 0.0)
        return series

    def reward_mean(self) -> Series:
        """Each arm's mean combined reward over the trailing window ending at each bucket."""
        series = Series()
        rows = _trailing(self.rewards.rows())
        names = sorted({name for _, cells in rows for name in cells})
        series.values = {name: [] for name in names}
        for start, cells in rows:
            series.times.append(_clock(start))
            for name in names:
                n, total = cells.get(name, (0, 0.0))
                series.values[name].append(total / n if n else None)
        return series


class ArchiveFold:
    """Running totals over the archive, one record at a time, in the order segments were sealed.

    The adapter roles and the A/B tests are the learner's own lifecycle (``streams.lifecycle``,
    docs/learners.md, "Where arms come from"), fed the archived control events and rewards as
    the learner is fed them, so a verdict reached here is applied at once, as the learner
    does. Reward drift alarms are taken from the log, not recomputed, and applied as the
    learner applied them when it raised them. On top of the lifecycle the fold keeps only what
    the dashboard draws: each adapter's timeline, each test's path, the tests that ended.
    """

    def __init__(self, settings: Settings) -> None:
        self.records_by_topic: Counter = Counter()
        self.all = Totals()
        self.apps: dict[str, Totals] = {}  # by app id
        # Only an app with a key can read its view: a producer writing made-up app ids straight
        # to the topics must not grow the fold.
        self.known_apps = frozenset(settings.api_keys)
        self.drift_alarms: Counter = Counter()
        self.recent_drift_alarms: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.batches_emitted = 0
        self.seen_examples: set[tuple[str, str]] = set()  # (app id, example id): as the learner de-duplicates
        # Ids of the learner's decisions: a verdict or drift alarm sent again (an unconfirmed
        # output, or one a standby re-derived after a takeover, docs/deployment.md) is one event.
        # (An adapter_loaded announced again is shown again: the timeline tells of it.)
        self.seen_control: set[str] = set()
        self.undecodable = 0
        self.ab_paths = TimeBuckets(_keep_later)  # newest decision per experiment (its newest closed_at)
        self.loss_weights = LossWeights()
        self.lifecycle = Lifecycle(settings.learners)
        self.running: dict[str, _Experiment] = {}  # challenger -> the view of its test in the lifecycle
        self.concluded: list[_Experiment] = []
        self._started = 0
        self.timelines: dict[str, list[LifecycleEvent]] = {}

    def fold(self, record: ArchivedRecord) -> None:
        self.records_by_topic[record.topic] += 1
        if record.value is None:
            return
        try:
            if record.topic == EVENTS.name:
                self._event(json.loads(record.value))
            elif record.topic == DEAD_LETTER.name:
                self._dead_letter(json.loads(record.value))
            elif record.topic == EXAMPLES.name:
                self._example(AnnotatedExample.model_validate_json(record.value))
            elif record.topic == CONTROL.name:
                self._control(CONTROL_EVENT_ADAPTER.validate_json(record.value))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):  # pydantic's errors are ValueErrors
            # Another producer's bad record is kept in the archive; it must not stop the view.
            self.undecodable += 1

    def scopes(self, app_id: Any) -> tuple[Totals, ...]:
        """Every app's totals, and the record's app's (none for a record without a configured one)."""
        if app_id not in self.known_apps:
            return (self.all,)
        return self.all, self.apps.setdefault(app_id, Totals())

    def _event(self, value: dict[str, Any]) -> None:
        kind = value.get("type")
        if kind not in USER_EVENT_TYPES:
            return  # the pipeline's watermark ticks and curation triggers
        for totals in self.scopes(value.get("app_id")):
            totals.count_event(kind, value)

    def _dead_letter(self, value: dict[str, Any]) -> None:
        for totals in self.scopes(value.get("app_id")):
            totals.count_dead_letter(value)

    def _example(self, example: AnnotatedExample) -> None:
        if example.key in self.seen_examples:
            return  # emitted again (a checkpoint that failed after its outputs went out): counted once
        self.seen_examples.add(example.key)
        self.loss_weights.learn_one(example.rewards)
        reward = combined_reward(example.rewards, self.loss_weights.weights())
        for totals in self.scopes(example.app_id):
            totals.count_example(example, reward)
        if reward is None:
            return
        at = example.closed_at.timestamp()
        for outcome in self.lifecycle.observe(example.adapter, reward, example.propensity, example.probabilities,
                                              example.cohort):
            experiment = self.running[outcome.test.challenger]
            experiment.frontier = max(experiment.frontier, at)
            self.ab_paths.put(experiment.frontier, experiment.key, outcome.decision)
            self._follow(outcome.transition, at)

    def _control(self, event: Any) -> None:
        if isinstance(event, LEARNER_DECISIONS):
            if event.event_id in self.seen_control:
                return  # counted once, and a drift alarm must not end the tests a second time
            self.seen_control.add(event.event_id)
        at = event.occurred_at.timestamp()
        if isinstance(event, BatchEmitted):
            self.batches_emitted += 1
        elif isinstance(event, DriftAlarm):
            self.drift_alarms[event.signal] += 1
            self.recent_drift_alarms.append({"detected_at": _clock(event.detected_at.timestamp()),
                                             "signal": event.signal, "detector": event.detector,
                                             **event.details})  # fmt: skip
            if event.preferences_moved:
                moved = self.lifecycle.preferences_moved(event.signal)
                for adapter in moved.joined:  # the base model, tested again
                    self._note(adapter, at, AdapterState.LOADED, f"back as an arm: {event.signal} drifted")
                self._follow(moved, at)
        elif isinstance(event, AdapterReady):
            self._note(event.adapter, at, AdapterState.READY, f"from {event.parent or 'base model'}")
        elif isinstance(event, AdapterLoaded):
            self._note(event.adapter, at, AdapterState.LOADED, ", ".join(event.replicas))
            self._follow(self.lifecycle.apply(event), at)
        elif isinstance(event, (AdapterPromoted, AdapterRolledBack)):
            self._follow(self.lifecycle.apply(event), at)

    def _follow(self, transition: Transition, at: float) -> None:
        """What the dashboard draws of a transition: the adapters' timelines, and which test
        views end and begin."""
        if transition.promoted is not None:
            self._note(transition.promoted, at, PROMOTED, f"over {transition.retired}")
            self._note(transition.retired, at, AdapterState.RETIRED, f"replaced by {transition.promoted}")
        for adapter, reason in transition.rolled_back.items():
            self._note(adapter, at, AdapterState.ROLLED_BACK, reason)
        for test, how in transition.ended:
            experiment = self.running.pop(test.challenger)
            experiment.status = how
            self.concluded.append(experiment)
        for test in transition.started:
            self._started += 1
            self.running[test.challenger] = _Experiment(self._started, test)

    def _note(self, adapter: str, at: float, kind: str, detail: str = "") -> None:
        self.timelines.setdefault(adapter, []).append(LifecycleEvent(_clock(at), kind, detail))

    # --- views ---------------------------------------------------------------------------

    def experiment_views(self) -> list[ExperimentView]:
        rows = self.ab_paths.rows()
        views = []
        for experiment in [*self.concluded, *self.running.values()]:
            test = experiment.test
            decision = test.decision()
            view = ExperimentView(test.challenger, test.champion, experiment.status,
                                  _finite(decision.lift), _finite(decision.lower), _finite(decision.upper),
                                  decision.n_champion, decision.n_challenger)  # fmt: skip
            for start, cells in rows:
                if experiment.key in cells:
                    point = cells[experiment.key]
                    view.times.append(_clock(start))
                    view.lifts.append(_finite(point.lift))
                    view.lowers.append(_finite(point.lower))
                    view.uppers.append(_finite(point.upper))
            views.append(view)
        return views


def _trailing(rows: list[tuple[float, dict[str, tuple[int, float]]]]) -> list[tuple[float, dict[str, tuple[int, float]]]]:
    """Counts and sums over the last ``SMOOTHING_BUCKETS`` buckets at each bucket: at low
    traffic one bucket holds one example, and its 0 or 1 says nothing about the arm."""
    recent: deque[dict[str, tuple[int, float]]] = deque(maxlen=SMOOTHING_BUCKETS)
    smoothed = []
    for start, cells in rows:
        recent.append(cells)
        window: dict[str, tuple[int, float]] = {}
        for bucket in recent:
            for name, value in bucket.items():
                window[name] = _add_counts(window[name], value) if name in window else value
        smoothed.append((start, window))
    return smoothed


# --- the source ------------------------------------------------------------------------------


class OverviewSource:
    """Reads the overview on demand; thread-safe, keeps the archive fold between calls."""

    def __init__(self, settings: Settings, sessions: sessionmaker | None = None) -> None:
        self.settings = settings
        self._engine = None if sessions is not None else make_engine(settings.store_url)
        self.sessions = sessions or make_sessionmaker(self._engine)
        self._lock = threading.Lock()
        self._fold = ArchiveFold(settings)
        self._segments = SealedSegments(self.sessions, settings.objects)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    def read(self, app_id: str | None = None) -> Overview:
        """Every app's overview (an operator's), or the view of one app's key: its own events,
        dead letters, examples, traffic and rewards, beside what the apps share on purpose (the
        adapters and their roles, the router; docs/tenants.md). What is made of every app's
        data (the archive's record counts, A/B evidence, drift alarms, batches, lag, processes,
        the privacy ledger's runs) is left empty in an app's view."""
        with self._lock:
            self._catch_up()
            if app_id is None:
                return self._overview(self._fold.all)
            scoped = self._overview(self._fold.apps.get(app_id) or Totals(), app_id)
        return replace(scoped, app_id=app_id, segments=0, records_by_topic={}, undecodable=0, experiments=[],
                       drift_alarms={}, recent_drift_alarms=[], batches_emitted=0, batches_by_status={},
                       recent_batches=[], failed_batches=[], lag=[], processes=[],
                       privacy=replace(scoped.privacy, entries={}))  # fmt: skip

    def _catch_up(self) -> None:
        self._segments.catch_up(lambda record: self._fold.fold(record), self._reset)

    def _reset(self) -> None:
        self._fold = ArchiveFold(self.settings)

    @property
    def segments_read(self) -> int:
        return self._segments.segments_read

    def _overview(self, totals: Totals, app_id: str | None = None) -> Overview:
        """``app_id``: only that app's erasures name adapters to retrain."""
        fold = self._fold
        with self.sessions() as session:
            erasures = list(session.scalars(select(Erasure).order_by(Erasure.erased_at)
                                            .where(*([Erasure.app_id == app_id] if app_id else []))))  # fmt: skip
            adapters = list(session.scalars(select(Adapter).order_by(Adapter.created_at, Adapter.name)))
            batches_by_status = dict(session.execute(select(Batch.status, func.count()).group_by(Batch.status)).all())
            batches = list(session.scalars(select(Batch).order_by(Batch.created_at.desc(), Batch.batch_id.desc())
                                           .limit(RECENT_BATCHES)))  # fmt: skip
            failed = list(session.scalars(select(Batch).where(Batch.status == BatchStatus.FAILED)
                                          .order_by(Batch.created_at.desc(), Batch.batch_id.desc())
                                          .limit(RECENT_BATCHES)))  # fmt: skip
            router = session.execute(
                select(RouterSnapshot.version, RouterSnapshot.examples, RouterSnapshot.arms, RouterSnapshot.created_at)
                .order_by(RouterSnapshot.id.desc()).limit(1)
            ).first()  # fmt: skip
            lag = self._lag(session)
            processes = process_views(session, self.settings.liveness)
        return Overview(
            retrain=_retrain_views(erasures, {a.name: a.state for a in adapters}),
            generated_at=_clock(datetime.now(timezone.utc).timestamp()),
            segments=self._segments.folded,
            records_by_topic=dict(fold.records_by_topic),
            events_accepted={kind: totals.events_accepted[kind] for kind in USER_EVENT_TYPES},
            dead_letters=dict(totals.dead_letters.most_common()),
            recent_dead_letters=list(reversed(totals.recent_dead_letters)),
            examples=totals.examples,
            undecodable=fold.undecodable,
            champion=fold.lifecycle.champion,
            challengers=sorted(fold.lifecycle.experiments),
            adapters=self._adapters(adapters),
            traffic_share=totals.traffic_share(),
            reward_mean=totals.reward_mean(),
            experiments=fold.experiment_views(),
            drift_alarms=dict(fold.drift_alarms.most_common()),
            recent_drift_alarms=list(reversed(fold.recent_drift_alarms)),
            batches_emitted=fold.batches_emitted,
            batches_by_status=batches_by_status,
            recent_batches=[_batch_view(b) for b in reversed(batches)],
            failed_batches=[_batch_view(b) for b in failed],
            lag=lag,
            processes=processes,
            privacy=self._privacy(),
            router=None if router is None else RouterView(router.version, router.examples, list(router.arms),
                                                          _clock_of(router.created_at)),  # fmt: skip
        )

    def _adapters(self, rows: list[Adapter]) -> list[AdapterView]:
        """Registry rows and the adapters the log names (the initial arms have no row).

        State: the lifecycle's (the control log as the learner applies it) where it has one,
        since it moves first; else the registry's (e.g. ready, failed, superseded)."""
        fold = self._fold
        lifecycle = fold.lifecycle
        views = {}
        for row in rows:
            swap = (row.lineage or {}).get("serving", {}) if isinstance(row.lineage, dict) else {}
            swap_ms = swap.get("swap_ms") if isinstance(swap, dict) else None
            events = list(fold.timelines.get(row.name, []))
            if row.state == AdapterState.FAILED:
                events.append(LifecycleEvent(_clock_of(row.updated_at) or "", AdapterState.FAILED, row.reason or ""))
            views[row.name] = AdapterView(
                name=row.name, state=lifecycle.state_of(row.name) or row.state, parent=row.parent, reason=row.reason,
                swap_ms=float(swap_ms) if isinstance(swap_ms, (int, float)) else None,
                created_at=_clock_of(row.created_at), events=events,
            )  # fmt: skip
        for name in [*fold.timelines, *lifecycle.live]:
            if name not in views:
                # Without a row, the lifecycle knows it unless the log only announced it ready.
                views[name] = AdapterView(name=name, state=lifecycle.state_of(name) or AdapterState.READY,
                                          events=list(fold.timelines.get(name, [])))  # fmt: skip
        return list(views.values())

    def _lag(self, session: Any) -> list[LagView]:
        """The pipeline's checkpointed offset per events partition against the archive's last.

        Only the pipeline's rows: the learner's checkpoint row holds a state version, not an offset."""
        archived = {
            (cluster, partition): last
            for cluster, partition, last in session.execute(
                select(ArchiveSegment.cluster_id, ArchiveSegment.partition, func.max(ArchiveSegment.last_offset))
                .where(ArchiveSegment.topic == EVENTS.name)
                .group_by(ArchiveSegment.cluster_id, ArchiveSegment.partition)
            )
        }  # fmt: skip
        checkpoints = session.execute(
            select(StreamCheckpoint.consumer, StreamCheckpoint.partition, StreamCheckpoint.cluster_id,
                   StreamCheckpoint.offset).where(StreamCheckpoint.consumer == PIPELINE_CONSUMER)
            .order_by(StreamCheckpoint.partition)
        )  # fmt: skip
        views = []
        for consumer, partition, cluster, offset in checkpoints:
            last = archived.get((cluster, partition))
            if last is not None:
                views.append(LagView(consumer, partition, last, offset, max(0, last - offset)))
        return views

    def _privacy(self) -> PrivacyView:
        config = self.settings.trainer.privacy
        ledger = PrivacyLedger(self.settings.objects, config, legacy=self.settings.adapters_path / LEGACY_FILE)
        try:
            entries = ledger.entries()
        except (OSError, ValueError, StorageUnavailable) as error:
            log.warning("overview.privacy_ledger_unreadable", store=self.settings.objects.url, folder=LEDGER_FOLDER,
                        error=str(error), hint="the trainer writes it; check FEEDLOOP_STORAGE__* here")  # fmt: skip
            entries = {}
        return PrivacyView(config.enabled, config.budget_epsilon, spent_epsilon(entries), entries)


def _clock_of(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite returns naive datetimes; the store writes UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return _clock(moment.timestamp())


def _retrain_views(erasures: list[Erasure], states: dict[str, str]) -> list[RetrainView]:
    """Each adapter named by an erasure (oldest erasure first), with how many name it."""
    views: dict[str, RetrainView] = {}
    for erasure in erasures:
        for name in erasure.adapters:
            view = views.setdefault(name, RetrainView(name, states.get(name), 0, [], _clock_of(erasure.erased_at)))
            view.erasures += 1
            view.apps = sorted({*view.apps, erasure.app_id})
    return sorted(views.values(), key=lambda v: v.adapter)


def _batch_view(batch: Batch) -> BatchView:
    manifest = batch.manifest or {}
    return BatchView(batch_id=batch.batch_id, size=batch.example_count, status=batch.status, trigger=batch.trigger,
                     adapter=batch.adapter, created_at=_clock_of(batch.created_at),
                     strata=dict(manifest.get("strata", {})), loss_weights=dict(manifest.get("loss_weights", {})),
                     reason=batch.reason)
