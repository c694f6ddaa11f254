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
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

KEY_BYTES = 32
_PSEUDONYM_CONTEXT = b"feedloop-pseudonym-v2:"  # v2: of (app, user); v1 was of the user id alone
_PSEUDONYM_HEX_CHARS = 32  # 128 bits: collisions between independent random keys are negligible


_RECHECK_S = 0.1
_SEPARATOR = "\x1f"  # no app or user id holds it (streams.contract.Id)


def user_identity(app_id: str, user_id: str) -> str:
    """The user ``user_id`` of app ``app_id``: what keys, pseudonyms and erasures are of."""
    if not app_id or not user_id:
        raise ValueError("a user is an app id and a user id, both non-empty")
    return f"{app_id}{_SEPARATOR}{user_id}"


def erased_by(erased_at: datetime | None, occurred_at: datetime) -> bool:
    """The rule of erasure: what occurred up to a user's last erasure is never trained on."""
    return erased_at is not None and occurred_at <= erased_at


class KeyStore(ABC):
    """Holds one secret key per user (a :func:`user_identity`), plus a record of erasures."""

    @abstractmethod
    def get_or_create_key(self, user: str) -> bytes:
        """The user's key; a new random one if the user has none (never had one, or erased)."""

    @abstractmethod
    def has_key(self, user: str) -> bool: ...

    @abstractmethod
    def delete_key(self, user: str) -> None:
        """Drop the user's key for good and record when. Idempotent."""

    @abstractmethod
    def erased_at(self, user: str) -> datetime | None:
        """When the user's key was last deleted, kept after a new key is issued."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class FileKeyStore(KeyStore):
    """A directory of per-user key files, owner-only (dirs 0700, files 0600).

    Layout: keys/<ab>/<sha256(user)>.key holds 32 raw bytes; erased/<ab>/<sha256(user)>
    holds the erasure time. File names are hashes, so a directory listing shows no user ids.
    Safe for several processes: a key is published with link(), which fails if another process
    created it first, and the loser then reads the winner's key.

    Keys and erasure times are cached in memory (the pipeline asks for them on every record);
    every erasure also appends to ``erasures.journal``, and a cache is dropped when that file
    changes, so an erasure made by another process is honoured within ``_RECHECK_S`` (0.1 s).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        """`random_bytes` and `clock` are injectable for deterministic tests; production keeps
        os.urandom, since a predictable key generator would make shredding reversible."""
        self.root = Path(root)
        self._random_bytes = random_bytes
        self._clock = clock
        self.root.parent.mkdir(parents=True, exist_ok=True)
        for directory in (self.root, self.root / "keys", self.root / "erased"):
            directory.mkdir(mode=0o700, exist_ok=True)
        self._journal = self.root / "erasures.journal"
        self._keys: dict[str, bytes] = {}
        self._erased: dict[str, datetime | None] = {}
        self._generation: tuple[int, int] | None = None
        self._checked_at = -_RECHECK_S

    def _refresh(self) -> None:
        """Drop the caches if any process erased a user since they were filled.

        Looks at the journal at most every ``_RECHECK_S``: an erasure elsewhere is honoured
        within that time, and a hot loop does not pay a stat() per lookup."""
        now = time.monotonic()
        if now - self._checked_at < _RECHECK_S:
            return
        self._checked_at = now
        try:
            stat = os.stat(self._journal)
            generation = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            generation = None
        if generation != self._generation:
            self._keys.clear()
            self._erased.clear()
            self._generation = generation

    @property
    def generation(self) -> tuple[int, int] | None:
        """Changes whenever a user is erased (by any process); caches keyed on it stay valid."""
        self._refresh()
        return self._generation

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_keys": {}, "_erased": {}, "_generation": None, "_checked_at": -_RECHECK_S}

    def _path(self, kind: str, user: str, suffix: str = "") -> Path:
        digest = hashlib.sha256(user.encode("utf-8")).hexdigest()
        return self.root / kind / digest[:2] / f"{digest}{suffix}"

    def _write_new_file(self, directory: Path, content: bytes) -> str:
        """Write `content` to a fresh 0600 temp file in `directory`, durably; return its path."""
        directory.mkdir(mode=0o700, exist_ok=True)
        descriptor, temp_path = tempfile.mkstemp(dir=directory, suffix=".tmp")  # mode 0600
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            os.unlink(temp_path)
            raise
        return temp_path

    def get_or_create_key(self, user: str) -> bytes:
        self._refresh()
        if user in self._keys:
            return self._keys[user]
        self._keys[user] = key = self._load_or_create_key(user)
        return key

    def _load_or_create_key(self, user: str) -> bytes:
        path = self._path("keys", user, ".key")
        try:
            return self._read_key(path)
        except FileNotFoundError:
            pass
        new_key = self._random_bytes(KEY_BYTES)
        if len(new_key) != KEY_BYTES:
            raise ValueError(f"random_bytes returned {len(new_key)} bytes, expected {KEY_BYTES}")
        temp_path = self._write_new_file(path.parent, new_key)
        try:
            os.link(temp_path, path)
        except FileExistsError:
            pass  # another process issued this user's key first; use theirs
        else:
            _fsync_directory(path.parent)
        finally:
            os.unlink(temp_path)
        return self._read_key(path)

    @staticmethod
    def _read_key(path: Path) -> bytes:
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise ValueError(f"corrupt key file {path}: {len(key)} bytes")
        return key

    def has_key(self, user: str) -> bool:
        return self._path("keys", user, ".key").exists()

    def delete_key(self, user: str) -> None:
        # Record the erasure before deleting: a crash in between leaves the key in place and
        # is_erased() false, so the caller retries rather than believing it is done.
        tombstone = self._path("erased", user)
        temp_path = self._write_new_file(tombstone.parent, self._clock().isoformat().encode())
        os.replace(temp_path, tombstone)
        key_path = self._path("keys", user, ".key")
        key_path.unlink(missing_ok=True)
        _fsync_directory(tombstone.parent)
        if key_path.parent.exists():
            _fsync_directory(key_path.parent)
        descriptor = os.open(self._journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(descriptor, "a", encoding="ascii") as journal:  # tells every cache to drop
            journal.write(tombstone.name + "\n")
            journal.flush()
            os.fsync(journal.fileno())
        self._checked_at = -_RECHECK_S
        self._refresh()

    def erased_at(self, user: str) -> datetime | None:
        self._refresh()
        if user not in self._erased:
            try:
                self._erased[user] = datetime.fromisoformat(self._path("erased", user).read_text())
            except FileNotFoundError:
                self._erased[user] = None
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
        return {**self.__dict__, "_pseudonyms": {}}  # like FileKeyStore: no key in a pickle

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
