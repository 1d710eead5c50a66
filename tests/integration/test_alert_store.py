"""Alert-lifecycle schema on real PostgreSQL and SQLite: Alembic migrations, incidents written in the
checkpoint transaction, restart restores open incidents, operator feedback, bounded score samples."""

from __future__ import annotations

import json
from datetime import timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, inspect

from pipeline.alerts.feedback import confirmed_keys, exclude_confirmed
from pipeline.alerts.lifecycle import IncidentTracker, LifecyclePolicy, ScoredEvent
from pipeline.checkpointing.rows import OffsetRow
from pipeline.errors import NotFoundError, SinkError
from pipeline.sinks import AlertQueries, Database, SqlCheckpointStore, tables
from pipeline.sinks.migrations import alembic_config
from tests.alerts_seed import T0, alert_for, feed, seed


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request: pytest.FixtureRequest) -> Database:
    return request.getfixturevalue("pg_store" if request.param == "postgresql" else "sqlite_store")


def _diff(db: Database) -> list:
    with db.engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(mc, tables.metadata))


def test_migrations_reach_head_and_match_the_metadata(db: Database) -> None:
    with db.engine.connect() as conn:
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert MigrationContext.configure(conn).get_current_revision() == head
        names = set(inspect(conn).get_table_names())
    assert {"alerts", "entity_state", "partition_checkpoints", "incidents", "alert_outbox", "score_samples"} <= names
    assert _diff(db) == []
    db.create_schema()  # idempotent
    assert _diff(db) == []


def test_a_database_from_before_migrations_is_stamped_and_upgraded(db: Database) -> None:
    db.drop_schema()
    old = MetaData()  # the three tables exactly as the service created them before Alembic
    tables.entity_state.to_metadata(old)
    checkpoints = tables.partition_checkpoints.to_metadata(old)
    checkpoints._columns.remove(checkpoints.c["log_epoch"])  # noqa: SLF001 - rebuild the 0002 schema; added by 0003
    alerts = tables.alerts.to_metadata(old)
    for col in ("incident_key", "acked_at", "acked_by", "label", "labeled_at", "label_published"):  # 0002, 0008
        alerts._columns.remove(alerts.c[col])  # noqa: SLF001 - SQLAlchemy has no public column removal
    alerts.indexes = {ix for ix in alerts.indexes if ix.name != "ix_alerts_incident"}
    old.create_all(db.engine)
    db.create_schema()
    assert _diff(db) == []


def test_incidents_outbox_and_samples_are_written_with_the_checkpoint(db: Database) -> None:
    queries = AlertQueries(db)
    seed(db)
    incs = {(i["entity_id"], i["status"]) for i in queries.list_incidents(run_id="live")}
    assert incs == {("C1", "open"), ("D7", "resolved"), ("C2", "open")}
    c1 = queries.list_incidents(entity_id="C1")[0]
    assert c1["alert_count"] == 5 and c1["severity"] == "critical" and c1["normal_run"] == 2
    alerts = queries.query_alerts(incident_id=c1["id"])
    assert len(alerts) == 5 and {a["incident_status"] for a in alerts} == {"open"}
    events = [json.loads(r["payload"])["incident"]["event"] for r in queries.outbox_rows("live")]
    assert events.count("opened") == 3 and events.count("resolved") == 1 and "updated" in events
    samples = queries.recent_scores("live", "transactions", "C1")
    assert [s["score"] for s in samples] == [6.0, 9.0, 14.0, 30.0, 55.0, 4.0, 3.0]
    assert queries.lifecycle_stats("live") == {"open_incidents": 2, "outbox_unpublished": len(events)}


def test_restart_restores_open_incidents_per_partition(db: Database) -> None:
    seed(db)
    policy = LifecyclePolicy(resolve_after=3, suppress_s=60.0)
    checkpoints, queries = SqlCheckpointStore(db), AlertQueries(db)
    t2 = IncidentTracker("live", policy, loader=lambda tp, p: checkpoints.open_incidents("live", tp, p))
    t2._load("tx", 0)  # noqa: SLF001 - the restore path a first event of the partition takes
    assert {k[1] for k in t2.open} == {"C1", "C2"}
    # one more normal event resolves C1 (2 were counted before the "restart")
    feed(db, t2, [(ScoredEvent("transactions", "C1", "tx", 0, 100, T0 + 400, 2.0, 5.0), False)])
    c1 = queries.list_incidents(entity_id="C1")[0]
    assert c1["status"] == "resolved" and c1["seq"] >= 2
    last = json.loads(queries.outbox_rows("live")[-1]["payload"])
    assert last["incident"]["event"] == "resolved" and last["alert_key"].startswith("live|tx|0|4|")


