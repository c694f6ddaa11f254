"""Adapters on the shared store, against a real S3 server (SeaweedFS): published by one host,
staged by another, fetched by a replica only once approved, with the approved bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from streams.objects import ObjectMissing, ObjectStorage, ObjectStore
from trainer.adapter_store import AdapterStore, adapter_objects
from trainer.adapter_validation import ADAPTER_FILES, adapter_sha256
from trainer.lora_resolver import storage_environment, storage_from_environment


def make_adapter(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True)
    for number, file in enumerate(ADAPTER_FILES):
        (directory / file).write_bytes(f"adapter {seed} file {number} ".encode() * 100)
    return directory


@pytest.fixture
def hosts(tmp_path: Path, s3_storage: ObjectStorage) -> tuple[AdapterStore, AdapterStore]:
    """Two hosts (a trainer and a controller, say), each with its own disk, one bucket."""
    trainer, controller = tmp_path / "trainer", tmp_path / "controller"
    return (AdapterStore(adapter_objects(s3_storage, trainer), trainer),
            AdapterStore(adapter_objects(s3_storage, controller), controller))  # fmt: skip


def test_what_one_host_publishes_another_stages_byte_for_byte(hosts, tmp_path: Path) -> None:
    trainer, controller = hosts
    source = make_adapter(trainer.local_dir / "a-1", seed=1)
    trainer.publish("a-1", source)
    staged = controller.stage("a-1", adapter_sha256(source))
    assert staged == controller.local_dir / "a-1"
    assert adapter_sha256(staged) == adapter_sha256(source)
    assert not trainer.shared and not controller.shared


def test_a_stale_local_copy_is_fetched_again_and_a_missing_part_stages_nothing(hosts) -> None:
    trainer, controller = hosts
    source = make_adapter(trainer.local_dir / "a-1", seed=1)
    trainer.publish("a-1", source)
    stale = make_adapter(controller.local_dir / "a-1", seed=2)
    assert adapter_sha256(controller.stage("a-1", adapter_sha256(source))) == adapter_sha256(source)
    # Only one of the two files reached the store (a trainer that died mid-upload):
    trainer.objects.put(f"a-2/{ADAPTER_FILES[0]}", b"half")
    with pytest.raises(ObjectMissing):
        controller.stage("a-2")
    assert not (controller.local_dir / "a-2").exists() and stale.parent.is_dir()
    assert [p.name for p in controller.local_dir.iterdir()] == ["a-1"]  # no staging folder left


def test_a_replica_fetches_only_what_was_approved_with_its_digest(hosts, tmp_path: Path) -> None:
    trainer, controller = hosts
    cache = tmp_path / "replica-cache"
    source = make_adapter(trainer.local_dir / "a-1", seed=1)
    trainer.publish("a-1", source)
    assert controller.fetch_approved("a-1", cache) is None  # in the store, not yet approved
    controller.approve("a-1", adapter_sha256(source))
    fetched = controller.fetch_approved("a-1", cache)
    assert fetched == cache / "a-1" and adapter_sha256(fetched) == adapter_sha256(source)
    controller.withdraw("a-1")
    assert controller.fetch_approved("a-1", cache) is None


def test_bytes_changed_in_the_store_after_approval_are_not_served(hosts, tmp_path: Path) -> None:
    trainer, controller = hosts
    source = make_adapter(trainer.local_dir / "a-1", seed=1)
    trainer.publish("a-1", source)
    controller.approve("a-1", adapter_sha256(source))
    trainer.objects.put(f"a-1/{ADAPTER_FILES[1]}", b"tampered")
    assert controller.fetch_approved("a-1", tmp_path / "cache") is None


@pytest.mark.parametrize("name", ["base model", "../a-1", "a/b", ""])
def test_a_name_that_is_no_adapter_name_is_simply_not_found(hosts, tmp_path: Path, name: str) -> None:
    assert hosts[1].fetch_approved(name, tmp_path / "cache") is None


def test_on_one_machine_the_store_is_the_adapters_directory(tmp_path: Path) -> None:
    local = tmp_path / "adapters"
    store = AdapterStore(adapter_objects(ObjectStorage(), local), local)
    source = make_adapter(local / "a-1", seed=1)
    store.publish("a-1", source)
    assert store.shared and store.stage("a-1") == source
    assert sorted(p.name for p in source.iterdir()) == sorted(ADAPTER_FILES)  # nothing added beside them


def test_the_resolver_reads_the_storage_settings_feedloop_reads() -> None:
    storage = storage_from_environment({"FEEDLOOP_STORAGE__URL": "s3://b/p", "FEEDLOOP_STORAGE__ALLOW_HTTP": "true",
                                        "FEEDLOOP_STORAGE__ENDPOINT": "http://s3:9000", "OTHER": "x"})  # fmt: skip
    assert (storage.url, storage.endpoint, storage.allow_http) == ("s3://b/p", "http://s3:9000", True)
    assert storage_from_environment({}).url is None
    assert adapter_objects(storage, Path("/x")).url == "s3://b/p/adapters"
    assert ObjectStore("s3://b/p/adapters", storage).url.endswith("/adapters")


def test_the_storage_environment_reads_back_as_the_same_settings() -> None:
    storage = ObjectStorage(url="s3://b/p", endpoint="http://s3:9000", access_key_id="id", secret_access_key="key",
                            allow_http=True)  # fmt: skip
    env = storage_environment(storage)
    assert env["FEEDLOOP_STORAGE__SECRET_ACCESS_KEY"] == "key" and env["FEEDLOOP_STORAGE__ALLOW_HTTP"] == "true"
    assert "FEEDLOOP_STORAGE__REGION" not in env  # unset stays unset
    assert storage_from_environment(env) == storage
