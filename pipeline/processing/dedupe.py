"""Dedupe stage: a record resent by an at-least-once producer (a payment's transaction_id; a reading's device,
time and values: StreamSpec.dedupe_key), inside the partition's window of recent keys, is dropped, counted, and
not scored twice."""

from __future__ import annotations

from typing import Any

from pipeline import metrics
from pipeline.features.streams import DecodedRecord, StreamSpec
from pipeline.processing.restore import PartitionRestore
from pipeline.processing.stats import ProcessorStats
from pipeline.records import RawRecord
from pipeline.state.partition import Partitions


class Dedupe:
    def __init__(self, window: int, partitions: Partitions, restore: PartitionRestore, stats: ProcessorStats) -> None:
        self.window, self.partitions, self.restore, self.stats = window, partitions, restore, stats

    def duplicate(self, spec: StreamSpec[Any], r: RawRecord, rec: DecodedRecord) -> bool:
        """True if the record's dedupe key is in its partition's window (else it is remembered)."""
        key = spec.dedupe_key(rec)
        if key is None:
            return False
        st = self.partitions[(r.topic, r.partition)]
        if not self.restore.dedupe(st, spec.name).seen(key):
            return False
        if r.offset >= st.recovery_until:  # counted once, not again when a restart replays it
            self.stats.duplicates += 1
            metrics.DUPLICATES.labels(spec.name).inc()
        return True
