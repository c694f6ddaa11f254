"""`feedloop export`: curated batches become a Hugging Face dataset, without the erased and the opted-out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import datasets
import pytest

import migrations
from streams.archive import ArchivedRecord, encode_record, segment_path, write_segment
from streams.batches import publish_batch
from streams.contract import Message
from streams.curator import CutBatch
from streams.export import event_facts, export_dataset
from streams.objects import ObjectStore
from streams.pipeline import pseudonyms_erased
from streams.pseudonyms import KeyStore, Pseudonymizer, user_identity
from streams.store import ArchiveSegment, make_engine, make_sessionmaker
from streams.topics import EVENTS
from streams.training_data import (
    HELDOUT,
    BatchFolder,
    LabelRecord,
    PreferenceRecord,
    SftRecord,
    read_batch,
    write_batch,
)
from tests.factories import feedback, interaction

EXPORTED_AT = datetime(2026, 12, 3, 7, 0, tzinfo=UTC)


def _prompt(text: str) -> list[Message]:
    return [Message(role="user", content=text)]


def _records(events: dict[str, dict]) -> list:
    """One record per signal and user, each derived from that user's interaction."""
    records = []
    for name, event in events.items():
        ids = [event["event_id"]]
        records += [
            SftRecord(example_id=f"{name}:sft", cohort="a", domain="code", source="edit", event_ids=ids,
                      messages=[*_prompt(f"q {name}"), Message(role="assistant", content=f"a {name}")]),
            PreferenceRecord(example_id=f"{name}:pair", cohort="b", domain="code", source="regenerate",
                             event_ids=ids, prompt=_prompt(f"q {name}"), chosen="good", rejected="bad"),
            LabelRecord(example_id=f"{name}:label", cohort="a", domain="math", source="thumbs", event_ids=ids,
                        prompt=_prompt(f"q {name}"), completion="c", desirable=True),
        ]
    return records


def _archived(events: list[dict]) -> list[ArchivedRecord]:
    return [ArchivedRecord(EVENTS.name, 0, offset, 0, None, json.dumps(e).encode(), {})
            for offset, e in enumerate(events)]


@pytest.fixture
def world(tmp_path: Path):
    events = {
        "anna": interaction(user_id="anna"),
        "ben": interaction(user_id="ben"),
        "carl": interaction(user_id="carl", training_consent=False),
    }
    directory = BatchFolder.of(ObjectStore(tmp_path.as_uri()), "batch-p0-000001")
    write_batch(directory, batch_id="batch-p0-000001", trigger="size", event_time="2026-11-21T10:00:00+00:00",
                records=_records(events), loss_weights={"explicit": 1.0})
    facts = event_facts(_archived(list(events.values())), {e["event_id"] for e in events.values()})
    return tmp_path, directory, facts


def _load(out: Path, signal: str) -> list[dict]:
    return list(datasets.load_dataset("parquet", data_files=str(out / f"{signal}.parquet"), split="train"))


def test_rows_are_the_batch_records_without_the_opted_out_or_the_erased(world) -> None:
    tmp_path, directory, facts = world
    pseudonyms = Pseudonymizer(KeyStore.in_directory(tmp_path / "keys"))
    for user in ("anna", "ben", "carl"):
        pseudonyms.pseudonym(user_identity("app-a", user))
    pseudonyms.erase(user_identity("app-a", "ben"))  # after the batch was cut

    out = tmp_path / "dataset"
    summary = export_dataset(out, [("batch-p0-000001", directory)], facts, pseudonyms_erased(pseudonyms),
                             exported_at=EXPORTED_AT)

    _, records = read_batch(directory)
    for signal, items in records.items():
        if signal.startswith(HELDOUT):
            assert items == [] and not (out / f"{signal}.parquet").exists()
            continue
        expected = [{"batch_id": "batch-p0-000001", **r.model_dump(mode="json")}
                    for r in items if r.example_id.startswith("anna:")]
        assert _load(out, signal) == expected
    assert summary.left_out == {"no_consent": 3, "user_erased": 3}


