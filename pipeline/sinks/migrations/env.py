"""Alembic environment: uses the caller's connection (upgrade_to_head) or DATABASE_URL (alembic CLI)."""

from __future__ import annotations

import os
from typing import Any

from alembic import context
from sqlalchemy import create_engine

from pipeline.sinks.tables import metadata

config = context.config
target_metadata = metadata


def _run(connection: Any) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set DATABASE_URL (or sqlalchemy.url) to run migrations from the alembic CLI")
    engine = create_engine(url)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
