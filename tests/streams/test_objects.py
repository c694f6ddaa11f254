"""The object store's guarantees, on a directory and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streams.objects import ObjectMissing, ObjectStorage, ObjectStore, StorageUnavailable


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return ObjectStore((tmp_path / "objects").as_uri())
    storage: ObjectStorage = request.getfixturevalue("s3_storage")
    return ObjectStore(storage.url, storage)


def test_what_is_put_is_got_and_a_second_put_replaces_it(store: ObjectStore) -> None:
    store.put("batches/b-1/sft.jsonl", b"one\n")
    store.put("batches/b-1/sft.jsonl", b"two\n")
    assert store.get("batches/b-1/sft.jsonl") == b"two\n"


def test_put_new_writes_once_and_says_when_the_key_was_taken(store: ObjectStore) -> None:
    assert store.put_new("keys/u", b"first") is True
    assert store.put_new("keys/u", b"second") is False
    assert store.get("keys/u") == b"first"


def test_a_missing_object_is_missing_not_empty(store: ObjectStore) -> None:
    with pytest.raises(ObjectMissing):
        store.get("nothing/here")
    assert store.find("nothing/here") is None and not store.exists("nothing/here")


def test_keys_lists_a_folder_and_only_it(store: ObjectStore) -> None:
    for key in ("archive/t/0/1.jsonl", "archive/t/0/2.jsonl", "archive/u/0/1.jsonl", "archived.txt"):
        store.put(key, b"x")
    assert store.keys("archive/t/") == ["archive/t/0/1.jsonl", "archive/t/0/2.jsonl"]
    assert store.keys("archive/") == ["archive/t/0/1.jsonl", "archive/t/0/2.jsonl", "archive/u/0/1.jsonl"]
    assert store.keys("archive") == store.keys("archive/")  # whole names: not archived.txt
    assert store.keys() == [*store.keys("archive"), "archived.txt"]


def test_delete_is_idempotent_and_delete_folder_empties_a_folder(store: ObjectStore) -> None:
    store.put("batches/b-1/a", b"1")
    store.put("batches/b-1/b", b"2")
    store.put("batches/b-2/a", b"3")
    store.delete("batches/b-1/a")
    store.delete("batches/b-1/a")
    assert store.delete_folder("batches/b-1") == 1
    assert store.keys("batches/") == ["batches/b-2/a"]
    assert store.delete_folder("batches/b") == 0  # a folder, not a prefix of names
    with pytest.raises(ValueError, match="name a folder"):
        store.delete_folder("/")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a"])
def test_a_key_that_could_leave_the_store_is_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(ValueError, match="object key"):
        store.put(key, b"x")


def test_a_store_travels_to_another_process_as_its_url(store: ObjectStore) -> None:
    store.put("k", b"v")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.url == store.url and copy.get("k") == b"v"


def test_a_file_store_keeps_the_data_directory_layout(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path.as_uri())
    store.put("batches/b-1/manifest.json", b"{}")
    assert (tmp_path / "batches" / "b-1" / "manifest.json").read_bytes() == b"{}"
    assert store.local_path("batches/b-1") == tmp_path / "batches" / "b-1"
    store.delete("batches/b-1/manifest.json")
    assert not (tmp_path / "batches").exists()  # no empty folders left behind, as in a bucket


def test_a_writer_killed_mid_put_leaves_the_old_bytes_or_none(tmp_path: Path) -> None:
    """The child stages 64 MiB and is killed before it can rename: the key is absent, its
    staged file is not listed, and a later put succeeds."""
    root = tmp_path / "objects"
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import os, signal, sys; from streams.objects import _Directory; from pathlib import Path\n"
         "d = _Directory(Path(sys.argv[1])); staged, _ = d._staged('big', b'x' * (64 << 20))\n"
         "os.kill(os.getpid(), signal.SIGKILL)", str(root)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    assert child.wait() == -signal.SIGKILL
    store = ObjectStore(root.as_uri())
    assert store.find("big") is None and store.keys() == []
    store.put("big", b"y")
    assert store.get("big") == b"y"


def test_an_unreachable_server_says_what_to_check(tmp_path: Path) -> None:
    from trainer.vllm_server import free_port

    storage = ObjectStorage(url="s3://nobucket/p", endpoint=f"http://127.0.0.1:{free_port()}",
                            access_key_id="a", secret_access_key="b", allow_http=True)  # fmt: skip
    store = ObjectStore(storage.url, storage)
    with pytest.raises(StorageUnavailable, match="FEEDLOOP_STORAGE__URL"):
        store.put("k", b"v")


@pytest.mark.parametrize("url", ["gs://b/p", "s3:///p", "relative/path"])
def test_a_url_it_cannot_serve_is_refused_at_once(url: str) -> None:
    with pytest.raises(ValueError, match="storage URL"):
        ObjectStore(url)


def test_a_file_store_is_where_its_path_is_even_with_characters_a_url_quotes(tmp_path: Path) -> None:
    root = tmp_path / "a dir [1]"
    ObjectStore(root.as_uri()).put("keys/k", b"v")  # file:///.../a%20dir%20%5B1%5D
    assert (root / "keys" / "k").read_bytes() == b"v"