def test_a_record_whose_source_event_is_not_archived_is_left_out(world) -> None:
    tmp_path, directory, facts = world
    anna_only = {k: v for k, v in facts.items() if v.user == user_identity("app-a", "anna")}
    summary = export_dataset(tmp_path / "out", [("batch-p0-000001", directory)], anna_only,
                             lambda user, at: False, exported_at=EXPORTED_AT)
    assert summary.rows == {"sft": 1, "pairs": 1, "labels": 1}
    assert summary.left_out == {"source_event_not_archived": 6}


def test_the_card_names_counts_and_loads_by_config(world) -> None:
    tmp_path, directory, facts = world
    out = tmp_path / "dataset"
    export_dataset(out, [("batch-p0-000001", directory)], facts, lambda user, at: False, exported_at=EXPORTED_AT)

    card = (out / "README.md").read_text()
    assert "| a/code | 2 |" in card  # anna's and ben's SFT records; carl withheld consent
    assert "| b/code | 2 |" in card
    assert "| a/math | 2 |" in card
    assert "| sft | 2 |" in card and "| pairs | 2 |" in card and "| labels | 2 |" in card
    assert "| edit | 2 |" in card
    assert "| no_consent | 3 |" in card
    assert "batch-p0-000001" in card and EXPORTED_AT.isoformat() in card
    by_config = datasets.load_dataset(str(out), "pairs", split="train")
    assert sorted(by_config["example_id"]) == ["anna:pair", "ben:pair"]


def test_a_batchs_held_out_part_is_its_own_config(world) -> None:
    tmp_path, _, facts = world
    anna = [r for r in _records({"anna": interaction(user_id="anna")}) if isinstance(r, PreferenceRecord)]
    ids = {"event_ids": [next(iter(facts))]}  # an archived event of anna's
    held = [anna[0].model_copy(update={**ids, "example_id": "held:pair"})]
    directory = BatchFolder.of(ObjectStore(tmp_path.as_uri()), "batch-p0-000002")
    write_batch(directory, batch_id="batch-p0-000002", trigger="size", event_time="2026-11-21T10:00:00+00:00",
                records=[], heldout=held, loss_weights={"explicit": 1.0})
    out = tmp_path / "dataset"
    summary = export_dataset(out, [("batch-p0-000002", directory)], facts, lambda user, at: False,
                             exported_at=EXPORTED_AT)  # fmt: skip
    assert summary.rows == {"heldout_pairs": 1}
    assert [row["example_id"] for row in datasets.load_dataset(str(out), "heldout_pairs", split="train")] == ["held:pair"]


def _archive(sessions, objects: ObjectStore, events: list[dict]) -> None:
    lines = [encode_record(EVENTS.name, 0, offset, 0, None, json.dumps(e).encode()) for offset, e in enumerate(events)]
    relative = segment_path("test", EVENTS.name, 0, 0)
    digest, size = write_segment(objects, relative, lines)
    with sessions.begin() as session:
        session.add(ArchiveSegment(cluster_id="test", topic=EVENTS.name, partition=0, first_offset=0,
                                   last_offset=len(lines) - 1, event_count=len(lines), path=str(relative),
                                   sha256=digest, size_bytes=size, first_timestamp_ms=0, last_timestamp_ms=0))


def _feedloop(data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEEDLOOP_DATA_DIR": str(data), "FEEDLOOP_LOG_FORMAT": "json"}
    env.pop("FEEDLOOP_DATABASE_URL", None)
    env.pop("FEEDLOOP_KEY_DIR", None)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=120)


