"""The shared state's one home: objects under a URL, a local directory or an S3 bucket.

Batches, archive segments, pseudonym keys, adapters and the privacy ledger are written by one
process and read by others. On one machine they share a directory; across hosts (Kubernetes,
most clouds) there is no shared read-write volume, and the convention is object storage with
the S3 API. An :class:`ObjectStore` is either, by its URL (``FEEDLOOP_STORAGE__URL``):

- ``file:///path`` (the default, the data directory): plain files, the layout the data
  directory always had, so nothing changes for a single machine;
- ``s3://bucket/prefix``: any S3-compatible server (AWS, GCS's S3 API, MinIO, SeaweedFS).

What every caller may rely on, on both:

- ``put`` is atomic per object: a reader sees the old bytes or the new ones, never a part
  (a local file is written beside and renamed, after an fsync; an S3 PUT is atomic);
- ``put_new`` writes only if the key is free, and says whether it did (``O_EXCL``-like link
  on a disk, ``If-None-Match: *`` on S3): two workers creating one key agree on one value;
- a set of objects is published by writing its parts first and its *commit marker* (e.g. a
  batch's manifest, which holds the parts' checksums) last: readers look for the marker;
- ``delete`` is idempotent, and on a disk the bytes go with the file (erasure shreds keys).

Why obstore for S3 and not fsspec/s3fs: obstore is one dependency-free wheel (the Rust
``object_store`` crate) with conditional puts, which ``put_new`` needs; s3fs brings
aiobotocore, which pins botocore to narrow ranges, and has no put-if-absent. The local
directory is written here rather than by obstore's ``LocalStore``, which renames but does not
fsync: a published batch or a user's key must survive a power cut, as they did before.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ObjectStorage(BaseModel):
    """Where shared state lives, ``FEEDLOOP_STORAGE__<FIELD>``. Unset, the data directory.
    For S3, the credentials may also come from the usual ``AWS_*`` variables or an instance
    role; docs/deployment.md shows a managed-cloud configuration."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str | None = Field(
        None, description="file:///path or s3://bucket/prefix; default: file://<data_dir>."
    )
    endpoint: str | None = Field(
        None, description="S3 endpoint of a server other than AWS (MinIO, SeaweedFS, R2), e.g. http://minio:9000."
    )
    region: str | None = Field(None, description="S3 region; default: AWS_REGION, else us-east-1.")
    access_key_id: str | None = Field(None, description="S3 access key id; default: AWS_ACCESS_KEY_ID or a role.")
    secret_access_key: SecretStr | None = Field(None, description="S3 secret key; default: AWS_SECRET_ACCESS_KEY.")
    allow_http: bool = Field(False, description="Allow a plain-http endpoint (a server on loopback or in-cluster).")


class ObjectMissing(KeyError):
    """No object under the key."""


class StorageUnavailable(RuntimeError):
    """The store could not be reached or refused the call; the message says what to check."""


