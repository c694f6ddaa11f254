"""Batches in the object store: canonical bytes, checksums checked on read, the manifest as
the commit marker, and recuts that readers never see half done; on a directory and on a real
S3 server (SeaweedFS)."""

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streams.objects import ObjectStorage, ObjectStore
from streams.training_data import (
    BatchConflict,
    BatchFolder,
    BatchUnreadable,
    LabelRecord,
    PreferenceRecord,
    SftRecord,
    manifest_sha256,
    read_batch,
    recut_batch,
    write_batch,
)

PROMPT = [{"role": "user", "content": "Convert 3 km to miles"}]
USERS = {"u_a": ["i2:edit", "i2:edit-pair"], "u_b": ["i1:thumbs"]}


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


def cut(**overrides) -> dict:
    return dict(batch_id="b", trigger="size", event_time="t", records=records(), loss_weights={"explicit": 1.0},
                users=USERS) | overrides  # fmt: skip


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return ObjectStore((tmp_path / "data").as_uri())
    storage: ObjectStorage = request.getfixturevalue("s3_storage")
    return ObjectStore(storage.url, storage)


def every_byte(store: ObjectStore) -> bytes:
    return b"".join(store.get(key) for key in store.keys())


def test_same_records_in_any_order_give_identical_bytes(store):
    one = write_batch(BatchFolder(store, "batches/b1"), batch_id="b", trigger="size",
                      event_time="2026-11-21T10:00:00+00:00", records=records(1),
                      loss_weights={"explicit": 0.6, "implicit": 0.4})  # fmt: skip
    two = write_batch(BatchFolder(store, "batches/b2"), batch_id="b", trigger="size",
                      event_time="2026-11-21T10:00:00+00:00", records=records(-1),
                      loss_weights={"implicit": 0.4, "explicit": 0.6})  # fmt: skip
    assert one[1] == two[1] == manifest_sha256(BatchFolder(store, "batches/b1"))
    for name in ("sft.jsonl", "pairs.jsonl", "labels.jsonl", "manifest.json"):
        assert store.get(f"batches/b1/{name}") == store.get(f"batches/b2/{name}")


def test_manifest_counts_strata_and_sources(store):
    manifest, _ = write_batch(BatchFolder(store, "batches/b"), **cut(trigger="drift", users={}))
    assert manifest.counts == {"sft": 1, "pairs": 1, "labels": 1}
    assert manifest.strata == {"a/units": 2, "minority/code": 1}
    assert manifest.replayed == 1
    assert manifest.source_event_ids == ["e1", "e2", "e3"]
    assert b'"parts"' not in store.get("batches/b/manifest.json"), "a batch as first published names no parts"


def test_read_round_trips_and_catches_tampering(store):
    batch = BatchFolder(store, "batches/b")
    write_batch(batch, **cut())
    manifest, read = read_batch(batch)
    assert read["pairs"][0].chosen == "About 1.86 miles." and read["labels"][0].desirable is False
    store.put("batches/b/pairs.jsonl", store.get("batches/b/pairs.jsonl").replace(b"1.86", b"9.99"))
    with pytest.raises(BatchUnreadable, match="checksum does not match"):
        read_batch(batch)


def test_a_folder_without_a_manifest_is_no_batch(store):
    with pytest.raises(BatchUnreadable, match="no manifest.json"):
        read_batch(BatchFolder(store, "batches/never"))


def test_the_same_batch_again_is_a_no_op_and_a_different_one_is_refused_untouched(store):
    batch = BatchFolder(store, "batches/b")
    first = write_batch(batch, **cut())
    before = {key: store.get(key) for key in store.keys()}
    assert write_batch(batch, **cut()) == first
    with pytest.raises(BatchConflict, match="different batch b"):
        write_batch(batch, **cut(records=records()[:1]))
    assert {key: store.get(key) for key in store.keys()} == before, "refused before any part was written"


