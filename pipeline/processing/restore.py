"""Reads a partition's saved state back from the last checkpoint: its positions on assignment, its terminal
context and dedupe window on first use, its entities' states on their first event. Every read goes through
the database-retry policy: without them state would restart from the wrong place."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.checkpointing.protocols import StateLoads
from pipeline.errors import StateError
from pipeline.features.streams import TransactionStream
from pipeline.features.terminal import TerminalContext
from pipeline.processing.retry import DbRetry
from pipeline.records import TopicPartition
from pipeline.state.partition import PartitionState, RecentIds, context_key, dedupe_key


class PartitionRestore:
    def __init__(self, store: StateLoads, retry: DbRetry, *, run_id: str, group_id: str, dedupe_window: int) -> None:
        self.store, self.retry = store, retry
        self.run_id, self.group_id, self.dedupe_window = run_id, group_id, dedupe_window

    def positions(self) -> tuple[dict[TopicPartition, tuple[int, int | None]], dict[TopicPartition, int]]:
        """(committed and snapshot offset, log epoch) per partition, as the last checkpoints wrote them. A
        database outage during assignment is waited out (the heartbeat thread keeps us in the group)."""
        saved = self.retry("read partition checkpoints", lambda: self.store.load_offsets(self.run_id, self.group_id))
        epochs = self.retry("read partition epochs", lambda: self.store.load_epochs(self.run_id, self.group_id))
        return saved, epochs

    def entity_states(self, stream: str, ids: Sequence[str]) -> dict[str, bytes]:
        """The saved states of a stream's entities seen for the first time since assignment (or eviction)."""
        return self.retry(
            f"load {len(ids)} {stream} entity states", lambda: self.store.load_states(self.run_id, stream, ids)
        )

    def _blob(self, st: PartitionState, stream: str, key: str, what: str) -> bytes | None:
        topic, partition = st.tp
        return self.retry(
            f"load the {what} of {topic}[{partition}]", lambda: self.store.load_states(self.run_id, stream, [key])
        ).get(key)

    def context(self, st: PartitionState, spec: TransactionStream) -> TerminalContext:
        """The partition's terminal context: in its state, else restored from its snapshot, else new."""
        if st.context is None:
            blob = self._blob(st, spec.name, context_key(st.tp[1]), "terminal context")
            if blob is None and st.snapshot is not None:
                raise StateError(
                    f"{st.tp[0]}[{st.tp[1]}] has a state snapshot but no terminal context (written by a "
                    "model without terminal features?); use a new run id for this model"
                )
            st.context = spec.restore_context(blob, st.tp[1])
        return st.context

    def dedupe(self, st: PartitionState, stream: str) -> RecentIds:
        """The partition's dedupe window as of its state snapshot (state resumes there); empty without one."""
        if st.dedupe is None:
            blob = None if st.snapshot is None else self._blob(st, stream, dedupe_key(st.tp[1]), "dedupe window")
            st.dedupe = RecentIds.restore(self.dedupe_window, blob)
        return st.dedupe
