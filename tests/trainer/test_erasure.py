"""Erasure in the registry: untrained batches lose the user's records (nobody else's bytes
change), the adapters trained on them are named, and erasing again answers the same.

On SQLite and on PostgreSQL, with the real key store and the real batch format."""

import hashlib
import json
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import func, select

import migrations
from app.erasure import erase_user
from app.overview import OverviewSource
from app.settings import Settings
from app.status import render_status
from streams.contract import BatchEmitted, Message, utcnow
from streams.pseudonyms import KeyStore, Pseudonymizer, user_identity
from streams.store import Adapter, Batch, Erasure, make_engine, make_sessionmaker
from streams.objects import ObjectStore
from streams.training_data import MANIFEST, PART_FILES, BatchFolder, LabelRecord, SftRecord, read_batch, write_batch
from trainer.erasure import apply_erasures, mark_announced
from trainer.worker import TrainerWorker
from tests.conftest import make_settings

APP = "app-a"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A migrated store of the test's own; PostgreSQL's is emptied again afterwards."""
    sqlite = request.param == "sqlite"
    url = f"sqlite:///{tmp_path / 'feedloop.db'}" if sqlite else request.getfixturevalue("postgres_url")
    migrations.upgrade(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()
    if not sqlite:
        migrations.downgrade(url, "base")


def pseudonym(key_dir: Path, user_id: str, app_id: str = APP) -> str:
    return Pseudonymizer(KeyStore.in_directory(key_dir)).pseudonym(user_identity(app_id, user_id))


def sft(example: str, text: str) -> SftRecord:
    return SftRecord(example_id=f"{example}:accepted", cohort="all", domain="general", source="thumbs",
                     event_ids=[f"ev-{example}"], messages=[Message(role="user", content=f"q {text}"),
                                                            Message(role="assistant", content=f"a {text}")])


def label(example: str, text: str) -> LabelRecord:
    return LabelRecord(example_id=f"{example}:label", cohort="all", domain="general", source="thumbs",
                       event_ids=[f"ev-{example}"], prompt=[Message(role="user", content=f"q {text}")],
                       completion=f"a {text}", desirable=True)


def batch(sessions, data_dir: Path, batch_id: str, owners: dict[str, list], *, status: str = "emitted",
          adapter: str | None = None, heldout: dict[str, list] | None = None) -> BatchFolder:
    """A batch in the curator's format (``owners``: pseudonym -> records) and its row."""
    heldout = heldout or {}
    users = {user: [r.example_id for r in owners.get(user, []) + heldout.get(user, [])] for user in {*owners, *heldout}}
    directory = BatchFolder.of(objects(data_dir), batch_id)
    manifest, digest = write_batch(directory, batch_id=batch_id, trigger="size", event_time="2026-12-03T10:00:00+00:00",
                                   records=[r for rs in owners.values() for r in rs], loss_weights={"explicit": 1.0},
                                   heldout=[r for rs in heldout.values() for r in rs], users=users)  # fmt: skip
    with sessions.begin() as session:
        session.add(Batch(batch_id=batch_id, path=f"batches/{batch_id}", manifest_sha256=digest,
                          example_count=sum(map(len, owners.values())), trigger="size", status=status,
                          adapter=adapter, manifest=manifest.model_dump(mode="json")))  # fmt: skip
    return directory


def adapter(sessions, name: str, parent: str | None = None, state: str = "ready") -> None:
    with sessions.begin() as session:
        session.add(Adapter(name=name, state=state, path=f"/adapters/{name}", sha256="0" * 64,
                            base_model_sha256="1" * 64, parent=parent, lineage={}))  # fmt: skip


def objects(data_dir: Path) -> ObjectStore:
    return ObjectStore(data_dir.as_uri())


def lines(batch: BatchFolder) -> dict[str, list[bytes]]:
    """Each part's lines, under its signal's plain name, wherever the manifest names the part."""
    manifest = read_batch(batch)[0]
    return {PART_FILES[signal]: batch.store.get(batch.key(manifest.part(signal))).splitlines(keepends=True)
            for signal in manifest.files}