def test_a_held_out_part_is_written_beside_the_batch_and_read_under_its_own_signals(store):
    trained, *heldout = records()
    batch = BatchFolder(store, "batches/b")
    manifest, _ = write_batch(batch, **cut(records=[trained], heldout=heldout, users={}, loss_weights={}))
    assert manifest.counts == {"sft": 1, "pairs": 0, "labels": 0, "heldout_pairs": 1, "heldout_labels": 1}
    assert manifest.strata == {"a/units": 1} and manifest.replayed == 0  # what is trained
    assert manifest.source_event_ids == ["e1", "e2", "e3"]
    assert not store.exists("batches/b/heldout_sft.jsonl")
    _, read = read_batch(batch)
    assert read["heldout_pairs"] == [heldout[0]] and read["heldout_labels"] == [heldout[1]]
    assert read["heldout_sft"] == [] and read["pairs"] == []
    store.put("batches/b/heldout_pairs.jsonl", store.get("batches/b/heldout_pairs.jsonl").replace(b"3 miles", b"2"))
    with pytest.raises(BatchUnreadable, match="checksum"):
        read_batch(batch)


def test_a_batch_is_the_data_directorys_folder_it_always_was(tmp_path):
    write_batch(BatchFolder(ObjectStore(tmp_path.as_uri()), "batches/b"), **cut(users={}))
    assert sorted(p.name for p in (tmp_path / "batches" / "b").iterdir()) == ["labels.jsonl", "manifest.json",
                                                                             "pairs.jsonl", "sft.jsonl"]  # fmt: skip
    _, read = read_batch(BatchFolder(ObjectStore(tmp_path.as_uri()), "batches/b"))
    assert (read["heldout_sft"], read["heldout_pairs"], read["heldout_labels"]) == ([], [], [])


def _publish_and_die(store: ObjectStore, folder: str) -> None:
    """In a child: write the batch's parts, then die by SIGKILL as the manifest is put."""
    program = (
        "import os, pickle, signal, sys\n"
        "from streams.objects import ObjectStore\n"
        "from streams.training_data import BatchFolder, write_batch\n"
        "from tests.streams.test_training_data import cut\n"
        "store, folder = pickle.loads(sys.stdin.buffer.read())\n"
        "ObjectStore.put_new = lambda self, key, data: os.kill(os.getpid(), signal.SIGKILL)\n"
        "write_batch(BatchFolder(store, folder), **cut())\n"
    )
    child = subprocess.run([sys.executable, "-c", program], input=pickle.dumps((store, folder)),
                           env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})  # fmt: skip
    assert child.returncode == -signal.SIGKILL


def test_a_writer_killed_before_its_manifest_leaves_no_batch_and_publishing_again_completes_it(store):
    batch = BatchFolder(store, "batches/b")
    _publish_and_die(store, batch.folder)
    assert store.keys("batches/b") == ["batches/b/labels.jsonl", "batches/b/pairs.jsonl", "batches/b/sft.jsonl"]
    with pytest.raises(BatchUnreadable, match="no manifest.json"):  # the parts alone are no batch
        read_batch(batch)
    manifest, digest = write_batch(batch, **cut())
    read, records = read_batch(batch)
    assert read == manifest and manifest_sha256(batch) == digest and len(records["sft"]) == 1


def test_a_recut_drops_the_erased_users_records_and_bytes_and_keeps_the_rest(store):
    batch = BatchFolder(store, "batches/b")
    write_batch(batch, **cut())
    labels = store.get("batches/b/labels.jsonl")
    unchanged = recut_batch(batch, {"u_c"})
    assert unchanged == (read_batch(batch)[0], manifest_sha256(batch)), "nobody of theirs in it: left as it is"

    manifest, digest = recut_batch(batch, {"u_a"})
    assert manifest.users == {"u_b": ["i1:thumbs"]} and manifest.counts == {"sft": 0, "pairs": 0, "labels": 1}
    assert read_batch(batch)[0] == manifest and manifest_sha256(batch) == digest
    assert manifest.source_event_ids == ["e1"] and (manifest.batch_id, manifest.trigger) == ("b", "size")
    assert store.get("batches/b/labels.jsonl") == labels, "a part without them keeps its object"
    assert set(manifest.parts) == {"sft", "pairs"} and all(".jsonl" in name for name in manifest.parts.values())
    stored = every_byte(store)
    for erased in (b"i2:edit", b"1.86 miles", b"3 miles", b"u_a"):
        assert erased not in stored, f"{erased!r} is still in an object"
    assert store.keys("batches/b") == sorted(
        [f"batches/b/{name}" for name in ("labels.jsonl", "manifest.json", *manifest.parts.values())]
    )

    again, _ = recut_batch(batch, {"u_b"})  # a recut batch is cut again by the same rule
    assert again.counts == {"sft": 0, "pairs": 0, "labels": 0} and b"i1:thumbs" not in every_byte(store)


