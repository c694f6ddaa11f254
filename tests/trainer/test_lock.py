"""The trainer's lock (trainer/lock.py), held in the store: one training or re-cut at a time
across processes that share the store but not a disk.

Each "host" is a process of its own (tests/trainer/lock_holder.py) with a local directory of
its own, against one PostgreSQL database (or, on SQLite, one database file): the second
waits, and says who it waits for, until the first lets go or is SIGKILLed. In-process tests
check what the callers rely on: release frees the lock for any other connection (nothing is
left in a pooled connection), a lock whose connection died is seen lost before publishing,
an erasure re-cut waits for a trainer on another host, and the worker chooses the parent
under the lock (so it continues from the adapter the other host just registered).
"""

from __future__ import annotations

import asyncio
import doctest
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest

import migrations
import trainer.lock
from streams.contract import AdapterState, BatchEmitted, utcnow
from streams.objects import ObjectStore
from streams.store import Adapter, make_engine, make_sessionmaker
from tests.conftest import make_settings
from trainer.erasure import apply_erasures
from trainer.lock import TrainerLock, TrainerLockLost, advisory_key, exclusive
from trainer.registry import BatchAlreadyDone
from trainer.worker import TrainerWorker

ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 60.0  # a fresh interpreter importing SQLAlchemy and the store on a loaded 2-core machine
HANDOVER_S = 15.0  # release (or SIGKILL) to the waiter holding it: the waiter polls every 0.05 s


@pytest.fixture(params=["postgresql", "sqlite"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'feedloop.db'}"
    return request.getfixturevalue("database_url")


def raw_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


class Host:
    """A lock_holder process with its own local directory."""

    def __init__(self, url: str, local: Path) -> None:
        local.mkdir(parents=True)
        self.local = local
        self.log = local / "stderr.log"
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "tests.trainer.lock_holder", url, str(local)],
                                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                            stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip

    def acquired(self) -> bool:
        return (self.local / "acquired").exists()

    def waiting_lines(self) -> list[dict]:
        lines = [line for line in self.log.read_text().splitlines() if line.startswith("{")]
        return [entry for entry in map(json.loads, lines) if entry.get("event") == "trainer.lock_waiting"]

    def release(self) -> None:
        (self.local / "release").touch()

    def wait_exit(self) -> int:
        try:
            return self.process.wait(timeout=STARTUP_S)
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stderr(self) -> str:
        return self.log.read_text()


