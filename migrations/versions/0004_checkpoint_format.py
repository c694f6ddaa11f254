"""Stream checkpoints: a format version per row and the input positions it covers.

Existing rows are format 1, the bytes format 1 writes (zlib of a pickle). Their positions are
not known without unpickling them, so they stay empty (NULL) until the worker next writes
the row; streams/checkpoint.py says what a rebuild does without them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("stream_checkpoints") as table:
        table.add_column(sa.Column("format_version", sa.Integer(), server_default="1", nullable=False))
        table.add_column(sa.Column("positions", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("stream_checkpoints") as table:  # SQLite drops columns by copying the table
        table.drop_column("positions")
        table.drop_column("format_version")
