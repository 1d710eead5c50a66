"""Seed alerts, incidents, outbox rows and score samples through the real lifecycle path
(IncidentTracker -> SqlCheckpointStore.write_checkpoint), for the CLI, API, outbox and page tests."""

from __future__ import annotations

from datetime import datetime, timezone

from pipeline.alerts.lifecycle import IncidentTracker, LifecyclePolicy, ScoredEvent, severity_of
from pipeline.checkpointing.rows import AlertRow, OffsetRow
from pipeline.sinks import Database, SqlCheckpointStore

T0 = 1_714_560_000.0  # 2024-05-01T10:40:00Z
FEATURES = ("log_amount", "secs_since_last", "hour_sin")


def alert_for(ev: ScoredEvent, run_id: str = "live") -> AlertRow:
    return AlertRow(
        alert_key=f"{run_id}|{ev.topic}|{ev.partition}|{ev.offset}|m@1",
        run_id=run_id,
        stream=ev.stream,
        entity_id=ev.entity_id,
        event_time=datetime.fromtimestamp(ev.ts, tz=timezone.utc),
        score=ev.score,
        threshold=ev.threshold,
        severity=severity_of(ev.score, ev.threshold),
        model_version="m@1",
        top_features=[
            {"feature": f, "observed": 5.0 - i + ev.score / 10, "reconstructed": 1.0 + i * 0.5, "contribution": 3.0 - i}
            for i, f in enumerate(FEATURES)
        ],
        source_topic=ev.topic,
        source_partition=ev.partition,
        source_offset=ev.offset,
    )


def feed(
    db: Database, tracker: IncidentTracker, events: list[tuple[ScoredEvent, bool]], run_id: str = "live"
) -> list[AlertRow]:
    """Apply events to the tracker and write one checkpoint; returns the alerts written."""
    alerts = []
    for ev, anomalous in events:
        tracker.apply(ev, anomalous)
        if anomalous:
            alerts.append(alert_for(ev, run_id))
    last = max(ev.offset for ev, _ in events) + 1
    SqlCheckpointStore(db).write_checkpoint(
        run_id, "g", alerts, [], [OffsetRow(events[0][0].topic, 0, last)], lifecycle=tracker.prepare(alerts)
    )
    tracker.written()
    return alerts


def scenario() -> list[tuple[ScoredEvent, bool]]:
    """C1: open, escalating (stays open). D7: opens, resolves after 3 normal events. C2: one alert, open."""
    out: list[tuple[ScoredEvent, bool]] = []
    off = 0

    def ev(stream: str, entity: str, t: float, score: float, thr: float, anomalous: bool) -> None:
        nonlocal off
        topic = "tx" if stream == "transactions" else "sn"
        out.append((ScoredEvent(stream, entity, topic, 0, off, T0 + t, score, thr), anomalous))
        off += 1

    for i, s in enumerate((6.0, 9.0, 14.0, 30.0, 55.0)):
        ev("transactions", "C1", i * 30.0, s, 5.0, True)
    ev("transactions", "C1", 160.0, 4.0, 5.0, False)
    ev("transactions", "C1", 190.0, 3.0, 5.0, False)
    ev("sensors", "D7", 0.0, 3.0, 2.0, True)
    for i in range(3):
        ev("sensors", "D7", 10.0 + i * 10, 1.0, 2.0, False)
    ev("transactions", "C2", 100.0, 7.0, 5.0, True)
    return out


def seed(db: Database, run_id: str = "live") -> IncidentTracker:
    tracker = IncidentTracker(run_id, LifecyclePolicy(resolve_after=3, suppress_s=60.0))
    feed(db, tracker, scenario(), run_id)
    return tracker
