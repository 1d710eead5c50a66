"""Where each partition resumes: on assignment from its last state snapshot (replaying up to its durable
position), and the offset-reset policy when the broker's log no longer holds the stored position."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pipeline import metrics
from pipeline.errors import OffsetResetError
from pipeline.processing.restore import PartitionRestore
from pipeline.records import RawRecord, Source, TopicPartition
from pipeline.state.partition import Partitions

log = logging.getLogger(__name__)


class Recovery:
    def __init__(self, source: Source, partitions: Partitions, restore: PartitionRestore, offset_reset: str) -> None:
        """offset_reset: earliest | latest | fail (PIPELINE_OFFSET_RESET)."""
        self.source, self.partitions, self.restore = source, partitions, restore
        self.offset_reset = offset_reset
        self._to_latest: set[TopicPartition] = set()  # skip to the log end once it is known (policy latest)

    def assign(self, tps: Sequence[TopicPartition]) -> None:
        """Build each partition's state at its last checkpoint and seek to where its state resumes."""
        saved, epochs = self.restore.positions()
        for tp in tps:
            st = self.partitions.assign(tp)
            committed, snap = saved.get(tp, (None, None))
            st.epoch = epochs.get(tp, 0)
            if committed is None:
                # nothing durable in *this* database: score everything. The group's Kafka offset is not a
                # durable output (a new database, or a new run id): trusting it suppressed every alert below it
                kafka = self.source.committed(tp)
                if kafka:
                    log.warning(
                        "%s[%d]: no position of this run in the database; scoring from the start (the consumer "
                        "group's offset %d is not a durable output here)",
                        tp[0],
                        tp[1],
                        kafka,
                    )
            # no snapshot yet: rebuild state from the start, even if outputs were committed
            start = snap if snap is not None else 0
            if snap is not None or committed is not None:
                start = self._check_log_start(tp, start, committed)
            self.source.seek(tp, start)
            st.recovery_until = committed or 0
            st.next_offset = start
            st.committed, st.snapshot = committed, snap
            log.info("assigned %s[%d]: resume state from %d, outputs durable up to %s", tp[0], tp[1], start, committed)

    def _offset_reset(self, tp: TopicPartition, stored: int, lo: int | None, hi: int | None, why: str) -> str:
        """Log the ERROR, count it, and return the policy to apply (raises OffsetResetError for 'fail')."""
        policy = self.offset_reset
        metrics.OFFSET_RESETS.labels(tp[0], why).inc()
        log.error(
            "%s[%d]: stored position %d is %s of the broker's log [%s, %s) (topic recreated, broker lost "
            "its log, or retention/truncation); offset reset policy %r (PIPELINE_OFFSET_RESET)",
            tp[0],
            tp[1],
            stored,
            why,
            "?" if lo is None else lo,
            "?" if hi is None else hi,
            policy,
        )
        if policy == "fail":
            raise OffsetResetError(
                f"{tp[0]}[{tp[1]}]: stored position {stored} is {why} of the broker's log "
                f"[{lo}, {hi}); PIPELINE_OFFSET_RESET=fail"
            )
        return policy

    def _log_start(self, tp: TopicPartition) -> int | None:
        start_of = getattr(self.source, "log_start", None)
        return None if start_of is None else start_of(tp)

    def _check_log_start(self, tp: TopicPartition, start: int, committed: int | None) -> int:
        """Where to resume a partition whose replay would start before the log's first record. The policy is
        for a durable position the log no longer holds (records never processed are gone); when only the
        state snapshot is older than the log's start (ordinary retention), state is rebuilt from what the log
        still has and every unprocessed record is still read."""
        lo = self._log_start(tp)
        if lo is None or start >= lo:
            return start
        durable = committed if committed is not None else start
        if durable >= lo:
            log.warning(
                "%s[%d]: state snapshot position %d is before the broker's log start %d (retention); "
                "rebuilding state from %d (partial history), outputs durable up to %d",
                tp[0],
                tp[1],
                start,
                lo,
                lo,
                durable,
            )
            return lo
        if self._offset_reset(tp, durable, lo, None, "before the start") == "latest":
            self._to_latest.add(tp)  # the end is known after the first fetch (Tansu's ListOffsets is wrong)
        return lo  # state replays what the log still has; the positions only move forwards

    def check_log_ends(self, records: list[RawRecord]) -> list[RawRecord]:
        """After each fetch: a log whose end is below our position was reset (memory broker restarted,
        topic recreated). Apply the policy; records fetched at the old position are dropped (re-read)."""
        hw_of = getattr(self.source, "highwater", None)
        if hw_of is None:
            return records
        moved: set[TopicPartition] = set()
        for st in self.partitions:
            tp = st.tp
            try:
                hw = hw_of(tp)
            except Exception as exc:  # noqa: BLE001 - not assigned in the client (mid-rebalance): next poll
                log.debug("no high watermark of %s[%d] yet: %s", tp[0], tp[1], exc)
                continue
            if hw is None:
                continue
            if tp in self._to_latest:
                self._to_latest.discard(tp)
                offset = max(hw, st.next_offset)
                self.source.seek(tp, offset)
                st.jump(offset)
                moved.add(tp)
                continue
            stored = max(st.next_offset, st.committed or 0)
            if hw < stored:
                self._state_gap(tp, st.next_offset, st.committed)
                lo = self._log_start(tp) or 0
                policy = self._offset_reset(tp, stored, lo, hw, "past the end")
                offset = hw if policy == "latest" else lo
                self.source.seek(tp, offset)
                st.rewind(offset)
                moved.add(tp)
        if not moved:
            return records
        return [r for r in records if (r.topic, r.partition) not in moved]

    def _state_gap(self, tp: TopicPartition, applied: int, durable: int | None) -> None:
        """The log went while the partition was still replaying from its state snapshot: the records between
        the replay's position and the durable one are gone before their effects on entity state came back.
        Their outputs are durable; the state of their entities resumes without them (partial history). Said
        once per reset, loudly, rather than resuming as if nothing was missing."""
        if durable is None or applied >= durable:
            return
        metrics.STATE_RECORDS_LOST.labels(tp[0]).inc(durable - applied)
        log.error(
            "%s[%d]: the broker's log was lost while the partition's state was replaying from its snapshot "
            "(state rebuilt up to offset %d of the durable %d): the effects of those %d records on the "
            "entities' state are lost; their alerts and outputs are durable. A shorter "
            "PIPELINE_SNAPSHOT_INTERVAL_S narrows this window",
            tp[0],
            tp[1],
            applied,
            durable,
            durable - applied,
        )

    def forget(self, tp: TopicPartition) -> None:
        self._to_latest.discard(tp)


