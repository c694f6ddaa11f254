"""The learner's lease: any number of `feedloop learn` processes, exactly one of them active.

The learner's state is global (one router, the A/B tests, the drift detectors), so two active
learners would split the examples between two routers, or, if both read everything, write
over each other's checkpoint. One row of ``learner_leases`` says who is active:
``holder`` (process@host:pid:token), ``epoch`` (bumped by every takeover) and ``beat`` (bumped
by every renewal). The process that holds it consumes; every other one is a **standby** that
has not joined the ``feedloop-learners`` consumer group (Faust would split the partitions
with it) and only reads the row.

- **Renewal.** The holder bumps ``beat`` every ``lease_renew_s`` and in every checkpoint
  transaction (:meth:`HeldLease.fence`).
- **Expiry without clocks compared.** A standby calls the lease dead when it has seen the
  same (epoch, beat) for ``lease_ttl_s`` on its *own* monotonic clock (:class:`Watch`); the
  holder calls itself expired when its last successful renewal *started* ``lease_ttl_s`` ago
  on *its* own clock (:class:`Tenure`) and stops. No timestamp of one host is compared with
  another's, so clock skew between hosts cannot move a takeover earlier; the holder's bound
  starts before the standby's (the renewal starts before its commit is seen), so a holder cut
  off from the store stops at its first renewal attempt past the bound, about when a standby
  may take over (a renewal stuck in a TCP timeout delays that: the fence below is what keeps
  the state safe, and the outputs it sends meanwhile carry the ids the new active gives them).
- **Takeover** is a compare-and-set on the (epoch, beat) the standby watched stand still:
  ``UPDATE ... SET holder=me, epoch=epoch+1 WHERE epoch=:seen AND beat=:seen`` (a plain
  conditional UPDATE: atomic on SQLite and PostgreSQL alike). Of two standbys one wins; a
  holder that renewed meanwhile wins over both. The new holder then builds the learner as a
  restart does: it loads the checkpoint, joins the consumer group, and the broker redelivers
  from the committed offsets (which never pass the checkpoint); the state skips what it holds.
- **Fencing.** The checkpoint transaction first bumps the row *where holder and epoch are
  still the writer's*; no row updated means another process took over, the transaction
  rolls back (state and router snapshot are not written) and :class:`LeaseLost` stops the
  process with ``learners.lease_lost``. A paused or partitioned learner that wakes up thus
  never overwrites the new active's state. The row lock the UPDATE takes orders a takeover
  after a checkpoint in flight, or the checkpoint after the takeover, never between.
- **Release.** A learner that stops cleanly (SIGTERM) sets ``holder`` to none, so a standby
  takes over at its next poll rather than after the time to live (a rolling deploy).

The decisions (is the lease free for me, may this epoch write, has my tenure run out) are the
plain deterministic classes and :func:`may_write` below, with time passed in; the store calls
around them are :class:`Leases` and :class:`HeldLease`, and the agent code
(``streams.learner_agents``) only calls them.

Why a row in the store and not the consumer group (one partition, the group's owner is the
active): the checkpoint lives in the store, so the fence must be checked in the same
transaction as the checkpoint write, and a group rebalance on Tansu takes half a session
timeout per join, with no epoch a writer could be fenced by.

What a takeover does to decisions (drift alarms, verdicts, review picks, router snapshots)
is in docs/deployment.md, "Running a standby learner".
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import structlog
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from streams.contract import utcnow
from streams.store import LearnerLease

log = structlog.get_logger(__name__)


class LeaseLost(Exception):
    """Another process holds the learner's lease now: this one must stop, not write."""


@dataclass(frozen=True)
class Lease:
    """The row as read: who holds it (None: released), at which epoch, renewed how often."""

    holder: str | None
    epoch: int
    beat: int


def may_write(lease: Lease | None, holder: str, epoch: int) -> bool:
    """May ``holder``, which took the lease at ``epoch``, write? Only while the row still says so."""
    return lease is not None and lease.holder == holder and lease.epoch == epoch


