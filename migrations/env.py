"""Alembic environment of the store, for `feedloop db ...` and for `alembic` run from the repo root.

`feedloop db` passes the URL it resolved (migrations/__init__.py); plain `alembic` (alembic.ini)
resolves it here from FEEDLOOP_DATABASE_URL, or the SQLite file in FEEDLOOP_DATA_DIR, by the
store's own rule (``streams.store.store_url``, which the settings use too; a ``.env`` file is
not read here). Offline (`alembic upgrade head --sql`) writes the SQL for an empty database.
"""

import os
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

from streams.store import Base, store_url

config = context.config


def url_to_migrate() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    # Plain `alembic`: the two settings the store URL is made of, read from the environment
    # (not app.settings: the migrations sit below the app), by the store's own rule.
    return store_url(os.environ.get("FEEDLOOP_DATABASE_URL") or None, Path(os.environ.get("FEEDLOOP_DATA_DIR", "data")))


def run_migrations_offline(url: str) -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online(url: str) -> None:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)  # a fresh data dir
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER much
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline(url_to_migrate())
else:
    run_migrations_online(url_to_migrate())
