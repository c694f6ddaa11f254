"""Adapter artifacts and the store: exactly-once batches, immutable names, atomic publishing.

Layout under the adapters directory::

    adapter-000007-1a2b3c4d/        published adapters (vLLM loads these), files 0644
    _rejected/adapter-000008-.../   candidates the gate refused, kept for inspection
    _staging/<batch_id>/            work of the batch in training; wiped on every attempt

One training at a time is not kept here: each host has an adapters directory of its own, so
the trainer's lock is held in the store (``trainer.lock``: a PostgreSQL advisory lock, or a
file lock beside the SQLite database).

Batch rows move emitted -> training -> trained | failed. A crash leaves "training"; the
next ``train_batch`` on that batch trains it again from scratch. Between publishing the
directory and committing the rows, a crash is covered by ``_staging/<id>/publish.json``
(written before the move): the retry finishes that registration instead of training again.
"""

import hashlib
import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from streams.store import Adapter, Batch, BatchStatus
from streams.contract import AdapterReady, AdapterState
from streams.training_data import BatchManifest

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
NAME = re.compile(r"^adapter-(\d{6})-[0-9a-f]{8}$")
# A batch id as the curator makes them (<run>.batch-p<partition>-<n>): one path component, never "..".
SAFE_BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")


class BatchNotTrainable(RuntimeError):
    """This batch cannot be trained: unreadable, out of attempts, or its id is no plain name.

    The trainer worker marks it failed with this message and goes on to the next batch:
    raised out of its handler, it would stop the worker on the same record at every restart."""


class BatchAlreadyDone(BatchNotTrainable):
    """This batch is trained or failed already (its batch_emitted was read again)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_version() -> str:
    """Package version plus a hash of the trainer's sources: names the code that trained an adapter."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("feedloop")
    except PackageNotFoundError:
        package = "0+unknown"
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + source.read_bytes())
    return f"{package}+{digest.hexdigest()[:12]}"


