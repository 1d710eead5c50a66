"""The alert database's tables, on one MetaData: the SQL code and the Alembic migrations both import this
module and nothing else of each other. Every table holds rows of one run (run_id), so a run can be
deleted as a whole (RUN_TABLES)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

alerts = Table(
    "alerts",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("alert_key", String(300), nullable=False, unique=True),
    Column("run_id", String(64), nullable=False),
    Column("stream", String(64), nullable=False),
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
    # alert lifecycle (migration 0002): the incident this alert belongs to, operator ack and label
    Column("incident_key", String(300), nullable=True),
    Column("acked_at", DateTime(timezone=True), nullable=True),
    Column("acked_by", String(64), nullable=True),
    Column("label", String(8), nullable=True),  # "tp" | "fp"
    Column("labeled_at", DateTime(timezone=True), nullable=True),
    # migration 0008: the verdict last sent to the labels topic for this alert's payment ("tp" | "fp")
    Column("label_published", String(8), nullable=True),
    Index("ix_alerts_entity_time", "run_id", "entity_id", "event_time"),
    Index("ix_alerts_run_stream", "run_id", "stream"),
    Index("ix_alerts_incident", "incident_key"),
)

entity_state = Table(
    "entity_state",
    metadata,
    Column("run_id", String(64), primary_key=True),
    Column("stream", String(64), primary_key=True),
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
    # migration 0003: how often the broker's log was found reset below the stored position (offset reset);
    # part of the alert and incident keys of later records, so a restarted log's offsets do not collide
    Column("log_epoch", Integer, nullable=False, server_default="0"),
)

incidents = Table(
    "incidents",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("incident_key", String(300), nullable=False, unique=True),
    Column("run_id", String(64), nullable=False),
    Column("stream", String(64), nullable=False),
    Column("entity_id", String(64), nullable=False),
    Column("source_topic", String(255), nullable=False),
    Column("source_partition", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # open | resolved
    Column("severity", String(16), nullable=False),
    Column("opened_at", DateTime(timezone=True), nullable=False),  # event time of the first alert
    Column("last_alert_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),  # event time of its entity's last event
    Column("resolved_at", DateTime(timezone=True), nullable=True),  # event time of the resolving event
    Column("alert_count", Integer, nullable=False),
    Column("normal_run", Integer, nullable=False),  # normal events since the last alert (lifecycle state)
    Column("peak_score", Float, nullable=False),
    Column("peak_threshold", Float, nullable=False),
    Column("last_score", Float, nullable=False),
    Column("last_threshold", Float, nullable=False),
    Column("seq", Integer, nullable=False),  # notifications published so far
    Column("notified_at", DateTime(timezone=True), nullable=True),  # event time of the last notification
    Column("notified_severity", String(16), nullable=True),
    Column("last_alert", JSON, nullable=True),  # wire form of the newest alert (for the resolved message)
    Column("acked_at", DateTime(timezone=True), nullable=True),
    Column("acked_by", String(64), nullable=True),
    Column("label", String(8), nullable=True),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_incidents_run_status", "run_id", "status"),
    Index("ix_incidents_entity", "run_id", "stream", "entity_id"),
    Index("ix_incidents_partition", "run_id", "source_topic", "source_partition", "status"),
)

alert_outbox = Table(
    "alert_outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("message_id", String(320), nullable=False, unique=True),  # incident_key#seq: consumers dedupe on it
    Column("run_id", String(64), nullable=False),
    Column("entity_id", String(64), nullable=False),  # the Kafka key
    Column("payload", Text, nullable=False),  # JSON per schemas/alert.schema.json
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=True),
    Index("ix_outbox_unpublished", "run_id", "published_at", "id"),
)

score_samples = Table(
    "score_samples",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("stream", String(64), nullable=False),
    Column("entity_id", String(64), nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("score", Float, nullable=False),
    Column("threshold", Float, nullable=False),
    Column("is_anomaly", Boolean, nullable=False),
    Index("ix_score_samples_entity", "run_id", "stream", "entity_id", "id"),
)

# migration 0004: a challenger's would-be alerts (the columns of `alerts`; they never open incidents) and a sample
# of every model version's scores (drift, compare; score_samples holds only entities with an incident)
shadow_alerts = Table(
    "shadow_alerts",
    metadata,
    *(
        Column(
            c.name,
            c.type,
            primary_key=c.primary_key,
            autoincrement=c.autoincrement,
            nullable=c.nullable,
            unique=c.unique,
        )
        for c in alerts.columns
    ),
    Index("ix_shadow_alerts_version_time", "model_version", "event_time"),
)

# what makes a score sample one sample (its unique index; writes skip one stored already)
SAMPLE_KEY = ("run_id", "stream", "model_version", "entity_id", "event_time")

model_score_samples = Table(
    "model_score_samples",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", String(64), nullable=False),
    Column("stream", String(64), nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("entity_id", String(64), nullable=False),
    Column("event_time", DateTime(timezone=True), nullable=False),
    Column("score", Float, nullable=False),
    Index("ix_model_score_samples_version_time", "model_version", "event_time"),
    Index("uq_model_score_samples_sample", *SAMPLE_KEY, unique=True),  # migration 0006
)

RUN_TABLES = (
    alerts,
    entity_state,
    partition_checkpoints,
    incidents,
    alert_outbox,
    score_samples,
    shadow_alerts,
    model_score_samples,
)

# migration 0004: the model registry (pipeline.registry; SQL side pipeline/sinks/registry.py)
model_versions = Table(
    "model_versions",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("version", String(128), nullable=False, unique=True),
    Column("stream", String(64), nullable=False),
    Column("number", Integer, nullable=False),
    Column("family", String(32), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("content_hash", String(64), nullable=False),
    Column("card", JSON, nullable=False),
    Column("blob", LargeBinary, nullable=False),
    Column("size", BigInteger, nullable=False),
    UniqueConstraint("stream", "number", name="uq_model_versions_stream_number"),
    UniqueConstraint("stream", "content_hash", name="uq_model_versions_stream_hash"),
)

# migration 0007: the last number given out per stream, never lowered (a deleted version's id is not reused)
model_version_numbers = Table(
    "model_version_numbers",
    metadata,
    Column("stream", String(64), primary_key=True),
    Column("last_number", Integer, nullable=False),
)

model_aliases = Table(
    "model_aliases",
    metadata,
    Column("stream", String(64), primary_key=True),
    Column("alias", String(16), primary_key=True),
    Column(
        "version", String(128), ForeignKey("model_versions.version", name="fk_model_aliases_version"), nullable=False
    ),
    Column("generation", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

model_promotions = Table(
    "model_promotions",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("stream", String(64), nullable=False),
    Column("alias", String(16), nullable=False),
    Column("action", String(16), nullable=False),  # promote | rollback | clear
    Column("version", String(128), nullable=True),  # None: the alias was cleared
    Column("previous_version", String(128), nullable=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("by", String(64), nullable=False),
    Index("ix_model_promotions_alias", "stream", "alias", "id"),
)
