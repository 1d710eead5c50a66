"""One object over the split SQL layer, for tests only: a test writes through the checkpoint store and reads
through the API's queries on the same database. The product builds the pieces separately (pipeline.app)."""

from __future__ import annotations

from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore


class SqlTestStore(Database, SqlCheckpointStore, AlertQueries):
    def __init__(self, url: str, *, echo: bool = False) -> None:
        Database.__init__(self, url, echo=echo)
        self.db = self

    def count_alerts(self, run_id: str | None = None) -> int:
        return len(self.list_alerts(run_id=run_id))
