"""`feedloop demo` (what `make run` runs): the system on embedded defaults with simulated traffic.

Starts the embedded broker, the store, the archiver and the gateway in this process and the
pipeline worker beside it, has a simulated chat app post interactions, feedback (some with
personal data in it) and some deliberately malformed input through the Python client, waits
until everything is archived and the pipeline has turned every interaction into an example
and every training record into a batch, verifies the archive and prints a report. The demo
shortens the pipeline's windows (seconds, not half an hour) unless FEEDLOOP_PIPELINE__* says
otherwise. The learners, the trainer and serving join here with the end-to-end issue.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass

import structlog
from pydantic import SecretStr
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import func, select

import migrations
from app.broker import EmbeddedBroker
from app.client import FeedloopClient
from app.runtime import PIPELINE_CONSUMER, build_archiver, gateway_server, wait_started
from app.settings import Settings
from app.store import ArchiveSegment, Batch, make_engine, make_sessionmaker
from streams.agents import PIPELINE_RECORD_KEYS
from streams.archive import read_segment, verify_archive
from streams.live import checkpointed_stats
from streams.topics import EVENTS

log = structlog.get_logger(__name__)

DEMO_APP = "demo-chat"
DOMAINS = ("general", "code", "math", "travel")
COHORTS = ("a", "a", "a", "b", "b", "minority")
FEEDBACK_KINDS = ("thumbs", "rating", "edit", "regenerate", "copy", "abandon", "dwell", "rephrase")
# Windows short enough to watch examples and batches appear within the demo.
DEMO_PIPELINE = {
    "IMPLICIT_WINDOW_S": "5", "EXPLICIT_WINDOW_S": "10", "ALLOWED_LATENESS_S": "1",
    "IDLE_TICK_S": "1", "BATCH_SIZE": "64", "BATCH_MAX_WAIT_S": "15", "CHECKPOINT_INTERVAL_S": "1",
}


@dataclass
class Sent:
    accepted: int = 0
    rejected: int = 0


def malformed_bodies(app_id: str) -> list[tuple[bytes, str]]:
    """Input a buggy app might send; every one must be rejected and dead-lettered."""
    return [
        (b'{"type": "interaction", "event_id": ', "application/x-ndjson"),  # bad JSON
        (json.dumps({"type": "sparkle", "event_id": "bad-type-0001"}).encode(), "application/x-ndjson"),
        (
            json.dumps({
                "type": "feedback", "event_id": "bad-kind-0001", "app_id": app_id, "session_id": "s",
                "occurred_at": "2026-11-21T10:00:00Z", "interaction_id": "x", "kind": "sparkle",
            }).encode(),
            "application/x-ndjson",
        ),  # fmt: skip
        (json.dumps({"type": "interaction", "event_id": "missing-0001"}).encode(), "application/x-ndjson"),
    ]


def simulate_app(client: FeedloopClient, interactions: int, seed: int, on_progress) -> Sent:
    """A chat app's traffic: interactions, explicit and implicit feedback, and a retry."""
    rng = random.Random(seed)
    sent = Sent()
    batch = []
    for i in range(interactions):
        domain = rng.choice(DOMAINS)
        turn = client.interaction(
            user_id=f"user-{rng.randrange(200)}",
            session_id=f"session-{rng.randrange(600)}",
            adapter="base",
            propensity=1.0,
            prompt=[{"role": "user", "content": f"a {domain} question number {i}"
                      + (f"; reach me at jane.doe{i}@example.com" if i % 20 == 0 else "")}],
            response=f"an answer about {domain}",
            context={"domain": domain, "locale": "en", "client": "web", "cohort": rng.choice(COHORTS)},
            prompt_tokens=8,
            completion_tokens=5,
            latency_ms=round(rng.uniform(50, 400), 1),
        )
        batch.append(turn)
        if rng.random() < 0.6:
            kind = rng.choice(FEEDBACK_KINDS)
            extra = {
                "thumbs": {"value": rng.choice((1, -1))},
                "rating": {"value": rng.randint(1, 5)},
                "edit": {"text": f"a better answer about {domain}"},
                "dwell": {"value": round(rng.uniform(1, 60), 1)},
            }.get(kind, {})
            batch.append(client.feedback(turn, kind, **extra))
        if len(batch) >= 200 or i == interactions - 1:
            result = client.send(batch)
            if i == interactions - 1:
                result_retry = client.send(batch[:5])  # a retry: same event ids, archived again
                sent.accepted += result_retry.accepted
            sent.accepted += result.accepted
            sent.rejected += result.rejected
            on_progress(i + 1)
            batch = []
    for body, content_type in malformed_bodies(client.app_id):
        result = client.send_raw(body, content_type)
        sent.accepted += result.accepted
        sent.rejected += result.rejected
    return sent