@pytest.fixture
def world(store, tmp_path):
    """Two users of app-a; adapter-1 trained on a batch with 'gone', adapter-2 on one without,
    adapter-3 continued from adapter-1; one batch waiting to be trained holds both users."""
    data_dir, key_dir = tmp_path / "data", tmp_path / "keys"
    gone, stays = pseudonym(key_dir, "gone"), pseudonym(key_dir, "stays")
    for name, parent in (("adapter-1", None), ("adapter-2", None), ("adapter-3", "adapter-1")):
        adapter(store, name, parent)
    batch(store, data_dir, "batch-1", {gone: [sft("g1", "gone")], stays: [sft("s1", "stays")]}, status="trained",
          adapter="adapter-1")
    batch(store, data_dir, "batch-2", {stays: [sft("s2", "stays")]}, status="trained", adapter="adapter-2")
    batch(store, data_dir, "batch-3", {stays: [sft("s3", "stays")]}, status="trained", adapter="adapter-3")
    waiting = batch(store, data_dir, "batch-4",
                    {gone: [sft("g4", "gone"), label("g5", "gone")], stays: [sft("s4", "stays"), label("s5", "stays")]},
                    heldout={gone: [sft("g6", "gone")], stays: [sft("s6", "stays")]})  # fmt: skip
    return store, data_dir, key_dir, gone, stays, waiting


def test_erase_names_the_adapters_trained_on_the_user_and_their_descendants_only(world):
    sessions, data_dir, key_dir, gone, stays, waiting = world
    answer, announce = erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")
    assert answer.retrain_adapters == ["adapter-1", "adapter-3"], "adapter-2 never saw the user"
    assert not answer.already_erased and announce.pseudonym == gone and announce.app_id == APP
    assert "gone" not in announce.model_dump_json(), "the event carries the pseudonym, never the user id"
    assert Pseudonymizer(KeyStore.in_directory(key_dir)).is_erased(user_identity(APP, "gone"))


def test_an_untrained_batch_loses_the_users_records_and_keeps_everyone_elses_bytes(world):
    sessions, data_dir, key_dir, gone, stays, waiting = world
    before = lines(waiting)
    trained_before = lines(BatchFolder.of(objects(data_dir), "batch-1"))
    erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")
    assert apply_erasures(sessions, objects(data_dir), data_dir / "adapters") == ["batch-4"]

    manifest, records = read_batch(waiting)  # the checksums hold
    assert manifest.users.keys() == {stays}
    kept_ids = {r.example_id for rs in records.values() for r in rs}
    assert kept_ids == {"s4:accepted", "s5:label", "s6:accepted"}
    after = lines(waiting)
    gone_ids = {"g4:accepted", "g5:label", "g6:accepted"}
    for name, old in before.items():
        others = [line for line in old if json.loads(line)["example_id"] not in gone_ids]
        assert after.get(name, []) == others, name
    assert sum(map(len, after.values())) == 3
    assert lines(BatchFolder.of(objects(data_dir), "batch-1")) == trained_before, "a trained batch is history"
    with sessions() as session:
        row = session.get(Batch, "batch-4")
        assert row.manifest_sha256 == hashlib.sha256(waiting.store.get(waiting.key(MANIFEST))).hexdigest()
        assert row.example_count == 2 and gone not in row.manifest["users"]
        erasure = session.get(Erasure, gone)
        assert erasure.recut_batches == ["batch-4"] and erasure.applied_at is not None
    left = b"".join(waiting.store.get(key) for key in waiting.store.keys(waiting.folder))
    for erased in (b"gone", b"g4:", b"g5:", b"g6:", gone.encode()):
        assert erased not in left, f"{erased!r} is still in an object of the batch"


def test_erasing_again_answers_the_same_and_does_nothing_again(world):
    sessions, data_dir, key_dir, gone, stays, waiting = world
    first, announce = erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")
    again, announce_again = erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")
    assert announce_again == announce, "not announced yet: the repeat announces it"
    mark_announced(sessions, gone)
    apply_erasures(sessions, objects(data_dir), data_dir / "adapters")
    recut = waiting.store.get(waiting.key(MANIFEST))

    third, announce_third = erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")
    assert announce_third is None
    for repeat in (again, third):
        assert repeat.model_dump() == {**first.model_dump(), "already_erased": True}
    assert Pseudonymizer(KeyStore.in_directory(key_dir)).erased_at(user_identity(APP, "gone")) == first.erased_at
    assert apply_erasures(sessions, objects(data_dir), data_dir / "adapters") == []
    assert waiting.store.get(waiting.key(MANIFEST)) == recut
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Erasure)) == 1


