"""Adapters on the shared store: the trainer publishes them, every host stages a local copy.

An adapter is two files (``trainer.adapter_validation.ADAPTER_FILES``) under its immutable
name: objects ``<name>/adapter_config.json`` and ``<name>/adapter_model.safetensors`` of
the adapters' store (:func:`adapter_objects`). vLLM and peft read directories, so each host
that needs one *stages* it: a local directory with the same bytes, written beside and
renamed, so a half-downloaded adapter is never seen under its name.

On one machine (the default) the store *is* the local adapters directory, so publishing and
staging move nothing. With ``FEEDLOOP_STORAGE__URL`` on object storage:

- the trainer trains into its local adapters directory and uploads the two files before it
  registers the adapter (``trainer.registry``): the ``adapter_ready`` event is the commit,
  so a crash mid-upload leaves objects no event names, and the next attempt uploads again;
- the swap controller stages an adapter before validating it: validation happens on local
  bytes, before any replica hears of the name;
- vLLM replicas on their own hosts fetch an adapter only once the controller has
  *approved* it: ``<name>/approved.json`` holds the sha256 it validated, written before the
  first replica is asked to load it and deleted when the adapter leaves the served set.
  feedloop's LoRA resolver in the vLLM process (``trainer.lora_resolver``) stages an
  approved adapter and checks its digest against the approval; a name without one is
  unknown to vLLM, so a client cannot bring back a retired adapter by naming it.

Why a resolver and not ``/v1/load_lora_adapter``: that endpoint loads a path on the
replica's own disk, which the controller on another host cannot write. vLLM calls its LoRA
resolvers for a request naming an adapter it does not have; the controller's first request
for a new adapter is that request (``trainer.replicas.ReplicaClient.fetch_adapter``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import structlog

from streams.objects import ObjectMissing, ObjectStorage, ObjectStore
from trainer.adapter_validation import ADAPTER_FILES, adapter_sha256, check_name

log = structlog.get_logger(__name__)

APPROVAL = "approved.json"


def adapter_objects(storage: ObjectStorage, adapters_dir: Path) -> ObjectStore:
    """The adapters' store: the ``adapters`` folder of ``FEEDLOOP_STORAGE__URL``, or, with
    none, the local adapters directory itself."""
    if storage.url:
        return ObjectStore(storage.url.rstrip("/") + "/adapters", storage)
    return ObjectStore(Path(adapters_dir).absolute().as_uri(), storage)


class AdapterStore:
    """Adapters by name in ``objects``; ``local_dir`` is this host's adapters directory.

    >>> import tempfile; from pathlib import Path
    >>> local = Path(tempfile.mkdtemp())
    >>> store = AdapterStore(ObjectStore(local.as_uri()), local)
    >>> store.shared, store.stage("a-1") == local / "a-1"   # the store is the directory
    (True, True)
    """

    def __init__(self, objects: ObjectStore, local_dir: Path) -> None:
        self.objects, self.local_dir = objects, Path(local_dir)
        root = objects.local_path()
        self.shared = root is not None and root.resolve() == self.local_dir.resolve()

    def publish(self, name: str, directory: Path) -> None:
        """Upload the adapter's files (idempotent: the same bytes under an immutable name)."""
        if self.shared and Path(directory).resolve() == (self.local_dir / name).resolve():
            return
        for file in ADAPTER_FILES:
            self.objects.put(f"{check_name(name)}/{file}", (Path(directory) / file).read_bytes())
        log.info("adapter.uploaded", adapter=name, store=self.objects.url)

    def stage(self, name: str, sha256: str | None = None, into: Path | None = None) -> Path:
        """A local directory holding the adapter: the store's own when the store is this
        directory, else a copy under ``into`` (default: the local adapters directory), fetched
        again unless it has the digest ``sha256``. Verifying the bytes is the validator's job
        (or :meth:`fetch_approved`'s); a missing object raises :class:`ObjectMissing`."""
        check_name(name)
        if self.shared and into is None:
            return self.local_dir / name
        target = Path(into or self.local_dir) / name
        if target.is_dir() and (sha256 is None or _digest(target) == sha256):
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}.", suffix=".partial"))
        try:
            for file in ADAPTER_FILES:
                (staging / file).write_bytes(self.objects.get(f"{name}/{file}"))
                os.chmod(staging / file, 0o644)  # vLLM may run as another user
            os.chmod(staging, 0o755)
            if target.exists():
                shutil.rmtree(target)  # another digest: a copy from before the name's files were final
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info("adapter.staged", adapter=name, path=str(target))
        return target

    # --- approval: what replicas that fetch for themselves may serve ---------------------------

    def approve(self, name: str, sha256: str) -> None:
        self.objects.put(f"{check_name(name)}/{APPROVAL}", json.dumps({"sha256": sha256}).encode())

    def withdraw(self, name: str) -> None:
        self.objects.delete(f"{check_name(name)}/{APPROVAL}")

    def approved(self, name: str) -> str | None:
        """The digest the controller approved ``name`` with, or None."""
        raw = self.objects.find(f"{check_name(name)}/{APPROVAL}")
        if raw is None:
            return None
        try:
            return str(json.loads(raw)["sha256"])
        except (ValueError, KeyError, TypeError):
            log.error("adapter.approval_unreadable", adapter=name)
            return None

    def fetch_approved(self, name: str, into: Path) -> Path | None:
        """The resolver's pure core: the adapter staged under ``into`` if it is approved and
        its bytes have the approved digest; None otherwise (vLLM then answers 404)."""
        try:
            sha256 = self.approved(name)
        except ValueError:  # not an adapter name: vLLM asks for any model a client names
            return None
        if sha256 is None:
            return None
        try:
            path = self.stage(name, sha256, into=into)
        except ObjectMissing:
            log.error("adapter.approved_but_missing", adapter=name)
            return None
        if _digest(path) != sha256:
            log.error("adapter.digest_mismatch", adapter=name, approved=sha256)
            return None
        return path


def _digest(directory: Path) -> str | None:
    try:
        return adapter_sha256(directory)
    except OSError:
        return None
