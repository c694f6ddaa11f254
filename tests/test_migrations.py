"""The same migrations build, and tear down, the store on SQLite and on PostgreSQL."""

import pickle
import zlib

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

import migrations
from streams.checkpoint import decode
from streams.store import Adapter, Base, Batch, StreamCheckpoint, make_engine, make_sessionmaker

TABLES = {"archive_segments", "adapters", "batches", "experiments", "stream_checkpoints", "router_snapshots",
          "process_heartbeats"}


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
    assert migrations.current(url) == "0006"
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
