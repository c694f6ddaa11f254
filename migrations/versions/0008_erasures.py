"""Erasures: the pseudonyms erased, the adapters trained on their data, the batches cut without them.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasures",
        sa.Column("pseudonym", sa.String(length=64), nullable=False),
        sa.Column("app_id", sa.String(length=128), nullable=False),
        sa.Column("erased_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=False),
        sa.Column("announced", sa.Boolean(), nullable=False),
        sa.Column("adapters", sa.JSON(), nullable=False),
        sa.Column("recut_batches", sa.JSON(), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("pseudonym", name=op.f("pk_erasures")),
    )
    op.create_index(op.f("ix_erasures_app_id"), "erasures", ["app_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_erasures_app_id"), table_name="erasures")
    op.drop_table("erasures")
