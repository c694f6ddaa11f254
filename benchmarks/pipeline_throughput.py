"""Stream pipeline throughput beside a bare Faust agent and a bare aiokafka consumer, one run.

    .venv/bin/python benchmarks/pipeline_throughput.py [--events 20000] [--partitions 4] [--rounds 1]

The same events (interactions with thumbs/copy/edit feedback, keyed by session) are produced
once to a fresh embedded broker; then, each in its own process and consumer group:

- bare aiokafka consumer: json.loads + a dict update per record, commit per poll;
- bare Faust agent: iterates the stream and counts, no table;
- feedloop pipeline: the real worker (validate, dedupe, scrub, pseudonymize, join, signals,
  curator; outputs delivered and partitions checkpointed before acks);

and finally the offline replay of the same records in this process (one core). Rates count
from the first record seen to the last; the ratios are the figures to compare. Beside the
rates per second of wall time, each path reports its rate per second of its own CPU time
(all its threads; not the broker's): on a shared machine that one does not depend on how
much of a core the path happened to get. With
``--rounds N`` the whole run repeats N times (a fresh broker and data directory each) and the
medians are printed too: on a shared machine one round can catch a burst of someone else's
work. With ``--s3`` each round runs twice, alternating: shared state in the data directory
(``file://``) and on a SeaweedFS S3 server on loopback (``FEEDLOOP_STORAGE__URL``), and the S3
run's rates are printed over the file run's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from app.broker import EmbeddedBroker, ensure_topics  # noqa: E402
from app.runtime import tune_gc  # noqa: E402
from app.settings import Settings  # noqa: E402
from streams.topics import EVENTS  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.factories import feedback, interaction  # noqa: E402

T0 = datetime.now(timezone.utc) - timedelta(hours=6)


def make_events(count: int, start: datetime = T0, spacing_s: float = 0.5) -> list[dict]:
    """A chat-app-like mix: 60% of interactions get feedback (35% explicit: thumbs, rating,
    edit; 25% implicit: copy), 40% none; one answer in ten carries a phone number to scrub.
    Interactions are ``spacing_s`` apart from ``start``, each feedback 2 s after its answer."""
    events, i = [], 0
    while len(events) < count:
        when = start + timedelta(seconds=i * spacing_s)
        answer = f"answer {i}" + (f": call me at +1 415 555 {i % 10000:04d}" if i % 10 == 0 else "")
        turn = interaction(occurred_at=when.isoformat(), context={"domain": "abc"[i % 3], "cohort": "xy"[i % 2]},
                           prompt=[{"role": "user", "content": f"question {i} about topic {i * 7} please"}],
                           response=answer)
        events.append(turn)
        roll = i % 20
        kind = "thumbs" if roll < 3 else "rating" if roll < 5 else "edit" if roll < 7 else "copy" if roll < 12 else None
        if kind:
            extra = {"thumbs": {"value": 1}, "rating": {"value": 4}, "edit": {"text": f"better answer {i}"}}.get(kind, {})
            events.append(feedback(turn, kind, occurred_at=(when + timedelta(seconds=2)).isoformat(), **extra))
        i += 1
    return events[:count]


async def produce(bootstrap: str, events: list[dict]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        pending = [await producer.send(EVENTS.name, json.dumps(e).encode(), key=e["session_id"].encode())
                   for e in events]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


# --- the three consumers, each run as `python this.py --mode X` ----------------------------


def now() -> tuple[float, float]:
    """Wall time and this process's CPU time."""
    return time.perf_counter(), time.process_time()


def rates(count: int, start: tuple[float, float], end: tuple[float, float]) -> dict[str, float]:
    return {"rate": count / (end[0] - start[0]), "cpu_rate": count / (end[1] - start[1])}


