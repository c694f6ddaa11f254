"""`feedloop import`: a month-old log into the live loop while live traffic flows.

A running worker ticks its partitions with wall-clock time, so these events sent through the
gateway would all be late. Imported, every feedback joins its interaction, the examples reach
feedloop.examples.v1, the batches are written, recorded and announced, and they are the
batches an offline replay of the same file cuts. The live worker never sees an imported record.
"""

import asyncio
import gzip
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from streams.contract import BatchEmitted
from streams.pseudonyms import Pseudonymizer, user_identity
from streams.store import Batch
from streams.topics import CONTROL, DEAD_LETTER, EXAMPLES, IMPORTS
from tests.conftest import archived_records, make_settings, start_stack, wait_until_archived
from tests.factories import feedback, interaction
from tests.integration.test_pipeline_live import PIPELINE_ENV, _checkpoints, post, start_worker, stop_worker, wait_for

MONTH_AGO = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=30)
CONVERSATIONS = 120
ERASED = "hist-user-3"


def history() -> list[dict]:
    """Conversations a month old, one every 15 s: each interaction gets an edit and a thumbs up
    20 and 40 s later. In event-time order, as a log would be kept."""
    events = []
    for i in range(CONVERSATIONS):
        start = MONTH_AGO + timedelta(seconds=15 * i)
        turn = interaction(occurred_at=start.isoformat(), user_id=f"hist-user-{i % 7}",
                           training_consent=i % 11 != 0, response=f"draft answer {i}",
                           prompt=[{"role": "user", "content": f"old question {i} on subject {i * 31} ({i % 5})"}],
                           context={"domain": ["code", "math", "units"][i % 3], "cohort": "ab"[i % 2]})
        events += [turn,
                   feedback(turn, "edit", occurred_at=(start + timedelta(seconds=20)).isoformat(),
                            text=f"a corrected answer {i}"),
                   feedback(turn, "thumbs", occurred_at=(start + timedelta(seconds=40)).isoformat())]
    return sorted(events, key=lambda e: e["occurred_at"])


def live_turns(count: int, start: int) -> list[dict]:
    now = datetime.now(timezone.utc)
    events = []
    for i in range(start, start + count):
        turn = interaction(occurred_at=now.isoformat(), user_id=f"live-user-{i % 5}",
                           prompt=[{"role": "user", "content": f"live question {i}"}])
        events += [turn, feedback(turn, "thumbs", occurred_at=now.isoformat())]
    return events


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **PIPELINE_ENV, "FEEDLOOP_EMBEDDED_BROKER_PORT": str(settings.embedded_broker_port),
           "FEEDLOOP_DATA_DIR": str(settings.data_dir), "FEEDLOOP_LOG_LEVEL": "warning"}
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def manifests(batches_dir: Path, prefix: str = "") -> dict[str, dict]:
    """Each batch's manifest without its id, by its id less ``prefix``."""
    found = {}
    for directory in batches_dir.iterdir():
        if directory.name.startswith(prefix) and (directory / "manifest.json").exists():
            manifest = json.loads((directory / "manifest.json").read_text())
            assert manifest.pop("batch_id") == directory.name
            found[directory.name.removeprefix(prefix)] = manifest
    return found


def words(text: str) -> str:
    """The CLI's output with its line wrapping undone."""
    return " ".join(text.split())


def live_records(settings) -> int:
    """User events the live worker's checkpoints hold (records less its own ticks)."""
    return sum(p.stats.counts["records"] - p.stats.counts["ticks"] for p in _checkpoints(settings))


def with_header(run: str):
    return lambda record: record.headers.get("feedloop-import-run") == run.encode()


