"""Liveness: every long-running process beats its row in the store; a row that stops beating is down.

Each process (worker, learner, trainer, swap, archiver, gateway, judge) runs a :class:`Heartbeat`
beside its work: it writes ``process_heartbeats`` every ``interval_s`` (whether it is ready,
and what it says it is doing) and marks the row stopped when the process ends cleanly. A
process killed outright stops beating, and :func:`state_of` calls it down once its last beat
is ``down_after_s`` old. ``feedloop status``, the dashboard and ``feedloop health`` (the
Docker health check) all read the rows through :func:`process_views`.

Why a row in the store and not an HTTP probe per process: six of the seven processes serve no
HTTP (Faust's web server is off), and an operator asking "what runs?" needs every process of
every host in one place; the store is the one thing they all reach. The beat is a task on the
process's own event loop, so a loop that hangs shows as down like a process that died; long
work (training, checkpoints) runs in threads and does not hold it up.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import structlog
from pydantic import BaseModel, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from streams.contract import utcnow
from streams.store import ProcessHeartbeat

log = structlog.get_logger(__name__)

UP, STARTING, DOWN = "up", "starting", "down"
PROCESSES = ("worker", "learner", "trainer", "swap", "archiver", "gateway", "judge")  # the names they beat under


class LivenessSettings(BaseModel):
    """``FEEDLOOP_LIVENESS__*``: how often processes beat and when a silent one counts as down."""

    interval_s: float = Field(2.0, gt=0, description="Seconds between two beats of one process.")
    down_after_s: float = Field(
        10.0, gt=0, description="A process whose last beat is older than this is down (several missed beats).")
    forget_after_s: float = Field(
        86_400.0, gt=0, description="Rows down for longer than this are no longer shown (a host that went away).")


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)  # SQLite forgets the zone


def _iso(moment: datetime) -> str:
    return _aware(moment).isoformat(timespec="seconds")


class Heartbeat:
    """Beats one process's row until stopped.

    ``ready`` says whether the process is doing its work yet (a Faust worker in a rebalance is
    not); ``detail`` what it is doing, shown beside it (``{"training": "b-0007"}``). A beat that
    cannot reach the store is logged and retried at the next one: liveness reporting never
    stops the process it reports on.
    """

    def __init__(self, process: str, sessions: sessionmaker, settings: LivenessSettings, *,
                 ready: Callable[[], bool] = lambda: True, detail: Callable[[], dict[str, Any]] = dict,
                 host: str | None = None, pid: int | None = None) -> None:  # fmt: skip
        self.process, self.sessions, self.settings = process, sessions, settings
        self.ready, self.detail = ready, detail
        self.host = host or socket.gethostname()
        self.pid = pid or os.getpid()
        self.instance = f"{process}@{self.host}:{self.pid}"
        self.started_at = utcnow()
        self._stopping = asyncio.Event()
        self._first = True

    def beat(self) -> None:
        """Write the row now (blocking: call it in a thread from an event loop)."""
        now = utcnow()
        with self.sessions.begin() as session:
            if self._first:  # the rows of this process's earlier runs on this host are history
                session.execute(delete(ProcessHeartbeat).where(
                    ProcessHeartbeat.process == self.process, ProcessHeartbeat.host == self.host,
                    ProcessHeartbeat.instance != self.instance,
                    (ProcessHeartbeat.stopped_at.is_not(None))
                    | (ProcessHeartbeat.beat_at < now - timedelta(seconds=self.settings.down_after_s)),
                ))  # fmt: skip
            session.merge(ProcessHeartbeat(
                instance=self.instance, process=self.process, host=self.host, pid=self.pid,
                started_at=self.started_at, beat_at=now, ready=bool(self.ready()), stopped_at=None,
                detail=self.detail(),
            ))  # fmt: skip
        self._first = False

    def stopped(self) -> None:
        """Mark the row stopped: the process ended on purpose (blocking)."""
        try:
            with self.sessions.begin() as session:
                if (row := session.get(ProcessHeartbeat, self.instance)) is not None:
                    row.stopped_at = row.beat_at = utcnow()
                    row.ready = False
        except Exception as error:  # noqa: BLE001 - the process is ending anyway; the row goes stale
            log.warning("liveness.stop_unrecorded", process=self.process, error=str(error)[:300],
                        hint=f"it shows as down after {self.settings.down_after_s:g} s without beats")  # fmt: skip

    async def beat_once(self) -> None:
        try:
            await asyncio.to_thread(self.beat)
        except Exception as error:  # noqa: BLE001 - see the class docstring
            log.warning("liveness.beat_failed", process=self.process, error=str(error)[:300],
                        hint="check FEEDLOOP_DATABASE_URL; the process goes on and beats again")  # fmt: skip

    async def __aenter__(self) -> Heartbeat:
        """``async with heartbeat:`` beats beside the block and marks the row stopped after it."""
        self._beating = asyncio.create_task(self.run())
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.stop()
        await self._beating

    async def run(self) -> None:
        """Beat every ``interval_s`` until :meth:`stop`, then mark the row stopped."""
        while not self._stopping.is_set():
            await self.beat_once()
            try:
                await asyncio.wait_for(self._stopping.wait(), self.settings.interval_s)
            except asyncio.TimeoutError:
                pass
        await asyncio.to_thread(self.stopped)

    def stop(self) -> None:
        self._stopping.set()


@dataclass(frozen=True)
class ProcessView:
    """One process as ``feedloop status`` shows it."""

    process: str
    instance: str
    host: str
    pid: int
    state: str  # up, starting or down
    why: str  # for a process that is not up
    started_at: str  # ISO 8601, UTC
    beat_at: str
    beat_age_s: float
    detail: dict[str, Any] = field(default_factory=dict)


def state_of(row: ProcessHeartbeat, now: datetime, settings: LivenessSettings) -> tuple[str, str]:
    """Pure core: (state, why) of one heartbeat row at ``now``."""
    age = (now - _aware(row.beat_at)).total_seconds()
    if row.stopped_at is not None:
        return DOWN, f"stopped at {_aware(row.stopped_at):%Y-%m-%d %H:%M:%S} UTC"
    if age > settings.down_after_s:
        return DOWN, f"no heartbeat for {age:.0f} s (killed, hung or cut off from the store)"
    if not row.ready:
        return STARTING, "not ready yet (starting, or rejoining its consumer group)"
    return UP, ""


def process_views(session: Session, settings: LivenessSettings, now: datetime | None = None,
                  processes: Sequence[str] = ()) -> list[ProcessView]:  # fmt: skip
    """Every process that beat within ``forget_after_s``, by process then host; only those named
    in ``processes`` when given."""
    now = now or utcnow()
    query = select(ProcessHeartbeat).where(
        ProcessHeartbeat.beat_at >= now - timedelta(seconds=settings.forget_after_s))
    if processes:
        query = query.where(ProcessHeartbeat.process.in_(processes))
    views = []
    for row in session.scalars(query):
        state, why = state_of(row, now, settings)
        views.append(ProcessView(
            process=row.process, instance=row.instance, host=row.host, pid=row.pid, state=state, why=why,
            started_at=_iso(row.started_at), beat_at=_iso(row.beat_at),
            beat_age_s=round((now - _aware(row.beat_at)).total_seconds(), 1), detail=dict(row.detail or {}),
        ))  # fmt: skip
    return sorted(views, key=lambda v: (v.process, v.host, v.started_at))
