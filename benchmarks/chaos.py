"""The whole loop under a steady load while each process is killed in turn and the broker restarts.

    .venv/bin/python benchmarks/chaos.py [--rounds 2] [--rate 4] [--settle-s 10]

Six real processes (`feedloop gateway`, `archive run`, `worker`, `learn`, `train`, `swap`) on
a fresh embedded broker and store, each started again whenever it exits, as compose's
``restart: unless-stopped`` does. A client sends interactions at ``--rate`` per second, each
followed a second later by a thumb, rating or edit, and retries a send until the gateway
answers 202 (the same events, so a retry is a redelivery, never a new event): what it counts
as sent is what the gateway acknowledged.

In each round every process gets a SIGKILL in turn, then the broker restarts. The embedded
broker keeps nothing on disk: it comes back empty, with a new cluster id, and each process
that reads it stops and is started again on the new life (streams/broker_life.py); the
benchmark then does what the worker's ``broker.new_life`` line tells an operator to do and
republishes what the archive holds that the worker had not processed. Recovery is the time
from the fault until the process killed (for the broker: every process) beats its heartbeat
again as ready and the gateway acknowledges events again.

When the faults are done the load stops, the loop drains, and the same load (as many
interactions, same rate) runs again on a fresh loop with no fault. For both it prints:

- sent: events the gateway acknowledged; archived: those in the archive; lost: sent, never
  archived; redelivered: archive copies beyond the first (client retries, the republish),
  which the worker drops by event id;
- examples: distinct examples on the examples topic, one per interaction (lost: an
  interaction without one); the learner's count of examples (doubled: above the distinct);
- batch records: the records in the batches the live worker cut, and whether an offline
  replay of the archive cuts byte-identical batches (the event log is the source of truth).

The swap controller runs with no vLLM behind it (it keeps reconciling and beating); the
trainer trains the project's tiny base model, so batches are trained while faults happen.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from sqlalchemy import select  # noqa: E402

import migrations  # noqa: E402
from app.broker import EmbeddedBroker  # noqa: E402
from app.liveness import UP, process_views  # noqa: E402
from app.processes import Child, settings_env  # noqa: E402
from demo.base_model import ToyChats, build_tiny_model  # noqa: E402
from streams.agents import PIPELINE_RECORD_KEYS  # noqa: E402
from streams.archive import read_segment, segments  # noqa: E402
from streams.checkpoint import decode  # noqa: E402
from streams.config import PipelineSettings  # noqa: E402
from streams.learner_agents import STATE_FORMAT as LEARNER_FORMAT  # noqa: E402
from streams.live import STATE_FORMAT as WORKER_FORMAT  # noqa: E402
from streams.objects import ObjectStore  # noqa: E402
from streams.store import Batch, BatchStatus, StreamCheckpoint, make_engine, make_sessionmaker  # noqa: E402
from streams.topics import EVENTS, EXAMPLES  # noqa: E402
from streams.training_data import BatchFolder, read_batch  # noqa: E402
from tests.conftest import API_KEYS, free_port, make_settings  # noqa: E402
from tests.factories import feedback, interaction  # noqa: E402
from trainer.base_model import BaseModelConfig  # noqa: E402

COMMANDS = {"gateway": ["gateway"], "archiver": ["archive", "run"], "worker": ["worker"], "learner": ["learn"],
            "trainer": ["train"], "swap": ["swap"]}
FAULTS = ("worker", "learner", "trainer", "swap", "archiver", "gateway", "broker")
# Stop on a new broker life and are started again (streams/broker_life.py): until their new
# instance is up, the loop has not recovered from a broker restart.
RESTART_ON_NEW_LIFE = ("worker", "learner", "archiver")
AUTH = {"Authorization": f"Bearer {API_KEYS['app-a']}", "Content-Type": "application/json"}
# Windows longer than a fault lasts: a feedback retried while the gateway is down still joins.
# A batch's wait counts from its oldest record's event time, which reaches the curator only
# when its window closes: the wait must be longer than the window, or each record is a batch.
PIPELINE = PipelineSettings(idle_tick_s=1, implicit_window_s=20, explicit_window_s=40, allowed_lateness_s=5,
                            batch_size=100, batch_max_wait_s=90)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class Loop:
    """The six processes on one broker and store, each started again when it exits."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.broker = EmbeddedBroker(free_port(), log_path=root / "broker.log")
        self.settings = make_settings(root, self.broker.port, pipeline=PIPELINE, log_format="json",
                                      vllm_urls=[f"http://127.0.0.1:{free_port()}"])  # fmt: skip
        self.children = {name: Child(command, self.settings, root / f"{name}.log") for name, command in COMMANDS.items()}
        self.sessions = make_sessionmaker(make_engine(self.settings.store_url))
        self.restarts: Counter = Counter()
        self.faults: list[tuple[float, str]] = []  # (when, what)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway_port}"

    def start(self) -> None:
        self.broker.start()
        build_tiny_model(self.settings.model_path, ToyChats(count=40), BaseModelConfig(train_steps=1, log_every=1000))
        migrations.upgrade(self.settings.store_url)
        for child in self.children.values():
            child.start()

    def tend(self) -> None:
        for name, child in self.children.items():
            if not child.running:
                self.restarts[name] += 1
                child.start()

    def ready(self, process: str, not_pid: int | None = None) -> bool:
        with self.sessions() as session:
            views = process_views(session, self.settings.liveness, processes=[process])
        return any(v.state == UP and v.pid != not_pid for v in views)

    async def until(self, predicate, timeout_s: float) -> float | None:
        """Seconds until ``predicate()`` holds (tending the processes meanwhile), None on timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            self.tend()
            if predicate():
                return time.monotonic() - started
            await asyncio.sleep(0.25)
        return None

    async def tend_for(self, seconds: float) -> None:
        await self.until(lambda: False, seconds)

    async def fault(self, target: str, load: Load, timeout_s: float) -> float | None:
        """Inflict one fault; seconds until the loop is whole again."""
        started = time.monotonic()
        self.faults.append((started, target))
        acked = load.acked_at
        if target == "broker":
            pids = {name: self.children[name].process.pid for name in RESTART_ON_NEW_LIFE}
            self.broker.stop()
            self.broker.start()  # empty, with a new cluster id
            waiting = COMMANDS
        else:
            pid = self.children[target].process.pid
            os.killpg(pid, signal.SIGKILL)
            self.children[target].process.wait(10)
            waiting, pids = [target], {target: pid}
        recovered = await self.until(lambda: all(self.ready(p, pids.get(p)) for p in waiting)
                                     and load.acked_at > max(acked, started), timeout_s)  # fmt: skip
        if target == "broker":
            self.republish_unprocessed()
        return None if recovered is None else time.monotonic() - started

    def republish_unprocessed(self) -> None:
        """What an operator runs after a broker restart, as the worker's broker.new_life line says."""
        said = [json.loads(line) for line in (self.root / "worker.log").read_text().splitlines()
                if '"event": "broker.new_life"' in line]  # fmt: skip
        since = said[-1].get("republish") if said else None
        if since:
            done = subprocess.run([sys.executable, "-m", "app.cli", *since.split()[1:]], env=self.env(),
                                  capture_output=True, text=True, timeout=300)  # fmt: skip
            print(f"    {since}: {done.stdout.strip().splitlines()[-1:] or done.stderr[-300:]}", flush=True)

    def env(self) -> dict[str, str]:
        return {**os.environ, **settings_env(self.settings)}

    def stop(self) -> None:
        for child in self.children.values():
            child.stop()
        self.broker.stop()


