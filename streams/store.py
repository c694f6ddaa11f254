"""The relational store: what feedloop records outside the event log.

Archive segments (where each stretch of the log is kept on disk), the adapter registry,
curated batches, erasures, A/B experiments, stream checkpoints and router snapshots: each
derived from events and rebuilt by replaying the log. Process heartbeats and the
learner's lease are the exceptions: they say which processes run now and which learner is
active, which no log can tell. The schema is created and
changed only by the Alembic migrations in ``migrations/`` (``feedloop db upgrade``); SQLite by
default, PostgreSQL in production.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    func,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker


# Every constraint gets a name, so that a later migration can drop or alter it by that name
# (SQLite's batch mode needs one; PostgreSQL's own names differ from version to version).
# Stores made before the convention got their names from migration 0007.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ArchiveSegment(Base):
    """One sealed, compressed file of consecutive records of one topic partition."""

    __tablename__ = "archive_segments"
    __table_args__ = (UniqueConstraint("cluster_id", "topic", "partition", "first_offset"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cluster_id: Mapped[str] = mapped_column(String(128), index=True)
    topic: Mapped[str] = mapped_column(String(255))
    partition: Mapped[int] = mapped_column(Integer)
    first_offset: Mapped[int] = mapped_column(BigInteger)
    last_offset: Mapped[int] = mapped_column(BigInteger)
    event_count: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1024), doc="Under the store's archive/ folder.")
    sha256: Mapped[str] = mapped_column(String(64), doc="Of the compressed segment's bytes; readers check it.")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    first_timestamp_ms: Mapped[int] = mapped_column(BigInteger, doc="Earliest record timestamp in the segment.")
    last_timestamp_ms: Mapped[int] = mapped_column(BigInteger, doc="Latest record timestamp in the segment.")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Adapter(Base):
    """The adapter registry: every LoRA adapter ever built, under its immutable name."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    state: Mapped[str] = mapped_column(String(32), doc="A streams.contract.AdapterState value.")
    path: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    base_model_sha256: Mapped[str] = mapped_column(String(64))
    parent: Mapped[str | None] = mapped_column(ForeignKey("adapters.name"), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True, doc="Why it failed or rolled back.")
    lineage: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class BatchStatus(StrEnum):
    """A batch's way through the trainer: emitted -> training -> trained | failed. A crash
    leaves it training (the trainer retries it); ``feedloop train --retry`` puts a failed one
    back to emitted."""

    EMITTED = "emitted"
    TRAINING = "training"
    TRAINED = "trained"
    FAILED = "failed"


class Batch(Base):
    """A curated training batch and its manifest."""

    __tablename__ = "batches"

    batch_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    path: Mapped[str] = mapped_column(String(1024))
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    example_count: Mapped[int] = mapped_column(Integer)
    trigger: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), doc="A BatchStatus.")
    reason: Mapped[str | None] = mapped_column(Text, nullable=True, doc="Why it failed, and what to do.")
    adapter: Mapped[str | None] = mapped_column(ForeignKey("adapters.name"), nullable=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Erasure(Base):
    """A user's erasure, as the trainer applies it (trainer/erasure.py): from a ``user_erased``
    control event, or written by the erase itself before the event is announced. Keyed by the
    pseudonym the user had; no user id is kept."""

    __tablename__ = "erasures"

    pseudonym: Mapped[str] = mapped_column(String(64), primary_key=True)
    app_id: Mapped[str] = mapped_column(String(128), index=True)
    erased_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), doc="The key store's time of the erasure.")
    event_id: Mapped[str] = mapped_column(String(128), doc="Of its user_erased event.")
    announced: Mapped[bool] = mapped_column(Boolean, default=False, doc="Its user_erased is on the control topic.")
    adapters: Mapped[list[str]] = mapped_column(JSON, default=list, doc="Trained on the user's data: to retrain.")
    recut_batches: Mapped[list[str]] = mapped_column(JSON, default=list, doc="Untrained batches cut without them.")
    applied_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, doc="When the trainer cut the user out of the untrained batches."
    )


