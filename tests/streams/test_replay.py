"""Replay sources (a file of bare events is partitioned like Kafka would and windowed by event
time), the end of a finished log (every window closes), and an import's event-time order."""

import gzip
import json
import random
from datetime import datetime, timedelta, timezone

from aiokafka.partitioner import DefaultPartitioner

from streams.config import PipelineSettings
from streams.contract import gateway_session_id
from streams.importer import for_run, import_steps, in_event_time
from streams.objects import ObjectStore
from streams.pii import Scrubber
from streams.pipeline import PipelineSet
from streams.pseudonyms import KeyStore, Pseudonymizer
from streams.replay import TimeRange, file_records, replay_offline
from streams.training_data import BatchFolder, read_batch
from tests.factories import feedback, interaction


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


def test_bare_feedback_without_a_session_lands_beside_the_interaction_the_gateway_recorded(tmp_path):
    turns = [interaction(interaction_id=f"{n:04x}.0", session_id=gateway_session_id(f"{n:04x}.0")) for n in range(8)]
    signals = [{k: v for k, v in feedback(t, "copy").items() if k != "session_id"} for t in turns]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in [*turns, *signals]))
    partition_of = {}
    for record in file_records(path, 4, TimeRange()):
        partition_of.setdefault(json.loads(record.value)["interaction_id"], set()).add(record.partition)
    assert all(len(partitions) == 1 for partitions in partition_of.values()) and len(partition_of) == 8
    assert len(set().union(*partition_of.values())) > 1, "the sessions spread over partitions"


def test_the_time_window_applies_to_bare_events_occurred_at(tmp_path):
    events = [interaction(occurred_at=f"2026-11-21T10:{m:02d}:00+00:00") for m in range(12)]
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    window = TimeRange.parse("2026-11-21T10:03:00+00:00", "2026-11-21T10:07:00+00:00")
    kept = sorted(json.loads(r.value)["occurred_at"] for r in file_records(path, 4, window))
    assert kept == [f"2026-11-21T10:0{m}:00+00:00" for m in range(3, 7)]


# --- the end of the input -------------------------------------------------------------------

T0 = datetime(2026, 10, 1, 9, 0, tzinfo=timezone.utc)
WINDOW_S = 600
CONFIG = PipelineSettings(explicit_window_s=WINDOW_S, implicit_window_s=60, allowed_lateness_s=0, batch_size=16,
                          batch_max_wait_s=3600, replay_fraction=0)  # fmt: skip


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def conversation_log(count: int) -> list[dict]:
    """One interaction a minute with a thumbs up 30 s later; the last ten minutes' windows are
    still open when the log ends. Then feedback whose interaction never comes."""
    events = []
    for i in range(count):
        turn = interaction(occurred_at=at(60 * i), user_id=f"user-{i % 7}",
                           prompt=[{"role": "user", "content": f"question {i}: {uuid_words(i)}"}])
        events += [turn, feedback(turn, "thumbs", occurred_at=at(60 * i + 30))]
    events.append(feedback({"interaction_id": "never-sent", "session_id": "s-orphan"}, "thumbs",
                           occurred_at=at(60 * count)))
    return events


def uuid_words(i: int) -> str:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    rng = random.Random(i)
    return " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(8))  # no near-duplicates


def write_log(path, events) -> None:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))


def pipelines(tmp_path) -> PipelineSet:
    return PipelineSet(CONFIG, Scrubber(), Pseudonymizer(KeyStore.in_directory(tmp_path / "keys")))


def store(data_dir) -> ObjectStore:
    return ObjectStore(data_dir.as_uri())


def batch_records(objects, summary) -> list:
    return [r for b in summary.batches for rs in read_batch(BatchFolder(objects, b.path))[1].values() for r in rs]