async def bare_aiokafka(bootstrap: str, total: int) -> dict[str, float]:
    consumer = AIOKafkaConsumer(EVENTS.name, bootstrap_servers=bootstrap, group_id=f"bench-{uuid.uuid4().hex}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                session_timeout_ms=6000, heartbeat_interval_ms=1000)
    await consumer.start()
    seen, state, started = 0, {}, None
    try:
        while seen < total:
            batches = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batches.values():
                started = started or now()
                for record in records:
                    event = json.loads(record.value)
                    state[event["event_id"]] = event["occurred_at"]
                    seen += 1
            if batches:
                await consumer.commit()
        return rates(seen, started, now())
    finally:
        await consumer.stop()


def run_faust(settings: Settings, total: int, with_pipeline: bool) -> None:
    import faust

    from app.faust_app import make_faust_app
    from app.runtime import build_pipeline_app

    marks: list[tuple[float, float]] = []
    if with_pipeline:
        from streams.live import LivePipeline

        original = LivePipeline.handle

        def timed(self, *record):  # time every record the worker handles
            marks.append(now())
            return original(self, *record)

        LivePipeline.handle = timed
        from streams.broker_life import cluster_id

        # The broker's own id: the worker confirms it before every acknowledgement.
        app = build_pipeline_app(settings, cluster=asyncio.run(cluster_id(settings.kafka)))
    else:
        app = make_faust_app(settings, name=f"bench-bare-{uuid.uuid4().hex}")
        topic = app.topic(EVENTS.name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

        @app.agent(topic)
        async def bare(stream):
            async for _ in stream:
                marks.append(now())

    tune_gc()  # as `feedloop worker` does

    @app.timer(interval=0.5)
    async def done() -> None:
        if len(marks) >= total:
            print(json.dumps(rates(len(marks), marks[0], marks[-1])), flush=True)
            os._exit(0)

    faust.Worker(app, quiet=True, loglevel="warning", redirect_stdouts=False).execute_from_commandline()


def offline_replay(settings: Settings, events: list[dict]) -> dict[str, float]:
    from aiokafka.partitioner import DefaultPartitioner

    from streams.pii import Scrubber
    from streams.pipeline import PipelineSet
    from streams.pseudonyms import Pseudonymizer

    partitioner = DefaultPartitioner()
    parts = list(range(settings.topic_partitions))
    records = sorted(
        ((partitioner(e["session_id"].encode(), parts, parts), i, json.dumps(e).encode()) for i, e in enumerate(events)),
    )
    pipelines = PipelineSet(settings.pipeline, Scrubber(), Pseudonymizer(settings.key_store()))
    for e in events:  # keys exist already in a running system; creating them is one-off disk I/O
        if "user_id" in e and e["type"] == "interaction":
            pipelines.pseudonyms.pseudonym(e["user_id"])
    tune_gc(batch=True)  # as `feedloop replay --offline` does
    started = now()
    for partition, offset, value in records:
        pipelines.process(partition, offset, value)
    return rates(len(records), started, now())


def child(mode: str, total: int) -> dict[str, float]:
    env = {**os.environ, "FEEDLOOP_LOG_LEVEL": "warning"}
    done = subprocess.run([sys.executable, __file__, "--mode", mode, "--events", str(total)],
                          env=env, capture_output=True, text=True, timeout=600)
    found = re.findall(r'\{"rate": [^}]+\}', done.stdout)  # Faust's spinner may share the line
    if not found:
        raise RuntimeError(f"{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole run; medians are printed too")
    parser.add_argument("--s3", action="store_true",
                        help="each round again with the shared state (batches, keys) on a local SeaweedFS S3 server")
    parser.add_argument("--mode", choices=["aiokafka", "faust", "pipeline"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.mode:
        settings = Settings()
        if args.mode == "aiokafka":
            print(json.dumps(asyncio.run(bare_aiokafka(settings.bootstrap_servers, args.events))))
        else:
            run_faust(settings, args.events, with_pipeline=args.mode == "pipeline")
        return

    events = make_events(args.events)
    print(f"events: {len(events)} over {args.partitions} partitions (interactions + feedback), {os.cpu_count()} cores")
    if not args.s3:
        rounds = [one_round(events, args.partitions) for _ in range(args.rounds)]
        for i, measured in enumerate(rounds, 1):
            print_rates(f"round {i}" if args.rounds > 1 else "", [measured])
        if args.rounds > 1:
            print_rates(f"median of {args.rounds} rounds", rounds)
        return
    from tests.object_server import SeaweedS3
    from trainer.lora_resolver import storage_environment

    on_file, on_s3 = [], []
    with SeaweedS3() as server:
        for i in range(1, args.rounds + 1):  # alternating, each on a fresh broker and store
            on_file.append(one_round(events, args.partitions))
            on_s3.append(one_round(events, args.partitions, storage_environment(server.storage())))
            print_rates(f"round {i}, file://", on_file[-1:])
            print_rates(f"round {i}, s3:// (SeaweedFS on loopback)", on_s3[-1:])
            print_storage_ratios(f"round {i}", on_file[-1:], on_s3[-1:])
    if args.rounds > 1:
        print_storage_ratios(f"median of {args.rounds} rounds", on_file, on_s3)


def print_storage_ratios(title: str, on_file: list, on_s3: list) -> None:
    """The S3 round's rates over the file round's, for the paths that write shared state."""
    print(f"{title}: s3:// / file://")
    for name, key in [("  feedloop pipeline worker", "pipeline"), ("  feedloop replay --offline", "replay")]:
        for rate in ("rate", "cpu_rate"):
            ratio = statistics.median(s[key][rate] / f[key][rate] for f, s in zip(on_file, on_s3))
            print(f"{name:<44}{'per wall-s' if rate == 'rate' else 'per CPU-s':>12}{ratio:>10.2f}")


def one_round(events: list[dict], partitions: int, storage: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    """Every path over the same events, on a fresh broker and data directory; ``storage``:
    FEEDLOOP_STORAGE__* for shared state on object storage (none: the data directory)."""
    work = Path(tempfile.mkdtemp(prefix="feedloop-bench-"))
    for name in [n for n in os.environ if n.startswith("FEEDLOOP_STORAGE__")]:
        del os.environ[name]
    try:
        with EmbeddedBroker(free_port()) as broker:
            os.environ.update({
                "FEEDLOOP_EMBEDDED_BROKER_PORT": str(broker.port),
                "FEEDLOOP_DATA_DIR": str(work),
                "FEEDLOOP_TOPIC_PARTITIONS": str(partitions),
                **(storage or {}),
            })
            settings = Settings()
            import migrations

            migrations.upgrade(settings.store_url)
            asyncio.run(ensure_topics(settings))
            asyncio.run(produce(broker.bootstrap_servers, events))
            measured = {mode: child(mode, len(events)) for mode in ("aiokafka", "faust", "pipeline")}
        measured["replay"] = offline_replay(settings, events)
        return measured
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a round's store, archive and batches: megabytes each


def print_rates(title: str, rounds: list[dict[str, dict[str, float]]]) -> None:
    """The medians over ``rounds`` of each rate and of each ratio to the bare Faust agent."""

    def figure(key: str, rate: str, ratio: bool) -> float:
        return statistics.median(r[key][rate] / (r["faust"][rate] if ratio else 1) for r in rounds)

    print(f"{title:<44}{'events/s':>12}{'vs Faust':>10}{'per CPU-s':>12}{'vs Faust':>10}")
    for name, key in [("bare aiokafka consumer", "aiokafka"), ("bare Faust agent (baseline)", "faust"),
                      ("feedloop pipeline worker", "pipeline"), ("feedloop replay --offline (one core)", "replay")]:
        print(f"{name:<44}{figure(key, 'rate', False):>12,.0f}{figure(key, 'rate', True):>10.2f}"
              f"{figure(key, 'cpu_rate', False):>12,.0f}{figure(key, 'cpu_rate', True):>10.2f}")


if __name__ == "__main__":
    main()
