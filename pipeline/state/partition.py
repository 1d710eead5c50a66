"""Everything this worker keeps for one source partition, in one object: built when the partition is assigned
(restored from its checkpoint), deleted when it is revoked, so nothing of a revoked partition lingers.

A partition's entity slots stay in its stream's EntityStateStore (scored in one batch across partitions) and
are dropped from there on revoke; its terminal context and dedupe window are restored on first use (each
costs a database read, and a partition may never see a payment)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import orjson

from pipeline.errors import StateError
from pipeline.features.streams import TransactionRecord
from pipeline.features.terminal import TerminalContext
from pipeline.records import RawRecord, TopicPartition


def context_key(partition: int) -> str:
    """entity_state key of a partition's terminal context ('#' is never the first character of an entity id)."""
    return f"#terminals:{partition}"


def dedupe_key(partition: int) -> str:
    """entity_state key of a partition's recent transaction ids (see RecentIds)."""
    return f"#dedupe:{partition}"


class RecentIds:
    """The last `cap` transaction ids of one partition, oldest first: at-least-once producers resend a payment
    (same transaction_id) after a lost ack; a resend inside this window is dropped, not scored twice. Held in
    the partition state and snapshotted with it, so a replay after a restart drops the same resends."""

    def __init__(self, cap: int, ids: Sequence[str] = ()) -> None:
        self.cap = cap
        self.order: deque[str] = deque(ids[-cap:] if cap else ())
        self.ids = set(self.order)

    def seen(self, tid: str) -> bool:
        """True if `tid` is in the window; else remember it (forgetting the oldest beyond `cap`)."""
        if tid in self.ids:
            return True
        self.order.append(tid)
        self.ids.add(tid)
        if len(self.order) > self.cap:
            self.ids.discard(self.order.popleft())
        return False

    def forget(self, tid: str) -> None:
        """Drop `tid` from the window: its payment was dead-lettered after this stage remembered it (out of order,
        a failing stage), so a corrected resend must be scored, not dropped as a duplicate. Rare: O(window)."""
        if tid in self.ids:
            self.ids.discard(tid)
            self.order.remove(tid)

    def snapshot(self) -> bytes:
        return orjson.dumps(list(self.order))

    @classmethod
    def restore(cls, cap: int, blob: bytes | None) -> RecentIds:
        ids = orjson.loads(blob) if blob else []
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise StateError("dedupe window snapshot is not a list of transaction ids")
        return cls(cap, ids)


@dataclass
class PartitionState:
    """One partition's positions and partition-local state.

    Positions: `consumed` is the next offset whose effects are applied, `committed` the durable one (written by
    the last checkpoint), `snapshot` where the last state snapshot was taken; None until known. A partition is
    replaying while consumed < committed (its outputs are durable already)."""

    tp: TopicPartition
    next_offset: int = 0  # records below were applied to state already (never apply one twice)
    recovery_until: int = 0  # records below had their outputs made durable: a replay emits nothing for them
    consumed: int | None = None
    committed: int | None = None
    snapshot: int | None = None
    epoch: int = 0  # resets of the partition's log so far (suffix of alert and incident keys)
    rewound: bool = False  # the next checkpoint writes a lower position (with a state snapshot)
    snapshot_due: float | None = None  # monotonic time the partition's staggered state snapshot is due
    # transactions partitions
    context: TerminalContext | None = None  # terminal context (its label queue too); None until first used
    dedupe: RecentIds | None = None  # None until the first payment
    held: deque[tuple[RawRecord, TransactionRecord]] | None = None  # payments waiting for their labels
    paused: bool = False  # fetching stopped while too many payments wait
    # labels partitions
    label_read: int | None = None  # next offset after the last label read
    label_watermark: float = float("-inf")  # latest labelled_at read

    def advance(self, next_offset: int) -> None:
        if self.consumed is None or next_offset > self.consumed:
            self.consumed = next_offset

    @property
    def replaying(self) -> bool:
        """Re-applying records whose outputs are already durable (after a restart or a rebalance)."""
        return (-1 if self.consumed is None else self.consumed) < (-1 if self.committed is None else self.committed)

    def durable_after(self, consumed: int) -> int:
        """The position a checkpoint may write: never below what is already durable, unless rewound."""
        if self.rewound or self.committed is None:
            return consumed
        return max(consumed, self.committed)

    def rewind(self, next_offset: int) -> None:
        """The log no longer holds our position (topic recreated, broker lost its log): start over at
        `next_offset` as new records; the next checkpoint writes it (lower) with a state snapshot."""
        self.next_offset = self.recovery_until = self.consumed = self.committed = next_offset
        self.snapshot = None
        self.rewound = True
        self.epoch += 1
        self.held = None
        if self.label_read is not None:
            self.label_read = next_offset

    def jump(self, next_offset: int) -> None:
        """Skip forward to `next_offset` (offset reset policy latest): positions move forwards only."""
        self.next_offset = next_offset
        self.held = None
        self.advance(next_offset)

    @property
    def tag(self) -> str:
        """Suffix of alert and incident keys: records of a reset log reuse offsets, their keys must not."""
        return f"~{self.epoch}" if self.epoch else ""


@dataclass
class Partitions:
    """The partitions this worker owns, by (topic, partition)."""

    states: dict[TopicPartition, PartitionState] = field(default_factory=dict)

    def assign(self, tp: TopicPartition) -> PartitionState:
        """A fresh state for `tp` (the caller restores its positions from the checkpoint)."""
        st = self.states[tp] = PartitionState(tp)
        return st

    def revoke(self, tp: TopicPartition) -> None:
        self.states.pop(tp, None)

    def __getitem__(self, tp: TopicPartition) -> PartitionState:
        """The partition's state; created for a record of a partition not assigned through a rebalance
        callback (a test double, or a record polled while the assignment changes)."""
        st = self.states.get(tp)
        return st if st is not None else self.assign(tp)

    def get(self, tp: TopicPartition) -> PartitionState | None:
        return self.states.get(tp)

    def __contains__(self, tp: object) -> bool:
        return tp in self.states

    def __iter__(self) -> Iterator[PartitionState]:
        return iter(list(self.states.values()))

    def of_topic(self, topic: str) -> list[PartitionState]:
        return [st for st in self if st.tp[0] == topic]

    def tag(self, tp: TopicPartition) -> str:
        st = self.states.get(tp)
        return st.tag if st is not None else ""

    def replay_floor(self, tp: TopicPartition) -> int:
        """Records below it are replays (their outputs are durable already): the durable position; 0 when
        there is none, or when the log was rewound (its records are new ones that reuse old offsets)."""
        st = self.states.get(tp)
        return 0 if st is None or st.rewound or st.committed is None else st.committed

    # read-only views by position kind (the incident tracker, tests)
    @property
    def consumed(self) -> dict[TopicPartition, int]:
        return {tp: st.consumed for tp, st in self.states.items() if st.consumed is not None}

    @property
    def committed(self) -> dict[TopicPartition, int]:
        return {tp: st.committed for tp, st in self.states.items() if st.committed is not None}
