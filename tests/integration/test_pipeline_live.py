"""The live pipeline on the real broker: a Faust worker process fed through the gateway.

Checks the outputs (examples, signals, dead letters, batches), that no PII canary reaches a
batch file, that `replay --offline` of the archive produces byte-identical batches, and that
killing the worker mid-stream loses and doubles nothing, even when a checkpoint it left
cannot be read by the restarted worker (it is rebuilt from the archive).
"""

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer
from sqlalchemy import func, select

from streams.checkpoint import decode
from streams.live import STATE_FORMAT
from streams.store import ArchiveSegment, Batch, StreamCheckpoint, make_engine, make_sessionmaker
from streams.contract import DriftAlarm
from streams.topics import CONTROL, EVENTS
from streams.training_data import BATCHES, BatchFolder, read_batch
from tests.conftest import API_KEYS, make_settings, start_stack, wait_until_archived
from tests.factories import feedback, interaction
from tests.streams.pii_canaries import CANARIES

AUTH = {"Authorization": f"Bearer {API_KEYS['app-a']}", "Content-Type": "application/json"}
PIPELINE_ENV = {
    "FEEDLOOP_PIPELINE__IDLE_TICK_S": "1",
    "FEEDLOOP_PIPELINE__BATCH_SIZE": "40",
    "FEEDLOOP_PIPELINE__BATCH_MAX_WAIT_S": "60",
    "FEEDLOOP_PIPELINE__EXPLICIT_WINDOW_S": "600",
    "FEEDLOOP_PIPELINE__IMPLICIT_WINDOW_S": "60",
    "FEEDLOOP_PIPELINE__ALLOWED_LATENESS_S": "0",
}
# Event times an hour ago: the worker's wall-clock ticks close every window once traffic stops.
T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=1)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def traffic(count: int, seeded: list | None = None) -> list[dict]:
    """Interactions with explicit and implicit feedback. With ``seeded`` (a list), PII canaries
    go into prompts, answers and edits, and each one placed is appended to it."""
    events = []
    canaries = iter(CANARIES * 3)

    def canary() -> str:
        if seeded is None:
            return ""
        seeded.append(next(canaries))
        return "\n" + seeded[-1].text  # each canary is a whole snippet, as a user would paste it

    for i in range(count):
        prompt = f"question {i} about topic {i * 13} in {['code', 'math', 'units'][i % 3]}" + canary()
        response = f"answer {i}" + canary()
        turn = interaction(occurred_at=at(i), prompt=[{"role": "user", "content": prompt}], response=response,
                           context={"domain": ["code", "math", "units"][i % 3], "cohort": "ab"[i % 2]})
        kind = ["thumbs", "copy", "edit", "rating"][i % 4]
        extra = {"text": "a corrected answer" + canary()} if kind == "edit" else {"value": 5} if kind == "rating" else {}
        events += [turn, feedback(turn, kind, occurred_at=at(i + 1), **extra)]
    return events


