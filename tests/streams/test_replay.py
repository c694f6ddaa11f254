"""Replay sources: a file of bare events is partitioned like Kafka would and windowed by event time."""

import gzip
import json

from aiokafka.partitioner import DefaultPartitioner

from streams.replay import TimeRange, file_records
from tests.factories import interaction


def test_bare_events_land_on_their_sessions_partition_in_file_order(tmp_path):
    events = [interaction(occurred_at=f"2026-11-21T10:{m:02d}:00+00:00") for m in range(12)]
    path = tmp_path / "events.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.writelines(json.dumps(e) + "\n" for e in events)
    records = list(file_records(path, 4, TimeRange()))
    partitioner = DefaultPartitioner()
    for record in records:
        event = json.loads(record.value)
        assert record.partition == partitioner(event["session_id"].encode(), [0, 1, 2, 3], [0, 1, 2, 3])
    per_partition = {}
    for record in records:  # offsets count up within a partition, in file order
        per_partition.setdefault(record.partition, []).append(record.offset)
    assert all(offsets == list(range(len(offsets))) for offsets in per_partition.values())
    assert len(records) == 12


def test_the_time_window_applies_to_bare_events_occurred_at(tmp_path):
    events = [interaction(occurred_at=f"2026-11-21T10:{m:02d}:00+00:00") for m in range(12)]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    window = TimeRange.parse("2026-11-21T10:03:00+00:00", "2026-11-21T10:07:00+00:00")
    kept = sorted(json.loads(r.value)["occurred_at"] for r in file_records(path, 4, window))
    assert kept == [f"2026-11-21T10:0{m}:00+00:00" for m in range(3, 7)]
