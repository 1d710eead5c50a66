"""Stream names up to 64 characters: a stream file may name any number of streams (issue 14), and the
stream-file rules allow 64; every table keyed by stream stored 32.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TABLES = ("alerts", "entity_state", "incidents", "score_samples", "shadow_alerts")


def upgrade() -> None:
    for table in TABLES:  # PostgreSQL widens a varchar in place; SQLite recreates the table (batch mode)
        with op.batch_alter_table(table) as batch:
            batch.alter_column("stream", type_=sa.String(64), existing_type=sa.String(32), existing_nullable=False)


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("stream", type_=sa.String(32), existing_type=sa.String(64), existing_nullable=False)
