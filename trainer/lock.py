"""The trainer's lock: one training, or one erasure re-cut, at a time per store, across hosts.

What it protects is in the store, not on a disk: the next adapter's sequence number
(``Registry.next_name``: the newest plus one), the parent it continues from (the newest,
``trainer.worker.parent_for_next``), the batch rows and the batches' objects that an erasure
rewrites. Two trainers on two hosts that overlap would give two adapters one sequence number
and one parent (one line of training lost), or train a batch while an erasure re-cuts it. So
the lock lives where that state does, in the SQLAlchemy store, and is taken by
``TrainerLock(sessions, fallback_dir).acquire()`` or ``with exclusive(sessions, fallback_dir)``:

- **PostgreSQL**: a session-level ``pg_advisory_lock`` on key :func:`advisory_key`
  (``feedloop.trainer``; advisory locks are per database, so per store), held by a
  connection of its own for as long as the training runs. The server drops the lock when
  that connection ends, so a trainer that crashes, is SIGKILLed or loses its host frees it:
  there is no row to go stale and no time to live to tune (a training takes from a minute to
  hours, so any TTL is either too short for the longest or too long for a takeover, and would
  need a renewing thread beside the training). The connection sits in autocommit, idle
  between statements: no transaction stays open for hours (nothing for VACUUM to wait on, no
  ``idle_in_transaction_session_timeout`` to trip). It sets the server's TCP keepalives
  (``tcp_keepalives_*``: about a minute), so a holder whose host vanishes without closing its
  socket frees the lock in about a minute rather than the kernel's two hours. It names
  itself (``application_name``: ``trainer@host:pid:token``), so a waiter logs who holds the
  lock, from ``pg_locks`` and ``pg_stat_activity``. It needs a server session of its own: a
  pooler in front of PostgreSQL must pool sessions, not transactions (PgBouncer's
  ``pool_mode = session``), or the lock would go with whichever client got the session.
- **SQLite**: one host by construction (a file the processes share), so the lock is the
  ``flock`` it always was, on ``<database>.trainer-lock`` next to the database file (an
  in-memory database: ``fallback_dir/.trainer.lock``), which the kernel drops with the
  process. The holder writes its name into the file, for the waiters' log line.

Why not a lease row like the learner's (``streams.lease``): the learner renews from its event
loop and fences every checkpoint with the row; a training is one long call into torch with
nothing to renew from, and what must be excluded is mostly reads (the newest adapter, the
batch's files) that a fence on the final write cannot undo. A lost lock is detected instead:
a lock held by a connection is lost only with the connection, so :meth:`TrainerLock.check`,
called right before the adapter is published and before an erasure commits, asks the
server whether this connection still holds it, and :class:`TrainerLockLost` stops the
trainer without publishing (the batch stays "training"; the restarted trainer trains it
again). What is left is the window between that check and the commit, a moment instead of
the training.

Waiting polls ``pg_try_advisory_lock`` (or a non-blocking ``flock``) every ``poll_s`` rather
than blocking in ``pg_advisory_lock``: a waiter then logs ``trainer.lock_waiting`` with the
holder and the time waited, at once and every ``report_every_s`` (:class:`Patience`), and a
store that goes away while it waits raises instead of hanging. Waiters are not served in
order, which one trainer in line behind another does not need.

The pure cores are :func:`advisory_key`, :func:`lock_tag` and :class:`Patience`; the rest is
the store calls around them.
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import structlog
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from streams.lease import holder_id

log = structlog.get_logger(__name__)

LOCK_NAME = "feedloop.trainer"
SQLITE_SUFFIX = ".trainer-lock"
FALLBACK_FILE = ".trainer.lock"
# Server-side TCP keepalives of the lock's connection (seconds, seconds, probes): a holder whose
# host is gone without a FIN loses the lock after about idle + interval * count.
KEEPALIVES = {"tcp_keepalives_idle": 30, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 3}
WHAT_TO_DO = ("check FEEDLOOP_DATABASE_URL and that the database is up; the trainer exits, and the batch it "
              "was given stays 'training' and is trained again from scratch when it is restarted")  # fmt: skip


class TrainerLockError(RuntimeError):
    """The trainer's lock could not be taken or kept; the message says what to do."""


class TrainerLockLost(TrainerLockError):
    """The connection that held the lock is gone: another trainer may hold it now, so this one
    must not publish or commit what it did under it."""


