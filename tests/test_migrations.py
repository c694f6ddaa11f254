"""The same migrations build, and tear down, the store on SQLite and on PostgreSQL."""

import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine, inspect, select, text

import migrations
from streams.checkpoint import decode
from streams.store import (NAMING_CONVENTION, Adapter, Base, Batch, Erasure, StreamCheckpoint, make_engine,
                           make_sessionmaker)

ROOT = Path(__file__).resolve().parents[1]
HEAD = "0009"

TABLES = {"archive_segments", "adapters", "batches", "experiments", "stream_checkpoints", "router_snapshots",
          "process_heartbeats", "erasures", "learner_leases"}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'feedloop.db'}"
    return request.getfixturevalue("postgres_url")


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_then_downgrade(url):
    migrations.upgrade(url)
    assert migrations.current(url) == HEAD
    assert tables(url) == TABLES
    migrations.downgrade(url, "base")
    assert migrations.current(url) is None
    assert tables(url) == set()
    migrations.upgrade(url)  # and up again: downgrade left nothing behind
    assert tables(url) == TABLES
    migrations.downgrade(url, "base")


def test_models_match_the_migrations(url):
    """A model changed without a migration would fail here, on both databases."""
    migrations.upgrade(url)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
        migrations.downgrade(url, "base")


def test_registry_rows_round_trip_with_lineage(url):
    migrations.upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    try:
        with sessions.begin() as session:
            session.add(Adapter(name="a-0001", state="ready", path="adapters/a-0001", sha256="ab" * 32,
                                base_model_sha256="cd" * 32, lineage={"batch_ids": ["b1"], "epsilon": 2.5}))
            session.add(Batch(batch_id="b1", path="batches/b1", manifest_sha256="ef" * 32, example_count=3,
                              trigger="size", status="trained", adapter="a-0001", manifest={"strata": {"a": 3}}))
        with sessions() as session:
            adapter = session.get(Adapter, "a-0001")
            assert adapter.lineage == {"batch_ids": ["b1"], "epsilon": 2.5}
            assert adapter.created_at is not None
            assert session.get(Batch, "b1").adapter == "a-0001"
    finally:
        engine.dispose()
        migrations.downgrade(url, "base")


def test_an_erasure_from_before_0008_stores_is_found_by_its_app_and_time_to_the_microsecond(url):
    """0008 adds erasures to a store with rows; a repeated erase finds its row by app and time."""
    from datetime import datetime, timezone

    migrations.upgrade(url, "0007")
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    erased_at = datetime(2026, 12, 3, 12, 0, 0, 123456, tzinfo=timezone.utc)
    try:
        with sessions.begin() as session:
            session.add(Batch(batch_id="b1", path="batches/b1", manifest_sha256="ef" * 32, example_count=3,
                              trigger="size", status="emitted", manifest={}))
        migrations.upgrade(url)
        with sessions.begin() as session:
            session.add(Erasure(pseudonym="u_" + "a" * 32, app_id="app-a", erased_at=erased_at, event_id="e",
                                announced=False, adapters=["a-1"], recut_batches=[]))  # fmt: skip
        with sessions() as session:
            found = session.scalars(select(Erasure).where(Erasure.app_id == "app-a", Erasure.erased_at == erased_at))
            assert [(e.adapters, e.applied_at) for e in found] == [(["a-1"], None)]
            assert session.get(Batch, "b1") is not None
    finally:
        engine.dispose()
        migrations.downgrade(url, "base")


def test_checkpoints_from_before_format_versions_read_as_format_one(url):
    migrations.upgrade(url, "0003")
    engine = make_engine(url)
    state = {"any": ["picklable", 3]}
    try:
        with engine.begin() as connection:
            connection.execute(text('INSERT INTO stream_checkpoints (consumer, partition, cluster_id, "offset", state) '
                                    "VALUES ('old', 0, 'c1', 5, :state)"),
                               {"state": zlib.compress(pickle.dumps(state))})  # fmt: skip
        migrations.upgrade(url)
        with make_sessionmaker(engine)() as session:
            old = session.get(StreamCheckpoint, ("old", 0))
        assert (old.format_version, old.positions) == (1, None)
        assert decode(old, 1) == state
    finally:
        engine.dispose()
        migrations.downgrade(url, "base")