class _Backend(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def put_new(self, key: str, data: bytes) -> bool: ...
    def get(self, key: str) -> bytes: ...
    def keys(self, folder: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


class _Directory:
    """Objects as files under a root directory; keys are relative POSIX paths."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key

    def _staged(self, key: str, data: bytes) -> tuple[Path, Path]:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, staged = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        return Path(staged), target

    @staticmethod
    def _sync_directory(directory: Path) -> None:
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)

    def put(self, key: str, data: bytes) -> None:
        staged, target = self._staged(key, data)
        os.replace(staged, target)
        self._sync_directory(target.parent)

    def put_new(self, key: str, data: bytes) -> bool:
        staged, target = self._staged(key, data)
        try:
            os.link(staged, target)  # fails if the target exists: the first writer wins
        except FileExistsError:
            return False
        finally:
            staged.unlink()
        self._sync_directory(target.parent)
        return True

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectMissing(key) from None

    def keys(self, folder: str) -> list[str]:
        base = self.path(folder) if folder else self.root
        found = []
        for directory, _, files in os.walk(base):
            for name in files:
                if name.endswith(".partial") and name.startswith("."):
                    continue  # a write in flight, or one a crash left behind
                found.append(Path(directory, name).relative_to(self.root).as_posix())
        return sorted(found)

    def delete(self, key: str) -> None:
        target = self.path(key)
        try:
            target.unlink()
        except FileNotFoundError:
            return
        self._sync_directory(target.parent)  # a deleted key must not come back after a power cut
        for directory in target.parents:  # a folder emptied by it goes too, as a bucket has no folders
            if directory == self.root or not directory.is_relative_to(self.root):
                break
            try:
                directory.rmdir()
            except OSError:
                break


class _Bucket:
    """Objects in an S3 bucket under a prefix, through obstore."""

    def __init__(self, url: str, storage: ObjectStorage) -> None:
        from obstore.store import S3Store

        config: dict[str, object] = {}
        if storage.endpoint:
            config |= {"endpoint": storage.endpoint, "virtual_hosted_style_request": False}
        if storage.region:
            config["region"] = storage.region
        elif not os.environ.get("AWS_REGION") and not os.environ.get("AWS_DEFAULT_REGION"):
            config["region"] = "us-east-1"
        if storage.access_key_id:
            config["access_key_id"] = storage.access_key_id
        if storage.secret_access_key is not None:
            config["secret_access_key"] = storage.secret_access_key.get_secret_value()
        options = {"allow_http": True} if storage.allow_http else {}
        self.url = url
        self._store = S3Store.from_url(url, config=config, client_options=options)

    def _call(self, what: str, call, *args, **kwargs):
        import obstore.exceptions as errors

        try:
            return call(*args, **kwargs)
        except FileNotFoundError:
            raise
        except errors.AlreadyExistsError:
            raise
        except (errors.BaseError, OSError) as exc:
            raise StorageUnavailable(
                f"object storage {self.url} refused {what}: {exc}; check FEEDLOOP_STORAGE__URL, __ENDPOINT and "
                "the credentials (FEEDLOOP_STORAGE__ACCESS_KEY_ID or AWS_*), and that the bucket exists"
            ) from exc

    def put(self, key: str, data: bytes) -> None:
        import obstore

        self._call(f"writing {key}", obstore.put, self._store, key, data)

    def put_new(self, key: str, data: bytes) -> bool:
        import obstore
        import obstore.exceptions as errors

        try:
            self._call(f"writing {key}", obstore.put, self._store, key, data, mode="create")
        except errors.AlreadyExistsError:
            return False
        return True

    def get(self, key: str) -> bytes:
        import obstore

        try:
            return self._call(f"reading {key}", obstore.get, self._store, key).bytes().to_bytes()
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def keys(self, folder: str) -> list[str]:
        import obstore

        listed = self._call(f"listing {folder}", lambda: obstore.list(self._store, folder or None).collect())
        return sorted(entry["path"] for entry in listed)

    def delete(self, key: str) -> None:
        import obstore

        try:
            self._call(f"deleting {key}", obstore.delete, self._store, key)
        except FileNotFoundError:
            pass  # some servers answer 404 for a key that is gone: gone is what was asked


class ObjectStore:
    """Shared state under one URL: ``file:///dir`` or ``s3://bucket/prefix``.

    Keys are relative POSIX paths (``batches/b-1/manifest.json``); on a ``file://`` store
    they are files under the directory, where they always were.

    >>> import tempfile
    >>> store = ObjectStore(f"file://{tempfile.mkdtemp()}")
    >>> store.put("batches/b-1/manifest.json", b"{}")
    >>> store.get("batches/b-1/manifest.json"), store.put_new("batches/b-1/manifest.json", b"[]")
    (b'{}', False)
    >>> store.keys("batches/"), store.find("nope")
    (['batches/b-1/manifest.json'], None)
    """

    def __init__(self, url: str, storage: ObjectStorage | None = None) -> None:
        self.url, self.storage = url, storage or ObjectStorage()
        parts = urlsplit(url)
        if parts.scheme == "file":
            self._backend: _Backend = _Directory(Path(unquote(parts.netloc + parts.path)))  # as_uri() quotes " ", "[]"
        elif parts.scheme == "s3":
            if not parts.netloc:
                raise ValueError(f"storage URL {url}: name the bucket, s3://bucket/prefix")
            self._backend = _Bucket(url, self.storage)
        else:
            raise ValueError(f"storage URL {url}: use file:///path or s3://bucket/prefix")

    def __reduce__(self):  # a store travels to child processes and checkpoints as its URL
        return ObjectStore, (self.url, self.storage)

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self._backend, _Directory)

    def local_path(self, key: str = "") -> Path | None:
        """Where the key's file is, on a ``file://`` store (for tools that read paths, such as
        vLLM); None on object storage."""
        return self._backend.path(key) if isinstance(self._backend, _Directory) else None

    def put(self, key: str, data: bytes) -> None:
        """Write the object, replacing any; atomic: readers see the old bytes or these."""
        self._backend.put(_checked(key), data)

    def put_new(self, key: str, data: bytes) -> bool:
        """Write the object only if no object has the key; True when this call wrote it."""
        return self._backend.put_new(_checked(key), data)

    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectMissing` if there is none."""
        return self._backend.get(_checked(key))

    def find(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        try:
            return self.get(key)
        except ObjectMissing:
            return None

    def exists(self, key: str) -> bool:
        return self.find(key) is not None

    def keys(self, folder: str = "") -> list[str]:
        """Every key under ``folder`` (``"archive"`` or ``"archive/"``: whole names, so not
        ``archived.txt``), at any depth, sorted; every key when it is empty."""
        return self._backend.keys(_checked(folder.rstrip("/")) if folder.strip("/") else "")

    def delete(self, key: str) -> None:
        """Remove the object; no error if there is none."""
        self._backend.delete(_checked(key))

    def delete_folder(self, folder: str) -> int:
        """Remove every object under ``folder``; how many there were."""
        if not folder.strip("/"):
            raise ValueError("delete_folder: name a folder; the store's root is not one to empty by accident")
        keys = self.keys(folder)
        for key in keys:
            self.delete(key)
        return len(keys)


def _checked(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"object key {key!r}: a relative path of non-empty names, without '.' or '..'")
    return key