class Experiment(Base):
    """A rolling A/B test of a challenger adapter against the champion."""

    __tablename__ = "experiments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    challenger: Mapped[str] = mapped_column(ForeignKey("adapters.name"))
    champion: Mapped[str | None] = mapped_column(ForeignKey("adapters.name"), nullable=True)
    decision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class StreamCheckpoint(Base):
    """A stream worker's state after the records it covers (pickled, compressed): streams/checkpoint.py.

    The worker acknowledges records to the broker only after the checkpoint that includes them
    is written, so a restarted worker loads this and skips what it already holds.
    """

    __tablename__ = "stream_checkpoints"

    consumer: Mapped[str] = mapped_column(String(128), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[str] = mapped_column(String(128))
    offset: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[bytes] = mapped_column(LargeBinary)
    format_version: Mapped[int] = mapped_column(Integer, server_default="1", doc="The format of ``state``.")
    positions: Mapped[list[list[Any]] | None] = mapped_column(
        JSON, nullable=True, doc="[topic, partition, last offset handled] per input; none in rows from before 0004."
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )


class RouterSnapshot(Base):
    """The learners' router at one version, as the gateway loads it (streams/learning.py).

    The learner worker adds one after each checkpoint that changed the router; the gateway
    polls for the newest (highest id). Only the newest few are kept.
    """

    __tablename__ = "router_snapshots"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    learner: Mapped[str] = mapped_column(String(128), doc="The learner worker's consumer name.")
    version: Mapped[int] = mapped_column(BigInteger, doc="Changes the learner state had applied.")
    examples: Mapped[int] = mapped_column(BigInteger, doc="Examples the router had learned from.")
    arms: Mapped[list[str]] = mapped_column(JSON)
    state: Mapped[bytes] = mapped_column(LargeBinary, doc="learners.router.LinUCBRouter.to_bytes.")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ProcessHeartbeat(Base):
    """One running feedloop process, as it last reported itself (app/liveness.py).

    Each long-running process writes its row every few seconds and marks it stopped when it
    ends; a row whose last beat is older than the liveness timeout is a process that died.
    """

    __tablename__ = "process_heartbeats"

    instance: Mapped[str] = mapped_column(String(255), primary_key=True, doc="process@host:pid")
    process: Mapped[str] = mapped_column(String(64), doc="worker, learner, trainer, swap, archiver, gateway")
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ready: Mapped[bool] = mapped_column(Boolean, default=False, doc="Doing its work (not starting up).")
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, doc="What the process says it is doing.")


class LearnerLease(Base):
    """Which `feedloop learn` process is the active learner, at which epoch (streams/lease.py).

    The holder bumps ``beat`` every few seconds and in each checkpoint transaction, which
    writes only while holder and epoch are still its own; a standby that sees ``beat`` stand
    still for the lease's time to live takes the row over with the next epoch.
    """

    __tablename__ = "learner_leases"

    name: Mapped[str] = mapped_column(String(128), primary_key=True, doc="The learner's consumer group.")
    holder: Mapped[str | None] = mapped_column(String(255), nullable=True, doc="process@host:pid:token; none: released.")
    epoch: Mapped[int] = mapped_column(BigInteger, doc="Bumped by every takeover: a writer of an older one is fenced.")
    beat: Mapped[int] = mapped_column(BigInteger, doc="Renewals by this holder at this epoch.")
    renewed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), doc="The holder's clock at its last renewal (shown to operators; never compared)."
    )


STORE_FILE = "feedloop.db"  # the SQLite store in the data directory, when no database URL is set


def store_url(database_url: str | None, data_dir: Path) -> str:
    """The store's URL: the configured database, else the SQLite file in the data directory.
    One rule for the settings (``Settings.store_url``) and for plain ``alembic`` (migrations/env.py)."""
    return database_url or f"sqlite:///{data_dir.absolute() / STORE_FILE}"


def make_engine(url: str) -> Engine:
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        # Several processes (gateway, archive, worker) share the file: WAL lets readers run
        # beside the one writer, and foreign keys are off in SQLite unless asked for.
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