def test_failed_checkpoint_writes_no_incident(db: Database) -> None:
    queries = AlertQueries(db)
    t = IncidentTracker("live", LifecyclePolicy())
    e = ScoredEvent("transactions", "C9", "tx", 0, 1, T0, 9.0, 5.0)
    t.apply(e, True)
    bad = alert_for(e)
    bad.entity_id = None  # type: ignore[assignment]
    with pytest.raises(SinkError):
        SqlCheckpointStore(db).write_checkpoint(
            "live", "g", [bad], [], [OffsetRow("tx", 0, 2)], lifecycle=t.prepare([bad])
        )
    assert (
        queries.list_incidents() == [] and queries.outbox_rows() == [] and queries.recent_scores(None, None, "C9") == []
    )


def test_ack_and_label_and_retraining_exclusion(db: Database) -> None:
    queries = AlertQueries(db)
    seed(db)
    c1 = queries.list_incidents(entity_id="C1")[0]
    d7_alert = queries.query_alerts(entity_id="D7")[0]
    assert queries.ack(alert_id=d7_alert["id"], by="ana") == 1
    assert queries.get_alert(d7_alert["id"])["acked_by"] == "ana"
    assert queries.label("tp", incident_id=c1["id"]) == 6  # the incident and its 5 alerts
    assert queries.get_incident(c1["id"])["label"] == "tp"
    assert len(queries.query_alerts(status="tp")) == 5 and len(queries.query_alerts(status="acked")) == 1
    with pytest.raises(NotFoundError):
        queries.ack(alert_id=999_999)
    # the first acknowledgement stands: acking again (by someone else) changes nothing
    assert queries.ack(alert_id=d7_alert["id"], by="bo") == 0
    assert queries.get_alert(d7_alert["id"])["acked_by"] == "ana"
    assert queries.ack(incident_id=c1["id"], by="bo") == 6  # the incident and its 5 alerts, none acked yet
    assert queries.ack(incident_id=c1["id"], by="cy") == 0
    assert queries.get_incident(c1["id"])["acked_by"] == "bo"
    keys = confirmed_keys(queries, "live")
    assert len(keys) == 5
    recs = [
        {"customer_id": "C1", "timestamp": "2024-05-01T10:40:00Z"},
        {"customer_id": "C1", "timestamp": "2024-05-01T10:40:01Z"},
    ]
    assert exclude_confirmed(recs, keys, entity_field="customer_id") == recs[1:]


def test_score_samples_are_a_bounded_ring(sqlite_store: Database, tmp_path: Path) -> None:
    t = IncidentTracker("live", LifecyclePolicy(resolve_after=1000, sample_ring=10))
    evs = [
        (ScoredEvent("sensors", "D1", "sn", 0, i, T0 + i, 5.0 if i % 5 else 9.0, 4.0), i % 5 == 0) for i in range(40)
    ]
    feed(sqlite_store, t, evs[:25])
    feed(sqlite_store, t, evs[25:])
    samples = AlertQueries(sqlite_store).recent_scores("live", "sensors", "D1")
    last = samples[-1]["event_time"]
    assert len(samples) == 10 and last.replace(tzinfo=timezone.utc).timestamp() == pytest.approx(T0 + 39)


def test_score_samples_stored_twice_before_their_key_are_deduplicated_by_the_upgrade(db: Database) -> None:
    """Migration 0006: duplicates written before the unique key (the old read-back check could race a replay)
    are removed, the oldest row of each sample kept; afterwards a sample written again is skipped."""
    from datetime import datetime

    from alembic import command
    from sqlalchemy import func, select

    from pipeline.checkpointing.rows import ModelScoreRow, ModelWrite

    samples = tables.model_score_samples
    db.drop_schema()
    with db.engine.begin() as conn:
        command.upgrade(alembic_config(conn), "0005")
    t = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
    row = {"run_id": "live", "stream": "sensors", "model_version": "v1", "entity_id": "P1", "event_time": t}
    with db.engine.begin() as conn:
        dupes = [{**row, "score": 1.0}, {**row, "score": 2.0}, {**row, "entity_id": "P2", "score": 3.0}]
        conn.execute(samples.insert(), dupes)
    db.create_schema()  # upgrades to head
    assert _diff(db) == []
    with db.engine.connect() as conn:
        kept = conn.execute(select(samples.c.entity_id, samples.c.score).order_by(samples.c.id)).all()
    assert [tuple(r) for r in kept] == [("P1", 1.0), ("P2", 3.0)]
    store = SqlCheckpointStore(db)
    again = ModelWrite(
        [], [ModelScoreRow("sensors", "v1", e, t, 9.0, "sensors", 0, i) for i, e in enumerate(["P1", "P3"])]
    )
    for _ in range(2):
        store.write_checkpoint("live", "g", [], [], [], models=again)
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(samples)).scalar_one() == 3
