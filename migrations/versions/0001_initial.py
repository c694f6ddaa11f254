"""Initial store: archive segments, adapter registry, batches, experiments.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _created_at() -> sa.Column:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "archive_segments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("cluster_id", sa.String(128), nullable=False),
        sa.Column("topic", sa.String(255), nullable=False),
        sa.Column("partition", sa.Integer(), nullable=False),
        sa.Column("first_offset", sa.BigInteger(), nullable=False),
        sa.Column("last_offset", sa.BigInteger(), nullable=False),
        sa.Column("event_count", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("first_timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("last_timestamp_ms", sa.BigInteger(), nullable=False),
        _created_at(),
        sa.UniqueConstraint("cluster_id", "topic", "partition", "first_offset"),
    )
    op.create_index("ix_archive_segments_cluster_id", "archive_segments", ["cluster_id"])
    op.create_table(
        "adapters",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("base_model_sha256", sa.String(64), nullable=False),
        sa.Column("parent", sa.String(128), sa.ForeignKey("adapters.name"), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("lineage", sa.JSON(), nullable=False),
        _created_at(),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
    op.create_table(
        "batches",
        sa.Column("batch_id", sa.String(128), primary_key=True),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("example_count", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("adapter", sa.String(128), sa.ForeignKey("adapters.name"), nullable=True),
        sa.Column("manifest", sa.JSON(), nullable=False),
        _created_at(),
    )
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("challenger", sa.String(128), sa.ForeignKey("adapters.name"), nullable=False),
        sa.Column("champion", sa.String(128), sa.ForeignKey("adapters.name"), nullable=True),
        sa.Column("decision", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("stats", sa.JSON(), nullable=False),
        sa.Column(
            "started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("experiments")
    op.drop_table("batches")
    op.drop_table("adapters")
    op.drop_index("ix_archive_segments_cluster_id", table_name="archive_segments")
    op.drop_table("archive_segments")
