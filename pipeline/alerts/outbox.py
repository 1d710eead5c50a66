"""Outbox relay: alerts-topic messages are written to the `alert_outbox` table in the same transaction as
the alerts and incidents they describe, and published to Kafka afterwards by this relay.

At-least-once: rows are marked published only after the producer flushed them (acks=all); a crash
between the database commit and the publish, or between the publish and the mark, means the rows are
sent again by the next drain (the relay starts with a drain on restart). Consumers dedupe on
`incident.message_id` (= incident key + "#" + seq); within one incident `seq` only grows.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline import metrics
from pipeline.errors import PipelineError
from pipeline.records import AlertPublisher
from pipeline.sinks.sql import SqlStore

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(self, db: SqlStore, publisher: AlertPublisher, run_id: str, batch: int = 500) -> None:
        self.db, self.publisher, self.run_id, self.batch = db, publisher, run_id, batch
        self.backlog = True  # unpublished rows may exist (restart, or the last drain failed)

    def drain(self) -> int:
        """Publish every unpublished row of this run, oldest first. Raises SinkError (rows stay unpublished)."""
        total = 0
        try:
            while True:
                n = self.db.drain_outbox(self.run_id, self._send, self.batch)
                total += n
                if n < self.batch:
                    break
        except PipelineError:
            self.backlog = True
            metrics.OUTBOX_FAILURES.inc()
            raise
        self.backlog = False
        if total:
            metrics.OUTBOX_PUBLISHED.inc(total)
            log.debug("published %d alert-topic messages", total)
        return total

    def try_drain(self) -> int:
        """drain(), logging instead of raising: the topic catches up on a later checkpoint."""
        try:
            return self.drain()
        except PipelineError as exc:
            log.warning("alerts topic publish failed, will retry (outbox rows stay unpublished): %s", exc)
            return 0

    def _send(self, rows: list[dict[str, Any]]) -> None:
        for r in rows:
            self.publisher.publish(r["entity_id"], r["payload"].encode())
        self.publisher.flush()
