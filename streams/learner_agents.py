"""Faust agent of the online learners: decode, call the learner state, emit. No logic lives here.

- ``learners``: annotated examples and control events -> :class:`~streams.learning.LearnerState`
  -> drift alarms and A/B verdicts on ``feedloop.control.v1``, review requests on
  ``feedloop.review.v1``, a dead letter for an input record it cannot read. Records are
  acknowledged only after a checkpoint covers them.
- ``checkpoint``: a timer that waits until the broker confirmed those outputs, then saves
  the state to the store and, when the router changed,
  publishes a router snapshot there for the gateway (``app.routing``), by the protocol of
  :mod:`streams.checkpoint` (shared with the pipeline: a failed checkpoint is retried at
  the next interval; one that cannot be read is rebuilt from the archive).

The state is global, not per partition: the gateway needs one routing distribution, and the
A/B test and the review budget are global. It runs in its own Faust app (consumer group
``feedloop-learners``, command ``feedloop learn``), not inside the pipeline workers, which
scale out by partition and would each get a slice of the examples. One learner is active:
the process that holds the lease (streams/lease.py); every checkpoint is fenced by it, and
other `feedloop learn` processes wait as standbys without joining the consumer group.
It reads every partition of the examples topic and the control topic in one agent, so one
coroutine owns the state and no lock is needed.

Why a checkpoint in the store (as the pipeline's) and not a Faust Table:

- exactly-once in effect: the checkpoint row holds the state *and* the last offset handled per
  input partition, written in one transaction, and records are acknowledged after it. A
  restarted learner loads it and skips redelivered records it already holds. A Table writes
  its changelog apart from the offset commit, so after a SIGKILL the recovered table already
  holds records that are then redelivered and learned a second time;
- the state is one value (a router of d x d matrices per arm, detectors, tests): a Table
  would send all of it to the changelog on every example, and Tansu never compacts a
  changelog, so recovery would read every version ever written;
- the gateway needs the router anyway, outside Faust: the same transaction adds the snapshot.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import faust
import structlog
from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from streams.archive import ArchivedRecord
from streams.broker_life import BrokerLife, NewBrokerLife
from streams.checkpoint import Checkpoints, Position, Rebuild, Unacked, pickled
from streams.config import LearnerSettings
from streams.objects import ObjectStore
from streams.store import RouterSnapshot
from streams.lease import HeldLease, LeaseLost
from streams.learning import LearnerOutputs, LearnerState
from streams.learning import RouterSnapshot as Snapshot
from streams.topics import CONTROL, DEAD_LETTER, EXAMPLES, REVIEW, control_key, dead_letter_key

log = structlog.get_logger(__name__)

TAKE_MAX = 1000
TAKE_WITHIN_S = 0.2
# The learner state is one row of stream_checkpoints: it is not per partition.
STATE_ROW = 0
# The format of the pickled LearnerState: bump it when a class in it moves or changes
# meaning, and the next start rebuilds the state from the archive.
# 2: the adapter lifecycle moved into streams.lifecycle.AdapterLifecycle (LearnerState.lifecycle).
# 3: LearnerState.seen_examples, the example ids it de-duplicates by.
# 4: seen_examples keyed by (app id, example id).
# 5: ABTest keeps sums of propensity-weighted pseudo-outcomes (learners.ab_test._Sequence).
# 6: the router's ridges keep a running sum of squares (its noise-scaled exploration).
STATE_FORMAT = 6


@dataclass(frozen=True)
class _Taken:
    """A checkpoint as of one moment: what it writes, taken on the event loop."""

    handled: int
    version: int
    positions: dict[Position, int]
    state: bytes | None  # the pickled LearnerState, when it changed
    snapshot: Snapshot | None  # when the router moved since the last one published


class LiveLearner:
    """The learner state with its checkpoint and the router snapshots it publishes."""

    def __init__(self, config: LearnerSettings, sessions: sessionmaker, *, objects: ObjectStore, consumer: str,
                 cluster_id: str, snapshots_kept: int, lease: HeldLease | None = None) -> None:
        """``lease``: the lease `feedloop learn` holds (streams/lease.py); every checkpoint is
        fenced by it. None only where one process has the store to itself (benchmarks, tests)."""
        self.sessions = sessions
        self.lease = lease
        self.consumer = consumer
        self.snapshots_kept = snapshots_kept
        self.checkpoints = Checkpoints(sessions, objects, consumer=consumer, cluster_id=cluster_id,
                                       format_version=STATE_FORMAT)  # fmt: skip
        restored = self.checkpoints.load(STATE_ROW, rebuild_learners(config))
        if restored is not None:
            log.info("learners.restored", version=restored.version, examples=restored.examples,
                     arms=restored.router.arms)  # fmt: skip
        self.state = restored or LearnerState(config)
        self._handled = self._saved = 0  # records handled; as of the last checkpoint written
        self._published: int | None = None  # so a (re)started learner publishes what it holds

    def handle(self, topic: str, partition: int, offset: int, value: bytes | None,
               timestamp_s: float | None = None) -> LearnerOutputs | None:  # fmt: skip
        outputs = self.state.handle(topic, partition, offset, value, timestamp_s)
        self._handled += outputs is not None
        return outputs

    async def save(self) -> None:
        """Checkpoint what changed and publish the router if it moved, in one transaction.

        The state is pickled here, on the event loop; compressing and writing run in a thread."""
        taken = self._take()
        if taken is None:
            return
        await asyncio.to_thread(self._write, taken)
        self._saved = taken.handled
        if taken.snapshot is not None:
            self._published = taken.version
            log.info("learners.snapshot_published", version=taken.version, examples=taken.snapshot.examples,
                     arms=taken.snapshot.arms)  # fmt: skip

    def _take(self) -> _Taken | None:
        changed = self._handled != self._saved
        publish = self._published != self.state.version
        if not (changed or publish):
            return None
        return _Taken(self._handled, self.state.version, dict(self.state.positions),
                      pickled(self.state) if changed else None, self.state.snapshot() if publish else None)

    def _write(self, taken: _Taken) -> None:
        with self.sessions.begin() if self.lease is None else self.lease.writing() as session:
            if taken.state is not None:
                self.checkpoints.put(session, STATE_ROW, offset=taken.version, positions=taken.positions,
                                     state=taken.state)  # fmt: skip
            if (snapshot := taken.snapshot) is not None:
                session.add(RouterSnapshot(learner=self.consumer, version=snapshot.version, examples=snapshot.examples,
                                           arms=list(snapshot.arms), state=snapshot.data))  # fmt: skip
                session.flush()
                oldest_kept = session.scalar(select(RouterSnapshot.id).order_by(RouterSnapshot.id.desc())
                                             .offset(self.snapshots_kept - 1).limit(1))  # fmt: skip
                if oldest_kept is not None:
                    session.execute(delete(RouterSnapshot).where(RouterSnapshot.id < oldest_kept))


def rebuild_learners(config: LearnerSettings) -> Rebuild[LearnerState]:
    """The learner state folded from the archived examples and control events."""

    def fold(state: LearnerState, record: ArchivedRecord) -> None:
        state.handle(record.topic, record.partition, record.offset, record.value, record.timestamp_ms / 1000)

    def place(state: LearnerState, positions: dict[Position, int]) -> None:
        state.positions.clear()
        state.positions.update(positions)

    return Rebuild(topics=(EXAMPLES.name, CONTROL.name), partition=None, fresh=lambda: LearnerState(config),
                   fold=fold, place=place)  # fmt: skip


def register_learners(app: faust.App, learner: LiveLearner, *, checkpoint_interval_s: float,
                      life: BrokerLife | None = None, lease_renew_s: float | None = None) -> None:
    """The agent and the checkpoint timer; with ``learner.lease``, a timer that renews it
    every ``lease_renew_s`` and stops the process once it is lost or has run out."""
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(EXAMPLES.name, CONTROL.name, **raw)
    control = app.topic(CONTROL.name, **raw)
    reviews = app.topic(REVIEW.name, **raw)

    dead_letters = app.topic(DEAD_LETTER.name, **raw)

    lease = learner.lease
    unacked: Unacked[None] = Unacked(learner.consumer, life)  # handled, not yet covered by a checkpoint
    deliveries = _Deliveries()

    @app.agent(inputs, name="learners")
    async def learners(stream: faust.Stream) -> None:
        async for batch in stream.noack_take(TAKE_MAX, within=TAKE_WITHIN_S):
            for event in batch:
                message = event.message
                outputs = learner.handle(message.topic, message.partition, message.offset, message.value,
                                         message.timestamp)  # fmt: skip
                if outputs is not None:
                    for record in outputs.control:
                        await deliveries.send(control, control_key(record), record.model_dump_json().encode())
                    for pick in outputs.reviews:
                        await deliveries.send(reviews, pick.example.example_id.encode(), pick.model_dump_json().encode())
                    for dead in outputs.dead_letters:
                        await deliveries.send(dead_letters, dead_letter_key(dead), dead.model_dump_json().encode())
                unacked.add(stream, [event])

    async def confirm_then_save(_: object) -> None:
        await deliveries.confirm()  # a verdict the broker lost must not be in a saved state
        await learner.save()

    @app.timer(interval=checkpoint_interval_s)
    async def checkpoint() -> None:
        try:
            await unacked.flush(confirm_then_save)
        except NewBrokerLife as error:
            counts, _ = await asyncio.to_thread(learner.checkpoints.unprocessed, (EXAMPLES.name, CONTROL.name))
            error.log((counts, None))  # examples and control events: republishing events does not bring them back
            await app.crash(error)  # the learner exits non-zero; started again, it reads the new broker
        except LeaseLost as error:  # only a learner with a lease is fenced
            assert lease is not None
            await _stop_fenced(app, lease, error)

    if lease is None:
        return
    assert lease_renew_s is not None, "a learner with a lease renews it"

    @app.timer(interval=lease_renew_s)
    async def renew_lease() -> None:
        lease.started()  # the loop renews now; the start-up thread stops
        try:
            await asyncio.to_thread(lease.renew)
        except LeaseLost as error:
            await _stop_fenced(app, lease, error)
        except Exception:  # noqa: BLE001 - the store is out of reach: go on until the lease runs out
            if lease.expired():
                log.error("learners.lease_expired", holder=lease.holder, epoch=lease.epoch, ttl_s=lease.tenure.ttl_s,
                          exc_info=True, action="stopping: a standby may hold the lease now; check the store, then "
                          "start this learner again (it waits as a standby)")  # fmt: skip
                await app.crash(LeaseLost(f"no renewal succeeded for {lease.tenure.ttl_s} s"))
            else:
                log.warning("learners.lease_renew_failed", holder=lease.holder, epoch=lease.epoch, exc_info=True)


async def _stop_fenced(app: faust.App, lease: HeldLease, error: LeaseLost) -> None:
    """Another learner took over: stop before this one's outputs or state go any further."""
    log.error("learners.lease_lost", holder=lease.holder, epoch=lease.epoch,
              reason=str(error), action="stopping without writing: another learner is active; nothing to do "
              "(start this one again and it waits as a standby)")  # fmt: skip
    await app.crash(error)


