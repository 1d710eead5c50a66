"""The last version number each stream's registry gave out, kept when versions are deleted: a deleted
version's id (pumps-v5) is never given to another model, whose alerts, shadow alerts and score samples would
otherwise be credited to a model that did not write them. Filled from the versions registered so far.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_version_numbers",
        sa.Column("stream", sa.String(64), primary_key=True),
        sa.Column("last_number", sa.Integer, nullable=False),
    )
    op.execute(
        "INSERT INTO model_version_numbers (stream, last_number) "
        "SELECT stream, MAX(number) FROM model_versions GROUP BY stream"
    )


def downgrade() -> None:
    op.drop_table("model_version_numbers")
