"""Incident lifecycle: consecutive anomalous scores of one entity form one incident.

Rules (all in event time, computed from the ordered per-entity sequence of scored events, so a replay
of the same events gives the same incidents):

* An anomalous event of an entity with no open incident **opens** one (notification "opened").
* Further anomalous events update it: alert count, last/peak score, severity (the highest severity of
  its alerts; severity comes from score / threshold, see `severity_of`). An "updated" notification is
  sent only when the severity escalates or when `suppress_s` seconds (event time) have passed since the
  entity's last notification: the per-entity suppression window.
* `resolve_after` consecutive normal events **resolve** it (notification "resolved", resolved_at = the
  event time of the resolving event). An anomalous event after a gap longer than `max_gap_s` since the
  entity was last seen resolves the old incident at its last-seen time and opens a new one.

The tracker keeps only open incidents in memory (restored per source partition from the database when
the partition is first seen) and only looks at events of entities that have an open incident or an
anomaly in the batch; events before the partition's committed offset are replays whose effects are
already durable and are skipped. Its outputs are buffered and written in the checkpoint transaction.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson

from pipeline.checkpointing.rows import AlertRow, IncidentRow, LifecycleWrite, OutboxRow, SampleRow, iso_utc
from pipeline.records import RawRecord, TopicPartition

SEVERITIES = ("low", "medium", "high", "critical")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}
# score/threshold bounds of low|medium|high (above: critical). An alert's severity and its incident's come from
# the same LifecyclePolicy.severity_bands, so they cannot disagree.
SEVERITY_BANDS: tuple[float, float, float] = (1.5, 3.0, 10.0)


@dataclass(frozen=True)
class LifecyclePolicy:
    resolve_after: int = 5  # consecutive normal events that resolve an incident
    suppress_s: float = 300.0  # at most one "updated" notification per entity per window, unless escalating
    max_gap_s: float = 3600.0  # an anomaly after this much silence starts a new incident
    severity_bands: tuple[float, float, float] = SEVERITY_BANDS
    sample_ring: int = 256  # recent (event_time, score, threshold) kept per entity with an incident

    def __post_init__(self) -> None:
        if self.resolve_after < 1:
            raise ValueError("resolve_after must be >= 1")


def severity_of(score: float, threshold: float, bands: Sequence[float] = SEVERITY_BANDS) -> str:
    """How far the score is past the threshold: ratio < bands[0] low, < bands[1] medium, < bands[2] high."""
    ratio = score / threshold if threshold > 0 else float("inf")
    for name, bound in zip(SEVERITIES, bands, strict=False):
        if ratio < bound:
            return name
    return "critical"


def max_severity(a: str, b: str) -> str:
    return a if _RANK.get(a, 0) >= _RANK.get(b, 0) else b


@dataclass
class Incident:
    """An open incident in memory: IncidentRow's fields (named as there, see _ROW_NAMES) with times as epoch
    seconds, plus the position of its latest alert (not persisted)."""

    key: str
    run_id: str
    stream: str
    entity_id: str
    topic: str
    partition: int
    status: str
    severity: str
    opened_at: float
    last_alert_at: float
    last_seen_at: float
    resolved_at: float | None
    alert_count: int
    normal_run: int
    peak_score: float
    peak_threshold: float
    last_score: float
    last_threshold: float
    seq: int = 0
    notified_at: float | None = None
    notified_severity: str | None = None
    last_alert: dict[str, Any] | None = None
    last_trigger: TopicPartition | None = None  # not persisted
    last_trigger_offset: int = -1

    @property
    def tp(self) -> TopicPartition:
        return (self.topic, self.partition)

    @property
    def peak_ratio(self) -> float:
        return self.peak_score / self.peak_threshold if self.peak_threshold > 0 else float("inf")

    def to_row(self) -> IncidentRow:
        values = {f.name: getattr(self, _ROW_NAMES.get(f.name, f.name)) for f in fields(IncidentRow)}
        for name in _ROW_TIMES:
            if values[name] is not None:
                values[name] = _dt(values[name])
        return IncidentRow(**values)

    @classmethod
    def from_row(cls, r: Mapping[str, Any]) -> Incident:
        values = {_ROW_NAMES.get(f.name, f.name): r[f.name] for f in fields(IncidentRow)}
        for name in _ROW_TIMES:
            if r[name] is not None:
                values[name] = _ts(r[name])
        return cls(**values)


# IncidentRow columns that Incident names differently, and the columns that are times (datetime <-> epoch s)
_ROW_NAMES = {"incident_key": "key", "source_topic": "topic", "source_partition": "partition"}
_ROW_TIMES = tuple(f.name for f in fields(IncidentRow) if "datetime" in str(f.type))


@dataclass(frozen=True)
class ScoredEvent:
    stream: str
    entity_id: str
    topic: str
    partition: int
    offset: int
    ts: float  # event time, epoch seconds
    score: float
    threshold: float
    tag: str = ""  # the partition's log-epoch suffix ("" until its log was ever reset)


def incident_key(run_id: str, ev: ScoredEvent) -> str:
    """Replay-stable: the source position of the opening event."""
    return f"{run_id}|{ev.stream}|{ev.entity_id}|{ev.topic}|{ev.partition}|{ev.offset}{ev.tag}"


def on_anomaly(
    inc: Incident | None, ev: ScoredEvent, policy: LifecyclePolicy, run_id: str
) -> tuple[Incident, list[tuple[str, Incident]]]:
    """Apply one anomalous event. Returns the (new or updated) open incident and the notifications
    [(event, incident snapshot)] it causes, oldest first."""
    sev = severity_of(ev.score, ev.threshold, policy.severity_bands)
    notes: list[tuple[str, Incident]] = []
    if inc is not None and inc.status == "open" and ev.ts - inc.last_seen_at > policy.max_gap_s:
        _resolve(inc, inc.last_seen_at)
        notes.append(("resolved", copy.copy(inc)))
    if inc is None or inc.status != "open":
        inc = Incident(
            key=incident_key(run_id, ev),
            run_id=run_id,
            stream=ev.stream,
            entity_id=ev.entity_id,
            topic=ev.topic,
            partition=ev.partition,
            status="open",
            severity=sev,
            opened_at=ev.ts,
            last_alert_at=ev.ts,
            last_seen_at=ev.ts,
            resolved_at=None,
            alert_count=1,
            normal_run=0,
            peak_score=ev.score,
            peak_threshold=ev.threshold,
            last_score=ev.score,
            last_threshold=ev.threshold,
            seq=1,
            notified_at=ev.ts,
            notified_severity=sev,
        )
        inc.last_trigger, inc.last_trigger_offset = (ev.topic, ev.partition), ev.offset
        notes.append(("opened", copy.copy(inc)))
        return inc, notes
    inc.alert_count += 1
    inc.normal_run = 0
    inc.last_alert_at = inc.last_seen_at = ev.ts
    inc.last_score, inc.last_threshold = ev.score, ev.threshold
    inc.last_trigger, inc.last_trigger_offset = (ev.topic, ev.partition), ev.offset
    ratio = ev.score / ev.threshold if ev.threshold > 0 else float("inf")
    if ratio > inc.peak_ratio:
        inc.peak_score, inc.peak_threshold = ev.score, ev.threshold
    inc.severity = max_severity(inc.severity, sev)
    escalated = _RANK[inc.severity] > _RANK.get(inc.notified_severity or "low", 0)
    if escalated or inc.notified_at is None or ev.ts - inc.notified_at >= policy.suppress_s:
        inc.seq += 1
        inc.notified_at, inc.notified_severity = ev.ts, inc.severity
        notes.append(("updated", copy.copy(inc)))
    return inc, notes


def on_normal(inc: Incident, ts: float, policy: LifecyclePolicy) -> str | None:
    """Apply one normal event to an open incident; returns "resolved" when it resolves it."""
    inc.normal_run += 1
    inc.last_seen_at = ts
    if inc.normal_run >= policy.resolve_after:
        _resolve(inc, ts)
        return "resolved"
    return None


def _resolve(inc: Incident, ts: float) -> None:
    inc.status = "resolved"
    inc.resolved_at = ts
    inc.seq += 1
    inc.notified_at = ts


@dataclass
class _Notice:
    event: str
    incident: Incident


@dataclass
class _Buffer:
    dirty: dict[str, Incident] = field(default_factory=dict)
    notices: list[_Notice] = field(default_factory=list)
    samples: list[tuple[TopicPartition, SampleRow]] = field(default_factory=list)
    alert_incident: dict[tuple[str, int, int], str] = field(default_factory=dict)


class IncidentTracker:
    """Per-entity incident state and the lifecycle outputs not yet written. Pure: IO through `loader`
    (open incidents of a source partition; the caller wraps it in its database-retry policy)."""

    def __init__(
        self,
        run_id: str,
        policy: LifecyclePolicy | None = None,
        loader: Callable[[str, int], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.policy = policy or LifecyclePolicy()
        self.loader = loader
        self.open: dict[tuple[str, str], Incident] = {}  # (stream, entity) -> open incident
        self._open_ids: dict[str, set[str]] = {}  # stream -> entity ids with an open incident
        self.loaded: set[TopicPartition] = set()
        self.buf = _Buffer()

    # -- feeding ---------------------------------------------------------------------------------------
    def observe(
        self,
        topic: str,
        stream: str,
        records: Sequence[RawRecord],
        partitions: np.ndarray,
        ts: np.ndarray,
        entity_ids: Sequence[str],
        scores: np.ndarray,
        thresholds: np.ndarray,
        is_anomaly: np.ndarray,
        committed: Mapping[TopicPartition, int],
        tags: Callable[[TopicPartition], str] | None = None,
    ) -> list[tuple[int, Exception]]:
        """One scored micro-batch (events in source order per partition). Returns the events (batch index,
        error) whose lifecycle update raised: the others are applied, the processor dead-letters those."""
        for p in np.unique(partitions).tolist():
            if (topic, p) not in self.loaded:
                self._load(topic, int(p))
        tracked = self._open_ids.get(stream)
        anomalies = np.flatnonzero(is_anomaly)
        if not tracked and len(anomalies) == 0:
            return []
        failed: list[tuple[int, Exception]] = []
        watch = set(tracked or ())
        watch.update(entity_ids[i] for i in anomalies.tolist())
        idx = np.flatnonzero(np.fromiter((e in watch for e in entity_ids), bool, len(entity_ids)))
        for i in idx.tolist():
            rec = records[i]
            tp = (topic, rec.partition)
            if rec.offset < committed.get(tp, 0):
                continue  # a replayed event: its lifecycle effects are already durable
            ev = ScoredEvent(
                stream,
                entity_ids[i],
                topic,
                rec.partition,
                rec.offset,
                float(ts[i]),
                float(scores[i]),
                float(thresholds[i]),
                tags(tp) if tags is not None else "",
            )
            try:
                self.apply(ev, bool(is_anomaly[i]))
            except Exception as exc:  # noqa: BLE001 - one event must never stop the service
                failed.append((i, exc))
        return failed

    def apply(self, ev: ScoredEvent, anomalous: bool) -> None:
        key = (ev.stream, ev.entity_id)
        inc = self.open.get(key)
        if not anomalous and inc is None:
            return  # a normal event of an entity without an open incident: nothing to follow
        buf = self.buf
        buf.samples.append(
            (
                (ev.topic, ev.partition),
                SampleRow(ev.stream, ev.entity_id, _dt(ev.ts), ev.score, ev.threshold, anomalous),
            )
        )
        if anomalous or inc is None:
            inc, notes = on_anomaly(inc, ev, self.policy, self.run_id)
            for event, snap in notes:
                buf.notices.append(_Notice(event, snap))
                if event == "resolved":
                    buf.dirty[snap.key] = snap
            self.open[key] = inc
            self._open_ids.setdefault(ev.stream, set()).add(ev.entity_id)
            buf.alert_incident[(ev.topic, ev.partition, ev.offset)] = inc.key
        elif on_normal(inc, ev.ts, self.policy) == "resolved":
            buf.notices.append(_Notice("resolved", copy.copy(inc)))
            del self.open[key]
            self._open_ids[ev.stream].discard(ev.entity_id)
        buf.dirty[inc.key] = inc

    def _load(self, topic: str, partition: int) -> None:
        if self.loader is not None:
            for row in self.loader(topic, partition):
                inc = Incident.from_row(row)
                self.open[(inc.stream, inc.entity_id)] = inc
                self._open_ids.setdefault(inc.stream, set()).add(inc.entity_id)
        self.loaded.add((topic, partition))

    def forget(self, tp: TopicPartition) -> None:
        """The partition was revoked: drop its incidents and any of its outputs not yet written."""
        self.loaded.discard(tp)
        for key, inc in list(self.open.items()):
            if inc.tp == tp:
                del self.open[key]
                self._open_ids.get(inc.stream, set()).discard(inc.entity_id)
        b = self.buf
        b.dirty = {k: v for k, v in b.dirty.items() if v.tp != tp}
        b.notices = [n for n in b.notices if n.incident.tp != tp]
        b.samples = [s for s in b.samples if s[0] != tp]
        b.alert_incident = {k: v for k, v in b.alert_incident.items() if (k[0], k[1]) != tp}

    # -- checkpoint --------------------------------------------------------------------------------------
    def prepare(self, alerts: Sequence[AlertRow]) -> LifecycleWrite:
        """The buffered outputs as rows for the checkpoint transaction; links `alerts` to their incidents.
        Idempotent: call `written()` once the transaction committed."""
        b = self.buf
        if not (b.dirty or b.notices or b.samples):
            return LifecycleWrite(sample_ring=self.policy.sample_ring)
        wire: dict[tuple[str, int, int], dict[str, Any]] = {}
        for a in alerts:
            pos = (a.source_topic, a.source_partition, a.source_offset)
            ik = b.alert_incident.get(pos)
            if ik is not None:
                a.incident_key = ik
                wire[pos] = a.to_wire()
        for inc in [*b.dirty.values(), *(n.incident for n in b.notices)]:
            if inc.last_trigger is not None:
                w = wire.get((*inc.last_trigger, inc.last_trigger_offset))
                if w is not None:
                    inc.last_alert = w
        outbox = [
            OutboxRow(
                message_id=f"{n.incident.key}#{n.incident.seq}",
                run_id=self.run_id,
                entity_id=n.incident.entity_id,
                payload=message(n.event, n.incident, self.policy.severity_bands).decode(),
            )
            for n in b.notices
        ]
        return LifecycleWrite(
            incidents=[i.to_row() for i in b.dirty.values()],
            outbox=outbox,
            samples=[s for _, s in b.samples],
            sample_ring=self.policy.sample_ring,
        )

    def written(self) -> dict[str, int]:
        """The prepared outputs are durable: clear the buffer. Returns notifications by event."""
        counts: dict[str, int] = {}
        for n in self.buf.notices:
            counts[n.event] = counts.get(n.event, 0) + 1
        self.buf = _Buffer()
        return counts


def message(event: str, inc: Incident, bands: Sequence[float] = SEVERITY_BANDS) -> bytes:
    """The alerts-topic message: the incident's newest alert (schemas/alert.schema.json) plus `incident`."""
    body: dict[str, Any] = (
        dict(inc.last_alert)
        if inc.last_alert
        else {
            "alert_key": inc.key,
            "run_id": inc.run_id,
            "stream": inc.stream,
            "entity_id": inc.entity_id,
            "event_time": _iso(inc.last_alert_at),
            "score": inc.last_score,
            "threshold": inc.last_threshold,
            "severity": severity_of(inc.last_score, inc.last_threshold, bands),
            "model_version": "unknown",
            "top_features": [],
            "source": {"topic": inc.topic, "partition": inc.partition, "offset": 0},
        }
    )
    body["incident"] = {
        "key": inc.key,
        "message_id": f"{inc.key}#{inc.seq}",
        "event": event,
        "seq": inc.seq,
        "status": inc.status,
        "severity": inc.severity,
        "opened_at": _iso(inc.opened_at),
        "last_alert_at": _iso(inc.last_alert_at),
        "resolved_at": None if inc.resolved_at is None else _iso(inc.resolved_at),
        "alert_count": inc.alert_count,
        "peak_score": inc.peak_score,
        "peak_threshold": inc.peak_threshold,
    }
    return orjson.dumps(body)


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _ts(dt: datetime) -> float:
    if dt.tzinfo is None:  # SQLite returns naive datetimes; everything stored is UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _iso(ts: float) -> str:
    return iso_utc(_dt(ts))
