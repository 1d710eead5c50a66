"""TEMPORARY shim (issue 12), removed once the remaining callers are moved over: `SqlStore` is the old
all-in-one store, now simply a Database that is its own SqlCheckpointStore (what the processing core calls)
and AlertQueries (what the API and CLI call), so it can be handed to code already typed for the new classes.
New code builds those classes (pipeline.sinks) and imports the tables from pipeline.sinks.tables.
"""

from __future__ import annotations

from pipeline.sinks.checkpoint_store import SqlCheckpointStore
from pipeline.sinks.database import Database
from pipeline.sinks.queries import AlertQueries, row_to_json


class SqlStore(Database, SqlCheckpointStore, AlertQueries):
    """TEMPORARY: the old interface over the split classes, for callers not moved yet."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        Database.__init__(self, url, echo=echo)
        self.db = self

    def count_alerts(self, run_id: str | None = None) -> int:
        """Only tests call this (tests/unit/test_recovery_positions.py, tests/unit/test_faust_scoring.py,
        tests/integration/test_recovery_publish_errors.py); it goes with the shim: len(list_alerts(...))."""
        return len(self.list_alerts(run_id=run_id))


__all__ = ["SqlStore", "row_to_json"]