def start_worker(settings: Settings) -> subprocess.Popen:
    """`feedloop worker` beside the demo, with the demo's settings and short windows."""
    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(settings.data_dir), "FEEDLOOP_BROKER": settings.broker,
           "FEEDLOOP_EMBEDDED_BROKER_PORT": str(settings.embedded_broker_port),
           "FEEDLOOP_LOG_LEVEL": "warning", "FEEDLOOP_LOG_FORMAT": "json"}
    if settings.database_url:
        env["FEEDLOOP_DATABASE_URL"] = settings.database_url
    for name, value in DEMO_PIPELINE.items():
        env.setdefault(f"FEEDLOOP_PIPELINE__{name}", value)
    log_file = open(settings.data_dir / "worker.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop_worker(worker: subprocess.Popen) -> None:
    if worker.poll() is None:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()


def last_segment_id(sessions) -> int:
    with sessions() as session:
        return session.scalar(select(func.max(ArchiveSegment.id))) or 0


def archived_counts(sessions, archive_dir, after_segment: int) -> Counter:
    """Records archived per topic since ``after_segment``; on the events topic only the apps'
    events count, not the ticks and triggers the pipeline worker writes there itself."""
    counts: Counter = Counter()
    with sessions() as session:
        for segment in session.scalars(select(ArchiveSegment).where(ArchiveSegment.id > after_segment)):
            if segment.topic != EVENTS.name:
                counts[segment.topic] += segment.event_count
                continue
            counts[segment.topic] += sum(
                1 for r in read_segment(archive_dir / segment.path) if r.key not in PIPELINE_RECORD_KEYS
            )
    return counts


async def _demo(settings: Settings, interactions: int, keep_running: bool, console: Console) -> int:
    started = time.monotonic()
    broker = worker = None
    if settings.uses_embedded_broker:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker(settings.embedded_broker_port, settings.data_dir / "broker.log")
        broker.start()
    try:
        migrations.upgrade(settings.store_url)
        sessions = make_sessionmaker(make_engine(settings.store_url))
        before = last_segment_id(sessions)
        before_examples = checkpointed_stats(sessions, PIPELINE_CONSUMER)[0]["examples"]
        archiver = await build_archiver(settings)
        archive_task = asyncio.create_task(archiver.run())
        server = gateway_server(settings)
        gateway_task = asyncio.create_task(server.serve())
        await wait_started(server, gateway_task)
        worker = start_worker(settings)
        api_key = settings.api_keys[DEMO_APP].get_secret_value()
        base_url = f"http://{settings.gateway_host}:{settings.gateway_port}"

        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=console,
        ) as progress:  # fmt: skip
            task = progress.add_task("simulated chat app", total=interactions, rate="")

            def on_progress(done: int) -> None:
                rate = done / max(time.monotonic() - started, 1e-6)
                progress.update(task, completed=done, rate=f"{rate:,.0f} interactions/s")

            with FeedloopClient(base_url, api_key=api_key, app_id=DEMO_APP) as client:
                sent = await asyncio.to_thread(simulate_app, client, interactions, 7, on_progress)

            expected = sent.accepted + sent.rejected
            wait = progress.add_task("archiving", total=expected, rate="")
            deadline = time.monotonic() + 120
            while True:
                counts = archived_counts(sessions, settings.archive_dir, before)
                done = counts["feedloop.events.v1"] + counts["feedloop.deadletter.v1"]
                progress.update(wait, completed=min(done, expected))
                if done >= expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)

            # The pipeline: every interaction becomes an example once its window closes, and
            # every training record lands in a batch (the worker's ticks move event time on).
            curate = progress.add_task("pipeline examples", total=interactions, rate="")
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and worker.poll() is None:
                counts, pii, buffered = checkpointed_stats(sessions, PIPELINE_CONSUMER)
                progress.update(curate, completed=min(counts["examples"] - before_examples, interactions))
                if counts["examples"] - before_examples >= interactions and buffered == 0:
                    break
                await asyncio.sleep(0.5)

        if keep_running:
            console.print(f"gateway on {base_url} (app '{DEMO_APP}', key {api_key}); Ctrl-C stops")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass
        await asyncio.to_thread(stop_worker, worker)
        server.should_exit = True
        archiver.stop()
        await asyncio.gather(gateway_task, archive_task)

        counts = archived_counts(sessions, settings.archive_dir, before)
        with sessions() as session:
            verification = verify_archive(session, settings.archive_dir)
        lost = sent.accepted - counts["feedloop.events.v1"]
        stats, pii, _ = checkpointed_stats(sessions, PIPELINE_CONSUMER)
        with sessions() as session:
            batches = session.scalar(select(func.count()).select_from(Batch))
        records = {k.removeprefix("records_"): v for k, v in sorted(stats.items()) if k.startswith("records_")}
        unjoined = {k: stats[k] for k in ("duplicate_event", "orphan_feedback", "late_feedback",
                                          "outside_implicit_window") if stats[k]}
        table = Table(title="feedloop demo")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for name, value in [
            ("events accepted by the gateway", sent.accepted),
            ("events rejected (dead-lettered)", sent.rejected),
            ("events archived", counts["feedloop.events.v1"]),
            ("dead letters archived", counts["feedloop.deadletter.v1"]),
            ("events lost", lost),
            ("archive verified", "yes" if verification.ok else f"NO: {verification.problems[:3]}"),
            ("annotated examples", stats["examples"]),
            ("training records", ", ".join(f"{k} {v}" for k, v in records.items()) or "0"),
            ("batches written", f"{batches} under {settings.batches_dir}"),
            ("PII replaced", ", ".join(f"{k} {v}" for k, v in sorted(pii.items())) or "0"),
            ("not joined (dead-lettered by the pipeline)", ", ".join(f"{k} {v}" for k, v in unjoined.items()) or "0"),
            ("archive directory", str(settings.archive_dir)),
            ("wall seconds", f"{time.monotonic() - started:.1f}"),
        ]:
            table.add_row(name, str(value))
        console.print(table)
        complete = stats["examples"] - before_examples >= interactions
        if not complete:
            console.print(f"the pipeline did not finish; see {settings.data_dir / 'worker.log'}")
        return 0 if lost == 0 and verification.ok and complete and counts["feedloop.deadletter.v1"] >= sent.rejected else 1
    finally:
        if worker is not None:
            stop_worker(worker)
        if broker is not None:
            broker.stop()


def run_demo(settings: Settings, interactions: int, keep_running: bool = False) -> int:
    if DEMO_APP not in settings.api_keys:
        keys = {**settings.api_keys, DEMO_APP: SecretStr(secrets.token_urlsafe(16))}
        settings = settings.model_copy(update={"api_keys": keys})
    try:
        return asyncio.run(_demo(settings, interactions, keep_running, Console(stderr=True)))
    except KeyboardInterrupt:
        return 130
