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

Positions never move backwards: while a partition replays (its consumed position is below the durable
one), a checkpoint writes the durable position again, never the replay position, takes no state snapshot
of it (its state is behind the position the snapshot would claim), and drops the replay's re-emitted
alerts (already durable). Only an explicit `PartitionPositions.rewind` (the broker's log was reset, see
the processor's offset-reset policy) writes a lower position, together with a state snapshot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import metrics
from pipeline.checkpointing.rows import AlertRow, OffsetRow, StateRow
from pipeline.errors import CheckpointError, SinkError
from pipeline.records import DeadLetterSink, RawRecord, Source, TopicPartition

if TYPE_CHECKING:
    from pipeline.alerts.lifecycle import IncidentTracker
    from pipeline.alerts.outbox import OutboxRelay
    from pipeline.scoring.scorer import ScoreBatch
    from pipeline.sinks.sql import SqlStore

log = logging.getLogger(__name__)


@dataclass
class PartitionPositions:
    """Next offset to process per partition, as far as this worker has consumed."""

    consumed: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    snapshot: dict[TopicPartition, int] = field(default_factory=dict)
    on_forget: list[Callable[[TopicPartition], None]] = field(default_factory=list)

    rewound: set[TopicPartition] = field(default_factory=set)  # lower positions the next checkpoint must write
    epoch: dict[TopicPartition, int] = field(default_factory=dict)  # log resets so far (0 when absent)

    def advance(self, tp: TopicPartition, next_offset: int) -> None:
        if next_offset > self.consumed.get(tp, -1):
            self.consumed[tp] = next_offset

    def replaying(self, tp: TopicPartition) -> bool:
        """Re-applying records whose outputs are already durable (after a restart or a rebalance)."""
        return self.consumed.get(tp, -1) < self.committed.get(tp, -1)

    def durable_after(self, tp: TopicPartition, consumed: int) -> int:
        """The position a checkpoint may write: never below what is already durable, unless rewound."""
        if tp in self.rewound:
            return consumed
        return max(consumed, self.committed.get(tp, consumed))

    def rewind(self, tp: TopicPartition, next_offset: int) -> None:
        """The log no longer holds our position (topic recreated, broker lost its log): start over at
        `next_offset`; the next checkpoint writes it (lower) with a state snapshot."""
        self.consumed[tp] = self.committed[tp] = next_offset
        self.snapshot.pop(tp, None)
        self.rewound.add(tp)
        self.epoch[tp] = self.epoch.get(tp, 0) + 1

    def tag(self, tp: TopicPartition) -> str:
        """Suffix of alert and incident keys: records of a reset log reuse offsets, their keys must not."""
        e = self.epoch.get(tp, 0)
        return f"~{e}" if e else ""

    def forget(self, tp: TopicPartition) -> None:
        for d in (self.consumed, self.committed, self.snapshot, self.epoch):
            d.pop(tp, None)
        self.rewound.discard(tp)
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
        snapshot_unit: Callable[[TopicPartition], set[TopicPartition]] | None = None,
        db_retry: Callable[[str, Callable[[], Any]], Any] | None = None,
    ) -> None:
        """snapshot_unit(tp): the partitions whose positions are only valid snapshotted together (a transactions
        partition and the labels partition whose labels its terminal context holds); default {tp}.
        db_retry(what, call): wraps the incident tracker's database reads (retry with backoff); default: call()."""
        self.db, self.source, self.dlq = db, source, dlq
        self.run_id, self.group_id = run_id, group_id
        self.collect_states = collect_states
        self.after_durable = after_durable
        self.pending: list[AlertRow] = []
        self.positions = PartitionPositions()
        self.tracker: IncidentTracker | None = None
        self.relay: OutboxRelay | None = None
        self.snapshot_unit: Callable[[TopicPartition], set[TopicPartition]] = snapshot_unit or (lambda tp: {tp})
        self.db_retry: Callable[[str, Callable[[], Any]], Any] = db_retry or (lambda _what, call: call())

    def enable_incidents(self, tracker: IncidentTracker, relay: OutboxRelay | None = None) -> None:
        """Derive incidents from the scored events (written with each checkpoint); publish via `relay`."""
        self.tracker, self.relay = tracker, relay
        self.positions.on_forget.append(tracker.forget)
        load = tracker.loader
        if load is not None:
            tracker.loader = lambda topic, partition: self.db_retry(
                f"load open incidents of {topic}[{partition}]", lambda: load(topic, partition)
            )

    def observe(
        self,
        topic: str,
        stream: str,
        records: list[RawRecord],
        partitions: np.ndarray,
        event_ts: np.ndarray,
        batch: ScoreBatch,
    ) -> list[tuple[int, Exception]]:
        """Feed one scored micro-batch to the incident tracker (no-op without one); returns the events whose
        lifecycle update raised (see IncidentTracker.observe)."""
        if self.tracker is None:
            return []
        return self.tracker.observe(
            topic,
            stream,
            records,
            partitions,
            event_ts,
            batch.entity_ids,
            batch.scores,
            batch.thresholds,
            batch.is_anomaly,
            self.positions.committed,
            tags=self.positions.tag,
        )

    def checkpoint(self, snapshot: bool | set[TopicPartition], only: set[TopicPartition] | None = None) -> int:
        """Flush sinks, then commit offsets. Returns alerts newly inserted. Raises CheckpointError.

        snapshot: True = state snapshot of every consumed partition; a set = of those partitions only
        (the processor staggers partitions so no single checkpoint writes every entity).
        """
        started = time.perf_counter()
        pos = self.positions
        applied = {tp: o for tp, o in pos.consumed.items() if only is None or tp in only}
        consumed = {tp: pos.durable_after(tp, o) for tp, o in applied.items()}  # never backwards
        changed = {tp: o for tp, o in consumed.items() if pos.committed.get(tp) != o or tp in pos.rewound}
        wanted = set(consumed) if snapshot is True else (snapshot or set())
        for tp in pos.rewound & set(consumed):  # a rewound position is only valid with a snapshot at it
            wanted |= self.snapshot_unit(tp) & set(consumed)
        # a partition still replaying has state behind its durable position: no snapshot of it (nor of the
        # partitions whose positions are only valid with its snapshot) until it has caught up
        behind = {tp for tp in applied if pos.replaying(tp) and tp not in pos.rewound}
        snap_tps = {tp for tp in wanted & set(consumed) if not (self.snapshot_unit(tp) & behind)}
        snapshot = bool(snap_tps)
        if self.pending:  # replayed alerts are durable already: they are not written (nor counted) again
            self.pending = [
                a
                for a in self.pending
                if a.source_offset >= pos.committed.get((a.source_topic, a.source_partition), 0)
                or (a.source_topic, a.source_partition) in pos.rewound
            ]
        states, mark_clean = self.collect_states(snap_tps) if snapshot else ([], lambda: None)
        lifecycle = self.tracker.prepare(self.pending) if self.tracker is not None else None
        if not changed and not self.pending and not states and not snapshot and not lifecycle:
            if self.relay is not None and self.relay.backlog:
                self.relay.try_drain()
            return 0
        offsets = [
            OffsetRow(
                t,
                p,
                o,
                applied[(t, p)] if (t, p) in snap_tps else None,
                pos.epoch.get((t, p)) if (t, p) in pos.rewound else None,
            )
            for (t, p), o in consumed.items()
            if (t, p) in changed or (t, p) in snap_tps
        ]
        alerts = self.pending
        try:
            self.dlq.flush()
            if lifecycle:
                inserted = self.db.write_checkpoint(
                    self.run_id, self.group_id, alerts, states, offsets, lifecycle=lifecycle
                )
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
        pos.committed.update(consumed)
        pos.rewound -= set(consumed)
        if snapshot:
            pos.snapshot.update({tp: applied[tp] for tp in snap_tps})
        if self.relay is not None and ((lifecycle is not None and lifecycle.outbox) or self.relay.backlog):
            self.relay.try_drain()
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
        for a in alerts:
            metrics.ALERTS.labels(a.stream).inc()
        if states:
            log.debug("snapshot: %d entity states, %d partitions", len(states), len(snap_tps))
        return inserted
