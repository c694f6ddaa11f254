import hashlib
import os
import random
import re
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from streams.objects import ObjectStorage, ObjectStore
from streams.pseudonyms import KEY_BYTES, RECHECK_BUCKET_S, KeyStore, Pseudonymizer, user_identity

ERASED_AT = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _pseudonymizer(root: Path, seed: int | None = None) -> Pseudonymizer:
    random_bytes = random.Random(seed).randbytes if seed is not None else os.urandom
    return Pseudonymizer(KeyStore.in_directory(root, random_bytes=random_bytes, clock=lambda: ERASED_AT))


def _files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()]


def test_pseudonym_is_stable_and_well_formed(tmp_path):
    pseudonyms = _pseudonymizer(tmp_path / "keys")
    first = pseudonyms.pseudonym("alice@example.com")
    assert re.fullmatch(r"u_[0-9a-f]{32}", first)
    assert pseudonyms.pseudonym("alice@example.com") == first


def test_pseudonyms_differ_per_user(tmp_path):
    pseudonyms = _pseudonymizer(tmp_path / "keys")
    values = {pseudonyms.pseudonym(f"user-{i}") for i in range(50)}
    assert len(values) == 50


def test_keys_persist_across_key_store_instances(tmp_path):
    before = _pseudonymizer(tmp_path / "keys").pseudonym("bob")
    assert _pseudonymizer(tmp_path / "keys").pseudonym("bob") == before


def test_erase_gives_a_new_pseudonym_and_never_the_old_one(tmp_path):
    pseudonyms = _pseudonymizer(tmp_path / "keys")
    old = pseudonyms.pseudonym("carol")
    assert not pseudonyms.is_erased("carol")

    pseudonyms.erase("carol")

    assert pseudonyms.is_erased("carol")
    assert pseudonyms.erased_at("carol") == ERASED_AT
    new = pseudonyms.pseudonym("carol")
    assert new != old
    assert _pseudonymizer(tmp_path / "keys").pseudonym("carol") == new  # the new key persists
    assert not pseudonyms.is_erased("carol")  # a returning user has a live key again
    assert pseudonyms.erased_at("carol") == ERASED_AT  # kept, so replays can drop old events


def test_erase_removes_every_copy_of_the_key_from_the_store(tmp_path):
    root = tmp_path / "keys"
    store = KeyStore.in_directory(root)
    key = store.get_or_create_key("dave")
    store.get_or_create_key("erin")

    store.delete_key("dave")

    assert not store.has_key("dave")
    assert store.has_key("erin")
    assert all(key not in path.read_bytes() for path in _files(root))


def test_erase_is_idempotent_and_works_for_unknown_users(tmp_path):
    pseudonyms = _pseudonymizer(tmp_path / "keys")
    pseudonyms.erase("never-seen")
    pseudonyms.erase("never-seen")
    assert pseudonyms.is_erased("never-seen")
    assert not pseudonyms.is_erased("someone-else")
    assert pseudonyms.erased_at("someone-else") is None


def test_key_and_erasure_files_are_owner_only_even_with_a_permissive_umask(tmp_path):
    root = tmp_path / "keys"
    previous_umask = os.umask(0)
    try:
        pseudonyms = _pseudonymizer(root)
        pseudonyms.pseudonym("frank")
        pseudonyms.pseudonym("grace")
        pseudonyms.erase("grace")
    finally:
        os.umask(previous_umask)
    paths = [root, *root.rglob("*")]
    files = [path for path in paths if path.is_file()]
    assert len(files) == 3  # frank's key, grace's erasure record, the erasure generation
    for path in paths:
        expected = 0o600 if path.is_file() else 0o700
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_store_does_not_reveal_user_ids_or_leave_temp_files(tmp_path):
    root = tmp_path / "keys"
    pseudonyms = _pseudonymizer(root)
    pseudonyms.pseudonym("heidi@example.com")
    pseudonyms.erase("heidi@example.com")
    pseudonyms.pseudonym("heidi@example.com")
    names = [str(path.relative_to(root)) for path in root.rglob("*")]
    assert not any("heidi" in name for name in names)
    assert not any(name.endswith((".tmp", ".partial")) for name in names)
    assert all(b"heidi" not in path.read_bytes() for path in _files(root))