class _CrashAfter:
    """A store that raises once ``after`` puts were made, as a process dying there would."""

    def __init__(self, store: ObjectStore, after: int) -> None:
        self.store, self.left = store, after

    def __getattr__(self, name):
        return getattr(self.store, name)

    def put(self, key: str, data: bytes) -> None:
        if self.left == 0:
            raise SystemExit("killed")
        self.left -= 1
        self.store.put(key, data)


@pytest.mark.parametrize("puts", [0, 1, 2])  # two changed parts, then the manifest
def test_a_recut_that_dies_part_way_is_never_seen_half_done_and_the_next_call_finishes_it(store, puts):
    write_batch(BatchFolder(store, "batches/b"), **cut())
    old = read_batch(BatchFolder(store, "batches/b"))
    with pytest.raises(SystemExit):
        recut_batch(BatchFolder(_CrashAfter(store, puts), "batches/b"), {"u_a"})
    assert read_batch(BatchFolder(store, "batches/b")) == old, "before the manifest: the old batch, whole"
    manifest, _ = recut_batch(BatchFolder(store, "batches/b"), {"u_a"})
    assert manifest.users.keys() == {"u_b"} and b"1.86 miles" not in every_byte(store)


def test_a_crash_after_the_new_manifest_leaves_the_new_batch_and_the_next_call_sweeps_the_old_parts(store):
    batch = BatchFolder(store, "batches/b")
    write_batch(batch, **cut())
    with pytest.raises(SystemExit):  # the parts and the manifest are put; the old parts not yet deleted
        recut_batch(BatchFolder(_Undeletable(store), "batches/b"), {"u_a"})
    assert read_batch(batch)[0].users.keys() == {"u_b"}
    assert b"1.86 miles" in every_byte(store)
    recut_batch(batch, {"u_a"})  # apply_erasures calls it again: its row still lists the user
    assert b"1.86 miles" not in every_byte(store)


class _Undeletable(_CrashAfter):
    def __init__(self, store: ObjectStore) -> None:
        super().__init__(store, after=-1)

    def delete(self, key: str) -> None:
        raise SystemExit("killed")


class _RecutWhileRead:
    """A store whose first part read happens while another process recuts the batch: the
    reader holds the old manifest, and the recut sweeps the parts it names."""

    def __init__(self, store: ObjectStore, erased: set[str]) -> None:
        self.store, self.erased, self.done = store, erased, False

    def __getattr__(self, name):
        return getattr(self.store, name)

    def get(self, key: str) -> bytes:
        if not self.done and not key.endswith("manifest.json"):
            self.done = True
            recut_batch(BatchFolder(self.store, key.rsplit("/", 1)[0]), self.erased)
        return self.store.get(key)

    def find(self, key: str) -> bytes | None:
        return self.store.find(key)


def test_a_reader_racing_a_recut_gets_the_new_batch_whole_never_a_mix(store):
    write_batch(BatchFolder(store, "batches/b"), **cut())
    manifest, records = read_batch(BatchFolder(_RecutWhileRead(store, {"u_a"}), "batches/b"))
    assert manifest.users.keys() == {"u_b"} and (manifest, records) == read_batch(BatchFolder(store, "batches/b"))
    assert [r.example_id for rs in records.values() for r in rs] == ["i1:thumbs"]