@dataclass
class Load:
    """A chat app: interactions at a steady rate, each with its feedback a second later."""

    rate: float
    interactions: int | None = None  # stop after this many; None: until stopped
    acked: list[dict] = field(default_factory=list)
    acked_at: float = 0.0  # when the last send was acknowledged
    ack_times: dict[str, float] = field(default_factory=dict)  # event id -> when acknowledged
    retries: int = 0
    sent_interactions: int = 0

    async def _send(self, http: httpx.AsyncClient, events: list[dict]) -> None:
        body = json.dumps(events)
        while True:
            try:
                response = await http.post("/v1/events", content=body, headers=AUTH)
                if response.status_code == 202:
                    self.acked += events
                    self.acked_at = time.monotonic()
                    self.ack_times.update((e["event_id"], self.acked_at) for e in events)
                    return
            except httpx.HTTPError:
                pass
            self.retries += 1
            await asyncio.sleep(0.2)

    async def run(self, base_url: str, stopping: asyncio.Event) -> None:
        pending_feedback: list[dict] = []
        kinds = [("thumbs", {"value": 1}), ("rating", {"value": 4}), ("edit", {"text": "a better answer"})]
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            i = 0
            while not stopping.is_set() and (self.interactions is None or i < self.interactions):
                tick = time.monotonic()
                turn = interaction(occurred_at=now_iso(), context={"domain": "abc"[i % 3], "cohort": "xy"[i % 2]},
                                   prompt=[{"role": "user", "content": f"question {uuid.uuid4().hex} number {i}"}],
                                   response=f"answer {i}: {uuid.uuid4().hex}")  # fmt: skip
                await self._send(http, pending_feedback + [turn])
                kind, extra = kinds[i % len(kinds)]
                pending_feedback = [feedback(turn, kind, occurred_at=now_iso(), **extra)]
                i += 1
                self.sent_interactions = i
                await asyncio.sleep(max(0.0, 1 / self.rate - (time.monotonic() - tick)))
            if pending_feedback:
                await self._send(http, pending_feedback)


