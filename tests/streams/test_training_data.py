"""Batch files: canonical bytes, checksums checked on read, atomic publication."""

import pytest

from streams.training_data import LabelRecord, PreferenceRecord, SftRecord, read_batch, write_batch

PROMPT = [{"role": "user", "content": "Convert 3 km to miles"}]


def records(order=1):
    items = [
        SftRecord(example_id="i2:edit", cohort="a", domain="units", source="edit", event_ids=["e2", "e3"],
                  messages=[*PROMPT, {"role": "assistant", "content": "About 1.86 miles."}]),
        PreferenceRecord(example_id="i2:edit-pair", cohort="a", domain="units", source="edit", event_ids=["e3"],
                         prompt=PROMPT, chosen="About 1.86 miles.", rejected="3 miles.", weight=0.7),
        LabelRecord(example_id="i1:thumbs", cohort="minority", domain="code", source="thumbs", event_ids=["e1"],
                    prompt=PROMPT, completion="No idea.", desirable=False, replay=True),
    ]
    return items[::order]


def test_same_records_in_any_order_give_identical_bytes(tmp_path):
    one = write_batch(tmp_path / "b1", batch_id="b", trigger="size", event_time="2026-11-21T10:00:00+00:00",
                      records=records(1), loss_weights={"explicit": 0.6, "implicit": 0.4})
    two = write_batch(tmp_path / "b2", batch_id="b", trigger="size", event_time="2026-11-21T10:00:00+00:00",
                      records=records(-1), loss_weights={"implicit": 0.4, "explicit": 0.6})
    assert one[1] == two[1]
    for name in ("sft.jsonl", "pairs.jsonl", "labels.jsonl", "manifest.json"):
        assert (tmp_path / "b1" / name).read_bytes() == (tmp_path / "b2" / name).read_bytes()


def test_manifest_counts_strata_and_sources(tmp_path):
    manifest, _ = write_batch(tmp_path / "b", batch_id="b", trigger="drift", event_time="t",
                              records=records(), loss_weights={})
    assert manifest.counts == {"sft": 1, "pairs": 1, "labels": 1}
    assert manifest.strata == {"a/units": 2, "minority/code": 1}
    assert manifest.replayed == 1
    assert manifest.source_event_ids == ["e1", "e2", "e3"]
    assert not (tmp_path / "b.partial").exists()


def test_read_round_trips_and_catches_tampering(tmp_path):
    write_batch(tmp_path / "b", batch_id="b", trigger="size", event_time="t", records=records(), loss_weights={})
    manifest, read = read_batch(tmp_path / "b")
    assert read["pairs"][0].chosen == "About 1.86 miles." and read["labels"][0].desirable is False
    path = tmp_path / "b" / "pairs.jsonl"
    path.write_bytes(path.read_bytes().replace(b"1.86", b"9.99"))
    with pytest.raises(ValueError, match="checksum"):
        read_batch(tmp_path / "b")


def test_a_held_out_part_is_written_beside_the_batch_and_read_under_its_own_signals(tmp_path):
    trained, *heldout = records()
    manifest, _ = write_batch(tmp_path / "b", batch_id="b", trigger="size", event_time="t", records=[trained],
                              loss_weights={}, heldout=heldout)  # fmt: skip
    assert manifest.counts == {"sft": 1, "pairs": 0, "labels": 0, "heldout_pairs": 1, "heldout_labels": 1}
    assert manifest.strata == {"a/units": 1} and manifest.replayed == 0  # what is trained
    assert manifest.source_event_ids == ["e1", "e2", "e3"]
    assert not (tmp_path / "b" / "heldout_sft.jsonl").exists()
    _, read = read_batch(tmp_path / "b")
    assert read["heldout_pairs"] == [heldout[0]] and read["heldout_labels"] == [heldout[1]]
    assert read["heldout_sft"] == [] and read["pairs"] == []
    path = tmp_path / "b" / "heldout_pairs.jsonl"
    path.write_bytes(path.read_bytes().replace(b"3 miles", b"2 miles"))
    with pytest.raises(ValueError, match="checksum"):
        read_batch(tmp_path / "b")


def test_a_batch_with_nothing_held_out_is_the_batch_it_was_before_held_out_parts(tmp_path):
    write_batch(tmp_path / "b", batch_id="b", trigger="size", event_time="t", records=records(), loss_weights={})
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["labels.jsonl", "manifest.json", "pairs.jsonl",
                                                                 "sft.jsonl"]  # fmt: skip
    _, read = read_batch(tmp_path / "b")
    assert (read["heldout_sft"], read["heldout_pairs"], read["heldout_labels"]) == ([], [], [])


def test_a_recut_drops_the_erased_users_records_keeps_the_rest_and_finishes_a_swap_a_crash_left(tmp_path):
    import os

    from streams.training_data import recut_batch

    directory = tmp_path / "b"
    sft, pair, label = records()
    write_batch(directory, batch_id="b", trigger="size", event_time="t", records=[sft, pair, label],
                loss_weights={"explicit": 1.0}, users={"u_a": ["i2:edit", "i2:edit-pair"], "u_b": ["i1:thumbs"]})
    labels = (directory / "labels.jsonl").read_bytes()
    unchanged = recut_batch(directory, {"u_c"})
    assert unchanged[0] == read_batch(directory)[0], "nobody of theirs in it: left as it is"

    manifest, _ = recut_batch(directory, {"u_a"})
    assert manifest.users == {"u_b": ["i1:thumbs"]} and manifest.counts == {"sft": 0, "pairs": 0, "labels": 1}
    assert (directory / "labels.jsonl").read_bytes() == labels and read_batch(directory)[0] == manifest
    assert manifest.source_event_ids == ["e1"] and (manifest.batch_id, manifest.trigger) == ("b", "size")

    # A crash between the two renames: the old batch moved away, the new one not yet in place.
    write_batch(tmp_path / "b.recut", batch_id="b", trigger="size", event_time="t", records=[],
                loss_weights={"explicit": 1.0})  # fmt: skip
    os.replace(directory, tmp_path / "b.old")
    finished, _ = recut_batch(directory, {"u_b"})
    assert finished.counts == {"sft": 0, "pairs": 0, "labels": 0} and not (tmp_path / "b.old").exists()
