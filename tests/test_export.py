"""`feedloop export`: curated batches become a Hugging Face dataset, without the erased and the opted-out."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import datasets
import pytest

from streams.archive import ArchivedRecord
from streams.contract import Message
from streams.export import event_facts, export_dataset
from streams.pipeline import pseudonyms_erased
from streams.pseudonyms import FileKeyStore, Pseudonymizer, user_identity
from streams.topics import EVENTS
from streams.training_data import LabelRecord, PreferenceRecord, SftRecord, read_batch, write_batch
from tests.factories import interaction

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
    directory = tmp_path / "batches" / "batch-p0-000001"
    write_batch(directory, batch_id="batch-p0-000001", trigger="size", event_time="2026-11-21T10:00:00+00:00",
                records=_records(events), loss_weights={"explicit": 1.0})
    facts = event_facts(_archived(list(events.values())), {e["event_id"] for e in events.values()})
    return tmp_path, directory, facts


def _load(out: Path, signal: str) -> list[dict]:
    return list(datasets.load_dataset("parquet", data_files=str(out / f"{signal}.parquet"), split="train"))


def test_rows_are_the_batch_records_without_the_opted_out_or_the_erased(world) -> None:
    tmp_path, directory, facts = world
    pseudonyms = Pseudonymizer(FileKeyStore(tmp_path / "keys"))
    for user in ("anna", "ben", "carl"):
        pseudonyms.pseudonym(user_identity("app-a", user))
    pseudonyms.erase(user_identity("app-a", "ben"))  # after the batch was cut

    out = tmp_path / "dataset"
    summary = export_dataset(out, [("batch-p0-000001", directory)], facts, pseudonyms_erased(pseudonyms),
                             exported_at=EXPORTED_AT)

    _, records = read_batch(directory)
    for signal, items in records.items():
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
