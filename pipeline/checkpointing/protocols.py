"""What the core needs from durable storage, as protocols: the core (processor, checkpointing, alerts lifecycle)
codes against these and never imports pipeline.sinks; the SQL store implements them structurally."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from pipeline.checkpointing.rows import AlertRow, LifecycleWrite, ModelWrite, OffsetRow, StateRow
from pipeline.records import TopicPartition


class CheckpointStore(Protocol):
    def write_checkpoint(
        self,
        run_id: str,
        group_id: str,
        alert_rows: Sequence[AlertRow],
        states: Sequence[StateRow],
        offsets: Sequence[OffsetRow],
        lifecycle: LifecycleWrite | None = None,
        models: ModelWrite | None = None,
    ) -> int:
        """One transaction: alerts (idempotent on their key), state snapshots, partition offsets, the
        lifecycle rows and the per-model rows (shadow alerts and score samples, both idempotent). Returns the
        alerts newly inserted; raises SinkError (nothing written)."""
        ...


class StateLoads(Protocol):
    """Reads on (re)assignment and on an entity's first event: positions and snapshots of the last checkpoint."""

    def load_states(self, run_id: str, stream: str, entity_ids: Sequence[str]) -> dict[str, bytes]: ...

    def load_offsets(self, run_id: str, group_id: str) -> dict[TopicPartition, tuple[int, int | None]]:
        """{(topic, partition): (committed offset, snapshot offset)}"""
        ...

    def load_epochs(self, run_id: str, group_id: str) -> dict[TopicPartition, int]: ...


class IncidentLoads(Protocol):
    def open_incidents(self, run_id: str, topic: str, partition: int) -> list[dict[str, Any]]: ...


class ProcessorStore(CheckpointStore, StateLoads, Protocol):
    """Everything the processor reads and writes."""


class Relay(Protocol):
    """Publishes what a checkpoint put in the outbox (pipeline.alerts.outbox.OutboxRelay)."""

    backlog: bool

    def try_drain(self) -> int: ...