@dataclass
class Tally:
    sent: int
    archived: int
    lost_events: int
    redelivered: int
    interactions: int
    examples: int
    lost_examples: int
    example_redeliveries: int
    worker_examples: int
    learner_examples: int
    batches: int
    batch_records: int
    fresh_records_doubled: int
    fresh_records_missing: int  # in the offline replay's batches, in no live batch
    fresh_records_extra: int  # in a live batch, in none of the replay's
    replay_identical: bool  # byte for byte; a republish reorders the log, so not after a broker restart
    lost_near: str  # the fault nearest each lost event's acknowledgement (- before it, + after)
    trained: int
    failed: int
    waiting_for_trainer: int


def worker_state(loop: Loop) -> tuple[int, int]:
    """(examples the worker's checkpoints count, training records waiting for a batch)."""
    with loop.sessions() as session:
        rows = session.scalars(select(StreamCheckpoint).where(StreamCheckpoint.format_version == WORKER_FORMAT))
        states = [decode(row, WORKER_FORMAT) for row in rows]
    return sum(p.stats.counts["examples"] for p in states), sum(len(p.curator.buffer) for p in states)


def learner_examples(loop: Loop) -> int:
    with loop.sessions() as session:
        row = session.get(StreamCheckpoint, ("feedloop-learners", 0))
        return decode(row, LEARNER_FORMAT).examples if row and row.format_version == LEARNER_FORMAT else 0


