"""Pydantic mirrors of the JSON Schema contracts (validated in Rust, a few microseconds per message)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

EntityId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
ChannelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_. -]{1,64}$")]
StreamName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")]  # as a stream file declares it

# Event times must lie in [1900-01-01, 2200-01-01) UTC. A wider time cannot be handled downstream: an offset
# can push a valid local 9999-12-31 (or 0001-01-01) out of datetime's range in UTC, and pandas' nanosecond
# timestamps end in 2262. Such times are always producer bugs, so they are dead-lettered at validation
# (reason timestamp_out_of_range) instead of crashing a later stage.
EVENT_TIME_MIN = datetime(1900, 1, 1, tzinfo=timezone.utc).timestamp()
EVENT_TIME_MAX = datetime(2200, 1, 1, tzinfo=timezone.utc).timestamp()


def _in_range(dt: datetime) -> datetime:
    ts = dt.timestamp()  # aware: exact epoch seconds, no overflow even when the UTC year leaves 1..9999
    if not EVENT_TIME_MIN <= ts < EVENT_TIME_MAX:
        raise PydanticCustomError(
            "timestamp_out_of_range",
            "event time {value} is outside 1900-01-01T00:00:00Z .. 2200-01-01T00:00:00Z",
            {"value": dt.isoformat()},
        )
    return dt


EventTime = Annotated[AwareDatetime, AfterValidator(_in_range)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Transaction(_Strict):
    transaction_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    customer_id: EntityId
    terminal_id: EntityId
    amount: Annotated[float, Field(ge=0, le=1_000_000_000, allow_inf_nan=False)]
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")] | None = None
    timestamp: EventTime


class TransactionLabel(_Strict):
    """Label feedback for an earlier payment; keyed (and partitioned) by customer like the payment."""

    transaction_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    customer_id: EntityId
    terminal_id: EntityId
    is_fraud: bool
    labelled_at: EventTime


class SensorReading(_Strict):
    device_id: EntityId
    timestamp: EventTime
    values: Annotated[dict[ChannelName, FiniteFloat], Field(min_length=1, max_length=64)]


class FeatureContribution(_Strict):
    feature: str
    observed: float
    reconstructed: float
    contribution: float


class AlertSource(_Strict):
    topic: str
    partition: Annotated[int, Field(ge=0)]
    offset: Annotated[int, Field(ge=0)]


class Alert(_Strict):
    alert_key: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    run_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    stream: StreamName
    entity_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    event_time: datetime
    score: float
    threshold: float
    severity: Literal["low", "medium", "high", "critical"] | None = None
    model_version: Annotated[str, StringConstraints(min_length=1)]
    top_features: Annotated[list[FeatureContribution], Field(max_length=64)]
    source: AlertSource
    incident: AlertIncident | None = None


class AlertIncident(_Strict):
    """Incident envelope on alerts-topic messages (pipeline.alerts.lifecycle)."""

    key: Annotated[str, StringConstraints(min_length=1)]
    message_id: Annotated[str, StringConstraints(min_length=1)]
    event: Literal["opened", "updated", "resolved"]
    seq: Annotated[int, Field(ge=1)]
    status: Literal["open", "resolved"]
    severity: Literal["low", "medium", "high", "critical"]
    opened_at: datetime
    last_alert_at: datetime
    resolved_at: datetime | None
    alert_count: Annotated[int, Field(ge=1)]
    peak_score: float
    peak_threshold: float
