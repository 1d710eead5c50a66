"""A unique key on model_score_samples (run, stream, version, entity, event time): a sample written again (a
replay after a crash, a late shadow batch) is skipped by the database (ON CONFLICT DO NOTHING) instead of being
looked up before every write. Duplicates stored before the key existed are removed first (the oldest row of
each sample is kept).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

KEY = ["run_id", "stream", "model_version", "entity_id", "event_time"]


def upgrade() -> None:
    op.execute(
        "DELETE FROM model_score_samples WHERE id NOT IN (SELECT MIN(id) FROM model_score_samples "
        "GROUP BY run_id, stream, model_version, entity_id, event_time)"
    )
    op.create_index("uq_model_score_samples_sample", "model_score_samples", KEY, unique=True)


def downgrade() -> None:
    op.drop_index("uq_model_score_samples_sample", table_name="model_score_samples")