def test_injected_rng_makes_keys_reproducible(tmp_path):
    assert (
        _pseudonymizer(tmp_path / "a", seed=7).pseudonym("ivan")
        == _pseudonymizer(tmp_path / "b", seed=7).pseudonym("ivan")
    )
    # With the default os.urandom two stores never agree: the key is not derived from the id.
    assert _pseudonymizer(tmp_path / "c").pseudonym("ivan") != _pseudonymizer(
        tmp_path / "d"
    ).pseudonym("ivan")


def test_concurrent_first_use_yields_one_key_per_user(tmp_path):
    def slow_random_bytes(n: int) -> bytes:
        time.sleep(0.005)  # widen the check-then-create window so racing creators overlap
        return os.urandom(n)

    root = tmp_path / "keys"
    stores = [KeyStore.in_directory(root, random_bytes=slow_random_bytes) for _ in range(4)]
    users = [f"user-{i}" for i in range(20)]
    jobs = [(stores[i % 4], user) for i in range(8) for user in users]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda job: (job[1], job[0].get_or_create_key(job[1])), jobs))
    keys_by_user: dict[str, set[bytes]] = {}
    for user, key in results:
        keys_by_user.setdefault(user, set()).add(key)
    assert all(len(keys) == 1 for keys in keys_by_user.values())
    assert len(_files(root)) == len(users)


def test_corrupt_key_file_is_an_error_not_a_new_identity(tmp_path):
    store = KeyStore.in_directory(tmp_path / "keys")
    store.get_or_create_key("judy")
    (key_file,) = (tmp_path / "keys" / "keys").rglob("*.key")
    key_file.write_bytes(b"short")
    with pytest.raises(ValueError, match="corrupt key file"):
        KeyStore.in_directory(tmp_path / "keys").get_or_create_key("judy")  # a new process reads the disk


def test_an_erasure_by_another_process_is_seen_within_a_tenth_of_a_second(tmp_path):
    reader, eraser = Pseudonymizer(KeyStore.in_directory(tmp_path / "k")), Pseudonymizer(KeyStore.in_directory(tmp_path / "k"))
    before = reader.pseudonym("ivan")  # now cached in the reader
    assert reader.erased_at("ivan") is None
    eraser.erase("ivan")
    time.sleep(0.15)
    assert reader.erased_at("ivan") is not None
    assert reader.pseudonym("ivan") != before


def test_bad_inputs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="user must be a non-empty"):
        _pseudonymizer(tmp_path / "keys").pseudonym("")
    for app_id, user_id in (("", "u"), ("app", "")):
        with pytest.raises(ValueError, match="both non-empty"):
            user_identity(app_id, user_id)
    short_rng = KeyStore.in_directory(tmp_path / "other", random_bytes=lambda n: b"\x00" * (n - 1))
    with pytest.raises(ValueError, match=f"expected {KEY_BYTES}"):
        short_rng.get_or_create_key("mallory")


def test_the_same_user_id_in_two_apps_is_two_users(tmp_path):
    """Each app's "42" has a key, a pseudonym and an erasure of its own."""
    pseudonyms = _pseudonymizer(tmp_path / "keys")
    a, b = user_identity("app-a", "42"), user_identity("app-b", "42")
    before_a, before_b = pseudonyms.pseudonym(a), pseudonyms.pseudonym(b)
    assert before_a != before_b
    pseudonyms.erase(b)
    assert pseudonyms.is_erased(b) and not pseudonyms.is_erased(a)
    assert pseudonyms.pseudonym(a) == before_a and pseudonyms.pseudonym(b) != before_b
    assert user_identity("a", "b:c") != user_identity("a:b", "c")  # ids may hold ':' but never the separator


def test_an_erasure_from_before_users_were_per_app_still_counts(tmp_path):
    """It named the bare user id and applied in every app; a replay must keep dropping them."""
    store = KeyStore.in_directory(tmp_path / "keys", clock=lambda: ERASED_AT)
    store.delete_key("u-7")  # how erase() recorded it before (app, user) identities
    pseudonyms = Pseudonymizer(store)
    for app_id in ("app-a", "app-b"):
        assert pseudonyms.erased_at(user_identity(app_id, "u-7")) == ERASED_AT
        assert pseudonyms.is_erased(user_identity(app_id, "u-7"))
    assert pseudonyms.erased_at(user_identity("app-a", "u-8")) is None


