"""A checkpoint, always in this order:

1. flush sinks: the dead-letter producer is flushed (acks=all); alerts, dirty entity-state snapshots
   (when a snapshot is due) and the partition positions go to the database in ONE transaction;
2. then commit offsets to the Kafka consumer group;
3. then, when an outbox relay is set, publish the new alerts-topic messages (after the database commit,
   so the topic never shows an incident the table does not have; see pipeline.alerts.outbox).

With an IncidentTracker (pipeline.alerts.lifecycle) the incident rows, outbox messages and score samples
it derived from the scored events go into the same transaction as the alerts and offsets, and so do the
per-model rows: a challenger's shadow alerts and the sampled scores of every model (ModelWrite). A challenger
scores on a thread of its own (pipeline.processing.shadow), so its rows go with the first checkpoint after it
finished their batch, which may be after their events' positions were committed; they are idempotent (unique
alert key; samples read back before insert), so they skip the replay filter below.

If step 1 fails nothing is committed and the caller retries with backoff; the in-memory pending
alerts are kept, so nothing acknowledged is ever lost. Restart resumes each partition from its last
state snapshot and replays to the committed position: state comes back exactly, and re-emitted
alerts collapse onto their unique keys.

Positions never move backwards: while a partition replays (its consumed position is below the durable
one), a checkpoint writes the durable position again, never the replay position, takes no state snapshot
of it (its state is behind the position the snapshot would claim), and drops the replay's re-emitted
alerts (already durable). Only an explicit `PartitionState.rewind` (the broker's log was reset, see the
processor's offset-reset policy) writes a lower position, together with a state snapshot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pipeline import metrics
from pipeline.checkpointing.protocols import CheckpointStore, Relay
from pipeline.checkpointing.rows import AlertRow, ModelScoreRow, ModelWrite, OffsetRow, StateRow
from pipeline.errors import CheckpointError, SinkError
from pipeline.records import DeadLetterSink, RawRecord, Source, TopicPartition
from pipeline.state.partition import Partitions

if TYPE_CHECKING:
    from pipeline.alerts.lifecycle import IncidentTracker
    from pipeline.scoring.scorer import ScoreBatch

log = logging.getLogger(__name__)

# (partitions to snapshot) -> (their state rows, a call that marks them clean once the rows are durable)
StateCollector = Callable[[set[TopicPartition]], tuple[list[StateRow], Callable[[], None]]]


class Checkpointer:
    def __init__(
        self,
        store: CheckpointStore,
        source: Source,
        dlq: DeadLetterSink,
        partitions: Partitions,
        *,
        run_id: str,
        group_id: str,
        collect_states: StateCollector,
        snapshot_unit: Callable[[TopicPartition], set[TopicPartition]] | None = None,
        tracker: IncidentTracker | None = None,
        relay: Relay | None = None,
        collect_models: Callable[[], ModelWrite] | None = None,
    ) -> None:
        """snapshot_unit(tp): the partitions whose positions are only valid snapshotted together (a transactions
        partition and the labels partition whose labels its terminal context holds); default {tp}.
        tracker: derives incidents from the scored events (written with each checkpoint); relay publishes
        them to the alerts topic after the database commit. collect_models: per-model rows produced off the
        processor's thread (the challengers' shadow rows), gathered when a checkpoint writes."""
        self.store, self.source, self.dlq = store, source, dlq
        self.partitions = partitions
        self.run_id, self.group_id = run_id, group_id
        self.collect_states = collect_states
        self.pending: list[AlertRow] = []
        self.pending_samples: list[ModelScoreRow] = []  # the champions' score samples
        self.pending_shadow = ModelWrite()  # rows from collect_models, not written yet
        self.tracker, self.relay = tracker, relay
        self.collect_models = collect_models
        self.snapshot_unit: Callable[[TopicPartition], set[TopicPartition]] = snapshot_unit or (lambda tp: {tp})

    def add(self, alerts: list[AlertRow]) -> None:
        """Alerts of scored events, written by the next checkpoint."""
        self.pending.extend(alerts)

    def add_samples(self, samples: list[ModelScoreRow]) -> None:
        """Sampled scores of a model version, written by the next checkpoint."""
        self.pending_samples.extend(samples)

    def _gather(self) -> None:
        if self.collect_models is not None:
            self.pending_shadow.extend(self.collect_models())

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Revoked partitions: their outputs not written yet are dropped (the next owner replays them)."""
        revoked = set(tps)

        def kept(row: AlertRow | ModelScoreRow) -> bool:
            return (row.source_topic, row.source_partition) not in revoked

        self.pending = [a for a in self.pending if kept(a)]
        self.pending_samples = [s for s in self.pending_samples if kept(s)]
        shadow = self.pending_shadow
        self.pending_shadow = ModelWrite(
            [a for a in shadow.shadow_alerts if kept(a)], [s for s in shadow.score_samples if kept(s)]
        )
        if self.tracker is not None:
            for tp in revoked:
                self.tracker.forget(tp)

    def observe(
        self,
        topic: str,
        stream: str,
        records: Sequence[RawRecord],
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
            self.partitions.committed,
            tags=self.partitions.tag,
        )

    def checkpoint(self, snapshot: bool | set[TopicPartition]) -> int:
        """Flush sinks, then commit offsets. Returns alerts newly inserted. Raises CheckpointError.

        snapshot: True = state snapshot of every consumed partition; a set = of those partitions only
        (the processor staggers partitions so no single checkpoint writes every entity).
        """
        started = time.perf_counter()
        states_of = {st.tp: st for st in self.partitions if st.consumed is not None}
        applied = {tp: st.consumed for tp, st in states_of.items() if st.consumed is not None}
        consumed = {tp: states_of[tp].durable_after(o) for tp, o in applied.items()}  # never backwards
        rewound = {tp for tp, st in states_of.items() if st.rewound}
        changed = {tp: o for tp, o in consumed.items() if states_of[tp].committed != o or tp in rewound}
        wanted = set(consumed) if snapshot is True else (snapshot or set())
        for tp in rewound:  # a rewound position is only valid with a snapshot at it
            wanted |= self.snapshot_unit(tp) & set(consumed)
        # a partition still replaying has state behind its durable position: no snapshot of it (nor of the
        # partitions whose positions are only valid with its snapshot) until it has caught up
        behind = {tp for tp, st in states_of.items() if st.replaying and not st.rewound}
        snap_tps = {tp for tp in wanted & set(consumed) if not (self.snapshot_unit(tp) & behind)}

        def new(row: AlertRow | ModelScoreRow) -> bool:
            return row.source_offset >= self.partitions.replay_floor((row.source_topic, row.source_partition))

        # outputs of replayed records are durable already: they are not written (nor counted) again
        self.pending = [a for a in self.pending if new(a)]
        self.pending_samples = [s for s in self.pending_samples if new(s)]
        self._gather()
        shadow = self.pending_shadow
        models = ModelWrite(list(shadow.shadow_alerts), [*self.pending_samples, *shadow.score_samples])
        states, mark_clean = self.collect_states(snap_tps) if snap_tps else ([], _nothing)
        lifecycle = self.tracker.prepare(self.pending) if self.tracker is not None else None
        if not changed and not self.pending and not states and not snap_tps and not lifecycle and not models:
            if self.relay is not None and self.relay.backlog:
                self.relay.try_drain()
            return 0
        offsets = [
            OffsetRow(
                t,
                p,
                o,
                applied[(t, p)] if (t, p) in snap_tps else None,
                states_of[(t, p)].epoch if (t, p) in rewound else None,
            )
            for (t, p), o in consumed.items()
            if (t, p) in changed or (t, p) in snap_tps
        ]
        alerts = self.pending
        try:
            self.dlq.flush()
            inserted = self.store.write_checkpoint(
                self.run_id, self.group_id, alerts, states, offsets, lifecycle=lifecycle or None, models=models or None
            )
        except SinkError as exc:
            metrics.DB_FAILURES.inc()
            raise CheckpointError(str(exc)) from exc
        self.pending, self.pending_samples, self.pending_shadow = [], [], ModelWrite()
        if self.tracker is not None:
            for event, n in self.tracker.written().items():
                metrics.INCIDENT_EVENTS.labels(event).inc(n)
        mark_clean()
        self.source.commit(consumed)
        for tp, o in consumed.items():
            st = states_of[tp]
            st.committed, st.rewound = o, False
            if tp in snap_tps:
                st.snapshot = applied[tp]
        if self.relay is not None and ((lifecycle is not None and lifecycle.outbox) or self.relay.backlog):
            self.relay.try_drain()
        metrics.CHECKPOINT_SECONDS.observe(time.perf_counter() - started)
        for a in alerts:
            metrics.ALERTS.labels(a.stream).inc()
        for a in models.shadow_alerts:
            metrics.SHADOW_ALERTS.labels(a.stream).inc()
        if states:
            log.debug("snapshot: %d entity states, %d partitions", len(states), len(snap_tps))
        return inserted


def _nothing() -> None:
    pass
