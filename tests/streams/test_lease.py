"""The learner's lease on SQLite and PostgreSQL: acquire, renew, expire, take over, fence.

Time is a fake clock (each process measures the lease on its own clock); the store is real.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import delete, select

import migrations
from streams.objects import ObjectStore
from streams.lease import Lease, LeaseLost, Leases, Watch, may_write
from streams.learner_agents import STATE_ROW, LiveLearner
from streams.store import LearnerLease, RouterSnapshot, StreamCheckpoint, make_engine, make_sessionmaker
from tests.learners.conftest import ContextualEnvironment
from tests.learners.test_learning import CONFIG as LEARNERS
from tests.learners.test_learning import records as learner_records

TTL = 10.0
NAME = "feedloop-learners"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A migrated store of the test's own on each database (PostgreSQL: a table emptied)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'feedloop.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    migrations.upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:  # the PostgreSQL database is the test session's: start clean
        for table in (LearnerLease, StreamCheckpoint, RouterSnapshot):
            session.execute(delete(table))
    yield sessions
    engine.dispose()


def leases(sessions, clock: Clock) -> Leases:
    return Leases(sessions, NAME, ttl_s=TTL, clock=clock)


def test_the_pure_decisions():
    assert may_write(Lease("a", 2, 7), "a", 2)
    assert not may_write(Lease("a", 3, 0), "a", 2), "a stale epoch is refused"
    assert not may_write(Lease("b", 2, 7), "a", 2) and not may_write(Lease(None, 2, 7), "a", 2)
    assert not may_write(None, "a", 1)
    watch = Watch(TTL)
    assert watch.free(None, 0.0), "no row: the first learner takes it at once"
    assert not watch.free(Lease("a", 1, 0), 0.0) and not watch.free(Lease("a", 1, 0), TTL - 0.1)
    assert watch.free(Lease("a", 1, 0), TTL)


def test_acquire_renew_expire_take_over_and_fence(store):
    clock = Clock()
    first, second = leases(store, clock), leases(store, clock)
    active = first.take("a", None)
    assert active is not None and active.epoch == 1
    assert second.take("b", None) is None, "the row exists: inserting it again loses"
    assert first.read() == Lease("a", 1, 0)

    watch = Watch(TTL)
    assert not watch.free(second.read(), clock.now)
    for _ in range(5):  # renewed every 2 s: never free
        clock.sleep(2)
        active.renew()
        assert not watch.free(second.read(), clock.now)
    assert second.read() == Lease("a", 1, 5)

    seen = second.read()
    clock.sleep(TTL)  # the active stopped renewing (killed, paused)
    assert active.expired(), "its own clock says the same: it would stop itself"
    assert watch.free(second.read(), clock.now)
    assert second.take("b", Lease("a", 1, 4)) is None, "a compare-and-set on a stale view fails"
    standby = second.take("b", seen)
    assert standby is not None and standby.epoch == 2 and second.read() == Lease("b", 2, 0)
    assert first.take("c", seen) is None, "a second standby with the same view loses the race"

    with pytest.raises(LeaseLost, match="held by b at epoch 2, not by a at epoch 1"):
        active.renew()
    standby.renew()
    assert second.read() == Lease("b", 2, 1)


def test_release_hands_over_at_the_next_poll(store):
    clock = Clock()
    active = leases(store, clock).take("a", None)
    active.release()
    assert leases(store, clock).read() == Lease(None, 1, 0)
    taken = leases(store, clock).standby("b", poll_s=2, sleep=clock.sleep)
    assert (taken.epoch, clock.now) == (2, 0.0)
    active.release()  # the old holder's release, late: changes nothing
    assert leases(store, clock).read() == Lease("b", 2, 0)


def test_a_standby_waits_until_the_active_stops_renewing(store):
    clock = Clock()
    active = leases(store, clock).take("a", None)
    renewals = iter(range(3))

    def sleep(seconds: float) -> None:  # the active renews three times, then dies
        clock.sleep(seconds)
        if next(renewals, None) is not None:
            active.renew()

    taken = leases(store, clock).standby("b", poll_s=2, sleep=sleep)
    # The last renewal was seen at t=6 (after the third poll); free from t=16 on, taken at that poll.
    assert (taken.epoch, taken.holder, clock.now) == (2, "b", 16.0)


async def test_a_fenced_learner_writes_no_checkpoint_and_no_snapshot(store, tmp_path):
    clock = Clock()
    active = leases(store, clock).take("a", None)
    live = LiveLearner(LEARNERS, store, objects=ObjectStore(tmp_path.as_uri()), consumer=NAME, cluster_id="c1",
                       snapshots_kept=3, lease=active)  # fmt: skip
    stream = learner_records(ContextualEnvironment(), n=60)
    for record in stream[:30]:
        live.handle(*record)
    await live.save()
    assert leases(store, clock).read() == Lease("a", 1, 1), "the checkpoint renewed the lease"
    saved, examples = checkpoint(store), live.state.examples

    seen = leases(store, clock).read()
    clock.sleep(TTL)
    successor = leases(store, clock).take("b", seen)  # a takeover while the first one was paused
    assert successor is not None
    for record in stream[30:]:
        live.handle(*record)
    with pytest.raises(LeaseLost):
        await live.save()
    assert checkpoint(store) == saved, "the new active's state is not overwritten"
    with store() as session:
        assert session.scalars(select(RouterSnapshot.version)).all() == [saved[0]]

    resumed = LiveLearner(LEARNERS, store, objects=ObjectStore(tmp_path.as_uri()), consumer=NAME, cluster_id="c1",
                          snapshots_kept=3, lease=successor)  # fmt: skip
    assert (resumed.state.version, resumed.state.examples) == (saved[0], examples)
    for record in stream:  # redelivered from the committed offset: the first 30 are skipped
        resumed.handle(*record)
    await resumed.save()
    assert (resumed.state.examples, checkpoint(store)[0]) == (live.state.examples, live.state.version)


def checkpoint(sessions) -> tuple[int, bytes]:
    with sessions() as session:
        row = session.get(StreamCheckpoint, (NAME, STATE_ROW))
        return row.offset, row.state


def test_a_learner_still_starting_keeps_its_lease(store):
    held = Leases(store, NAME, ttl_s=TTL).take("a", None)
    held.renew_while_starting(0.02)  # loading a checkpoint, rebuilding one: the loop does not renew yet
    deadline = time.monotonic() + 10
    while Leases(store, NAME, ttl_s=TTL).read().beat < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    held.started()  # the event loop renews from now on
    time.sleep(0.1)
    beat = Leases(store, NAME, ttl_s=TTL).read().beat
    assert beat >= 3
    time.sleep(0.1)
    assert Leases(store, NAME, ttl_s=TTL).read().beat == beat, "the thread stopped"
