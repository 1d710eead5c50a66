"""Alert lifecycle: incidents, the alerts-topic outbox, per-entity score samples, ack/label on alerts.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("alerts") as batch:
        batch.add_column(sa.Column("incident_key", sa.String(300), nullable=True))
        batch.add_column(sa.Column("acked_at", TS, nullable=True))
        batch.add_column(sa.Column("acked_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("label", sa.String(8), nullable=True))
        batch.add_column(sa.Column("labeled_at", TS, nullable=True))
    op.create_index("ix_alerts_incident", "alerts", ["incident_key"])

    op.create_table(
        "incidents",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("incident_key", sa.String(300), nullable=False, unique=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("source_topic", sa.String(255), nullable=False),
        sa.Column("source_partition", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("opened_at", TS, nullable=False),
        sa.Column("last_alert_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.Column("resolved_at", TS, nullable=True),
        sa.Column("alert_count", sa.Integer(), nullable=False),
        sa.Column("normal_run", sa.Integer(), nullable=False),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("peak_threshold", sa.Float(), nullable=False),
        sa.Column("last_score", sa.Float(), nullable=False),
        sa.Column("last_threshold", sa.Float(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("notified_at", TS, nullable=True),
        sa.Column("notified_severity", sa.String(16), nullable=True),
        sa.Column("last_alert", sa.JSON(), nullable=True),
        sa.Column("acked_at", TS, nullable=True),
        sa.Column("acked_by", sa.String(64), nullable=True),
        sa.Column("label", sa.String(8), nullable=True),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_incidents_run_status", "incidents", ["run_id", "status"])
    op.create_index("ix_incidents_entity", "incidents", ["run_id", "stream", "entity_id"])
    op.create_index("ix_incidents_partition", "incidents", ["run_id", "source_topic", "source_partition", "status"])

    op.create_table(
        "alert_outbox",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(320), nullable=False, unique=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("published_at", TS, nullable=True),
    )
    op.create_index("ix_outbox_unpublished", "alert_outbox", ["run_id", "published_at", "id"])

    op.create_table(
        "score_samples",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(64), nullable=False),
        sa.Column("stream", sa.String(32), nullable=False),
        sa.Column("entity_id", sa.String(64), nullable=False),
        sa.Column("event_time", TS, nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("is_anomaly", sa.Boolean(), nullable=False),
    )
    op.create_index("ix_score_samples_entity", "score_samples", ["run_id", "stream", "entity_id", "id"])


def downgrade() -> None:
    op.drop_table("score_samples")
    op.drop_table("alert_outbox")
    op.drop_table("incidents")
    op.drop_index("ix_alerts_incident", table_name="alerts")
    with op.batch_alter_table("alerts") as batch:
        for col in ("labeled_at", "label", "acked_by", "acked_at", "incident_key"):
            batch.drop_column(col)