def test_a_user_the_key_store_never_saw_is_erased_with_nothing_to_retrain(world):
    sessions, data_dir, key_dir, *_ = world
    for already in (False, True):
        answer, announce = erase_user(KeyStore.in_directory(key_dir), sessions, APP, "never-seen")
        assert (answer.retrain_adapters, answer.already_erased, announce) == ([], already, None)


def test_another_apps_user_of_the_same_id_is_not_erased(world):
    sessions, data_dir, key_dir, gone, stays, waiting = world
    answer, announce = erase_user(KeyStore.in_directory(key_dir), sessions, "app-b", "gone")
    assert answer.retrain_adapters == [] and announce is None
    assert apply_erasures(sessions, objects(data_dir), data_dir / "adapters") == []
    assert gone in read_batch(waiting)[0].users


def test_a_training_that_ends_after_the_erasure_names_its_adapter_when_the_erasure_is_applied(world):
    sessions, data_dir, key_dir, gone, stays, waiting = world
    erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")
    adapter(sessions, "adapter-4")  # batch-4 was in training while the user was erased
    with sessions.begin() as session:
        row = session.get(Batch, "batch-4")
        row.status, row.adapter = "trained", "adapter-4"
    assert apply_erasures(sessions, objects(data_dir), data_dir / "adapters") == [], "trained: not re-cut"
    with sessions() as session:
        assert session.get(Erasure, gone).adapters == ["adapter-1", "adapter-3", "adapter-4"]


async def test_the_trainer_cuts_the_user_out_before_training_a_batch_emitted_before_the_erasure(world, monkeypatch):
    sessions, data_dir, key_dir, gone, stays, waiting = world
    seen = []

    def train(batch_dir, *args, **kwargs):  # what the recipe would read
        seen.append(read_batch(batch_dir)[0].users.keys())
        raise AssertionError("stop here")

    erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")  # recorded, its user_erased not read by the trainer yet
    monkeypatch.setattr("trainer.worker.train_batch", train)
    settings = make_settings(data_dir.parent, 1)
    worker = TrainerWorker(settings.trainer, settings.kafka, sessions, objects=objects(data_dir),
                           base_model_dir=settings.model_path, adapters_dir=data_dir / "adapters")  # fmt: skip
    emitted = BatchEmitted(event_id="batch-4.emitted", occurred_at=utcnow(), source="curator", batch_id="batch-4",
                           path="batches/batch-4", manifest_sha256="x" * 64, example_count=4, trigger="size")
    with pytest.raises(AssertionError, match="stop here"):
        await worker.handle(emitted)
    assert seen == [{stays}]


def test_status_lists_the_adapters_to_retrain(world):
    sessions, data_dir, key_dir, gone, stays, waiting = world
    erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")
    source = OverviewSource(Settings(data_dir=data_dir), sessions)
    try:
        retrain = source.read().retrain
        assert [(r.adapter, r.erasures, r.apps) for r in retrain] == [("adapter-1", 1, [APP]), ("adapter-3", 1, [APP])]
        assert source.read("app-b").retrain == [], "an app sees its own erasures only"
        console = Console(record=True, width=200)
        render_status(source.read(), console)
    finally:
        source.close()
    text = console.export_text()
    assert "adapters to retrain" in text and "adapter-1" in text and "adapter-3" in text
    assert "adapter-2" not in text.split("adapters to retrain")[1].split("drift alarms")[0]


def test_an_unreadable_batch_is_left_for_later_and_a_batch_recorded_after_the_erasure_is_recut_too(world):
    sessions, data_dir, key_dir, gone, stays, waiting = world
    broken = batch(sessions, data_dir, "batch-5", {gone: [sft("g7", "gone")]})
    broken.store.put(broken.key("sft.jsonl"), b"tampered\n")
    erase_user(KeyStore.in_directory(key_dir), sessions, APP, "gone")
    assert apply_erasures(sessions, objects(data_dir), data_dir / "adapters") == ["batch-4"]
    batch(sessions, data_dir, "batch-6", {gone: [sft("g8", "gone")]})  # cut before the erasure, recorded after
    assert apply_erasures(sessions, objects(data_dir), data_dir / "adapters") == ["batch-6"], "every call checks all"
