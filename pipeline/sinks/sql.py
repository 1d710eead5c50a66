"""Alerts, entity-state snapshots and partition checkpoints in one SQL database (SQLite or PostgreSQL).

All three are written in ONE transaction per checkpoint, so the stored offsets can never run ahead of
the alerts and state they account for. Alert inserts are idempotent (unique alert_key), which is what
makes replaying from the last state snapshot after a crash safe.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from pipeline.errors import SinkError

metadata = MetaData()

alerts = Table(
    "alerts",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("alert_key", String(300), nullable=False, unique=True),
    Column("run_id", String(64), nullable=False),
    Column("stream", String(32), nullable=False),
    Column("entity_id", String(64), nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("severity", String(16), nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("top_features", JSON, nullable=False),
    Column("source_topic", String(255), nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("source_offset", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_alerts_entity_time", "run_id", "entity_id", "event_time"),
    Index("ix_alerts_run_stream", "run_id", "stream"),
)

entity_state = Table(
    "entity_state",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("stream", String(32), primary_key=True),
    Column("entity_id", String(64), primary_key=True),
    Column("source_topic", String(255), nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("state", LargeBinary, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

partition_checkpoints = Table(
    "partition_checkpoints",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("group_id", String(255), primary_key=True),
    Column("topic", String(255), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("committed_offset", BigInteger, nullable=False),  # next offset whose outputs are NOT durable yet
    Column("snapshot_offset", BigInteger, nullable=True),  # next offset NOT reflected in entity_state
    Column("updated_at", DateTime(timezone=True), nullable=False),
)


@dataclass
class AlertRow:
    alert_key: str
    run_id: str
    stream: str
    entity_id: str
    event_time: datetime
    score: float
    threshold: float
    severity: str
    model_version: str
    top_features: list[dict[str, Any]]
    source_topic: str
    source_partition: int
    source_offset: int
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def to_wire(self) -> dict[str, Any]:
        """The alert as schemas/alert.schema.json describes it."""
        return {
            "alert_key": self.alert_key,
            "run_id": self.run_id,
            "stream": self.stream,
            "entity_id": self.entity_id,
            "event_time": _iso(self.event_time),
            "score": self.score,
            "threshold": self.threshold,
            "severity": self.severity,
            "model_version": self.model_version,
            "top_features": self.top_features,
            "source": {"topic": self.source_topic, "partition": self.source_partition, "offset": self.source_offset},
        }


def _iso(dt: datetime) -> str:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass
class StateRow:
    stream: str
    entity_id: str
    source_topic: str
    source_partition: int
    state: bytes


@dataclass
class OffsetRow:
    topic: str
    partition: int
    committed_offset: int
    snapshot_offset: int | None = None


class SqlStore:
    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if url.startswith("postgresql"):
            kwargs.update(pool_pre_ping=True, pool_size=4, max_overflow=4)
        self.engine: Engine = create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def create_schema(self) -> None:
        """Bring the schema to head (Alembic migrations when available, else create_all)."""
        try:
            from pipeline.sinks.migrations import upgrade_to_head
        except ImportError:
            metadata.create_all(self.engine)
        else:
            upgrade_to_head(self.engine)

    def drop_schema(self) -> None:
        metadata.drop_all(self.engine)

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            return False

    def _insert(self, table: Table) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def write_checkpoint(
        self,
        run_id: str,
        group_id: str,
        alert_rows: Sequence[AlertRow],
        states: Sequence[StateRow],
        offsets: Sequence[OffsetRow],
    ) -> int:
        """One transaction: alerts (idempotent), state snapshots, partition offsets. Returns alerts inserted."""
        now = datetime.now(timezone.utc)
        try:
            with self.engine.begin() as conn:
                inserted = 0
                if alert_rows:
                    stmt = self._insert(alerts).on_conflict_do_nothing(index_elements=["alert_key"])
                    result = conn.execute(stmt, [a.__dict__ for a in alert_rows])
                    inserted = max(result.rowcount, 0)
                if states:
                    ins = self._insert(entity_state)
                    stmt = ins.on_conflict_do_update(
                        index_elements=["run_id", "stream", "entity_id"],
                        set_={"state": ins.excluded.state, "source_topic": ins.excluded.source_topic,
                              "source_partition": ins.excluded.source_partition,
                              "updated_at": ins.excluded.updated_at},
                    )
                    conn.execute(stmt, [{"run_id": run_id, "updated_at": now, **s.__dict__} for s in states])
                for o in offsets:
                    ins = self._insert(partition_checkpoints)
                    set_: dict[str, Any] = {"committed_offset": ins.excluded.committed_offset,
                                            "updated_at": ins.excluded.updated_at}
                    if o.snapshot_offset is not None:
                        set_["snapshot_offset"] = ins.excluded.snapshot_offset
                    conn.execute(
                        ins.on_conflict_do_update(index_elements=["run_id", "group_id", "topic", "partition"],
                                                  set_=set_),
                        {"run_id": run_id, "group_id": group_id, "topic": o.topic, "partition": o.partition,
                         "committed_offset": o.committed_offset, "snapshot_offset": o.snapshot_offset,
                         "updated_at": now},
                    )
                return inserted
        except OperationalError as exc:
            raise SinkError(f"database unavailable: {exc.orig!s}".strip()) from exc
        except SQLAlchemyError as exc:
            raise SinkError(f"checkpoint write failed: {exc!s}") from exc

    def load_states(self, run_id: str, stream: str, entity_ids: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        try:
            with self.engine.connect() as conn:
                for start in range(0, len(entity_ids), 500):
                    chunk = list(entity_ids[start : start + 500])
                    rows = conn.execute(
                        select(entity_state.c.entity_id, entity_state.c.state).where(
                            entity_state.c.run_id == run_id, entity_state.c.stream == stream,
                            entity_state.c.entity_id.in_(chunk))
                    )
                    out.update({r.entity_id: bytes(r.state) for r in rows})
        except SQLAlchemyError as exc:
            raise SinkError(f"could not load entity state: {exc!s}") from exc
        return out

    def load_offsets(self, run_id: str, group_id: str) -> dict[tuple[str, int], tuple[int, int | None]]:
        """{(topic, partition): (committed_offset, snapshot_offset)}"""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(partition_checkpoints).where(partition_checkpoints.c.run_id == run_id,
                                                    partition_checkpoints.c.group_id == group_id)
            )
            return {(r.topic, r.partition): (r.committed_offset, r.snapshot_offset) for r in rows}

    def list_alerts(
        self,
        *,
        run_id: str | None = None,
        entity_id: str | None = None,
        stream: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        q = select(alerts).order_by(alerts.c.event_time, alerts.c.id)
        if run_id is not None:
            q = q.where(alerts.c.run_id == run_id)
        if entity_id is not None:
            q = q.where(alerts.c.entity_id == entity_id)
        if stream is not None:
            q = q.where(alerts.c.stream == stream)
        if since is not None:
            q = q.where(alerts.c.event_time >= since)
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def count_alerts(self, run_id: str | None = None) -> int:
        return len(self.list_alerts(run_id=run_id))

    def delete_run(self, run_id: str) -> None:
        with self.engine.begin() as conn:
            for t in (alerts, entity_state, partition_checkpoints):
                conn.execute(t.delete().where(t.c.run_id == run_id))

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


def rows_to_wire(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    keys = AlertRow.__dataclass_fields__
    return [AlertRow(**{k: r[k] for k in keys}).to_wire() for r in rows]
