"""Two stream workers against one on the same events: throughput, CPU, and the same batches.

    .venv/bin/python benchmarks/scale_out.py [--events 40000] [--partitions 4] [--rounds 1]

For one worker and then for two (one consumer group, so two partitions each), on a fresh
embedded broker and store: the `feedloop worker` processes are started and beat ready, the
same events as benchmarks/pipeline_throughput.py are produced, and the clock runs until the
workers' checkpoints cover every record (what a worker acknowledges is checkpointed first).
Each run prints events/s of wall time and events per CPU-second of the workers (user +
system time of their processes, read from /proc), then the loop drains (every window
closed, every record in a batch) and the batches the run cut are compared with the other
run's by their manifests' SHA-256: a partition's pipeline is the same deterministic fold
whichever worker holds it, so the outputs must be byte-identical.

What the ratios mean on this machine: with 2 cores, two workers can at best double the
wall rate only if nothing else runs (the broker, this process and the producer share the
cores too). The CPU-second ratio is the cost of splitting: near 1.0 means a second worker
adds capacity at the same cost per event; below 1.0 is what consumer-group coordination
and the second process's fixed costs take.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, TopicPartition  # noqa: E402
from sqlalchemy import select  # noqa: E402

import migrations  # noqa: E402
from app.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from app.overview import PIPELINE_CONSUMER  # noqa: E402
from app.processes import Child  # noqa: E402
from pipeline_throughput import make_events, produce  # noqa: E402  (this script's folder is on the path)
from streams.checkpoint import decode  # noqa: E402
from streams.config import PipelineSettings  # noqa: E402
from streams.live import STATE_FORMAT  # noqa: E402
from streams.store import Batch, StreamCheckpoint, make_engine, make_sessionmaker  # noqa: E402
from streams.topics import EVENTS  # noqa: E402
from tests.conftest import free_port, make_settings  # noqa: E402

# Short windows and waits, so that the drain after the measured part takes seconds.
PIPELINE = PipelineSettings(idle_tick_s=1, implicit_window_s=4, explicit_window_s=8, allowed_lateness_s=1,
                            batch_size=500, batch_max_wait_s=30, checkpoint_interval_s=0.5)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def end_offsets(bootstrap: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(EVENTS.name, p) for p in range(partitions)])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()


def run(events: list[dict], partitions: int, workers: int) -> dict[str, object]:
    """One run with ``workers`` worker processes: rates, and the batches it cut (name -> manifest hash).

    The events are in the topic before the workers start, as a backlog after an outage would
    be: the clock runs from the first checkpoint (a worker has processed records) until the
    checkpoints cover every record, so start-up is not counted; the second worker's joining
    the group (and the rebalance it causes) is."""
    root = Path(tempfile.mkdtemp(prefix="feedloop-scale-"))
    broker = EmbeddedBroker(free_port(), log_path=root / "broker.log")
    children: list[Child] = []
    try:
        broker.start()
        settings = make_settings(root, broker.port, pipeline=PIPELINE, topic_partitions=partitions)
        migrations.upgrade(settings.store_url)
        asyncio.run(ensure_topics(settings))
        sessions = make_sessionmaker(make_engine(settings.store_url))
        asyncio.run(produce(broker.bootstrap_servers, events))
        ends = asyncio.run(end_offsets(broker.bootstrap_servers, partitions))
        children = [Child(["worker"], settings, root / f"worker-{i}.log").start() for i in range(workers)]
        until(lambda: bool(checkpoints(sessions)), 120, children, poll_s=0.02)
        started, cpu_before = time.perf_counter(), sum(cpu_seconds(c.process.pid) for c in children)
        until(lambda: covered(sessions, ends), 600, children, poll_s=0.05)
        wall = time.perf_counter() - started
        cpu = sum(cpu_seconds(c.process.pid) for c in children) - cpu_before
        until(lambda: drained(sessions), 300, children, poll_s=1.0)
        with sessions() as session:
            batches = {b.batch_id: b.manifest_sha256 for b in session.scalars(select(Batch))}
        return {"rate": len(events) / wall, "cpu_rate": len(events) / cpu, "batches": batches}
    finally:
        for child in children:
            child.stop()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def until(predicate, timeout_s: float, children: list[Child], poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if dead := [c for c in children if not c.running]:
            raise RuntimeError(f"a worker exited:\n{dead[0].log_tail(30)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not done after {timeout_s:.0f} s:\n{children[0].log_tail(30)}")
        time.sleep(poll_s)


def checkpoints(sessions) -> list[StreamCheckpoint]:
    with sessions() as session:
        return list(session.scalars(select(StreamCheckpoint).where(StreamCheckpoint.consumer == PIPELINE_CONSUMER)))


def covered(sessions, ends: dict[int, int]) -> bool:
    offsets = {row.partition: row.offset for row in checkpoints(sessions)}
    return all(offsets.get(p, -1) + 1 >= end for p, end in ends.items() if end)


def drained(sessions) -> bool:
    """Every window closed and every training record cut into a batch."""
    states = [decode(row, STATE_FORMAT) for row in checkpoints(sessions)]
    return all(not p.curator.buffer and not p.join.open for p in states)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=40_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="repeat both runs; medians are printed too")
    args = parser.parse_args()
    # Dated just before now and close together (a backlog of the last minutes): a live worker
    # treats feedback on answers older than its windows as late, whatever their order.
    events = make_events(args.events, start=datetime.now(timezone.utc) - timedelta(seconds=120), spacing_s=0.005)
    print(f"events: {len(events)} over {args.partitions} partitions, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rounds = []
    for i in range(args.rounds):
        one, two = run(events, args.partitions, 1), run(events, args.partitions, 2)
        same = one["batches"] == two["batches"] and bool(one["batches"])
        rounds.append((one, two))
        print(f"round {i + 1}: one worker {one['rate']:,.0f} events/s, {one['cpu_rate']:,.0f} per CPU-s | "
              f"two workers {two['rate']:,.0f} events/s ({two['rate'] / one['rate']:.2f}x), "
              f"{two['cpu_rate']:,.0f} per CPU-s ({two['cpu_rate'] / one['cpu_rate']:.2f}x) | "
              f"{len(one['batches'])} batches, byte-identical: {'yes' if same else 'NO'}", flush=True)
    if args.rounds > 1:
        wall = statistics.median(two["rate"] / one["rate"] for one, two in rounds)
        cpu = statistics.median(two["cpu_rate"] / one["cpu_rate"] for one, two in rounds)
        print(f"median of {args.rounds} rounds: two workers / one: wall {wall:.2f}x, per CPU-second {cpu:.2f}x")


if __name__ == "__main__":
    main()