def advisory_key(name: str = LOCK_NAME) -> int:
    """The signed 64-bit key of ``pg_advisory_lock`` for ``name``: the first 8 bytes of its sha256.

    Fixed by the name alone, so every feedloop version and host agrees on it.

    >>> advisory_key() == advisory_key("feedloop.trainer") != advisory_key("feedloop.other")
    True
    >>> -(2**63) <= advisory_key() < 2**63
    True
    """
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def lock_tag(key: int) -> tuple[int, int]:
    """The (classid, objid) under which ``pg_locks`` shows an advisory lock on a bigint key
    (its high and low 32 bits, unsigned; objsubid is 1).

    >>> lock_tag(1), lock_tag(-1), lock_tag(2**32 + 5)
    ((0, 1), (4294967295, 4294967295), (1, 5))
    """
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


class Patience:
    """When a waiter says it still waits: at once, then every ``every_s`` (time passed in).

    >>> patience = Patience(every_s=60, now=0.0)
    >>> [patience.due(t) for t in (0.0, 1.0, 59.9, 60.0, 61.0, 125.0)]
    [True, False, False, True, False, True]
    """

    def __init__(self, every_s: float, now: float) -> None:
        self.every_s = every_s
        self.next = now

    def due(self, now: float) -> bool:
        if now < self.next:
            return False
        self.next = now + self.every_s
        return True


