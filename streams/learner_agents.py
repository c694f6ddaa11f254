"""Faust agent of the online learners: decode, call the learner state, emit. No logic lives here.

- ``learners``: annotated examples and control events -> :class:`~streams.learning.LearnerState`
  -> drift alarms and A/B verdicts on ``feedloop.control.v1``, review requests on
  ``feedloop.review.v1``. Records are acknowledged only after a checkpoint covers them.
- ``checkpoint``: a timer that saves the state to the store and, when the router changed,
  publishes a router snapshot there for the gateway (``app.routing``).

The state is global, not per partition: the gateway needs one routing distribution, and the
A/B test and the review budget are global. It runs in its own Faust app (consumer group
``feedloop-learners``, command ``feedloop learn``), not inside the pipeline workers, which
scale out by partition and would each get a slice of the examples: run exactly ONE learner.
It reads every partition of the examples topic and the control topic in one agent, so one
coroutine owns the state and no lock is needed.

Why a checkpoint in the store (as streams/live.py does) and not a Faust Table:

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

import pickle
import zlib

import faust
import structlog
from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from streams.config import LearnerSettings
from streams.store import RouterSnapshot, StreamCheckpoint
from streams.learning import LearnerOutputs, LearnerState
from streams.topics import CONTROL, EXAMPLES, REVIEW, control_key

log = structlog.get_logger(__name__)

TAKE_MAX = 1000
TAKE_WITHIN_S = 0.2
# The learner state is one row of stream_checkpoints: it is not per partition.
STATE_ROW = 0


class LiveLearner:
    """The learner state with its checkpoint and the router snapshots it publishes."""

    def __init__(self, config: LearnerSettings, sessions: sessionmaker, *, consumer: str, cluster_id: str,
                 snapshots_kept: int) -> None:
        self.sessions = sessions
        self.consumer = consumer
        self.cluster_id = cluster_id
        self.snapshots_kept = snapshots_kept
        self.state = self._restore() or LearnerState(config)
        self._dirty = False
        self._published: int | None = None  # so a (re)started learner publishes what it holds

    def _restore(self) -> LearnerState | None:
        with self.sessions() as session:
            row = session.get(StreamCheckpoint, (self.consumer, STATE_ROW))
        if row is None:
            return None
        state: LearnerState = pickle.loads(zlib.decompress(row.state))
        if row.cluster_id != self.cluster_id:
            state.positions.clear()  # a new broker life restarts offsets at zero
        log.info("learners.restored", version=state.version, examples=state.examples, arms=state.router.arms,
                 from_cluster=row.cluster_id)  # fmt: skip
        return state

    def handle(self, topic: str, partition: int, offset: int, value: bytes) -> LearnerOutputs | None:
        outputs = self.state.handle(topic, partition, offset, value)
        self._dirty |= outputs is not None
        return outputs

    def save(self) -> None:
        """Checkpoint what changed and publish the router if it moved, in one transaction."""
        publish = self._published != self.state.version
        if not (self._dirty or publish):
            return
        with self.sessions.begin() as session:
            if self._dirty:
                state = zlib.compress(pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL), 1)
                session.merge(StreamCheckpoint(consumer=self.consumer, partition=STATE_ROW, cluster_id=self.cluster_id,
                                               offset=self.state.version, state=state))  # fmt: skip
            if publish:
                snapshot = self.state.snapshot()
                session.add(RouterSnapshot(learner=self.consumer, version=snapshot.version, examples=snapshot.examples,
                                           arms=list(snapshot.arms), state=snapshot.data))  # fmt: skip
                session.flush()
                oldest_kept = session.scalar(select(RouterSnapshot.id).order_by(RouterSnapshot.id.desc())
                                             .offset(self.snapshots_kept - 1).limit(1))  # fmt: skip
                if oldest_kept is not None:
                    session.execute(delete(RouterSnapshot).where(RouterSnapshot.id < oldest_kept))
        self._dirty = False
        if publish:
            self._published = self.state.version
            log.info("learners.snapshot_published", version=self.state.version, examples=self.state.examples,
                     arms=self.state.router.arms)  # fmt: skip


def register_learners(app: faust.App, learner: LiveLearner, *, checkpoint_interval_s: float) -> None:
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(EXAMPLES.name, CONTROL.name, **raw)
    control = app.topic(CONTROL.name, **raw)
    reviews = app.topic(REVIEW.name, **raw)

    pending: list[tuple[faust.Stream, object]] = []  # handled, not yet covered by a checkpoint

    @app.agent(inputs, name="learners")
    async def learners(stream: faust.Stream) -> None:
        async for batch in stream.noack_take(TAKE_MAX, within=TAKE_WITHIN_S):
            for event in batch:
                message = event.message
                outputs = learner.handle(message.topic, message.partition, message.offset, message.value)
                if outputs is not None:
                    for record in outputs.control:
                        await control.send(key=control_key(record), value=record.model_dump_json().encode())
                    for pick in outputs.reviews:
                        await reviews.send(key=pick.example.example_id.encode(), value=pick.model_dump_json().encode())
                pending.append((stream, event))

    @app.timer(interval=checkpoint_interval_s)
    async def checkpoint() -> None:
        covered = pending[:]
        pending.clear()
        learner.save()
        for stream, event in covered:
            await stream.ack(event)