def test_offline_replay_of_a_finished_log_emits_one_example_per_interaction(tmp_path, sessions):
    path = tmp_path / "log.jsonl"
    write_log(path, conversation_log(40))
    kept = pipelines(tmp_path)
    open_ = replay_offline(file_records(path, 4, TimeRange()), kept, objects=store(tmp_path / "open"),
                           sessions=sessions, close_at_end=False)
    # Stopping where the input stops leaves the last windows open, and says so.
    assert open_.examples < 40 and open_.open_at_end == 40 - open_.examples
    assert open_.orphans_at_end == 1 and open_.buffered_at_end > 0

    closed = pipelines(tmp_path)
    done = replay_offline(file_records(path, 4, TimeRange()), closed, objects=store(tmp_path / "closed"),
                          sessions=sessions)
    assert done.examples == 40 and done.closed_at_end == 40 - open_.examples
    assert done.dead_letters == {"orphan_feedback": 1}
    assert (done.open_at_end, done.orphans_at_end, done.buffered_at_end) == (0, 0, 0)
    # Every training record the examples made is in a batch: thumbs up gives a label and an SFT record each.
    records = batch_records(store(tmp_path / "closed"), done)
    assert len(records) == sum(b.example_count for b in done.batches) == 80
    assert {r.example_id.split(":")[0] for r in records} == {
        json.loads(r.value)["interaction_id"] for r in file_records(path, 4, TimeRange())
        if json.loads(r.value)["type"] == "interaction"
    }


def test_windows_closed_at_the_end_close_at_their_own_closing_time(tmp_path):
    events = conversation_log(12)
    run = pipelines(tmp_path)
    for offset, event in enumerate(events):
        run.process(0, offset, json.dumps(event).encode())
    finished = run.finish()
    assert finished.examples, "nothing was left open: nothing was tested"
    for example in finished.examples:
        assert example.closed_at == example.occurred_at + timedelta(seconds=WINDOW_S)
    assert sum(len(b.records) for b in finished.batches) > 0 and not run.partitions[0].curator.buffer
    assert run.finish().examples == []  # nothing left to close


def test_an_import_in_event_time_gives_the_batches_of_a_replay_of_the_ordered_log(tmp_path, sessions):
    """The import sorts each partition by occurred_at: a shuffled log imports like the ordered one replays."""
    events = conversation_log(40)
    ordered, shuffled = tmp_path / "ordered.jsonl", tmp_path / "shuffled.jsonl"
    write_log(ordered, events)
    write_log(shuffled, random.Random(7).sample(events, len(events)))
    # Replayed in file order, the shuffled log loses feedback: behind event time when it comes.
    as_is = replay_offline(file_records(shuffled, 4, TimeRange()), pipelines(tmp_path), objects=store(tmp_path / "s"),
                           sessions=sessions)
    assert as_is.dead_letters.get("late_feedback", 0) > 0

    replayed = replay_offline(file_records(ordered, 4, TimeRange()), pipelines(tmp_path), objects=store(tmp_path / "r"),
                              sessions=sessions)
    steps = list(import_steps(in_event_time(file_records(shuffled, 4, TimeRange())), pipelines(tmp_path), "run-1"))
    cuts = [cut for _, outputs in steps for cut in outputs.batches]
    letters = [d for _, outputs in steps for d in outputs.dead_letters]
    assert sum(len(outputs.examples) for _, outputs in steps) == 40
    assert [d.reason for d in letters] == ["orphan_feedback"] and letters[0].dead_letter_id.startswith("run-1.p")
    assert [c.batch_id for c in cuts] == [f"run-1.{b.batch_id}" for b in replayed.batches]
    for cut, batch in zip(cuts, replayed.batches):
        _, files = read_batch(BatchFolder(store(tmp_path / "r"), batch.path))
        assert sorted(r.example_id for r in cut.records) == sorted(r.example_id for rs in files.values() for r in rs)
        assert cut.trigger == batch.trigger and cut.event_time == batch.occurred_at


def test_an_imports_ids_carry_its_run(tmp_path):
    run = pipelines(tmp_path)
    out = run.process(0, 0, b"{not json")
    out.batches = []
    renamed = for_run("run-2", out)
    assert [d.dead_letter_id for d in renamed.dead_letters] == ["run-2.p0-0-invalid_json"]