class TrainerLock:
    """The trainer's lock on the store that ``sessions`` (a sessionmaker, or an engine) reaches.

    ``fallback_dir`` (the adapters directory) holds the lock file only for an in-memory SQLite
    database. :meth:`acquire` blocks until this process holds it and returns the lock;
    :meth:`release` (or leaving ``with``) frees it. Not reentrant: one holder per instance,
    and a second instance in the same process waits like another host would."""

    def __init__(self, sessions: sessionmaker | Engine, fallback_dir: str | Path, *, poll_s: float = 1.0,
                 report_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.engine: Engine = sessions if isinstance(sessions, Engine) else sessions.kw["bind"]
        self.dialect = self.engine.dialect.name
        if self.dialect not in ("postgresql", "sqlite"):
            raise TrainerLockError(f"the trainer's lock knows PostgreSQL and SQLite, not {self.dialect}: point "
                                   "FEEDLOOP_DATABASE_URL at a PostgreSQL database")  # fmt: skip
        self.fallback_dir = Path(fallback_dir)
        self.poll_s, self.report_every_s = poll_s, report_every_s
        self.clock, self.sleep = clock, sleep
        self.holder = holder_id("trainer")
        self.key = advisory_key()
        self._connection: Connection | None = None
        self._file: IO[str] | None = None
        self._held = False

    @property
    def where(self) -> str:
        """What is locked, for log lines: the database (without credentials), or the lock file."""
        if self.dialect == "postgresql":
            return f"{self.engine.url.render_as_string(hide_password=True)} advisory lock {self.key}"
        return str(self.path)

    @property
    def path(self) -> Path:
        """SQLite's lock file: next to the database file, or in ``fallback_dir`` for ``:memory:``."""
        database = self.engine.url.database
        if not database or database == ":memory:" or database.startswith("file::memory:"):
            return self.fallback_dir / FALLBACK_FILE
        return Path(database).with_name(Path(database).name + SQLITE_SUFFIX)

    @property
    def held(self) -> bool:
        """Acquired and not released (on PostgreSQL, as far as this process knows: :meth:`check` asks)."""
        return self._held

    # --- acquire, check, release ----------------------------------------------------------------

    def acquire(self) -> TrainerLock:
        """Block until this process holds the lock (logging who holds it meanwhile); return self."""
        if self.held:
            raise TrainerLockError(f"{self.holder} holds the trainer's lock already: release it first")
        started = self.clock()
        patience = Patience(self.report_every_s, started)
        if self.dialect == "postgresql":
            take, holder = self._try_pg, self._pg_holder
            self._connection = self._connect()
        else:
            take, holder = self._try_file, self._file_holder
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+")  # noqa: SIM115 - held until release()
        waited = False
        try:
            while not take():
                if patience.due(self.clock()):
                    log.info("trainer.lock_waiting", holder=self.holder, held_by=holder(), lock=self.where,
                             waited_s=round(self.clock() - started, 1),
                             hint="another trainer (or erasure re-cut) holds it: this one goes on when that one "
                                  "finishes or its process ends")  # fmt: skip
                    waited = True
                self.sleep(self.poll_s)
        except BaseException:
            self.release()
            raise
        self._held = True
        (log.info if waited else log.debug)("trainer.lock_acquired", holder=self.holder, lock=self.where,
                waited_s=round(self.clock() - started, 1))  # fmt: skip
        return self

    def check(self) -> None:
        """Raise :class:`TrainerLockLost` unless this process still holds the lock.

        Called before publishing what was done under it. On PostgreSQL it asks the server
        (``pg_locks`` for this connection's backend); a file lock cannot be lost."""
        if self._held and self._file is not None:
            return
        if not self._held or self._connection is None:
            raise TrainerLockLost(f"{self.holder} does not hold the trainer's lock (released, or never acquired)")
        classid, objid = lock_tag(self.key)
        try:
            held = self._connection.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
                     " AND pid = pg_backend_pid() AND classid::bigint = :classid AND objid::bigint = :objid"),
                {"classid": classid, "objid": objid},
            ).scalar_one()  # fmt: skip
        except DBAPIError as exc:
            raise TrainerLockLost(f"the connection holding the trainer's lock on {self.where} is gone ({exc.orig}), "
                                  "so another trainer may hold it now; what was done under it is neither "
                                  f"published nor committed: {WHAT_TO_DO}") from exc  # fmt: skip
        if held != 1:
            raise TrainerLockLost(f"the trainer's lock on {self.where} is no longer held by {self.holder}; what was "
                                  f"done under it is neither published nor committed: {WHAT_TO_DO}")  # fmt: skip

    def release(self) -> None:
        """Free the lock: unlock and close its connection, or unlock the file.

        The unlock is answered once the lock is free; closing alone frees it only when the
        server's backend has ended, a moment after the close returns (which is all a crashed
        trainer gets, and enough)."""
        held, self._held = self._held, False
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                if held:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            except Exception:  # noqa: BLE001 - gone already: the server dropped the lock with it
                log.debug("trainer.lock_unlock_failed", holder=self.holder, exc_info=True)
            try:
                connection.close()  # detached from the pool: this closes the socket
            except Exception:  # noqa: BLE001 - as above
                log.debug("trainer.lock_close_failed", holder=self.holder, exc_info=True)
        handle, self._file = self._file, None
        if handle is not None:
            if held:  # a waiter that gives up must not wipe the holder's name
                handle.truncate(0)
            handle.close()  # closing the descriptor drops the flock

    def __enter__(self) -> TrainerLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

    # --- PostgreSQL -----------------------------------------------------------------------------

    def _connect(self) -> Connection:
        try:
            connection = self.engine.connect()
        except DBAPIError as exc:
            raise TrainerLockError(f"cannot reach the store at {self.where} for the trainer's lock ({exc.orig}): "
                                   f"{WHAT_TO_DO}") from exc  # fmt: skip
        try:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            connection.detach()  # its own session, closed for real on release, never reused with the lock
            connection.execute(text("SELECT set_config('application_name', :name, false)"), {"name": self.holder[:63]})
            for setting, value in KEEPALIVES.items():
                connection.execute(text("SELECT set_config(:setting, :value, false)"),
                                   {"setting": setting, "value": str(value)})  # fmt: skip
        except BaseException:
            connection.close()
            raise
        return connection

    def _try_pg(self) -> bool:
        assert self._connection is not None
        try:
            return bool(self._connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar())
        except DBAPIError as exc:
            raise TrainerLockError(f"lost the store at {self.where} while waiting for the trainer's lock ({exc.orig}): "
                                   f"{WHAT_TO_DO}") from exc  # fmt: skip

    def _pg_holder(self) -> str | None:
        """Who holds it, as its connection named itself (with its address), or None if unknown."""
        assert self._connection is not None
        classid, objid = lock_tag(self.key)
        try:
            row = self._connection.execute(
                text("SELECT a.application_name, host(a.client_addr), a.pid FROM pg_locks l"
                     " JOIN pg_stat_activity a ON a.pid = l.pid"
                     " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                     " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                     " AND l.classid::bigint = :classid AND l.objid::bigint = :objid"),
                {"classid": classid, "objid": objid},
            ).first()  # fmt: skip
        except DBAPIError:  # only for the log line: the next try says if the store is gone
            return None
        if row is None:
            return None
        name, address, pid = row
        return f"{name or 'backend ' + str(pid)}" + (f" from {address}" if address else "")

    # --- SQLite: a file lock --------------------------------------------------------------------

    def _try_file(self) -> bool:
        assert self._file is not None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._file.truncate(0)
        self._file.write(self.holder)
        self._file.flush()
        return True

    def _file_holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except OSError:
            return None


@contextmanager
def exclusive(sessions: sessionmaker | Engine, fallback_dir: str | Path, *,
              held: TrainerLock | None = None) -> Iterator[TrainerLock]:  # fmt: skip
    """Hold the trainer's lock for the block (see the module doc).

    ``held``: a lock the caller holds already (the worker holds one across a batch's erasures,
    parent choice, training and upload), used as it is: neither taken again nor released."""
    if held is not None:
        if not held.held:
            raise TrainerLockError(f"{held.holder} was handed in as the trainer's lock but does not hold it")
        yield held
        return
    with TrainerLock(sessions, fallback_dir) as lock:
        yield lock
