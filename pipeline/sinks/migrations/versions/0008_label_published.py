"""The verdict last sent to the labels topic for an alert's payment (`pipeline alerts label --publish-label`):
labels add up in a terminal's fraud rate and none is retracted, so the same verdict is not sent twice.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


TABLES = ("alerts", "shadow_alerts")  # a shadow alert has the columns of an alert (pipeline.sinks.tables)


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:  # SQLite recreates the table (batch mode)
            batch.add_column(sa.Column("label_published", sa.String(8), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("label_published")
