"""Counters of one processor run (the Prometheus metrics count the same, process-wide)."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from pipeline.processing.retry import DbRetry


@dataclass
class ProcessorStats:
    db: DbRetry = field(repr=False)  # counts the database failures
    events: int = 0
    scored: int = 0  # for the first time: not the replay that rebuilds state below a durable position
    rebuilt: int = 0  # scored again to rebuild state (outputs durable already: nothing emitted for them)
    dead_letters: int = 0
    duplicates: int = 0
    alerts: int = 0
    alerts_by_stream: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    checkpoints: int = 0
    # False when the run ended without its final checkpoint (database down): nothing is lost, the records
    # after the last durable position replay on restart, but a supervisor should know (`pipeline run` exits 3)
    final_checkpoint: bool = True
    started: float = field(default_factory=time.monotonic)

    @property
    def db_failures(self) -> int:
        return self.db.failures