def constraint_names(url: str) -> set[str | None]:
    engine = create_engine(url)
    try:
        found = inspect(engine)
        return {c["name"] for table in ("archive_segments", "adapters", "batches", "experiments")
                for c in [*found.get_unique_constraints(table), *found.get_foreign_keys(table)]}  # fmt: skip
    finally:
        engine.dispose()


def test_a_store_made_before_the_naming_convention_gets_its_names(url, monkeypatch):
    """Migrations up to 0006 ran without a naming convention: PostgreSQL named the constraints
    itself, SQLite not at all. 0007 gives them the convention's names, with their rows."""
    with monkeypatch.context() as before:
        before.setattr(Base.metadata, "naming_convention", MetaData().naming_convention)
        migrations.upgrade(url, "0006")
    conventional = {"fk_batches_adapter_adapters", "uq_archive_segments_cluster_id_topic_partition_first_offset"}
    assert not constraint_names(url) & conventional
    engine = make_engine(url)
    try:
        with make_sessionmaker(engine).begin() as session:
            session.add(Adapter(name="a-0001", state="ready", path="adapters/a-0001", sha256="ab" * 32,
                                base_model_sha256="cd" * 32, lineage={}))
            session.add(Batch(batch_id="b1", path="batches/b1", manifest_sha256="ef" * 32, example_count=3,
                              trigger="size", status="trained", adapter="a-0001", manifest={}))
        engine.dispose()
        migrations.upgrade(url)
        assert {"fk_batches_adapter_adapters", "fk_adapters_parent_adapters", "fk_experiments_champion_adapters",
                "uq_archive_segments_cluster_id_topic_partition_first_offset"} <= constraint_names(url)  # fmt: skip
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        with make_sessionmaker(engine)() as session:
            assert session.get(Batch, "b1").adapter == "a-0001"
    finally:
        engine.dispose()
        migrations.downgrade(url, "base")


def test_the_metadata_names_every_constraint_by_the_convention():
    assert Base.metadata.naming_convention == {**MetaData().naming_convention, **NAMING_CONVENTION}


def alembic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Plain `alembic`, run from the repo root as an operator runs it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEEDLOOP_")}
    return subprocess.run([sys.executable, "-m", "alembic", *args], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_alembic_upgrade_head_from_the_repo_root(url):
    done = alembic("upgrade", "head", env={"FEEDLOOP_DATABASE_URL": url})
    try:
        assert done.returncode == 0, done.stderr
        assert migrations.current(url) == HEAD and tables(url) == TABLES
    finally:
        migrations.downgrade(url, "base")


def test_alembic_finds_the_default_store_in_the_data_dir(tmp_path):
    done = alembic("upgrade", "head", env={"FEEDLOOP_DATA_DIR": str(tmp_path / "data")})
    assert done.returncode == 0, done.stderr
    assert migrations.current(f"sqlite:///{tmp_path / 'data' / 'feedloop.db'}") == HEAD


@pytest.mark.parametrize("url", ["sqlite:///unused.db", "postgresql+psycopg://nobody@127.0.0.1:1/none"])
def test_alembic_upgrade_sql_prints_the_schema_offline(url):
    done = alembic("upgrade", "head", "--sql", env={"FEEDLOOP_DATABASE_URL": url})
    assert done.returncode == 0, done.stderr
    assert "CREATE TABLE archive_segments" in done.stdout and "CREATE TABLE process_heartbeats" in done.stdout
    assert "CONSTRAINT uq_archive_segments_cluster_id_topic_partition_first_offset" in done.stdout
    assert not (ROOT / "unused.db").exists()
