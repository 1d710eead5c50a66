"""Checkpoint writes on real PostgreSQL and SQLite: atomic, idempotent alerts, state and offsets."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from pipeline.checkpointing.rows import AlertRow, OffsetRow, StateRow
from pipeline.sinks.sql import SqlStore


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
def store(request: pytest.FixtureRequest) -> SqlStore:
    return request.getfixturevalue("pg_store" if request.param == "postgresql" else "sqlite_store")


def test_checkpoint_is_idempotent_and_keeps_offsets(store: SqlStore) -> None:
    states = [StateRow("transactions", "C1", "tx", 0, b"\x01" * 10)]
    n = store.write_checkpoint("live", "g", [_alert(1), _alert(2)], states, [OffsetRow("tx", 0, 3, 3)])
    assert n == 2
    # the same outputs again (a replay after a crash) add nothing
    n = store.write_checkpoint("live", "g", [_alert(1), _alert(2)], [], [OffsetRow("tx", 0, 3)])
    assert n == 0
    assert [a["source_offset"] for a in store.list_alerts(run_id="live")] == [1, 2]
    assert store.load_offsets("live", "g") == {("tx", 0): (3, 3)}
    # a commit without a snapshot keeps the last snapshot offset
    store.write_checkpoint("live", "g", [], [], [OffsetRow("tx", 0, 9)])
    assert store.load_offsets("live", "g") == {("tx", 0): (9, 3)}
    assert store.load_states("live", "transactions", ["C1", "C2"]) == {"C1": b"\x01" * 10}


def test_runs_are_isolated(store: SqlStore) -> None:
    store.write_checkpoint("live", "g", [_alert(1)], [], [OffsetRow("tx", 0, 2)])
    store.write_checkpoint("replay-1", "g", [_alert(1, "replay-1")], [], [OffsetRow("tx", 0, 2)])
    assert len(store.list_alerts(run_id="live")) == 1
    assert len(store.list_alerts(run_id="replay-1")) == 1
    store.delete_run("replay-1")
    assert store.list_alerts(run_id="replay-1") == []
    assert len(store.list_alerts(run_id="live")) == 1


def test_failed_transaction_writes_nothing(store: SqlStore) -> None:
    bad = _alert(5)
    bad.entity_id = None  # type: ignore[assignment]  # NOT NULL violation mid-transaction
    from pipeline.errors import SinkError

    with pytest.raises(SinkError):
        store.write_checkpoint("live", "g", [_alert(4), bad], [], [OffsetRow("tx", 0, 6)])
    assert store.list_alerts(run_id="live") == []
    assert store.load_offsets("live", "g") == {}


def test_sqlite_state_fast_path_stores_what_sqlalchemy_stores(sqlite_store: SqlStore) -> None:
    from sqlalchemy import select

    from pipeline.sinks.sql import entity_state

    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    rows = [StateRow("sensors", f"pump-{i}", "s", i % 4, bytes([i]) * 1206) for i in range(50)]

    def written(run: str, generic: bool) -> list[tuple[object, ...]]:
        with sqlite_store.engine.begin() as conn:
            sqlite_store._write_states(conn, run, rows, now, generic=generic)
            sqlite_store._write_states(conn, run, rows[:10], now, generic=generic)  # upsert over existing rows
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
    assert sqlite_store.load_states("fast", "sensors", ["pump-7"]) == {"pump-7": bytes([7]) * 1206}