def test_a_key_directory_of_before_object_storage_is_read_as_it_is(tmp_path):
    """The layout did not change: the keys of a directory written before are the keys now,
    found both as FEEDLOOP_KEY_DIR and as keys/ of the data directory's store."""
    root = tmp_path / "data" / "keys"
    digest = hashlib.sha256(b"kim").hexdigest()
    (root / "keys" / digest[:2]).mkdir(parents=True)
    (root / "keys" / digest[:2] / f"{digest}.key").write_bytes(b"k" * KEY_BYTES)
    (root / "erased" / digest[:2]).mkdir(parents=True)
    (root / "erased" / digest[:2] / digest).write_text(ERASED_AT.isoformat())
    (root / "erasures.journal").write_text(f"{digest}\n")
    for store in (KeyStore.in_directory(root), KeyStore(ObjectStore((tmp_path / "data").as_uri()), "keys")):
        assert store.get_or_create_key("kim") == b"k" * KEY_BYTES and store.erased_at("kim") == ERASED_AT


@pytest.fixture
def bucket(s3_storage: ObjectStorage) -> ObjectStore:
    return ObjectStore(s3_storage.url, s3_storage)


def test_two_hosts_racing_to_create_a_users_key_on_s3_agree_on_one(bucket):
    """A worker and a gateway on hosts without a shared disk see a new user at once."""
    def slow_random_bytes(n: int) -> bytes:
        time.sleep(0.02)  # both have looked and found no key before either writes
        return os.urandom(n)

    stores = [KeyStore(ObjectStore(bucket.url, bucket.storage), "keys", random_bytes=slow_random_bytes)
              for _ in range(2)]  # fmt: skip
    users = [f"user-{i}" for i in range(5)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: (job[1], job[0].get_or_create_key(job[1])),
                                [(store, user) for user in users for store in stores]))  # fmt: skip
    keys_by_user: dict[str, set[bytes]] = {}
    for user, key in results:
        keys_by_user.setdefault(user, set()).add(key)
    assert all(len(keys) == 1 for keys in keys_by_user.values())
    assert len(bucket.keys("keys/keys")) == len(users)
    assert {KeyStore(bucket, "keys").get_or_create_key(user) for user in users} == {
        key for keys in keys_by_user.values() for key in keys}  # a third process reads the same


def test_erasure_on_s3_leaves_no_byte_of_the_key_and_a_new_key_differs(bucket):
    store = KeyStore(bucket, "keys", clock=lambda: ERASED_AT)
    pseudonyms = Pseudonymizer(store)
    user = user_identity("app-a", "leo")
    old_key, old = store.get_or_create_key(user), pseudonyms.pseudonym(user)
    store.get_or_create_key(user_identity("app-a", "mia"))

    pseudonyms.erase(user)

    assert pseudonyms.is_erased(user) and pseudonyms.erased_at(user) == ERASED_AT
    listed = bucket.keys("keys/")
    assert len(listed) == 3  # mia's key, leo's erasure record, the generation
    assert all(old_key not in bucket.get(key) for key in listed)
    assert all("leo" not in key and b"leo" not in bucket.get(key) for key in listed)
    new = pseudonyms.pseudonym(user)
    assert new != old and store.get_or_create_key(user) != old_key
    assert Pseudonymizer(KeyStore(bucket, "keys")).pseudonym(user) == new  # the new key persists
    assert pseudonyms.erased_at(user) == ERASED_AT  # kept, so replays drop the old events


def test_a_cache_does_not_serve_a_key_erased_by_another_host_past_its_recheck(bucket):
    reader, eraser = Pseudonymizer(KeyStore(bucket, "keys")), Pseudonymizer(KeyStore(bucket, "keys"))
    assert reader.key_store.recheck_s == RECHECK_BUCKET_S
    user = user_identity("app-a", "noa")
    before = reader.pseudonym(user)  # now cached in the reader
    assert reader.erased_at(user) is None
    eraser.erase(user)
    time.sleep(RECHECK_BUCKET_S + 0.05)
    assert reader.erased_at(user) is not None
    assert reader.pseudonym(user) != before
    assert reader.pseudonym(user) == eraser.pseudonym(user)  # the returning user's one new key