def drop_reapplied(partitions: Partitions, recs: list[RawRecord], source: Source) -> list[RawRecord]:
    """Never apply a record to state twice, nor a reset log's records as if they continued the old one.

    A broker that lost its log (e.g. restarted with memory storage) makes the consumer reset to an earlier
    offset. A record below the partition's position shows it: from there on, none of that partition's records
    in this poll is applied (the new log's records at offsets above the position were applied as the old
    log's continuation, their ids then dropped as duplicates when re-read: a lost alert in the chaos test), and
    the partition is sought back to its position, until Recovery.check_log_ends knows the log's end and
    applies the offset-reset policy."""
    keep = None
    nxt: dict[TopicPartition, int] = {}  # the hot loop works on a local dict; the states are updated once
    reset: set[TopicPartition] = set()
    for i, r in enumerate(recs):
        tp = (r.topic, r.partition)
        expected = nxt.get(tp)
        if expected is None:
            expected = partitions[tp].next_offset
        if r.offset < expected or tp in reset:
            if keep is None:
                keep = recs[:i]
            reset.add(tp)
            continue
        nxt[tp] = r.offset + 1
        if keep is not None:
            keep.append(r)
    for tp, offset in nxt.items():
        partitions[tp].next_offset = offset
    if keep is None:
        return recs
    for tp in reset:
        source.seek(tp, partitions[tp].next_offset)
    log.warning(
        "skipped %d records at or after an offset below the already-processed position of %s (broker log reset "
        "or truncated?); reading there again until the log's end is known",
        len(recs) - len(keep),
        ", ".join(f"{t}[{p}]" for t, p in sorted(reset)),
    )
    return keep
