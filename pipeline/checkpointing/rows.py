"""What one checkpoint writes: plain rows, no SQL. The core builds them; a CheckpointStore (the SQL one is
pipeline.sinks) persists them in one transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

MAX_ROW_ID = 2**63 - 1  # BIGINT: larger ids (and limits) cannot exist, and SQLite cannot even bind them
REPLAY_GROUP = "replay"  # the group of a replay's positions: a run id is either a service's or a replay's


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
    incident_key: str | None = None

    def to_wire(self) -> dict[str, Any]:
        """The alert as schemas/alert.schema.json describes it."""
        return {
            "alert_key": self.alert_key,
            "run_id": self.run_id,
            "stream": self.stream,
            "entity_id": self.entity_id,
            "event_time": iso_utc(self.event_time),
            "score": self.score,
            "threshold": self.threshold,
            "severity": self.severity,
            "model_version": self.model_version,
            "top_features": self.top_features,
            "source": {"topic": self.source_topic, "partition": self.source_partition, "offset": self.source_offset},
        }


def iso_utc(dt: datetime) -> str:
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
    log_epoch: int | None = None  # None: leave as stored


@dataclass
class IncidentRow:
    """The current state of one incident (upserted on incident_key; ack/label columns are never touched)."""

    incident_key: str
    run_id: str
    stream: str
    entity_id: str
    source_topic: str
    source_partition: int
    status: str
    severity: str
    opened_at: datetime
    last_alert_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    alert_count: int
    normal_run: int
    peak_score: float
    peak_threshold: float
    last_score: float
    last_threshold: float
    seq: int
    notified_at: datetime | None
    notified_severity: str | None
    last_alert: dict[str, Any] | None


@dataclass
class OutboxRow:
    message_id: str
    run_id: str
    entity_id: str
    payload: str


@dataclass
class SampleRow:
    stream: str
    entity_id: str
    event_time: datetime
    score: float
    threshold: float
    is_anomaly: bool


@dataclass
class LifecycleWrite:
    """Incident-lifecycle outputs of one checkpoint; written in the checkpoint's transaction."""

    incidents: list[IncidentRow] = field(default_factory=list)
    outbox: list[OutboxRow] = field(default_factory=list)
    samples: list[SampleRow] = field(default_factory=list)
    sample_ring: int = 256  # score samples kept per entity

    def __bool__(self) -> bool:
        return bool(self.incidents or self.outbox or self.samples)


@dataclass
class ModelScoreRow:
    """One sampled score of a model version (model_score_samples): the live score distribution that drift and
    compare read. The source position only decides, like an alert's, whether a replay already wrote it."""

    stream: str
    model_version: str
    entity_id: str
    event_time: datetime
    score: float
    source_topic: str
    source_partition: int
    source_offset: int


@dataclass
class ModelWrite:
    """Per-model-version outputs of one checkpoint, written in its transaction: the challengers' would-be
    alerts (shadow_alerts, idempotent on alert_key) and the sampled scores of every model."""

    shadow_alerts: list[AlertRow] = field(default_factory=list)
    score_samples: list[ModelScoreRow] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.shadow_alerts or self.score_samples)

    def extend(self, other: ModelWrite) -> None:
        self.shadow_alerts.extend(other.shadow_alerts)
        self.score_samples.extend(other.score_samples)