def wait_for(condition, timeout_s: float, what: str, *hosts: Host) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {host.local.name}:\n{host.stderr()[-3000:]}" for host in hosts)
            pytest.fail(f"{what} not within {timeout_s} s\n{logs}")
        for host in hosts:
            if host.process.poll() not in (None, 0, -signal.SIGKILL):
                pytest.fail(f"{host.local.name} exited with {host.process.returncode}:\n{host.stderr()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture
def hosts(tmp_path):
    started: list[Host] = []

    def start(url: str, name: str) -> Host:
        host = Host(url, tmp_path / name)
        started.append(host)
        return host

    yield start
    for host in started:
        host.stop()


def first_holds_second_waits(store_url: str, hosts) -> tuple[Host, Host]:
    first = hosts(store_url, "host-a")
    wait_for(first.acquired, STARTUP_S, "host-a taking the free lock", first)
    second = hosts(store_url, "host-b")
    wait_for(lambda: second.waiting_lines(), STARTUP_S, "host-b saying it waits", first, second)
    # It says who holds it: host-a's process (trainer@host:pid:token).
    assert f":{first.process.pid}:" in second.waiting_lines()[0]["held_by"]
    time.sleep(1.0)  # twenty of its polls
    assert not second.acquired(), "host-b took the lock that host-a holds"
    return first, second


def test_the_second_host_waits_until_the_first_releases(store_url, hosts):
    first, second = first_holds_second_waits(store_url, hosts)
    first.release()
    wait_for(second.acquired, HANDOVER_S, "host-b taking the lock host-a released", first, second)
    assert first.wait_exit() == 0, first.stderr()
    second.release()
    assert second.wait_exit() == 0, second.stderr()


def test_a_killed_holder_releases_the_lock(store_url, hosts):
    first, second = first_holds_second_waits(store_url, hosts)
    first.process.send_signal(signal.SIGKILL)  # no release, no clean close of its connection
    assert first.process.wait(timeout=10) == -signal.SIGKILL
    wait_for(second.acquired, HANDOVER_S, "host-b taking the lock of the killed host-a", second)
    assert not (first.local / "released").exists()
    second.release()
    assert second.wait_exit() == 0, second.stderr()


def test_release_frees_the_lock_for_any_connection(database_url, tmp_path):
    """The lock's connection is the trainer's own and is closed on release: a pooled
    connection that went back to the pool still holding it would block every other host."""
    engine = make_engine(database_url)
    key = advisory_key()
    with psycopg.connect(raw_url(database_url), autocommit=True) as other:
        try_lock = "SELECT pg_try_advisory_lock(%s)"
        for _ in range(2):  # twice: the second must not find it left in the pool
            with exclusive(make_sessionmaker(engine), tmp_path) as lock:
                lock.check()
                assert other.execute(try_lock, (key,)).fetchone() == (False,)
            assert other.execute(try_lock, (key,)).fetchone() == (True,)
            other.execute("SELECT pg_advisory_unlock(%s)", (key,))
    engine.dispose()


def test_a_lock_whose_connection_died_is_lost(database_url, tmp_path):
    """What the recipe checks before publishing: the server dropped the lock with the connection."""
    engine = make_engine(database_url)
    lock = TrainerLock(engine, tmp_path).acquire()
    with psycopg.connect(raw_url(database_url), autocommit=True) as admin:
        (pid,) = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                               (lock.holder[:63],)).fetchone()  # fmt: skip
        # With a timeout it waits for the backend to end (without, the check could run before).
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone() == (True,)
    with pytest.raises(TrainerLockLost, match="trained again from scratch"):
        lock.check()
    lock.release()
    with pytest.raises(TrainerLockLost):
        lock.check()  # released: not held either
    # And another trainer takes it at once.
    with TrainerLock(engine, tmp_path / "other") as other:
        other.check()
    engine.dispose()


def test_a_waiter_logs_who_holds_the_lock(store_url, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    engine = make_engine(store_url)
    holder = TrainerLock(engine, tmp_path / "a").acquire()
    waiter = TrainerLock(engine, tmp_path / "b", poll_s=0.02, report_every_s=0.2)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (waiter.acquire(), done.set()))
    thread.start()
    time.sleep(1.0)
    assert not done.is_set(), "a second lock of the same store was taken while the first is held"
    holder.release()
    thread.join(timeout=HANDOVER_S)
    assert done.is_set()
    logs = [r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg["event"].startswith("trainer.lock")]
    waiter.release()
    waiting = [entry for entry in logs if entry["event"] == "trainer.lock_waiting"]
    waited_s = logs[-1]["waited_s"]
    assert 2 <= len(waiting) <= waited_s / 0.2 + 2  # at once, then every 0.2 s or more: not every poll
    # None: the holder let go between the waiter's try and its look (the last line, at most).
    named = [entry["held_by"] and entry["held_by"].split(" from ")[0] for entry in waiting]
    assert named[0] == holder.holder and set(named[:-1]) == {holder.holder} and named[-1] in (holder.holder, None)
    assert all(entry["holder"] == waiter.holder for entry in waiting)
    assert [entry["event"] for entry in logs][-1] == "trainer.lock_acquired"
    engine.dispose()


