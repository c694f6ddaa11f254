"""Alembic environment of the store, for `feedloop db ...` and for `alembic` run from the repo root.

`feedloop db` passes the URL it resolved (migrations/__init__.py); plain `alembic` (alembic.ini)
resolves it here as every feedloop process does: FEEDLOOP_DATABASE_URL, or the SQLite file in
FEEDLOOP_DATA_DIR. Offline (`alembic upgrade head --sql`) writes the SQL for an empty database.
"""

from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import make_url

from streams.store import Base

config = context.config


def store_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    # Plain `alembic`: the settings and the log set-up of the feedloop processes, read lazily
    # because `feedloop db` has both already.
    from app.logs import configure_logging
    from app.settings import Settings

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return settings.store_url


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
    run_migrations_offline(store_url())
else:
    run_migrations_online(store_url())
