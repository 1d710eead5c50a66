"""State snapshots: which partitions a checkpoint snapshots (staggered, one per checkpoint, plus every partition
of a stream whose model was swapped) and the rows that hold their state (entity slots, terminal context, dedupe
window)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pipeline.checkpointing.rows import StateRow
from pipeline.records import TopicPartition
from pipeline.scoring.scorer import StreamScorer
from pipeline.state.partition import Partitions, PartitionState, context_key, dedupe_key


class Snapshots:
    def __init__(
        self,
        scorers: Mapping[str, StreamScorer],
        partitions: Partitions,
        snapshot_unit: Callable[[TopicPartition], set[TopicPartition]],
    ) -> None:
        self.scorers, self.partitions, self.snapshot_unit = scorers, partitions, snapshot_unit
        self.forced: set[TopicPartition] = set()  # at the next checkpoint that may snapshot them (see force)

    def stagger(self, tps: list[TopicPartition], now: float, every: float) -> None:
        """Spread the partitions' snapshots over the interval: one partition's entities per checkpoint, not
        all at once."""
        for i, tp in enumerate(sorted(tps)):
            self.partitions[tp].snapshot_due = now + every * (i + 1) / len(tps)

    def force(self, topic: str) -> None:
        """Snapshot every partition of `topic` as soon as it may be: its entities changed model (a promoted
        version took over), and a restart must resume them as the new model keeps them."""
        self.forced.update(st.tp for st in self.partitions.of_topic(topic))

    def may_snapshot(self, st: PartitionState) -> bool:
        """Consumed records, and none of the partitions snapshotted with it is replaying (their state is behind
        their durable position)."""
        parts = self.partitions
        return st.consumed is not None and not any(
            (u in parts and parts[u].replaying) for u in self.snapshot_unit(st.tp)
        )

    def due(self, now: float) -> set[TopicPartition]:
        """The most overdue partition that has consumed records (with the partitions whose positions are only
        valid snapshotted together with it), and the forced ones that may be snapshotted."""
        parts = self.partitions
        self.forced = {tp for tp in self.forced if tp in parts}
        chosen: set[TopicPartition] = set()
        for tp in self.forced:
            if self.may_snapshot(parts[tp]):
                chosen |= self.snapshot_unit(tp)
        due = [
            (st.snapshot_due, st.tp)
            for st in parts
            if st.snapshot_due is not None and st.snapshot_due <= now and self.may_snapshot(st)
        ]
        if due:
            chosen |= self.snapshot_unit(min(due)[1])
        return chosen

    def taken(self, tps: set[TopicPartition], now: float, every: float) -> None:
        """The snapshot of `tps` is durable: the next is due one interval later."""
        self.forced -= tps
        for tp in tps:
            st = self.partitions.get(tp)
            if st is not None and st.snapshot_due is not None:  # not the labels partitions that came along
                st.snapshot_due = now + every

    def collect(self, tps: set[TopicPartition]) -> tuple[list[StateRow], Callable[[], None]]:
        """State rows of `tps`, and a call that marks their entities clean once the rows are durable."""
        rows: list[StateRow] = []
        to_clean: list[tuple[StreamScorer, np.ndarray]] = []
        for topic, scorer in self.scorers.items():
            name = scorer.spec.name
            for t, p in sorted(tps):
                if t != topic:
                    continue
                slots = scorer.store.dirty_slots(p)
                if len(slots):
                    blobs = scorer.store.snapshot(slots)
                    ids = scorer.store.entity_ids(slots)
                    rows.extend(StateRow(name, e, t, p, b) for e, b in zip(ids, blobs, strict=True))
                    to_clean.append((scorer, slots))
            for t, p in sorted(tps):
                st = self.partitions.get((t, p))
                if t == topic and st is not None and st.context is not None:
                    rows.append(StateRow(name, context_key(p), t, p, st.context.snapshot()))
            for t, p in sorted(tps):
                st = self.partitions.get((t, p))
                if t == topic and st is not None and st.dedupe is not None:
                    rows.append(StateRow(name, dedupe_key(p), t, p, st.dedupe.snapshot()))

        def mark_clean() -> None:
            for scorer, slots in to_clean:
                scorer.store.mark_clean(slots)

        return rows, mark_clean
