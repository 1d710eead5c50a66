"""The database-retry policy of the processing path: one object, built once and handed to whoever reads the
database while processing (partition restores, entity-state loads, the incident tracker's loads)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from pipeline import metrics
from pipeline.errors import PipelineError, SinkError

log = logging.getLogger(__name__)
T = TypeVar("T")


class ProcessorStopped(PipelineError):
    """Asked to stop while waiting for the database mid-batch: exit without a checkpoint (replayed later)."""


class DbRetry:
    """Retries a database call with exponential backoff while the database is unavailable (SinkError); the
    processor reports not ready meanwhile (`ready`, /readyz). Waiting ends early when the run is stopped."""

    def __init__(self, max_delay_s: float = 30.0, ready: threading.Event | None = None) -> None:
        self.max_delay_s = max_delay_s
        self.ready = ready or threading.Event()  # partitions assigned and the database reachable
        self.failures = 0  # database failures on the processing path, checkpoints included
        self._stop = threading.Event()

    def until(self, stop: threading.Event) -> None:
        """Waits of this run end when `stop` is set (ProcessorStopped)."""
        self._stop = stop

    def failed(self) -> None:
        """Count a database failure; not ready until the next success."""
        self.failures += 1
        self.ready.clear()

    def __call__(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried while the database is unavailable. Raises ProcessorStopped when asked to stop while
        waiting (nothing half-applied is committed: the batch is replayed)."""
        delay, was_ready = 0.2, self.ready.is_set()
        try:
            while True:
                try:
                    return call()
                except SinkError as exc:
                    self.failed()
                    metrics.DB_FAILURES.inc()
                    log.warning(
                        "cannot %s (database unavailable?); retrying in %.1fs: %s",
                        what,
                        delay,
                        str(exc).splitlines()[0],
                    )
                    if self._stop.wait(delay):
                        raise ProcessorStopped(f"stopped while waiting to {what}") from exc
                    delay = min(delay * 2, self.max_delay_s)
        finally:
            if was_ready:
                self.ready.set()