def tally(loop: Loop, load: Load) -> Tally:
    sent = {e["event_id"] for e in load.acked}
    interactions = {e["interaction_id"] for e in load.acked if e["type"] == "interaction"}
    events, examples = Counter(), Counter()
    with loop.sessions() as session:
        for segment in segments(session):
            if segment.topic not in (EVENTS.name, EXAMPLES.name):
                continue
            for record in read_segment(loop.settings.objects, segment):
                if segment.topic == EVENTS.name and record.key not in PIPELINE_RECORD_KEYS:
                    events[json.loads(record.value)["event_id"]] += 1
                elif segment.topic == EXAMPLES.name:
                    examples[json.loads(record.value)["example_id"]] += 1
        rows = list(session.scalars(select(Batch)))
    live = {b.batch_id: b.manifest_sha256 for b in rows}
    live_fresh = fresh_records([BatchFolder(loop.settings.objects, b.path) for b in rows])
    replayed = replay(loop)
    replayed_store = ObjectStore((loop.root / "replayed").as_uri())  # the replay's --data-dir
    replay_fresh = fresh_records([BatchFolder.of(replayed_store, name) for name in replayed])
    status = Counter(b.status for b in rows)
    lost = sent - set(events)
    near = []  # each lost event by the fault nearest its acknowledgement, and how far from it
    for event_id in lost:
        acked = load.ack_times[event_id]
        when, what = min(loop.faults, key=lambda fault: abs(fault[0] - acked), default=(acked, "no fault"))
        near.append(f"{what} {acked - when:+.0f} s")
    (loop.root / "lost.json").write_text(json.dumps({
        "events": sorted(lost), "interactions": sorted(interactions - set(examples)),
        "faults": [[when, what] for when, what in loop.faults],
        "acked_at": {event_id: load.ack_times[event_id] for event_id in lost}}, indent=1))
    return Tally(
        sent=len(sent), archived=len(sent & set(events)), lost_events=len(sent - set(events)),
        redelivered=sum(events.values()) - len(events), interactions=len(interactions),
        examples=len(examples), lost_examples=len(interactions - set(examples)),
        example_redeliveries=sum(examples.values()) - len(examples), worker_examples=worker_state(loop)[0],
        learner_examples=learner_examples(loop), batches=len(rows), batch_records=sum(b.example_count for b in rows),
        fresh_records_doubled=sum(live_fresh.values()) - len(live_fresh),
        fresh_records_missing=len(set(replay_fresh) - set(live_fresh)),
        fresh_records_extra=len(set(live_fresh) - set(replay_fresh)), replay_identical=bool(live) and replayed == live,
        lost_near=", ".join(sorted(near)) or "-", trained=status[BatchStatus.TRAINED],
        failed=status[BatchStatus.FAILED], waiting_for_trainer=status[BatchStatus.EMITTED] + status[BatchStatus.TRAINING],
    )  # fmt: skip


def fresh_records(batches: list[BatchFolder]) -> Counter:
    """How often each training record appears in these batches, not counting replayed copies
    (the curator mixes older records back in on purpose)."""
    seen: Counter = Counter()
    for batch in batches:
        _, records = read_batch(batch)
        seen.update(r.example_id for signal in records.values() for r in signal if not r.replay)
    return seen


