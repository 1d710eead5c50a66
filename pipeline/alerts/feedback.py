"""Operator labels -> retraining data: events confirmed anomalous (label "tp") are not normal traffic and
must not be learned as such."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.sinks.queries import AlertQueries


def confirmed_keys(
    queries: AlertQueries, run_id: str | None = None, stream: str | None = None
) -> set[tuple[str, float]]:
    """{(entity_id, event epoch seconds)} of alerts labelled true positive."""
    return {(r["entity_id"], _epoch(r["event_time"])) for r in queries.confirmed_anomalies(run_id, stream)}


def exclude_confirmed(
    records: Iterable[Mapping[str, Any]],
    confirmed: set[tuple[str, float]],
    *,
    entity_field: str,
    time_field: str = "timestamp",
) -> list[Mapping[str, Any]]:
    """Drop records (decoded events, as produced to the topics) whose (entity, event time) was confirmed
    anomalous. time_field holds an ISO string, a datetime or epoch seconds."""
    return [r for r in records if (str(r[entity_field]), round(_epoch(r[time_field]), 6)) not in confirmed]


def transaction_labels(
    payments: Iterable[Any], *, is_fraud: bool, labelled_at: datetime, entity_key: str = "customer_id"
) -> list[dict[str, Any]]:
    """Label-feedback records (schemas/transaction_label) for decoded payments an analyst has judged: an
    alert labelled tp says its payment was fraud, fp that it was genuine. entity_key: the payments stream's
    name for the customer field (a stream file may rename it), which its labels use too."""
    at = labelled_at.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    return [
        {
            "transaction_id": p.transaction_id,
            entity_key: p.customer_id,
            "terminal_id": p.terminal_id,
            "is_fraud": is_fraud,
            "labelled_at": at,
        }
        for p in payments
    ]


def _epoch(v: Any) -> float:
    if isinstance(v, (int, float)):
        return round(float(v), 6)
    if isinstance(v, str):
        v = datetime.fromisoformat(v.replace("Z", "+00:00"))
    if v.tzinfo is None:
        v = v.replace(tzinfo=timezone.utc)
    return round(v.timestamp(), 6)
