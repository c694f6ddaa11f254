"""Constraints carry the names of the store's naming convention (streams.store.NAMING_CONVENTION).

Stores made before the convention have PostgreSQL's own names (``adapters_parent_fkey``,
``..._key``, ``..._pkey``) or, on SQLite, none. A store made from scratch since has the
conventional names from 0001 on (Alembic names what the migrations create by the target
metadata's convention), so only what differs is renamed.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

# As this revision leaves them, written out: the models may change after it.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
FOREIGN_KEYS = {  # (table, column): the table it refers to
    ("adapters", "parent"): "adapters",
    ("batches", "adapter"): "adapters",
    ("experiments", "challenger"): "adapters",
    ("experiments", "champion"): "adapters",
}
UNIQUE = {"archive_segments": ("cluster_id", "topic", "partition", "first_offset")}
TABLES = ("archive_segments", "adapters", "batches", "experiments", "stream_checkpoints", "router_snapshots",
          "process_heartbeats")  # fmt: skip


def _names() -> list[tuple[str, str, str]]:
    """(table, PostgreSQL's default name, conventional name) of every constraint."""
    names = [(table, f"{table}_pkey", f"pk_{table}") for table in TABLES]
    names += [(table, f"{table}_{'_'.join(columns)}_key", f"uq_{table}_{'_'.join(columns)}")
              for table, columns in UNIQUE.items()]  # fmt: skip
    names += [(table, f"{table}_{column}_fkey", f"fk_{table}_{column}_{referred}")
              for (table, column), referred in FOREIGN_KEYS.items()]  # fmt: skip
    return names


def _existing(inspector, table: str) -> set[str | None]:
    """Names of the table's unique and foreign key constraints (None: unnamed, on SQLite)."""
    return {c["name"] for c in inspector.get_unique_constraints(table)} | {
        c["name"] for c in inspector.get_foreign_keys(table)}


def _rename(old_to_new: bool) -> None:
    if context.is_offline_mode():
        # A script is written for an empty database, whose constraints 0001 already names.
        return
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if bind.dialect.name == "sqlite":
        if not old_to_new:
            return  # unnamed constraints were never a state to go back to: the names stay
        for table in sorted({t for t, _ in FOREIGN_KEYS} | set(UNIQUE)):
            if None in _existing(inspector, table):
                # SQLite renames no constraint: the table is copied, named by the convention.
                with op.batch_alter_table(table, recreate="always", naming_convention=NAMING_CONVENTION):
                    pass
        return
    for table, default, conventional in _names():
        old, new = (default, conventional) if old_to_new else (conventional, default)
        if old in _existing(inspector, table) | {inspector.get_pk_constraint(table).get("name")}:
            op.execute(f'ALTER TABLE {table} RENAME CONSTRAINT "{old}" TO "{new}"')


def upgrade() -> None:
    _rename(old_to_new=True)


def downgrade() -> None:
    _rename(old_to_new=False)