def test_feedloop_export_writes_published_batches_without_an_erased_user(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    store_url = f"sqlite:///{data / 'feedloop.db'}"
    migrations.upgrade(store_url)
    sessions = make_sessionmaker(make_engine(store_url))
    events = {"anna": interaction(user_id="anna"), "ben": interaction(user_id="ben")}
    _archive(sessions, ObjectStore(data.as_uri()), list(events.values()))
    pseudonyms = Pseudonymizer(KeyStore.in_directory(data / "keys"))
    for name in events:
        pseudonyms.pseudonym(user_identity("app-a", name))
    cut = CutBatch(batch_id="batch-p0-000001", trigger="size", event_time=datetime(2026, 11, 21, 10, tzinfo=UTC),
                   records=_records(events), capped=0, erased=0, loss_weights={"explicit": 1.0})
    publish_batch(cut, objects=ObjectStore(data.as_uri()), sessions=sessions)

    erased = _feedloop(data, "erase", "ben", "--app", "app-a")
    assert erased.returncode == 0, erased.stderr
    result = _feedloop(data, "export", str(tmp_path / "out"), "--batch", "batch-p0-000001")

    assert result.returncode == 0, result.stderr
    assert "export.batch" in result.stderr  # no terminal: a log line per batch
    for signal, suffix in (("sft", "sft"), ("pairs", "pair"), ("labels", "label")):
        assert [row["example_id"] for row in _load(tmp_path / "out", signal)] == [f"anna:{suffix}"]
    assert "| user_erased | 3 |" in (tmp_path / "out" / "README.md").read_text()


def test_feedloop_export_says_where_to_find_batches_when_there_are_none(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    migrations.upgrade(f"sqlite:///{data / 'feedloop.db'}")
    result = _feedloop(data, "export", str(tmp_path / "out"), "--since", "2026-12-01T00:00:00Z")
    assert result.returncode != 0
    assert "feedloop status" in result.stderr
    assert not (tmp_path / "out").exists()


def test_feedloop_export_refuses_a_time_that_is_not_iso(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    migrations.upgrade(f"sqlite:///{data / 'feedloop.db'}")
    result = _feedloop(data, "export", str(tmp_path / "out"), "--since", "last tuesday")
    assert result.returncode == 2
    assert "--since" in result.stderr and "ISO 8601" in result.stderr


def test_feedback_is_its_interactions_users_and_needs_its_interaction() -> None:
    turn = interaction(user_id="anna")
    thumbs = feedback(turn, user_id="someone-else")
    orphan = feedback(interaction(user_id="ben"))
    facts = event_facts(_archived([turn, thumbs, orphan]), {turn["event_id"], thumbs["event_id"], orphan["event_id"]})
    assert facts[thumbs["event_id"]].user == user_identity("app-a", "anna")  # the pipeline's rule for erasure
    assert facts[orphan["event_id"]].user is None  # its interaction is not archived: left out at export


def test_app_keeps_only_records_of_that_apps_events(tmp_path: Path) -> None:
    events = {"anna": interaction(user_id="anna"), "dora": interaction(app_id="app-b", user_id="dora")}
    directory = BatchFolder.of(ObjectStore(tmp_path.as_uri()), "b")
    write_batch(directory, batch_id="b", trigger="size", event_time="2026-11-21T10:00:00+00:00",
                records=_records(events), loss_weights={})
    facts = event_facts(_archived(list(events.values())), {e["event_id"] for e in events.values()})
    summary = export_dataset(tmp_path / "out", [("b", directory)], facts, lambda user, at: False, app="app-b",
                             exported_at=EXPORTED_AT)
    assert [row["example_id"] for row in _load(tmp_path / "out", "sft")] == ["dora:sft"]
    assert summary.left_out == {"other_app": 3}
    assert "Only app `app-b`." in (tmp_path / "out" / "README.md").read_text()


def test_exporting_again_leaves_no_file_of_an_earlier_export(world) -> None:
    tmp_path, directory, facts = world
    out = tmp_path / "dataset"
    export_dataset(out, [("batch-p0-000001", directory)], facts, lambda user, at: False, exported_at=EXPORTED_AT)
    summary = export_dataset(out, [("batch-p0-000001", directory)], facts, lambda user, at: True,
                             exported_at=EXPORTED_AT)
    assert summary.rows == {}
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]


def test_feedloop_export_takes_batches_by_name_or_by_time_not_both(tmp_path: Path) -> None:
    result = _feedloop(tmp_path, "export", str(tmp_path / "out"), "--batch", "b", "--since", "2026-12-01")
    assert result.returncode == 2
    assert "one or the other" in result.stderr
