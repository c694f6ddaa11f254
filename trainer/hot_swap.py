"""The hot-swap controller: control events in; replicas, registry rows and control events out.

What each control event does (``SwapController.handle``):

=====================  ===================================================================
event                  the controller
=====================  ===================================================================
``adapter_ready``      validates the adapter (``trainer.adapter_validation``), loads it on
                       every replica (``HotSwapper.reconcile``), verifies ``/v1/models``,
                       marks it ``challenger`` and announces ``adapter_loaded``: only then
                       does the learner give it a canary share of traffic. Refused or
                       unloadable: ``failed`` with the reason, and ``adapter_refused``.
``adapter_promoted``   the adapter becomes ``champion``; the old champion is ``retired``
                       and unloaded once its traffic has drained (``drain_s``). Only a
                       ``challenger`` (or ``base``) is promoted: any other state is logged
                       (``swap.promote_refused``) and changes nothing.
``adapter_rolled_back`` ``rolled_back`` with the reason; unloaded after ``drain_s``.
=====================  ===================================================================

One experiment at a time (``max_challengers``): an adapter that arrives while another is
under test waits; when the test ends, the newest waiting adapter is loaded and the older
ones are ``superseded`` (announced as ``adapter_refused`` with that reason), since they
were trained from older feedback. A drift alarm on rewards supersedes everything waiting:
it was trained before the users' preferences moved (the learner ends the running test for
the same reason); a copy of an alarm already acted on (same event id) changes nothing, as
long as the controller has not restarted between the two. ``retired`` is only ever a former
champion.

Every unload is announced with ``adapter_unloaded``. Nothing is unloaded before the router
has stopped sending traffic to it (the drain), and nothing gets traffic before it is loaded
(the learner adds an arm on ``adapter_loaded`` only), so a failed swap never routes a
request to an adapter that is not there.

Replicas that are down are retried on every ``tick`` (each request with backoff, see
``trainer.replicas.Retry``); an adapter that no replica could load yet stays pending and is
announced when one can. A replica that comes back gets the whole set on the next reconcile.
A restarted controller rebuilds the desired set from the registry (``resume``), which the
control events wrote, and goes on from its committed offset on the control topic.

Where the adapters' files are (``trainer.adapter_store``): with object storage, an adapter
is staged from it onto this host's disk before it is validated, and, for replicas that fetch
adapters themselves (``FEEDLOOP_SERVING__REPLICAS_FETCH``), approved there once admitted and
withdrawn when it leaves the served set, so no replica can load it before or after.

Plain Python; the I/O is the replicas (HTTP) and the store. The worker that feeds it control
events is ``streams.control_consumer``, started by ``feedloop swap``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

import structlog
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from streams.store import Adapter
from streams.contract import (
    AdapterLoaded,
    AdapterPromoted,
    AdapterReady,
    AdapterRefused,
    AdapterRolledBack,
    AdapterState,
    AdapterUnloaded,
    DriftAlarm,
    utcnow,
)
from streams.objects import ObjectMissing
from trainer.adapter_store import AdapterStore
from trainer.adapter_validation import AdapterRefused as Refused
from trainer.adapter_validation import AdapterSpec, AdapterValidator
from trainer.replicas import AdapterSet, HotSwapper, ReconcileReport

log = structlog.get_logger(__name__)

SOURCE = "swap"
LIVE = (AdapterState.CHALLENGER, AdapterState.CHAMPION)

Announcement = AdapterLoaded | AdapterRefused | AdapterUnloaded


@dataclass(frozen=True)
class _Drain:
    adapter: str
    due: float  # on the controller's monotonic clock


class SwapController:
    @classmethod
    def from_settings(cls, settings, sessions: sessionmaker) -> SwapController:
        """The controller for ``FEEDLOOP_VLLM_URLS``; creates the zero-delta base adapter once."""
        from trainer.serving import ensure_zero_delta_adapter

        base = ensure_zero_delta_adapter(settings.model_path, settings.adapters_path, rank=settings.trainer.lora.rank)
        store = settings.adapter_store
        store.publish(base.name, base.path)
        with sessions() as session:
            known = dict(session.execute(select(Adapter.name, Adapter.sha256)).tuples().all())
        validator = AdapterValidator(settings.adapters_path, base_model_sha256=base.base_model_sha256,
                                     max_lora_rank=settings.serving.max_lora_rank,
                                     served_model_name=settings.serving.served_model_name, known=known)  # fmt: skip
        serving = settings.serving
        swapper = HotSwapper(AdapterSet(validator, base), settings.vllm_urls, fetch=serving.replicas_fetch)
        return cls(sessions, swapper, drain_s=serving.drain_s, reconcile_interval_s=serving.reconcile_interval_s,
                   max_challengers=serving.max_challengers, store=store)

    def __init__(
        self,
        sessions: sessionmaker,
        swapper: HotSwapper,
        *,
        drain_s: float,
        reconcile_interval_s: float,
        max_challengers: int = 1,
        clock: Callable[[], float] = time.monotonic,
        store: AdapterStore | None = None,
    ) -> None:
        """``store``: where adapters are staged from (None: their files are where the events say)."""
        self.sessions = sessions
        self.swapper = swapper
        self.store = store
        self.drain_s = drain_s
        self.reconcile_interval_s = reconcile_interval_s
        self.max_challengers = max_challengers
        self.clock = clock
        self.pending: dict[str, datetime] = {}  # admitted, not yet on any replica -> admission time
        self.waiting: dict[str, AdapterSpec] = {}  # validated, held back while others are under test
        self._drains: list[_Drain] = []
        self._drift_alarms: set[str] = set()  # event ids of the drift alarms acted on (this process's life)
        self._next_reconcile = 0.0
        if store is not None and swapper.fetch:
            self._approve(self.adapters.base.name)

    @property
    def adapters(self):
        return self.swapper.adapters

    # --- control events -------------------------------------------------------------------

    def handle(self, event: object) -> list[Announcement]:
        if isinstance(event, AdapterReady):
            return self._ready(event)
        if isinstance(event, AdapterPromoted):
            self._promote(event)
            return self._admit()
        if isinstance(event, AdapterRolledBack):
            self._roll_back(event)
            return self._admit()
        if isinstance(event, DriftAlarm) and event.preferences_moved and event.event_id not in self._drift_alarms:
            # What waits was trained on feedback from before. The same alarm again (a learner's
            # output sent twice, or re-derived by a standby that took over) must not supersede
            # the adapters that arrived since the first copy: they were trained after the shift.
            self._drift_alarms.add(event.event_id)
            detail = f"trained before the users' preferences moved (drift alarm on {event.signal})"
            stale, self.waiting = list(self.waiting), {}
            return [self._supersede(name, detail) for name in stale]
        return []

    def _ready(self, event: AdapterReady) -> list[Announcement]:
        row = self._row(event.adapter)
        if row is not None and row.state not in (AdapterState.READY, *LIVE):
            log.info("swap.ready_skipped", adapter=event.adapter, state=row.state)  # retired, failed...
            return []
        if event.adapter in self.waiting:
            return []
        if event.adapter in self.adapters:
            return self._reconcile()  # a redelivered event: make sure it is served, announce again
        try:
            spec = self._staged(AdapterSpec.from_event(event))
            self.adapters.validator.validate(spec)  # refuse at once, not after waiting
        except Refused as refused:
            return [self._refuse(event.adapter, refused.reason, refused.detail)]
        self.waiting[event.adapter] = spec
        return self._admit()

    def _admit(self) -> list[Announcement]:
        """Load the newest waiting adapter once fewer than ``max_challengers`` are under test.

        One experiment at a time runs to its verdict (more would split the traffic until
        none reaches one); the older adapters that waited meanwhile are superseded: they were
        trained from older feedback than the newest, which continues from one of them or from
        the same parent (``trainer.worker.parent_for_next``)."""
        if not self.waiting or self._under_test() >= self.max_challengers:
            return []
        *older, newest = self.waiting
        detail = f"superseded by {newest}, trained from fresher feedback, before it was served"
        out: list[Announcement] = [self._supersede(name, detail) for name in older]
        spec = self.waiting.pop(newest)
        self.waiting.clear()
        try:
            self.adapters.add(spec)
        except Refused as refused:  # its files changed while it waited
            return out + [self._refuse(newest, refused.reason, refused.detail)]
        self._approve(newest)
        self.pending[newest] = utcnow()  # admitted: the swap starts now
        return out + self._reconcile()

    def _under_test(self) -> int:
        """Challengers in the registry, and adapters admitted but not yet loaded."""
        with self.sessions() as session:
            challengers = set(session.scalars(select(Adapter.name).where(Adapter.state == AdapterState.CHALLENGER)))
            loading = {name for name in self.pending
                       if (row := session.get(Adapter, name)) is None or row.state == AdapterState.READY}  # fmt: skip
        return len(challengers | loading)

    def _supersede(self, name: str, detail: str) -> AdapterRefused:
        with self.sessions.begin() as session:
            row = session.get(Adapter, name)
            if row is not None:
                row.state, row.reason = AdapterState.SUPERSEDED, detail
        log.info("swap.superseded", adapter=name, detail=detail)
        return AdapterRefused(event_id=f"adapter-refused-{name}", occurred_at=utcnow(), source=SOURCE, adapter=name,
                              reason=AdapterState.SUPERSEDED, detail=detail)  # fmt: skip

    def _promote(self, event: AdapterPromoted) -> None:
        with self.sessions.begin() as session:
            new = session.get(Adapter, event.adapter)
            if new is not None and new.state == AdapterState.CHAMPION:
                return
            if new is not None and new.state != AdapterState.CHALLENGER:
                # A late verdict (or an operator's) for an adapter already rolled back, retired,
                # superseded or never loaded: made champion, no replica would serve it.
                log.error("swap.promote_refused", adapter=event.adapter, state=new.state, source=event.source)
                return
            if new is None and event.adapter in self.adapters:
                log.warning("swap.promote_unregistered", adapter=event.adapter)
            old = session.scalars(select(Adapter).where(Adapter.state == AdapterState.CHAMPION)).all()
            for previous in old:
                previous.state = AdapterState.RETIRED
                self._drain(previous.name)
            if new is not None:
                new.state = AdapterState.CHAMPION
                new.reason = None
        log.info("swap.promoted", adapter=event.adapter, retired=[a.name for a in old], source=event.source)

    def _roll_back(self, event: AdapterRolledBack) -> None:
        with self.sessions.begin() as session:
            row = session.get(Adapter, event.adapter)
            if row is not None:
                if row.state in (AdapterState.ROLLED_BACK, AdapterState.FAILED):
                    return
                row.state, row.reason = AdapterState.ROLLED_BACK, event.reason
        if self.pending.pop(event.adapter, None) is not None:
            self._retire(event.adapter)  # never loaded: nothing to drain
        else:
            self._drain(event.adapter)
        log.info("swap.rolled_back", adapter=event.adapter, reason=event.reason, source=event.source)

    def _drain(self, adapter: str) -> None:
        if adapter != self.adapters.base.name:
            self._drains.append(_Drain(adapter, self.clock() + self.drain_s))

    # --- time -----------------------------------------------------------------------------

    def tick(self) -> list[Announcement]:
        """Unload what has drained; reconcile when something changed, something waits for a
        replica, or the interval has passed."""
        now = self.clock()
        due = [d for d in self._drains if d.due <= now]
        self._drains = [d for d in self._drains if d.due > now]
        for drain in due:
            if drain.adapter in self.adapters:
                self._retire(drain.adapter)
        if due or self.pending or now >= self._next_reconcile:
            return self._reconcile()
        return []

    def resume(self) -> list[Announcement]:
        """After a (re)start: desire what the registry says is live, wait-list what is ready,
        and reconcile. Adapters retired or rolled back while the controller was down are
        unloaded now."""
        with self.sessions() as session:
            rows = session.scalars(
                select(Adapter).where(Adapter.state.in_((AdapterState.READY, *LIVE))).order_by(Adapter.created_at)
            ).all()
        out: list[Announcement] = []
        for row in rows:
            if row.name in self.adapters or row.name in self.waiting:
                continue
            try:
                spec = self._staged(AdapterSpec(row.name, row.path, row.sha256, row.base_model_sha256))
                if row.state == AdapterState.READY:
                    self.adapters.validator.validate(spec)
                    self.waiting[row.name] = spec
                    continue
                self.adapters.add(spec)
                self._approve(row.name)
            except Refused as refused:
                # A live adapter whose files changed: the gateway falls back to the base model.
                log.error("swap.adapter_refused_on_resume", adapter=row.name, state=row.state, reason=refused.reason)
                out.append(self._refuse(row.name, refused.reason, refused.detail))
                continue
            # Announced again once served: the crash may have come before the announcement,
            # and the learner ignores an adapter_loaded for an arm it has or has ended.
            self.pending[row.name] = utcnow()
        out += self._reconcile()
        return out + self._admit()

    # --- the adapters' store -----------------------------------------------------------------

    def _staged(self, spec: AdapterSpec) -> AdapterSpec:
        """The spec with a local path to validate: its files staged from the store onto this
        host (nothing moves when the store is the local adapters directory)."""
        if self.store is None:
            return spec
        try:
            return replace(spec, path=self.store.stage(spec.name, spec.sha256))
        except ObjectMissing as missing:
            raise Refused(spec.name, "missing_file", f"{missing} is not in the adapter store {self.store.objects.url}")

    def _approve(self, name: str) -> None:
        """Let replicas that fetch adapters themselves load it: its validated digest, stored."""
        if self.store is not None and self.swapper.fetch:
            self.store.approve(name, self.adapters.desired[name].sha256)

    def _retire(self, name: str) -> None:
        self.adapters.retire(name)
        if self.store is not None and self.swapper.fetch:
            self.store.withdraw(name)  # no replica can fetch it again by name

    # --- replicas ---------------------------------------------------------------------------

    def _reconcile(self) -> list[Announcement]:
        report = self.swapper.reconcile()
        self._next_reconcile = self.clock() + self.reconcile_interval_s
        out: list[Announcement] = []
        for name in list(self.pending):
            serving = report.replicas_serving(name)
            if serving:
                out.append(self._loaded(name, serving))
                continue
            up = [r for r in report.replicas if r.up]
            if up and all(name in r.errors for r in up):
                detail = "; ".join(r.errors[name] for r in up)
                self._retire(name)
                del self.pending[name]
                out.append(self._refuse(name, "load_failed", f"no replica could load it: {detail}"))
            elif not up:
                log.warning("swap.waiting_for_replicas", adapter=name, down=report.down)
        out += self._unloaded(report)
        return out

    def _loaded(self, name: str, replicas: list[str]) -> AdapterLoaded:
        """``swap_ms``: admitted -> loaded and verified everywhere; ``waited_ms``: ready ->
        admitted (the time it queued behind another experiment)."""
        admitted = self.pending.pop(name)
        now = utcnow()
        swap_ms = (now - admitted).total_seconds() * 1000
        with self.sessions.begin() as session:
            row = session.get(Adapter, name)
            if row is not None and row.state == AdapterState.READY:  # the first load, not a resumed one
                row.state = AdapterState.CHALLENGER
                ready = row.lineage.get("registered_at")
                waited_ms = (admitted - datetime.fromisoformat(ready)).total_seconds() * 1000 if ready else None
                row.lineage = {**row.lineage, "serving": {"loaded_at": now.isoformat(), "swap_ms": swap_ms,
                                                          "waited_ms": waited_ms, "replicas": replicas}}  # fmt: skip
        log.info("swap.loaded", adapter=name, replicas=replicas, swap_ms=round(swap_ms, 1))
        return AdapterLoaded(event_id=f"adapter-loaded-{name}", occurred_at=now, source=SOURCE, adapter=name,
                             replicas=replicas)  # fmt: skip

    def _unloaded(self, report: ReconcileReport) -> list[AdapterUnloaded]:
        by_adapter: dict[str, list[str]] = {}
        for replica in report.replicas:
            for name in replica.unloaded:
                by_adapter.setdefault(name, []).append(replica.url)
        return [AdapterUnloaded(event_id=f"adapter-unloaded-{name}", occurred_at=utcnow(), source=SOURCE,
                                adapter=name, replicas=urls) for name, urls in sorted(by_adapter.items())]  # fmt: skip

    def _refuse(self, name: str, reason: str, detail: str) -> AdapterRefused:
        with self.sessions.begin() as session:
            row = session.get(Adapter, name)
            if row is not None:
                row.state, row.reason = AdapterState.FAILED, f"{reason}: {detail}"
        log.error("swap.refused", adapter=name, reason=reason, detail=detail)
        return AdapterRefused(event_id=f"adapter-refused-{name}", occurred_at=utcnow(), source=SOURCE,
                              adapter=name, reason=reason, detail=detail)  # fmt: skip

    def _row(self, name: str) -> Adapter | None:
        with self.sessions() as session:
            return session.get(Adapter, name)
