"""Pydantic mirrors of the JSON Schema contracts (validated in Rust, a few microseconds per message)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
)
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


# The schema's "format": "date-time" is RFC 3339: seconds and an offset are required, `T` and `Z` in either
# case. pydantic's parser accepts more (a digit string as epoch seconds or ms, "+0530", no seconds, a space),
# and one of those read "20261110" as 1970-08-23; such spellings are dead-lettered rather than guessed at.
RFC3339 = re.compile(
    r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})\Z"
)


def _rfc3339(value: object) -> object:
    """The string, parsed by pydantic's own JSON datetime parser (so a value decodes exactly as before), if it
    has the RFC 3339 shape; else a timestamp_format error. Non-strings go on to the strict type check."""
    if not isinstance(value, str):
        return value
    if RFC3339.match(value) is None:
        raise PydanticCustomError(
            "timestamp_format",
            "event time {value} is not an RFC 3339 date-time such as 2026-11-10T12:00:00Z (seconds and a Z or "
            "+HH:MM offset are required; no epoch numbers)",
            {"value": repr(value[:64])},
        )
    return _JSON_DATETIME.validate_json(f'"{value}"')  # the shape holds no character JSON would escape


_JSON_DATETIME: TypeAdapter[datetime] = TypeAdapter(AwareDatetime, config=ConfigDict(strict=True))
EventTime = Annotated[AwareDatetime, BeforeValidator(_rfc3339), AfterValidator(_in_range)]


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
