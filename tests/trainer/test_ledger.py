"""The privacy ledger on the object store (trainer/ledger.py): on a directory and on a real
S3 server (SeaweedFS), concurrent trainers neither lose a spend nor overdraw the budget."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.gateway.metrics import store_gauges
from app.overview import OverviewSource
from app.settings import Settings
from streams.objects import ObjectStorage, ObjectStore
from trainer.config import PrivacyConfig
from trainer.ledger import FOLDER, LEGACY_FILE, PrivacyBudgetExceeded, PrivacyLedger

CONFIG = PrivacyConfig(enabled=True, budget_epsilon=10.0)


@pytest.fixture(params=["file", "s3"])
def storage(request, tmp_path: Path) -> ObjectStorage:
    if request.param == "file":
        return ObjectStorage(url=(tmp_path / "objects").as_uri())
    return request.getfixturevalue("s3_storage")


def ledger(storage: ObjectStorage, config: PrivacyConfig = CONFIG, **options) -> PrivacyLedger:
    """A trainer's own ledger: its own client of the shared store, as on another host."""
    return PrivacyLedger(ObjectStore(storage.url, storage), config, **options)


class InLockstep(PrivacyLedger):
    """Reads the newest version, then waits until the other writer has read it too: both then
    write the same next version, and one of them must lose and try again."""

    def __init__(self, *args, barrier: threading.Barrier, **options) -> None:
        super().__init__(*args, **options)
        self.barrier, self.waited = barrier, False

    def _newest(self):
        newest = super()._newest()
        if not self.waited:
            self.waited = True
            self.barrier.wait(timeout=30)
        return newest


def test_spends_of_two_trainers_writing_at_once_are_both_counted(storage: ObjectStorage) -> None:
    barrier = threading.Barrier(2)
    writers = [InLockstep(ObjectStore(storage.url, storage), CONFIG, barrier=barrier) for _ in range(2)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda job: job[0].reserve(job[1], job[2]), [(writers[0], "batch-a", 1.5),
                                                                      (writers[1], "batch-b", 2.0)]))  # fmt: skip
    reader = ledger(storage)
    assert reader.spent() == pytest.approx(3.5)
    assert {batch: entry["state"] for batch, entry in reader.entries().items()} == {
        "batch-a": "reserved", "batch-b": "reserved"}
    assert len(ObjectStore(storage.url, storage).keys(FOLDER)) == 2  # one version each, the loser's after


def test_two_trainers_reserving_at_once_cannot_overdraw_the_budget(storage: ObjectStorage) -> None:
    barrier = threading.Barrier(2)
    tight = PrivacyConfig(enabled=True, budget_epsilon=3.0)
    writers = [InLockstep(ObjectStore(storage.url, storage), tight, barrier=barrier) for _ in range(2)]

    def reserve(job) -> str:
        try:
            job[0].reserve(job[1], 2.0)
        except PrivacyBudgetExceeded:
            return "refused"
        return "reserved"

    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(reserve, [(writers[0], "batch-a"), (writers[1], "batch-b")]))
    assert sorted(outcomes) == ["refused", "reserved"]  # both saw 0 spent; the check ran again on the new version
    assert ledger(storage, tight).spent() == pytest.approx(2.0)


def test_settling_keeps_the_spend_and_a_retried_batch_replaces_its_entry(storage: ObjectStorage) -> None:
    trainer = ledger(storage)
    trainer.reserve("batch-a", 1.0)
    trainer.reserve("batch-a", 1.25)  # retried after a crash: the crashed run released nothing
    trainer.settle("batch-a", "adapter-1", "trained")
    assert ledger(storage).entries() == {"batch-a": {"epsilon": 1.25, "delta": CONFIG.delta, "state": "trained",
                                                     "adapter": "adapter-1"}}  # fmt: skip


def test_a_ledger_file_of_before_counts_until_its_entries_move_into_the_store(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    old = {"batch-old": {"epsilon": 4.0, "delta": 1e-5, "state": "trained", "adapter": "a-0"}}
    (adapters / LEGACY_FILE).write_text(json.dumps(old))
    store = ObjectStore((tmp_path / "data").as_uri())
    trainer = PrivacyLedger(store, CONFIG, legacy=adapters / LEGACY_FILE)
    assert trainer.spent() == 4.0
    with pytest.raises(PrivacyBudgetExceeded, match="4.000 of the budget"):
        trainer.reserve("batch-new", 7.0)
    trainer.reserve("batch-new", 5.0)
    (adapters / LEGACY_FILE).unlink()  # migrated: the store's version holds both
    assert PrivacyLedger(store, CONFIG).entries().keys() == {"batch-old", "batch-new"}
    assert PrivacyLedger(store, CONFIG).spent() == 9.0


def test_the_overview_and_metrics_read_the_ledger_from_s3(tmp_path: Path, sessions, s3_storage: ObjectStorage) -> None:
    settings = Settings(data_dir=tmp_path, storage=s3_storage,
                        trainer={"privacy": {"enabled": True, "budget_epsilon": 8.0}})  # fmt: skip
    trainer = PrivacyLedger(settings.objects, settings.trainer.privacy)
    trainer.reserve("batch-1", 1.5)
    trainer.settle("batch-1", "adapter-1", "trained")
    ledger(s3_storage, settings.trainer.privacy).reserve("batch-2", 0.5)  # another trainer's host
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "ledger").exists()  # nothing on this disk

    privacy = OverviewSource(settings, sessions).read().privacy
    assert (privacy.spent_epsilon, privacy.budget_epsilon) == (pytest.approx(2.0), 8.0)
    assert privacy.entries["batch-1"]["adapter"] == "adapter-1"
    gauges = {family.name: family.samples[0].value for family in store_gauges(OverviewSource(settings, sessions).read())
              if family.name.startswith("feedloop_privacy")}  # fmt: skip
    assert gauges == {"feedloop_privacy_epsilon_spent": pytest.approx(2.0), "feedloop_privacy_epsilon_budget": 8.0}