async def test_a_month_old_log_imported_during_live_traffic_joins_every_feedback(tmp_path, own_broker):
    settings = make_settings(tmp_path, own_broker.port)
    log = history()
    path = tmp_path / "history.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(e) + "\n" for e in log)
    apps = {e["app_id"] for e in log if e["type"] == "interaction" and e["user_id"] == ERASED}
    for app_id in apps:  # erased after their events: dropped
        Pseudonymizer(settings.key_store()).erase(user_identity(app_id, ERASED))
    erased_turns = {e["interaction_id"] for e in log if e["type"] == "interaction" and e["user_id"] == ERASED}
    erased_events = {e["event_id"] for e in log if e["interaction_id"] in erased_turns}
    kept = {e["event_id"] for e in log} - erased_events
    kept_turns = [e for e in log if e["type"] == "interaction" and e["interaction_id"] not in erased_turns]

    stack, stop = await start_stack(settings)
    worker = start_worker(settings)
    live_sent = 0
    flowing = True

    async def live_traffic() -> None:
        nonlocal live_sent
        while flowing:
            events = live_turns(3, live_sent)
            await post(stack.base_url, events)
            live_sent += len(events)
            await asyncio.sleep(0.3)

    traffic = asyncio.create_task(live_traffic())
    try:
        # The worker is running and ticking with live events when the import starts.
        await wait_for(lambda: sum(p.stats.counts["ticks"] + p.stats.counts["records"] for p in _checkpoints(settings))
                       > 20, 90, "the live worker's first records")  # fmt: skip
        done = await asyncio.to_thread(cli, settings, "import", str(path))
        (run,) = [d.name for d in (settings.data_dir / "imports").iterdir()]
        assert run in words(done.stderr) and EXAMPLES.name in words(done.stderr)
        summary = json.loads((settings.data_dir / "imports" / run / "progress.json").read_text())["summary"]
        assert summary["records"] == len(log) and summary["examples"] == len(kept_turns)

        # Sent again: recognized, nothing goes out twice.
        again = await asyncio.to_thread(cli, settings, "import", str(path))
        assert "already ran to the end" in words(again.stderr)
        producer = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers)
        await producer.start()
        for partition in range(settings.topic_partitions):  # behind anything the second run could have sent
            await producer.send_and_wait(IMPORTS.name, b"{}", partition=partition,
                                         headers=[("feedloop-import-run", b"end-marker")])
        await producer.stop()
        await wait_until_archived(stack, IMPORTS.name, settings.topic_partitions, timeout_s=60,
                                  where=with_header("end-marker"))
        raw = archived_records(stack, IMPORTS.name)
        assert len([r for r in raw if with_header(run)(r)]) == len(log)

        examples = await wait_until_archived(stack, EXAMPLES.name, len(kept_turns), timeout_s=60,
                                             where=with_header(run))
        emitted = await wait_until_archived(stack, CONTROL.name, len(summary["batches"]), timeout_s=60,
                                            where=with_header(run))
        letters = await wait_until_archived(stack, DEAD_LETTER.name, len(erased_events), timeout_s=60,
                                            where=with_header(run))
        flowing = False
        await traffic
        await wait_for(lambda: live_records(settings) >= live_sent, 90, "every live event in the worker's checkpoints")
    finally:
        flowing = False
        if not traffic.done():
            traffic.cancel()
        stop_worker(worker)
        await stop()

    # Every feedback joined its interaction: no late (or any other) dead letter but the erased user's.
    # (Their feedback cannot be told from the user's: with the interaction dropped, it is an orphan.)
    reasons = {json.loads(r.value)["event_id"]: json.loads(r.value)["reason"] for r in letters}
    assert reasons == {e["event_id"]: "user_erased" if e["type"] == "interaction" else "orphan_feedback"
                       for e in log if e["event_id"] in erased_events}  # fmt: skip
    joined = [json.loads(r.value) for r in examples]
    assert {i for e in joined for i in e["event_ids"]} == kept
    assert all(sorted(e["feedback_kinds"]) == ["edit", "thumbs"] for e in joined)
    assert sorted(e["example_id"] for e in joined) == sorted(t["interaction_id"] for t in kept_turns)

    # The batches reached the trainer: files, store rows and batch_emitted events, all the run's.
    announced = {BatchEmitted.model_validate_json(r.value).batch_id for r in emitted}
    with stack.sessions() as session:
        rows = {b.batch_id for b in session.scalars(select(Batch)) if b.batch_id.startswith(f"{run}.")}
    imported = manifests(settings.batches_dir, f"{run}.")
    assert announced == rows == {f"{run}.{b}" for b in imported} and len(imported) >= 4

    # The live worker saw only the live events: the import moved none of its partitions.
    assert live_records(settings) == live_sent
    assert not any(p.stats.counts["late_feedback"] for p in _checkpoints(settings))

    # The same batches as an offline replay of the file, and as a replay of the run from the archive.
    cli(settings, "replay", "--offline", "--source", str(path), "--data-dir", str(tmp_path / "replayed"))
    assert manifests(tmp_path / "replayed" / "batches") == imported
    rebuilt = cli(settings, "replay", "--offline", "--import", run, "--data-dir", str(tmp_path / "rebuilt"))
    assert "closed at the end of the input" in words(rebuilt.stderr)
    assert manifests(tmp_path / "rebuilt" / "batches", f"{run}.") == imported
