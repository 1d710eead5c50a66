"""Checkpoint writes on real PostgreSQL and SQLite: atomic, idempotent alerts, state and offsets; and reads that
fail name what failed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from pipeline.checkpointing.rows import AlertRow, OffsetRow, StateRow
from pipeline.errors import SinkError
from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore


def _alert(offset: int, run: str = "live") -> AlertRow:
    return AlertRow(
        alert_key=f"{run}|tx|0|{offset}|m@1",
        run_id=run,
        stream="transactions",
        entity_id="C1",
        event_time=datetime(2018, 4, 1, tzinfo=timezone.utc),
        score=10.0,
        threshold=5.0,
        severity="medium",
        model_version="m@1",
        top_features=[{"feature": "log_amount", "observed": 6.0, "reconstructed": 3.0, "contribution": 8.0}],
        source_topic="tx",
        source_partition=0,
        source_offset=offset,
    )


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue("pg_store" if request.param == "postgresql" else "sqlite_store")


def test_checkpoint_is_idempotent_and_keeps_offsets(db: Database) -> None:
    store, queries = SqlCheckpointStore(db), AlertQueries(db)
    states = [StateRow("transactions", "C1", "tx", 0, b"\x01" * 10)]
    n = store.write_checkpoint("live", "g", [_alert(1), _alert(2)], states, [OffsetRow("tx", 0, 3, 3)])
    assert n == 2
    # the same outputs again (a replay after a crash) add nothing
    n = store.write_checkpoint("live", "g", [_alert(1), _alert(2)], [], [OffsetRow("tx", 0, 3)])
    assert n == 0
    assert [a["source_offset"] for a in queries.list_alerts(run_id="live")] == [1, 2]
    assert store.load_offsets("live", "g") == {("tx", 0): (3, 3)}
    # a commit without a snapshot keeps the last snapshot offset
    store.write_checkpoint("live", "g", [], [], [OffsetRow("tx", 0, 9)])
    assert store.load_offsets("live", "g") == {("tx", 0): (9, 3)}
    assert store.load_states("live", "transactions", ["C1", "C2"]) == {"C1": b"\x01" * 10}


def test_runs_are_isolated(db: Database) -> None:
    store, queries = SqlCheckpointStore(db), AlertQueries(db)
    store.write_checkpoint("live", "g", [_alert(1)], [], [OffsetRow("tx", 0, 2)])
    store.write_checkpoint("replay-1", "g", [_alert(1, "replay-1")], [], [OffsetRow("tx", 0, 2)])
    assert len(queries.list_alerts(run_id="live")) == 1
    assert len(queries.list_alerts(run_id="replay-1")) == 1
    queries.delete_run("replay-1")
    assert queries.list_alerts(run_id="replay-1") == []
    assert len(queries.list_alerts(run_id="live")) == 1


def test_failed_transaction_writes_nothing(db: Database) -> None:
    store = SqlCheckpointStore(db)
    bad = _alert(5)
    bad.entity_id = None  # type: ignore[assignment]  # NOT NULL violation mid-transaction
    with pytest.raises(SinkError, match="could not write the checkpoint"):
        store.write_checkpoint("live", "g", [_alert(4), bad], [], [OffsetRow("tx", 0, 6)])
    assert AlertQueries(db).list_alerts(run_id="live") == []
    assert store.load_offsets("live", "g") == {}


@pytest.fixture()
def down_db() -> Iterator[Database]:
    """A PostgreSQL that refuses connections (nothing listens on port 1)."""
    db = Database("postgresql+psycopg2://nobody@127.0.0.1:1/none?connect_timeout=1")
    try:
        yield db
    finally:
        db.dispose()


CHECKPOINT_READS: dict[str, Callable[[SqlCheckpointStore], Any]] = {
    "load entity state": lambda s: s.load_states("live", "transactions", ["C1"]),
    "load partition checkpoints": lambda s: s.load_offsets("live", "g"),
    "load partition epochs": lambda s: s.load_epochs("live", "g"),
    "load open incidents": lambda s: s.open_incidents("live", "tx", 0),
    "drain the outbox": lambda s: s.drain_outbox("live", lambda rows: None),
    "write the checkpoint": lambda s: s.write_checkpoint("live", "g", [_alert(1)], [], []),
}
QUERIES: dict[str, Callable[[AlertQueries], Any]] = {
    "list alerts": lambda q: q.list_alerts(),
    "query alerts": lambda q: q.query_alerts(status="open"),
    "read alert 1": lambda q: q.get_alert(1),
    "list incidents": lambda q: q.list_incidents(),
    "read incident 1": lambda q: q.get_incident(1),
    "read score samples": lambda q: q.recent_scores(None, None, "C1"),
    "store the operator's feedback": lambda q: q.ack(alert_id=1),
    "read alert sources": lambda q: q.alert_sources(incident_id=1),
    "read confirmed anomalies": lambda q: q.confirmed_anomalies(),
    "read lifecycle stats": lambda q: q.lifecycle_stats(),
    "read the outbox": lambda q: q.outbox_rows(),
    "delete run 'r'": lambda q: q.delete_run("r"),
}


@pytest.mark.parametrize("what", CHECKPOINT_READS)
def test_checkpoint_store_errors_say_what_failed(down_db: Database, what: str) -> None:
    with pytest.raises(SinkError, match=f"^could not {what}: database unavailable: .*127.0.0.1"):
        CHECKPOINT_READS[what](SqlCheckpointStore(down_db))


@pytest.mark.parametrize("what", QUERIES)
def test_query_errors_say_what_failed(down_db: Database, what: str) -> None:
    with pytest.raises(SinkError, match=f"^could not {what}: database unavailable: .*127.0.0.1"):
        QUERIES[what](AlertQueries(down_db))


def test_a_read_on_a_missing_table_is_a_sink_error(tmp_path: Any) -> None:
    """Not only outages: any SQLAlchemy error of a read (here: no schema) becomes SinkError."""
    db = Database(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        with pytest.raises(SinkError, match="^could not list incidents: .*no such table: incidents"):
            AlertQueries(db).list_incidents()
    finally:
        db.dispose()


def test_sqlite_state_fast_path_stores_what_sqlalchemy_stores(sqlite_store: Database) -> None:
    from sqlalchemy import select

    from pipeline.sinks.tables import entity_state

    store = SqlCheckpointStore(sqlite_store)

    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    rows = [StateRow("sensors", f"pump-{i}", "s", i % 4, bytes([i]) * 1206) for i in range(50)]

    def written(run: str, generic: bool) -> list[tuple[object, ...]]:
        with sqlite_store.engine.begin() as conn:
            store._write_states(conn, run, rows, now, generic=generic)  # noqa: SLF001 - the two paths compared
            store._write_states(conn, run, rows[:10], now, generic=generic)  # noqa: SLF001 - upsert over existing rows
        with sqlite_store.engine.connect() as conn:
            raw = conn.exec_driver_sql(
                "SELECT stream, entity_id, source_topic, source_partition, state, updated_at, typeof(updated_at) "
                "FROM entity_state WHERE run_id = ? ORDER BY entity_id",
                (run,),
            ).all()
            typed = conn.execute(select(entity_state.c.updated_at).where(entity_state.c.run_id == run)).scalars()
            assert set(typed) == {now.replace(tzinfo=None)}
        return [tuple(r) for r in raw]

    assert written("fast", False) == written("generic", True)
    assert store.load_states("fast", "sensors", ["pump-7"]) == {"pump-7": bytes([7]) * 1206}
