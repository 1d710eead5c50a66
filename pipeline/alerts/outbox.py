"""Outbox relay: alerts-topic messages are written to the `alert_outbox` table in the same transaction as
the alerts and incidents they describe, and published to Kafka afterwards by this relay.

At-least-once: rows are marked published only after the producer flushed them (acks=all); a crash
between the database commit and the publish, or between the publish and the mark, means the rows are
sent again by the next drain (the relay starts with a drain on restart). Consumers dedupe on
`incident.message_id` (= incident key + "#" + seq); within one incident `seq` only grows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from pipeline import metrics
from pipeline.errors import PipelineError, SinkError
from pipeline.records import AlertPublisher

log = logging.getLogger(__name__)


class Outbox(Protocol):
    """Where the relay takes its messages from (pipeline.sinks.SqlCheckpointStore on the alert database)."""

    def drain_outbox(self, run_id: str, send: Callable[[list[dict[str, Any]]], None], limit: int = 1000) -> int:
        """Hand unpublished rows to send(rows), then mark them published; if send raises, nothing is marked."""
        ...


class OutboxRelay:
    def __init__(
        self, outbox: Outbox, publisher: AlertPublisher, run_id: str, batch: int = 500, retry_max_s: float = 30.0
    ) -> None:
        self.outbox, self.publisher, self.run_id, self.batch = outbox, publisher, run_id, batch
        self.backlog = True  # unpublished rows may exist (restart, or the last drain failed)
        self.retry_max_s = retry_max_s
        self._delay = 0.0  # backoff after a failed drain: a down broker must not stall every checkpoint
        self._retry_at = 0.0

    def drain(self) -> int:
        """Publish every unpublished row of this run, oldest first. Raises SinkError (rows stay unpublished)."""
        total = 0
        try:
            while True:
                n = self.outbox.drain_outbox(self.run_id, self._send, self.batch)
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
        """drain(), logging instead of raising: the topic catches up on a later checkpoint (after a failure,
        not before an exponential backoff has passed)."""
        now = time.monotonic()
        if now < self._retry_at:
            return 0
        try:
            n = self.drain()
        except PipelineError as exc:
            self._delay = min(max(0.5, self._delay * 2), self.retry_max_s)
            self._retry_at = time.monotonic() + self._delay
            log.warning(
                "alerts topic publish failed, retrying in %.1fs (outbox rows stay unpublished): %s", self._delay, exc
            )
            return 0
        self._delay, self._retry_at = 0.0, 0.0
        return n

    def _send(self, rows: list[dict[str, Any]]) -> None:
        """Any publish error becomes SinkError: it runs after the database commit, so it must never escape
        try_drain (the rows stay unpublished and the next checkpoint's drain sends them again)."""
        try:
            for r in rows:
                self.publisher.publish(r["entity_id"], r["payload"].encode())
            self.publisher.flush()
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - the client's own errors (pipeline.kafka wraps most of them)
            raise SinkError(f"alerts topic publish failed: {type(exc).__name__}: {exc}") from exc
