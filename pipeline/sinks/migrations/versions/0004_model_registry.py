"""Model registry: versions with their weights, champion/challenger aliases, the promotion history; shadow
alerts of a challenger and per-version score samples (drift, compare).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("version", sa.String(128), nullable=False, unique=True),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("family", sa.String(32), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.UniqueConstraint("stream", "number", name="uq_model_versions_stream_number"),
        sa.UniqueConstraint("stream", "content_hash", name="uq_model_versions_stream_hash"),
    )
    op.create_table(
        "model_aliases",
        sa.Column("stream", sa.String(64), primary_key=True),
        sa.Column("alias", sa.String(16), primary_key=True),
        sa.Column(
            "version",
            sa.String(128),
            sa.ForeignKey("model_versions.version", name="fk_model_aliases_version"),
            nullable=False,
        ),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "model_promotions",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("alias", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("version", sa.String(128), nullable=True),
        sa.Column("previous_version", sa.String(128), nullable=True),
        sa.Column("at", TS, nullable=False),
        sa.Column("by", sa.String(64), nullable=False),
    )
    op.create_index("ix_model_promotions_alias", "model_promotions", ["stream", "alias", "id"])

    op.create_table(  # the columns of `alerts` at 0003
        "shadow_alerts",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("alert_key", sa.String(300), nullable=False, unique=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("event_time", TS, nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("top_features", sa.JSON(), nullable=False),
        sa.Column("source_topic", sa.String(255), nullable=False),
        sa.Column("source_partition", sa.Integer(), nullable=False),
        sa.Column("source_offset", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("incident_key", sa.String(300), nullable=True),
        sa.Column("acked_at", TS, nullable=True),
        sa.Column("acked_by", sa.String(64), nullable=True),
        sa.Column("label", sa.String(8), nullable=True),
        sa.Column("labeled_at", TS, nullable=True),
    )
    op.create_index("ix_shadow_alerts_version_time", "shadow_alerts", ["model_version", "event_time"])

    op.create_table(
        "model_score_samples",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("event_time", TS, nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
    )
    op.create_index("ix_model_score_samples_version_time", "model_score_samples", ["model_version", "event_time"])


def downgrade() -> None:
    op.drop_table("model_score_samples")
    op.drop_table("shadow_alerts")
    op.drop_table("model_promotions")
    op.drop_table("model_aliases")
    op.drop_table("model_versions")
