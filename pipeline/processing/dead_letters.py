"""Dead letters: a record that cannot be processed goes to the dead-letter topic with a reason, never again
for a replayed record (its dead letter is durable already)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

from pipeline import metrics
from pipeline.processing.stats import ProcessorStats
from pipeline.records import DeadLetterSink, RawRecord
from pipeline.state.partition import Partitions

log = logging.getLogger(__name__)


def failure_detail(stage: str, exc: BaseException) -> str:
    """Dead-letter detail of a record that made a processing stage raise: the stage and the error."""
    return f"stage={stage}: {type(exc).__name__}: {str(exc)[:300]}"


def out_of_order_detail(ts: float, allowed_lateness_s: float | None) -> str:
    """Dead-letter detail of an event further behind its entity than the scorer's allowed lateness."""
    when = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()
    return f"event time {when} is more than allowed_lateness_s={allowed_lateness_s} behind its entity's latest event"


@dataclass
class DeadLetters:
    sink: DeadLetterSink
    partitions: Partitions
    stats: ProcessorStats

    def send(self, r: RawRecord, reason: str, detail: str) -> None:
        st = self.partitions.get((r.topic, r.partition))
        if st is None or r.offset >= st.recovery_until:
            self.sink.send(r, reason, detail)
            self.stats.dead_letters += 1
            metrics.DLQ.labels(r.topic, reason).inc()

    def processing_error(self, r: RawRecord, stage: str, exc: Exception) -> None:
        log.error(
            "%s[%d]@%d made stage %s raise; dead-lettered as processing_error: %s: %s",
            r.topic,
            r.partition,
            r.offset,
            stage,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self.send(r, "processing_error", failure_detail(stage, exc))

    def incident_error(self, r: RawRecord, exc: Exception) -> None:
        """The record was scored (its alert, if any, stands) but its incident lifecycle update raised."""
        log.error(
            "%s[%d]@%d: incident lifecycle update raised; dead-lettered as incident_error (the alert "
            "stands, its incident was not updated): %s: %s",
            r.topic,
            r.partition,
            r.offset,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        self.send(r, "incident_error", failure_detail("observe", exc))
