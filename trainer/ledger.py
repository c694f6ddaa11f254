"""The deployment's epsilon ledger, on the object store: what every DP training run spent.

Runs compose by adding their epsilons (``trainer.privacy``), so the ledger is one sum over
batches, and it guards a promise made to users: the budget is never exceeded. Trainers on
several hosts share it through ``settings.objects``; the overview and ``/metrics`` read it
there, and neither imports torch (which ``trainer.privacy`` does), so it lives here.

Why versions written once, and not one object rewritten or one object per run. An object
store has no locks, and a plain read-modify-write of one object loses a spend whenever two
trainers update it at once: the later put replaces the earlier. One object per run avoids
the lost update, but the budget check would still race: two trainers each sum the others'
runs, each finds room for itself, and together they pass the budget. So each change writes
the whole ledger as the next version, ``ledger/privacy/<n>.json``, with ``put_new``: it
writes only if no one wrote version ``n`` first; the loser reads the new version and checks
and applies its change again. That conditional write is a compare-and-swap, the check and the
spend happen on one version, and no spend can be lost or overdrawn. Versions are never
deleted, so a reader (list, then get the newest) never races a writer, and the ledger's
history, who reserved what and when it settled, stays as an audit trail. A DP budget allows
few runs, and each run writes two versions (reserve, settle), so the folder stays small.

A ledger written before object storage, ``privacy_ledger.json`` in the adapters directory,
counts as version 0 while no version exists: the first change writes its entries into
version 1, and from then on the file is no longer read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from streams.objects import ObjectStore
from trainer.config import PrivacyConfig

log = structlog.get_logger(__name__)

FOLDER = "ledger/privacy"
LEGACY_FILE = "privacy_ledger.json"  # in the adapters directory, before object storage
MAX_TRIES = 50  # a conflict means another trainer changed the ledger in the same instant

Entries = dict[str, dict[str, Any]]


class PrivacyBudgetExceeded(RuntimeError):
    """The next run would spend more epsilon than the deployment's budget has left."""


class PrivacyLedger:
    """Epsilon spent per batch, as numbered versions of the whole ledger (module doc).

    A batch's entry is written before training ("reserved") and replaced, not added to,
    when a crashed batch is retried: the crashed run released nothing.
    """

    def __init__(self, objects: ObjectStore, config: PrivacyConfig, *, legacy: Path | None = None) -> None:
        """``legacy``: the adapters directory's ``privacy_ledger.json`` of before, if any."""
        self.objects, self.config, self.legacy = objects, config, legacy

    def _newest(self) -> tuple[int, Entries]:
        versions = [int(name.stem) for name in map(PurePosixPath, self.objects.keys(FOLDER)) if name.stem.isdigit()]
        if versions:
            newest = max(versions)
            return newest, json.loads(self.objects.get(_version_key(newest)))
        if self.legacy is not None and self.legacy.exists():
            return 0, json.loads(self.legacy.read_text())
        return 0, {}

    def entries(self) -> Entries:
        return self._newest()[1]

    def spent(self, excluding: str | None = None) -> float:
        return spent_epsilon(self.entries(), excluding)

    def reserve(self, batch_id: str, epsilon: float) -> None:
        def reserved(entries: Entries) -> Entries:
            spent = spent_epsilon(entries, excluding=batch_id)
            if spent + epsilon > self.config.budget_epsilon:
                raise PrivacyBudgetExceeded(
                    f"batch {batch_id} needs epsilon {epsilon:.3f} but {spent:.3f} of the budget "
                    f"{self.config.budget_epsilon:.3f} is spent; refusing to train "
                    "(raise privacy.budget_epsilon, more noise, fewer epochs, or stop DP training)"
                )
            return {**entries, batch_id: {"epsilon": epsilon, "delta": self.config.delta, "state": "reserved"}}

        self._change(reserved)

    def settle(self, batch_id: str, adapter: str, state: str) -> None:
        self._change(lambda entries: {**entries, batch_id: {**entries[batch_id], "adapter": adapter, "state": state}})

    def _change(self, change: Callable[[Entries], Entries]) -> None:
        """Apply ``change`` to the newest version and write the result as the next one; again
        on the new newest if another writer took that number first."""
        for _ in range(MAX_TRIES):
            version, entries = self._newest()
            data = (json.dumps(change(entries), indent=2, sort_keys=True) + "\n").encode()
            if self.objects.put_new(_version_key(version + 1), data):
                if version == 0 and entries:
                    log.info("privacy.ledger_migrated", source=str(self.legacy), to=self.objects.url, folder=FOLDER,
                             hint="the old file is read no more and may be deleted")  # fmt: skip
                return
            log.info("privacy.ledger_changed_meanwhile", version=version + 1)
        raise RuntimeError(f"the privacy ledger {self.objects.url} {FOLDER}/ changed under each of {MAX_TRIES} tries; "
                           "is a process rewriting it in a loop? Stop it and train again")  # fmt: skip


def _version_key(version: int) -> str:
    return f"{FOLDER}/{version:010d}.json"


def spent_epsilon(entries: Entries, excluding: str | None = None) -> float:
    """Every run counts, reserved ones too: they are training, or about to."""
    return sum(float(e["epsilon"]) for batch_id, e in entries.items() if batch_id != excluding)
