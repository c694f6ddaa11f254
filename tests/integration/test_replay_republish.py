"""`feedloop replay --republish` on the archive: the archived events of a time window go back onto the
events topic, byte for byte, with their keys and headers.

Real parts: the Tansu broker, the archiver, SQLite, the CLI in its own process. The archiver
consumes the events topic, so what is republished is archived a second time: the archive shows
what went back.
"""

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

from streams import kafka
from streams.topics import EVENTS
from tests.conftest import archived_records, wait_until_archived
from tests.factories import interaction

# Broker timestamps set by the producer, long before any other test's records: the window
# selects by them (the time the broker received a record, not the event's occurred_at).
T0 = datetime(2021, 3, 1, 12, 0, tzinfo=timezone.utc)


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


async def test_republish_sends_the_archived_events_of_the_window_back_to_the_events_topic(stack):
    settings = stack.settings
    events = [interaction(occurred_at=(T0 + timedelta(minutes=m)).isoformat()) for m in range(10)]
    ids = {e["event_id"] for e in events}
    producer = kafka.producer(settings.kafka)
    await producer.start()
    try:
        for minute, event in enumerate(events):
            await producer.send_and_wait(EVENTS.name, json.dumps(event).encode(), key=event["session_id"].encode(),
                                         headers=[("app_id", b"app-a")],
                                         timestamp_ms=ms(T0 + timedelta(minutes=minute)))
    finally:
        await producer.stop()

    def ours(record) -> bool:
        return json.loads(record.value)["event_id"] in ids

    originals = await wait_until_archived(stack, EVENTS.name, 10, where=ours)
    assert sorted(r.timestamp_ms for r in originals) == [ms(T0 + timedelta(minutes=m)) for m in range(10)]

    # Since is inclusive, until exclusive: minutes 3, 4, 5 and 6.
    since, until = (T0 + timedelta(minutes=3)).isoformat(), (T0 + timedelta(minutes=7)).isoformat()
    env = {**os.environ, "FEEDLOOP_EMBEDDED_BROKER_PORT": str(settings.embedded_broker_port),
           "FEEDLOOP_DATA_DIR": str(settings.data_dir)}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "app.cli", "replay", "--republish", "--since", since, "--until", until],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"republished 4 records to {EVENTS.name}" in done.stderr  # the summary goes to stderr

    await wait_until_archived(stack, EVENTS.name, 14, where=ours)
    await asyncio.sleep(2)  # more copies than asked for, if there were any, would be archived meanwhile
    records = [r for r in archived_records(stack, EVENTS.name) if ours(r)]
    copies = [r for r in records if r.timestamp_ms > ms(T0 + timedelta(days=1))]  # stamped when sent: now
    window = range(ms(T0 + timedelta(minutes=3)), ms(T0 + timedelta(minutes=7)))
    expected = [r for r in originals if r.timestamp_ms in window]
    assert len(records) == 14 and len(copies) == 4 and len(expected) == 4

    def by_partition(rs) -> dict[int, list[tuple]]:
        """Per partition, in offset order: what a consumer of the topic reads."""
        out: dict[int, list[tuple]] = {}
        for r in sorted(rs, key=lambda r: (r.partition, r.offset)):
            out.setdefault(r.partition, []).append((r.key, r.value, r.headers))
        return out

    # The window's records, byte for byte, with key and headers, on their partition, in their order.
    assert by_partition(copies) == by_partition(expected)
    last = {p: max(r.offset for r in originals if r.partition == p) for p in by_partition(copies)}
    assert all(r.offset > last[r.partition] for r in copies), "appended after the originals"
