"""Dedupe stage: a payment resent by an at-least-once producer (same transaction_id, inside the partition's
window of recent ids) is dropped, counted, and not scored twice."""

from __future__ import annotations

from pipeline import metrics
from pipeline.features.streams import TransactionRecord
from pipeline.processing.restore import PartitionRestore
from pipeline.processing.stats import ProcessorStats
from pipeline.records import RawRecord
from pipeline.state.partition import Partitions


class Dedupe:
    def __init__(self, window: int, partitions: Partitions, restore: PartitionRestore, stats: ProcessorStats) -> None:
        self.window, self.partitions, self.restore, self.stats = window, partitions, restore, stats

    def duplicate(self, stream: str, r: RawRecord, rec: TransactionRecord) -> bool:
        """True if the payment's transaction_id is in its partition's window (else it is remembered)."""
        st = self.partitions[(r.topic, r.partition)]
        if not self.restore.dedupe(st, stream).seen(rec.transaction_id):
            return False
        if r.offset >= st.recovery_until:  # counted once, not again when a restart replays it
            self.stats.duplicates += 1
            metrics.DUPLICATES.labels(stream).inc()
        return True
