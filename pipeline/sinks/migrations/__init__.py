"""Alembic migrations of the alert database (SQLite and PostgreSQL).

`upgrade_to_head(engine)` is what Database.create_schema calls. A database created before migrations
existed (tables made by metadata.create_all, no alembic_version) is stamped at the baseline revision
0001 first, which is exactly those tables, and then upgraded. On PostgreSQL the upgrade holds a
transaction-scoped advisory lock, so workers starting together do not race each other.

The command line works too: `alembic -c pipeline/sinks/migrations/alembic.ini upgrade head` with
DATABASE_URL set.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

HERE = Path(__file__).resolve().parent
BASELINE = "0001"
_LOCK_ID = 7_420_131_337  # pg_advisory_xact_lock key for schema upgrades


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config(str(HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(HERE))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _stored_revision(connection: Connection) -> str | None:
    """The alembic_version row, read with plain SQL (a MigrationContext logs at INFO each time it is made)."""
    if not inspect(connection).has_table("alembic_version"):
        return None
    rows = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def upgrade_to_head(engine: Engine) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_ID})
        cfg = alembic_config(conn)
        if _stored_revision(conn) == ScriptDirectory.from_config(cfg).get_current_head():
            return  # at head already: no Alembic context, so no migration log lines on every CLI command
        if current_revision(conn) is None and inspect(conn).has_table("alerts"):
            command.stamp(cfg, BASELINE)
        command.upgrade(cfg, "head")


__all__ = ["alembic_config", "current_revision", "upgrade_to_head"]
