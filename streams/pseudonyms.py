"""Pseudonymous user ids with one random key per user, so a user can be crypto-shredded.

A user is (app, user id): two apps sharing a deployment may both have a user "42", and each
is their own person, with their own key and their own erasure. :func:`user_identity` names
that pair once; everything here takes the identity it returns.

pseudonym(identity) = HMAC-SHA256(key_of(identity), identity). The keys live in a KeyStore that is
never written to the event log or Kafka. Deleting a user's key makes every pseudonym already in
the log unlinkable to that user; a key is random (not derived from a master secret), so nothing
can regenerate it. Keys are persisted and reused, which keeps pseudonyms stable across restarts
and log replays for every user who has not been erased. See docs/privacy.md.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from streams.objects import ObjectStore

KEY_BYTES = 32
_PSEUDONYM_CONTEXT = b"feedloop-pseudonym-v2:"  # v2: of (app, user); v1 was of the user id alone
_PSEUDONYM_HEX_CHARS = 32  # 128 bits: collisions between independent random keys are negligible


RECHECK_S = 0.1  # how soon an erasure by another process is honoured, on a directory
RECHECK_BUCKET_S = 1.0  # and on a bucket, where each check is an HTTP GET
_GENERATION = "erasures.generation"
_SEPARATOR = "\x1f"  # no app or user id holds it (streams.contract.Id)


def user_identity(app_id: str, user_id: str) -> str:
    """The user ``user_id`` of app ``app_id``: what keys, pseudonyms and erasures are of."""
    if not app_id or not user_id:
        raise ValueError("a user is an app id and a user id, both non-empty")
    return f"{app_id}{_SEPARATOR}{user_id}"


def erased_by(erased_at: datetime | None, occurred_at: datetime) -> bool:
    """The rule of erasure: what occurred up to a user's last erasure is never trained on."""
    return erased_at is not None and occurred_at <= erased_at


def _utc_now() -> datetime:
    return datetime.now(UTC)


