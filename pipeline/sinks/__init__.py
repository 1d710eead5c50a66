"""Durable outputs in SQL. The only package that imports SQLAlchemy.

Database (engine and schema); SqlCheckpointStore (what the processing core writes and restores);
AlertQueries (what the API and the alerts CLI read and change). The tables are in pipeline.sinks.tables.
"""

from pipeline.sinks.checkpoint_store import SqlCheckpointStore
from pipeline.sinks.database import Database
from pipeline.sinks.queries import AlertQueries
from pipeline.sinks.registry import SqlRegistryStore  # also puts the registry tables on the shared MetaData

__all__ = ["AlertQueries", "Database", "SqlCheckpointStore", "SqlRegistryStore"]