def replay(loop: Loop) -> dict[str, str]:
    out = loop.root / "replayed"
    done = subprocess.run([sys.executable, "-m", "app.cli", "replay", "--offline", "--data-dir", str(out)],
                          env=loop.env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        print(done.stderr[-1000:])
        return {}
    return {p.name: hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest()
            for p in (out / "batches").iterdir() if (p / "manifest.json").exists()}


async def drain(loop: Loop, load: Load, timeout_s: float) -> None:
    """Until every acknowledged interaction is an example the learner holds and no record waits
    for a batch (the trainer may still be behind: what it has not trained yet is counted)."""
    interactions = len({e["interaction_id"] for e in load.acked if e["type"] == "interaction"})

    seen: list[tuple[float, tuple]] = []

    def settled() -> bool:
        examples, buffered = worker_state(loop)
        now = (examples, buffered, learner_examples(loop))
        if not seen or seen[-1][1] != now:
            seen.append((time.monotonic(), now))
        done = examples >= interactions and now[2] >= interactions
        stuck = time.monotonic() - seen[-1][0] > 60  # an example that was lost: nothing moves any more
        return buffered == 0 and (done or stuck)

    took = await loop.until(settled, timeout_s)
    print(f"  drained in {took:.0f} s" if took is not None else f"  not drained after {timeout_s:.0f} s", flush=True)


async def run(root: Path, rate: float, faults: list[str], settle_s: float, interactions: int | None,
              recover_timeout_s: float) -> tuple[Tally, list[tuple[str, float | None]], Load, Counter]:  # fmt: skip
    loop = Loop(root)
    loop.start()
    recoveries = []
    try:
        took = await loop.until(lambda: all(loop.ready(p) for p in COMMANDS), 300)
        print(f"  every process up in {took:.0f} s" if took is not None else "  not every process came up", flush=True)
        load = Load(rate=rate, interactions=interactions)
        stopping = asyncio.Event()
        sending = asyncio.create_task(load.run(loop.base_url, stopping))
        await loop.tend_for(settle_s)
        for target in faults:
            recovered = await loop.fault(target, load, recover_timeout_s)
            recoveries.append((target, recovered))
            print(f"  {target:<9} back in {recovered:.1f} s" if recovered is not None
                  else f"  {target:<9} not back within {recover_timeout_s:.0f} s", flush=True)  # fmt: skip
            await loop.tend_for(settle_s)
        if interactions is None:
            stopping.set()
        await loop.until(sending.done, float("inf"))
        await sending
        await drain(loop, load, timeout_s=300)
    finally:
        loop.stop()
    return tally(loop, load), recoveries, load, loop.restarts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=3.0, help="Interactions per second (each with one feedback).")
    parser.add_argument("--settle-s", type=float, default=10.0, help="Steady load between two faults.")
    parser.add_argument("--recover-timeout-s", type=float, default=90.0)
    parser.add_argument("--faults", default=",".join(FAULTS), help="Which faults, in this order, each round.")
    parser.add_argument("--keep", type=Path, help="Run in this (new) directory and keep it: logs, store, archive.")
    args = parser.parse_args()
    faults = args.faults.split(",")

    with tempfile.TemporaryDirectory(prefix="feedloop-chaos-") as scratch:
        tmp = args.keep or scratch
        print(f"faults: {args.rounds} rounds of {', '.join(faults)} at {args.rate:g} interactions/s", flush=True)
        faulted, recoveries, load, restarts = asyncio.run(
            run(Path(tmp) / "faults", args.rate, faults * args.rounds, args.settle_s, None,
                args.recover_timeout_s))  # fmt: skip
        print(f"fault-free: the same {load.sent_interactions} interactions at {args.rate:g}/s", flush=True)
        clean, _, _, _ = asyncio.run(run(Path(tmp) / "clean", args.rate, [], args.settle_s, load.sent_interactions,
                                         args.recover_timeout_s))  # fmt: skip

    print(f"\n{'':<38}{'faults':>10}{'fault-free':>12}")
    for name in Tally.__dataclass_fields__:
        if name != "lost_near":
            print(f"{name.replace('_', ' '):<38}{getattr(faulted, name)!s:>10}{getattr(clean, name)!s:>12}")
    print(f"{'lost events, acknowledged near':<38}{faulted.lost_near}")
    print(f"{'client retries':<38}{load.retries:>10}")
    print(f"{'process restarts':<38}{sum(restarts.values()):>10}  ({dict(restarts)})")
    print("\nseconds to recover, per fault (max over rounds; every round):")
    for target in faults:
        times = [t for name, t in recoveries if name == target]
        known = [t for t in times if t is not None]
        worst = f"{max(known):.1f}" if len(known) == len(times) else "not back"
        print(f"  {target:<9} {worst:>8}   " + ", ".join("-" if t is None else f"{t:.1f}" for t in times)
              + (f"   median {statistics.median(known):.1f}" if known else ""))  # fmt: skip


if __name__ == "__main__":
    main()
