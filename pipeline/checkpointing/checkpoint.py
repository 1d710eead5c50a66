"""A checkpoint, always in this order:

1. flush sinks: the dead-letter producer is flushed (acks=all); alerts, dirty entity-state snapshots
   (when a snapshot is due) and the partition positions go to the database in ONE transaction;
2. then commit offsets to the Kafka consumer group;
3. then, when an outbox relay is set, publish the new alerts-topic messages (after the database commit,
   so the topic never shows an incident the table does not have; see pipeline.alerts.outbox).

With an IncidentTracker (pipeline.alerts.lifecycle) the incident rows, outbox messages and score samples
it derived from the scored events go into the same transaction as the alerts and offsets.

If step 1 fails nothing is committed and the caller retries with backoff; the in-memory pending
alerts are kept, so nothing acknowledged is ever lost. Restart resumes each partition from its last
state snapshot and replays to the committed position: state comes back exactly, and re-emitted
alerts collapse onto their unique keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline import metrics
from pipeline.errors import CheckpointError, SinkError
from pipeline.records import DeadLetterSink, RawRecord, Source, TopicPartition
from pipeline.sinks.sql import AlertRow, OffsetRow, SqlStore, StateRow

if TYPE_CHECKING:
    from pipeline.alerts.lifecycle import IncidentTracker
    from pipeline.alerts.outbox import OutboxRelay
    from pipeline.scoring.scorer import ScoreBatch

log = logging.getLogger(__name__)


@dataclass
class PartitionPositions:
    """Next offset to process per partition, as far as this worker has consumed."""

    consumed: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    snapshot: dict[TopicPartition, int] = field(default_factory=dict)
    on_forget: list[Callable[[TopicPartition], None]] = field(default_factory=list)

    def advance(self, tp: TopicPartition, next_offset: int) -> None:
        if next_offset > self.consumed.get(tp, -1):
            self.consumed[tp] = next_offset

    def forget(self, tp: TopicPartition) -> None:
        for d in (self.consumed, self.committed, self.snapshot):
            d.pop(tp, None)
        for cb in self.on_forget:
            cb(tp)


class Checkpointer:
    def __init__(
        self,
        db: SqlStore,
        source: Source,
        dlq: DeadLetterSink,
        *,
        run_id: str,
        group_id: str,
        collect_states: Callable[[set[TopicPartition]], tuple[list[StateRow], Callable[[], None]]],
        after_durable: Callable[[list[AlertRow]], None] | None = None,
    ) -> None:
        self.db, self.source, self.dlq = db, source, dlq
        self.run_id, self.group_id = run_id, group_id
        self.collect_states = collect_states
        self.after_durable = after_durable
        self.pending: list[AlertRow] = []
        self.positions = PartitionPositions()
        self.tracker: IncidentTracker | None = None
        self.relay: OutboxRelay | None = None

    def enable_incidents(self, tracker: IncidentTracker, relay: OutboxRelay | None = None) -> None:
        """Derive incidents from the scored events (written with each checkpoint); publish via `relay`."""
        self.tracker, self.relay = tracker, relay
        self.positions.on_forget.append(tracker.forget)

    def observe(self, topic: str, stream: str, records: list[RawRecord], partitions: np.ndarray,
                event_ts: np.ndarray, batch: ScoreBatch) -> None:
        """Feed one scored micro-batch to the incident tracker (no-op without one)."""
        if self.tracker is not None:
            self.tracker.observe(topic, stream, records, partitions, event_ts, batch.entity_ids, batch.scores,
                                 batch.thresholds, batch.is_anomaly, self.positions.committed)

    def checkpoint(self, snapshot: bool | set[TopicPartition], only: set[TopicPartition] | None = None) -> int:
        """Flush sinks, then commit offsets. Returns alerts newly inserted. Raises CheckpointError.

        snapshot: True = state snapshot of every consumed partition; a set = of those partitions only
        (the processor staggers partitions so no single checkpoint writes every entity).
        """
        started = time.perf_counter()
        consumed = {tp: o for tp, o in self.positions.consumed.items() if only is None or tp in only}
        changed = {tp: o for tp, o in consumed.items() if self.positions.committed.get(tp) != o}
        wanted = set(consumed) if snapshot is True else (snapshot or set())
        snap_tps = wanted & set(consumed)
        snapshot = bool(snap_tps)
        states, mark_clean = self.collect_states(snap_tps) if snapshot else ([], lambda: None)
        lifecycle = self.tracker.prepare(self.pending) if self.tracker is not None else None
        if not changed and not self.pending and not states and not snapshot and not lifecycle:
            if self.relay is not None and self.relay.backlog:
                self.relay.try_drain()
            return 0
        offsets = [
            OffsetRow(t, p, o, o if (t, p) in snap_tps else None)
            for (t, p), o in consumed.items()
            if (t, p) in changed or (t, p) in snap_tps
        ]
        alerts = self.pending
        try:
            self.dlq.flush()
            if lifecycle:
                inserted = self.db.write_checkpoint(self.run_id, self.group_id, alerts, states, offsets,
                                                    lifecycle=lifecycle)
            else:
                inserted = self.db.write_checkpoint(self.run_id, self.group_id, alerts, states, offsets)
        except SinkError as exc:
            metrics.DB_FAILURES.inc()
            raise CheckpointError(str(exc)) from exc
        self.pending = []
        if self.tracker is not None:
            for event, n in self.tracker.written().items():
                metrics.INCIDENT_EVENTS.labels(event).inc(n)
        mark_clean()
        if self.after_durable is not None and alerts:
            self.after_durable(alerts)
        self.source.commit(consumed)
        self.positions.committed.update(consumed)
        if snapshot:
            self.positions.snapshot.update({tp: consumed[tp] for tp in snap_tps})
        if self.relay is not None and ((lifecycle is not None and lifecycle.outbox) or self.relay.backlog):
            self.relay.try_drain()
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
        for a in alerts:
            metrics.ALERTS.labels(a.stream).inc()
        if states:
            log.debug("snapshot: %d entity states, %d partitions", len(states), len(snap_tps))
        return inserted
