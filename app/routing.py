"""The gateway's side of the router: route decisions in process, from the newest snapshot.

The learner worker (``feedloop learn``) publishes a router snapshot to the store after each
checkpoint that changed it (``router_snapshots``). The gateway polls the store every
``FEEDLOOP_LEARNERS__SNAPSHOT_POLL_S`` in a thread and swaps the router in when a newer one
(higher id) appears, so a decision is a few matrix products in memory: no broker, no store,
no learner on the request path. Until the first snapshot, the gateway routes with the router
the learner starts from (the initial arms, uniform). If the store cannot be read, it keeps
routing with the last router it has, as it does when the newest snapshot is in a format it
refuses (a learner not yet upgraded, or not yet done rebuilding after an upgrade).

Draws come from the gateway's own RNG (``FEEDLOOP_LEARNERS__ROUTE_SEED``, fresh entropy by
default), kept across reloads: see ``streams.learning.restore``.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import numpy as np
import structlog
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from streams.config import LearnerSettings
from streams.store import RouterSnapshot
from learners.router import LinUCBRouter
from streams.contract import Context
from streams.learning import LearnerState, route_features

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RouteDecision:
    adapter: str
    propensity: float
    probabilities: dict[str, float]
    decision_id: str
    snapshot_version: int


@dataclass(frozen=True)
class _Loaded:
    """The router in use and where it came from, swapped as one reference."""

    router: LinUCBRouter
    version: int
    snapshot_id: int | None


class RoutingService:
    def __init__(self, config: LearnerSettings, sessions: sessionmaker) -> None:
        self.sessions = sessions
        self._rng = np.random.default_rng(config.route_seed)
        initial = LearnerState(config).snapshot()
        self._current = _Loaded(LinUCBRouter.from_bytes(initial.data, self._rng), initial.version, None)
        self._last_error: str | None = None
        self._refused: int | None = None  # the snapshot id last refused, logged once

    @property
    def arms(self) -> tuple[str, ...]:
        return self._current.router.arms

    def decide(self, context: Context, app_id: str | None) -> RouteDecision:
        current = self._current  # read once: a reload may swap it meanwhile
        decision = current.router.decide(route_features(context, app_id))
        return RouteDecision(decision.arm, decision.propensity, decision.probabilities, uuid.uuid4().hex,
                             current.version)  # fmt: skip

    def refresh(self) -> bool:
        """Load the newest snapshot if it is not the one in use; True when it swapped."""
        with self.sessions() as session:
            newest = session.scalar(select(RouterSnapshot).order_by(RouterSnapshot.id.desc()).limit(1))
        if newest is None or newest.id in (self._current.snapshot_id, self._refused):
            return False
        try:
            router = LinUCBRouter.from_bytes(newest.state, self._rng)
        except ValueError as error:
            log.warning("routing.snapshot_refused", snapshot_id=newest.id, error=str(error))
            self._refused = newest.id
            return False
        self._current = _Loaded(router, newest.version, newest.id)
        log.info("routing.snapshot_loaded", version=newest.version, examples=newest.examples, arms=newest.arms)
        return True

    async def poll(self) -> None:
        """Reload once, in a thread (the store query must not block requests); errors keep the
        current router and are logged when they change, not every poll."""
        try:
            await asyncio.to_thread(self.refresh)
        except SQLAlchemyError as error:
            message = str(error).splitlines()[0]
            if message != self._last_error:
                log.warning("routing.snapshot_unavailable", error=message,
                            hint="run `feedloop db upgrade` and `feedloop learn`")  # fmt: skip
            self._last_error = message
        else:
            self._last_error = None

    async def run(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)
            await self.poll()
