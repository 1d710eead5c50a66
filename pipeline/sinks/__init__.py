"""Durable outputs in SQL. The only package that imports SQLAlchemy.

Database (engine and schema); SqlCheckpointStore (what the processing core writes and restores);
AlertQueries (what the API and the alerts CLI read and change); SqlRegistryStore (model versions). The tables
are in pipeline.sinks.tables. Imported lazily: the API and the CLI's help must not pay for numpy or Alembic.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.sinks.checkpoint_store import SqlCheckpointStore
    from pipeline.sinks.database import Database
    from pipeline.sinks.queries import AlertQueries
    from pipeline.sinks.registry import SqlRegistryStore

_HOME = {
    "AlertQueries": "pipeline.sinks.queries",
    "Database": "pipeline.sinks.database",
    "SqlCheckpointStore": "pipeline.sinks.checkpoint_store",
    "SqlRegistryStore": "pipeline.sinks.registry",
}
__all__ = ["AlertQueries", "Database", "SqlCheckpointStore", "SqlRegistryStore"]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'pipeline.sinks' has no attribute {name!r}")