class UnconfirmedOutputs(RuntimeError):
    """Outputs the broker did not confirm: sent again, and the checkpoint waits for them."""


class _Deliveries:
    """The learner's outputs sent since the last checkpoint, with their delivery futures.

    ``send`` only enqueues (Faust answers with a future); a checkpoint first waits until the
    broker confirmed every output of the records it covers, so a crash after it never loses
    a promote/rollback verdict or a drift alarm. One that failed is sent again (event ids are
    stable, so a duplicate is harmless) and the checkpoint is retried at the next interval."""

    def __init__(self) -> None:
        self.pending: list[tuple[faust.types.TopicT, bytes, bytes, asyncio.Future]] = []

    async def send(self, topic: faust.types.TopicT, key: bytes, value: bytes) -> None:
        self.pending.append((topic, key, value, await topic.send(key=key, value=value)))

    async def confirm(self) -> None:
        pending, self.pending = self.pending, []
        failed = []
        for topic, key, value, future in pending:
            try:
                await future
            except Exception:  # noqa: BLE001 - any delivery error: send it again
                failed.append((topic, key, value))
        for topic, key, value in failed:
            await self.send(topic, key, value)
        if failed:
            raise UnconfirmedOutputs(f"{len(failed)} learner outputs were not confirmed by the broker; sent again")
