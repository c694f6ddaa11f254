"""`feedloop demo` (what `make run` runs): the system on embedded defaults with simulated traffic.

Starts the embedded broker, the store, the archiver and the gateway in one process, has a
simulated chat app post interactions, feedback and some deliberately malformed input through
the Python client, waits until everything is archived, verifies the archive and prints a
report. The stages that later issues add (pipeline, learners, trainer, serving) join here.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
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
from app.runtime import build_archiver, gateway_server, wait_started
from app.settings import Settings
from app.store import ArchiveSegment, make_engine, make_sessionmaker
from streams.archive import verify_archive

log = structlog.get_logger(__name__)

DEMO_APP = "demo-chat"
DOMAINS = ("general", "code", "math", "travel")
COHORTS = ("a", "a", "a", "b", "b", "minority")
FEEDBACK_KINDS = ("thumbs", "rating", "edit", "regenerate", "copy", "abandon", "dwell", "rephrase")


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
            prompt=[{"role": "user", "content": f"a {domain} question number {i}"}],
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


def archived_counts(sessions) -> Counter:
    with sessions() as session:
        rows = session.execute(
            select(ArchiveSegment.topic, func.sum(ArchiveSegment.event_count)).group_by(ArchiveSegment.topic)
        )
        return Counter({topic: int(count) for topic, count in rows})


async def _demo(settings: Settings, interactions: int, keep_running: bool, console: Console) -> int:
    started = time.monotonic()
    broker = None
    if settings.uses_embedded_broker:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker(settings.embedded_broker_port, settings.data_dir / "broker.log")
        broker.start()
    try:
        migrations.upgrade(settings.store_url)
        sessions = make_sessionmaker(make_engine(settings.store_url))
        before = archived_counts(sessions)
        archiver = await build_archiver(settings)
        archive_task = asyncio.create_task(archiver.run())
        server = gateway_server(settings)
        gateway_task = asyncio.create_task(server.serve())
        await wait_started(server, gateway_task)
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
                counts = archived_counts(sessions) - before
                done = counts["feedloop.events.v1"] + counts["feedloop.deadletter.v1"]
                progress.update(wait, completed=min(done, expected))
                if done >= expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)

        if keep_running:
            console.print(f"gateway on {base_url} (app '{DEMO_APP}', key {api_key}); Ctrl-C stops")
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                pass
        server.should_exit = True
        archiver.stop()
        await asyncio.gather(gateway_task, archive_task)

        counts = archived_counts(sessions) - before
        with sessions() as session:
            verification = verify_archive(session, settings.archive_dir)
        lost = sent.accepted - counts["feedloop.events.v1"]
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
            ("archive directory", str(settings.archive_dir)),
            ("wall seconds", f"{time.monotonic() - started:.1f}"),
        ]:
            table.add_row(name, str(value))
        console.print(table)
        return 0 if lost == 0 and verification.ok and counts["feedloop.deadletter.v1"] >= sent.rejected else 1
    finally:
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
