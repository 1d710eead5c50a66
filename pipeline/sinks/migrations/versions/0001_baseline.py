"""Baseline: alerts, entity_state, partition_checkpoints as the service created them before migrations.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("alert_key", sa.String(300), nullable=False, unique=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("event_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("top_features", sa.JSON(), nullable=False),
        sa.Column("source_topic", sa.String(255), nullable=False),
        sa.Column("source_partition", sa.Integer(), nullable=False),
        sa.Column("source_offset", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_alerts_entity_time", "alerts", ["run_id", "entity_id", "event_time"])
    op.create_index("ix_alerts_run_stream", "alerts", ["run_id", "stream"])
    op.create_table(
        "entity_state",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("stream", sa.String(32), primary_key=True),
        sa.Column("entity_id", sa.String(64), primary_key=True),
        sa.Column("source_topic", sa.String(255), nullable=False),
        sa.Column("source_partition", sa.Integer(), nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "partition_checkpoints",
        sa.Column("run_id", sa.String(64), primary_key=True),
        sa.Column("group_id", sa.String(255), primary_key=True),
        sa.Column("topic", sa.String(255), primary_key=True),
        sa.Column("partition", sa.Integer(), primary_key=True),
        sa.Column("committed_offset", sa.BigInteger(), nullable=False),
        sa.Column("snapshot_offset", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("partition_checkpoints")
    op.drop_table("entity_state")
    op.drop_index("ix_alerts_run_stream", table_name="alerts")
    op.drop_index("ix_alerts_entity_time", table_name="alerts")
    op.drop_table("alerts")