class Registry:
    def __init__(self, sessions: sessionmaker, adapters_dir: Path) -> None:
        self.sessions, self.dir = sessions, adapters_dir

    # --- batches ---------------------------------------------------------------------------

    def batch(self, batch_id: str) -> Batch | None:
        with self.sessions() as session:
            return session.get(Batch, batch_id)

    def claim(self, manifest: BatchManifest, manifest_sha256: str, folder: str) -> None:
        """Mark the batch "training" (creating its row, at ``folder`` of the store, if the
        curator's is missing)."""
        with self.sessions.begin() as session:
            row = session.get(Batch, manifest.batch_id)
            if row is None:
                row = Batch(
                    batch_id=manifest.batch_id,
                    path=folder,
                    manifest_sha256=manifest_sha256,
                    example_count=sum(manifest.counts.values()),
                    trigger=manifest.trigger,
                    manifest=manifest.model_dump(mode="json"),
                )
                session.add(row)
            if row.status in (BatchStatus.TRAINED, BatchStatus.FAILED):
                raise BatchAlreadyDone(f"batch {manifest.batch_id} is already {row.status}")
            row.status = BatchStatus.TRAINING

    def fail_batch(self, batch_id: str, reason: str) -> None:
        """Mark it failed, with why (a batch the curator never recorded has no row to mark)."""
        with self.sessions.begin() as session:
            if (row := session.get(Batch, batch_id)) is not None:
                row.status, row.reason = BatchStatus.FAILED, reason

    def reopen(self, batch_id: str) -> Batch:
        """A failed batch back to emitted, its attempts forgotten: ``feedloop train --retry``."""
        with self.sessions.begin() as session:
            row = session.get(Batch, batch_id)
            if row is None:
                raise LookupError(f"no batch {batch_id!r} in the store (feedloop status lists the recent ones)")
            if row.status != BatchStatus.FAILED:
                raise ValueError(f"batch {batch_id} is {row.status}, not failed: only a failed batch is retried")
            row.status, row.reason, row.adapter = BatchStatus.EMITTED, None, None
        self.clean_staging(batch_id)
        return row

    def adapter(self, name: str) -> Adapter | None:
        with self.sessions() as session:
            return session.get(Adapter, name)

    # --- staging ---------------------------------------------------------------------------

    def staging(self, batch_id: str) -> Path:
        if not SAFE_BATCH_ID.fullmatch(batch_id):  # it names a directory that is emptied
            raise BatchNotTrainable(f"batch id {batch_id!r} is not a plain name ({SAFE_BATCH_ID.pattern})")
        return self.dir / "_staging" / batch_id

    def start_attempt(self, batch_id: str) -> int:
        """Count attempts (they survive crashes) and give the attempt an empty work directory."""
        staging = self.staging(batch_id)
        counter = staging.parent / f"{batch_id}.attempts"
        attempt = int(counter.read_text()) + 1 if counter.exists() else 1
        staging.parent.mkdir(parents=True, exist_ok=True)
        counter.write_text(str(attempt))
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return attempt

    def clean_staging(self, batch_id: str) -> None:
        shutil.rmtree(self.staging(batch_id), ignore_errors=True)
        (self.staging(batch_id).parent / f"{batch_id}.attempts").unlink(missing_ok=True)

    # --- adapters --------------------------------------------------------------------------

    def next_name(self, weights_sha256: str) -> str:
        """adapter-<sequence>-<weights hash>: never reused, since sequences only grow."""
        with self.sessions() as session:
            names = session.scalars(select(Adapter.name)).all()
        sequences = [int(m.group(1)) for m in map(NAME.match, names) if m]
        return f"adapter-{max(sequences, default=0) + 1:06d}-{weights_sha256[:8]}"

    def publish(self, candidate: Path, row: dict[str, Any], batch_id: str) -> Adapter:
        """Move the candidate to its final place and register it with its batch, crash-safely.

        ``row`` holds the Adapter columns except path; ``state`` ready publishes it for
        serving, failed files it under _rejected/ with its reason.
        """
        final = self.dir / ("_rejected" if row["state"] == AdapterState.FAILED else "") / row["name"]
        row = {**row, "path": str(final)}
        intent = self.staging(batch_id) / "publish.json"
        intent.write_text(json.dumps(row))
        for name in ADAPTER_FILES:
            # safetensors writes 0600; vLLM may run as another user.
            os.chmod(candidate / name, 0o644)
        os.chmod(candidate, 0o755)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(candidate, final)
        return self.finish_publish(batch_id)

    def finish_publish(self, batch_id: str) -> Adapter:
        """Commit the rows of a published directory (also after a crash right after the move)."""
        row = json.loads((self.staging(batch_id) / "publish.json").read_text())
        with self.sessions.begin() as session:
            adapter = session.get(Adapter, row["name"]) or Adapter(**row)
            session.add(adapter)
            batch = session.get(Batch, batch_id)
            passed = row["state"] == AdapterState.READY
            batch.status = BatchStatus.TRAINED if passed else BatchStatus.FAILED
            batch.reason = None if passed else f"the gate refused {row['name']}: {row['reason']}"
            batch.adapter = row["name"]
        self.clean_staging(batch_id)
        return adapter

    def pending_publish(self, batch_id: str) -> bool:
        """A crash hit between the move and the commit: the move is done, finish the commit."""
        intent = self.staging(batch_id) / "publish.json"
        return intent.exists() and Path(json.loads(intent.read_text())["path"]).is_dir()


def adapter_ready(adapter: Adapter) -> AdapterReady:
    """The control event announcing a published adapter; its id is stable, so re-sending dedupes."""
    lineage = adapter.lineage
    return AdapterReady(
        event_id=f"adapter-ready-{adapter.name}",
        occurred_at=datetime.fromisoformat(lineage["registered_at"]),
        source="trainer",
        adapter=adapter.name,
        path=adapter.path,
        sha256=adapter.sha256,
        base_model_sha256=adapter.base_model_sha256,
        parent=adapter.parent,
        batch_ids=lineage["batch_ids"],
        metrics=lineage["eval"]["candidate"],
    )


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()