def start_worker(settings, env_extra=None, command: str = "worker") -> subprocess.Popen:
    """`feedloop <command>` as its own process, logging at info to <command>.log beside data/."""
    env = {**os.environ, **PIPELINE_ENV, **(env_extra or {}),
           "FEEDLOOP_EMBEDDED_BROKER_PORT": str(settings.embedded_broker_port),
           "FEEDLOOP_DATA_DIR": str(settings.data_dir), "FEEDLOOP_LOG_LEVEL": "info"}
    log = open(settings.data_dir.parent / f"{command}.log", "ab")  # a pipe nobody reads would block it
    return subprocess.Popen([sys.executable, "-m", "app.cli", command], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(worker: subprocess.Popen, kill: bool = False) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGKILL if kill else signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(10)
        raise AssertionError("the worker did not stop within 30 s of SIGTERM")


async def post(base_url: str, events: list[dict]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
        for i in range(0, len(events), 200):
            response = await http.post("/v1/events", content=json.dumps(events[i : i + 200]), headers=AUTH)
            assert response.status_code == 202, response.text


def batches(stack) -> dict[str, str]:
    with stack.sessions() as session:
        return {b.batch_id: b.manifest_sha256 for b in session.scalars(select(Batch))}


async def wait_for(predicate, timeout_s: float, what: str):
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not (result := predicate()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)
    return result


def replay_offline(settings, out_dir: Path) -> dict[str, str]:
    env = {**os.environ, **PIPELINE_ENV, "FEEDLOOP_DATA_DIR": str(settings.data_dir), "FEEDLOOP_LOG_LEVEL": "info"}  # to worker.log
    done = subprocess.run([sys.executable, "-m", "app.cli", "replay", "--offline", "--data-dir", str(out_dir)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {p.name: hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest()
            for p in (out_dir / "batches").iterdir() if (p / "manifest.json").exists()}


async def test_live_pipeline_outputs_and_replay_gives_identical_batches(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    worker = start_worker(settings)
    try:
        seeded: list = []
        events = traffic(60, seeded)
        duplicate = events[0]
        orphan = feedback({"interaction_id": "never-sent", "session_id": "s-orphan"}, "thumbs", occurred_at=at(3))
        await post(stack.base_url, events + [duplicate, orphan])
        # A producer that bypasses the gateway can still write garbage onto the topic.
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        await producer.send_and_wait(EVENTS.name, b"{not an event", key=b"rogue")
        await producer.stop()
        # 60 interactions with one verdict each: 60 examples; records: see streams/signals.py.
        await wait_for(lambda: sum(1 for _ in batches(stack)) >= 2 and _examples_done(settings, 60), 90,
                       "examples and batches")
        late = feedback(events[0], "thumbs", occurred_at=at(700))
        await post(stack.base_url, [late])
        dead = await wait_until_archived(stack, "feedloop.deadletter.v1", 4, timeout_s=30)
        reasons = sorted((json.loads(r.value)["stage"], json.loads(r.value)["reason"]) for r in dead)
        assert reasons == [("pipeline", "duplicate_event"), ("pipeline", "invalid_json"),
                           ("pipeline", "late_feedback"), ("pipeline", "orphan_feedback")]
    finally:
        stop_worker(worker)
        await stop()
    live = batches(stack)
    records = [r for batch_id in live for rs in read_batch(BatchFolder.of(settings.objects, batch_id))[1].values()
               for r in rs]
    new = [r for r in records if not r.replay]
    assert len({r.example_id for r in new}) == len(new), "a record was doubled"
    assert {r.source for r in new} == {"accepted", "edit", "thumbs", "rating"}

    # No canary in any object of any batch, and the scrubber's placeholders are there instead.
    text = "".join(settings.objects.get(key).decode() for key in settings.objects.keys(BATCHES))
    leaked = [c.secret for c in CANARIES if c.secret in text]
    assert leaked == [] and "<EMAIL>" in text
    scrubbed = {}
    for pipeline in _checkpoints(settings):
        for kind, count in pipeline.stats.pii.items():
            scrubbed[kind] = scrubbed.get(kind, 0) + count
    per_type = {}
    for placed in seeded:
        per_type[str(placed.pii_type)] = per_type.get(str(placed.pii_type), 0) + 1
    print(f"scrub rate by type: { {k: f'{scrubbed.get(k, 0)}/{v}' for k, v in sorted(per_type.items())} }")
    assert all(scrubbed.get(kind, 0) >= count for kind, count in per_type.items()), (scrubbed, per_type)

    assert replay_offline(settings, tmp_path / "replayed") == live


async def test_worker_killed_mid_stream_loses_and_doubles_nothing(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    worker = start_worker(settings)
    total = 2000
    try:
        await post(stack.base_url, traffic(total))
        await wait_for(lambda: batches(stack) and _checkpoints(settings), 90, "a first batch and checkpoint")
        stop_worker(worker, kill=True)  # SIGKILL: no chance to checkpoint or commit
        assert _examples(settings) < total, "the worker finished before the kill: nothing was tested"
        # A checkpoint the restarted worker cannot read (as after a class moved): it rebuilds
        # that partition from the archive, once the archive holds what the checkpoint covered.
        with stack.sessions.begin() as session:
            spoiled = session.scalars(select(StreamCheckpoint).order_by(StreamCheckpoint.partition)).first()
            spoiled.format_version = 999
        await wait_for(lambda: _archived_to(stack, spoiled.partition) >= spoiled.offset, 30, "the archive")
        worker = start_worker(settings)
        await wait_for(lambda: _examples_done(settings, total), 180, "every example after the restart")
        await asyncio.sleep(3)  # let a doubled batch show up, if there were one
    finally:
        stop_worker(worker)
        await stop()
    live = batches(stack)
    assert len(live) >= total // 40
    assert replay_offline(settings, tmp_path / "replayed") == live
    log = (settings.data_dir.parent / "worker.log").read_text()  # JSON lines, some behind terminal codes
    logged = {event: f'"event": "checkpoint.{event}"' in log for event in ("unreadable", "rebuilt", "rebuild_short")}
    assert logged == {"unreadable": True, "rebuilt": True, "rebuild_short": False}


def _archived_to(stack, partition: int) -> int:
    with stack.sessions() as session:
        last = session.scalar(select(func.max(ArchiveSegment.last_offset))
                              .where(ArchiveSegment.topic == EVENTS.name, ArchiveSegment.partition == partition))
    return -1 if last is None else last


def _checkpoints(settings) -> list:
    """The readable checkpoints: a spoiled one counts once the worker has rewritten it."""
    with make_sessionmaker(make_engine(settings.store_url))() as session:
        rows = session.scalars(select(StreamCheckpoint).where(StreamCheckpoint.format_version == STATE_FORMAT))
        return [decode(row, STATE_FORMAT) for row in rows]


def _examples(settings) -> int:
    return sum(p.stats.counts["examples"] for p in _checkpoints(settings))


def _examples_done(settings, count: int) -> bool:
    """True once the checkpoints hold ``count`` examples and no record waits for a batch."""
    pipelines = _checkpoints(settings)
    examples = sum(p.stats.counts["examples"] for p in pipelines)
    return examples >= count and all(not p.curator.buffer for p in pipelines)


async def test_a_drift_alarm_reaches_the_curator_of_every_partition(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    worker = start_worker(settings)
    try:
        await post(stack.base_url, traffic(8))
        await wait_for(lambda: _examples(settings) >= 8, 60, "the first examples")
        alarm = DriftAlarm(event_id=f"alarm-{uuid.uuid4().hex[:8]}", occurred_at=datetime.now(timezone.utc),
                           source="test", signal="reward:base", detector="ADWIN",
                           detected_at=datetime.now(timezone.utc))
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        for _ in range(2):  # delivered twice: each partition still counts it once
            await producer.send_and_wait(CONTROL.name, alarm.model_dump_json().encode(), key=b"drift")
        await producer.stop()
        triggered = await wait_for(
            lambda: sum(p.stats.counts["trigger_drift"] for p in _checkpoints(settings)) >= settings.topic_partitions,
            60, "a trigger in every partition")
    finally:
        stop_worker(worker)
        await stop()
    assert triggered
    assert sum(p.stats.counts["trigger_drift"] for p in _checkpoints(settings)) == settings.topic_partitions
    assert sum(p.stats.counts["duplicate_event"] for p in _checkpoints(settings)) == settings.topic_partitions


def feedloop(settings, *args: str) -> subprocess.CompletedProcess:
    """`feedloop <args>` as an operator runs it, against this test's broker and data dir."""
    env = {**os.environ, "FEEDLOOP_EMBEDDED_BROKER_PORT": str(settings.embedded_broker_port),
           "FEEDLOOP_DATA_DIR": str(settings.data_dir)}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def _held(settings) -> set[str]:
    """Example ids of the records the curators of the last checkpoints hold, waiting for a batch."""
    return {b.record.example_id for p in _checkpoints(settings) for b in p.curator.buffer}


async def test_feedloop_curate_cuts_a_batch_in_every_partition_from_what_it_holds(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    stack, stop = await start_stack(settings)
    # Neither size nor time cuts a batch here: only the command can. No cap and no replay: a
    # batch is then exactly what its curator held.
    worker = start_worker(settings, {"FEEDLOOP_PIPELINE__BATCH_SIZE": "1000",
                                     "FEEDLOOP_PIPELINE__BATCH_MAX_WAIT_S": str(10**8),
                                     "FEEDLOOP_PIPELINE__MAX_GROUP_SHARE": "1",
                                     "FEEDLOOP_PIPELINE__REPLAY_FRACTION": "0"})
    try:
        await post(stack.base_url, traffic(16))
        await wait_for(lambda: _examples(settings) >= 16, 90, "the examples")
        held = _held(settings)
        assert held and batches(stack) == {}, "cut before the command: nothing is tested"
        done = await asyncio.to_thread(feedloop, settings, "curate", "--cause", "test")
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"asked {settings.topic_partitions} partitions for a batch" in done.stdout
        await wait_for(lambda: not _held(settings) and batches(stack), 60, "the batches cut on the command")
        await asyncio.sleep(3)  # a batch written twice, or one more, would show up meanwhile
    finally:
        stop_worker(worker)
        await stop()
    with stack.sessions() as session:
        cut = session.scalars(select(Batch)).all()
    assert {b.trigger for b in cut} == {"manual"}
    records = [r for b in cut for rs in read_batch(BatchFolder(settings.objects, b.path))[1].values() for r in rs]
    assert sorted(r.example_id for r in records) == sorted(held), "each held record in one batch, once"
    partitions = _checkpoints(settings)
    assert sum(p.stats.counts["trigger_manual"] for p in partitions) == settings.topic_partitions
    assert len(cut) == sum(p.stats.counts["batch_manual"] for p in partitions)