class Watch:
    """A standby's view of the row over time, on its own clock: is the lease free to take?

    Free when there is no row, when it was released, or when the standby has seen the same
    (epoch, beat) for ``ttl_s``. The first sight of a row starts the count, so a standby that
    starts beside a dead holder waits one ``ttl_s``: it cannot know how old the last beat is
    without comparing another host's clock.

    >>> watch = Watch(ttl_s=10)
    >>> watch.free(Lease("a", 1, 5), now=0.0), watch.free(Lease("a", 1, 5), now=9.9)
    (False, False)
    >>> watch.free(Lease("a", 1, 6), now=12.0)  # renewed: the count starts again
    False
    >>> watch.free(Lease("a", 1, 6), now=22.0), watch.free(Lease(None, 1, 6), now=22.0)
    (True, True)
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._seen: tuple[int, int] | None = None
        self._since = 0.0

    def free(self, lease: Lease | None, now: float) -> bool:
        if lease is None or lease.holder is None:
            return True
        if (lease.epoch, lease.beat) != self._seen:
            self._seen, self._since = (lease.epoch, lease.beat), now
            return False
        return now - self._since >= self.ttl_s


class Tenure:
    """The holder's own view: it has run out once its last successful renewal *started*
    ``ttl_s`` ago (its own clock), the earliest a standby may have taken over.

    >>> tenure = Tenure(ttl_s=10, now=0.0)
    >>> tenure.expired(9.9), tenure.expired(10.0)
    (False, True)
    >>> tenure.renewed(started=8.0); tenure.expired(17.9)
    False
    """

    def __init__(self, ttl_s: float, now: float) -> None:
        self.ttl_s = ttl_s
        self.since = now

    def renewed(self, started: float) -> None:
        self.since = max(self.since, started)

    def expired(self, now: float) -> bool:
        return now - self.since >= self.ttl_s


def holder_id(process: str = "learner") -> str:
    """process@host:pid:token: the token tells apart two lives of one pid (a restarted container)."""
    return f"{process}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Leases:
    """The lease row of one learner (``name``: its consumer group) in the store."""

    def __init__(self, sessions: sessionmaker, name: str, *, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.sessions = sessions
        self.name = name
        self.ttl_s = ttl_s
        self.clock = clock

    def read(self, session: Session | None = None) -> Lease | None:
        if session is None:
            with self.sessions() as own:
                return self.read(own)
        row = session.get(LearnerLease, self.name, populate_existing=True)
        return None if row is None else Lease(row.holder, row.epoch, row.beat)

    def take(self, holder: str, seen: Lease | None) -> HeldLease | None:
        """Take the lease from the row as ``seen`` (compare-and-set); None: someone was quicker."""
        started = self.clock()
        epoch = 1 if seen is None else seen.epoch + 1
        try:
            with self.sessions.begin() as session:
                if seen is None:
                    session.add(LearnerLease(name=self.name, holder=holder, epoch=epoch, beat=0, renewed_at=utcnow()))
                    session.flush()
                else:
                    taken = session.execute(
                        update(LearnerLease)
                        .where(LearnerLease.name == self.name, LearnerLease.epoch == seen.epoch,
                               LearnerLease.beat == seen.beat)
                        .values(holder=holder, epoch=epoch, beat=0, renewed_at=utcnow())
                    ).rowcount  # fmt: skip
                    if taken != 1:
                        return None
        except IntegrityError:  # another standby inserted the first row
            return None
        return HeldLease(self, holder, epoch, Tenure(self.ttl_s, started))

    def standby(self, holder: str, *, poll_s: float, sleep: Callable[[float], None] = time.sleep) -> HeldLease:
        """Wait, as a standby, until this process holds the lease; then return it."""
        watch = Watch(self.ttl_s)
        started = self.clock()
        said = False
        while True:
            try:
                seen = self.read()
                held = self.take(holder, seen) if watch.free(seen, self.clock()) else None
            except Exception:  # noqa: BLE001 - the store is out of reach: a standby waits on
                log.warning("learners.standby_store_unreachable", holder=holder, exc_info=True,
                            action="check FEEDLOOP_DATABASE_URL; the standby retries")  # fmt: skip
                seen, held = None, None
            if held is not None:
                log.info("learners.lease_acquired", holder=holder, epoch=held.epoch,
                         previous=None if seen is None else seen.holder,
                         waited_s=round(self.clock() - started, 3))  # fmt: skip
                return held
            if not said and seen is not None and seen.holder is not None:
                log.info("learners.standby", holder=holder, active=seen.holder, epoch=seen.epoch,
                         takes_over="when the active stops renewing for lease_ttl_s", ttl_s=self.ttl_s)  # fmt: skip
                said = True
            sleep(poll_s)


@dataclass
class HeldLease:
    """The lease as this process holds it: renew it, fence a checkpoint with it, release it."""

    leases: Leases
    holder: str
    epoch: int
    tenure: Tenure
    _starting: threading.Event | None = field(default=None, repr=False)

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A transaction that commits only while this process holds the lease, and renews it.

        The fence comes first, so on PostgreSQL the row lock is held from the start: a
        takeover waits for the transaction, then sees the new beat and fails its CAS."""
        started = self.leases.clock()
        with self.leases.sessions.begin() as session:
            self.fence(session)
            yield session
        self.tenure.renewed(started)

    def fence(self, session: Session) -> None:
        """In the caller's transaction: renew, or raise :class:`LeaseLost` if no longer ours
        (the caller's transaction then rolls back: nothing of it is written)."""
        row = session.get(LearnerLease, self.leases.name, with_for_update=True, populate_existing=True)
        now = None if row is None else Lease(row.holder, row.epoch, row.beat)
        bumped = may_write(now, self.holder, self.epoch) and session.execute(
            update(LearnerLease)  # the same condition again, atomically: SQLite ignores FOR UPDATE
            .where(LearnerLease.name == self.leases.name, LearnerLease.holder == self.holder,
                   LearnerLease.epoch == self.epoch)
            .values(beat=LearnerLease.beat + 1, renewed_at=utcnow())
        ).rowcount == 1  # fmt: skip
        if not bumped:
            raise LeaseLost(f"the learner's lease is held by {now.holder if now else 'nobody'} at epoch "
                            f"{now.epoch if now else '-'}, not by {self.holder} at epoch {self.epoch}")  # fmt: skip

    def renew(self) -> None:
        """Renew in a transaction of its own; :class:`LeaseLost` if another process holds it."""
        with self.writing():
            pass

    def renew_while_starting(self, every_s: float) -> None:
        """Renew from a thread until :meth:`started`: between the takeover and the learner's
        event loop renewing (loading the checkpoint, or rebuilding one from the archive, can
        take minutes), so no other standby takes the lease from a learner still starting.
        Afterwards only the event loop renews, so a hung loop loses the lease."""
        self._starting = threading.Event()

        def run(starting: threading.Event) -> None:
            while not starting.wait(every_s):
                try:
                    self.renew()
                except LeaseLost:
                    return  # the learner's first renewal or checkpoint says so, and stops it
                except Exception:  # noqa: BLE001 - the store is out of reach: try again
                    log.warning("learners.lease_renew_failed", holder=self.holder, epoch=self.epoch, exc_info=True)

        threading.Thread(target=run, args=(self._starting,), name="lease-while-starting", daemon=True).start()

    def started(self) -> None:
        """The learner's event loop renews from now on: the thread of :meth:`renew_while_starting` ends."""
        if self._starting is not None:
            self._starting.set()

    def expired(self) -> bool:
        """No renewal has succeeded for the lease's time to live: a standby may hold it now."""
        return self.tenure.expired(self.leases.clock())

    def release(self) -> None:
        """Hand the lease over now (a clean stop): a standby takes it at its next poll."""
        try:
            with self.leases.sessions.begin() as session:
                released = session.execute(
                    update(LearnerLease)
                    .where(LearnerLease.name == self.leases.name, LearnerLease.holder == self.holder,
                           LearnerLease.epoch == self.epoch)
                    .values(holder=None)
                ).rowcount  # fmt: skip
        except Exception:  # noqa: BLE001 - stopping anyway: the lease runs out by itself
            log.warning("learners.lease_release_failed", holder=self.holder, epoch=self.epoch, exc_info=True,
                        action="nothing to do: a standby takes over once lease_ttl_s has passed")  # fmt: skip
            return
        if released:
            log.info("learners.lease_released", holder=self.holder, epoch=self.epoch)