class KeyStore:
    """One random key per user (a :func:`user_identity`) and a record of erasures, as objects
    under ``folder`` of an :class:`~streams.objects.ObjectStore`: a directory or an S3 bucket,
    so that workers, gateways and judges on hosts without a shared disk share one set of keys.

    Layout, under the folder (the layout of the key directory before object storage, so a
    directory written then is read as it is, with nothing to migrate)::

        keys/<ab>/<sha256(user)>.key    32 raw bytes
        erased/<ab>/<sha256(user)>      the ISO time of the user's last erasure
        erasures.generation             a random token, replaced at every erasure

    (The directory's ``erasures.journal``, which told caches to drop before, is read no more;
    it holds only hashes and may be deleted.)

    Object names are hashes, so a listing shows no user ids. Creation races between processes
    on different hosts (a worker and a gateway see a new user at once): a key is created with
    ``put_new``, which writes only if no key exists (a hard link on a disk, ``If-None-Match``
    on S3), and the loser reads the winner's key, so all agree on one. On a directory the
    files are 0600 and the directories 0700 whatever the umask; a bucket's objects are as
    private as its access policy.

    Keys and erasure times are cached in memory (the pipeline asks for them on every record).
    Every erasure, after deleting the key, replaces ``erasures.generation`` with a new random
    token; a cache is dropped when the token it was filled under changes, and the token is
    read at most every ``recheck_s``: an erasure by another process is honoured within that
    time. A plain put (last writer wins) is enough, with no read-modify-write and so no lock:
    each erasure writes a token no reader has seen, after its key is gone, so whichever of two
    concurrent erasures lands last, every cache filled before either deleted its key sees a
    token it was not filled under. The check is a read of a small file on a disk (every
    0.1 s) and an HTTP GET on a bucket (every 1 s by default: a process makes one GET a second
    rather than ten, and the pipeline's loop, which calls this inline, waits on the network
    once a second).
    """

    def __init__(
        self,
        objects: ObjectStore,
        folder: str = "",
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], datetime] = _utc_now,
        recheck_s: float | None = None,
    ) -> None:
        """``folder`` is the keys' folder in the store ("" for its root). `random_bytes` and
        `clock` are injectable for deterministic tests; production keeps os.urandom, since a
        predictable key generator would make shredding reversible."""
        self.objects, self.folder = objects, folder.strip("/")
        self._random_bytes = random_bytes
        self._clock = clock
        self.recheck_s = recheck_s if recheck_s is not None else RECHECK_S if objects.is_local else RECHECK_BUCKET_S
        self._keys: dict[str, bytes] = {}
        self._erased: dict[str, datetime | None] = {}
        self._generation: str | None = None
        self._checked_at = -math.inf

    @classmethod
    def in_directory(cls, root: str | os.PathLike[str], **options) -> KeyStore:
        """The key store in a directory of its own (``FEEDLOOP_KEY_DIR``)."""
        return cls(ObjectStore(Path(root).absolute().as_uri()), **options)

    def __repr__(self) -> str:
        return f"KeyStore({self.objects.url!r}, {self.folder!r})"

    def _key(self, name: str) -> str:
        return f"{self.folder}/{name}" if self.folder else name

    def _object(self, kind: str, user: str, suffix: str = "") -> str:
        digest = hashlib.sha256(user.encode("utf-8")).hexdigest()
        return self._key(f"{kind}/{digest[:2]}/{digest}{suffix}")

    def _private(self, key: str) -> str:
        """On a directory, make the folders down to ``key``'s owner-only (0700) before it is
        written: they hold every user's key, whatever the process's umask."""
        path = self.objects.local_path(key)
        if path is not None:
            directory = self.objects.local_path(self.folder)
            directory.parent.mkdir(parents=True, exist_ok=True)
            for part in ("", *path.parent.relative_to(directory).parts):
                directory = directory / part
                directory.mkdir(mode=0o700, exist_ok=True)
        return key

    def _refresh(self) -> None:
        """Drop the caches if any process erased a user since they were filled; looks at the
        generation at most every ``recheck_s``."""
        now = time.monotonic()
        if now - self._checked_at < self.recheck_s:
            return
        self._checked_at = now
        found = self.objects.find(self._key(_GENERATION))
        generation = None if found is None else found.decode("ascii")
        if generation != self._generation:
            self._keys.clear()
            self._erased.clear()
            self._generation = generation

    @property
    def generation(self) -> str | None:
        """Changes whenever a user is erased (by any process); caches keyed on it stay valid."""
        self._refresh()
        return self._generation

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_keys": {}, "_erased": {}, "_generation": None, "_checked_at": -math.inf}

    def get_or_create_key(self, user: str) -> bytes:
        """The user's key; a new random one if the user has none (never had one, or erased)."""
        self._refresh()
        if user in self._keys:
            return self._keys[user]
        self._keys[user] = key = self._load_or_create_key(user)
        return key

    def _load_or_create_key(self, user: str) -> bytes:
        name = self._object("keys", user, ".key")
        while (key := self.objects.find(name)) is None:
            new_key = self._random_bytes(KEY_BYTES)
            if len(new_key) != KEY_BYTES:
                raise ValueError(f"random_bytes returned {len(new_key)} bytes, expected {KEY_BYTES}")
            if self.objects.put_new(self._private(name), new_key):
                return new_key
            # Another process issued this user's key first: read theirs (erased already: again).
        if len(key) != KEY_BYTES:
            raise ValueError(f"corrupt key file {name} in {self.objects.url}: {len(key)} bytes; restore it from "
                             "the key store's backup (a new key would make the user a new pseudonym)")  # fmt: skip
        return key

    def has_key(self, user: str) -> bool:
        return self.objects.exists(self._object("keys", user, ".key"))

    def delete_key(self, user: str) -> None:
        """Drop the user's key for good and record when. Idempotent.

        The erasure is recorded before the key is deleted: a crash in between leaves the key
        in place and is_erased() false, so the caller retries rather than believing it is
        done. The generation is replaced last, after the key is gone, so that a cache refilled
        from the key before its deletion is dropped by it."""
        self.objects.put(self._private(self._object("erased", user)), self._clock().isoformat().encode())
        self.objects.delete(self._object("keys", user, ".key"))
        self.objects.put(self._private(self._key(_GENERATION)), uuid.uuid4().hex.encode("ascii"))
        self._checked_at = -math.inf
        self._refresh()

    def erased_at(self, user: str) -> datetime | None:
        """When the user's key was last deleted, kept after a new key is issued."""
        self._refresh()
        if user not in self._erased:
            found = self.objects.find(self._object("erased", user))
            self._erased[user] = None if found is None else datetime.fromisoformat(found.decode("ascii"))
        return self._erased[user]


class Pseudonymizer:
    """Stable per-user pseudonyms that stop linking to the user once they are erased."""

    def __init__(self, key_store: KeyStore) -> None:
        self.key_store = key_store
        self._pseudonyms: dict[str, tuple[bytes, str]] = {}  # user -> (key, pseudonym)

    def pseudonym(self, user: str) -> str:
        """Same value for the same user (a :func:`user_identity`) while their key exists; a new
        one after erase()."""
        if not user:
            raise ValueError("user must be a non-empty user_identity()")
        key = self.key_store.get_or_create_key(user)
        cached = self._pseudonyms.get(user)
        if cached is not None and cached[0] == key:  # the HMAC is the cost; the key decides it
            return cached[1]
        digest = hmac.new(key, _PSEUDONYM_CONTEXT + user.encode("utf-8"), hashlib.sha256)
        pseudonym = "u_" + digest.hexdigest()[:_PSEUDONYM_HEX_CHARS]
        self._pseudonyms[user] = (key, pseudonym)
        return pseudonym

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pseudonyms": {}}  # like KeyStore: no key in a pickle

    def erase(self, user: str) -> None:
        """Crypto-shred the user: their existing pseudonym can never be recomputed."""
        self.key_store.delete_key(user)

    def is_erased(self, user: str) -> bool:
        """True from erase() until the user is given a new key by a later pseudonym() call."""
        return self.erased_at(user) is not None and not self.key_store.has_key(user)

    def erased_at(self, user: str) -> datetime | None:
        """Last erasure time; replays drop the user's events from before it (docs/privacy.md).

        An erasure recorded before users were per app named the bare user id, in every app: it
        still counts, or a replay after the upgrade would bring that user's events back."""
        own = self.key_store.erased_at(user)
        _, separator, user_id = user.partition(_SEPARATOR)
        before_apps = self.key_store.erased_at(user_id) if separator else None
        return max((t for t in (own, before_apps) if t is not None), default=None)