def test_an_erasure_recut_waits_for_a_trainer_on_another_host(store_url, tmp_path):
    migrations.upgrade(store_url)
    engine = make_engine(store_url)
    sessions = make_sessionmaker(engine)
    objects = ObjectStore((tmp_path / "objects").as_uri())
    training = TrainerLock(sessions, tmp_path / "host-a" / "adapters").acquire()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(apply_erasures(sessions, objects, tmp_path / "host-b")))
    thread.start()
    thread.join(timeout=1.0)
    assert not result, "the re-cut ran while another host trained"
    training.release()
    thread.join(timeout=HANDOVER_S)
    assert result == [[]]
    engine.dispose()


def register(sessions, name: str, elsewhere: Path) -> None:
    """An adapter another host trained (its files not on this one's disk)."""
    with sessions.begin() as session:
        session.add(Adapter(name=name, state=AdapterState.READY, path=str(elsewhere / name), sha256="0" * 64,
                            base_model_sha256="0" * 64, lineage={}))  # fmt: skip


async def test_the_worker_chooses_the_parent_under_the_lock(store_url, tmp_path, monkeypatch):
    """A trainer on another host holds the lock and registers adapter-000007 meanwhile: the
    waiting worker must continue from it, not from the newest when the batch came in (two
    adapters on one parent, one line of training lost)."""
    migrations.upgrade(store_url)
    engine = make_engine(store_url)
    sessions = make_sessionmaker(engine)
    register(sessions, "adapter-000006-aaaaaaaa", tmp_path / "host-a")
    seen = []

    def train(batch, *args, **kwargs):
        seen.append((kwargs["parent"], kwargs["lock"]))
        raise BatchAlreadyDone("not trained here")

    monkeypatch.setattr("trainer.worker.train_batch", train)
    settings = make_settings(tmp_path / "host-b", 1)
    objects = ObjectStore((tmp_path / "objects").as_uri())
    worker = TrainerWorker(settings.trainer, settings.kafka, sessions, objects=objects,
                           base_model_dir=settings.model_path, adapters_dir=settings.adapters_path)  # fmt: skip
    emitted = BatchEmitted(event_id="b.emitted", occurred_at=utcnow(), source="test", batch_id="b",
                           path="batches/b", manifest_sha256="x" * 64, example_count=1, trigger="manual")  # fmt: skip
    other_host = TrainerLock(sessions, tmp_path / "host-a").acquire()
    handling = asyncio.create_task(worker.handle(emitted))
    await asyncio.sleep(1.5)
    assert not seen and not handling.done(), "the worker went on while another host held the lock"
    register(sessions, "adapter-000007-bbbbbbbb", tmp_path / "host-a")
    other_host.release()
    assert await asyncio.wait_for(handling, HANDOVER_S) == []
    ((parent, lock),) = seen
    assert parent == "adapter-000007-bbbbbbbb"
    assert not lock.held, "released after the batch"
    engine.dispose()


def test_a_lock_handed_in_is_used_as_it_is(tmp_path):
    """The worker holds the lock across a batch and hands it to the recipe and the erasures;
    taking it again there would wait for itself."""
    engine = make_engine(f"sqlite:///{tmp_path / 'feedloop.db'}")
    outer = TrainerLock(engine, tmp_path).acquire()
    entered = threading.Event()

    def nested() -> None:
        with exclusive(engine, tmp_path, held=outer) as inner:
            assert inner is outer
            entered.set()

    thread = threading.Thread(target=nested, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert entered.is_set()
    assert outer.held  # the nested block did not release it
    outer.release()
    assert not outer.held
    with pytest.raises(trainer.lock.TrainerLockError, match="does not hold it"):
        with exclusive(engine, tmp_path, held=outer):
            pass


def test_sqlite_locks_beside_the_database_file(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'feedloop.db'}")
    assert TrainerLock(engine, tmp_path / "adapters").path == tmp_path / "data" / "feedloop.db.trainer-lock"
    memory = make_engine("sqlite://")
    assert TrainerLock(memory, tmp_path / "adapters").path == tmp_path / "adapters" / ".trainer.lock"


def test_docstring_examples():
    result = doctest.testmod(trainer.lock)
    assert result.attempted >= 5 and result.failed == 0
